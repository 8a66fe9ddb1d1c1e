"""Metrics render in Prometheus' text format, per stream, without URLs, and track the process."""

from __future__ import annotations

import threading

import pytest
from codetr_stream.daemon.monitoring.metrics import Metrics
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families


def scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse the exposition with Prometheus' own parser: (sample name, labels) -> value."""
    values = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def one(metrics: Metrics, name: str, **labels: str) -> float:
    return scrape(metrics)[(name, tuple(sorted(labels.items())))]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_stream_counters_are_separate_per_stream() -> None:
    metrics = Metrics()
    cam1, cam2 = metrics.stream("cam1"), metrics.stream("cam2")
    cam1.received(5)
    for _ in range(4):
        cam1.decoded()
    cam1.dropped(2)
    cam1.published(2)
    cam2.reconnected()
    cam2.decode_error()
    cam2.set_connected(True)
    assert one(metrics, "codetr_stream_frames_received_total", stream="cam1") == 5
    assert one(metrics, "codetr_stream_frames_decoded_total", stream="cam1") == 4
    assert one(metrics, "codetr_stream_frames_dropped_total", stream="cam1") == 2
    assert one(metrics, "codetr_stream_frames_published_total", stream="cam1") == 2
    assert one(metrics, "codetr_stream_frames_received_total", stream="cam2") == 0
    assert one(metrics, "codetr_stream_reconnects_total", stream="cam2") == 1
    assert one(metrics, "codetr_stream_decode_errors_total", stream="cam2") == 1
    assert one(metrics, "codetr_stream_stream_connected", stream="cam2") == 1
    assert one(metrics, "codetr_stream_stream_connected", stream="cam1") == 0
    assert metrics.stream("cam1") is cam1
    assert not [name for name, _ in scrape(metrics) if name.endswith("_created")]


def test_last_frame_age_counts_from_the_last_decoded_frame() -> None:
    clock = Clock()
    metrics = Metrics(clock=clock)
    cam = metrics.stream("cam1")
    clock.now += 7  # never decoded: the age runs from when the stream was added
    assert one(metrics, "codetr_stream_last_frame_age_seconds", stream="cam1") == 7
    cam.decoded()
    clock.now += 1.5
    assert metrics.last_frame_ages() == {"cam1": 1.5}
    assert one(metrics, "codetr_stream_last_frame_age_seconds", stream="cam1") == 1.5


def test_removed_stream_leaves_no_series() -> None:
    metrics = Metrics()
    metrics.stream("gone").received()
    metrics.stream("kept").received()
    metrics.remove_stream("gone")
    metrics.remove_stream("never-added")
    labels = {dict(key[1]).get("stream") for key in scrape(metrics)}
    assert "gone" not in labels and "kept" in labels
    assert metrics.last_frame_ages().keys() == {"kept"}


def test_a_removed_stream_stays_removed_when_its_thread_still_reports() -> None:
    """A reload removes a camera while its thread decodes and the engine publishes its last
    frame: the handles they hold must not bring the series back (last_frame_age_seconds of a
    removed camera kept growing after a reload)."""
    metrics = Metrics()
    cam = metrics.stream("cam2")
    cam.decoded()
    metrics.remove_stream("cam2")
    cam.decoded()
    cam.received()
    cam.published()
    cam.set_connected(True)
    assert "cam2" not in metrics.render().decode()
    assert metrics.last_frame_ages() == {}
    again = metrics.stream("cam2")  # re-added by a later reload: a fresh series
    cam.decoded()  # the old thread's late frame does not count for the new one
    assert again is not cam
    assert 'frames_decoded_total{stream="cam2"} 0.0' in metrics.render().decode()


@pytest.mark.parametrize("name", ["rtsp://admin:hunter2@10.0.0.7/stream1", "admin@cam", ""])
def test_urls_are_refused_as_labels(name: str) -> None:
    metrics = Metrics()
    with pytest.raises(ValueError, match="never its URL"):
        metrics.stream(name)
    assert "hunter2" not in metrics.render().decode()


def test_engine_histograms() -> None:
    metrics = Metrics()
    metrics.observe_batch(4, 0.030)
    metrics.observe_batch(1, 0.012)
    metrics.observe_frame(queue_wait_s=0.004, end_to_end_s=0.080)
    assert one(metrics, "codetr_stream_batch_size_count") == 2
    assert one(metrics, "codetr_stream_batch_size_sum") == 5
    assert one(metrics, "codetr_stream_batch_size_bucket", le="2.0") == 1
    assert one(metrics, "codetr_stream_engine_latency_seconds_sum") == pytest.approx(0.042)
    assert one(metrics, "codetr_stream_queue_wait_seconds_count") == 1
    assert one(metrics, "codetr_stream_end_to_end_latency_seconds_bucket", le="0.1") == 1
    assert one(metrics, "codetr_stream_end_to_end_latency_seconds_bucket", le="0.075") == 0


def test_process_gauges_follow_fds_and_threads(tmp_path) -> None:
    metrics = Metrics()
    before = scrape(metrics)
    files = [open(tmp_path / f"f{i}", "w") for i in range(16)]  # noqa: SIM115
    stop = threading.Event()
    threads = [threading.Thread(target=stop.wait) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        during = scrape(metrics)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        for f in files:
            f.close()
    key = ("process_open_fds", ())
    assert during[key] - before[key] >= 16
    assert during[("process_threads", ())] - before[("process_threads", ())] >= 3
    assert during[("process_resident_memory_bytes", ())] > 10 * 2**20


def test_registry_is_private() -> None:
    first, second = Metrics(), Metrics()
    first.stream("cam1").received()
    assert one(second, "codetr_stream_batch_size_count") == 0
    assert ("codetr_stream_frames_received_total", (("stream", "cam1"),)) not in scrape(second)
    assert REGISTRY.get_sample_value("codetr_stream_frames_received_total",
                                     {"stream": "cam1"}) is None
