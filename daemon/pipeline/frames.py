"""Decoded frames and the per-stream slots between the sources and the batcher.

Real-time detection wants the newest picture, not every picture: a slot holds one frame per
stream and a newer frame replaces an unread one (counted as a drop), so a slow engine makes the
daemon skip frames instead of building latency. All slots share one condition variable so the
batcher sleeps until any stream has something new. When the engine cannot take every stream at
once, the streams that have waited longest since their slot filled go first: a replaced frame
keeps its stream's place in the queue, so no camera starves.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class Frame:
    """One decoded picture and where it came from.

    `pixels` is uint8 on the decoder's device: (H, W, 3) for rgb24, (H * 3 // 2, W) for nv12 (the
    Y plane on top of the interleaved UV plane, as NVDEC writes it).
    """

    stream: str
    index: int  # per stream, counts frames kept (after the fps cap), across reconnects
    pts: float | None  # stream presentation time, seconds
    capture_ns: int  # wall clock (time.time_ns) when the frame left the decoder
    pixels: torch.Tensor
    pixel_format: str
    height: int
    width: int
    decoded_mono: float = field(default_factory=time.monotonic)

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width


@dataclass
class SlotStats:
    put: int = 0
    taken: int = 0
    dropped: int = 0


class FrameSlots:
    """Latest-frame-wins slots, one per stream, behind one condition variable."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frames: dict[str, Frame] = {}
        self._waiting_since: dict[str, float] = {}  # when each full slot filled (monotonic)
        self._stats: dict[str, SlotStats] = {}

    def add(self, stream: str) -> None:
        with self._cond:
            self._stats.setdefault(stream, SlotStats())

    def remove(self, stream: str) -> None:
        with self._cond:
            self._frames.pop(stream, None)
            self._waiting_since.pop(stream, None)
            self._stats.pop(stream, None)

    def put(self, frame: Frame) -> bool:
        """Leave `frame` in its stream's slot; True when it replaced an unread one (a drop)."""
        with self._cond:
            stats = self._stats.get(frame.stream)
            if stats is None:  # the stream was removed while this frame was decoding
                return False
            stats.put += 1
            replaced = frame.stream in self._frames
            if replaced:
                stats.dropped += 1
            else:
                self._waiting_since[frame.stream] = frame.decoded_mono
            self._frames[frame.stream] = frame
            self._cond.notify_all()
            return replaced

    def streams(self) -> list[str]:
        with self._cond:
            return list(self._stats)

    def ready(self) -> int:
        with self._cond:
            return len(self._frames)

    def oldest(self) -> float | None:
        """Since when the longest-waiting stream has had a frame ready (monotonic), or None."""
        with self._cond:
            return min(self._waiting_since.values(), default=None)

    def wait(self, count: int, deadline: float, stop: threading.Event | None = None) -> int:
        """Sleep until `count` frames are ready, `deadline` (monotonic) passes or `stop` is set."""
        with self._cond:
            while len(self._frames) < count and not (stop is not None and stop.is_set()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.1))
            return len(self._frames)

    def take(self, limit: int) -> list[Frame]:
        """Remove and return up to `limit` frames, longest-waiting streams first."""
        with self._cond:
            streams = sorted(self._frames, key=self._waiting_since.__getitem__)[:limit]
            frames = [self._frames.pop(name) for name in streams]
            for name in streams:
                del self._waiting_since[name]
                self._stats[name].taken += 1
            return frames

    def stats(self, stream: str) -> SlotStats:
        with self._cond:
            s = self._stats.get(stream, SlotStats())
            return SlotStats(s.put, s.taken, s.dropped)

    def wake(self) -> None:
        """Wake a waiting batcher (used on shutdown)."""
        with self._cond:
            self._cond.notify_all()


class FpsCap:
    """Keep at most `max_fps` frames per second of one stream; None or 0 keeps everything.

    Frames are decoded anyway (inter-coded video needs every frame), so the cap saves the engine,
    not the decoder. It tracks an ideal schedule so a 30 fps camera capped at 10 keeps every third
    frame instead of drifting.
    """

    def __init__(self, max_fps: float | None) -> None:
        self.period = 1.0 / max_fps if max_fps else 0.0
        self._next = 0.0
        self.skipped = 0

    def allow(self, now: float | None = None) -> bool:
        if not self.period:
            return True
        now = time.monotonic() if now is None else now
        if now + 1e-4 < self._next:
            self.skipped += 1
            return False
        if now - self._next < self.period:
            self._next += self.period
        else:  # late by more than a period (start, stall, reconnect): restart the schedule
            self._next = now + self.period
        return True
