"""Camera sources against a real RTSP server: decode, reconnect, stall, resolution change."""

from __future__ import annotations

import itertools
import logging
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from codetr_stream.daemon.demo.rtsp_server import RtspServer
from codetr_stream.daemon.monitoring.metrics import Metrics
from codetr_stream.daemon.pipeline.frames import FrameSlots
from codetr_stream.daemon.pipeline.source import Backoff, Source, SourceSettings
from fault_helpers import FaultyCamera, wait_for

CPU = torch.device("cpu")


class Collector:
    """Sources feeding one slot set, drained in the background of the test's own polling."""

    def __init__(self) -> None:
        self.slots = FrameSlots()
        self.metrics = Metrics()
        self.sources: list[Source] = []
        self.frames: dict[str, list] = {}
        self.arrivals: dict[str, list[float]] = {}

    def add(self, name: str, url: str, wait=None, **settings) -> Source:
        source = Source(SourceSettings(name, url, **settings), self.slots, CPU,
                        self.metrics.stream(name), wait=wait).start()
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


@pytest.mark.parametrize("factor", [2.0, 10.0, 1e100])
def test_backoff_stays_finite_and_capped_after_any_number_of_failures(factor: float) -> None:
    """initial * factor**n overflowed: after 1,024 failures with 2.0, at the 4th with 1e100."""
    backoff = Backoff(initial=0.5, maximum=30.0, factor=factor, jitter=0.25)
    delays = [backoff.next_delay() for _ in range(5000)]
    assert all(math.isfinite(d) and 0.375 <= d <= 37.5 for d in delays)
    assert min(delays[-100:]) >= 22.5  # capped at the maximum, not reset


class FakeClock:
    """Stands in for the waits between reconnects: records each and returns at once."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        time.sleep(0)  # let the other threads run
        return False


@pytest.mark.parametrize("factor", [2.0, 1e100])
def test_a_camera_comes_back_after_an_outage_of_any_length(collector, factor: float) -> None:
    """1,100 refused connections in a row (8.5 hours of the default backoff, on a fake clock),
    then the camera is back: the source connects and delivers. Before, its thread died of an
    OverflowError at the 1,024th failure (the 4th with backoff_multiplier 1e100)."""
    clock = FakeClock()
    with FaultyCamera() as cam:
        cam.mode = "down"
        source = collector.add("cam", cam.url(), wait=clock.wait,
                               backoff=Backoff(0.5, 30.0, factor, 0.25))
        wait_for(lambda: source.stats.reconnects >= 1100 or not source._thread.is_alive(), 120,
                 "1,100 failed connections")
        assert source._thread.is_alive(), "the camera's thread died"
        cam.mode = "ok"
        collector.drain(30, until=lambda c: c.count("cam") >= 2)
    assert collector.count("cam") >= 2, f"never came back: {source.stats.last_error}"
    outage = sum(clock.waits[:1100])
    assert outage > 8 * 3600 and max(clock.waits) <= 37.5, (outage, max(clock.waits))


@pytest.mark.slow
def test_a_silent_camera_is_flagged_at_the_stall_timeout_and_late_pictures_keep_their_time(
        collector) -> None:
    """The camera keeps its session and stops sending (read timeout 2 s, stall timeout 3 s).
    FFmpeg's parser holds the last picture until the next one starts and hands it over at the
    read timeout, and raised only at twice the read timeout: before, the camera was flagged
    after ~4 s and that picture went out ~2 s late as a fresh frame. Now a watchdog aborts the
    read at the stall timeout, and a picture keeps the time its timestamp gives."""
    with FaultyCamera() as cam:
        source = collector.add("cam", cam.url(), read_timeout=2.0, stall_timeout=3.0,
                               open_timeout=2.0, backoff=Backoff(5.0, 5.0))
        collector.drain(30, until=lambda c: c.count("cam") >= 5)
        cam.mode = "silent"
        silent, silent_ns = time.monotonic(), time.time_ns()
        collector.drain(10, until=lambda c: source.stats.last_error is not None)
        flagged = time.monotonic() - silent
        collector.drain(0.3)
    assert "no picture" in (source.stats.last_error or ""), source.stats.last_error
    assert flagged < 3.0 + 0.8, f"flagged {flagged:.1f} s after the camera went silent"
    after = [f for f in collector.frames["cam"] if f.decoded_mono > silent + 0.5]
    late = [round((f.capture_ns - silent_ns) / 1e9, 2) for f in after]
    assert all(s < 0.5 for s in late), f"pictures stamped {late} s after the silence began"


def write_clip(path: Path, frames: int, fps: int) -> Path:
    import av

    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = 160, 120, "yuv420p"
        for i in range(frames):
            rgb = np.full((120, 160, 3), i * 20 % 256, np.uint8)
            out.mux(video.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(video.encode(None))
    return path


@pytest.mark.slow
def test_a_file_plays_at_its_frame_rate_and_loops_after_the_backoff(collector, tmp_path,
                                                                     caplog) -> None:
    """A 1 s clip at 10 fps: each play takes about a second (it was read as fast as it
    decodes), the next starts after the backoff, and replays are not logged above DEBUG (it
    was a tight loop of 2 lines a play). Judged by each received frame's timestamp against when
    it was decoded, so frames the slot replaced on a loaded machine do not matter."""
    caplog.set_level(logging.INFO, logger="codetr_stream.daemon.pipeline.source")
    clip = write_clip(tmp_path / "clip.mp4", frames=10, fps=10)
    source = collector.add("clip", f"file://{clip}", backoff=Backoff(0.4, 0.4, 1.0, 0.0))
    collector.drain(30, until=lambda c: source.stats.reconnects >= 3)
    frames = collector.frames["clip"]
    starts = [0] + [i for i in range(1, len(frames)) if frames[i].pts < frames[i - 1].pts]
    plays = [frames[a:b] for a, b in itertools.pairwise([*starts, len(frames)])]
    assert len(plays) >= 3, [len(p) for p in plays]
    for play in plays[:3]:
        offsets = [f.decoded_mono - f.pts for f in play]  # constant when played in real time
        assert play[-1].pts - play[0].pts >= 0.5, [f.pts for f in play]
        assert max(offsets) - min(offsets) < 0.3, [round(o - offsets[0], 2) for o in offsets]
    for before, after in itertools.pairwise(plays[:3]):
        assert 0.35 <= after[0].decoded_mono - before[-1].decoded_mono <= 3.0
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(lines) == 1 and "connected" in lines[0], lines
