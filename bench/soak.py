"""Soak: N cameras with source churn through the real daemon, watching for anything that creeps.

Each camera is its own RTSP server process (tests/rtsp_server.py, GStreamer); every `--churn-every`
seconds one camera's server is killed and brought back on the same port `--down` seconds later,
so the daemon keeps tearing down and rebuilding demuxers, decoders and sockets. The daemon runs in
this process (`codetr_stream.daemon.service.run(config, stop_event=...)`), so the sampler sees its
RSS, open fds, threads and torch GPU memory (daemon/procstat.py, the same numbers as /metrics);
a ZeroMQ SUB counts the detection messages to prove frames keep flowing.

Verdict, after `--warmup` seconds: RSS and GPU memory growth below `--max-growth`, no fd or thread
growth, and after shutdown the thread and fd counts back where they were before the daemon
started. Exit code 1 on any failure.

    # GPU machine, the issue's soak (>= 20 min):
    python bench/soak.py --engine engines/co_dino_swin_l --cameras 16 --minutes 25 --results
    # CI's short version (CPU path, tiny engine):
    python bench/soak.py --engine ENGINE --ci
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the RTSP test server lives beside the tests

from codetr_stream.daemon.config import DaemonConfig, load_config  # noqa: E402
from codetr_stream.daemon.procstat import (  # noqa: E402
    ProcessSample,
    ProcessSampler,
    Trend,
    sample_process,
    trend,
)
from rtsp_server import RtspServer, free_port  # noqa: E402

MB = 1 << 20


class Churn(threading.Thread):
    """Kills one random camera's server every `every_s` and restarts it `down_s` later."""

    def __init__(self, servers: list[RtspServer], every_s: float, down_s: float, seed: int):
        super().__init__(name="soak-churn", daemon=True)
        self.servers, self.every_s, self.down_s = servers, every_s, down_s
        self.rng = random.Random(seed)
        self.outages = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            server = self.rng.choice(self.servers)
            server.stop()
            self.outages += 1
            self.stop.wait(self.down_s)
            server.start()  # same port and mount: the camera "comes back"


class MessageCounter(threading.Thread):
    """Counts detection messages per stream on the daemon's PUB endpoint."""

    def __init__(self, endpoint: str):
        super().__init__(name="soak-sub", daemon=True)
        self.endpoint = endpoint
        self.counts: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        with zmq.Context() as ctx, ctx.socket(zmq.SUB) as sub:
            sub.setsockopt(zmq.SUBSCRIBE, b"det.")
            sub.setsockopt(zmq.RCVTIMEO, 200)
            sub.connect(self.endpoint)
            while not self.stop.is_set():
                try:
                    topic, _ = sub.recv_multipart()
                except zmq.Again:
                    continue
                stream = topic.decode().removeprefix("det.").rstrip("|")
                self.counts[stream] = self.counts.get(stream, 0) + 1

    def total(self) -> int:
        return sum(self.counts.values())


def write_config(folder: Path, engine: Path, servers: list[RtspServer], names: list[str],
                 device: str, endpoint: str) -> Path:
    streams = "".join(f"  - name: {name}\n    url: {server.url(name)}\n"
                      for name, server in zip(names, servers, strict=True))
    path = folder / "streams.yaml"
    path.write_text(
        f"engine:\n  path: {engine.resolve()}\n  device: {device}\n"
        f"publish:\n  endpoint: {endpoint}\n"
        "health:\n  port: 0\n"
        f"streams:\n{streams}"
    )
    return path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", type=Path, required=True, help="engine directory")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--cameras", type=int, default=16)
    p.add_argument("--size", default="1280x720", help="camera resolution WxH")
    p.add_argument("--fps", type=int, default=5)
    p.add_argument("--minutes", type=float, default=25.0)
    p.add_argument("--warmup", type=float, default=120.0, help="seconds ignored by the verdict")
    p.add_argument("--churn-every", type=float, default=20.0, help="seconds between outages")
    p.add_argument("--down", type=float, default=5.0, help="seconds a camera stays away")
    p.add_argument("--sample-every", type=float, default=5.0)
    p.add_argument("--max-growth", type=float, default=0.01, help="allowed RSS/GPU growth")
    p.add_argument("--ci", action="store_true",
                   help="short CPU run: 2 cameras 320x240, 60 s (20 s warm-up), churn every 8 s")
    p.add_argument("--out", type=Path, help="write every sample and the verdict as JSON")
    p.add_argument("--results", action="store_true", help="append a section to bench/RESULTS.md")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.ci:
        args.cameras, args.size, args.minutes, args.warmup = 2, "320x240", 1.0, 20.0
        args.churn_every, args.down, args.sample_every = 8.0, 2.0, 1.0
        args.max_growth = max(args.max_growth, 0.05)  # a short run on a shared CI core is noisy
    return args


@dataclass(frozen=True)
class Footprint:
    """What the process holds at one moment, to compare before start and after shutdown."""

    sample: ProcessSample
    fd_kinds: Counter[str]  # "pipe", "socket", "anon_inode:[eventfd]", a path
    os_threads: Counter[str]  # by name (comm): Python, ZeroMQ, FFmpeg and OpenMP threads
    python_threads: frozenset[int]

    @classmethod
    def take(cls) -> Footprint:
        kinds: Counter[str] = Counter()
        for fd in Path("/proc/self/fd").iterdir():
            with contextlib.suppress(OSError):  # the fd of iterdir itself is gone by now
                kinds[re.sub(r":\[\d+\]$", "", os.readlink(fd))] += 1
        names = Counter(comm.read_text().strip() for comm in Path("/proc/self/task").glob("*/comm"))
        return cls(sample_process(), kinds, names,
                   frozenset(t.ident for t in threading.enumerate()))


def soak(args: argparse.Namespace, names: list[str], servers: list[RtspServer],
         config: DaemonConfig, endpoint: str) -> tuple[list[ProcessSample], dict, list[str]]:
    """Run the daemon under churn; (samples, messages per stream, failures)."""
    from codetr_stream.daemon.service import run

    # A first start/stop creates what lives once per process (ZeroMQ's global context, torch's
    # thread pools, lazily loaded libraries), so the baseline compares one run with the next.
    run(config, stop_event=_set(threading.Event()))
    before = Footprint.take()
    churn = Churn(servers, args.churn_every, args.down, args.seed)
    counter = MessageCounter(endpoint)
    stop = threading.Event()
    failures = []
    daemon = threading.Thread(target=run, args=(config,), kwargs={"stop_event": stop},
                              name="soak-daemon")
    with ProcessSampler(args.sample_every) as sampler:
        daemon.start()
        counter.start()
        churn.start()
        print(f"{'t (s)':>7} {'RSS MB':>8} {'GPU MB':>8} {'fds':>5} {'threads':>7} "
              f"{'msgs':>8} {'outages':>7}", flush=True)
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < args.minutes * 60:
            time.sleep(min(30.0, args.sample_every * 6))
            s = sampler.samples[-1]
            print(f"{elapsed:7.0f} {s.rss_bytes / MB:8.1f} {(s.gpu_reserved_bytes or 0) / MB:8.0f}"
                  f" {s.open_fds:5d} {s.threads:7d} {counter.total():8d} {churn.outages:7d}",
                  flush=True)
            if not daemon.is_alive():
                failures.append("the daemon exited during the soak")
                break
        churn.stop.set()
        churn.join()
        stop.set()
        daemon.join(timeout=30)
    counter.stop.set()
    counter.join()
    if daemon.is_alive():
        failures.append("the daemon did not stop within 30 s of stop_event")
    failures += judge_shutdown(before, settled(before))
    if silent := [n for n in names if counter.counts.get(n, 0) == 0]:
        failures.append(f"no detections published for {silent}")
    return sampler.samples, {**counter.counts, "outages": churn.outages}, failures


def settled(before: Footprint, timeout_s: float = 10.0) -> Footprint:
    """The footprint once threads and fds that are still exiting are gone (or at the timeout):
    native threads (FFmpeg, OpenMP) may end a moment after the daemon returned."""
    deadline = time.monotonic() + timeout_s
    while True:
        after = Footprint.take()
        clean = not (after.os_threads - before.os_threads or after.fd_kinds - before.fd_kinds)
        if clean or time.monotonic() > deadline:
            return after
        time.sleep(0.2)


def _set(event: threading.Event) -> threading.Event:
    event.set()
    return event


def judge_trend(result: Trend, max_growth: float) -> list[str]:
    """Growth while running, after warm-up, in words."""
    failures = []
    if result.rss_growth >= max_growth:
        failures.append(f"RSS grew {result.rss_growth:.2%} after warm-up")
    if result.gpu_growth is not None and result.gpu_growth >= max_growth:
        failures.append(f"GPU memory grew {result.gpu_growth:.2%} after warm-up")
    if result.fd_delta > 0 or result.thread_delta > 0:
        failures.append(f"fds +{result.fd_delta}, threads +{result.thread_delta} after warm-up")
    return failures


def judge_shutdown(before: Footprint, after: Footprint) -> list[str]:
    """What the stopped daemon left behind, in words."""
    failures = []
    left = [t.name for t in threading.enumerate() if t.ident not in before.python_threads]
    if left:
        failures.append(f"threads left after shutdown: {left}")
    if extra := after.os_threads - before.os_threads:
        failures.append(f"OS threads left after shutdown: {dict(extra)}")
    if extra := after.fd_kinds - before.fd_kinds:
        failures.append(f"fds left after shutdown: {dict(extra)}")
    return failures


def main() -> int:
    args = parse_args()
    names = [f"cam{i:03d}" for i in range(args.cameras)]
    servers = [RtspServer([f"{name}=h264:{args.size}@{args.fps}"]).start() for name in names]
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = load_config(write_config(Path(tmp), args.engine, servers, names,
                                              args.device, endpoint))
            samples, counts, failures = soak(args, names, servers, config, endpoint)
    finally:
        for server in servers:
            server.stop()
    result = trend(samples, args.warmup)
    failures = judge_trend(result, args.max_growth) + failures
    verdict = {
        "rss_growth": result.rss_growth, "gpu_growth": result.gpu_growth,
        "fd_delta": result.fd_delta, "thread_delta": result.thread_delta,
        "outages": counts.pop("outages"), "messages": counts, "failures": failures,
    }
    print(json.dumps(verdict, indent=1))
    if args.out:
        args.out.write_text(json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "verdict": verdict,
             "samples": [s.as_dict() for s in samples]}))
    if args.results:
        write_results(args, verdict)
    print("PASS" if not failures else "FAIL:\n  " + "\n  ".join(failures))
    return 1 if failures else 0


def write_results(args: argparse.Namespace, verdict: dict) -> None:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    gpu = "n/a" if verdict["gpu_growth"] is None else f"{verdict['gpu_growth']:+.2%}"
    with (ROOT / "bench" / "RESULTS.md").open("a") as f:
        f.write(
            f"\n## Soak ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {device})\n\n"
            f"`python bench/soak.py {' '.join(sys.argv[1:])}`\n\n"
            "| cameras | minutes | outages | messages | RSS growth | GPU growth | fds | threads |"
            " verdict |\n|---|---|---|---|---|---|---|---|---|\n"
            f"| {args.cameras} | {args.minutes:g} | {verdict['outages']} | "
            f"{sum(verdict['messages'].values())} | {verdict['rss_growth']:+.2%} | {gpu} | "
            f"{verdict['fd_delta']:+d} | {verdict['thread_delta']:+d} | "
            f"{'PASS' if not verdict['failures'] else 'FAIL'} |\n"
        )


if __name__ == "__main__":
    sys.exit(main())
