"""`engine.gpus: [0, 1, ...]`: one engine worker per device, the streams spread across them, one
publisher for all. On the CPU the same code runs with two CPU "devices"; the GPU test needs a
machine with two CUDA GPUs."""

from __future__ import annotations

import threading
from collections import defaultdict

import pytest
import torch
from codetr_stream.daemon import service
from codetr_stream.daemon.config.load import load_config
from codetr_stream.daemon.demo.rtsp_server import free_port
from daemon_helpers import tiny_model
from fault_helpers import (
    FaultDaemon,
    FaultyCamera,
    Recorder,
    build_small_engine,
    indexes_increase,
    model_detections,
    wait_for,
    write_streams_yaml,
)
from test_daemon_e2e import assert_same_detections

STREAMS = 4


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return build_small_engine(tmp_path_factory.mktemp("engine") / "tiny")


class Tap:
    """on_result: which engine worker thread published each stream, and the frames it saw."""

    def __init__(self) -> None:
        self.workers: dict[str, set[str]] = defaultdict(set)
        self.frames: dict[tuple[str, int], object] = {}

    def __call__(self, frame, result) -> None:
        self.workers[frame.stream].add(threading.current_thread().name)
        self.frames[(frame.stream, frame.index)] = frame


def check_spread(tap: Tap, recorder: Recorder, config_path, *, compare: bool = True) -> None:
    """Each stream on exactly one worker, the workers sharing them evenly, and (`compare`, for
    RGB frames of the CPU decoder) each stream's last detections the model's own on that frame."""
    owners = {name: next(iter(threads)) for name, threads in tap.workers.items()}
    assert all(len(threads) == 1 for threads in tap.workers.values()), dict(tap.workers)
    load = defaultdict(int)
    for thread in owners.values():
        load[thread] += 1
    assert sorted(load.values()) == [STREAMS // 2, STREAMS // 2], dict(load)
    model, config = tiny_model(), load_config(config_path)
    for name in owners:
        messages = recorder.det(name)
        assert len(messages) >= 3 and indexes_increase(messages)
        if compare:
            payload = messages[-1].payload
            frame = tap.frames[(name, payload["frame_index"])]
            assert_same_detections(payload["detections"],
                                   model_detections(model, frame, config.streams[0]))


@pytest.mark.slow
def test_two_cpu_workers_share_the_streams(engine, tmp_path) -> None:
    tap, stop = Tap(), threading.Event()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with FaultyCamera() as cam:
        path = write_streams_yaml(tmp_path / "streams.yaml", engine,
                                  {f"cam{i}": cam.url(f"cam{i}") for i in range(STREAMS)},
                                  endpoint=endpoint, health_port=free_port())
        recorder = Recorder(endpoint).start()
        daemon = threading.Thread(target=service.run, args=(load_config(path),), kwargs={
            "stop_event": stop, "on_result": tap,
            "devices": [torch.device("cpu"), torch.device("cpu")]})
        daemon.start()
        try:
            wait_for(lambda: all(len(recorder.det(f"cam{i}")) >= 3 for i in range(STREAMS)),
                     90, "every camera publishing")
            engines = [t for t in threading.enumerate() if t.name.startswith("engine-")]
        finally:
            stop.set()
            daemon.join(15)
            recorder.stop()
    assert not daemon.is_alive()
    assert sorted(t.name for t in engines) == ["engine-cpu-0", "engine-cpu-1"]
    assert not any(t.is_alive() for t in engines), "an engine worker outlived service.run"
    check_spread(tap, recorder, path)


@pytest.mark.gpu
@pytest.mark.slow
def test_two_gpus_each_run_a_worker_with_half_the_streams(engine, tmp_path) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    tap = Tap()
    with FaultyCamera() as cam, FaultDaemon(
            tmp_path, engine, {f"cam{i}": cam.url(f"cam{i}") for i in range(STREAMS)},
            on_result=tap, engine={"device": "cuda", "gpus": [0, 1]}) as d:
        wait_for(lambda: all(len(d.recorder.det(f"cam{i}")) >= 3 for i in range(STREAMS)),
                 90, "every camera publishing")
    devices = defaultdict(set)
    for (name, _), frame in tap.frames.items():
        devices[name].add(str(frame.pixels.device))
    assert all(len(found) == 1 for found in devices.values()), dict(devices)
    assert {next(iter(found)) for found in devices.values()} == {"cuda:0", "cuda:1"}
    check_spread(tap, d.recorder, d.path, compare=False)
