#!/usr/bin/env bash
# The daemon on the GPU machine (the device tool), in two calls while the machine stays warm:
# the wheels it lacks (PyAV, pyzmq, pydantic, prometheus-client; PyNvVideoCodec) do not fit one
# call's 64 MiB together with the repo.
#   call 1: carry [".whl"]   bash bench/device_pipeline.sh install .whl
#   call 2: carry [".whl2"]  bash bench/device_pipeline.sh run .whl2
# `run` installs its wheels too, then the GPU tests (NVDEC, daemon on CUDA, the fused
# preprocessing and postprocessing kernels against their references, the runner's GPU
# postprocessing) and the pipeline bench: 16 cameras against the full-size Co-DINO Swin-L
# 1152x768 built here as an Inductor FP16 engine for batch 8 (~2 min cold), one daemon run per
# GIL switch interval. Logs land in $OUT; the whole `run` fits one 600 s call. ENGINE=DIR uses an
# engine built earlier on the warm machine (bench/device_engine.sh eval leaves one) instead;
# CAMERAS (16) and SWITCH (0.005,0.001) change the load and the runs.
set -uo pipefail
# shellcheck source=bench/device_env.sh
source "$(dirname "$0")/device_env.sh"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$2"/*.whl 2>&1 | tail -3
export PYTHONPATH="$PYTHONPATH:/tmp/site"
python3 -c "import av, zmq, pydantic, prometheus_client; print('av', av.__version__, 'zmq', zmq.__version__)" 2>&1 | tee "$out/env.txt"
[ "$1" = install ] && exit 0
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, PyNvVideoCodec as n; print('torch', torch.__version__, 'pynvvideocodec', n.__version__)"
} 2>&1 | tee -a "$out/env.txt"
timeout 150 python3 -m pytest -p no:cacheprovider -m gpu -q -rA --durations=10 \
  tests/test_source_gpu.py tests/test_pipeline_gpu.py tests/test_preprocess.py \
  tests/test_postprocess.py 2>&1 | tee "$out/pytest.log"
tests=${PIPESTATUS[0]}
if [ -n "${ENGINE:-}" ]; then source_args=(--engine "$ENGINE")
else source_args=(--build-full fp16 --backend inductor --batch-sizes 8); fi
timeout 420 python3 bench/pipeline_throughput.py "${source_args[@]}" \
  --cameras "${CAMERAS:-16}" --fps 5 --seconds 12 --warmup 4 --switch-intervals "${SWITCH:-0.005,0.001}" \
  --out "$out/pipeline.md" 2>&1 | grep -v " INFO " | tee "$out/bench.log"
bench=${PIPESTATUS[0]}
echo "pytest exit $tests, bench exit $bench"
exit $((tests || bench))
