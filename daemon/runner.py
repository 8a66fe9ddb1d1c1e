"""The engine runner: one place that owns the engine, its input buffers and the CUDA stream.

Input buffers are allocated once, at the largest batch size, and preprocessing writes into them;
each batch runs at the smallest compiled batch size that holds it (padding rows stay zero with an
all-valid mask, the engine's own convention). Outputs are a few KB per batch and come back to the
host in one transfer, after which the batch's device work is finished by construction.

On a GPU, `submit` only queues the work and returns: the caller postprocesses and publishes the
previous batch while the engine runs this one, so the GPU waits for the host only as long as the
next batch's preprocessing takes to launch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from codetr_stream.daemon.batcher import pick_batch_size
from codetr_stream.daemon.frames import Frame
from codetr_stream.daemon.preprocess import Preprocessor


@dataclass
class BatchOutput:
    """Host copies of one batch's outputs (real frames only) and where the time went."""

    boxes: torch.Tensor  # (n, K, 4) float32, engine input pixels
    scores: torch.Tensor  # (n, K)
    labels: torch.Tensor  # (n, K) int64
    scales: list[tuple[float, float]]
    batch_size: int  # the compiled size that ran (>= n)
    preprocess_ms: float
    infer_ms: float


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
        """Run every batch size once so the first camera frame does not pay for lazy init."""
        for b in self.batch_sizes:
            self.images[:b].zero_()
            self.masks[:b].zero_()
            self._infer(b)
        if self.stream is not None:
            self.stream.synchronize()

    def _infer(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.engine.infer(self.images[:batch], self.masks[:batch])

    @property
    def asynchronous(self) -> bool:
        """Whether `submit` returns before the batch has run (GPU) or after (CPU)."""
        return self.stream is not None

    def submit(self, frames: Sequence[Frame]) -> PendingBatch:
        """Queue preprocessing, the engine and the read-back of one batch on the runner's stream."""
        n = len(frames)
        batch = pick_batch_size(n, self.batch_sizes)
        clock = _Clock(self.stream)
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            clock.mark()
            scales = self.preprocess(frames, self.images, self.masks)
            if batch > n:  # padding rows: zero images, all-valid masks
                self.images[n:batch].zero_()
                self.masks[n:batch].zero_()
            clock.mark()
            boxes, scores, labels = self._infer(batch)
            clock.mark()
            # The one read-back (labels < 2**24 are exact in float32), into pinned host memory
            # on a GPU; the clock's last event says when it has landed.
            packed = torch.cat([boxes[:n].float().flatten(1), scores[:n].float(),
                                labels[:n].float()], dim=1).to("cpu", non_blocking=True)
            clock.mark()
        return PendingBatch(packed, scores.shape[1], scales, batch, clock)

    def run(self, frames: Sequence[Frame]) -> BatchOutput:
        """`submit` and wait."""
        return self.submit(frames).result()


class PendingBatch:
    """A submitted batch; `result()` waits for its outputs to reach the host."""

    def __init__(self, packed: torch.Tensor, k: int, scales: list[tuple[float, float]],
                 batch: int, clock: _Clock) -> None:
        self._packed, self._k, self._scales = packed, k, scales
        self._batch, self._clock = batch, clock

    def result(self) -> BatchOutput:
        self._clock.wait()
        preprocess_ms, infer_ms, _ = self._clock.elapsed_ms()
        packed, k = self._packed, self._k
        n = packed.shape[0]
        return BatchOutput(
            boxes=packed[:, : 4 * k].view(n, k, 4), scores=packed[:, 4 * k: 5 * k],
            labels=packed[:, 5 * k:].long(), scales=self._scales, batch_size=self._batch,
            preprocess_ms=preprocess_ms, infer_ms=infer_ms)


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
