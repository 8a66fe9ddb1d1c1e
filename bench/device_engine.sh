#!/usr/bin/env bash
# The compile step on the GPU machine (the device tool), one call per mode; logs land in $OUT.
#   bash bench/device_engine.sh main   # bench/engine.py at 1152x768, batch 1 and 8
#                                      # (builds the Inductor FP16 engine: ~2 min per batch size)
#   bash bench/device_engine.sh warm   # next call while the machine is warm: daemon warm start
#                                      # from the engine the first call left in /tmp
#   bash bench/device_engine.sh swin   # bench/swin_attention.py (Swin attention variants side by
#                                      # side), then bench/engine.py at batch 1 only (~3.5 min)
set -uo pipefail
# shellcheck source=bench/device_env.sh
source "$(dirname "$0")/device_env.sh"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$out/env.txt"
engine=/tmp/codetr_bench_engine_1152x768
case "${1:-main}" in
  main)
    timeout 520 python3 bench/engine.py --sizes 1152x768 --batches 1,8 --iters 20 \
      --profile "$out" --json "$out/engine.json" --results "$out/RESULTS.md" \
      2>&1 | tee "$out/bench.log"
    cp "$engine/manifest.json" "$out/manifest.json" 2>/dev/null
    ;;
  warm)
    timeout 400 python3 bench/engine.py --sizes 1152x768 --batches 1,8 --iters 20 \
      --engine "1152x768=$engine" --warm-start --json "$out/engine_warm.json" \
      --results "$out/RESULTS.md" 2>&1 | tee "$out/bench_warm.log"
    ;;
  swin)
    { timeout 90 python3 bench/swin_attention.py --batch 1 --stages 1,3 --kernels
      timeout 50 python3 bench/swin_attention.py --batch 8 --stages 1 --variants explicit,sdpa
    } 2>&1 | grep -v Warning | tee "$out/swin.log"
    timeout 320 python3 bench/engine.py --sizes 1152x768 --batches 1 --iters 20 \
      --profile "$out" --json "$out/engine.json" --results "$out/RESULTS.md" 2>&1 | tee "$out/bench.log"
    ;;
esac
