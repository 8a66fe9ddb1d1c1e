"""Pipeline bench: N simulated cameras from a real RTSP server through the whole daemon.

Reports per-stream fps, capture-to-publish latency p50/p99, the time each frame spends outside
the engine (decode and the wait for a batch excluded) two ways: as latency (the whole batch's
preprocessing, the batch's postprocessing on the device with its read-back, and the frame's own
postprocessing on the host) and as cost (the batch's preprocessing shared by its frames), GPU
utilisation, and the ratio of the daemon's throughput to the engine's standalone throughput at
its largest batch (measured first, in the same process, CUDA events on a GPU).

Numerics come first: the first published frame of a camera is run through the engine directly
and its detections must match the daemon's. `--switch-intervals` runs the daemon once per value
of the interpreter's GIL switch interval (side by side, same engine and cameras).

    # GPU machine (no GStreamer there: daemon/demo/rtsp_replay.py serves the cameras)
    python bench/pipeline_throughput.py --build-full fp16 --backend inductor --batch-sizes 8 \
        --cameras 16 --fps 5 --seconds 15 --switch-intervals 0.005,0.001
    # CPU, tiny engine
    python bench/pipeline_throughput.py --engine ENGINE --cameras 2 --size 320x240 --seconds 20
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from codetr_stream.compile.engines.base import Engine

def start_cameras(size: str, fps: int, seconds: float = 10.0) -> tuple[subprocess.Popen, int]:
    """The replay RTSP server (every path is a camera, each looping the same `seconds` clip);
    returns the process and its port."""
    from codetr_stream.daemon.demo import rtsp_replay

    try:
        return rtsp_replay.start(size, fps, seconds)
    except RuntimeError as exc:
        sys.exit(f"bench: {exc}")


def build_full_engine(out: Path, backend: str, precision: str, batch_sizes: list[int]):
    """Full-size Co-DINO Swin-L at 1152x768 with seeded random weights, an Inductor engine
    with `codetr-stream compile`'s default passes; returns the engine."""
    from codetr_stream.compile.build import build_model_engine
    from codetr_stream.compile.build_commands import DEFAULT_PASSES
    from codetr_stream.compile.coco_classes import COCO_CLASSES

    started = time.perf_counter()
    options = {"passes": list(DEFAULT_PASSES)} if backend == "inductor" else {}
    engine, _ = build_model_engine("co_dino_swin_l", out, backend=backend, precision=precision,
                                   input_hw=(768, 1152), batch_sizes=batch_sizes, seed=0,
                                   class_names=COCO_CLASSES, device="cuda", **options)
    print(f"engine {backend} {precision} {batch_sizes} built in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return engine


def write_cameras_config(path: Path, engine_dir: Path, names: list[str], port: int,
                         args: argparse.Namespace, endpoint: str = "tcp://127.0.0.1:0") -> Path:
    """streams.yaml for the bench: every camera of the replay server on `port`, the engine on
    the GPU (its first, `gpus: [0]`) when there is one, `args.max_batch` / `args.max_wait_ms`."""
    path.write_text(
        f"engine: {{path: {engine_dir}, device: auto}}\n"
        f"batching: {{max_batch: {args.max_batch}, max_wait_ms: {args.max_wait_ms}}}\n"
        f'publish: {{endpoint: "{endpoint}"}}\nhealth: {{port: 0}}\n'
        "snapshot: {enabled: false}\nstreams:\n"
        + "".join(f'  - {{name: {n}, url: "rtsp://127.0.0.1:{port}/{n}", min_score: 0.3}}\n'
                  for n in names))
    return path


def engine_throughput(engine, batch: int, iters: int) -> float:
    """Frames per second of `engine.infer` alone at `batch` (after warm-up)."""
    h, w = engine.manifest.input_hw
    images = torch.zeros((batch, 3, h, w), device=engine.device)
    masks = torch.zeros((batch, h, w), dtype=torch.bool, device=engine.device)
    for _ in range(3):
        engine.infer(images, masks)
    if engine.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            engine.infer(images, masks)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            engine.infer(images, masks)
        seconds = time.perf_counter() - t0
    return batch * iters / seconds


def wall_ms(fn, iters: int) -> float:
    """Median wall time of `fn()` (host launches included), the GPU synchronised around each."""
    times = []
    for _ in range(iters + 3):  # the first calls compile and allocate
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times[3:]))


def stage_comparison(engine, batch: int, size: str, iters: int = 30) -> dict[str, str]:
    """One batch of camera-sized NV12 frames through the daemon's preprocessing and
    postprocessing, the fused kernels side by side with the torch ops they replaced (torch-op
    preprocessing; raw read-back and `postprocess` per frame on the host). Numerics first; then
    wall time per batch on an idle host (the daemon runs below add the camera threads)."""
    from codetr_stream.compile.model_inputs import STD_RGB
    from codetr_stream.daemon.config.schema import StreamConfig
    from codetr_stream.daemon.pipeline.frames import Frame
    from codetr_stream.daemon.pipeline.postprocess import (
        FrameFilter,
        finish,
        postprocess,
        select_batch,
        unpack,
    )
    from codetr_stream.daemon.pipeline.preprocess import Preprocessor

    device, hw = engine.device, tuple(engine.manifest.input_hw)
    names = list(engine.manifest.class_names)
    width, height = (int(v) for v in size.split("x"))
    gen = torch.Generator(device).manual_seed(0)
    frames = [Frame(f"cam{i}", 0, None, 0, torch.randint(
        0, 256, (height * 3 // 2, width), dtype=torch.uint8, device=device, generator=gen),
        "nv12", height, width) for i in range(batch)]
    buffers, preprocess = {}, {}
    for fused in (True, False):
        buffers[fused] = (torch.zeros((batch, 3, *hw), device=device),
                          torch.zeros((batch, *hw), dtype=torch.bool, device=device))
        preprocess[fused] = Preprocessor(hw, device, fused=fused)
        scales = preprocess[fused](frames, *buffers[fused])
    std = torch.tensor(STD_RGB, device=device)[:, None, None]
    grey = ((buffers[True][0] - buffers[False][0]) * std).abs().round()
    pre_ms = {fused: wall_ms(lambda f=fused: preprocess[f](frames, *buffers[f]), iters)
              for fused in (True, False)}

    boxes, scores, labels = engine.infer(*buffers[True])
    stream_cfg = StreamConfig(name="cam0", url="rtsp://127.0.0.1/cam0", min_score=0.3)
    keeps = [FrameFilter.of(stream_cfg, tuple(names))] * batch
    frame_size = (width, height)

    def post_fused() -> list:
        packed = select_batch(boxes, scores, labels, keeps, scales=scales,
                              frame_sizes=[frame_size] * batch, num_classes=len(names))
        return [finish(rows, frame_size=frame_size, roi=None, class_names=names)
                for rows in unpack(packed.cpu().numpy())]

    def post_torch() -> list:
        k = scores.shape[1]
        packed = torch.cat([boxes.float().flatten(1), scores.float(), labels.float()],
                           dim=1).cpu()
        return [postprocess(packed[i, :4 * k].view(k, 4), packed[i, 4 * k:5 * k],
                            packed[i, 5 * k:].long(), scale=scales[i], frame_size=frame_size,
                            stream_cfg=stream_cfg, class_names=names) for i in range(batch)]

    same = post_fused() == post_torch()
    post_ms = {fused: wall_ms(fn, iters) for fused, fn in ((True, post_fused),
                                                            (False, post_torch))}
    what = f"batch of {batch} NV12 {size}"
    return {
        f"preprocess, {what}: fused vs torch ops, grey levels off (max, share)":
            f"{grey.max().item():.0f}, {(grey > 0).float().mean().item():.1e}",
        f"preprocess, {what}, wall ms (idle host): fused / torch ops":
            f"{pre_ms[True]:.2f} / {pre_ms[False]:.2f}",
        f"postprocess, {what} (min_score 0.3): batched on the device = per frame on the host":
            f"{same} ({sum(len(d) for d in post_fused())} detections)",
        f"postprocess, {what}, wall ms (idle host): device batch + host finish / "
        "read-back + per-frame host": f"{post_ms[True]:.2f} / {post_ms[False]:.2f}",
    }


class GpuSampler(threading.Thread):
    """Utilisation (%) and memory used (MiB) of every GPU, by nvidia-smi index, every 0.5 s
    (empty on machines without nvidia-smi)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.util: dict[int, list[float]] = defaultdict(list)
        self.memory: dict[int, list[float]] = defaultdict(list)
        self.stop = threading.Event()

    def run(self) -> None:
        if shutil.which("nvidia-smi") is None:
            return
        while not self.stop.wait(0.5):
            out = subprocess.run(["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used",
                                  "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, check=False).stdout
            for line in out.splitlines():
                fields = [v.strip() for v in line.split(",")]
                if len(fields) == 3 and all(v.isdigit() for v in fields):
                    self.util[int(fields[0])].append(float(fields[1]))
                    self.memory[int(fields[0])].append(float(fields[2]))


def check_numerics(engine, frame, result, stream_cfg) -> str:
    """Max score difference between the daemon's detections and the engine run directly.

    The daemon ran the frame in a batch of 8 real frames, the check in a padded batch of one:
    in FP16 a score within a rounding step of `min_score` can land on either side, so a
    different count is reported as such, with the difference over the detections both kept.
    """
    from codetr_stream.compile.model_inputs import preprocess
    from codetr_stream.daemon.pipeline.postprocess import postprocess
    from codetr_stream.daemon.pipeline.preprocess import frame_rgb

    image, mask, plan = preprocess(frame_rgb(frame, engine.device), engine.manifest.input_hw,
                                   fit_portrait=True)
    boxes, scores, labels = engine.infer(image[None], mask[None])
    expected = postprocess(boxes[0], scores[0], labels[0], scale=plan.scale_xy,
                           frame_size=(frame.width, frame.height), stream_cfg=stream_cfg,
                           class_names=engine.manifest.class_names)
    got = sorted((d.score for d in result.detections), reverse=True)
    want = sorted((d.score for d in expected), reverse=True)
    diff = max((abs(a - b) for a, b in zip(got, want, strict=False)), default=0.0)
    text = f"{diff:.1e}"
    if len(got) != len(want):
        edge = max(got[len(want):] + want[len(got):])
        text += (f" ({len(got)} vs {len(want)} detections, unmatched up to {edge:.4f}; min_score "
                 f"{stream_cfg.min_score})")
    return text


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def daemon_run(config, names: list[str], args: argparse.Namespace, engine,
               switch_interval: float | None) -> dict[str, str]:
    """One daemon run in this process: warm-up, then the measured window; returns table rows."""
    from codetr_stream.daemon import service

    records: list[tuple[float, str, dict, float]] = []
    first: dict = {}

    def tap(frame, result) -> None:
        lat = result.latencies_ms
        records.append((time.monotonic(), frame.stream, lat,
                        (result.publish_ns - frame.capture_ns) / 1e6))
        first.setdefault("frame", (frame, result))

    stop = threading.Event()
    daemon = threading.Thread(target=service.run, args=(config,),
                              kwargs={"stop_event": stop, "on_result": tap,
                                      "switch_interval_s": switch_interval})
    sampler = GpuSampler()
    started = time.monotonic()
    daemon.start()
    while not first and daemon.is_alive() and time.monotonic() - started < 300:
        time.sleep(0.2)
    if not first:
        stop.set()
        sys.exit("bench: the daemon published nothing")
    print(f"first frame published {time.monotonic() - started:.0f} s after start", flush=True)
    frame, result = first["frame"]
    stream_cfg = next(s for s in config.streams if s.name == frame.stream)
    score_diff = check_numerics(engine, frame, result, stream_cfg)
    print(f"numerics: max score difference daemon vs engine {score_diff}", flush=True)
    time.sleep(args.warmup)
    sampler.start()
    t0 = time.monotonic()
    time.sleep(args.seconds)
    t1 = time.monotonic()
    sampler.stop.set()
    stop.set()
    daemon.join(timeout=30)

    window = [r for r in records if t0 <= r[0] < t1]
    per_stream = defaultdict(int)
    for _, name, _, _ in window:
        per_stream[name] += 1
    fps = [per_stream[n] / (t1 - t0) for n in names]
    e2e = [r[3] for r in window]
    outside = [r[2]["preprocess"] + r[2]["postprocess"] for r in window]
    pre = [r[2]["preprocess"] for r in window]
    # Frames of one batch share its stage times exactly: count them to split the batch's cost.
    # (The batch's device postprocessing, inside each frame's "postprocess", is not split: an
    # upper bound.)
    batch_n = Counter((r[2]["preprocess"], r[2]["infer"]) for r in window)
    share = [r[2]["preprocess"] / batch_n[r[2]["preprocess"], r[2]["infer"]]
             + r[2]["postprocess"] for r in window]
    post = [r[2]["postprocess"] for r in window]
    queue = [r[2]["queue"] for r in window]
    infer = [r[2]["infer"] for r in window]
    return {
        "numerics (max score diff vs engine)": score_diff,
        "daemon throughput": f"{sum(fps):.1f} frames/s",
        "per-stream fps min / mean": f"{min(fps):.2f} / {np.mean(fps):.2f}",
        "capture->publish p50 / p99 ms": f"{percentile(e2e, 50):.1f} / {percentile(e2e, 99):.1f}",
        "outside engine per frame, latency (batch pre + batch device post + own host post) "
        "p50 / p99 ms": f"{percentile(outside, 50):.2f} / {percentile(outside, 99):.2f}",
        "outside engine per frame, cost (batch pre / batch size + post) p50 / p99 ms":
            f"{percentile(share, 50):.2f} / {percentile(share, 99):.2f}",
        "  of which preprocess (per batch, device) p50 / p99 ms":
            f"{percentile(pre, 50):.2f} / {percentile(pre, 99):.2f}",
        "  of which postprocess (batch on the device + own on the host) p50 / p99 ms":
            f"{percentile(post, 50):.2f} / {percentile(post, 99):.2f}",
        "queue wait p50 / p99 ms": f"{percentile(queue, 50):.1f} / {percentile(queue, 99):.1f}",
        "engine per batch p50 ms": f"{percentile(infer, 50):.1f}",
        "full batches / all batches": f"{sum(n == args.max_batch for n in batch_n.values())}"
                                      f" / {len(batch_n)}",
        "GPU utilisation mean": (f"{np.mean(sampler.util[0]):.0f}%" if sampler.util[0]
                                 else "n/a"),
        "_throughput": f"{sum(fps)}",
    }


def add_bench_args(parser: argparse.ArgumentParser, *, cameras: int, fps: int, seconds: float,
                   warmup: float) -> None:
    """The engine (--engine, or --build-full), camera and batching options of the benches that
    run the daemon on replayed cameras (this one and bench/scaleout.py)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--engine", type=Path, help="engine directory")
    source.add_argument("--build-full", choices=("fp16", "fp32"),
                        help="build the full-size engine (seeded random weights) first")
    parser.add_argument("--backend", default="eager", choices=("eager", "inductor"),
                        help="backend of --build-full")
    parser.add_argument("--batch-sizes", default="1,2,4,8", help="batch sizes of --build-full")
    parser.add_argument("--cameras", type=int, default=cameras)
    parser.add_argument("--fps", type=int, default=fps)
    parser.add_argument("--size", default="1280x720", help="camera resolution WxH")
    parser.add_argument("--seconds", type=float, default=seconds, help="measured window")
    parser.add_argument("--warmup", type=float, default=warmup, help="seconds before measuring")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=20.0)


def open_engine(args: argparse.Namespace, tmp: Path, device: torch.device) -> tuple[Path, Engine]:
    """(engine directory, engine on `device`): `--engine` loaded, or the full-size one built."""
    from codetr_stream.compile.engines import load_engine

    if args.engine:
        return args.engine, load_engine(args.engine, device)
    sizes = [int(b) for b in args.batch_sizes.split(",") if int(b) <= args.max_batch]
    return tmp / "engine", build_full_engine(tmp / "engine", args.backend, args.build_full, sizes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bench_args(parser, cameras=16, fps=5, seconds=30.0, warmup=8.0)
    parser.add_argument("--switch-intervals", default="",
                        help="comma-separated GIL switch intervals (s), one daemon run each; "
                             "default: one run with the daemon's own setting")
    parser.add_argument("--out", type=Path, help="write the markdown section here")
    args = parser.parse_args()

    from codetr_stream.daemon import service
    from codetr_stream.daemon.config.load import load_config

    tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    engine_dir, engine = open_engine(args, tmp, device)
    largest = max(b for b in engine.manifest.batch_sizes if b <= args.max_batch)
    standalone = engine_throughput(engine, largest, iters=10 if device.type == "cuda" else 2)
    print(f"engine standalone: {standalone:.1f} frames/s at batch {largest}", flush=True)
    stages = stage_comparison(engine, largest, args.size) if device.type == "cuda" else {}
    for key, value in stages.items():
        print(f"{key}: {value}", flush=True)

    server, port = start_cameras(args.size, args.fps)
    names = [f"cam{i:02d}" for i in range(args.cameras)]
    config_path = tmp / "streams.yaml"
    write_cameras_config(config_path, engine_dir, names, port, args)
    config = load_config(config_path)
    intervals = ([float(v) for v in args.switch_intervals.split(",")] if args.switch_intervals
                 else [service.SWITCH_INTERVAL_S])
    runs = {}
    try:
        for interval in intervals:
            label = ("the daemon's switch interval" if interval is None
                     else f"switch interval {interval * 1e3:g} ms")
            print(f"daemon run, {label}", flush=True)
            runs[label] = daemon_run(config, names, args, engine, interval)
    finally:
        server.kill()

    offered = args.cameras * args.fps
    for rows in runs.values():
        total = float(rows.pop("_throughput"))
        rows["ratio to standalone"] = (f"{total / standalone:.1%} (of min(offered, "
                                       f"standalone): {total / min(offered, standalone):.1%})")
    common = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
        or "cpu",
        "engine": f"{engine.manifest.backend} {engine.manifest.precision} "
                  f"{engine.manifest.input_hw[1]}x{engine.manifest.input_hw[0]} "
                  f"batch {engine.manifest.batch_sizes} ({engine.manifest.config_name}, "
                  f"random weights: {engine.manifest.random_weights})",
        "cameras": f"{args.cameras} x {args.size} @ {args.fps} fps = {offered} frames/s offered",
        "engine standalone": f"{standalone:.1f} frames/s (batch {largest})",
        **stages,
    }
    command = "python bench/pipeline_throughput.py " + " ".join(sys.argv[1:])
    columns = list(runs)
    text = (f"Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Command: `{command}`\n\n"
            + "".join(f"- {k}: {v}\n" for k, v in common.items()) + "\n"
            + f"| measure | {' | '.join(columns)} |\n|---|{'---|' * len(columns)}\n"
            + "".join(f"| {k} | {' | '.join(runs[c][k] for c in columns)} |\n"
                      for k in runs[columns[0]]))
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
