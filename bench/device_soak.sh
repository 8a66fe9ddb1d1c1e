#!/usr/bin/env bash
# The >= 20-minute soak (bench/soak.py) on the GPU machine (the device tool). A call lasts at most
# 10 minutes, so the engine build and the soak run detached (setsid) with their state in
# /tmp/soak, which outlives each call while the machine stays warm (~30 s between calls: chain
# them), and every call collects what there is so far into $OUT. Calls, in order:
#   carry [".whl"]   bash bench/device_pipeline.sh install .whl && bash bench/device_soak.sh build
#                    (starts building the full-size Co-DINO Swin-L 1152x768 Inductor FP16 batch-8
#                    engine, seeded random weights, ~3 min cold, and returns)
#   carry [".whl2"]  bash bench/device_pipeline.sh install .whl2 && bash bench/device_soak.sh start
#                    (waits up to 8 min for the build, starts the soak, returns; if it says the
#                    build is still running, call `start` again)
#   then             bash bench/device_soak.sh wait 560   (repeat until it says "soak finished";
#                    the soak takes ~23 min: 2 engine loads, 1 min warm-up, 20 min measured)
# `report` collects without waiting; `stop` ends the measurement now (SIGTERM: the soak still
# stops the daemon and judges what it measured). `start` builds the engine itself if no `build`
# ran. Arguments after `start` go to bench/soak.py (the last of a repeated option wins); `build
# --tiny` / `start --tiny ...` use the tiny CPU engine, to rehearse the flow without a GPU:
#   SOAK_DIR=/tmp/soak-cpu OUT=/tmp/out bash bench/device_soak.sh start --tiny --device cpu \
#     --cameras 2 --size 320x240 --minutes 1 --warmup 15 --table-every 20 --churn-every 8-12
# Files in $OUT: status.txt, progress.md (a row per minute), samples.jsonl, soak.log (tail),
# build.log; once finished also report.md (the RESULTS.md section) and result.json.
set -uo pipefail
# shellcheck source=bench/device_env.sh
source "$(dirname "$0")/device_env.sh"
state=${SOAK_DIR:-/tmp/soak}
py=${PYTHON:-python3}
# Both run from a copy of the code in $state/src: a later call may re-sync the working tree under
# a process that still imports lazily. /tmp/site holds the wheels device_pipeline.sh installed.
soak_path="$state/src:/tmp/site"

running() {  # $1 build|soak
  [ -f "$state/$1.pid" ] && [ ! -f "$state/$1.rc" ] && kill -0 "$(cat "$state/$1.pid")" 2>/dev/null
}

passed() {  # $1 build|soak
  [ "$(cat "$state/$1.rc" 2>/dev/null)" = 0 ]
}

detach() {  # $1 build|soak, then the command: runs in a new session with $1.{log,pid,rc}
  local name=$1
  shift
  rm -f "$state/$name".{log,pid,rc}
  # shellcheck disable=SC2016  # $0, $! and $? belong to the inner shell
  PYTHONPATH=$soak_path setsid bash -c '"$@" > "$0.log" 2>&1 & echo $! > "$0.pid"
    wait $!; echo $? > "$0.rc"' "$state/$name" "$@" < /dev/null > /dev/null 2>&1 &
  for _ in $(seq 50); do [ -f "$state/$name.pid" ] && break; sleep 0.1; done
}

copy_code() {
  rm -rf "$state/src"
  mkdir -p "$state/src/codetr_stream" "$state/src/bench"
  cp -r compile plugin daemon "$state/src/codetr_stream/"  # the RTSP servers: daemon/demo/
  cp bench/soak.py bench/soak_report.py bench/process_trend.py "$state/src/bench/"
}

status() {
  local name
  for name in build soak; do
    if running "$name"; then
      echo "$name running: pid $(cat "$state/$name.pid")"
      ps -o etime=,rss=,nlwp= -p "$(cat "$state/$name.pid")" 2>/dev/null |
        awk '{print "  elapsed " $1 ", RSS " int($2 / 1024) " MB, threads " $3}'
    elif [ -f "$state/$name.rc" ]; then
      echo "$name finished: exit $(cat "$state/$name.rc") ($(passed "$name" && echo PASS || echo FAIL))"
    elif [ -f "$state/$name.pid" ]; then
      echo "$name died without an exit code; see $name.log"
    fi
  done
  cat "$state/env.txt" 2>/dev/null
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader
  fi
}

collect() {
  [ -f "$state/soak.log" ] && tail -n 400 "$state/soak.log" > "$out/soak.log"
  [ -f "$state/build.log" ] && tr '\r' '\n' < "$state/build.log" | grep -v '^compile: ' |
    tail -n 100 > "$out/build.log"
  for f in progress.md samples.jsonl report.md result.json; do
    [ -f "$state/$f" ] && cp "$state/$f" "$out/$f"
  done
  status | tee "$out/status.txt"
  if [ -f "$state/soak.rc" ] && [ -f "$state/report.md" ]; then
    cat "$state/report.md"
  elif [ -f "$state/progress.md" ]; then
    cat "$state/progress.md"
  elif [ -f "$state/soak.log" ]; then
    tail -n 30 "$state/soak.log"
  elif [ -f "$out/build.log" ]; then
    tail -n 15 "$out/build.log"
  fi
}

build() {  # [--tiny]: start building the engine unless it is built or building
  local kind=full
  [ "${1:-}" = --tiny ] && kind=tiny
  local engine="$state/engine-$kind"
  if [ -f "$engine/manifest.json" ] || running build; then return 0; fi
  mkdir -p "$state"
  copy_code
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
    PYTHONPATH=$soak_path "$py" -c "import torch, av, zmq; print('torch', torch.__version__, \
'av', av.__version__, 'zmq', zmq.__version__)"; } > "$state/env.txt" 2>&1
  local args=(--config co_dino_swin_l --random-weights --backend inductor --precision fp16
              --batch 8 --size 1152x768)
  [ "$kind" = tiny ] && args=(--config tests/data/tiny_config.json --weights
                              tests/data/tiny_codino.pth --backend eager --precision fp32
                              --batch "1,2,4" --size 320x256 --device cpu)
  echo "building the $kind engine in $engine"
  detach build timeout 900 "$py" -m codetr_stream.daemon.cli compile "${args[@]}" --out "$engine"
}

start() {  # [--tiny] [soak.py arguments]
  if running soak; then
    echo "a soak is already running"
    collect
    return 0
  fi
  local kind=full
  [ "${1:-}" = --tiny ] && { kind=tiny; shift; }
  build "--$kind"
  while running build && [ "$SECONDS" -lt 480 ]; do sleep 5; done
  if [ ! -f "$state/engine-$kind/manifest.json" ]; then
    echo "no engine: the build $(running build && echo "is still running" || echo failed)"
    collect
    return 1
  fi
  copy_code  # the build, if any, is over: nothing runs from the copy now
  rm -f "$state"/{progress.md,samples.jsonl,report.md,result.json}
  date -u +"%Y-%m-%d %H:%M:%S UTC" > "$state/started"
  detach soak "$py" "$state/src/bench/soak.py" --engine "$state/engine-$kind" --device cuda \
    --server replay --cameras 16 --fps 5 --size 1280x720 --minutes 20 --warmup 60 \
    --churn-every 30-60 --down 2-6 --sample-every 5 --live "$state" \
    --out "$state/result.json" --markdown "$state/report.md" "$@"
  sleep 10
  collect
  running soak || passed soak
}

wait_for() {  # $1 seconds at most
  local deadline=$((SECONDS + ${1:-560}))
  while running soak && [ "$SECONDS" -lt "$deadline" ]; do sleep 5; done
  collect
  running soak || passed soak
}

case "${1:-}" in
  build) shift; build "$@"; sleep 3; collect; running build || passed build ;;
  start) shift; start "$@" ;;
  wait) wait_for "${2:-560}" ;;
  report) collect; running soak || passed soak ;;
  stop)
    running soak && kill -TERM "$(cat "$state/soak.pid")"
    wait_for 180
    ;;
  *) echo "usage: $0 build [--tiny] | start [--tiny] [soak.py args] | wait SECONDS | report" \
          "| stop" >&2
     exit 2 ;;
esac
