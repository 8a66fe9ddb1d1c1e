"""`check-config`, `run` and `reload` on real files and processes: line numbers and exit codes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "codetr_stream.daemon.cli"]

TYPOS = """\
engine:
  path: engines/tiny
  gpus: [0]
batching:
  max_bacth: 4
streams:
  - name: cam1
    url: rtsp://admin:${CAM1_PASSWORD}@10.0.0.5/stream1
    transport: tpc
  - name: cam2
    ulr: rtsp://10.0.0.6/stream1
    classes: [person, persn]
"""


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def write(tmp_path: Path, text: str, name: str = "streams.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_check_config_prints_every_error_with_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, TYPOS)
    done = cli("check-config", str(path), env={"CAM1_PASSWORD": "hunter2-secret"})
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"{path}:5: batching.max_bacth: unknown key (hint: did you mean 'max_batch'?)",
        f"{path}:9: streams[0].transport: Input should be 'tcp' or 'udp' "
        "(hint: RTSP transport: tcp (robust through NAT and loss) or udp)",
        f"{path}:10: streams[1].url: required, missing (hint: rtsp://[user:pass@]host[:port]/path, "
        "rtsps://..., or file:///path (tests); put passwords in ${ENV_VAR} references)",
        f"{path}:11: streams[1].ulr: unknown key (hint: did you mean 'url'?)",
        f"{path}:12: streams[1].classes: unknown classes 'persn' (did you mean 'person'?); use one "
        "of the model's 80 class names or an id 0..79 (hint: publish only these classes (names or "
        "ids); null = all)",
        f"{path}: 5 problem(s)",
    ]


def test_check_config_names_a_missing_secret(tmp_path: Path) -> None:
    path = write(tmp_path, TYPOS)
    env = {k: v for k, v in os.environ.items() if k != "CAM1_PASSWORD"}
    done = subprocess.run([*CLI, "check-config", str(path)], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 1
    assert f"{path}:8: streams[0].url: ${{CAM1_PASSWORD}} is not set" in done.stderr


def test_check_config_success_prints_a_summary_without_passwords(tmp_path: Path) -> None:
    env = {"ENTRANCE_PASSWORD": "pw-entrance-123", "DOCK_USER": "dock-user",
           "DOCK_PASSWORD": "pw-dock-456"}
    engine = tmp_path / "engine"
    engine.mkdir()
    _eager_manifest().save(engine)
    text = (ROOT / "streams.yaml").read_text().replace("path: engines/co_dino_swin_l",
                                                       f"path: {engine}")
    path = write(tmp_path, text)
    done = cli("check-config", str(path), env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"{path}: OK"
    assert "streams: 2 enabled of 3" in done.stdout
    assert "entrance: rtsp://***@192.0.2.10:554/Streaming/Channels/101" in done.stdout
    for secret in env.values():
        assert secret not in done.stdout + done.stderr


def test_shipped_streams_yaml_checks_without_any_variable_set() -> None:
    """The example is valid as shipped (its ${NAME:-default} placeholders); only the engine is
    not built yet, which check-config says first, with exit code 3."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("ENTRANCE_PASSWORD", "DOCK_USER", "DOCK_PASSWORD")}
    done = subprocess.run([*CLI, "check-config", "streams.yaml"], capture_output=True, text=True,
                          timeout=60, env=env, cwd=ROOT)
    assert done.returncode == 3, done.stderr
    assert done.stderr.splitlines() == [
        f"streams.yaml: run would refuse: engine: {ROOT / 'engines/co_dino_swin_l'}: no such "
        "engine directory; fix the path, or build one with `codetr-stream compile --weights "
        f"PATH --out {ROOT / 'engines/co_dino_swin_l'}`"]
    assert "streams: 2 enabled of 3" in done.stdout
    assert "change-me" not in done.stdout


def test_a_reference_default_applies_only_where_the_variable_is_missing(tmp_path: Path) -> None:
    engine = tmp_path / "engine"
    engine.mkdir()
    _eager_manifest().save(engine)
    path = write(tmp_path, f"engine: {{path: {engine}}}\nstreams:\n"
                 '  - {name: c1, url: "file:///clips/${CODETR_TEST_CLIP:-cam}.mp4"}\n')
    env = {k: v for k, v in os.environ.items() if k != "CODETR_TEST_CLIP"}
    unset = subprocess.run([*CLI, "check-config", str(path)], capture_output=True, text=True,
                           timeout=60, env=env)
    assert unset.returncode == 0, unset.stderr
    assert "c1: file:///clips/cam.mp4" in unset.stdout
    done = cli("check-config", str(path), env={"CODETR_TEST_CLIP": "lot"})
    assert "c1: file:///clips/lot.mp4" in done.stdout


def _eager_manifest():
    from codetr_stream.compile.engines.manifest import Manifest

    return Manifest(backend="eager", precision="fp32", input_hw=(256, 320), batch_sizes=[1],
                    config_name="tiny", config={}, class_names=[], random_weights=True, seed=0)


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    path = write(tmp_path, "engine:\n  path: e\nstreams:\n  - name: [cam1\n")
    done = cli("check-config", str(path))
    assert done.returncode == 1
    assert done.stderr.startswith(f"{path}:5: invalid YAML")


def test_run_refuses_an_invalid_config(tmp_path: Path) -> None:
    path = write(tmp_path, TYPOS)
    done = cli("run", "--config", str(path), env={"CAM1_PASSWORD": "hunter2-secret"})
    assert done.returncode == 1
    assert f"{path}:5: batching.max_bacth: unknown key" in done.stderr
    assert done.stderr.splitlines()[-1] == f"{path}: refusing to start"
    assert "hunter2-secret" not in done.stderr


def test_reload_signals_the_daemon_in_the_pid_file(tmp_path: Path) -> None:
    from daemon_helpers import stand_in_daemon

    with stand_in_daemon("signal.signal(signal.SIGHUP, lambda *a: (print('HUP', flush=True), "
                         "sys.exit(0)))") as daemon:
        (tmp_path / "daemon.pid").write_text(f"{daemon.pid}\n")
        path = write(tmp_path, "engine: {path: e}\npid_file: daemon.pid\nstreams: []\n")
        done = cli("reload", "--config", str(path))
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"sent SIGHUP to codetr-stream (pid {daemon.pid})"
        assert daemon.stdout.readline().strip() == "HUP"
        assert daemon.wait(timeout=10) == 0


def test_reload_refuses_an_invalid_config_and_stale_or_missing_pid_files(tmp_path: Path) -> None:
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "daemon.pid").write_text(f"{bystander.pid}\n")
        invalid = write(tmp_path, "engine: {path: e}\npid_file: daemon.pid\nstreams: [{}]\n")
        done = cli("reload", "--config", str(invalid))
        assert done.returncode == 1
        assert done.stderr.splitlines()[-1].endswith("the daemon keeps its current config")

        stale = write(tmp_path, "engine: {path: e}\npid_file: daemon.pid\n", "stale.yaml")
        done = cli("reload", "--config", str(stale))
        assert done.returncode == 1 and "is not codetr-stream (stale pid file)" in done.stderr
        assert bystander.poll() is None  # not signalled: SIGHUP would have killed `sleep`
    finally:
        bystander.kill()
        bystander.wait()
    no_pid = write(tmp_path, "engine: {path: e}\n", "nopid.yaml")
    done = cli("reload", "--config", str(no_pid))
    assert done.returncode == 1 and "no pid_file set" in done.stderr


@pytest.mark.parametrize("tail, problem", [
    (b"\xff\n", ":3: not UTF-8 text (byte 0xff) (hint: save the file as UTF-8)"),
    (b"x: &a [1, *a]\n", ":3: a recursive alias: this value contains itself")])
def test_run_refuses_an_unreadable_file_in_one_line(tmp_path: Path, tail: bytes,
                                                    problem: str) -> None:
    """`run` reads the file as check-config does: a traceback before (UnicodeDecodeError,
    RecursionError), now the problem, its line and the refusal."""
    path = tmp_path / "streams.yaml"
    path.write_bytes(b"engine: {path: e}\nstreams: []\n" + tail)
    done = cli("run", "--config", str(path))
    assert done.returncode == 1 and done.stderr.splitlines() == [
        f"{path}{problem}", f"{path}: 1 problem(s)", f"{path}: refusing to start"], done.stderr


@pytest.mark.parametrize("key", ["pid_file", "publish"])
def test_run_never_clobbers_a_file_it_does_not_own(tmp_path: Path, key: str) -> None:
    """A pid_file or an ipc:// endpoint naming someone's file: `run` overwrote it and then
    deleted it (ZeroMQ replaced it with a socket). Now both are refused in one line."""
    victim = tmp_path / "notes.txt"
    victim.write_text("precious\n")
    setting = (f"pid_file: {victim}" if key == "pid_file"
               else f'publish: {{endpoint: "ipc://{victim}"}}')
    path = write(tmp_path, f"engine: {{path: e}}\n{setting}\nstreams: []\n")
    done = cli("run", "--config", str(path))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines() == [
        f"{path}:2: {'pid_file' if key == 'pid_file' else 'publish.endpoint'}: {victim} exists "
        f"and is not {'a pid file' if key == 'pid_file' else 'a socket'}; refusing to "
        f"{'overwrite' if key == 'pid_file' else 'replace'} it: choose another path"
        + (" (hint: `run` writes its pid here so `codetr-stream reload` can signal it)"
           if key == "pid_file" else " (hint: ZeroMQ PUB bind address (tcp://, ipc://); "
           "loopback unless you mean it)"),
        f"{path}: 1 problem(s)", f"{path}: refusing to start"]
    assert victim.read_text() == "precious\n"


def test_run_refuses_a_pid_file_a_running_daemon_holds(tmp_path: Path) -> None:
    from daemon_helpers import stand_in_daemon

    with stand_in_daemon() as daemon:
        (tmp_path / "daemon.pid").write_text(f"{daemon.pid}\n")
        path = write(tmp_path, "engine: {path: e}\npid_file: daemon.pid\nstreams: []\n")
        done = cli("run", "--config", str(path))
        assert done.returncode == 1 and done.stderr.splitlines() == [
            f"{path}: refusing to start: pid_file: {tmp_path / 'daemon.pid'}: codetr-stream is "
            f"already running (pid {daemon.pid}); stop it, or give this one another pid_file"
        ], done.stderr
        assert (tmp_path / "daemon.pid").read_text() == f"{daemon.pid}\n"


@pytest.mark.slow
def test_run_writes_its_pid_file_and_reload_adds_a_stream(tmp_path: Path) -> None:
    """The real daemon (tiny CPU engine): `reload` reaches it through the pid file, the new
    stream's heartbeats appear, and SIGTERM exits 0 and removes the pid file."""
    from codetr_stream.daemon.demo.rtsp_server import free_port
    from codetr_stream.daemon.feed.subscribe import Subscription
    from daemon_helpers import build_tiny_engine

    engine = build_tiny_engine(tmp_path / "engine", batch_sizes=(1,))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    head = (f"engine: {{path: {engine}, device: cpu}}\n"
            f'publish: {{endpoint: "{endpoint}", status_interval_s: 0.2}}\n'
            "health: {port: 0}\npid_file: daemon.pid\n")
    path = write(tmp_path, head + "streams: []\n")
    pid_file = tmp_path / "daemon.pid"
    daemon = subprocess.Popen([*CLI, "run", "--config", str(path)], stderr=subprocess.PIPE,
                              text=True)
    try:
        with Subscription(endpoint, ["cam9"], status=True) as status:
            deadline = time.monotonic() + 120
            while not pid_file.exists():
                assert daemon.poll() is None and time.monotonic() < deadline, "no pid file"
                time.sleep(0.1)
            assert pid_file.read_text().strip() == str(daemon.pid)
            write(tmp_path, head + "streams: [{name: cam9, url: "
                  f'"rtsp://127.0.0.1:{free_port()}/none"}}]\n')
            done = cli("reload", "--config", str(path))
            assert done.returncode == 0, done.stderr
            heartbeat = status.receive(timeout_s=120)
        assert heartbeat is not None and heartbeat["stream"] == "cam9"
        assert heartbeat["connected"] is False
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=10) == 0
    finally:
        daemon.kill()
        log = daemon.stderr.read()
    assert not pid_file.exists(), log[-2000:]


def test_class_names_come_from_the_engine_manifest_when_built(tmp_path: Path) -> None:
    from codetr_stream.compile.engines.manifest import Manifest

    engine = tmp_path / "engine"
    engine.mkdir()
    Manifest(backend="eager", precision="fp32", input_hw=(256, 320), batch_sizes=[1],
             config_name="custom", config={}, class_names=["pallet", "forklift"],
             random_weights=True).save(engine)
    stream = '  - {name: dock, url: "rtsp://h/", classes: [%s]}\n'
    custom = write(tmp_path, "engine: {path: engine}\nstreams:\n" + stream % "forklift")
    assert cli("check-config", str(custom)).returncode == 0
    coco = write(tmp_path, "engine: {path: engine}\nstreams:\n" + stream % "person", "coco.yaml")
    done = cli("check-config", str(coco))
    assert done.returncode == 1
    assert "unknown classes 'person'; use one of the model's 2 class names" in done.stderr
    unbuilt = write(tmp_path, "engine: {path: nowhere}\nstreams:\n" + stream % "person", "u.yaml")
    assert cli("check-config", str(unbuilt)).returncode == 3  # COCO until the engine exists


@pytest.mark.parametrize("case", ["missing", "other-gpu", "cuda-without-gpu"])
def test_run_refuses_an_engine_it_cannot_load_in_one_line(tmp_path: Path, case: str) -> None:
    """Not built, built for another machine, or asked for a GPU that is not there: the problem
    and its fix on one line, exit code 1, no traceback."""
    from codetr_stream.compile.engines.manifest import Manifest

    if case == "cuda-without-gpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("tests the message without a GPU")
    engine = tmp_path / "engine"
    if case == "other-gpu":
        engine.mkdir()
        Manifest(backend="inductor", precision="fp16", input_hw=(256, 320), batch_sizes=[1],
                 config_name="co_dino_swin_l", config={}, class_names=[], random_weights=True,
                 seed=0, device_name="NVIDIA H100 80GB HBM3", compute_capability="9.0").save(engine)
    device = "cuda" if case == "cuda-without-gpu" else "cpu"
    path = write(tmp_path, f"engine: {{path: engine, device: {device}}}\nhealth: {{port: 0}}\n"
                 "streams: []\n")
    done = cli("run", "--config", str(path))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    [problem] = done.stderr.splitlines()
    assert problem.startswith(f"{path}: refusing to start: engine: "), problem
    expected = {
        "missing": [f"{engine}: no such engine directory; fix the path, or build one with "
                    f"`codetr-stream compile --weights PATH --out {engine}`"],
        "other-gpu": ["cannot run here: fp16 engines need a CUDA GPU, this device is cpu; built "
                      "for cuda (NVIDIA H100 80GB HBM3), running on cpu (cpu)",
                      f"Rebuild it on this machine: codetr-stream compile --config "
                      f"co_dino_swin_l --random-weights --seed 0 --precision fp32 "
                      f"--size 320x256 --batch 1 --backend eager --out {engine}"],
        "cuda-without-gpu": ["engine.device is 'cuda' but no CUDA GPU is visible; set "
                             "engine.device: cpu (or auto)"],
    }[case]
    assert all(text in problem for text in expected), problem


def test_check_config_says_first_that_run_would_refuse_and_exits_3(tmp_path: Path) -> None:
    path = write(tmp_path, "engine: {path: nowhere}\nstreams: []\n")
    done = cli("check-config", str(path))
    assert done.returncode == 3, done.stderr  # valid, but not runnable as it is
    assert done.stderr.strip() == (
        f"{path}: run would refuse: engine: {tmp_path / 'nowhere'}: no such engine directory; "
        "fix the path, or build one with `codetr-stream compile --weights PATH "
        f"--out {tmp_path / 'nowhere'}`")
    assert not done.stdout.startswith(f"{path}: OK")


@pytest.mark.parametrize("taken", ["publish", "health"])
def test_run_with_a_port_in_use_refuses_in_one_line(tmp_path: Path, taken: str) -> None:
    """Before the engine loads (minutes on a GPU), the taken port and the fix, no traceback."""
    engine = tmp_path / "engine"
    engine.mkdir()
    _eager_manifest().save(engine)
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        endpoint = f"tcp://127.0.0.1:{port if taken == 'publish' else 0}"
        path = write(tmp_path, f"engine: {{path: {engine}, device: cpu}}\n"
                     f'publish: {{endpoint: "{endpoint}"}}\n'
                     f"health: {{port: {port if taken == 'health' else 0}}}\nstreams: []\n")
        done = cli("run", "--config", str(path))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.splitlines()[-1]
    assert last.startswith(f"{path}: refusing to start: "), last
    assert f"127.0.0.1:{port}: Address already in use" in last
    assert ("publish.endpoint" if taken == "publish" else "health.port") in last
    assert "loading engine" not in done.stderr


@pytest.mark.slow
def test_ctrl_c_while_run_loads_the_engine_exits_at_once(tmp_path: Path) -> None:
    from cli_helpers import default_sigint, interrupt
    from daemon_helpers import build_tiny_engine

    engine = build_tiny_engine(tmp_path / "engine")
    path = write(tmp_path, f"engine: {{path: {engine}, device: cpu}}\n"
                 'publish: {endpoint: "tcp://127.0.0.1:0"}\nhealth: {port: 0}\nstreams: []\n')
    daemon = subprocess.Popen([*CLI, "run", "--config", str(path)], stderr=subprocess.PIPE,
                              text=True, preexec_fn=default_sigint)
    for line in daemon.stderr:
        if "loading engine" in line:
            break
    code, took = interrupt(daemon)
    log = daemon.stderr.read()
    assert code == 0, log[-2000:]
    assert took < 2.0, f"exited {took:.1f} s after SIGINT"
    assert "Traceback" not in log
