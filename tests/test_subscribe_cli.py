"""`codetr-stream subscribe` as a real process against a real publisher."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import zmq
from cli_helpers import default_sigint, interrupt
from codetr_stream.daemon.feed import curve
from codetr_stream.daemon.feed.messages import FrameResult, StreamStatus
from codetr_stream.daemon.feed.publish import Publisher
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


@pytest.mark.parametrize(("args", "text"), [
    (["--endpoint", "bogus://x"], "argument --endpoint: 'bogus://x' is not a ZeroMQ endpoint; use "
                                  "tcp://HOST:PORT (e.g. tcp://127.0.0.1:5555) or ipc:///path"),
    (["--endpoint", "tcp://127.0.0.1"], "argument --endpoint: 'tcp://127.0.0.1' needs a host and "
                                        "a port 1-65535, e.g. tcp://127.0.0.1:5555"),
    (["--count", "-1"], "argument --count: must be 1 or more, got -1"),
    (["--timeout", "0"], "argument --timeout: must be more than 0, got 0"),
], ids=["unknown-scheme", "no-port", "negative-count", "zero-timeout"])
def test_bad_arguments_are_one_usage_line(args: list[str], text: str) -> None:
    done = run_cli(*args)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"codetr-stream subscribe: error: {text} (see `codetr-stream subscribe --help`)"]
    assert done.stdout == ""


def test_ctrl_c_while_waiting_exits_at_once() -> None:
    with zmq.Context.instance().socket(zmq.XPUB) as xpub:  # sees the subscription arrive
        port = xpub.bind_to_random_port("tcp://127.0.0.1")
        proc = subprocess.Popen([*CLI, "--endpoint", f"tcp://127.0.0.1:{port}"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=default_sigint)
        if xpub.poll(60_000):
            assert xpub.recv() == b"\x01det."  # now it waits for messages, in ZeroMQ's poll
        code, took = interrupt(proc)
    assert code == 130 and took < 2.0, took
    assert proc.stderr.read().strip() == "codetr-stream subscribe: interrupted"


BAD_MESSAGES = [
    [b"det.cam1|", b"\xff\xfe not json"],  # not UTF-8, not JSON
    [b"det.cam1|"],  # one frame
    [b"det.cam1|", b"{}", b"a third frame"],
    [b"det.cam1|", b"[1, 2, 3]"],  # JSON, not an object
    [b"det.cam1|", b"[" * 100_000 + b"]" * 100_000],  # nested past the parser's recursion
    [b"det.cam1|", b'{"schema_version": 1, "seq": "7"}'],  # no integer seq
    [b"\xff\xfe|", b'{"schema_version": 1, "seq": 1}'],  # topic not UTF-8
]


def test_malformed_messages_are_counted_and_skipped() -> None:
    """A raw PUB interleaves every kind of broken message with good ones: the CLI prints the
    good ones, says how many it skipped, exits 0, and never shows a traceback."""
    with zmq.Context.instance().socket(zmq.PUB) as raw:
        port = raw.bind_to_random_port("tcp://127.0.0.1")
        good = FrameResult("cam1", 0, None, 0, 640, 480).to_dict()

        def send(i: int) -> None:
            for bad in BAD_MESSAGES:
                raw.send_multipart(bad)
            raw.send_multipart([b"det.cam1|", json.dumps({**good, "seq": i,
                                                          "frame_index": i}).encode()])

        with publishing(send, 0.05):
            done = run_cli("--endpoint", f"tcp://127.0.0.1:{port}", "--count", "4")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == 4 and all(m["type"] == "detections" for m in lines)
    assert "malformed message(s) skipped so far" in done.stderr
    assert "Traceback" not in done.stderr


def test_another_schema_version_is_one_line_and_exit_1() -> None:
    with zmq.Context.instance().socket(zmq.PUB) as raw:
        port = raw.bind_to_random_port("tcp://127.0.0.1")
        with publishing(lambda i: raw.send_multipart(
                [b"det.cam1|", b'{"schema_version": 99, "seq": 0}'])):
            done = run_cli("--endpoint", f"tcp://127.0.0.1:{port}")
    assert done.returncode == 1
    assert done.stderr.strip().endswith("schema_version 99, this client reads 1; use the "
                                        "codetr-stream version of the daemon")
    assert len(done.stderr.strip().splitlines()) == 1


def test_curve_subscriber_with_the_server_key_receives_and_a_plain_one_nothing(
        tmp_path) -> None:
    """The daemon's publisher as a CURVE server: `subscribe --curve-server-key server.pub`
    prints detections; a plain subscriber, and one holding another server's key, get
    nothing."""
    keys = subprocess.run([*CLI[:-1], "curve-keygen", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert keys.returncode == 0, keys.stderr
    assert oct((tmp_path / "server.secret").stat().st_mode & 0o777) == "0o600"
    other_public, _ = zmq.curve_keypair()
    secret = curve.read_key(tmp_path / "server.secret")
    with Publisher("tcp://127.0.0.1:0", curve_secret_key=secret) as pub, \
            publishing(lambda i: pub.publish(frame("cam1", i))):
        encrypted = run_cli("--endpoint", pub.endpoint, "--count", "3",
                            "--curve-server-key", str(tmp_path / "server.pub"))
        plain = run_cli("--endpoint", pub.endpoint, "--timeout", "2")
        wrong = run_cli("--endpoint", pub.endpoint, "--timeout", "2",
                        "--curve-server-key", other_public.decode())
    assert encrypted.returncode == 0, encrypted.stderr
    assert [json.loads(line)["stream"] for line in encrypted.stdout.splitlines()] == ["cam1"] * 3
    for refused in (plain, wrong):
        assert refused.returncode == 1 and refused.stdout == ""
        assert "no message from" in refused.stderr
    assert pub.subscriptions == 0  # the refused ones never got as far as subscribing


def test_a_malformed_curve_key_is_one_line_and_exit_2(tmp_path) -> None:
    (tmp_path / "bad.pub").write_text("not a key\n")
    done = run_cli("--curve-server-key", str(tmp_path / "bad.pub"))
    assert done.returncode == 2
    assert done.stderr.strip() == (f"--curve-server-key: {tmp_path / 'bad.pub'}: not a CURVE "
                                   "key (expected 40 Z85 characters, as `codetr-stream "
                                   "curve-keygen` writes them)")
