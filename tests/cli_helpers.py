"""Shared by the CLI tests: Ctrl-C a real process and time how long it takes to go."""

from __future__ import annotations

import os
import signal
import subprocess
import time


def default_sigint() -> None:
    """`Popen(preexec_fn=default_sigint)` for a process the test Ctrl-Cs: SIGINT back to its
    default in the child. A suite started as a background job of a script (bash ignores SIGINT
    for `&` jobs without job control) passes that on, and a Python started with SIGINT ignored
    never raises KeyboardInterrupt: the test would wait for an exit that cannot come."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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
