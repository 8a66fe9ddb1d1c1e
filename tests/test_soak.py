"""The soak benchmark's short CI run: real cameras dropping and returning, the real daemon on the
CPU path, no growth of memory, fds or threads, and nothing left behind at shutdown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_helpers import build_tiny_engine

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_short_soak_with_camera_churn_passes(tmp_path: Path) -> None:
    engine = build_tiny_engine(tmp_path / "tiny")
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--engine", str(engine),
         "--device", "cpu", "--ci", "--out", str(out)],
        capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    verdict = report["verdict"]
    assert verdict["failures"] == []
    assert verdict["outages"] >= 4  # every 8 s over 60 s: the churn really happened
    assert set(verdict["messages"]) == {"cam000", "cam001"}
    assert len(report["samples"]) >= 50
