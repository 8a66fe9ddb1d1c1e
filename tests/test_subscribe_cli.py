"""`codetr-stream subscribe` as a real process against a real publisher."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import zmq
from codetr_stream.daemon.detections import FrameResult, StreamStatus
from codetr_stream.daemon.publish import Publisher
from daemon_helpers import publishing

CLI = [sys.executable, "-m", "codetr_stream.daemon.cli", "subscribe"]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def frame(stream: str, index: int) -> FrameResult:
    return FrameResult(stream, index, None, time.time_ns(), 640, 480)


def test_prints_one_json_line_per_message_of_the_chosen_stream() -> None:
    with Publisher("tcp://127.0.0.1:0") as pub:
        def send(i: int) -> None:
            pub.publish(frame("cam1", i))
            pub.publish(frame("cam10", i))

        with publishing(send):
            done = run_cli("--endpoint", pub.endpoint, "--stream", "cam1", "--count", "5")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == 5 and {m["stream"] for m in lines} == {"cam1"}
    indexes = [m["frame_index"] for m in lines]
    assert indexes == sorted(indexes) and len(set(indexes)) == 5


def test_status_flag_prints_heartbeats_only() -> None:
    with Publisher("tcp://127.0.0.1:0") as pub:
        def send(i: int) -> None:
            pub.publish(frame("cam1", i))
            pub.status(StreamStatus("cam1", False, 0.0, 0.0, 0, 0, 0, 3, None, "timeout"))

        with publishing(send):
            done = run_cli("--endpoint", pub.endpoint, "--status", "--count", "3")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [m["type"] for m in lines] == ["status"] * 3
    assert lines[0]["connected"] is False and lines[0]["reconnects"] == 3


def test_reports_lost_messages_on_stderr() -> None:
    with zmq.Context.instance().socket(zmq.PUB) as raw:
        port = raw.bind_to_random_port("tcp://127.0.0.1")
        payload = FrameResult("cam1", 0, None, 0, 640, 480).to_dict()

        def send(i: int) -> None:  # every message skips 9 sequence numbers
            raw.send_multipart([b"det.cam1|", json.dumps({**payload, "seq": 10 * i}).encode()])

        with publishing(send):
            done = run_cli("--endpoint", f"tcp://127.0.0.1:{port}", "--count", "3")
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["det.cam1|: 9 message(s) missed so far",
                                        "det.cam1|: 18 message(s) missed so far"]


def test_timeout_without_messages_exits_1() -> None:
    with Publisher("tcp://127.0.0.1:0") as pub:
        done = run_cli("--endpoint", pub.endpoint, "--timeout", "0.5")
    assert done.returncode == 1
    assert done.stderr.strip() == f"no message from {pub.endpoint} for 0.5 s"


def test_closed_pipe_ends_quietly() -> None:
    with Publisher("tcp://127.0.0.1:0") as pub, publishing(lambda i: pub.publish(frame("c", i))):
        proc = subprocess.Popen([*CLI, "--endpoint", pub.endpoint], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert json.loads(proc.stdout.readline())["stream"] == "c"
        proc.stdout.close()  # like `| head -1`
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in proc.stderr.read()
