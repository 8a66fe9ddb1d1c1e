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
import json
import platform
import random
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the RTSP test server lives beside the tests

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
                   help="short CPU run: 2 cameras 320x240, 90 s, churn every 10 s")
    p.add_argument("--out", type=Path, help="write every sample and the verdict as JSON")
    p.add_argument("--results", action="store_true", help="append a section to bench/RESULTS.md")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.ci:
        args.cameras, args.size, args.minutes, args.warmup = 2, "320x240", 1.5, 30.0
        args.churn_every, args.down, args.sample_every = 10.0, 2.0, 1.0
        args.max_growth = max(args.max_growth, 0.05)  # a short run on a shared CI core is noisy
    return args


def main() -> int:
    args = parse_args()
    from codetr_stream.daemon.config import load_config
    from codetr_stream.daemon.service import run

    names = [f"cam{i:03d}" for i in range(args.cameras)]
    servers = [RtspServer([f"{name}=h264:{args.size}@{args.fps}"]).start() for name in names]
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    churn = Churn(servers, args.churn_every, args.down, args.seed)
    counter = MessageCounter(endpoint)
    stop = threading.Event()
    failures: list[str] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = load_config(write_config(Path(tmp), args.engine, servers, names,
                                              args.device, endpoint))
            before = sample_process()
            before_threads = {t.ident for t in threading.enumerate()}
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
                    gpu = f"{(s.gpu_reserved_bytes or 0) / MB:8.0f}"
                    print(f"{elapsed:7.0f} {s.rss_bytes / MB:8.1f} {gpu} {s.open_fds:5d} "
                          f"{s.threads:7d} {counter.total():8d} {churn.outages:7d}", flush=True)
                    if not daemon.is_alive():
                        failures.append("the daemon exited during the soak")
                        break
                churn.stop.set()
                churn.join()
                stop.set()
                daemon.join(timeout=30)
            counter.stop.set()
            counter.join()
            result = trend(sampler.samples, args.warmup)
            leftover = [t.name for t in threading.enumerate()
                        if t.ident not in before_threads and t is not threading.current_thread()]
            after = sample_process()
    finally:
        for server in servers:
            server.stop()

    if daemon.is_alive():
        failures.append("the daemon did not stop within 30 s of stop_event")
    failures += judge(result, args.max_growth, leftover, before, after, names, counter.counts)
    verdict = {
        "rss_growth": result.rss_growth, "gpu_growth": result.gpu_growth,
        "fd_delta": result.fd_delta, "thread_delta": result.thread_delta,
        "outages": churn.outages, "messages": counter.counts, "failures": failures,
    }
    print(json.dumps(verdict, indent=1))
    if args.out:
        args.out.write_text(json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "verdict": verdict,
             "samples": [s.as_dict() for s in sampler.samples]}))
    if args.results:
        write_results(args, verdict)
    print("PASS" if not failures else "FAIL:\n  " + "\n  ".join(failures))
    return 1 if failures else 0


def judge(result: Trend, max_growth: float, leftover: list[str], before: ProcessSample,
          after: ProcessSample, names: list[str], counts: dict[str, int]) -> list[str]:
    """Every way the run failed the issue's bar, in words."""
    failures = []
    if result.rss_growth >= max_growth:
        failures.append(f"RSS grew {result.rss_growth:.2%} after warm-up")
    if result.gpu_growth is not None and result.gpu_growth >= max_growth:
        failures.append(f"GPU memory grew {result.gpu_growth:.2%} after warm-up")
    if result.fd_delta > 0 or result.thread_delta > 0:
        failures.append(f"fds +{result.fd_delta}, threads +{result.thread_delta} after warm-up")
    if leftover:
        failures.append(f"threads left after shutdown: {leftover}")
    if after.open_fds > before.open_fds:
        failures.append(f"fds after shutdown {after.open_fds} > before start {before.open_fds}")
    if silent := [n for n in names if counts.get(n, 0) == 0]:
        failures.append(f"no detections published for {silent}")
    return failures


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
