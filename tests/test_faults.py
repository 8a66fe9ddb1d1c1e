"""Camera faults through the whole daemon (CPU path, tiny engine): each test breaks a camera on
purpose and watches what the daemon publishes. Passwords ride in every URL (literal and
`${ENV}`), and each test ends by checking that none of them reached a log line, a ZeroMQ
message, /metrics or /healthz."""

from __future__ import annotations

import logging
import time

import pytest
from codetr_stream.daemon.config.load import load_config
from codetr_stream.daemon.demo.rtsp_server import RtspServer
from daemon_helpers import tiny_model
from fault_helpers import (
    ENV_NAME,
    ENV_PASSWORD,
    RECONNECT,
    URL_PASSWORD,
    FaultDaemon,
    FaultyCamera,
    TcpCamera,
    assert_no_secrets,
    build_small_engine,
    indexes_increase,
    max_gap,
    model_detections,
    pause_bound,
    wait_for,
)
from test_daemon_e2e import assert_same_detections

SECRETS = (URL_PASSWORD, ENV_PASSWORD)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return build_small_engine(tmp_path_factory.mktemp("engine") / "tiny")


@pytest.fixture(autouse=True)
def _env_secret(monkeypatch, caplog):
    monkeypatch.setenv(ENV_NAME, ENV_PASSWORD)
    caplog.set_level(logging.DEBUG)


@pytest.fixture
def steady_and_faulty(engine, tmp_path):
    """(camera to break, daemon): it and a steady camera publishing through the daemon."""
    with FaultyCamera() as steady, FaultyCamera() as cam, \
            FaultDaemon(tmp_path, engine, {
                "steady": steady.url(userinfo=f"viewer:${{{ENV_NAME}}}"),
                "cam": cam.url(userinfo=f"admin:{URL_PASSWORD}")}) as d:
        wait_for(lambda: len(d.recorder.det("cam")) >= 3 and len(d.recorder.det("steady")) >= 3,
                 60, "both cameras publishing")
        yield cam, d


def publish_times(messages) -> list[float]:
    return [m.payload["publish_ns"] / 1e9 for m in messages]


@pytest.mark.slow
def test_killed_server_resumes_within_5s_and_other_cameras_never_pause(engine, tmp_path,
                                                                      caplog) -> None:
    steady = RtspServer(["steady=h264:320x240@5"], auth=f"viewer:{ENV_PASSWORD}").start()
    flaky = RtspServer(["flaky=h264:320x240@5/smpte"], auth=f"admin:{URL_PASSWORD}").start()
    streams = {"steady": steady.url("steady", f"viewer:${{{ENV_NAME}}}"),
               "flaky": flaky.url("flaky", f"admin:{URL_PASSWORD}")}
    try:
        with FaultDaemon(tmp_path, engine, streams) as d:
            rec = d.recorder
            wait_for(lambda: len(rec.det("flaky")) >= 3 and len(rec.det("steady")) >= 3, 60,
                     "both cameras publishing")
            bound = pause_bound(rec.det("steady"))
            flaky.stop()
            killed = time.monotonic()
            wait_for(lambda: rec.last_status("flaky")["connected"] is False, 10,
                     "the killed camera reported disconnected")
            d.sample_http()
            # Down for longer than a pause: a daemon waiting on it would show as one.
            time.sleep(max(0.0, killed + bound + 1.0 - time.monotonic()))
            flaky.start()
            back = time.monotonic()
            wait_for(lambda: rec.det_after("flaky", back), 15, "the camera publishing again")
            resumed = rec.det_after("flaky", back)[0].arrived - back
            wait_for(lambda: len(rec.det_after("steady", back)) >= 5, 10, "steady frames")
            # The status heartbeat is once a second: the one after the reconnect may trail the
            # first detections.
            wait_for(lambda: rec.last_status("flaky")["connected"], 5,
                     "the status reporting the camera connected again")
            d.sample_http()
    finally:
        steady.stop()
        flaky.stop()

    assert resumed < 5.0, f"published again {resumed:.1f} s after the server came back"
    during = [m for m in rec.det("steady") if m.arrived > killed - 1.0]
    assert max_gap(publish_times(during)) < bound, \
        f"the steady camera paused {max_gap(publish_times(during)):.1f} s during the outage"
    assert indexes_increase(rec.det("flaky")), "frame indexes restarted after the reconnect"
    assert indexes_increase(rec.det("steady"))
    assert rec.last_status("flaky")["reconnects"] >= 1 and rec.last_status("flaky")["connected"]
    assert rec.last_status("steady")["reconnects"] == 0
    metrics = list(d.served.values())[-2]
    assert 'codetr_stream_reconnects_total{stream="flaky"}' in metrics
    assert_no_secrets(d.transcript(caplog.text), SECRETS)


@pytest.mark.slow
def test_camera_that_goes_quiet_is_detected_as_stalled_and_reconnected(steady_and_faulty,
                                                                      caplog) -> None:
    """`silent`: the connection stays open and nothing comes (the read timeout sees it);
    `filler`: RTP keeps flowing but holds no picture (only the decoded-frame watchdog sees it)."""
    limit = RECONNECT["stall_timeout_s"] + RECONNECT["read_timeout_s"] + 2.0
    cam, d = steady_and_faulty
    rec = d.recorder
    started = time.monotonic()
    for mode in ("silent", "filler"):
        reconnects, connections = rec.last_status("cam")["reconnects"], cam.connections
        cam.mode = mode
        broke = time.monotonic()
        wait_for(lambda r=reconnects: rec.last_status("cam")["reconnects"] > r, limit,
                 f"the {mode} camera detected and reconnected")
        detected = time.monotonic() - broke
        health = d.healthz()["streams"]["cam"]
        wait_for(lambda c=connections: cam.connections > c, 5, "a new connection")
        status = rec.last_status("cam")
        d.http("/metrics")
        cam.mode = "ok"
        healed = time.monotonic()
        wait_for(lambda t=healed: len(rec.det_after("cam", t)) >= 2, 15,
                 f"frames again after {mode}")
        assert detected < limit, f"{mode}: took {detected:.1f} s to notice"
        assert status["error"], f"{mode}: no reason in the status heartbeat: {status}"
        assert health["state"] == "reconnecting" or health["last_frame_age_s"] > 1.0, \
            f"{mode}: /healthz shows a healthy camera: {health}"
        if mode == "filler":
            assert "no picture" in status["error"], status["error"]
    steady_after = [m for m in rec.det("steady") if m.arrived > started]

    assert max_gap(publish_times(steady_after)) < pause_bound(steady_after), \
        "the other camera paused"
    assert indexes_increase(rec.det("cam"))
    assert_no_secrets(d.transcript(caplog.text), SECRETS)


@pytest.mark.slow
def test_server_that_accepts_and_never_answers_is_retried(engine, tmp_path, caplog) -> None:
    """A TCP server that accepts and sends nothing, not even an RTSP reply: each attempt ends
    at the open timeout, is reported, and the next connection comes after the backoff."""
    with FaultyCamera() as steady, TcpCamera("silent") as mute, FaultDaemon(tmp_path, engine, {
            "steady": steady.url(userinfo=f"viewer:${{{ENV_NAME}}}"),
            "mute": mute.url().replace("rtsp://", f"rtsp://admin:{URL_PASSWORD}@")}) as d:
        rec = d.recorder
        wait_for(lambda: mute.connections >= 3 and (rec.last_status("mute") or {}).get(
            "reconnects", 0) >= 2, 3 * (RECONNECT["open_timeout_s"] + 1.5) + 10,
            "three connection attempts")
        status = rec.last_status("mute")
        steady_msgs = rec.det("steady")
    assert not status["connected"] and status["error"], status
    assert status["frames_in"] == 0 and not rec.det("mute")
    assert len(steady_msgs) >= 3 and max_gap(publish_times(steady_msgs)) < pause_bound(steady_msgs)
    assert_no_secrets(d.transcript(caplog.text), SECRETS)


@pytest.mark.slow
def test_garbage_and_truncated_streams_recover(steady_and_faulty, caplog) -> None:
    """Random RTP payloads, random bytes in place of RTP packets, and a connection cut halfway
    through a packet: each time the camera's frames come back and nothing else notices."""
    cam, d = steady_and_faulty
    rec = d.recorder
    started = time.monotonic()
    recovery = {}
    for fault in ("garbage", "noise", "cut"):
        broke = time.monotonic()
        if fault == "cut":
            reconnects = (rec.last_status("cam") or {}).get("reconnects", 0)
            cam.cut()
            # Frames already on their way are published after the cut; the camera is back only
            # once the daemon has reconnected, which its next status heartbeat counts.
            wait_for(lambda n=reconnects: (rec.last_status("cam") or {}).get("reconnects", 0) > n,
                     15, "a status counting the cut's reconnect")
        else:
            cam.mode = fault
            time.sleep(1.5)  # the fault lasts this long
            cam.mode = "ok"
        healed = time.monotonic()
        wait_for(lambda t=healed: len(rec.det_after("cam", t)) >= 2, 15,
                 f"frames again after {fault}")
        recovery[fault] = rec.det_after("cam", healed)[0].arrived - healed
        assert rec.det_after("steady", broke), f"steady stopped during {fault}"
        d.sample_http()
    steady_after = [m for m in rec.det("steady") if m.arrived > started]

    assert all(s < 5.0 for s in recovery.values()), f"recovery took {recovery} s"
    assert max_gap(publish_times(steady_after)) < pause_bound(steady_after), \
        "the other camera paused"
    assert indexes_increase(rec.det("cam")) and indexes_increase(rec.det("steady"))
    assert_no_secrets(d.transcript(caplog.text), SECRETS)


@pytest.mark.slow
def test_resolution_change_mid_stream_keeps_correct_boxes(engine, tmp_path, caplog) -> None:
    """The camera alternates 320x240 and 480x360 every 3 s: detections keep coming, their boxes
    lie inside the frame they came from and equal the model's on that very frame."""
    frames = {}
    tap = lambda frame, result: frames.__setitem__(frame.index, frame)  # noqa: E731
    sizes = {(320, 240), (480, 360)}
    with RtspServer(["cam=h264-switch@5"], auth=f"admin:{URL_PASSWORD}") as srv, \
            FaultDaemon(tmp_path, engine, {"cam": srv.url("cam", f"admin:{URL_PASSWORD}")},
                        on_result=tap) as d:
        def seen() -> list[tuple[int, int]]:
            return [(m.payload["frame"]["width"], m.payload["frame"]["height"])
                    for m in d.recorder.det("cam")]

        # Both sizes, then back to the first: two switches survived.
        wait_for(lambda: set(seen()) == sizes and seen()[-1] == seen()[0]
                 and len(set(seen()[seen().index(seen()[0]):])) == 2, 40,
                 "detections at both sizes and a switch back")
    messages = d.recorder.det("cam")
    assert indexes_increase(messages)
    stream_cfg = load_config(d.path).streams[0]
    model = tiny_model()
    compared = set()
    for m in messages:
        width, height = m.payload["frame"]["width"], m.payload["frame"]["height"]
        assert (width, height) in sizes
        frame = frames[m.payload["frame_index"]]
        assert (frame.width, frame.height) == (width, height)
        assert m.payload["detections"], "no detections at min_score 0"
        for det in m.payload["detections"]:
            x1, y1, x2, y2 = det["box"]
            assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height, (det, width, height)
        if (width, height) not in compared:  # the first frame of each size, against the model
            assert_same_detections(m.payload["detections"],
                                   model_detections(model, frame, stream_cfg))
            compared.add((width, height))
    assert compared == sizes
    assert_no_secrets(d.transcript(caplog.text), (URL_PASSWORD,))
