# shellcheck shell=bash
# Sourced by bench/device_*.sh on the GPU machine: the repository root as the working directory,
# $out for logs (the device tool's $OUT), and the codetr_stream namespace linked over the
# top-level folders instead of a pip install.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
out=${OUT:-/tmp/device-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
ns=$(mktemp -d)
mkdir -p "$ns/codetr_stream"
for d in compile plugin daemon; do ln -s "$PWD/$d" "$ns/codetr_stream/$d"; done
export PYTHONPATH="$ns${PYTHONPATH:+:$PYTHONPATH}"
# The wheels the machine lacks (pydantic for the config models, PyAV, pyzmq, PyNvVideoCodec,
# pycocotools), from whichever wheel folders this call carried, into /tmp/site, which stays
# between the calls of one warm machine.
for wheels in .whl .whl2 .whl-eval; do
  if compgen -G "$wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$wheels"/*.whl 2>&1 | grep -v "WARNING: Target directory" | tail -3
  fi
done
export PYTHONPATH="$PYTHONPATH:/tmp/site"
