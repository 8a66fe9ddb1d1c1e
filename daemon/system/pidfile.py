"""The pid file `run` writes (`pid_file:` in streams.yaml) so `codetr-stream reload` finds it.

It is written atomically, a temporary file renamed over it, so a reader never sees it empty or
half written; `run` refuses to start when a live codetr-stream holds it, and removes it at exit
only while it still holds its own pid. What the path may point at is checked with the config:
config.py refuses a path that holds anything but a pid file, so no file of someone else's is
ever overwritten or deleted.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["PidFileError", "daemon_pid", "pid_file"]


class PidFileError(RuntimeError):
    """The pid file cannot be written, or another daemon holds it; the message says which."""


def daemon_pid(path: Path) -> int:
    """The pid in `path`, checked to be a live codetr-stream process (pids get reused)."""
    try:
        pid = int(path.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        raise ProcessLookupError(f"{path}: no running daemon (start it with `run`)") from None
    except ValueError:
        raise ProcessLookupError(f"{path}: does not hold a pid") from None
    if b"codetr" not in cmdline:
        raise ProcessLookupError(f"{path}: pid {pid} is not codetr-stream (stale pid file)")
    return pid


@contextlib.contextmanager
def pid_file(path: Path | None) -> Iterator[None]:
    """This process's pid in `path` (nothing when None) for the duration of the block."""
    if path is None:
        yield
        return
    with contextlib.suppress(ProcessLookupError):
        if (other := daemon_pid(path)) != os.getpid():
            raise PidFileError(f"{path}: codetr-stream is already running (pid {other}); stop "
                               "it, or give this one another pid_file")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(f"{os.getpid()}\n")
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise PidFileError(f"{path}: cannot write the pid file: {exc.strerror}") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            if int(path.read_text().strip()) == os.getpid():
                path.unlink()
