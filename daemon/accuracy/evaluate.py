"""Accuracy of engines on one image set, side by side (`codetr-stream eval`).

A `Detector` turns RGB images into each image's detections in its own pixels: (m, 6) rows x1,
y1, x2, y2, score, class index. `EngineDetector` is an engine directory behind the daemon's own
`Runner`, so what is scored is what the daemon would publish: the same preprocessing (keep-ratio
resize, pad, normalise; portrait images letterboxed), the same class-aware NMS (IoU 0.8) and
scaling back to the image, with no score threshold. Anything else with `detect` (the tests' fixed
detections) goes through the same pass and the same pycocotools scoring.

Each detector is loaded, run over the set, scored and released before the next one loads, so
engines do not hold GPU memory side by side. With a reference, the first detector's confident
detections become the ground truth of an agreement AP: how far an FP16 engine strays from FP32,
no labels needed.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from codetr_stream.daemon.accuracy.coco import (
    METRICS,
    DatasetError,
    GroundTruth,
    ImageEntry,
    box_ap,
    category_ids,
    reference_truth,
    to_results,
)
from codetr_stream.daemon.accuracy.image_set import decoded_batches
from codetr_stream.daemon.pipeline.frames import Frame
from codetr_stream.daemon.pipeline.postprocess import FrameFilter
from codetr_stream.daemon.pipeline.runner import Runner
from tqdm import tqdm

KEEP_ALL = FrameFilter(0.0)


class Detector(Protocol):
    """What `evaluate` scores. `info` describes it in the report (backend, precision, ...)."""

    name: str
    class_names: Sequence[str]
    batch_size: int
    info: dict[str, Any]

    def detect(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """(H, W, 3) uint8 RGB images -> per image (m, 6) float rows in its pixels."""
        ...


def _on(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class EngineDetector:
    """An engine directory through the daemon's `Runner` (warmed up before anything is timed).

    Loading checks the manifest as the daemon does: an engine built for another GPU or library
    version raises `IncompatibleEngine` with the command that rebuilds it.
    """

    def __init__(self, path: Path, device: torch.device, *, batch_size: int | None = None,
                 name: str | None = None) -> None:
        self.device = device
        with _on(device):
            self.runner = Runner(path, device)
            self.runner.warm_up()
        manifest = self.runner.engine.manifest
        self.name = name or str(path)
        self.class_names = self.runner.class_names
        largest = self.runner.batch_sizes[-1]
        self.batch_size = min(batch_size or largest, largest)
        h, w = manifest.input_hw
        self.info = {"engine": str(path), "backend": manifest.backend,
                     "precision": manifest.precision, "input": f"{w}x{h}",
                     "batch_size": self.batch_size, "device": str(device),
                     "random_weights": manifest.random_weights}

    def detect(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        frames = [Frame("eval", i, None, 0, torch.from_numpy(image), "rgb24", *image.shape[:2])
                  for i, image in enumerate(images)]
        with _on(self.device):
            out = self.runner.run(frames, [KEEP_ALL] * len(frames))
        return [rows.copy() for rows in out.rows]


def eager_engine(config: str, weights: Path, out: Path, *, input_hw: tuple[int, int],
                 batch_size: int) -> Path:
    """The checkpoint as an FP32 eager engine in `out` (what `compile --backend eager` builds),
    the reference the compiled engines are measured against. Built on the CPU: the engine's
    weights are portable, and the GPU then holds only the copy that runs."""
    from codetr_stream.compile.build import build_model_engine
    from codetr_stream.compile.export import check_input_size
    from codetr_stream.compile.model_config import parse_config

    check_input_size(parse_config(config), input_hw)
    _, manifest = build_model_engine(config, out, checkpoint=weights, input_hw=input_hw,
                                     batch_sizes=[batch_size])
    if not manifest.class_names:
        raise DatasetError(f"{weights}: the checkpoint names no classes (meta.dataset_meta."
                           "classes), so its labels cannot be matched to categories; pass the "
                           "official checkpoint or an engine's weights.pt")
    return out


@dataclass
class Row:
    """One detector's line of the report; `ap` against the labels, `agreement` against the
    reference (None where not asked for)."""

    name: str
    info: dict[str, Any]
    images: int
    seconds: float
    ap: dict[str, float | None] | None = None
    agreement: dict[str, float | None] | None = None

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class Report:
    images: int
    labels: str | None  # the annotation file
    reference: str | None = None
    reference_score: float | None = None
    rows: list[Row] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "labels": self.labels, "reference": self.reference,
                "reference_score": self.reference_score, "metric": "COCO box AP (pycocotools)",
                "rows": [{"name": r.name, **r.info, "images": r.images,
                          "seconds": round(r.seconds, 3),
                          "images_per_s": round(r.images_per_s, 2), "ap": r.ap,
                          "agreement": r.agreement} for r in self.rows]}

    def to_markdown(self) -> str:
        def table(key: str) -> list[str]:
            lines = ["| engine | backend | precision | batch | images/s | "
                     + " | ".join(METRICS) + " |", "|---" * (5 + len(METRICS)) + "|"]
            for r in self.rows:
                values = getattr(r, key)
                cells = ["-" if values[m] is None else f"{100 * values[m]:.1f}" for m in METRICS]
                lines.append(f"| {r.name} | {r.info.get('backend', '-')} | "
                             f"{r.info.get('precision', '-')} | {r.info.get('batch_size', '-')} "
                             f"| {r.images_per_s:.2f} | " + " | ".join(cells) + " |")
            return lines

        out = []
        if self.labels is not None:
            out += [f"COCO box AP (%) on {self.images} images of {self.labels}:", "",
                    *table("ap"), ""]
        if self.reference is not None:
            out += [f"Agreement AP (%) on {self.images} images: {self.reference}'s detections "
                    f"with score >= {self.reference_score:g} as ground truth:", "",
                    *table("agreement"), ""]
        random = [r.name for r in self.rows if r.info.get("random_weights")]
        if random:
            out.append(f"RANDOM weights (meaningless AP): {', '.join(random)}")
        return "\n".join(out).rstrip() + "\n"


@dataclass
class _Pass:
    detections: dict[int, np.ndarray]
    seconds: float


def _run(detector: Detector, images: Sequence[ImageEntry], paths: Sequence[Path], source: str,
         progress: bool) -> _Pass:
    detections: dict[int, np.ndarray] = {}
    seconds, done = 0.0, 0
    batches = decoded_batches(paths, detector.batch_size, source)
    with tqdm(total=len(paths), desc=detector.name, unit="img", disable=not progress,
              file=sys.stderr, leave=False) as bar:
        for pixels in batches:
            started = time.perf_counter()
            rows = detector.detect(pixels)
            seconds += time.perf_counter() - started
            for entry, found in zip(images[done:done + len(pixels)], rows, strict=True):
                detections[entry.id] = found
            done += len(pixels)
            bar.update(len(pixels))
            bar.set_postfix_str(f"{done / max(seconds, 1e-9):.1f} img/s (engine path)")
    return _Pass(detections, seconds)


def _results(detections: dict[int, np.ndarray], categories: np.ndarray) -> list[dict[str, Any]]:
    return [r for image_id, rows in detections.items()
            for r in to_results(image_id, rows, categories)]


def evaluate(detectors: Iterable[Detector], images: Sequence[ImageEntry],
             paths: Sequence[Path], *, source: str, truth: GroundTruth | None = None,
             reference_score: float | None = None, progress: bool = True) -> Report:
    """Run each detector over the images (in order; `paths` are their files) and score it
    against `truth`, and/or against the first detector's detections with score >=
    `reference_score`. Detectors are pulled from the iterable one at a time, so a generator
    loads each engine only after the previous one is done."""
    if truth is not None:
        truth = replace(truth, images=list(images))
    report = Report(len(images), truth.source if truth is not None else None,
                    reference_score=reference_score)
    reference: tuple[GroundTruth, list[str]] | None = None
    for detector in detectors:
        names = list(detector.class_names)
        categories = category_ids(names, truth, detector.name) if truth is not None else None
        if reference is not None and names != reference[1]:
            raise DatasetError(f"{detector.name}: its class names differ from those of the "
                               f"reference {report.reference}; agreement AP compares engines "
                               "of one model")
        done = _run(detector, images, paths, source, progress)
        row = Row(detector.name, dict(detector.info), len(images), done.seconds)
        if categories is not None:
            row.ap = box_ap(truth, _results(done.detections, categories))
        if reference_score is not None:
            if reference is None:
                report.reference = detector.name
                reference = (reference_truth(f"reference {detector.name}", images,
                                             done.detections, names, reference_score), names)
            row.agreement = box_ap(reference[0], _results(done.detections,
                                                          np.arange(1, len(names) + 1)))
        report.rows.append(row)
        del detector, done  # the next engine loads into the memory this one held
        gc.collect()  # compiled engines hold reference cycles
    return report
