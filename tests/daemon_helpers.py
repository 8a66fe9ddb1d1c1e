"""Shared by the daemon tests: the tiny eager engine, streams.yaml files, the daemon in a thread."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from codetr_stream.compile import build_model
from codetr_stream.compile.build import build_model_engine
from codetr_stream.daemon import service
from codetr_stream.daemon.config.load import load_config

DATA = Path(__file__).parent / "data"
INPUT_HW = (256, 320)  # small: CI has 2 cores for everything


def tiny_model() -> torch.nn.Module:
    return build_model(DATA / "tiny_config.json", DATA / "tiny_codino.pth")


def build_tiny_engine(out: Path, batch_sizes: tuple[int, ...] = (1, 2, 4), *,
                      input_hw: tuple[int, int] = INPUT_HW) -> Path:
    """The tiny reference model as an eager fp32 CPU engine (the daemon's CPU path)."""
    build_model_engine(DATA / "tiny_config.json", out, checkpoint=DATA / "tiny_codino.pth",
                       input_hw=input_hw, batch_sizes=batch_sizes)
    return out


def write_config(path: Path, engine: Path, streams: dict[str, str], *, endpoint: str,
                 max_batch: int = 4, extra: str = "", min_score: float = 0.0) -> Path:
    """A streams.yaml for the CPU path: loopback ports, quick reconnects, every detection."""
    lines = [
        f"engine: {{path: {engine}, device: cpu}}",
        f"batching: {{max_batch: {max_batch}, max_wait_ms: 30}}",
        f'publish: {{endpoint: "{endpoint}", status_interval_s: 0.5}}',
        "health: {port: 0}",
        "reconnect: {open_timeout_s: 3, read_timeout_s: 2, stall_timeout_s: 3, "
        "backoff_initial_s: 0.2, backoff_max_s: 1.0}",
        extra,
        "streams:" if streams else "streams: []",
    ]
    lines += [f'  - {{name: {name}, url: "{url}", min_score: {min_score}}}'
              for name, url in streams.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def stand_in_daemon(setup: str = "") -> Iterator[subprocess.Popen]:
    """A process whose command line says codetr-stream (what `run` and `reload` check a pid
    file's process for), running `setup` and then waiting; it has printed 'ready' on entry."""
    script = f"# codetr-stream stand-in\nimport signal, sys\n{setup}\nprint('ready', flush=True)\n"
    daemon = subprocess.Popen([sys.executable, "-c", script + "signal.pause()\n"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert daemon.stdout.readline().strip() == "ready"
        yield daemon
    finally:
        daemon.kill()
        daemon.wait()
        daemon.stdout.close()


class DaemonThread:
    """`service.run` in a thread, with the stop/reload events and an `on_result` tap."""

    def __init__(self, config_path: Path, on_result=None, restrict=None) -> None:
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.error: BaseException | None = None
        config = load_config(config_path)
        self.thread = threading.Thread(target=self._run,
                                       args=(config, config_path, on_result, restrict))

    def _run(self, config, config_path, on_result, restrict) -> None:
        try:
            service.run(config, stop_event=self.stop, reload_event=self.reload,
                        config_path=config_path, on_result=on_result, restrict=restrict)
        except BaseException as exc:
            self.error = exc
            raise

    def __enter__(self) -> DaemonThread:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "the daemon did not stop"


@contextmanager
def publishing(send: Callable[[int], object], period_s: float = 0.02) -> Iterator[list[float]]:
    """Call send(i) with i = 0, 1, ... in the background until the block ends (a subscriber
    joins at some unknown point, as it would against a running daemon); yields the list of
    how long each call took."""
    took: list[float] = []
    stop = threading.Event()

    def loop() -> None:
        i = 0
        while not stop.wait(period_s):
            started = time.perf_counter()
            send(i)
            took.append(time.perf_counter() - started)
            i += 1

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        yield took
    finally:
        stop.set()
        thread.join()


def timed_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, float]:
    """GET `url`: (HTTP status, seconds to the whole answer); status 0 when there was none
    within 10 s."""
    request = urllib.request.Request(url, headers=headers or {})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except OSError:
        status = 0
    return status, time.monotonic() - started
