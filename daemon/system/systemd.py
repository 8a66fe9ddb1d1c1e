"""systemd integration without python-systemd: sd_notify messages and a watchdog policy.

The protocol is one datagram of newline-separated `KEY=value` lines to the AF_UNIX socket in
$NOTIFY_SOCKET (a path, or '@name' for the abstract namespace). Outside systemd the variable
is unset and every call is a cheap no-op, so the service calls these unconditionally.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

from codetr_stream.daemon.config.secrets import redact

__all__ = [
    "WatchdogPolicy",
    "notify",
    "ready",
    "reloading",
    "status",
    "stopping",
    "watchdog_interval",
]


def _clean(message: str) -> str:
    # A newline inside a value would start a new assignment (e.g. a forged READY=1), and
    # STATUS shows in `systemctl status` and the journal: credentials are masked.
    key, sep, value = message.partition("=")
    if not sep or not key:
        raise ValueError(f"sd_notify message must be KEY=value, got {message!r}")
    return f"{key}={redact(' '.join(value.split()))}"


def notify(*messages: str) -> bool:
    """Send `KEY=value` messages in one datagram; False when not started by systemd.

    Errors sending are swallowed (returning False): losing a status line must never take the
    service down, and systemd's watchdog catches a socket that stays broken.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not messages:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    payload = "\n".join(_clean(m) for m in messages).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(payload, address)
    except OSError:
        return False
    return True


def ready(text: str = "serving") -> bool:
    """The engine is warm and streams are starting: systemd marks the unit started."""
    return notify("READY=1", f"STATUS={text}")


def status(text: str) -> bool:
    """A one-line status for `systemctl status` (never put URLs or secrets in it)."""
    return notify(f"STATUS={text}")


def reloading() -> bool:
    """Reload (SIGHUP) begins; call `ready()` when the new config is in force."""
    now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={now_us}")


def stopping() -> bool:
    """Shutdown begins: systemd stops expecting watchdog pings."""
    return notify("STOPPING=1", "STATUS=stopping")


def watchdog_interval() -> float | None:
    """Seconds systemd allows between WATCHDOG=1 pings, or None when no watchdog is set.

    Honors WATCHDOG_PID: the watchdog belongs to that process only (not to children).
    """
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


class WatchdogPolicy:
    """Feed systemd's watchdog only while the pipeline is doing its job.

    The main loop calls `progress()` after each batch leaves the engine and `tick(expecting)`
    on every iteration (including idle wake-ups of the batcher deadline). `expecting` is True
    when at least one stream is connected and delivering packets, i.e. frames should reach the
    engine. A ping is sent (at most every half interval) if the engine made progress within
    `stall_s`, or if no frames are expected: all streams disabled, or all reconnecting under
    their own backoff, which a restart would not fix. So a hung engine, a deadlocked batcher
    or a dead main loop stops the pings and systemd restarts the service.
    """

    def __init__(
        self,
        stall_s: float,
        *,
        interval_s: float | None = None,
        send: Callable[[], bool] = lambda: notify("WATCHDOG=1"),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if stall_s <= 0:
            raise ValueError(f"stall_s must be positive, got {stall_s}")
        self.stall_s = stall_s
        self.interval_s = watchdog_interval() if interval_s is None else interval_s
        self._send = send
        self._clock = clock
        self._last_progress = clock()
        self._last_ping = float("-inf")
        self._expecting = False

    def progress(self) -> None:
        """A batch went through the engine."""
        self._last_progress = self._clock()

    def tick(self, expecting_frames: bool) -> bool:
        """Ping if due and healthy; returns True when a ping was sent.

        When frames start being expected (a stream connects), the stall clock starts then, so
        the first frame gets `stall_s` to arrive.
        """
        now = self._clock()
        if expecting_frames and not self._expecting:
            self._last_progress = now
        self._expecting = expecting_frames
        stalled = expecting_frames and now - self._last_progress > self.stall_s
        if self.interval_s is None or stalled or now - self._last_ping < self.interval_s / 2:
            return False
        self._last_ping = now
        return self._send()
