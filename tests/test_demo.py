"""`make demo` as a newcomer runs it: without GStreamer (the fallback servers), two distinct
cameras, labelled columns, and `--seconds 0` running until Ctrl-C."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cli_helpers import default_sigint, interrupt

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_without_gstreamer_runs_until_ctrl_c(tmp_path: Path) -> None:
    env = {**os.environ, "CODETR_GST_PYTHON": sys.executable}  # a Python without GObject
    proc = subprocess.Popen([sys.executable, "-m", "codetr_stream.daemon.demo", "--seconds", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True, preexec_fn=default_sigint)
    out: list[str] = []
    sizes = {"cam1": "320x240", "cam2": "352x288"}
    seen: set[str] = set()
    both = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            out.append(line)
            fields = line.split()
            if len(fields) > 2 and sizes.get(fields[0]) == fields[2]:
                seen.add(fields[0])
                if seen == set(sizes):
                    both.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    both.wait(240)
    time.sleep(1)  # still running after the first lines: --seconds 0 means until Ctrl-C
    running = proc.poll() is None
    code, _ = interrupt(proc, group=True, timeout=30)
    reader.join(timeout=10)
    assert both.is_set() and running, "".join(out)[-3000:]
    stdout, stderr = "".join(out), proc.stderr.read()
    assert code == 0, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stdout + stderr
    [fallback] = [line for line in stdout.splitlines() if "GStreamer" in line]
    assert fallback.startswith("GStreamer's RTSP server is not available (")
    assert "stream frame     size  boxes    latency  top detections" in stdout
    assert " ms  " in stdout and "stopping (Ctrl-C)" in stdout
    assert "daemon exited with 0" in stdout
