#!/usr/bin/env bash
# One call on the GPU machine (the device tool) for the MSDA kernel: the benchmark first (every
# variant checked against float64, then timed side by side; block sweep, locality study, model
# share), then the GPU tests (numerics of every variant over many shapes, compile + CUDA graphs,
# the model, the compiled lane layout). Logs, results.json and the RESULTS.md section land in
# $OUT, with the seconds each phase took. About 4 minutes on an H100/H200.
#   bash bench/device_msda.sh
#   bash bench/device_msda.sh offsets   # bench/msda_offsets.py (the layer's arithmetic + op vs
#                                       # the offsets kernel), then the GPU tests of that kernel
#                                       # and of the reduction heuristics (~3 min)
set -uo pipefail
# shellcheck source=bench/device_env.sh
source "$(dirname "$0")/device_env.sh"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$out/env.txt"
SECONDS=0
if [[ ${1:-} == offsets ]]; then
  python3 bench/msda_offsets.py 2>&1 | grep -v Warning | tee "$out/offsets.md"
  bench=${PIPESTATUS[0]}
  python3 -m pytest -p no:cacheprovider -m gpu -q -rA tests/test_msda_offsets.py \
    tests/test_reductions.py 2>&1 | tail -n 25 | tee "$out/pytest.log"
  tests=${PIPESTATUS[0]}
  echo "bench exit $bench, tests exit $tests after ${SECONDS}s" | tee -a "$out/env.txt"
  exit $((tests || bench))
fi
python3 bench/msda.py --out "$out" --model-share 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}
echo "bench: exit $bench after ${SECONDS}s" | tee -a "$out/env.txt"
python3 -m pytest -p no:cacheprovider -q -rfE --durations=5 \
  tests/test_msda_gpu.py tests/test_msda_tensorrt.py tests/test_msda_layout.py 2>&1 \
  | tee "$out/pytest.log"
tests=${PIPESTATUS[0]}
echo "tests: exit $tests after ${SECONDS}s" | tee -a "$out/env.txt"
exit $((tests || bench))
