#!/usr/bin/env bash
# One call on the GPU machine (the device tool) for the MSDA kernel: the benchmark first (every
# variant checked against float64, then timed side by side; block sweep, locality study, model
# share), then the GPU tests (numerics of every variant over many shapes, compile + CUDA graphs,
# the model, the compiled lane layout). Logs, results.json and the RESULTS.md section land in
# $OUT, with the seconds each phase took. About 4 minutes on an H100/H200.
#   bash bench/device_msda.sh
set -uo pipefail
# shellcheck source=bench/device_env.sh
source "$(dirname "$0")/device_env.sh"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$out/env.txt"
SECONDS=0
python3 bench/msda.py --out "$out" --model-share 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}
echo "bench: exit $bench after ${SECONDS}s" | tee -a "$out/env.txt"
python3 -m pytest -p no:cacheprovider -q -rfE --durations=5 \
  tests/test_msda_gpu.py tests/test_msda_tensorrt.py tests/test_msda_layout.py 2>&1 \
  | tee "$out/pytest.log"
tests=${PIPESTATUS[0]}
echo "tests: exit $tests after ${SECONDS}s" | tee -a "$out/env.txt"
exit $((tests || bench))
