#!/usr/bin/env bash
# The compile step on the GPU machine (the device tool), one call per mode; logs land in $OUT.
#   bash bench/device_engine.sh sizes     # 608x608, 1152x768, 1920x1280 x batch 1, 8: eager FP32,
#                                         # eager FP16, Inductor FP16 + CUDA graph (6 engines built
#                                         # in parallel), while the GPU tests of the Inductor
#                                         # engine run beside the builds (~7-9 min)
#   bash bench/device_engine.sh variants  # 1152x768 x batch 1, 8: the baseline engine vs the
#                                         # engine passes (fold-masks, linear-relu, both), and a
#                                         # daemon warm start of baseline and both (~7-9 min)
#   bash bench/device_engine.sh tuning    # 1152x768 x batch 1: both passes, alone and with the
#                                         # Inductor presets tune-pointwise and autotune-gemm
#                                         # (their compile cost is part of the answer)
#   bash bench/device_engine.sh main      # 1152x768 x batch 1, 8, baseline, with profiles
#   CANDIDATES=msda-offsets bash bench/device_engine.sh passes
#                                         # this tree's default engine against the default plus
#                                         # each candidate ('+'-joined passes or presets), batch
#                                         # 1 and 8, eager FP32, feature probes, profiles, with
#                                         # the GPU tests of the engine beside the builds (~7 min;
#                                         # GPU_TESTS='FILE ...' for other test files, '' none);
#                                         # carry [".baseline", ...] to add the default engine as
#                                         # the code in .baseline/codetr_stream builds it (`git
#                                         # archive REV compile plugin daemon | tar -x -C
#                                         # .baseline/codetr_stream`, REV in .baseline/REVISION)
#   bash bench/device_engine.sh release   # the engine as a user builds it (`codetr-stream
#                                         # compile --batch 1,8`, timed cold), a daemon-like warm
#                                         # start (fresh caches), its timing at batch 1 and 8 with
#                                         # profiles and the generated code of the profiled
#                                         # kernels (kernels_b8.txt), then the GPU test of the
#                                         # Inductor engine with the default passes (~9 min: start
#                                         # it on a fresh machine)
#   bash bench/device_engine.sh eval      # carry [".whl-eval"]: `codetr-stream compile` of the
#                                         # Inductor FP16 engine for batch 8 (timed cold, kept in
#                                         # /tmp/codetr_release_engine for bench/device_pipeline.sh
#                                         # in the next warm call) and of an eager FP32 engine of
#                                         # the same weights, then bench/eval_gpu.sh of both (~6 min)
#   bash bench/device_engine.sh overlap   # `codetr-stream compile` of the batch-8 and batch-16
#                                         # engines at once, then bench/overlap.py: each engine
#                                         # on one stream vs two instances on two streams (~4 min)
#   bash bench/device_engine.sh blocks    # the GPU tests of the window-attention op (and the tiny
#                                         # model on the GPU), then bench/swin_block.py: the Swin
#                                         # block pieces side by side (~6 min)
# Every mode imports the model configs, which need pydantic on the machine: carry [".whl-eval"]
# (or [".whl"]); bench/device_env.sh installs what was carried.
set -uo pipefail
# shellcheck source=bench/device_env.sh
source "$(dirname "$0")/device_env.sh"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  nproc; free -g | head -2
} 2>&1 | tee "$out/env.txt"
lock=/tmp/codetr_gpu.lock
# python3 -c "$locked" LOCKFILE ARGS...: take LOCKFILE's flock, then become `python3 ARGS...`.
locked='import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
os.set_inheritable(fd, True)
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])'
profiles=/tmp/codetr_profiles  # one file per kernel table; $OUT gets them as one (8 files max)
mkdir -p "$profiles"
bench=(python3 bench/engine.py --json "$out/engine.json" --results "$out/RESULTS.md")
quiet=(grep --line-buffered -v Warning)
status=0
# start_gpu_tests FILE...: those files' GPU tests in the background, holding the GPU lock while
# they run (taken here, then pytest is exec'd holding it); the benchmark takes the lock only to
# time, after its builds, so the two share the call without sharing a timing.
# finish_gpu_tests BENCH_STATUS: wait for them, show their summary, combine the two statuses.
start_gpu_tests() {
  tests_pid=
  (($#)) || return 0
  timeout 560 python3 -c "$locked" "$lock" -m pytest -p no:cacheprovider -m gpu -q -rA "$@" \
    >"$out/pytest.log" 2>&1 &
  tests_pid=$!
  sleep 2
}
finish_gpu_tests() {
  local tests=0
  if [[ -n $tests_pid ]]; then
    wait "$tests_pid"
    tests=$?
    tail -n 30 "$out/pytest.log"
  fi
  echo "pytest exit $tests, bench exit $1"
  status=$((tests || $1))
}
case "${1:-sizes}" in
  sizes)
    start_gpu_tests tests/test_engines_inductor.py
    timeout 560 "${bench[@]}" --sizes 608x608,1152x768,1920x1280 --batches 1,8 --iters 20 \
      --eager-warmup 2 --eager-iters 10 --deadline 420 --gpu-lock "$lock" \
      --title "Input sizes" 2>&1 | "${quiet[@]}" | tee "$out/bench.log"
    finish_gpu_tests "${PIPESTATUS[0]}"
    ;;
  variants)
    timeout 570 "${bench[@]}" --sizes 1152x768 --batches 1,8 --iters 20 --eager-iters 10 \
      --variants baseline,fold-masks,linear-relu,fold-masks+linear-relu --deadline 400 \
      --warm-start baseline,fold-masks+linear-relu --profile "$profiles" \
      --title "Engine passes" 2>&1 | "${quiet[@]}" | tee "$out/bench.log"
    status=${PIPESTATUS[0]}
    ;;
  tuning)
    both=fold-masks+linear-relu
    timeout 570 "${bench[@]}" --sizes 1152x768 --batches 1 --iters 20 --eager fp32 \
      --variants "$both,$both+tune-pointwise,$both+autotune-gemm" --deadline 480 \
      --profile "$profiles" --title "Inductor tuning" 2>&1 | "${quiet[@]}" | tee "$out/bench.log"
    status=${PIPESTATUS[0]}
    ;;
  main)
    timeout 560 "${bench[@]}" --sizes 1152x768 --batches 1,8 --iters 20 --profile "$profiles" \
      --warm-start baseline 2>&1 | "${quiet[@]}" | tee "$out/bench.log"
    status=${PIPESTATUS[0]}
    ;;
  passes)
    # shellcheck disable=SC2086  # GPU_TESTS: test files, split on spaces
    start_gpu_tests ${GPU_TESTS-tests/test_reductions.py tests/test_msda_offsets.py \
      tests/test_engines_inductor.py}
    default=${DEFAULT_PASSES:-$(python3 -c "from codetr_stream.compile.build_commands import \
DEFAULT_PASSES; print('+'.join(DEFAULT_PASSES))")}
    variants=$default
    candidates=${CANDIDATES:-}  # none: the default engine alone (against .baseline, if carried)
    for candidate in ${candidates//,/ }; do variants+=",$default+$candidate"; done
    baseline=()
    if [[ -d .baseline/codetr_stream ]]; then
      baseline=(--baseline-code .baseline --baseline-variant "$default"
        --baseline-label "$(cat .baseline/REVISION 2>/dev/null || echo baseline) $default")
    fi
    timeout 590 "${bench[@]}" --sizes 1152x768 --batches 1,8 --iters 20 --eager fp32 \
      --eager-warmup 1 --eager-iters 3 --variants "$variants" "${baseline[@]}" --probe \
      --profile "$profiles" --deadline 480 --gpu-lock "$lock" \
      --title "Candidate engine passes, batch 1 and 8" 2>&1 | "${quiet[@]}" | tee "$out/bench.log"
    finish_gpu_tests "${PIPESTATUS[0]}"
    ;;
  release)
    engine=/tmp/codetr_release_engine
    log="$out/release.log"
    started=$(date +%s)
    timeout 400 python3 -m codetr_stream.daemon.cli compile --random-weights --seed 0 \
      --backend inductor --precision fp16 --size 1152x768 --batch 1,8 --out "$engine" 2>&1 \
      | grep -v Warning | tail -n 5 | tee "$log"
    echo "cold build (codetr-stream compile --batch 1,8): $(($(date +%s) - started)) s" \
      | tee -a "$log"
    timeout 200 python3 -c "import sys; sys.path.insert(0, 'bench'); import engine; \
      from pathlib import Path; print(engine.warm_start(Path('$engine')))" 2>&1 \
      | tail -n 2 | tee -a "$log"
    timeout 240 "${bench[@]}" --engine "1152x768=$engine" --sizes 1152x768 --batches 1,8 \
      --iters 20 --eager fp32 --eager-warmup 1 --eager-iters 1 --profile "$profiles" \
      --title "The engine as built by codetr-stream compile" 2>&1 | "${quiet[@]}" \
      | tail -n 40 | tee -a "$log"
    bench_status=${PIPESTATUS[0]}
    # The generated code of the Triton kernels the batch-8 profile names (bench/kernel_source.py).
    mapfile -t kernels < <(grep -ho "triton_[a-z]*_fused_[A-Za-z0-9_]*" "$profiles"/*_b8_*.txt \
      | sort -u)
    python3 bench/kernel_source.py "$engine" --batch 8 "${kernels[@]}" >"$out/kernels_b8.txt" 2>&1
    # Last, so that a call cut short by its time limit has the numbers above.
    timeout 150 python3 -m pytest -p no:cacheprovider -m gpu -q -rA tests/test_engines_inductor.py \
      -k "compiled_graphs and passes and not msda" 2>&1 | tail -n 8 | tee -a "$log"
    status=$((PIPESTATUS[0] || bench_status))
    ;;
  eval)
    engine=/tmp/codetr_release_engine
    eager=/tmp/codetr_release_eager
    log="$out/eval_build.log"
    started=$(date +%s)
    timeout 300 python3 -m codetr_stream.daemon.cli compile --random-weights --seed 0 \
      --backend inductor --precision fp16 --size 1152x768 --batch 8 --out "$engine" 2>&1 \
      | grep -v Warning | tail -n 3 | tee "$log"
    echo "cold build (codetr-stream compile --batch 8): $(($(date +%s) - started)) s" | tee -a "$log"
    timeout 120 python3 -m codetr_stream.daemon.cli compile --random-weights --seed 0 \
      --backend eager --precision fp32 --size 1152x768 --batch 8 --out "$eager" 2>&1 \
      | grep -v Warning | tail -n 2 | tee -a "$log"
    EVAL_IMAGES=${EVAL_IMAGES:-100} timeout 260 bash bench/eval_gpu.sh "$eager" "$engine"
    status=$?
    ;;
  overlap)
    compile=(python3 -m codetr_stream.daemon.cli compile --random-weights --seed 0
      --backend inductor --precision fp16 --size 1152x768)
    "${compile[@]}" --batch 8 --out /tmp/codetr_overlap_b8 >"$out/build_b8.log" 2>&1 &
    "${compile[@]}" --batch 16 --out /tmp/codetr_overlap_b16 >"$out/build_b16.log" 2>&1
    wait
    grep -hv Warning "$out"/build_b*.log | grep -e "times:" -e "vs fp32"
    timeout 200 python3 bench/overlap.py --engines /tmp/codetr_overlap_b8,/tmp/codetr_overlap_b16 \
      --iters 20 --repeats 3 --out "$out/overlap.md" 2>&1 | "${quiet[@]}" | tail -n 12
    status=${PIPESTATUS[0]}
    ;;
  blocks)
    # The GPU tests in three processes at once: the float64 formula they check the kernel
    # against runs on the CPU (~2 min for the stage-1 shapes alone).
    t=tests/test_window_attention.py
    tiny="tests/test_msda_gpu.py::test_tiny_model_same_outputs_with_kernel_as_with_reference"
    pids=()
    for i in 0 1 2; do
      case $i in
        0) selection=(-k "swin_l_shapes and dtype0" "$t") ;;
        1) selection=(-k "swin_l_shapes and dtype1" "$t") ;;
        2) selection=(-k "not swin_l_shapes" "$t" "$tiny") ;;
      esac
      timeout 240 python3 -m pytest -p no:cacheprovider -m gpu -q -rA "${selection[@]}" \
        >"$out/pytest$i.log" 2>&1 &
      pids+=($!)
    done
    tests=0
    for i in 0 1 2; do
      wait "${pids[$i]}" || tests=1
      tail -n 8 "$out/pytest$i.log"
    done
    timeout 300 python3 bench/swin_block.py --batches 1,8 --json "$out/swin_block.json" \
      --results "$out/RESULTS.md" 2>&1 | "${quiet[@]}" | tee "$out/swin_block.log"
    status=$((tests || PIPESTATUS[0]))
    ;;
  *)
    echo "usage: bash bench/device_engine.sh sizes|variants|tuning|main|passes|release|eval|overlap|blocks" \
      >&2
    exit 2
    ;;
esac
if compgen -G "$profiles/*.txt" >/dev/null; then tail -n +1 "$profiles"/*.txt >"$out/profiles.txt"; fi
exit "$status"
