"""The pid file `run` writes: atomic (a reader never sees it empty), never someone else's file,
never taken from a live daemon, removed at exit only while it is still ours."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import pytest
from codetr_stream.daemon.system.pidfile import PidFileError, daemon_pid, pid_file
from daemon_helpers import stand_in_daemon


def test_the_pid_file_is_never_seen_empty(tmp_path: Path) -> None:
    """A reader polling while the file is written and removed 200 times (and until it has
    read 200 times: on a loaded machine its thread may not get a turn for a while). Written in
    place, 20-30% of such reads saw it empty (`reload` would say 'does not hold a pid')."""
    path = tmp_path / "daemon.pid"
    seen: list[str] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            with contextlib.suppress(FileNotFoundError):
                seen.append(path.read_text())

    reader = threading.Thread(target=read)
    reader.start()
    writes, deadline = 0, time.monotonic() + 60
    try:
        while writes < 200 or len(seen) < 200:
            assert time.monotonic() < deadline, f"{len(seen)} reads in 60 s"
            with pid_file(path):
                time.sleep(0)  # the reader may look now, as `reload` would
            writes += 1
    finally:
        done.set()
        reader.join()
    assert set(seen) == {f"{os.getpid()}\n"}, f"{seen.count('')} empty of {len(seen)}"


def test_a_stale_pid_file_is_replaced_and_ours_removed_at_exit(tmp_path: Path) -> None:
    path = tmp_path / "daemon.pid"
    path.write_text("999999999\n")  # a process that is gone
    with pid_file(path):
        assert path.read_text() == f"{os.getpid()}\n"
        assert not list(tmp_path.glob(".*.tmp"))
    assert not path.exists()


def test_a_pid_file_someone_rewrote_is_left_in_place(tmp_path: Path) -> None:
    path = tmp_path / "daemon.pid"
    with pid_file(path):
        path.write_text("12345\n")  # another daemon took the path over
    assert path.read_text() == "12345\n"


def test_a_live_daemon_keeps_its_pid_file(tmp_path: Path) -> None:
    path = tmp_path / "daemon.pid"
    with stand_in_daemon() as other:
        path.write_text(f"{other.pid}\n")
        assert daemon_pid(path) == other.pid
        with pytest.raises(PidFileError, match=f"already running \\(pid {other.pid}\\)"), \
                pid_file(path):
            pass
        assert path.read_text() == f"{other.pid}\n"


def test_an_unwritable_pid_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "missing-dir" / "daemon.pid"
    with pytest.raises(PidFileError) as info, pid_file(path):
        pass
    assert str(info.value) == f"{path}: cannot write the pid file: No such file or directory"
