"""The container image, built and run for real with podman.

`make image-cpu` builds the image from the Dockerfile on a debootstrapped Debian base with the CPU
build of torch (about 8 minutes the first time on 2 cores, seconds when cached); the container
then serves a real RTSP camera to a ZeroMQ subscriber on the host, as it would on a GPU host:
non-root under tini, read-only root filesystem, streams.yaml and a tiny engine mounted. Host
networking, because the test's camera and subscriber listen on the host's loopback. Skipped
where podman is absent or the user is not root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from codetr_stream.daemon.demo.rtsp_server import RtspServer, free_port
from fault_helpers import Recorder, build_small_engine, write_streams_yaml

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "localhost/codetr-stream:cpu"  # the Makefile's IMAGE_CPU
ENGINE = Path("/var/lib/codetr-stream/engines/tiny")  # inside the container, in the state volume
# The daemon's side of the image: its config, its engine, a tmpfs /tmp as in deploy/k8s; the
# image's VOLUMEs (/var/lib/codetr-stream, /var/cache/codetr-stream) stay writable.
READ_ONLY = ["--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp"]

pytestmark = [
    pytest.mark.container,
    pytest.mark.slow,
    pytest.mark.timeout(1800),  # a first build (base image and torch layer) takes ~8 min
    pytest.mark.skipif(shutil.which("podman") is None or os.geteuid() != 0,
                       reason="needs podman as root (the base image is debootstrapped): "
                              "`apt-get install podman runc debootstrap`; README: Container image"),
]


def podman(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """podman with the repository's containers.conf (no default ulimits: see that file)."""
    env = {**os.environ, "CONTAINERS_CONF": str(ROOT / "docker" / "containers.conf")}
    return subprocess.run(["podman", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def image() -> str:
    env = {**os.environ, "CONTAINERS_CONF": str(ROOT / "docker" / "containers.conf")}
    build = subprocess.run(["make", "-s", "image-cpu", f"IMAGE_CPU={IMAGE}"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=1500)
    assert build.returncode == 0, (build.stdout + build.stderr)[-4000:]
    return IMAGE


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = build_small_engine(tmp_path_factory.mktemp("engine") / "tiny")
    out.chmod(0o755)  # read by the container's user 10001
    return out


def config_dir(tmp_path: Path) -> Path:
    etc = tmp_path / "etc"
    etc.mkdir(mode=0o755)
    etc.chmod(0o755)
    return etc


class Container:
    """A named container of the image, removed with its anonymous volumes on exit."""

    def __init__(self, image: str, *options: str) -> None:
        self.name = f"codetr-test-{uuid.uuid4().hex[:10]}"
        self.argv = ["run", "-d", "--name", self.name, *options, image]

    def __enter__(self) -> Container:
        started = podman(*self.argv)
        assert started.returncode == 0, started.stderr
        return self

    def __exit__(self, *exc: object) -> None:
        podman("rm", "-f", "-v", self.name)

    def logs(self) -> str:
        out = podman("logs", self.name)
        return out.stdout + out.stderr

    def inspect(self, template: str) -> str:
        return podman("inspect", self.name, "--format", template).stdout.strip()

    def wait_for(self, condition: Callable[[], object], timeout: float, what: str) -> None:
        """Poll `condition` until it holds; fail with the container's log on timeout or exit."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline or self.inspect("{{.State.Running}}") != "true":
                raise AssertionError(f"no {what} within {timeout:g} s; container log:\n"
                                     f"{self.logs()[-4000:]}")
            time.sleep(0.5)

    def processes(self) -> list[list[str]]:
        """[user, pid, ppid, args] of every process in the container."""
        top = podman("top", self.name, "user", "pid", "ppid", "args")
        assert top.returncode == 0, top.stderr
        return [line.split(None, 3) for line in top.stdout.splitlines()[1:]]


def baseline_diff(image: str, *options: str) -> set[str]:
    """What podman itself changes in a container's filesystem with these options (mount points
    for /etc/hosts and friends): the daemon's container may change nothing beyond it."""
    name = f"codetr-test-{uuid.uuid4().hex[:10]}"
    try:
        ran = podman("run", "--name", name, "--entrypoint", "true", *options, image)
        assert ran.returncode == 0, ran.stderr
        return set(podman("diff", name).stdout.splitlines())
    finally:
        podman("rm", "-f", "-v", name)


def test_image_serves_the_host_reloads_on_sighup_and_stops_cleanly(image, engine, tmp_path):
    """Detections on the host, the HEALTHCHECK, SIGHUP through tini adding a camera, `podman
    stop` exiting 0 within 5 s, and no write outside the volumes."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    health_port = free_port()
    etc = config_dir(tmp_path)
    options = [*READ_ONLY, "--network", "host",
               "-v", f"{etc}:/etc/codetr-stream:ro", "-v", f"{engine}:{ENGINE}:ro",
               "-e", f"CODETR_STREAM_HEALTH_URL=http://127.0.0.1:{health_port}/healthz"]
    with contextlib.ExitStack() as stack:
        camera = stack.enter_context(RtspServer(["cam1=h264:320x240@5/ball",
                                                 "cam2=h264:320x240@5/smpte"]))
        recorder = Recorder(endpoint).start()
        stack.callback(recorder.stop)
        streams = {"cam1": camera.url("cam1")}
        write_streams_yaml(etc / "streams.yaml", ENGINE, streams, endpoint=endpoint,
                           health_port=health_port)
        container = stack.enter_context(Container(image, *options))
        container.wait_for(lambda: len(recorder.det("cam1")) >= 3, 240,
                           "detections of cam1 on the host")

        processes = container.processes()
        assert {user for user, *_ in processes} == {"codetr-stream"}, processes
        assert processes[0][1:3] == ["1", "0"], processes
        assert processes[0][3].startswith("/usr/bin/tini -- "), processes
        daemons = [p for p in processes[1:] if "codetr-stream run --config" in p[3]]
        assert [p[2] for p in daemons] == ["1"], processes  # exec'd by the entrypoint

        container.wait_for(lambda: podman("healthcheck", "run", container.name).returncode == 0,
                           60, "healthy HEALTHCHECK")

        before = recorder.det("cam1")[-1].payload["frame_index"]
        streams["cam2"] = camera.url("cam2")
        write_streams_yaml(etc / "streams.yaml", ENGINE, streams, endpoint=endpoint,
                           health_port=health_port)
        hup = podman("kill", "--signal", "HUP", container.name)
        assert hup.returncode == 0, hup.stderr
        container.wait_for(lambda: len(recorder.det("cam2")) >= 3, 60,
                           "detections of cam2 after SIGHUP")
        # The same daemon process: the untouched camera kept its frame count.
        assert recorder.det("cam1")[-1].payload["frame_index"] > before

        asked = time.time_ns()
        stopped = podman("stop", "--time", "10", container.name)
        assert stopped.returncode == 0, stopped.stderr
        took = (int(container.inspect("{{.State.FinishedAt.UnixNano}}")) - asked) / 1e9
        code = container.inspect("{{.State.ExitCode}}")
        log = container.logs()
        changed = set(podman("diff", container.name).stdout.splitlines())

    assert code == "0", log[-4000:]
    assert took < 5.0, f"exited {took:.1f} s after `podman stop`"
    assert "stopped" in log and "Traceback" not in log, log[-4000:]
    assert changed <= baseline_diff(image, *options), changed


def test_image_refuses_a_missing_engine_in_one_line(image, tmp_path):
    etc = config_dir(tmp_path)
    absent = ENGINE.parent / "absent"
    write_streams_yaml(etc / "streams.yaml", absent, {"cam1": "rtsp://127.0.0.1:9/cam1"},
                       endpoint="tcp://127.0.0.1:5555", health_port=8090)
    ran = podman("run", "--rm", "--network", "none", "--no-healthcheck", *READ_ONLY,
                 "-v", f"{etc}:/etc/codetr-stream:ro", image)
    assert ran.returncode == 2, ran.stderr
    # check-config's summary (the entrypoint logs it first), then the one-line refusal.
    last = ran.stderr.strip().splitlines()[-1]
    assert last.startswith(f"entrypoint: no engine at {absent} "), ran.stderr
    assert "CODETR_STREAM_COMPILE_ARGS" in last and "codetr-stream compile" in last
    assert "Traceback" not in ran.stderr
