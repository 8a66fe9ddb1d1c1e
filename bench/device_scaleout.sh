#!/usr/bin/env bash
# Issues 7 and 8 on a two-GPU device machine (nvidia-h100-x2 or nvidia-h200-x2), in two calls
# while the machine stays warm (the wheels and the repo do not fit one call's 64 MiB):
#   call 1: carry [".whl"]   bash bench/device_pipeline.sh install .whl
#   call 2: carry [".whl2"]  bash bench/device_scaleout.sh .whl2
# Call 2 installs its wheels (PyNvVideoCodec), then:
#   1. pytest -m gpu tests/test_multi_gpu.py: one daemon with `engine.gpus: [0, 1]` runs an engine
#      worker per GPU and spreads the cameras over them (issue 7); and the Inductor engine built
#      on cuda:0 loaded on cuda:1 (tests/test_engines_inductor.py, the test needing two GPUs);
#   2. bench/scaleout.py: one worker on GPU 0 serving all 16 cameras, then two sharded workers
#      (one per GPU, CUDA_VISIBLE_DEVICES) behind `codetr-stream proxy`, one SUB on the proxy;
#      full-size Co-DINO Swin-L 1152x768 eager FP16, seeded random weights (issue 8).
# About 4-5 minutes (limits inside: 100 s + 150 s + 210 s). No NCCL (the GPUs never talk to each other).
# Logs and tables land in $OUT: env.txt, pytest.log, bench.log, scaleout.md, processes.log.
set -uo pipefail
bash "$(dirname "$0")/device_pipeline.sh" install "$1" || exit 1
# shellcheck source=bench/device_env.sh
source "$(dirname "$0")/device_env.sh"
export PYTHONPATH="$PYTHONPATH:/tmp/site"
{
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
  nvidia-smi topo -m
  python3 -c "import torch, PyNvVideoCodec as n; print('torch', torch.__version__, 'GPUs', \
torch.cuda.device_count(), 'pynvvideocodec', n.__version__)"
} 2>&1 | tee -a "$out/env.txt"
timeout 100 python3 -m pytest -p no:cacheprovider -m gpu -q -rA tests/test_multi_gpu.py 2>&1 \
  | tee "$out/pytest.log"
tests=${PIPESTATUS[0]}
timeout 150 python3 -m pytest -p no:cacheprovider -m gpu -q -rA tests/test_engines_inductor.py \
  -k one_gpu_runs_on_another 2>&1 | tee -a "$out/pytest.log"
tests=$((tests || PIPESTATUS[0]))
timeout 210 python3 bench/scaleout.py --build-full fp16 --backend eager --workers 2 \
  --cameras 16 --fps 8 --seconds 15 --warmup 5 --start-timeout 90 --out "$out/scaleout.md" \
  --log-file "$out/processes.log" 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}
echo "pytest exit $tests, bench exit $bench"
exit $((tests || bench))
