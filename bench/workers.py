"""Sharded worker processes and a SUB socket: the fleet as the scale-out bench (bench/scaleout.py)
and its CPU test (tests/test_scaleout_e2e.py) run it, every part a real `codetr-stream` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import zmq

CLI = [sys.executable, "-m", "codetr_stream.daemon.cli"]


class Worker:
    """One `codetr-stream run` worker of `replicas`; all of them share the camera list, each has
    its own ports. `env` adds to the environment (e.g. CUDA_VISIBLE_DEVICES to pin it to one
    GPU)."""

    def __init__(self, index: int, config: Path, endpoint: str, log: Path, *, replicas: int,
                 env: dict[str, str] | None = None) -> None:
        self.index, self.config, self.endpoint, self.log = index, config, endpoint, log
        self.replicas, self.env = replicas, env or {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> Worker:
        env = {**os.environ, "OMP_NUM_THREADS": "1",  # workers share the machine's cores
               "CODETR_SHARD_INDEX": str(self.index),
               "CODETR_SHARD_REPLICAS": str(self.replicas), **self.env}
        with self.log.open("a") as log:
            self.proc = subprocess.Popen([*CLI, "run", "--config", str(self.config)], env=env,
                                         stdout=log, stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def subscriber(context: zmq.Context, endpoint: str) -> zmq.Socket:
    """A SUB on every detection topic, with room for a whole run's messages."""
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 100_000)
    sub.setsockopt(zmq.SUBSCRIBE, b"det.")
    sub.connect(endpoint)
    return sub
