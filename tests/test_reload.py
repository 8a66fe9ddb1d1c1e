"""Reload on a running daemon (CPU path, tiny engine), judged by what it publishes: invalid
files change nothing, a valid one adds, removes and changes cameras while the untouched ones
(and a reconnected one) keep counting frames where they were."""

from __future__ import annotations

import logging
import time

import pytest
from fault_helpers import (
    FaultDaemon,
    FaultyCamera,
    Message,
    build_small_engine,
    indexes_increase,
    max_gap,
    wait_for,
)

REJECTED = "keeping the running config"
ALIAS_BOMB = "".join([  # 237 bytes: 531,441 strings once expanded (6 s in the main loop before)
    'a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n',
    *(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]\n" for i in range(1, 6)),
    "x: *a5\n"]).encode()
# Appended to a valid file, each makes it unreadable; before, the first three killed the daemon
# with a traceback (UnicodeDecodeError, TypeError, RecursionError).
BROKEN = {"a byte that is not UTF-8": b"\xff\n", "a list as a key": b"? [a, b]\n: 1\n",
          "a recursive alias": b"x: &a [*a]\n", "5,000-deep nesting": b"x: " + b"[" * 5000
          + b"]" * 5000 + b"\n", "an alias bomb": ALIAS_BOMB}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return build_small_engine(tmp_path_factory.mktemp("engine") / "tiny")


def streams_seen(messages: list[Message], prefix: str = "status.") -> set[str]:
    return {m.payload["stream"] for m in messages if m.topic.startswith(prefix)}


@pytest.mark.slow
def test_reload_changes_only_what_the_file_changes(engine, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO)
    with FaultyCamera() as cam:
        running = {name: cam.url(name) for name in ("cam1", "cam2", "cam3")}
        with FaultDaemon(tmp_path, engine, running) as d:
            rec = d.recorder
            wait_for(lambda: all(len(rec.det(n)) >= 2 for n in running), 60, "three cameras")
            valid = d.path.read_text()
            extra = f'- {{name: camX, url: "{cam.url("camX")}", min_score: 0.0}}\n'
            invalid = {
                "unknown key": valid + extra + "bogus_section: 1\n",
                "YAML syntax": valid + extra + "publish: [\n",
                "missing secret": valid + extra.replace("camX\"", "camX?t=${CODETR_UNSET}\""),
                "bad url": valid + extra.replace("rtsp://", "http://user:Pa55word@"),
            }
            for problem, text in invalid.items():
                rejected = caplog.text.count(REJECTED)
                d.path.write_text(text)
                d.reload()
                wait_for(lambda r=rejected: caplog.text.count(REJECTED) > r, 15,
                         f"the {problem} file rejected")
                since = time.monotonic()
                wait_for(lambda t=since: all(len([m for m in rec.status(n) if m.arrived > t]) >= 2
                                             for n in running), 10,
                         f"heartbeats of every running camera after the {problem} file")
                after = [m for m in rec.messages() if m.arrived > since]
                assert streams_seen(after) == set(running), f"{problem}: {streams_seen(after)}"
                assert "camX" not in streams_seen(rec.messages()), f"{problem}: camX was added"
            for reason in ("bogus_section", "invalid YAML", "CODETR_UNSET", "unsupported scheme"):
                assert reason in caplog.text, f"no '{reason}' among the rejection reasons"
            assert "Pa55word" not in caplog.text

            # Valid: cam2 goes, cam4 comes, cam3 moves to another URL (a reconnect), cam1 only
            # changes a filter (its source keeps running).
            before = {n: rec.det(n)[-1].payload["frame_index"] for n in ("cam1", "cam3")}
            published = rec.last_status("cam1")["frames_published"]
            d.reload({"cam1": {"url": running["cam1"], "min_score": 0.02},
                      "cam3": cam.url("cam3-moved"), "cam4": cam.url("cam4")})
            wait_for(lambda: len(rec.det("cam4")) >= 2 and len(rec.det("cam3")) > 0
                     and rec.det("cam3")[-1].payload["frame_index"] > before["cam3"], 60,
                     "cam4 publishing and cam3 back")
            first_cam4 = rec.det("cam4")[0]
            wait_for(lambda: len(rec.det_after("cam1", first_cam4.arrived)) >= 2, 20,
                     "cam1 after the reload")
            metrics = d.http("/metrics")
            health = d.healthz()
        log = caplog.text

    messages = rec.messages()
    after = messages[messages.index(first_cam4):]
    assert "cam2" not in streams_seen(after, ""), "cam2 kept publishing after it was removed"
    assert streams_seen(after) >= {"cam1", "cam3", "cam4"}
    for name in ("cam1", "cam3"):
        assert indexes_increase(rec.det(name)), f"{name}: frame indexes reset by the reload"
        assert rec.det(name)[-1].payload["frame_index"] > before[name]
    assert rec.last_status("cam1")["frames_published"] > published, "cam1's counters reset"
    assert rec.last_status("cam1")["reconnects"] == 0, "a filter change reconnected cam1"
    new_cam1 = [m for m in rec.det("cam1") if m.arrived > first_cam4.arrived]
    assert all(d["score"] >= 0.02 for m in new_cam1 for d in m.payload["detections"]), \
        "cam1's new min_score not applied"
    assert 'stream="cam2"' not in metrics and 'stream="cam4"' in metrics
    assert set(health["streams"]) == {"cam1", "cam3", "cam4"}
    assert "stream cam2 removed" in log and "stream cam4 added" in log


@pytest.mark.slow
def test_an_unreadable_file_on_reload_costs_one_line_and_never_the_daemon(engine, tmp_path,
                                                                           caplog) -> None:
    """Each broken file is rejected with one ERROR line naming it; the daemon keeps its camera
    and its heartbeats run on while the file is read (on its own thread)."""
    caplog.set_level(logging.INFO)
    with FaultyCamera() as cam, FaultDaemon(tmp_path, engine, {"cam1": cam.url()}) as d:
        rec = d.recorder
        wait_for(lambda: len(rec.det("cam1")) >= 2, 60, "the camera publishing")
        valid = d.path.read_bytes()
        started = time.monotonic()
        for problem, tail in BROKEN.items():
            rejected = caplog.text.count(REJECTED)
            d.path.write_bytes(valid + tail)
            d.reload()
            wait_for(lambda r=rejected: caplog.text.count(REJECTED) > r
                     or not d.daemon.thread.is_alive(), 15, f"{problem} rejected")
            assert d.daemon.thread.is_alive(), f"{problem} killed the daemon"
            since = time.monotonic()
            wait_for(lambda t=since: len([m for m in rec.status("cam1") if m.arrived > t]) >= 2,
                     10, f"heartbeats after {problem}")
        heartbeats = [m.arrived for m in rec.status("cam1") if m.arrived > started]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == len(BROKEN), errors
    assert all(str(d.path) in e and REJECTED in e and "\n" not in e for e in errors), errors
    assert max_gap(heartbeats) < 1.5, f"the main loop stopped for {max_gap(heartbeats):.1f} s"
