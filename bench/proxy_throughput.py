"""How much the proxy costs per detection message, how fast it can go, and what its hop adds.

Real processes on loopback: worker processes publish real FrameResult JSON (0, 10 and 100
detections) on PUB sockets they bind, as the daemon does; `codetr-stream proxy` connects to them;
one SUB receives and checks. Side by side in one run, each at a fixed offered rate:

- direct: one worker straight to the subscriber (no proxy: the floor).
- proxy xN: N workers through the proxy, capture off (`--stats-interval 0`).
- proxy xN +stats: the same with the rate counter on (the proxy's default).

Per row: delivered msgs/s and losses, the end-to-end latency p50/p99 (publish stamp to receipt),
and the proxy process's CPU time per message (from /proc), whose inverse is the rate one core of
proxy can forward: the capacity figure, which the shared small machine's noise does not distort
the way the Python endpoints' throughput is distorted. CPU only: no GPU is involved.

    .venv/bin/python bench/proxy_throughput.py --seconds 4 --workers 1 2 --rates 5000 20000
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import zmq
from codetr_stream.compile.coco_classes import COCO_CLASSES
from codetr_stream.daemon.feed.messages import Detection, FrameResult
from codetr_stream.daemon.feed.publish import detection_topic, status_topic
from tqdm import tqdm

STAMP = 1_000_000_000_000_000_000  # 19 digits, the width of time.time_ns() until 2286


def payload(n_detections: int) -> bytes:
    """A FrameResult as the daemon publishes it, with a fixed-width publish stamp to patch."""
    rng = np.random.default_rng(n_detections)
    dets = [Detection(int(c), COCO_CLASSES[c], float(s), tuple(float(v) for v in box))
            for c, s, box in zip(rng.integers(0, 80, n_detections), rng.random(n_detections),
                                 rng.random((n_detections, 4)) * 1920, strict=True)]
    result = FrameResult("cam000", 123456, 4115.96, time.time_ns(), 1920, 1080, dets,
                         {"decode": 3.1, "preprocess": 0.8, "engine": 41.2, "postprocess": 0.6})
    result.publish_ns = STAMP
    return result.to_json()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(port: int, index: int, body: bytes, rate: float, seconds: float, go, sent) -> None:
    """Publish [det.camNNN|, body] at `rate` msgs/s for `seconds`, in 1 ms bursts."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 10_000)
    pub.bind(f"tcp://127.0.0.1:{port}")
    hello = status_topic(f"hello{index}")
    while not go.is_set():  # until the subscriber heard every worker through the proxy
        pub.send_multipart([hello, b"{}"])
        time.sleep(0.01)
    offset = body.index(str(STAMP).encode())
    topics = [detection_topic(f"w{index}cam{i:03d}") for i in range(64)]
    count = 0
    start = time.perf_counter()
    while (now := time.perf_counter()) - start < seconds:
        for _ in range(int((now - start) * rate) - count):
            msg = body[:offset] + str(time.time_ns()).encode() + body[offset + 19:]
            pub.send_multipart([topics[count % 64], msg])  # PUB drops at its HWM, never blocks
            count += 1
        time.sleep(1e-3)
    sent.put(count)
    time.sleep(0.5)
    pub.close(0)
    ctx.term()


@dataclass
class Row:
    setup: str
    detections: int
    size: int
    offered: float
    sent: int
    received: int
    seconds: float
    p50_us: float
    p99_us: float
    proxy_cpu_s: float | None

    def cells(self) -> list[str]:
        lost = 1 - self.received / self.sent if self.sent else 0.0
        cost = (f"{self.proxy_cpu_s / self.received * 1e6:.1f}"
                if self.proxy_cpu_s is not None and self.received else "-")
        capacity = (f"{self.received / self.proxy_cpu_s:,.0f}"
                    if self.proxy_cpu_s and self.received else "-")
        return [self.setup, str(self.detections), f"{self.size}", f"{self.offered:,.0f}",
                f"{self.received / self.seconds:,.0f}", f"{lost:.1%}",
                f"{self.p50_us:,.0f} / {self.p99_us:,.0f}", cost, capacity]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_case(setup: str, n_workers: int, stats: bool, body: bytes, n_det: int, rate: float,
             seconds: float) -> Row:
    spawn = mp.get_context("spawn")
    ports = [free_port() for _ in range(n_workers)]
    go, sent = spawn.Event(), spawn.Queue()
    procs = [spawn.Process(target=worker, args=(p, i, body, rate / n_workers, seconds, go, sent))
             for i, p in enumerate(ports)]
    for p in procs:
        p.start()
    proxy = None
    if setup == "direct":
        endpoint = f"tcp://127.0.0.1:{ports[0]}"
    else:
        front = free_port()
        endpoint = f"tcp://127.0.0.1:{front}"
        cmd = [sys.executable, "-m", "codetr_stream.daemon.cli", "proxy", "--frontend", endpoint,
               "--stats-interval", "1" if stats else "0"]
        for p in ports:
            cmd += ["--backend", f">tcp://127.0.0.1:{p}"]
        proxy = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 100_000)
    sub.setsockopt(zmq.SUBSCRIBE, b"det.")
    sub.setsockopt(zmq.SUBSCRIBE, b"status.hello")
    sub.connect(endpoint)
    heard: set[bytes] = set()
    while len(heard) < n_workers:
        if sub.poll(10_000) == 0:
            raise RuntimeError(f"{setup}: workers never reached the subscriber")
        heard.add(sub.recv_multipart()[0])
    go.set()
    cpu_start = cpu_seconds(proxy.pid) if proxy else 0.0
    offset = body.index(str(STAMP).encode())
    received, first, last, lat = 0, 0.0, 0.0, []
    while sub.poll(1000):
        topic, msg = sub.recv_multipart()
        if topic.startswith(b"status."):
            continue
        last = time.perf_counter()
        first = first or last
        received += 1
        lat.append(time.time_ns() - int(msg[offset:offset + 19]))
    proxy_cpu = cpu_seconds(proxy.pid) - cpu_start if proxy else None
    total_sent = sum(sent.get(timeout=30) for _ in procs)
    for p in procs:
        p.join()
    if proxy is not None:
        proxy.terminate()
        proxy.wait(timeout=10)
    sub.close(0)
    ctx.term()
    p50, p99 = (float(v) / 1e3 for v in np.percentile(lat or [0], [50, 99]))
    return Row(setup, n_det, len(body), rate, total_sent, received, max(last - first, 1e-9),
               p50, p99, proxy_cpu)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="sending time per case")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--detections", type=int, nargs="+", default=[0, 10, 100])
    parser.add_argument("--rates", type=float, nargs="+", default=[5_000, 20_000],
                        help="offered msgs/s in total (20k = 4,000 cameras at 5 fps)")
    parser.add_argument("--out", help="append the markdown table to this file")
    args = parser.parse_args()

    cases = []
    for n_det in args.detections:
        for rate in args.rates:
            cases.append(("direct", 1, False, n_det, rate))
            cases += [(f"proxy x{n}", n, False, n_det, rate) for n in args.workers]
            n = max(args.workers)
            cases.append((f"proxy x{n} +stats", n, True, n_det, rate))
    rows = [run_case(setup, n, stats, payload(n_det), n_det, rate, args.seconds)
            for setup, n, stats, n_det, rate in tqdm(cases, desc="cases", unit="case")]
    head = ["setup", "dets", "bytes", "offered msg/s", "delivered msg/s", "lost",
            "latency p50 / p99 us", "proxy CPU us/msg", "msg/s per proxy core"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo
                if line.startswith("model name")), platform.processor())
    header = (f"Machine: {cpu}, {os.cpu_count()} cores, CPU only (no GPU), Python "
              f"{platform.python_version()}, pyzmq {zmq.__version__} / libzmq {zmq.zmq_version()}."
              f"\nDate: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}. Command: `{' '.join(sys.argv)}`")
    table = header + "\n\n" + "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with Path(args.out).open("a") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
