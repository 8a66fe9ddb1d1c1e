"""No configured password ever leaves the daemon: every fault a camera can have, with passwords
literal in URLs, percent-encoded, in query strings, from ${ENV} and ${file:...} secrets, then
every log line (DEBUG and up, tracebacks included), ZeroMQ message, /metrics and /healthz body,
and `check-config`'s output grepped for each of them. (The fault tests in test_faults.py and the
SIGTERM test in test_shutdown.py run the same check on their own transcripts.)"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from codetr_stream.daemon.demo.rtsp_server import RtspServer, free_port
from fault_helpers import (
    ENV_NAME,
    ENV_PASSWORD,
    URL_PASSWORD,
    FaultDaemon,
    FaultyCamera,
    TcpCamera,
    assert_no_secrets,
    build_small_engine,
    wait_for,
)

WRONG_PASSWORD = "WrongPa55word"
SPECIAL_PASSWORD = "p@ss:w/rd%Z9"  # percent-encoded in the URL
QUERY_PASSWORD = "QueryPa55w0rd"
FILE_PASSWORD = "F1leSecret-Value"
RELOAD_PASSWORD = "Rel0adPa55"
# The query parameters cameras and clouds carry credentials in, each with its own value.
PARAMS = ("loginuse", "loginpas", "passwd", "pw", "pwd", "apikey", "api_key", "access_token",
          "auth_token", "token", "key", "secret", "signature", "X-Amz-Credential")
PARAM_SECRETS = {name: f"Prm{i:02d}-{name[:3]}Val" for i, name in enumerate(PARAMS)}
SECRETS = (URL_PASSWORD, ENV_PASSWORD, WRONG_PASSWORD, SPECIAL_PASSWORD, QUERY_PASSWORD,
           FILE_PASSWORD, RELOAD_PASSWORD, *PARAM_SECRETS.values())


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return build_small_engine(tmp_path_factory.mktemp("engine") / "tiny")


@pytest.mark.slow
def test_no_password_in_logs_messages_metrics_health_or_cli(engine, tmp_path, caplog,
                                                           monkeypatch) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(ENV_NAME, ENV_PASSWORD)
    secret_file = tmp_path / "cam_password"
    secret_file.write_text(FILE_PASSWORD + "\n")
    server = RtspServer(["authed=h264@5"], auth=f"admin:{URL_PASSWORD}").start()
    try:
        with FaultyCamera() as faulty, TcpCamera("garbage") as garbage, \
                TcpCamera("silent") as mute:
            streams = {
                "authed": server.url("authed", f"admin:{URL_PASSWORD}"),
                "wrongpass": server.url("authed", f"admin:{WRONG_PASSWORD}"),
                "envcam": faulty.url("env", f"viewer:${{{ENV_NAME}}}"),
                "filecam": faulty.url("file", f"viewer:${{file:{secret_file}}}"),
                "special": faulty.url("special", f"admin:{quote(SPECIAL_PASSWORD, safe='')}"),
                "query": faulty.url(f"query?user=admin&password={QUERY_PASSWORD}"),
                "params": faulty.url("params?channel=1&" + "&".join(
                    f"{name}={value}" for name, value in PARAM_SECRETS.items())),
                "unreachable": f"rtsp://admin:{URL_PASSWORD}@127.0.0.1:{free_port()}/x",
                "garbage": garbage.url().replace("rtsp://", f"rtsp://admin:{URL_PASSWORD}@"),
                "mute": mute.url().replace("rtsp://", f"rtsp://admin:${{{ENV_NAME}}}@"),
            }
            with FaultDaemon(tmp_path, engine, streams) as d:
                rec = d.recorder
                wait_for(lambda: all(rec.det(n) for n in ("authed", "envcam", "filecam",
                                                          "special", "query", "params")), 60,
                         "the good cameras publishing")
                for fault in ("silent", "garbage", "noise"):
                    faulty.mode = fault
                    wait_for(lambda f=fault: rec.last_status("envcam")["error"]
                             or f in ("garbage", "noise"), 10, f"{fault} noticed")
                    time.sleep(1.0)  # the fault lasts at least this long
                    d.sample_http()
                    faulty.mode = "ok"
                faulty.cut()
                server.stop()
                wait_for(lambda: rec.last_status("authed")["error"], 10, "authed down")
                d.sample_http()
                server.start()
                # wrongpass saw "refused" while the server was down: wait for its 401 again.
                wait_for(lambda: "401" in (rec.last_error("wrongpass") or "")
                         and "refused" in (rec.last_error("unreachable") or "")
                         and rec.last_error("garbage") and rec.last_error("mute"),
                         30, "every bad camera's own error in its heartbeat")
                # A rejected reload naming a new password, then a valid one rotating one.
                d.path.write_text(d.path.read_text() + f'- {{name: new, url: "http://admin:'
                                                       f'{RELOAD_PASSWORD}@127.0.0.1/x"}}\n')
                d.reload()
                wait_for(lambda: "reload rejected" in caplog.text, 15, "the reload rejected")
                rotated = dict(streams, envcam=faulty.url("env", f"viewer:{RELOAD_PASSWORD}"))
                d.reload(rotated)
                wait_for(lambda: "stream envcam changed" in caplog.text, 15, "envcam rotated")
                back = time.monotonic()
                wait_for(lambda: rec.det_after("authed", back) and rec.det_after("envcam", back),
                         30, "cameras publishing after the restart and the rotation")
                d.sample_http()
                d.http("/snapshot/nothing.jpg")
            transcript = d.transcript(caplog.text)
            check = subprocess.run([sys.executable, "-m", "codetr_stream.daemon.cli",
                                    "check-config", str(d.path)], capture_output=True,
                                   text=True, timeout=120)
    finally:
        server.stop()

    assert check.returncode == 0 and "***" in check.stdout, check.stdout + check.stderr
    transcript["check-config"] = check.stdout + check.stderr
    # The URLs did reach the logs and heartbeats (errors quote them), masked:
    assert "rtsp://***@127.0.0.1" in transcript["log"] and "password=***" in transcript["log"]
    assert "loginpas=***" in transcript["log"] and "access_token=***" in transcript["log"]
    assert "rtsp://***@127.0.0.1" in transcript["zmq"]
    assert_no_secrets(transcript, SECRETS)


def test_check_config_never_prints_a_password_or_a_secret_file(tmp_path: Path) -> None:
    """Literal passwords with '@', '/', '#' or '?' (refused: they need percent-encoding) and a
    `${file:...}` of a file that is not meant for a name: the errors say what is wrong, quote
    none of them. check-config printed the whole of /etc/passwd for the second."""
    secret_file = tmp_path / "secret"
    secret_file.write_text("line one\nFileSecretLine2\n")
    path = tmp_path / "streams.yaml"
    path.write_text("engine: {path: e}\nstreams:\n" + "".join(
        f"  - {{name: c{i}, url: 'rtsp://admin:{password}@192.0.2.1/live'}}\n"
        for i, password in enumerate(("p@ssLit1", "pa/ssLit2", "pa#ssLit3", "pa?ssLit4")))
        + f"  - {{name: '${{file:{secret_file}}}', url: 'rtsp://192.0.2.1/x'}}\n")
    done = subprocess.run([sys.executable, "-m", "codetr_stream.daemon.cli", "check-config",
                           str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 6, done.stderr
    for secret in ("ssLit1", "ssLit2", "ssLit3", "ssLit4", "FileSecretLine2", "line one"):
        assert secret not in done.stdout + done.stderr, done.stderr
