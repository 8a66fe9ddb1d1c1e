"""One camera: demux RTSP with PyAV, decode, hand frames to its slot; survive every fault.

Each source runs in its own thread, so a camera that is slow, dead or hostile only ever blocks
itself. Any failure (refused connection, wrong credentials, no video, garbage bytes, a socket that
goes quiet, a decoder error) ends the current connection; the source logs it once, with the URL's
credentials redacted, waits a jittered exponential backoff and connects again, until stopped.

A connected camera that stops sending pictures is caught by a watchdog in FFmpeg's own interrupt
check, not at the next packet: past `stall_timeout` without a picture any blocked read is aborted.
`file://` sources play at their frame rate and start again from the top after the backoff.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from codetr_stream.daemon.config.secrets import redact, redact_text
from codetr_stream.daemon.monitoring.metrics import StreamMetrics
from codetr_stream.daemon.pipeline.decode import UnsupportedStream, make_decoder
from codetr_stream.daemon.pipeline.frames import FpsCap, Frame, FrameSlots

log = logging.getLogger(__name__)

# The source on this thread: its `stop` event and the `timeline` of its connection (or None).
_thread_state = threading.local()
STOPPED_CLOCK_STEP_S = 1e9
# A picture that comes this much later than its timestamp says, after the one before it, was held
# back (FFmpeg's parser keeps the last packet until the next one starts: when none comes, it
# hands it over at the read timeout, seconds late). It keeps the time its timestamp gives.
LATE_S = 0.5
MAX_PACE_S = 1.0  # a file's timestamps jumping further ahead than this restart its pacing


def _interruptible_monotonic() -> float:
    """`time.monotonic`, except that on the thread of a source that is stopped, or whose stall
    deadline has passed, every call jumps far ahead. PyAV's interrupt callback compares it with
    the clock at the start of the blocked call, so FFmpeg aborts that open or read within its
    ~100 ms polling slice instead of running out the camera's timeout."""
    now = time.monotonic()
    stop = getattr(_thread_state, "stop", None)
    timeline = getattr(_thread_state, "timeline", None)
    if not ((stop is not None and stop.is_set())
            or (timeline is not None and now > timeline.deadline)):
        return now
    _thread_state.jumps = getattr(_thread_state, "jumps", 0) + 1
    return now + _thread_state.jumps * STOPPED_CLOCK_STEP_S


def _make_reads_interruptible() -> None:
    """Point PyAV's timeout clock (the `time` its interrupt callback reads) at the interruptible
    one. PyAV has no public way to interrupt a blocked call; without this (another PyAV layout)
    a stop or a stall waits for the read or open timeout, as before."""
    import av.container.core as core

    if getattr(core, "time", None) is time:
        core.time = types.SimpleNamespace(**{**vars(time), "monotonic": _interruptible_monotonic})


@dataclass
class Backoff:
    """Jittered, bounded exponential backoff: initial, times factor after each failure up to
    maximum, each wait times 1 +- jitter. The wait itself is carried from one failure to the
    next (not recomputed as initial * factor**n, whose 2.0**1024 raised OverflowError and ended
    the camera's thread after 1,024 failures in a row), so any outage and any factor stay finite.
    """

    initial: float = 0.5
    maximum: float = 3.0
    factor: float = 2.0
    jitter: float = 0.2
    attempts: int = 0
    _delay: float = field(default=0.0, init=False, repr=False)

    def next_delay(self) -> float:
        self._delay = (self.initial if self.attempts == 0
                       else min(self.maximum, self._delay * self.factor))
        self.attempts += 1
        return self._delay * random.uniform(1 - self.jitter, 1 + self.jitter)

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


class EndOfFile(ConnectionError):
    """A file source played to its end: not a fault, it plays again after the backoff."""


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


class _Timeline:
    """When the pictures of one connection were captured, and the stall deadline they set.

    A picture's time is when it came out of the decoder, unless it came more than LATE_S after
    its predecessor's time plus the step between their timestamps: then it was held back, and it
    gets that time instead of passing for a fresh frame. A late picture does not put the stall
    deadline off either. `pace` makes a file play at its frame rate.
    """

    def __init__(self, stall_timeout: float, frame_interval: float, now: float) -> None:
        self.stall_timeout = stall_timeout
        self.frame_interval = frame_interval  # for pictures without a timestamp
        self.deadline = now + stall_timeout  # the first picture gets as long as any other
        self._last: tuple[float, float | None] | None = None  # (time, pts) of the last picture
        self._origin: float | None = None  # file pacing: wall time of pts 0
        self._paced_pts = -frame_interval  # file pacing: the last picture's timestamp

    def captured(self, pts: float | None, now: float) -> float:
        """The time (monotonic) the picture with `pts`, decoded `now`, was captured."""
        at = now
        if self._last is not None and pts is not None and self._last[1] is not None:
            last_at, last_pts = self._last
            expected = last_at + (pts - last_pts)
            if pts > last_pts and now - expected > LATE_S:
                at = expected
        self._last = (at, pts)
        self.deadline = at + self.stall_timeout
        return at

    def pace(self, pts: float | None, stop: threading.Event) -> None:
        """Wait until the picture with `pts` (None: one frame after the last) is due, counting
        from the first one."""
        pts = self._paced_pts + self.frame_interval if pts is None else pts
        self._paced_pts = pts
        now = time.monotonic()
        if self._origin is None or not -MAX_PACE_S <= self._origin + pts - now <= MAX_PACE_S:
            self._origin = now - pts  # the first picture, or the timestamps jumped
        stop.wait(max(0.0, self._origin + pts - now))


class Source:
    """The thread that keeps one camera flowing into `slots`.

    `wait(seconds)` is how it waits between connections (the stop event's wait; a test passes a
    fake clock's to drive thousands of reconnects without sleeping).
    """

    def __init__(self, settings: SourceSettings, slots: FrameSlots, device: torch.device,
                 metrics: StreamMetrics, *, next_index: int = 0,
                 wait: Callable[[float], object] | None = None) -> None:
        self.settings = settings
        self.slots = slots
        self.metrics = metrics
        self.device = device
        self.next_index = next_index
        self.stats = SourceStats()
        self.safe_url = redact(settings.url)
        self.is_file = settings.url.startswith("file:")
        self._cap = FpsCap(settings.max_fps)
        # One CUDA stream for the camera's lifetime, shared by every decoder it rebuilds.
        self._cuda_stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        self._stop = threading.Event()
        self._wait = wait or self._stop.wait
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
        _make_reads_interruptible()
        _thread_state.stop = self._stop
        backoff = self.settings.backoff
        while not self._stop.is_set():
            try:
                self._stream_once()
            except EndOfFile:
                log.debug("stream %s: end of file, playing it again", self.name)
            except Exception as exc:  # every fault ends in this camera, never beyond
                self._failed(exc)
            self.stats.connected = False
            self.metrics.set_connected(False)
            if self._stop.is_set():
                break
            self.stats.reconnects += 1
            self.metrics.reconnected()
            self._wait(backoff.next_delay())

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
            # Reconnects after a fault, and a file's replays, are not news: the fault was.
            first = self.stats.reconnects == 0 or self.stats.last_error is not None
            log.log(logging.INFO if first else logging.DEBUG, "stream %s connected: %s %dx%d (%s)",
                    self.name, decoder.codec, video.codec_context.width,
                    video.codec_context.height, self.safe_url)
            self.stats.connected = True
            self.metrics.set_connected(True)
            rate = video.average_rate or video.guessed_rate
            timeline = _Timeline(self.settings.stall_timeout, 1 / float(rate) if rate else 0.04,
                                 time.monotonic())
            _thread_state.timeline = timeline  # the watchdog is on from here
            self._read(container, video, decoder, timeline)
        finally:
            _thread_state.timeline = None
            container.close()

    def _read(self, container, video, decoder, timeline: _Timeline) -> None:
        """Demux and decode until the stream ends, stalls or the source is stopped."""
        connected_at = time.monotonic()
        pictures = 0
        try:
            for packet in container.demux(video):
                if self._stop.is_set():
                    return
                now = time.monotonic()
                if now > timeline.deadline:
                    raise StreamStalled(f"no picture for {self.settings.stall_timeout:.1f} s")
                if packet.size == 0:
                    continue
                self.stats.packets += 1
                self.metrics.received()
                try:
                    decoded = decoder.decode(packet)
                except Exception as exc:  # corrupt data: count it, keep the connection
                    self.stats.decode_errors += 1
                    self.metrics.decode_error()
                    log.debug("stream %s: decode error %s", self.name, exc)
                    continue
                for picture in decoded:
                    if self.is_file:
                        timeline.pace(picture.pts, self._stop)
                    now = time.monotonic()
                    self._deliver(picture, timeline.captured(picture.pts, now), now)
                    pictures += 1
                if pictures and now - connected_at > 1.0:
                    self.settings.backoff.reset()  # a healthy connection earns a fresh backoff
        except Exception:
            if not self._stop.is_set() and time.monotonic() > timeline.deadline:
                raise StreamStalled(  # the watchdog aborted a blocked read
                    f"no picture for {self.settings.stall_timeout:.1f} s") from None
            raise
        if self.is_file:
            raise EndOfFile("end of file")
        raise ConnectionError("stream ended")

    def _deliver(self, picture, captured: float, now: float) -> None:
        """Hand over a picture captured at `captured` (monotonic), decoded `now`."""
        stats = self.stats
        if stats.last_frame_mono is not None:
            dt = captured - stats.last_frame_mono
            stats.frame_interval = (0.9 * stats.frame_interval + 0.1 * dt
                                    if stats.frame_interval else dt)
        stats.last_frame_mono = captured
        stats.decoded += 1
        self.metrics.decoded(captured)
        if stats.last_error is not None:
            log.info("stream %s recovered", self.name)
            stats.last_error = None
        if not self._cap.allow(now):
            stats.skipped += 1
            self.metrics.dropped()
            return
        if self._stop.is_set():  # a replacement source may already own this stream's slot
            return
        capture_ns = time.time_ns() - round((now - captured) * 1e9)
        frame = Frame(stream=self.name, index=self.next_index, pts=picture.pts,
                      capture_ns=capture_ns, pixels=picture.pixels,
                      pixel_format=picture.pixel_format, height=picture.height,
                      width=picture.width, decoded_mono=now)
        self.next_index += 1
        if self.slots.put(frame):  # an unread frame replaced: latest wins
            self.metrics.dropped()
