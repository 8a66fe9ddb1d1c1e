#!/usr/bin/env bash
# `codetr-stream eval` on the GPU machine (the device tool): the FP32 eager model and the given
# engines on one labelled set, in one run, with images/s. The machine has no network, so the set
# is made here: drawn shapes with their boxes as labels (tests/coco_shapes.py), labelled with the
# first engine's class names. The eager row is that engine's own weights (weights.pt and
# config.json: the first engine must be an eager one, e.g. `codetr-stream compile --backend eager
# --precision fp32` with the same --random-weights --seed as the others; inductor engines keep
# their weights inside program.pt2) run in FP32, and every row is also scored against it
# (agreement AP: what FP16 changes, no labels needed). One call of an estimated
# 1.5-2 min for the default 100 images with a built Swin-L 1152x768 engine (not yet run there;
# its warm load is ~50 s, and pycocotools took 40 s per agreement score of 200 images x 300 boxes
# on the loaded 2-core CPU here):
#   carry [".whl-eval"]  bash bench/eval_gpu.sh EAGER_ENGINE_DIR [MORE_ENGINE_DIRS...]
# .whl-eval holds the wheels the machine lacks (pycocotools, pydantic and its dependencies),
# installed into /tmp/site; WHEELS names another folder. Also: EVAL_IMAGES (100), EVAL_SIZES
# (640x480,640x427,480x640,500x375: COCO-like, one portrait), EVAL_SCORE (the reference's score
# threshold, 0.3), EVAL_DEVICE (cuda), PYTHON (python3). Files in $OUT: eval.md, eval.json,
# eval.log. With random weights (what the GPU machine has) AP against the shapes is ~0 and only
# images/s and agreement mean anything; their scores are flat (all 300 of Swin-L's between 0.81
# and 0.90 on one CPU run), so every box the eager model keeps after NMS is agreement truth.
set -uo pipefail
# shellcheck source=bench/device_env.sh
source "$(dirname "$0")/device_env.sh"
py=${PYTHON:-python3}
[ $# -ge 1 ] || { echo "usage: bash bench/eval_gpu.sh EAGER_ENGINE_DIR [MORE_ENGINE_DIRS...]" >&2
                  exit 2; }
wheels=${WHEELS:-.whl-eval}
if [ -d "$wheels" ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$wheels"/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
set_dir=$(mktemp -d)
trap 'rm -rf "$set_dir"' EXIT
"$py" tests/coco_shapes.py --out "$set_dir" --images "${EVAL_IMAGES:-100}" \
  --sizes "${EVAL_SIZES:-640x480,640x427,480x640,500x375}" --classes-from "$1" || exit 1
engines=()
for engine in "$@"; do engines+=(--engine "$engine"); done
"$py" -m codetr_stream.daemon.cli eval --eager "$1/config.json" --weights "$1/weights.pt" \
  "${engines[@]}" --images "$set_dir/images" --annotations "$set_dir/annotations.json" \
  --reference --reference-score "${EVAL_SCORE:-0.3}" --device "${EVAL_DEVICE:-cuda}" \
  --no-progress --out "$out/eval.json" > "$out/eval.md" 2> "$out/eval.log"
status=$?
cat "$out/eval.md"
tail -n 20 "$out/eval.log" >&2
exit "$status"
