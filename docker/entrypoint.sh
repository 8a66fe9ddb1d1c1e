#!/bin/sh
# Container entrypoint: `run` makes sure the engine named in streams.yaml exists, building it on
# first start into the state volume when CODETR_STREAM_COMPILE_ARGS says how, then execs the
# daemon, so tini's forwarded SIGTERM/SIGHUP reach it directly.
# Any other command passes through: `docker run IMAGE check-config /etc/codetr-stream/streams.yaml`.
set -eu

if [ "$#" -eq 0 ]; then
    set -- run --config /etc/codetr-stream/streams.yaml
fi
if [ "$1" != "run" ]; then
    exec codetr-stream "$@"
fi

config=/etc/codetr-stream/streams.yaml
previous=""
for arg in "$@"; do
    case "$arg" in
        --config=*) config="${arg#--config=}" ;;
        *) if [ "$previous" = "--config" ]; then config="$arg"; fi ;;
    esac
    previous="$arg"
done

# Fail fast with every config problem (file:line: field: message) before any compile; on
# success this logs the summary (credentials redacted). Exit code 3 is a valid file whose engine
# `run` would refuse as it is (not built yet, or stale): what the steps below build or report.
checked=0
codetr-stream check-config "$config" >&2 || checked=$?
if [ "$checked" -ne 0 ] && [ "$checked" -ne 3 ]; then
    echo "entrypoint: $config is invalid (errors above); not starting" >&2
    exit 2
fi

engine=$(python3 -c 'import sys
from codetr_stream.daemon.config.load import load_config
print(load_config(sys.argv[1]).engine.path)' "$config")

if [ ! -f "$engine/manifest.json" ]; then
    if [ -z "${CODETR_STREAM_COMPILE_ARGS:-}" ]; then
        echo "entrypoint: no engine at $engine (engine.path in $config). Mount a directory" \
             "built by \`codetr-stream compile\` there, or set CODETR_STREAM_COMPILE_ARGS" \
             "(e.g. \"--backend inductor --weights /models/co_dino_swin_l.pth\") to build it" \
             "on first start." >&2
        exit 2
    fi
    echo "entrypoint: building the engine at $engine (first start; minutes)" >&2
    # Into a scratch directory first: a container stopped mid-build leaves no half engine.
    partial="$engine.partial"
    rm -rf "$partial"
    mkdir -p "$(dirname "$engine")"
    # shellcheck disable=SC2086  # the variable holds several arguments by design
    codetr-stream compile $CODETR_STREAM_COMPILE_ARGS --out "$partial"
    mv "$partial" "$engine"
fi

exec codetr-stream "$@"
