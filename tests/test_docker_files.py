"""The Docker image's files: lint-clean, complete build context, a working entrypoint and
HEALTHCHECK, checked without building the image: these run the real entrypoint script and the
real HEALTHCHECK command outside a container. tests/test_container.py builds and runs the image.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from codetr_stream.daemon.demo.rtsp_server import free_port
from codetr_stream.daemon.monitoring.health import HealthServer, Liveness, SnapshotStore
from codetr_stream.daemon.monitoring.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
BIN = Path(sys.executable).parent  # the venv's tools: codetr-stream, hadolint, shellcheck


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} missing from {BIN}: install the dev extra (`make venv`)")
    return str(path)


def instructions(keyword: str) -> list[str]:
    """Arguments of every `keyword` instruction, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [line.split(None, 1)[1] for line in text.splitlines()
            if line.split(None, 1)[:1] == [keyword]]


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([tool("hadolint"), "--no-color", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", sorted((ROOT / "docker").glob("*.sh")), ids=lambda p: p.name)
def test_scripts_pass_shellcheck(script: Path) -> None:
    result = subprocess.run([tool("shellcheck"), str(script)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_build_context_has_every_copied_path() -> None:
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for args in instructions("COPY"):
        parts = shlex.split(args)
        if any(p.startswith("--from") for p in parts):
            continue
        for source in parts[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            hidden = [p for p in ignored if fnmatch.fnmatch(source, p.removeprefix("**/"))]
            assert not hidden, f"COPY {source} is excluded by .dockerignore {hidden}"


def test_image_runs_as_a_numeric_non_root_user() -> None:
    (user,) = instructions("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def run_entrypoint(*args: str, tmp: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    environ.pop("CODETR_STREAM_COMPILE_ARGS", None)
    environ.update(env)
    return subprocess.run(["sh", str(ENTRYPOINT), *args], capture_output=True, text=True,
                          env=environ, cwd=tmp, timeout=120)


def write_config(tmp: Path, body: str = "") -> Path:
    """A config for the entrypoint: its camera a closed port, its ZeroMQ port any free one."""
    config = tmp / "streams.yaml"
    config.write_text(f"engine:\n  path: engines/tiny\n{body}"
                      "publish:\n  endpoint: 'tcp://127.0.0.1:*'\n"
                      f"streams:\n  - name: cam1\n    url: rtsp://127.0.0.1:{free_port()}/cam1\n")
    return config


def test_entrypoint_refuses_an_invalid_config_with_its_errors(tmp_path: Path) -> None:
    config = write_config(tmp_path, "batching:\n  max_bacth: 4\n")
    result = run_entrypoint("run", "--config", str(config), tmp=tmp_path)
    assert result.returncode == 2
    assert "max_bacth" in result.stderr and "not starting" in result.stderr


def test_entrypoint_says_how_to_provide_a_missing_engine(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = run_entrypoint("run", f"--config={config}", tmp=tmp_path)
    assert result.returncode == 2
    assert str(tmp_path / "engines" / "tiny") in result.stderr
    assert "CODETR_STREAM_COMPILE_ARGS" in result.stderr
    assert not (tmp_path / "engines").exists()


def test_entrypoint_passes_other_commands_through(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = run_entrypoint("check-config", str(config), tmp=tmp_path)
    assert result.returncode == 3, result.stderr  # valid; the engine is not built yet
    assert "run would refuse: engine:" in result.stderr and "cam1" in result.stdout


@pytest.mark.slow
def test_entrypoint_builds_the_engine_on_first_start_then_serves(tmp_path: Path) -> None:
    """The first-start path for real: compile (tiny model, CPU) into the state folder, then
    exec the daemon, which turns healthy and exits 0 on SIGTERM (it is the process we started).
    """
    port = free_port()
    config = write_config(tmp_path, f"  device: cpu\nhealth:\n  port: {port}\n")
    compile_args = (f"--config {ROOT / 'tests/data/tiny_config.json'} --random-weights "
                    "--backend eager --precision fp32 --batch 1 --size 64x64 --device cpu")
    environ = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
               "CODETR_STREAM_COMPILE_ARGS": compile_args}
    daemon = subprocess.Popen(["sh", str(ENTRYPOINT), "run", "--config", str(config)],
                              cwd=tmp_path, env=environ, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/healthz"
        deadline = time.monotonic() + 240
        while not healthy(url):
            assert daemon.poll() is None, daemon.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "not healthy within 240 s"
            time.sleep(0.5)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=10) == 0
    finally:
        daemon.kill()
        daemon.communicate()
    assert (tmp_path / "engines" / "tiny" / "manifest.json").is_file()
    assert not (tmp_path / "engines" / "tiny.partial").exists()


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:  # refused before the server starts, HTTPError 503 while starting
        return False


def healthcheck_command() -> list[str]:
    (args,) = instructions("HEALTHCHECK")
    return json.loads(args.split(" CMD ", 1)[1])


@pytest.mark.parametrize("healthy", [True, False])
def test_healthcheck_command_follows_healthz(healthy: bool) -> None:
    liveness = Liveness()
    if healthy:
        liveness.set_engine_warm()
        liveness.beat()
    with HealthServer(liveness=liveness, metrics=Metrics(), snapshots=SnapshotStore(),
                      port=0) as server:
        host, port = server.address
        command = healthcheck_command()
        assert command[0] == "python3"
        result = subprocess.run(
            [sys.executable, *command[1:]], capture_output=True, timeout=60,
            env={**os.environ, "CODETR_STREAM_HEALTH_URL": f"http://{host}:{port}/healthz"},
        )
    assert (result.returncode == 0) == healthy
