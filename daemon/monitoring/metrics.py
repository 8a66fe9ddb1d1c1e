"""Prometheus metrics of the service, in a registry of its own.

A dedicated CollectorRegistry (not prometheus_client's global one) keeps tests, two services in
one process and imported libraries from mixing series. Stream names are the only labels: never
URLs, which may carry credentials.

Series (all prefixed `codetr_stream_` except the standard `process_*` ones):
  per stream   frames_received_total, frames_decoded_total, frames_dropped_total,
               frames_published_total, reconnects_total, decode_errors_total,
               stream_connected, last_frame_age_seconds
  engine       batch_size, engine_latency_seconds, queue_wait_seconds, end_to_end_latency_seconds
  process      process_resident_memory_bytes, process_open_fds, process_threads,
               gpu_memory_reserved_bytes, gpu_memory_allocated_bytes
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator

from codetr_stream.daemon.monitoring.procstat import gpu_memory, sample_process
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "Metrics", "StreamMetrics"]

# `*_created` timestamps would double the series per camera, and counter resets already show
# restarts to Prometheus; prometheus_client only offers this switch process-wide.
disable_created_metrics()

# The classic text format: every Prometheus version and agent reads it, and our names are ASCII.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "codetr_stream"
# Seconds: 1 ms .. 5 s covers a CPU reference model and a GPU engine alike.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25,
                   0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
# Characters of a URL's scheme and userinfo: a label with them is a URL passed by mistake.
_URLISH = re.compile(r"[:/@]")


class StreamMetrics:
    """The series of one stream, bound to its label once (no label lookup per frame).

    After `Metrics.remove_stream` the object stays usable and shows nowhere: a removed camera's
    thread may still decode a frame, and the engine publish one, after a reload took it away.
    """

    def __init__(self, metrics: Metrics, name: str) -> None:
        self._metrics = metrics
        self.name = name
        self._received = metrics.frames_received.labels(name)
        self._decoded = metrics.frames_decoded.labels(name)
        self._dropped = metrics.frames_dropped.labels(name)
        self._published = metrics.frames_published.labels(name)
        self._reconnects = metrics.reconnects.labels(name)
        self._decode_errors = metrics.decode_errors.labels(name)
        self._connected = metrics.connected.labels(name)

    def received(self, n: int = 1) -> None:
        """Packets/frames taken from the camera (before decode)."""
        self._received.inc(n)

    def decoded(self, captured: float | None = None) -> None:
        """A frame came out of the decoder, captured at `captured` (on the metrics clock; default
        now): also restarts the last-frame-age clock from then."""
        self._decoded.inc()
        self._metrics._frame_seen(self, captured)

    def dropped(self, n: int = 1) -> None:
        """Frames discarded by policy: latest-wins replacement or the fps cap."""
        self._dropped.inc(n)

    def published(self, n: int = 1) -> None:
        self._published.inc(n)

    def reconnected(self) -> None:
        self._reconnects.inc()

    def decode_error(self) -> None:
        self._decode_errors.inc()

    def set_connected(self, connected: bool) -> None:
        self._connected.set(1 if connected else 0)


class _LiveGauges(Collector):
    """Values computed at scrape time: frame ages and process resources."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        age = GaugeMetricFamily(
            f"{PREFIX}_last_frame_age_seconds",
            "Seconds since the stream's last decoded frame (since it was added, before any)",
            labels=["stream"],
        )
        for name, seconds in self._metrics.last_frame_ages().items():
            age.add_metric([name], seconds)
        yield age

        sample = sample_process()
        yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size in bytes",
                                value=sample.rss_bytes)
        yield GaugeMetricFamily("process_open_fds", "Open file descriptors", value=sample.open_fds)
        yield GaugeMetricFamily("process_threads", "OS threads in the process",
                                value=sample.threads)
        reserved = GaugeMetricFamily(f"{PREFIX}_gpu_memory_reserved_bytes",
                                     "GPU memory held by torch's caching allocator",
                                     labels=["device"])
        allocated = GaugeMetricFamily(f"{PREFIX}_gpu_memory_allocated_bytes",
                                      "GPU memory in live torch tensors", labels=["device"])
        for device, (res, alloc) in gpu_memory().items():
            reserved.add_metric([str(device)], res)
            allocated.add_metric([str(device)], alloc)
        yield reserved
        yield allocated


class Metrics:
    """All series of one service. Thread-safe: sources, batcher and HTTP server share it."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._streams: dict[str, StreamMetrics] = {}
        self._last_frame: dict[str, float] = {}

        def per_stream(kind: type, name: str, doc: str) -> Counter | Gauge:
            return kind(f"{PREFIX}_{name}", doc, ["stream"], registry=self.registry)

        self.frames_received = per_stream(Counter, "frames_received", "Frames read from the camera")
        self.frames_decoded = per_stream(Counter, "frames_decoded", "Frames decoded")
        self.frames_dropped = per_stream(Counter, "frames_dropped",
                                         "Decoded frames dropped (latest-wins or fps cap)")
        self.frames_published = per_stream(Counter, "frames_published",
                                           "Detection messages published")
        self.reconnects = per_stream(Counter, "reconnects", "Reconnections to the camera")
        self.decode_errors = per_stream(Counter, "decode_errors", "Packets the decoder rejected")
        self.connected = per_stream(Gauge, "stream_connected", "1 while the camera is connected")
        self.batch_size = Histogram(f"{PREFIX}_batch_size", "Frames per engine call",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.engine_latency = Histogram(f"{PREFIX}_engine_latency_seconds",
                                        "Engine call time per batch (preprocess to results)",
                                        buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram(f"{PREFIX}_queue_wait_seconds",
                                    "Time a decoded frame waited for its batch",
                                    buckets=LATENCY_BUCKETS, registry=self.registry)
        self.end_to_end = Histogram(f"{PREFIX}_end_to_end_latency_seconds",
                                    "Capture wall-clock to publish, per frame",
                                    buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_LiveGauges(self))

    def stream(self, name: str) -> StreamMetrics:
        """The bound series of `name`, created on first use; the age clock starts now."""
        if not name or _URLISH.search(name):
            raise ValueError(
                f"stream name {name!r} is not a valid metric label: use the stream's `name` "
                "from streams.yaml (no ':', '/' or '@'), never its URL"
            )
        with self._lock:
            if name not in self._streams:
                self._streams[name] = StreamMetrics(self, name)
                self._last_frame[name] = self._clock()
            return self._streams[name]

    def remove_stream(self, name: str) -> None:
        """Drop a removed stream's series (reload): no stale series, no growth over reloads."""
        with self._lock:
            if self._streams.pop(name, None) is None:
                return
            del self._last_frame[name]
            for family in (self.frames_received, self.frames_decoded, self.frames_dropped,
                           self.frames_published, self.reconnects, self.decode_errors,
                           self.connected):
                family.remove(name)

    def _frame_seen(self, stream: StreamMetrics, captured: float | None) -> None:
        with self._lock:
            if self._streams.get(stream.name) is stream:  # removed (reload): stays removed
                self._last_frame[stream.name] = self._clock() if captured is None else captured

    def last_frame_ages(self) -> dict[str, float]:
        """Stream -> seconds since its last decoded frame."""
        now = self._clock()
        with self._lock:
            return {name: now - seen for name, seen in self._last_frame.items()}

    def observe_batch(self, size: int, latency_s: float) -> None:
        """One engine call: its batch size (real frames, not padding) and duration."""
        self.batch_size.observe(size)
        self.engine_latency.observe(latency_s)

    def observe_frame(self, queue_wait_s: float, end_to_end_s: float) -> None:
        """One published frame: wait from decode to batch start, and capture-to-publish."""
        self.queue_wait.observe(queue_wait_s)
        self.end_to_end.observe(end_to_end_s)

    def render(self) -> bytes:
        """The text exposition format, for GET /metrics (content type CONTENT_TYPE)."""
        return generate_latest(self.registry)
