"""Shared by the CLI tests: Ctrl-C a real process and time how long it takes to go."""

from __future__ import annotations

import os
import signal
import subprocess
import time


def interrupt(proc: subprocess.Popen, *, group: bool = False,
              timeout: float = 60) -> tuple[int, float]:
    """Send SIGINT (to the process group, as a terminal's Ctrl-C does, when `group`; the process
    must lead its own session then) and wait: (exit code, seconds it took). Killed if it stays."""
    started = time.monotonic()
    if group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.wait()
    return code, time.monotonic() - started
