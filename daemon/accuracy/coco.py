"""COCO ground truth and the COCO box metric, through pycocotools (never a hand-written AP).

The annotation file is checked field by field before pycocotools sees it, so a broken file is
one line naming the record and the fix instead of a KeyError deep inside the library. A model
labels boxes with its own class index; `category_ids` maps those to the file's category ids by
class name (COCO's 80 classes carry ids 1..90 with gaps). AP follows pycocotools' defaults, the
COCO protocol: IoU 0.50:0.05:0.95, at most 100 detections per image.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class DatasetError(ValueError):
    """A labelled set that cannot be evaluated (annotation file, its images, its categories)."""


@dataclass(frozen=True)
class ImageEntry:
    id: int
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class GroundTruth:
    """Boxes to score against: from an annotation file, or a reference engine's detections.

    `source` names where they came from in messages; `annotations` are COCO records (bbox
    x, y, w, h in image pixels, area, iscrowd).
    """

    source: str
    images: list[ImageEntry]
    categories: dict[int, str]
    annotations: list[dict[str, Any]]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _records(data: dict[str, Any], key: str, path: Path) -> list[dict[str, Any]]:
    records = data.get(key)
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DatasetError(f"{path}: '{key}' must be a list of objects; pass a COCO instances "
                           "file (annotations/instances_val2017.json)")
    return records


def _field(record: dict[str, Any], where: str, name: str, ok: Any, want: str,
           path: Path) -> Any:
    value = record.get(name)
    if not ok(value):
        raise DatasetError(f"{path}: {where}.{name} must be {want}, got {value!r}; fix that "
                           "record")
    return value


def load_annotations(path: Path) -> GroundTruth:
    """Read and check a COCO instances file (images, categories, annotations with bbox).

    `area` defaults to the box's area and `iscrowd` to 0, so a hand-made set needs neither.
    """
    try:
        data = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such annotation file; pass a COCO instances JSON "
                           "(e.g. annotations/instances_val2017.json)") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read it ({exc.strerror}); pass a readable COCO "
                           "instances JSON") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc}); pass a COCO instances "
                           "file") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: not a COCO instances file (a JSON object with images, "
                           "annotations and categories)")
    images = []
    for i, rec in enumerate(_records(data, "images", path)):
        where = f"images[{i}]"
        positive = "a positive integer"
        images.append(ImageEntry(
            _field(rec, where, "id", _is_int, "an integer", path),
            _field(rec, where, "file_name", lambda v: isinstance(v, str) and v, "a file name",
                   path),
            _field(rec, where, "width", lambda v: _is_int(v) and v > 0, positive, path),
            _field(rec, where, "height", lambda v: _is_int(v) and v > 0, positive, path)))
    categories: dict[int, str] = {}
    for i, rec in enumerate(_records(data, "categories", path)):
        cid = _field(rec, f"categories[{i}]", "id", _is_int, "an integer", path)
        categories[cid] = _field(rec, f"categories[{i}]", "name",
                                 lambda v: isinstance(v, str) and v, "a class name", path)
    image_ids = {image.id for image in images}
    if len(image_ids) != len(images) or len(categories) != len(set(categories.values())):
        raise DatasetError(f"{path}: image ids or category ids/names repeat; each must be "
                           "unique")
    annotations = []
    for i, rec in enumerate(_records(data, "annotations", path)):
        where = f"annotations[{i}]"
        bbox = _field(rec, where, "bbox", lambda v: isinstance(v, list) and len(v) == 4
                      and all(map(_is_number, v)) and v[2] >= 0 and v[3] >= 0,
                      "[x, y, width, height] with width, height >= 0", path)
        annotations.append({
            "id": _field(rec, where, "id", _is_int, "an integer", path),
            "image_id": _field(rec, where, "image_id", lambda v: _is_int(v) and v in image_ids,
                               "the id of an entry in 'images'", path),
            "category_id": _field(rec, where, "category_id",
                                  lambda v: _is_int(v) and v in categories,
                                  "the id of an entry in 'categories'", path),
            "bbox": [float(v) for v in bbox],
            "area": float(rec["area"] if _is_number(rec.get("area")) else bbox[2] * bbox[3]),
            "iscrowd": 1 if rec.get("iscrowd") else 0,
        })
    return GroundTruth(str(path), images, categories, annotations)


def _some(names: Sequence[str]) -> str:
    return ", ".join(map(repr, names[:3])) + (", ..." if len(names) > 3 else "")


def category_ids(class_names: Sequence[str], truth: GroundTruth, model: str) -> np.ndarray:
    """Model class index -> the ground truth's category id (-1: a class the set does not have).

    Every category that has boxes must be a class of the model: otherwise its boxes could
    never be found and AP would be silently low.
    """
    by_name = {name: cid for cid, name in truth.categories.items()}
    labelled = {a["category_id"] for a in truth.annotations}
    unknown = [name for cid, name in truth.categories.items()
               if cid in labelled and name not in class_names]
    if unknown:
        raise DatasetError(
            f"{truth.source}: categories {_some(unknown)} are not classes of {model} (which "
            f"has {len(class_names)} classes: {_some(class_names)}); evaluate on a set labelled "
            "with the model's class names, or rename/remove those categories")
    return np.array([by_name.get(name, -1) for name in class_names], dtype=np.int64)


def to_results(image_id: int, rows: np.ndarray, categories: np.ndarray) -> list[dict[str, Any]]:
    """One image's (m, 6) rows x1, y1, x2, y2, score, class index -> COCO result records
    (classes the ground truth lacks are left out)."""
    labels = rows[:, 5].astype(np.int64)
    known = (labels >= 0) & (labels < len(categories))
    rows, cats = rows[known], categories[labels[known]]
    return [{"image_id": image_id, "category_id": int(cid), "score": float(score),
             "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]}
            for (x1, y1, x2, y2, score, _), cid in zip(rows.tolist(), cats.tolist(), strict=True)
            if cid >= 0]


def reference_truth(source: str, images: Sequence[ImageEntry],
                    detections: Mapping[int, np.ndarray], class_names: Sequence[str],
                    min_score: float) -> GroundTruth:
    """A reference engine's detections with score >= `min_score` as ground truth, categories
    numbered by class index + 1: agreement AP needs no labels."""
    annotations = []
    categories = np.arange(1, len(class_names) + 1)
    for image in images:
        rows = detections[image.id]
        for record in to_results(image.id, rows[rows[:, 4] >= min_score], categories):
            record.pop("score")
            w, h = record["bbox"][2:]
            record.update(id=len(annotations) + 1, area=w * h, iscrowd=0)
            annotations.append(record)
    return GroundTruth(source, list(images), dict(enumerate(class_names, 1)), annotations)


def _coco(truth: GroundTruth, annotations: list[dict[str, Any]]) -> Any:
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {"images": [vars(image) for image in truth.images],
                    "categories": [{"id": k, "name": v} for k, v in truth.categories.items()],
                    "annotations": annotations}
    coco.createIndex()
    return coco


def box_ap(truth: GroundTruth, results: list[dict[str, Any]]) -> dict[str, float | None]:
    """COCOeval "bbox" over `truth.images`: AP, AP50, AP75, AP small/medium/large; None where
    the set has no box of that size (pycocotools' -1)."""
    from pycocotools.cocoeval import COCOeval

    found = [{**r, "id": i, "area": r["bbox"][2] * r["bbox"][3], "iscrowd": 0}
             for i, r in enumerate(results, 1)]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
        evaluation = COCOeval(_coco(truth, truth.annotations), _coco(truth, found), "bbox")
        evaluation.params.imgIds = [image.id for image in truth.images]
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {name: None if value < 0 else float(value)
            for name, value in zip(METRICS, evaluation.stats[:6], strict=True)}
