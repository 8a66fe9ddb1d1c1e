"""Scale-out end to end on the CPU path: sharded worker processes behind the proxy, one subscriber.

Three `codetr-stream run` processes read the same camera list and serve the cameras that
rendezvous hashing gives their index (as in Kubernetes: $CODETR_SHARD_INDEX/$CODETR_SHARD_REPLICAS;
`codetr-stream shard --replicas 3` prints the same plan), each on its own loopback port;
`codetr-stream proxy` connects to all three; one SUB on the proxy must see every camera exactly
once. Killing one worker silences exactly its cameras, and restarting it brings them back.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest
import zmq
from codetr_stream.daemon.demo.rtsp_server import RtspServer, free_port
from codetr_stream.daemon.fleet.shard import owner
from daemon_helpers import build_tiny_engine, write_config
from workers import CLI, Worker, subscriber  # bench/workers.py

REPLICAS = 3
PER_WORKER = 2


def camera_names(replicas: int = REPLICAS, per_worker: int = PER_WORKER) -> dict[int, list[str]]:
    """`per_worker` cameras for each worker, picked by the real hash so the load is even."""
    picked: dict[int, list[str]] = defaultdict(list)
    for i in range(1000 * replicas * per_worker):
        name = f"cam{i}"
        worker = owner(name, replicas)
        if len(picked[worker]) < per_worker:
            picked[worker].append(name)
        if all(len(picked[w]) == per_worker for w in range(replicas)):
            return dict(picked)
    raise AssertionError("the hash never filled every worker")


def receive(sub: zmq.Socket, until, timeout: float, logs: list[Path]) -> dict[str, list[dict]]:
    """Detections per stream until `until(by_stream)` holds; fails with the workers' logs."""
    by_stream: dict[str, list[dict]] = defaultdict(list)
    deadline = time.monotonic() + timeout
    while not until(by_stream):
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in logs)
            counts = {k: len(v) for k, v in by_stream.items()}
            pytest.fail(f"timed out after {timeout}s with {counts}\n{tails}")
        if sub.poll(200):
            _, payload = sub.recv_multipart()
            message = json.loads(payload)
            by_stream[message["stream"]].append(message)
    return by_stream


def receive_for(sub: zmq.Socket, seconds: float) -> dict[str, list[dict]]:
    by_stream: dict[str, list[dict]] = defaultdict(list)
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if sub.poll(int(left * 1000) + 1):
            message = json.loads(sub.recv_multipart()[1])
            by_stream[message["stream"]].append(message)
    return by_stream


def assert_exactly_once(by_stream: dict[str, list[dict]]) -> None:
    """One publisher per camera: frame indexes strictly increase and seq has no gaps (two
    workers on one camera would repeat indexes; a lost message would leave a seq gap)."""
    for name, messages in by_stream.items():
        indexes = [m["frame_index"] for m in messages]
        assert indexes == sorted(set(indexes)), f"{name}: repeated or reordered {indexes}"
        seqs = [m["seq"] for m in messages]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{name}: seq gaps {seqs}"


@pytest.mark.slow
def test_sharded_workers_behind_the_proxy_survive_a_worker_restart(tmp_path) -> None:
    engine = build_tiny_engine(tmp_path / "engine")
    cameras = camera_names()
    everyone = sorted(name for names in cameras.values() for name in names)
    with RtspServer([f"{name}=h264:320x240@5" for name in everyone]) as srv:
        fleet = write_config(tmp_path / "fleet.yaml", engine,
                             {name: srv.url(name) for name in everyone}, endpoint="tcp://*:0")
        plan = json.loads(subprocess.run(
            [*CLI, "shard", "--replicas", str(REPLICAS), "--json", str(fleet)],
            capture_output=True, text=True, check=True).stdout)["workers"]
        assert {int(i): sorted(v) for i, v in plan.items()} == \
            {i: sorted(v) for i, v in cameras.items()}
        workers = []
        for i in range(REPLICAS):
            endpoint = f"tcp://127.0.0.1:{free_port()}"
            config = write_config(tmp_path / f"worker{i}.yaml", engine,
                                  {name: srv.url(name) for name in everyone}, endpoint=endpoint)
            workers.append(Worker(i, config, endpoint, tmp_path / f"worker{i}.log",
                                  replicas=REPLICAS))
        logs = [w.log for w in workers]
        front = f"tcp://127.0.0.1:{free_port()}"
        proxy = subprocess.Popen([*CLI, "proxy", "--frontend", front,
                                  *[a for w in workers for a in ("--backend", ">" + w.endpoint)]])
        context = zmq.Context()
        try:
            sub = subscriber(context, front)
            direct = [subscriber(context, w.endpoint) for w in workers]
            for worker in workers:
                worker.start()

            # 1. Every camera arrives through the proxy, from exactly one worker.
            first = receive(sub, lambda got: all(len(got[n]) >= 3 for n in everyone), 240, logs)
            assert set(first) == set(everyone)
            assert_exactly_once(first)
            for worker, sock in zip(workers, direct, strict=True):
                seen = set(receive_for(sock, 0.5))  # its backlog since the start
                assert seen == set(cameras[worker.index]), f"worker {worker.index} sent {seen}"

            # 2. Kill one worker: only its cameras go quiet, the others carry on.
            victim = workers[1]
            victim.kill()
            receive_for(sub, 1.0)  # drop what was already in flight
            during = receive_for(sub, 4.0)
            survivors = [n for n in everyone if n not in cameras[victim.index]]
            assert set(during) == set(survivors), f"after the kill: {set(during)}"
            assert_exactly_once(during)
            for name in survivors:
                assert during[name][0]["frame_index"] > first[name][-1]["frame_index"]

            # 3. Restart it: its cameras come back, still one publisher per camera.
            victim.start()
            back = receive(sub, lambda got: all(len(got[n]) >= 2 for n in everyone), 240, logs)
            assert set(back) == set(everyone)
            assert_exactly_once(back)
        finally:
            for worker in workers:
                worker.stop()
            proxy.send_signal(signal.SIGTERM)
            proxy_rc = proxy.wait(timeout=15)
            context.destroy(linger=0)
    assert proxy_rc == 0
