"""Cross-camera batching: trade a bounded wait for fewer, larger engine calls.

The engine is compiled for a few batch sizes. A batch starts when the first frame is ready and
closes when every stream has a frame waiting (more cannot come: each stream holds at most one)
or `max_wait_ms` after that first frame was decoded, whichever is first. The batch then runs at
the smallest compiled size that holds it, the rest padded.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Sequence

from codetr_stream.daemon.pipeline.frames import Frame, FrameSlots


def pick_batch_size(n: int, batch_sizes: Sequence[int]) -> int:
    """The smallest compiled batch size >= n (sizes sorted ascending; n <= the largest)."""
    if not 1 <= n <= batch_sizes[-1]:
        raise ValueError(f"{n} frames do not fit the engine's batch sizes {list(batch_sizes)}")
    return batch_sizes[bisect.bisect_left(batch_sizes, n)]


class Batcher:
    """Pulls batches of frames out of `slots` for the runner."""

    def __init__(self, slots: FrameSlots, batch_sizes: Sequence[int], max_batch: int,
                 max_wait_ms: float) -> None:
        self.slots = slots
        self.max_batch = min(max_batch, max(batch_sizes))
        self.max_wait = max_wait_ms / 1000.0

    def next_batch(self, stop: threading.Event, idle_timeout: float = 0.5) -> list[Frame]:
        """Frames for one engine call; empty if nothing came within `idle_timeout` or on stop."""
        if self.slots.wait(1, time.monotonic() + idle_timeout, stop) == 0 or stop.is_set():
            return []
        first = self.slots.oldest() or time.monotonic()
        self.slots.wait(self._target(), first + self.max_wait, stop)
        return self.slots.take(self.max_batch)

    def ready(self) -> bool:
        """Whether `next_batch` would return a closed batch now, without waiting."""
        return self.slots.ready() >= self._target()

    def _target(self) -> int:
        """A batch closes early at this many frames: all streams, or the largest batch."""
        return min(self.max_batch, max(1, len(self.slots.streams())))
