"""The engine runner: one place that owns the engine, its input buffers and the CUDA stream.

Input buffers are allocated once, at the largest batch size, and preprocessing writes into them;
each batch runs at the smallest compiled batch size that holds it (padding rows stay zero with an
all-valid mask, the engine's own convention). Given each frame's `FrameFilter`, the batch's
threshold, class filter, NMS and scaling to frame pixels run where the engine's outputs are
(`postprocess.select_batch`); without, the raw outputs are returned. Either way they come back to
the host in one transfer of a few tens of KB, after which the batch's device work is finished by
construction.

On a GPU, `submit` only queues the work and returns: the caller publishes the previous batch while
the engine runs this one, so the GPU waits for the host only as long as the next batch takes to
launch (a handful of launches: preprocessing is one kernel, postprocessing another).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from codetr_stream.daemon.pipeline.batcher import pick_batch_size
from codetr_stream.daemon.pipeline.frames import Frame
from codetr_stream.daemon.pipeline.postprocess import FrameFilter, select_batch, unpack
from codetr_stream.daemon.pipeline.preprocess import Preprocessor


@dataclass
class BatchOutput:
    """Host copies of one batch's outputs (real frames only) and where the time went.

    Submitted with filters: `rows`, each frame's `postprocess.select` rows (before the ROI).
    Without: the engine's raw `boxes` (n, K, 4) float32 in input pixels, `scores` (n, K) and
    `labels` (n, K) int64. Stage times are the batch's: CUDA events on a GPU, wall clock on a CPU;
    `postprocess_ms` covers the device postprocessing and the read-back.
    """

    scales: list[tuple[float, float]]
    batch_size: int  # the compiled size that ran (>= n)
    preprocess_ms: float
    infer_ms: float
    postprocess_ms: float
    rows: list[np.ndarray] | None = None
    boxes: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    labels: torch.Tensor | None = None


class Runner:
    def __init__(self, engine_path: str | Path, device: torch.device) -> None:
        from codetr_stream.compile.engines import load_engine

        self.device = device
        self.engine = load_engine(engine_path, device)
        manifest = self.engine.manifest
        self.batch_sizes = sorted(manifest.batch_sizes)
        self.input_hw = tuple(manifest.input_hw)
        self.class_names = list(manifest.class_names)
        h, w = self.input_hw
        largest = self.batch_sizes[-1]
        self.images = torch.zeros((largest, 3, h, w), dtype=torch.float32, device=device)
        self.masks = torch.zeros((largest, h, w), dtype=torch.bool, device=device)
        self.preprocess = Preprocessor(self.input_hw, device)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def warm_up(self) -> None:
        """Run every batch size once (padding rows only) through preprocessing, the engine and
        postprocessing, so the first camera frame pays for no lazy init or kernel compile."""
        for b in self.batch_sizes:
            self.preprocess([], self.images, self.masks, rows=b)
            boxes, scores, labels = self._infer(b)
            select_batch(boxes, scores, labels, [FrameFilter(0.0)] * b, scales=[(1.0, 1.0)] * b,
                         frame_sizes=[(1, 1)] * b, num_classes=len(self.class_names))
        if self.stream is not None:
            self.stream.synchronize()

    def _infer(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.engine.infer(self.images[:batch], self.masks[:batch])

    @property
    def asynchronous(self) -> bool:
        """Whether `submit` returns before the batch has run (GPU) or after (CPU)."""
        return self.stream is not None

    def submit(self, frames: Sequence[Frame],
               filters: Sequence[FrameFilter] | None = None) -> PendingBatch:
        """Queue preprocessing, the engine, postprocessing (with `filters`, one per frame) and
        the read-back of one batch on the runner's stream."""
        n = len(frames)
        batch = pick_batch_size(n, self.batch_sizes)
        clock = _Clock(self.stream)
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            clock.mark()
            scales = self.preprocess(frames, self.images, self.masks, rows=batch)
            clock.mark()
            boxes, scores, labels = self._infer(batch)
            clock.mark()
            if filters is not None:
                packed = select_batch(boxes, scores, labels, filters, scales=scales,
                                      frame_sizes=[(f.width, f.height) for f in frames],
                                      num_classes=len(self.class_names))
            else:  # labels < 2**24 are exact in float32
                packed = torch.cat([boxes[:n].float().flatten(1), scores[:n].float(),
                                    labels[:n].float()], dim=1)
            # The one read-back, into pinned host memory on a GPU; the clock's last event says
            # when it has landed.
            packed = packed.to("cpu", non_blocking=True)
            clock.mark()
        return PendingBatch(packed, scores.shape[1], scales, batch, clock, filters is not None)

    def run(self, frames: Sequence[Frame],
            filters: Sequence[FrameFilter] | None = None) -> BatchOutput:
        """`submit` and wait."""
        return self.submit(frames, filters).result()


class PendingBatch:
    """A submitted batch; `result()` waits for its outputs to reach the host."""

    def __init__(self, packed: torch.Tensor, k: int, scales: list[tuple[float, float]],
                 batch: int, clock: _Clock, selected: bool) -> None:
        self._packed, self._k, self._scales = packed, k, scales
        self._batch, self._clock, self._selected = batch, clock, selected

    def result(self) -> BatchOutput:
        self._clock.wait()
        preprocess_ms, infer_ms, postprocess_ms = self._clock.elapsed_ms()
        out = BatchOutput(scales=self._scales, batch_size=self._batch,
                          preprocess_ms=preprocess_ms, infer_ms=infer_ms,
                          postprocess_ms=postprocess_ms)
        packed, k = self._packed, self._k
        if self._selected:
            out.rows = unpack(packed.numpy())
        else:
            n = packed.shape[0]
            out.boxes = packed[:, : 4 * k].view(n, k, 4)
            out.scores = packed[:, 4 * k: 5 * k]
            out.labels = packed[:, 5 * k:].long()
        return out


class _Clock:
    """Stage times: CUDA events on a GPU (device time, no extra sync), wall clock on a CPU."""

    def __init__(self, stream: torch.cuda.Stream | None) -> None:
        self.stream = stream
        self.marks: list = []

    def mark(self) -> None:
        if self.stream is None:
            self.marks.append(time.perf_counter())
        else:
            event = torch.cuda.Event(enable_timing=True)
            event.record(self.stream)
            self.marks.append(event)

    def wait(self) -> None:
        """Until the stream has passed the last mark (releases the GIL while it waits)."""
        if self.stream is not None:
            self.marks[-1].synchronize()

    def elapsed_ms(self) -> list[float]:
        pairs = zip(self.marks, self.marks[1:], strict=False)
        if self.stream is None:
            return [(b - a) * 1e3 for a, b in pairs]
        return [a.elapsed_time(b) for a, b in pairs]
