"""The soak benchmark's short CI runs: real cameras dropping and returning, the real daemon on the
CPU path, no growth of memory, fds or threads, and nothing left behind at shutdown. Once with
GStreamer's RTSP server in the foreground, once through bench/device_soak.sh as the GPU machine
runs it (detached soak, replay RTSP servers, results collected by later calls)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_helpers import build_tiny_engine

ROOT = Path(__file__).resolve().parents[1]


def check_report(report: dict, cameras: set[str]) -> None:
    """A passing run in which churn really happened and every camera kept publishing."""
    assert report["failures"] == []
    assert report["done"]
    assert set(report["messages"]) == cameras
    assert sum(report["outages"].values()) >= 3  # every 6-12 s over ~50 s
    for name, outages in report["outages"].items():
        assert report["reconnects"][name] >= outages
    assert len(report["recoveries"]) >= 2
    measured = report["rows"][1:]
    assert len(measured) >= 3
    assert all(n > 0 for row in measured for n in row["messages"].values())
    assert report["probes"] >= 3 and report["probe_failures"] == []
    assert report["pixel_formats"] == ["rgb24"]  # the CPU path decodes with FFmpeg
    assert report["trend"]["fd_delta"] <= 0 and report["trend"]["thread_delta"] <= 0


@pytest.mark.slow
def test_short_soak_with_camera_churn_passes(tmp_path: Path) -> None:
    engine = build_tiny_engine(tmp_path / "tiny")
    out, markdown = tmp_path / "soak.json", tmp_path / "soak.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--engine", str(engine),
         "--device", "cpu", "--server", "gst", "--ci", "--out", str(out),
         "--markdown", str(markdown)],
        capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    check_report(report, {"cam000", "cam001"})
    assert report["server"] == "gst"
    assert len(report["samples"]) >= 40
    text = markdown.read_text()
    assert "| **verdict** | **PASS** |" in text and "### Detections per camera" in text


def device_soak(mode: str, *args: str, state: Path, out: Path) -> subprocess.CompletedProcess:
    out.mkdir(exist_ok=True)
    for old in out.iterdir():  # the device tool empties $OUT before each call
        old.unlink()
    env = {**os.environ, "SOAK_DIR": str(state), "OUT": str(out), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(ROOT / "bench" / "device_soak.sh"), mode, *args],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_device_soak_script_runs_detached_and_reports(tmp_path: Path) -> None:
    state, out = tmp_path / "state", tmp_path / "out"
    started = device_soak("start", "--tiny", "--device", "cpu", "--cameras", "2", "--size",
                          "320x240", "--minutes", "0.6", "--warmup", "12", "--table-every", "12",
                          "--churn-every", "6-10", "--down", "2", "--sample-every", "1",
                          "--max-growth", "0.25", state=state, out=out)
    try:
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        assert "soak running" in (out / "status.txt").read_text()
        assert (state / "engine-tiny" / "manifest.json").is_file()
        pid = int((state / "soak.pid").read_text())
        assert os.getsid(pid) != os.getsid(0)  # its own session: it outlives the call

        waited = device_soak("wait", "280", state=state, out=out)
        assert waited.returncode == 0, waited.stdout[-3000:] + waited.stderr[-3000:]
        assert "soak finished: exit 0 (PASS)" in waited.stdout
        assert {"status.txt", "progress.md", "samples.jsonl", "soak.log", "report.md",
                "result.json", "build.log"} <= {p.name for p in out.iterdir()}
        report = json.loads((out / "result.json").read_text())
        check_report(report, {"cam000", "cam001"})
        assert report["server"] == "replay"
        samples = (out / "samples.jsonl").read_text().splitlines()
        assert len(samples) >= 40 and "rss_bytes" in json.loads(samples[-1])

        again = device_soak("report", state=state, out=out)  # a later call still finds it all
        assert again.returncode == 0 and (out / "report.md").read_text() in again.stdout
    finally:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
            os.killpg(os.getpgid(int((state / "soak.pid").read_text())), signal.SIGKILL)
