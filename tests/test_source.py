"""Camera sources against a real RTSP server: decode, reconnect, stall, resolution change."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from codetr_stream.daemon.frames import FrameSlots
from codetr_stream.daemon.metrics import Metrics
from codetr_stream.daemon.source import Backoff, Source, SourceSettings
from rtsp_server import RtspServer

CPU = torch.device("cpu")


class Collector:
    """Sources feeding one slot set, drained in the background of the test's own polling."""

    def __init__(self) -> None:
        self.slots = FrameSlots()
        self.metrics = Metrics()
        self.sources: list[Source] = []
        self.frames: dict[str, list] = {}
        self.arrivals: dict[str, list[float]] = {}

    def add(self, name: str, url: str, **settings) -> Source:
        source = Source(SourceSettings(name, url, **settings), self.slots, CPU,
                        self.metrics.stream(name)).start()
        self.sources.append(source)
        return source

    def drain(self, seconds: float, until=None) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (until and until(self)):
            for frame in self.slots.take(16):
                self.frames.setdefault(frame.stream, []).append(frame)
                self.arrivals.setdefault(frame.stream, []).append(time.monotonic())
            time.sleep(0.02)

    def count(self, name: str) -> int:
        return len(self.frames.get(name, []))

    def close(self) -> None:
        for source in self.sources:
            source.stop()
        for source in self.sources:
            assert source.join(5), f"{source.name} did not stop"


@pytest.fixture
def collector():
    c = Collector()
    yield c
    c.close()


def test_h264_and_hevc_over_tcp_and_udp_flow_with_increasing_indexes(collector) -> None:
    with RtspServer(["avc=h264:320x240@5", "hev=hevc:352x288@5"]) as srv:
        collector.add("avc", srv.url("avc"))
        collector.add("hev", srv.url("hev"), transport="udp")
        collector.drain(30, until=lambda c: c.count("avc") >= 4 and c.count("hev") >= 4)
    for name, (w, h) in (("avc", (320, 240)), ("hev", (352, 288))):
        frames = collector.frames[name]
        assert len(frames) >= 4
        indexes = [f.index for f in frames]
        assert indexes == sorted(set(indexes))
        frame = frames[-1]
        assert (frame.width, frame.height, frame.pixel_format) == (w, h, "rgb24")
        assert frame.pixels.shape == (h, w, 3) and frame.pixels.dtype == torch.uint8
        assert frame.pixels.float().std() > 5  # a real picture, not a blank buffer
        assert frame.capture_ns > 0


def test_fps_cap_keeps_the_configured_rate(collector) -> None:
    with RtspServer(["cam=h264@10"]) as srv:
        source = collector.add("cam", srv.url("cam"), max_fps=2.5)
        collector.drain(30, until=lambda c: c.count("cam") >= 1)
        start_count, started = collector.count("cam"), time.monotonic()
        collector.drain(4)
        rate = (collector.count("cam") - start_count) / (time.monotonic() - started)
    assert 1.5 <= rate <= 3.5, f"{rate:.1f} fps kept with max_fps 2.5"
    assert source.stats.skipped > 0


@pytest.mark.slow
def test_server_killed_and_restarted_resumes_within_5s_others_unaffected(collector) -> None:
    steady = RtspServer(["steady=h264@5"]).start()
    flaky = RtspServer(["flaky=h264@5"]).start()
    try:
        collector.add("steady", steady.url("steady"))
        flaky_source = collector.add("flaky", flaky.url("flaky"), backoff=Backoff(0.2, 1.0))
        collector.drain(30, until=lambda c: c.count("flaky") >= 3 and c.count("steady") >= 3)
        flaky.stop()
        killed = time.monotonic()
        collector.drain(4)
        flaky.start()
        restarted = time.monotonic()
        collector.drain(10, until=lambda c: c.arrivals["flaky"][-1] > restarted)
        collector.drain(1)
    finally:
        steady.stop()
        flaky.stop()
    resumed = collector.arrivals["flaky"][-1] if collector.arrivals["flaky"][-1] > restarted \
        else None
    assert resumed is not None, "flaky camera never came back"
    first_back = next(t for t in collector.arrivals["flaky"] if t > restarted)
    assert first_back - restarted < 5.0, f"resumed {first_back - restarted:.1f} s after restart"
    assert flaky_source.stats.reconnects >= 1
    gaps = [b - a for a, b in zip(collector.arrivals["steady"], collector.arrivals["steady"][1:],
                                  strict=False) if a > killed - 1]
    assert max(gaps) < 1.5, f"the steady camera paused {max(gaps):.1f} s"
    flaky_indexes = [f.index for f in collector.frames["flaky"]]
    assert flaky_indexes == sorted(set(flaky_indexes)), "indexes restart after a reconnect"


@pytest.mark.slow
def test_silent_server_is_detected_as_stalled_and_recovers(collector) -> None:
    with RtspServer(["cam=h264@5"]) as srv:
        source = collector.add("cam", srv.url("cam"), read_timeout=1.0, stall_timeout=2.0,
                               open_timeout=2.0, backoff=Backoff(0.2, 0.5))
        collector.drain(30, until=lambda c: c.count("cam") >= 3)
        os.kill(srv.proc.pid, signal.SIGSTOP)  # the socket stays open, nothing is sent
        try:
            stalled = time.monotonic()
            collector.drain(6, until=lambda c: c.sources[0].stats.last_error is not None)
            detected = time.monotonic() - stalled
            error = source.stats.last_error
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        resumed = time.monotonic()
        count = collector.count("cam")
        collector.drain(15, until=lambda c: c.count("cam") > count)
    assert error is not None and detected < 5.0, f"stall not detected ({detected:.1f} s)"
    assert collector.count("cam") > count, "no frames after the server woke up"
    assert collector.arrivals["cam"][-1] - resumed < 10.0


@pytest.mark.slow
def test_resolution_change_mid_stream_keeps_decoding(collector) -> None:
    with RtspServer(["cam=h264-switch@5"]) as srv:
        collector.add("cam", srv.url("cam"))
        collector.drain(40, until=lambda c: len({(f.width, f.height)
                                                for f in c.frames.get("cam", [])}) >= 2
                        and c.frames["cam"][-1].width == c.frames["cam"][0].width)
    frames = collector.frames["cam"]
    sizes = {(f.width, f.height) for f in frames}
    assert sizes == {(320, 240), (480, 360)}, sizes
    assert all(f.pixels.shape == (f.height, f.width, 3) for f in frames)
    assert [f.index for f in frames] == sorted({f.index for f in frames})


def test_backoff_grows_is_bounded_and_jittered() -> None:
    backoff = Backoff(initial=0.5, maximum=3.0, factor=2.0, jitter=0.2)
    delays = [backoff.next_delay() for _ in range(8)]
    assert 0.4 <= delays[0] <= 0.6 and 0.8 <= delays[1] <= 1.2
    assert all(2.4 <= d <= 3.6 for d in delays[3:])
    assert len({round(d, 6) for d in delays[3:]}) > 1
    backoff.reset()
    assert backoff.next_delay() <= 0.6
