"""sd_notify over a real AF_UNIX datagram socket, as systemd would receive it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from codetr_stream.daemon.demo.rtsp_server import free_port
from codetr_stream.daemon.system import systemd


class Receiver:
    """The systemd side: a bound datagram socket and the messages that arrived."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(5)

    def messages(self) -> list[str]:
        return self.sock.recv(4096).decode().split("\n")

    def nothing_pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(5)
        return False


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield Receiver(sock)


def test_ready_sends_ready_and_status(receiver: Receiver) -> None:
    assert systemd.ready("engine warm, 3 streams")
    assert receiver.messages() == ["READY=1", "STATUS=engine warm, 3 streams"]


def test_stopping_and_reloading(receiver: Receiver) -> None:
    assert systemd.stopping()
    assert receiver.messages() == ["STOPPING=1", "STATUS=stopping"]
    assert systemd.reloading()
    first, second = receiver.messages()
    assert first == "RELOADING=1"
    assert second.startswith("MONOTONIC_USEC=") and int(second.split("=")[1]) > 0


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"codetr-stream-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("WATCHDOG=1")
        assert sock.recv(64) == b"WATCHDOG=1"


def test_a_newline_in_a_status_cannot_forge_another_message(receiver: Receiver) -> None:
    systemd.status("camera said:\nREADY=1")
    assert receiver.messages() == ["STATUS=camera said: READY=1"]


def test_credentials_in_a_status_are_masked(receiver: Receiver) -> None:
    systemd.status("cam1: cannot open rtsp://admin:hunter2@10.0.0.7/live")
    assert receiver.messages() == ["STATUS=cam1: cannot open rtsp://***@10.0.0.7/live"]


def test_without_notify_socket_it_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.ready() is False


def test_a_vanished_socket_is_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert systemd.status("still running") is False


def test_a_child_process_notifies_like_the_service(tmp_path: Path, receiver: Receiver) -> None:
    code = "from codetr_stream.daemon.system import systemd; systemd.ready('up')"
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ), timeout=60)
    assert receiver.messages() == ["READY=1", "STATUS=up"]


def test_watchdog_interval_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert systemd.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert systemd.watchdog_interval() is None


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_watchdog_fed_while_frames_flow_and_not_after_a_stall(receiver: Receiver) -> None:
    clock = Clock()
    policy = systemd.WatchdogPolicy(stall_s=5, interval_s=10, clock=clock)
    assert policy.tick(expecting_frames=True)
    assert receiver.messages() == ["WATCHDOG=1"]
    clock.now += 2
    assert not policy.tick(expecting_frames=True)  # not due yet: half the interval
    clock.now += 4
    policy.progress()
    assert policy.tick(expecting_frames=True)
    assert receiver.messages() == ["WATCHDOG=1"]
    clock.now += 6  # no batch for longer than stall_s while a stream is connected
    assert not policy.tick(expecting_frames=True)
    assert receiver.nothing_pending()
    policy.progress()
    assert policy.tick(expecting_frames=True)


def test_watchdog_fed_while_idle_by_design(receiver: Receiver) -> None:
    clock = Clock()
    policy = systemd.WatchdogPolicy(stall_s=5, interval_s=10, clock=clock)
    for _ in range(3):
        clock.now += 60  # no frames at all, none expected
        assert policy.tick(expecting_frames=False)
        assert receiver.messages() == ["WATCHDOG=1"]
    clock.now += 3  # a stream connects: its first frame gets stall_s to arrive
    assert not policy.tick(expecting_frames=True)  # not due yet
    clock.now += 2
    assert policy.tick(expecting_frames=True)
    clock.now += 6
    assert not policy.tick(expecting_frames=True)


def test_no_watchdog_configured_never_pings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    sent: list[bool] = []
    policy = systemd.WatchdogPolicy(stall_s=5, send=lambda: sent.append(True) or True)
    assert not policy.tick(expecting_frames=False)
    assert sent == []


@pytest.mark.slow
def test_the_daemon_speaks_sd_notify_as_systemd_expects(tmp_path: Path) -> None:
    """`codetr-stream run` under a fake service manager's socket: READY=1 only once healthy,
    WATCHDOG=1 while idle by design (no camera configured), RELOADING=1 then READY=1 on SIGHUP,
    STOPPING=1 and exit 0 on SIGTERM."""
    from daemon_helpers import build_tiny_engine, write_config

    engine = build_tiny_engine(tmp_path / "tiny", batch_sizes=(1,))
    config = write_config(tmp_path / "streams.yaml", engine, {}, endpoint="tcp://127.0.0.1:0")
    health = "127.0.0.1", free_port()
    config.write_text(config.read_text().replace("health: {port: 0}",
                                                 f"health: {{port: {health[1]}}}"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify.sock"))
        sock.settimeout(120)
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
               "WATCHDOG_USEC": "1000000"}
        daemon = subprocess.Popen([sys.executable, "-m", "codetr_stream.daemon.cli", "run",
                                   "--config", str(config)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            def next_message() -> list[str]:
                return sock.recv(4096).decode().split("\n")

            first = next_message()
            assert first[0] == "READY=1", daemon.stderr
            assert healthz_status(health) == 200  # READY means serving, not starting
            sock.settimeout(5)
            assert next_message() == ["WATCHDOG=1"]  # no camera: idle by design, still fed
            daemon.send_signal(signal.SIGHUP)
            seen = [next_message()[0] for _ in range(4)]
            assert "RELOADING=1" in seen
            assert seen.index("READY=1", seen.index("RELOADING=1")) > 0
            daemon.send_signal(signal.SIGTERM)
            while (message := next_message())[0] == "WATCHDOG=1":
                pass
            assert message[0] == "STOPPING=1"
            assert daemon.wait(timeout=10) == 0
        finally:
            daemon.kill()
            daemon.communicate()


def healthz_status(address: tuple[str, int]) -> int:
    try:
        with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/healthz", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as error:
        return error.code
