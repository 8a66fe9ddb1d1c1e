"""One camera: demux RTSP with PyAV, decode, hand frames to its slot; survive every fault.

Each source runs in its own thread, so a camera that is slow, dead or hostile only ever blocks
itself. Any failure (refused connection, wrong credentials, no video, garbage bytes, a socket that
goes quiet, a decoder error) ends the current connection; the source logs it once, with the URL's
credentials redacted, waits a jittered exponential backoff and connects again, until stopped.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import types
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

import torch
from codetr_stream.daemon.decode import UnsupportedStream, make_decoder
from codetr_stream.daemon.frames import FpsCap, Frame, FrameSlots
from codetr_stream.daemon.metrics import StreamMetrics
from codetr_stream.daemon.secrets import MASK, MIN_REDACTED_LENGTH, redact

log = logging.getLogger(__name__)


def redact_text(text: str, url: str) -> str:
    """`text` (an exception message, say) safe to log: URL userinfo and known secrets masked
    (`secrets.redact`), plus this URL's own user and password in any spelling, since FFmpeg may
    quote them outside a URL."""
    parts = urlsplit(url)
    for secret in (parts.password, parts.username):
        if secret and len(secret) >= MIN_REDACTED_LENGTH:
            for form in {secret, unquote(secret), quote(unquote(secret), safe="")}:
                text = text.replace(form, MASK)
    return redact(text)


_thread_stop = threading.local()  # the stop event of the source running on this thread
STOPPED_CLOCK_STEP_S = 1e9


def _stop_aware_monotonic() -> float:
    """`time.monotonic`, except that on a stopped source's thread every call jumps far ahead.
    PyAV's interrupt callback compares it with the clock at the start of the blocked call, so
    FFmpeg aborts any open or read of a stopped source within its ~100 ms polling slice instead
    of running out the camera's timeout (calls that start after the stop included)."""
    now = time.monotonic()
    stop = getattr(_thread_stop, "event", None)
    if stop is None or not stop.is_set():
        return now
    _thread_stop.jumps = getattr(_thread_stop, "jumps", 0) + 1
    return now + _thread_stop.jumps * STOPPED_CLOCK_STEP_S


def _make_reads_stoppable() -> None:
    """Point PyAV's timeout clock (the `time` its interrupt callback reads) at the stop-aware
    one. PyAV has no public way to interrupt a blocked call; without this (another PyAV layout)
    a stop waits for the read or open timeout, as before."""
    import av.container.core as core

    if getattr(core, "time", None) is time:
        core.time = types.SimpleNamespace(**{**vars(time), "monotonic": _stop_aware_monotonic})


@dataclass
class Backoff:
    """Jittered, bounded exponential backoff: initial * factor**n, capped, times 1 +- jitter."""

    initial: float = 0.5
    maximum: float = 3.0
    factor: float = 2.0
    jitter: float = 0.2
    attempts: int = 0

    def next_delay(self) -> float:
        delay = min(self.maximum, self.initial * self.factor ** self.attempts)
        self.attempts += 1
        return delay * random.uniform(1 - self.jitter, 1 + self.jitter)

    def reset(self) -> None:
        self.attempts = 0


@dataclass
class SourceSettings:
    """How one camera is read; the service builds it from the stream's config."""

    name: str
    url: str
    transport: str = "tcp"
    max_fps: float | None = None
    open_timeout: float = 5.0
    read_timeout: float = 2.0  # also bounds how long a stop waits for a blocked read
    stall_timeout: float = 5.0  # no decoded frame for this long: reconnect
    backoff: Backoff = field(default_factory=Backoff)


class StreamStalled(RuntimeError):
    """Packets may arrive, but no picture was decoded for `stall_timeout` seconds."""


@dataclass
class SourceStats:
    connected: bool = False
    packets: int = 0
    decoded: int = 0
    skipped: int = 0  # over the fps cap
    decode_errors: int = 0
    reconnects: int = 0
    last_frame_mono: float | None = None
    last_error: str | None = None  # redacted
    frame_interval: float = 0.0  # moving average, seconds

    @property
    def fps_in(self) -> float:
        return 1.0 / self.frame_interval if self.frame_interval else 0.0

    def last_frame_age(self, now: float | None = None) -> float | None:
        if self.last_frame_mono is None:
            return None
        return (time.monotonic() if now is None else now) - self.last_frame_mono


class Source:
    """The thread that keeps one camera flowing into `slots`."""

    def __init__(self, settings: SourceSettings, slots: FrameSlots, device: torch.device,
                 metrics: StreamMetrics, *, next_index: int = 0) -> None:
        self.settings = settings
        self.slots = slots
        self.metrics = metrics
        self.device = device
        self.next_index = next_index
        self.stats = SourceStats()
        self.safe_url = redact(settings.url)
        self._cap = FpsCap(settings.max_fps)
        # One CUDA stream for the camera's lifetime, shared by every decoder it rebuilds.
        self._cuda_stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"source-{settings.name}",
                                        daemon=True)
        slots.add(settings.name)

    @property
    def name(self) -> str:
        return self.settings.name

    def start(self) -> Source:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        _make_reads_stoppable()
        _thread_stop.event = self._stop
        backoff = self.settings.backoff
        while not self._stop.is_set():
            try:
                self._stream_once()
            except Exception as exc:  # every fault ends in this camera, never beyond
                self._failed(exc)
            self.stats.connected = False
            self.metrics.set_connected(False)
            if self._stop.is_set():
                break
            self.stats.reconnects += 1
            self.metrics.reconnected()
            self._stop.wait(backoff.next_delay())

    def _failed(self, exc: Exception) -> None:
        message = redact_text(f"{type(exc).__name__}: {exc}", self.settings.url)
        if message != self.stats.last_error:  # one line per new fault, not per retry
            log.warning("stream %s (%s): %s; reconnecting", self.name, self.safe_url, message)
        else:
            log.debug("stream %s: still failing: %s", self.name, message)
        self.stats.last_error = message

    def _open(self):
        import av

        s = self.settings
        options = {"analyzeduration": "0", "probesize": "32"}  # the SDP has the parameters;
        if s.url.startswith(("rtsp://", "rtsps://")):  # probing would cost seconds per connect
            options["rtsp_transport"] = s.transport
        return av.open(s.url, options=options, timeout=(s.open_timeout, s.read_timeout))

    def _stream_once(self) -> None:
        container = self._open()
        try:
            if self._stop.is_set():  # stopped while opening
                return
            if not container.streams.video:
                kinds = sorted({st.type for st in container.streams}) or ["nothing"]
                raise UnsupportedStream(f"no video stream (found {', '.join(kinds)})")
            video = container.streams.video[0]
            decoder = make_decoder(video, self.device, self._cuda_stream)
            log.info("stream %s connected: %s %dx%d (%s)", self.name, decoder.codec,
                     video.codec_context.width, video.codec_context.height, self.safe_url)
            self.stats.connected = True
            self.metrics.set_connected(True)
            connected_at = time.monotonic()
            last_picture = connected_at
            for packet in container.demux(video):
                if self._stop.is_set():
                    return
                now = time.monotonic()
                if now - last_picture > self.settings.stall_timeout:
                    raise StreamStalled(f"no picture for {now - last_picture:.1f} s")
                if packet.size == 0:
                    continue
                self.stats.packets += 1
                self.metrics.received()
                try:
                    pictures = decoder.decode(packet)
                except Exception as exc:  # corrupt data: count it, keep the connection
                    self.stats.decode_errors += 1
                    self.metrics.decode_error()
                    log.debug("stream %s: decode error %s", self.name, exc)
                    continue
                for picture in pictures:
                    last_picture = time.monotonic()
                    self._deliver(picture, last_picture)
                if self.stats.decoded and now - connected_at > 1.0:
                    self.settings.backoff.reset()  # a healthy connection earns a fresh backoff
            raise ConnectionError("stream ended")
        finally:
            container.close()

    def _deliver(self, picture, now: float) -> None:
        stats = self.stats
        if stats.last_frame_mono is not None:
            dt = now - stats.last_frame_mono
            stats.frame_interval = (0.9 * stats.frame_interval + 0.1 * dt
                                    if stats.frame_interval else dt)
        stats.last_frame_mono = now
        stats.decoded += 1
        self.metrics.decoded()
        if stats.last_error is not None:
            log.info("stream %s recovered", self.name)
            stats.last_error = None
        if not self._cap.allow(now):
            stats.skipped += 1
            self.metrics.dropped()
            return
        if self._stop.is_set():  # a replacement source may already own this stream's slot
            return
        frame = Frame(stream=self.name, index=self.next_index, pts=picture.pts,
                      capture_ns=time.time_ns(), pixels=picture.pixels,
                      pixel_format=picture.pixel_format, height=picture.height,
                      width=picture.width, decoded_mono=now)
        self.next_index += 1
        self.slots.put(frame)
