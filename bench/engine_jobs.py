"""Inductor engines for bench/engine.py: built in parallel worker processes, timed one at a time.

A cold Inductor build of the full model takes 80-100 s per (size, batch), most of it
single-threaded Python (tracing, lowering, scheduling), so one process per engine builds them
side by side on the GPU machine's 16 cores. Timing must not share the machine: every worker
waits after its build until the parent lets it run its numerics and timing alone, then exits.
Pointwise-kernel autotuning during the builds does share the GPU, so its picks can be noisier
than a lone build's.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import io
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

# Named engine variants: '+'-joined graph passes (compile/engines/passes.py) and Inductor option
# presets; "baseline" is neither.
MEASURE_S = 180  # the most one engine's numerics + timing + profile may take

OPTION_PRESETS: dict[str, dict[str, Any]] = {
    # GEMMs autotuned against Inductor's Triton templates, whose epilogues can take the following
    # pointwise ops (ReLU, GELU, bias, residual); costs minutes of compile per engine.
    "autotune-gemm": {"max_autotune_gemm": True, "max_autotune_gemm_backends": "ATEN,TRITON"},
    # Block sizes of the Triton pointwise/reduction kernels (LayerNorm, GELU, residuals) tuned
    # by coordinate descent instead of taken from heuristics.
    "tune-pointwise": {"coordinate_descent_tuning": True},
    # Reductions that Inductor would loop over (a LayerNorm whose inputs it does not read
    # row-contiguously) also compiled persistent; the faster of the two is picked by timing both
    # at the first call.
    "multi-kernel": {"triton.multi_kernel": 1},
    # Convolutions in channels-last layout. Inductor decides this per graph and skips it when
    # convolutions are a few of many nodes (6 of Co-DINO's thousands): then the neck's convs
    # read Swin's channels-last outputs through an NCHW copy, cuDNN picks a CUDA-core kernel for
    # the 3x3 stride-2 one, and the encoder's flatten to tokens copies every level back.
    "layout-opt": {"force_layout_optimization": True},
}


def parse_variant(name: str) -> tuple[list[str], dict[str, Any]]:
    """"fold-masks+linear-relu" -> (passes, Inductor options); "baseline" -> ([], {})."""
    from codetr_stream.compile.engines.passes import PASSES

    passes: list[str] = []
    options: dict[str, Any] = {}
    for part in filter(None, name.split("+")):
        if part in PASSES:
            passes.append(part)
        elif part in OPTION_PRESETS:
            options.update(OPTION_PRESETS[part])
        elif part != "baseline":
            raise ValueError(f"unknown variant part {part!r}: use baseline, "
                             f"{', '.join(PASSES)} or {', '.join(OPTION_PRESETS)}, joined by +")
    return passes, options


@dataclass(frozen=True)
class Job:
    """One engine: a (size, batch, variant), built in `engine_dir` (or loaded if prebuilt)."""

    size: str
    hw: tuple[int, int]
    batch: int
    variant: str
    engine_dir: str
    config: str
    seed: int
    warmup: int
    iters: int
    prebuilt: bool = False
    profile_dir: str | None = None
    device: str = "cuda"
    precision: str = "fp16"
    probe: bool = False  # build bench/probe.FeatureProbe(model): features out, not timed
    code: str | None = None  # another checkout's codetr_stream namespace folder to build with
    label: str = ""  # the row's name ("" = "inductor {precision} {variant}")

    @property
    def name(self) -> str:
        name = self.label or f"inductor {self.precision} {self.variant}"
        return f"{name} (probe)" if self.probe else name

    @property
    def key(self) -> str:
        return f"{self.size} b{self.batch} {self.name}"


@dataclass
class Outcome:
    """What a worker reports: build facts, then outputs and timing, or the error that stopped it."""

    job: Job
    info: dict[str, Any] = field(default_factory=dict)
    outputs: tuple[torch.Tensor, ...] | None = None
    ms: float | None = None
    error: str | None = None


def median_ms(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    """Median GPU time of fn() over `iters` runs, each bracketed by CUDA events (wall time on a
    machine without CUDA: the CPU smoke run of this script)."""
    for _ in range(warmup):
        fn()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if not cuda:
            start_s = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - start_s))
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_gib(device: torch.device) -> float | None:
    """GPU memory peak since the last reset (None on the CPU)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def config_dict(config: str) -> dict[str, Any]:
    """A built-in config name or a JSON file, as the dict the engine manifest records. The
    built-ins moved in the redesign; a `--baseline-code` release from before it has them in
    `compile.configs`."""
    import json

    try:
        from codetr_stream.compile.model_config import BUILTIN
    except ImportError:
        from codetr_stream.compile.configs import BUILTIN

    return BUILTIN[config]() if config in BUILTIN else json.loads(Path(config).read_text())


# Kernel classes by name, first match wins (cuBLAS/cuBLASLt GEMMs are "nvjet"/"gemm"/"xmma";
# Inductor names its Triton kernels after the aten ops they fuse).
KERNEL_CLASSES = (
    ("MSDA", ("msda",)),
    ("attention", ("window_attention", "fmha", "flash", "attention", "sdpa")),
    ("norm", ("layer_norm", "group_norm", "native_batch_norm")),
    ("pointwise/copy", ("triton_poi", "elementwise", "copy", "memcpy", "memset", "fill",
                        "cat_", "index", "roll")),
    ("GEMM", ("nvjet", "gemm", "xmma", "cutlass", "s16816", "sm90_", "relubias", "gelu",
              "addmm", "_mm_", "bmm", "conv", "fprop")),
)


def kernel_class(name: str) -> str:
    lowered = name.lower()
    for cls, needles in KERNEL_CLASSES:
        if any(n in lowered for n in needles):
            return cls
    return "other"


def top_kernels(fn: Callable[[], Any], steps: int = 3, limit: int = 25) -> str:
    """torch.profiler: GPU time per kernel class (`KERNEL_CLASSES`), then the kernels that take
    the most time, with their share."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()

    def own(e: Any) -> float:
        return getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))

    events = [e for e in prof.key_averages() if own(e) > 0]
    total = sum(own(e) for e in events) or 1.0
    events.sort(key=own, reverse=True)
    lines = [f"GPU busy {total / 1000 / steps:.2f} ms per run over {len(events)} kernel kinds",
             "| class | ms per run | share | kernels per run |", "| --- | ---: | ---: | ---: |"]
    classes: dict[str, list[float]] = {}
    for e in events:
        cls = classes.setdefault(kernel_class(e.key), [0.0, 0])
        cls[0] += own(e)
        cls[1] += e.count
    for cls, (time_us, count) in sorted(classes.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {cls} | {time_us / 1000 / steps:.3f} | {100 * time_us / total:.1f}% | "
                     f"{count // steps} |")
    for e in events[:limit]:
        lines.append(f"{100 * own(e) / total:5.1f}%  {own(e) / 1000 / steps:8.3f} ms  "
                     f"x{e.count // steps:<4} {e.key[:110]}")
    return "\n".join(lines)


def weights_checksum(model: torch.nn.Module) -> float:
    """Sum of all parameters: the workers' seeded weights must be the parent's."""
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


def _build(job: Job, device: torch.device) -> tuple[Any, dict[str, Any]]:
    from codetr_stream.compile import build_model
    from codetr_stream.compile.engines import build_engine, load_engine

    started = time.perf_counter()
    if job.prebuilt:
        engine = load_engine(job.engine_dir, device)
        return engine, {"load_s": round(time.perf_counter() - started, 1)}
    torch.manual_seed(job.seed)
    model = build_model(job.config, device=device).eval()
    info: dict[str, Any] = {"checksum": weights_checksum(model)}
    if job.probe:
        from probe import FeatureProbe, pass_every_output

        if job.code:
            pass_every_output()
        model = FeatureProbe(model)
    passes, options = parse_variant(job.variant)
    engine, manifest = build_engine(
        model, job.engine_dir, backend="inductor", precision=job.precision, input_hw=job.hw,
        batch_sizes=[job.batch], config_name=job.config, config=config_dict(job.config),
        device=device, seed=job.seed, passes=passes, inductor_options=options)
    del model  # what stays is the engine's own: FP16 weights, folded masks, CUDA graph pool
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    info.update(build_s=round(time.perf_counter() - started, 1),
                compile_s=manifest.measured["compile_seconds"][str(job.batch)],
                pass_sites=manifest.measured.get("pass_sites", {}))
    return engine, info


def _worker(job: Job, conn: Connection) -> None:
    """Child process: build, report, wait for the go, check + time + profile, report, exit.
    A probe job reports its feature outputs instead of a timing."""
    if job.code:  # before the first codetr_stream import (spawn copies the parent's sys.path)
        sys.path.insert(0, job.code)
    from codetr_stream.compile.export import example_inputs

    device = torch.device(job.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        engine, info = _build(job, device)
    except Exception as exc:
        traceback.print_exc()
        conn.send(("error", _first_line(exc)))
        return
    print(f"[{job.key}] built: {info}", flush=True)
    conn.send(("built", info))
    conn.recv()
    try:
        images, masks = example_inputs(job.batch, job.hw, device, seed=1)
        if job.probe:
            outputs = tuple(t.cpu() for t in engine._graphs[job.batch](images, masks))
            conn.send(("done", {"ms": None, "gib": peak_gib(device)}, _to_bytes(outputs)))
            return
        outputs = tuple(t.cpu() for t in engine.infer(images, masks))
        reset_peak(device)
        ms = median_ms(lambda: engine.infer(images, masks), job.warmup, job.iters)
        result = {"ms": ms, "gib": peak_gib(device)}
        if job.profile_dir and device.type == "cuda" and job.batch in engine._graphs:
            _profile(job, lambda: engine._graphs[job.batch].fn(images, masks))
        conn.send(("done", result, _to_bytes(outputs)))
    except Exception as exc:
        traceback.print_exc()
        conn.send(("error", _first_line(exc)))


def _profile(job: Job, fn: Callable[[], Any]) -> None:
    """The engine's top kernels without its CUDA graph, into the profile folder; a failure here
    costs the table nothing."""
    try:
        with torch.inference_mode():
            text = top_kernels(fn)
    except Exception as exc:
        text = f"profile failed: {_first_line(exc)}"
    tag = (job.label or job.variant).replace("+", "-").replace(" ", "_")
    name = f"profile_{job.size}_b{job.batch}_{tag}.txt"
    (Path(job.profile_dir or ".") / name).write_text(text + "\n")
    print(f"--- profile {job.key}\n{text}", flush=True)


def _to_bytes(tensors: tuple[torch.Tensor, ...]) -> bytes:
    """Tensors as plain bytes: torch's pickling would share memory with a process that exits."""
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


def _receive(proc: Any, conn: Connection, deadline: float) -> tuple[Any, ...]:
    """The worker's next message, or ("error", why) if it died or ran past `deadline`."""
    while not conn.poll(1.0):
        if not proc.is_alive() and not conn.poll(0.1):
            return ("error", f"worker exited with code {proc.exitcode}")
        if time.monotonic() > deadline:
            proc.terminate()
            return ("error", "timed out")
    try:
        return conn.recv()
    except EOFError:
        return ("error", f"worker exited with code {proc.exitcode}")


@contextlib.contextmanager
def gpu_lock(path: str | None, deadline: float = math.inf) -> Iterator[None]:
    """Hold an exclusive flock on `path` (other GPU jobs of the same call hold it while they run)
    so that nothing else uses the GPU while we time. Past `deadline` (time.monotonic) it goes on
    without the lock rather than time nothing; no-op without a path."""
    if not path:
        yield
        return
    with open(path, "a") as handle:
        started, held = time.monotonic(), False
        while not held and time.monotonic() < deadline:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
            except BlockingIOError:
                time.sleep(1)
        waited = time.monotonic() - started
        if not held:
            print(f"WARNING: timing without the GPU lock {path} (still held after "
                  f"{waited:.0f} s)", flush=True)
        elif waited > 1:
            print(f"waited {waited:.0f} s for the GPU lock {path}", flush=True)
        try:
            yield
        finally:
            if held:
                fcntl.flock(handle, fcntl.LOCK_UN)


def run_jobs(jobs: list[Job], *, parallel: int, deadline: float,
             lock: str | None = None) -> list[Outcome]:
    """Build `parallel` engines at a time in worker processes, then time them one by one.
    Builds still running at `deadline` (time.monotonic) are stopped and reported."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    cores = os.cpu_count() or 1
    outcomes: list[Outcome] = []
    for first in range(0, len(jobs), max(1, parallel)):
        wave = jobs[first:first + max(1, parallel)]
        # Each worker's Inductor compiles with its share of the cores, not all of them.
        os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = str(max(2, math.ceil(cores / len(wave))))
        started = []
        for job in wave:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(job, child), name=job.key)
            proc.start()
            started.append((Outcome(job), proc, parent))
        for outcome, proc, conn in started:
            message = _receive(proc, conn, deadline)
            if message[0] == "built":
                outcome.info = message[1]
            else:
                outcome.error = message[1]
        with gpu_lock(lock, deadline):
            for outcome, proc, conn in started:
                if outcome.error is None:
                    conn.send("go")  # its numerics, timing and profile: minutes at most
                    message = _receive(proc, conn, time.monotonic() + MEASURE_S)
                    if message[0] == "done":
                        outcome.info.update(message[1])
                        outcome.ms = message[1]["ms"]
                        outcome.outputs = torch.load(io.BytesIO(message[2]), weights_only=True)
                        timing = "probed" if outcome.ms is None else f"{outcome.ms:.2f} ms median"
                        print(f"[{outcome.job.key}] {timing}, {message[1]['gib']} GiB",
                              flush=True)
                    else:
                        outcome.error = message[1]
                        print(f"[{outcome.job.key}] failed: {outcome.error}", flush=True)
                proc.join(timeout=60)
                if proc.is_alive():
                    proc.terminate()
                outcomes.append(outcome)
    return outcomes
