"""One camera while the service runs it: everything the daemon holds for a stream, in one object.

A `Stream` owns the camera's source thread, its slot on an engine worker, its metrics series,
health entry and snapshot, the selection its detections go through (score threshold and class
allow-list before NMS, resolved once per config; the ROI after), and the counters its heartbeats
report. The service adds, reconfigures and closes streams whole, so nothing of a removed camera
stays behind anywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from codetr_stream.daemon.config.schema import ReconnectConfig, StreamConfig
from codetr_stream.daemon.feed.messages import Detection, StreamStatus
from codetr_stream.daemon.monitoring.health import Liveness, SnapshotStore
from codetr_stream.daemon.monitoring.metrics import Metrics
from codetr_stream.daemon.pipeline.postprocess import FrameFilter, finish
from codetr_stream.daemon.pipeline.source import Backoff, Source, SourceSettings

if TYPE_CHECKING:
    import torch
    from codetr_stream.daemon.pipeline.frames import FrameSlots

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Lane:
    """Where a stream's frames go: the slots of one engine worker on one device, and the names
    of the streams it carries (new streams go to the least loaded)."""

    slots: FrameSlots
    device: torch.device
    streams: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Watchers:
    """What watches every stream: /metrics series, /healthz entries, /snapshot images."""

    metrics: Metrics
    liveness: Liveness
    snapshots: SnapshotStore


def source_settings(stream: StreamConfig, reconnect: ReconnectConfig) -> SourceSettings:
    return SourceSettings(
        name=stream.name, url=stream.url, transport=stream.transport, max_fps=stream.max_fps,
        open_timeout=reconnect.open_timeout_s, read_timeout=reconnect.read_timeout_s,
        stall_timeout=reconnect.stall_timeout_s,
        backoff=Backoff(reconnect.backoff_initial_s, reconnect.backoff_max_s,
                        reconnect.backoff_multiplier, reconnect.backoff_jitter))


class Stream:
    """One camera from its `start` to its `close`; `next_index` continues a replaced stream's
    frame indexes (a reload that reconnects it)."""

    def __init__(self, config: StreamConfig, *, reconnect: ReconnectConfig, lane: Lane,
                 watchers: Watchers, class_names: tuple[str, ...], next_index: int = 0) -> None:
        self.lane = lane
        self.class_names = class_names
        self._watchers = watchers
        self.metrics = watchers.metrics.stream(config.name)
        self.reconfigure(config)
        lane.slots.add(config.name)
        lane.streams.add(config.name)
        self.source = Source(source_settings(config, reconnect), lane.slots, lane.device,
                             self.metrics, next_index=next_index)
        self.open = True  # until `close`: frames of a closed stream are never published
        self.published = 0
        self._published_at_heartbeat = 0

    @property
    def name(self) -> str:
        return self.config.name

    def start(self) -> Stream:
        self.source.start()
        log.info("stream %s added (%s) on %s", self.name, self.config.safe_url, self.lane.device)
        return self

    def reconfigure(self, config: StreamConfig) -> None:
        """New filters for the running source (a change of source settings needs a new Stream)."""
        self.config = config
        self.filter = FrameFilter.of(config, self.class_names)

    def detections(self, rows: np.ndarray, frame_size: tuple[int, int]) -> list[Detection]:
        """This frame's rows from the engine's batch postprocessing (already thresholded,
        class-filtered and NMS'd there, with `filter`) -> the detections to publish."""
        return finish(rows, frame_size=frame_size, roi=self.config.roi,
                      class_names=self.class_names)

    def count_published(self) -> None:
        self.published += 1
        self.metrics.published()

    def heartbeat(self, now: float, interval: float) -> StreamStatus:
        """The status message of the last `interval` seconds; /healthz learns the same."""
        stats, slot = self.source.stats, self.lane.slots.stats(self.name)
        fps_out = (self.published - self._published_at_heartbeat) / interval
        self._published_at_heartbeat = self.published
        self._watchers.liveness.set_stream(
            self.name, "streaming" if stats.connected else "reconnecting", error=stats.last_error)
        return StreamStatus(
            stream=self.name, connected=stats.connected, fps_in=stats.fps_in, fps_out=fps_out,
            frames_in=stats.decoded, frames_dropped=slot.dropped + stats.skipped,
            frames_published=self.published, reconnects=stats.reconnects,
            last_frame_age_s=stats.last_frame_age(now), error=stats.last_error)

    def close(self) -> Source:
        """Stop the source and take the stream out of its lane, the metrics, /healthz and the
        snapshots. Returns the source, whose thread may still be ending (`Source.join`)."""
        self.open = False
        self.source.stop()
        self.lane.streams.discard(self.name)
        self.lane.slots.remove(self.name)
        self._watchers.metrics.remove_stream(self.name)
        self._watchers.liveness.remove_stream(self.name)
        self._watchers.snapshots.remove(self.name)
        return self.source
