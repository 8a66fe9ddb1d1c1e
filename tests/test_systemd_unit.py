"""The shipped systemd unit is valid for systemd itself, hardened, and wired for sd_notify.

`systemd-analyze verify` checks the real file (syntax, known keys, that ExecStart's binary
exists). It runs fine without systemd as PID 1 (as in CI's container) and, on this systemd
(Debian 12's 252), prints nothing for the unit: so any output at all fails the test, because
verify reports unknown keys and bad values as warnings with exit code 0.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "codetr-stream.service"


@pytest.fixture(scope="module")
def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze missing: .ci/system-packages must install `systemd`")
        pytest.skip("systemd-analyze not installed (Debian package `systemd`)")
    return tool


def _verify(analyze: str, unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True, text=True, timeout=60,
    )


def _settings(unit: Path) -> dict[str, list[str]]:
    """Key -> values in file order (systemd keys may repeat, so no configparser)."""
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        match = re.match(r"^([A-Za-z]+)=(.*)$", line)
        if match:
            found.setdefault(match[1], []).append(match[2])
    return found


def test_unit_passes_systemd_analyze_verify_without_warnings(analyze: str) -> None:
    result = _verify(analyze, UNIT)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_verify_reports_a_misspelled_key(analyze: str, tmp_path: Path) -> None:
    """Guards the test above: this systemd does flag mistakes in a copy of the unit."""
    broken = tmp_path / "codetr-stream.service"
    broken.write_text(UNIT.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    assert "Unknown key" in _verify(analyze, broken).stderr


def test_unit_exposure_stays_low(analyze: str) -> None:
    """systemd's own hardening score (0 best, 10 worst); 1.9 when written, fails above 2.5."""
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=25", "--no-pager", str(UNIT)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout[-2000:]


def test_unit_is_notify_with_watchdog_reload_and_restart() -> None:
    settings = _settings(UNIT)
    assert settings["Type"] == ["notify"]
    assert settings["NotifyAccess"] == ["main"]
    assert settings["WatchdogSec"]
    assert settings["Restart"] == ["on-failure"]
    assert "-HUP" in settings["ExecReload"][0]
    assert settings["ExecStart"][0].startswith("/usr/bin/env codetr-stream run --config ")


def test_unit_is_confined_to_its_state_cache_and_the_gpu() -> None:
    settings = _settings(UNIT)
    for key in ("DynamicUser", "NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert settings[key] == ["yes"], key
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["StateDirectory"] == settings["CacheDirectory"] == ["codetr-stream"]
    assert settings["DevicePolicy"] == ["closed"]
    allowed = " ".join(settings["DeviceAllow"])
    for device in ("/dev/nvidiactl", "/dev/nvidia-uvm", "char-nvidia-frontend"):
        assert device in allowed
    assert settings["LoadCredential"] and settings["EnvironmentFile"][0].startswith("-")


def test_unit_caps_files_tasks_and_memory_with_room_for_the_fd_budget() -> None:
    """LimitNOFILE covers the fd budget the daemon computes for a large site (500 cameras,
    default limits); TasksMax and MemoryMax are set (the unit's comment says how to size them)."""
    from codetr_stream.daemon.config.schema import DaemonConfig
    from codetr_stream.daemon.system import fd_budget

    settings = _settings(UNIT)
    site = DaemonConfig.model_validate({
        "engine": {"path": "/var/lib/codetr-stream/engines/e"},
        "streams": [{"name": f"cam{i}", "url": f"rtsp://10.0.0.{i % 250}/s"} for i in range(500)]})
    assert fd_budget.needed(site) <= int(settings["LimitNOFILE"][0])
    assert int(settings["TasksMax"][0]) >= 1024
    assert re.fullmatch(r"\d+G", settings["MemoryMax"][0])
