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
