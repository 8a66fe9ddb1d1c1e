"""The daemon: streams (daemon/stream.py) -> engine workers (batcher, runner with postprocessing)
-> publisher, and its life.

`run(config)` starts everything, serves until SIGTERM/SIGINT (or `stop_event`), and shuts down
cleanly: intake stops, the batches in flight are published, sockets close. SIGHUP re-reads the
config file (on a thread of its own: the main loop keeps its heartbeats while a file is read) and
applies the difference stream by stream; the engine and the untouched streams (and their frame
indexes) carry on as if nothing happened. A file that cannot be used changes nothing and costs
one log line. Each camera is a `Stream` with its own source thread; each device (`engine.gpus`,
or the CPU) has an engine worker thread that batches, infers, postprocesses and publishes the
frames of the streams assigned to it (new streams go to the least loaded worker); the main
thread applies reloads and sends the per-stream heartbeats.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
from codetr_stream.daemon.config.load import ConfigError, diff, load_config
from codetr_stream.daemon.config.schema import DaemonConfig, StreamConfig
from codetr_stream.daemon.feed.messages import FrameResult
from codetr_stream.daemon.feed.publish import Publisher
from codetr_stream.daemon.monitoring.health import HealthServer, Liveness, SnapshotStore
from codetr_stream.daemon.monitoring.metrics import Metrics
from codetr_stream.daemon.pipeline.batcher import Batcher
from codetr_stream.daemon.pipeline.frames import Frame, FrameSlots
from codetr_stream.daemon.pipeline.postprocess import DROP_ALL
from codetr_stream.daemon.pipeline.preprocess import frame_rgb
from codetr_stream.daemon.pipeline.runner import BatchOutput, PendingBatch, Runner
from codetr_stream.daemon.pipeline.source import Source
from codetr_stream.daemon.stream import Lane, Stream, Watchers
from codetr_stream.daemon.system import fd_budget, systemd

log = logging.getLogger(__name__)

OnResult = Callable[[Frame, FrameResult], None]
Restrict = Callable[[DaemonConfig], DaemonConfig]
JOIN_TIMEOUT_S = 3.0  # sources blocked in a read longer than this die with the process
WATCHDOG_STALL_S = 30.0
# The GIL switch interval while the daemon runs; None keeps Python's (5 ms). The engine workers
# hand the GIL over at every torch call and may wait up to an interval to get it back from a camera
# thread. 1 ms was measured against 5 ms (bench/RESULTS.md, 16 cameras, H200): same throughput,
# shorter preprocessing tail but longer postprocessing tail, so the default stays.
SWITCH_INTERVAL_S: float | None = None
# Batches queued on a GPU engine worker's stream at once: the one the engine runs and the next.
IN_FLIGHT = 2


class NoGpu(RuntimeError):
    """engine.device asks for CUDA and there is none; the message says what to set instead."""


def select_devices(config: DaemonConfig) -> list[torch.device]:
    """cuda:<gpu> for each of `engine.gpus` when asked for (or `auto` and CUDA is there), else
    the CPU path (one worker)."""
    wanted = config.engine.device
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        return [torch.device("cpu")]
    if not torch.cuda.is_available():
        raise NoGpu("engine.device is 'cuda' but no CUDA GPU is visible; "
                    "set engine.device: cpu (or auto)")
    return [torch.device("cuda", gpu) for gpu in config.engine.gpus]


def _on(device: torch.device):
    """`device` as the current CUDA device for the block (nothing to do on the CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@dataclass(eq=False)
class _Worker:
    """One engine on one device, with the lane (slots) of the streams assigned to it."""

    runner: Runner
    batcher: Batcher
    lane: Lane

    @property
    def device(self) -> torch.device:
        return self.runner.device


@dataclass
class _Batch:
    """A batch submitted to its worker's runner, with the stream each frame came from (None: gone
    before the batch was taken). Holding it keeps its frames' pixels alive until the device has
    read them."""

    frames: list[Frame]
    streams: list[Stream | None]
    pending: PendingBatch
    started: float  # monotonic, when it was submitted


class Service:
    """The daemon's wiring: streams -> engine workers (batcher, runner) -> publisher, and its life:
    start, serve (engine worker threads, heartbeats, reloads), close."""

    def __init__(self, config: DaemonConfig, *, config_path: str | Path | None = None,
                 on_result: OnResult | None = None, restrict: Restrict | None = None,
                 devices: Sequence[torch.device] | None = None) -> None:
        self.restrict = restrict or (lambda c: c)
        self.config = self.restrict(config)
        self.config_path = Path(config_path) if config_path is not None else None
        self.on_result = on_result
        self.devices = list(devices) if devices is not None else select_devices(config)
        self.watchers = Watchers(Metrics(), Liveness(), SnapshotStore(
            jpeg_quality=config.snapshot.jpeg_quality, max_width=config.snapshot.max_width))
        self.streams: dict[str, Stream] = {}
        self._retired: list[Source] = []  # sources of closed streams whose thread may still run
        self.workers: list[_Worker] = []
        self.class_names: tuple[str, ...] = ()
        self._failure: BaseException | None = None
        self.publisher: Publisher | None = None
        self.health: HealthServer | None = None
        self._last_tick = time.monotonic()
        self._watchdog = systemd.WatchdogPolicy(WATCHDOG_STALL_S)

    # ---- life cycle ----

    def start(self) -> Service:
        fd_budget.ensure(self.config)
        # Ports first: one that is taken fails in a second, not after the engine's warm-up
        # (minutes on a GPU); /healthz says 503 (engine not warm) meanwhile.
        self.publisher = Publisher.from_config(self.config.publish)
        log.info("publishing on %s", self.publisher.endpoint)
        self.health = HealthServer.from_config(
            self.config.health, liveness=self.watchers.liveness, metrics=self.watchers.metrics,
            snapshots=self.watchers.snapshots).start()
        for device in self.devices:
            log.info("loading engine %s on %s", self.config.engine.path, device)
            with _on(device):  # engines that capture CUDA graphs do it on the current device
                runner = Runner(self.config.engine.path, device)
                runner.warm_up()
            slots = FrameSlots()
            batcher = Batcher(slots, runner.batch_sizes, self.config.batching.max_batch,
                              self.config.batching.max_wait_ms)
            self.workers.append(_Worker(runner, batcher, Lane(slots, device)))
        if self.workers[0].runner.engine.manifest.random_weights:
            log.warning("engine %s has RANDOM weights: its detections are meaningless",
                        self.config.engine.path)
        self.class_names = tuple(self.workers[0].runner.class_names)
        self.watchers.liveness.set_engine_warm()
        for stream in self.config.enabled_streams:
            self._add_stream(stream)
        systemd.ready(f"{len(self.streams)} streams")
        return self

    def serve(self, stop: threading.Event, reload: threading.Event | None = None) -> None:
        """Run the engine workers and the main loop until `stop` is set; each worker finishes
        its batches in flight. A worker's exception stops everything and is raised here."""
        threads = [threading.Thread(target=self._work, args=(worker, stop), daemon=True,
                                    name=f"engine-{worker.device}-{i}")
                   for i, worker in enumerate(self.workers)]
        for thread in threads:
            thread.start()
        loading: Future[DaemonConfig | None] | None = None
        try:
            while not stop.wait(0.05):
                if loading is None and reload is not None and reload.is_set():
                    reload.clear()  # a SIGHUP while a file is read: read it again after
                    systemd.reloading()
                    loading = _in_background(self.load)
                if loading is not None and loading.done():
                    self.apply(loading.result())
                    loading = None
                self._tick()
        finally:
            stop.set()
            for thread in threads:
                thread.join(JOIN_TIMEOUT_S)
        if self._failure is not None:
            raise self._failure

    def close(self) -> None:
        systemd.stopping()
        sources = [s.source for s in self.streams.values()] + self._retired
        for source in sources:
            source.stop()
        for worker in self.workers:
            worker.lane.slots.wake()
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        stuck = [s.name for s in sources if not s.join(max(0.0, deadline - time.monotonic()))]
        if stuck:
            log.warning("streams %s still blocked in a read; leaving them to exit", stuck)
        if self.publisher is not None:
            self.publisher.close()
        if self.health is not None:
            self.health.stop()
        log.info("stopped")

    # ---- streams ----

    def _add_stream(self, config: StreamConfig, next_index: int = 0) -> None:
        worker = min(self.workers, key=lambda w: len(w.lane.streams))  # the least loaded
        self.streams[config.name] = Stream(
            config, reconnect=self.config.reconnect, lane=worker.lane, watchers=self.watchers,
            class_names=self.class_names, next_index=next_index).start()

    def _remove_stream(self, name: str) -> Source:
        source = self.streams.pop(name).close()
        self._retired.append(source)
        return source

    def reload(self) -> bool:
        """Re-read the config file and apply it; an invalid file changes nothing."""
        systemd.reloading()
        return self.apply(self.load())

    def load(self) -> DaemonConfig | None:
        """The config file read again, for a reload (on any thread); None when it cannot be
        used, after one log line that says why: the running config stays."""
        if self.config_path is None:
            log.warning("reload requested but the service was started without a config path")
            return None
        try:
            return self.restrict(load_config(self.config_path, class_names=self.class_names))
        except ConfigError as exc:
            why = "; ".join(map(str, exc.problems))
        except Exception as exc:  # whatever it is, the cameras keep running
            why = f"{type(exc).__name__}: {exc}"
        log.error("reload rejected, keeping the running config (%d streams): %s",
                  len(self.streams), why)
        return None

    def apply(self, new: DaemonConfig | None) -> bool:
        """Make `new` (from `load`) the running config; None keeps the running one."""
        if new is None:
            systemd.ready(f"{len(self.streams)} streams (reload rejected)")
            return False
        self._retired = [s for s in self._retired if not s.join(0)]  # finished: forget them
        change = diff(self.config, new)
        for section in change.restart_required:
            log.warning("reload: changes to `%s` take effect at the next restart", section)
        for stream in change.removed:
            self._remove_stream(stream.name)
            log.info("stream %s removed", stream.name)
        reconnect = set(change.reconnect)
        for stream in change.changed:
            running = self.streams[stream.name]
            if stream.name in reconnect or stream.max_fps != running.config.max_fps:
                index = self._remove_stream(stream.name).next_index
                self._add_stream(stream, next_index=index)
            else:
                running.reconfigure(stream)  # filters only: the source keeps running
            log.info("stream %s changed", stream.name)
        for stream in change.added:
            self._add_stream(stream)
        self.config = new.model_copy(update={
            name: getattr(self.config, name) for name in change.restart_required})
        systemd.ready(f"{len(self.streams)} streams")
        return True

    # ---- the data path: an engine worker's loop ----

    def _work(self, worker: _Worker, stop: threading.Event) -> None:
        """One engine worker: batches from its lane's slots through its runner to the publisher.

        On a GPU up to IN_FLIGHT batches are queued on the runner's stream: the next batch is
        submitted while the engine runs this one (when it is already waiting), so the GPU never
        waits for the host to collect, publish and submit, and a batch is published while the
        engine runs the next. On a CPU each batch runs inside `submit`, and one is published
        before the next is taken.
        """
        in_flight: collections.deque[_Batch] = collections.deque()
        depth = IN_FLIGHT if worker.runner.asynchronous else 1
        try:
            if worker.device.type == "cuda":
                torch.cuda.set_device(worker.device)
            while not stop.is_set():
                if len(in_flight) < depth and (not in_flight or worker.batcher.ready()):
                    frames = worker.batcher.next_batch(stop)
                    if frames:
                        in_flight.append(self._submit(worker, frames))
                else:
                    self._finish(in_flight.popleft())
                self.watchers.liveness.beat()
            while in_flight:  # the batches in flight are always published
                self._finish(in_flight.popleft())
        except BaseException as exc:
            self._failure = exc
            stop.set()

    def _submit(self, worker: _Worker, frames: list[Frame]) -> _Batch:
        started = time.monotonic()
        # Each frame's stream, looked up once: its filter now, its ROI at publishing.
        streams = [self.streams.get(frame.stream) for frame in frames]
        pending = worker.runner.submit(frames,
                                       [DROP_ALL if s is None else s.filter for s in streams])
        return _Batch(frames, streams, pending, started)

    def _finish(self, batch: _Batch) -> None:
        """Wait for `batch`'s outputs, then publish them."""
        out = batch.pending.result()
        # The batch's own device time (CUDA events; wall clock on a CPU), not its wait in the
        # queue behind the batch before it.
        engine_s = (out.preprocess_ms + out.infer_ms + out.postprocess_ms) / 1e3
        self.watchers.metrics.observe_batch(len(batch.frames), engine_s)
        self._watchdog.progress()
        self._publish(batch, out)

    def _publish(self, batch: _Batch, out: BatchOutput) -> None:
        for frame, stream, rows in zip(batch.frames, batch.streams, out.rows, strict=True):
            if stream is None or not stream.open:  # removed by a reload while it waited
                continue
            t0 = time.perf_counter()
            detections = stream.detections(rows, (frame.width, frame.height))
            # The batch's device postprocessing (and read-back) plus this frame's host part.
            postprocess_ms = out.postprocess_ms + (time.perf_counter() - t0) * 1e3
            result = FrameResult(
                stream=frame.stream, frame_index=frame.index, pts=frame.pts,
                capture_ns=frame.capture_ns, width=frame.width, height=frame.height,
                detections=detections,
                latencies_ms={"queue": (batch.started - frame.decoded_mono) * 1e3,
                              "preprocess": out.preprocess_ms, "infer": out.infer_ms,
                              "postprocess": postprocess_ms})
            self.publisher.publish(result)
            stream.count_published()
            self.watchers.metrics.observe_frame(batch.started - frame.decoded_mono,
                                                (result.publish_ns - frame.capture_ns) / 1e9)
            snapshots = self.watchers.snapshots
            if self.config.snapshot.enabled and snapshots.due(frame.stream):
                # One host copy per interval.
                image = frame_rgb(frame, stream.lane.device).cpu().numpy()
                snapshots.put(frame.stream, image, detections)
            if self.on_result is not None:
                self.on_result(frame, result)

    # ---- heartbeats ----

    def _tick(self) -> None:
        """Every `status_interval_s`: a status message per stream, health and watchdog."""
        now = time.monotonic()
        interval = now - self._last_tick
        expecting = any(s.source.stats.connected for s in self.streams.values())
        self._watchdog.tick(expecting)
        if interval < self.config.publish.status_interval_s:
            return
        self._last_tick = now
        for stream in self.streams.values():
            self.publisher.status(stream.heartbeat(now, interval))


def _in_background(load: Callable[[], DaemonConfig | None]) -> Future[DaemonConfig | None]:
    """`load()` on a daemon thread (one stuck reading a file never holds up the exit)."""
    future: Future[DaemonConfig | None] = Future()
    threading.Thread(target=lambda: future.set_result(load()), name="config-reload",
                     daemon=True).start()
    return future


def run(config: DaemonConfig, *, stop_event: threading.Event | None = None,
        reload_event: threading.Event | None = None, config_path: str | Path | None = None,
        on_result: OnResult | None = None, restrict: Restrict | None = None,
        devices: Sequence[torch.device] | None = None,
        switch_interval_s: float | None = SWITCH_INTERVAL_S) -> int:
    """Run the daemon until SIGTERM/SIGINT or `stop_event`; SIGHUP (or `reload_event`) re-reads
    `config_path`.

    Signal handlers are installed only when called from the main thread (tests and embedders
    run it in a thread and use the events). `on_result(frame, result)` sees every published
    frame with its decoded pixels. `restrict` maps every loaded config (at start and on each
    reload) to the part this process serves, e.g. `Shard.restrict`. `devices` overrides the
    engine devices chosen from the config (one worker each). The interpreter's GIL switch
    interval is `switch_interval_s` while it runs (None: left alone). Returns the exit code.
    """
    stop = stop_event or threading.Event()
    reload = reload_event or threading.Event()
    serving = threading.Event()

    def on_stop(*_: object) -> None:
        stop.set()
        if not serving.is_set():  # mid engine load/warm-up (up to minutes): end it now
            raise KeyboardInterrupt

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig, handler in ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop),
                             (signal.SIGHUP, lambda *_: reload.set())):
            previous[sig] = signal.signal(sig, handler)
    service = Service(config, config_path=config_path, on_result=on_result, restrict=restrict,
                      devices=devices)
    interval = sys.getswitchinterval()
    if switch_interval_s is not None:
        sys.setswitchinterval(switch_interval_s)
    try:
        service.start()
        serving.set()
        service.serve(stop, reload)
    except KeyboardInterrupt:
        if not stop.is_set():  # a Ctrl-C of the embedding program, not our stop signal
            raise
    finally:
        service.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.setswitchinterval(interval)
    return 0
