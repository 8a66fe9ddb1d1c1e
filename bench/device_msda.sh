#!/usr/bin/env bash
# One call on the GPU machine (the device tool) for the MSDA kernel: its GPU tests, then the
# benchmark. Logs, results.json and the RESULTS.md section land in $OUT.
#   bash bench/device_msda.sh
set -uo pipefail
# shellcheck source=bench/device_env.sh
source "$(dirname "$0")/device_env.sh"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$out/env.txt"
python3 -m pytest -p no:cacheprovider -m gpu -q -rA \
  tests/test_msda_gpu.py tests/test_msda_tensorrt.py 2>&1 | tee "$out/pytest.log"
tests=${PIPESTATUS[0]}
python3 bench/msda.py --out "$out" --model-share 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}
echo "pytest exit $tests, bench exit $bench"
exit $((tests || bench))
