"""The evaluator scores what it is given correctly: fixed detections go through the real pass
(images decoded and handed over in order) and the real pycocotools scoring, on a set of drawn
shapes whose boxes are the labels. The expected values are computed here, independently."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from coco_shapes import make_set
from codetr_stream.compile.coco_classes import COCO_CLASSES
from codetr_stream.daemon.accuracy.coco import METRICS, DatasetError, GroundTruth, load_annotations
from codetr_stream.daemon.accuracy.evaluate import evaluate
from codetr_stream.daemon.accuracy.image_set import check_images, scan_images

THRESHOLDS = np.linspace(0.5, 0.95, 10)


class FixedDetector:
    """Answers each image with given rows, in order, and checks it gets the set's images."""

    def __init__(self, rows: list[np.ndarray], sizes: list[tuple[int, int]],
                 class_names: tuple[str, ...] = COCO_CLASSES, name: str = "fixed") -> None:
        self.rows, self.sizes, self.class_names, self.name = rows, sizes, class_names, name
        self.batch_size = 3
        self.info = {"backend": "fixed"}
        self.seen = 0

    def detect(self, images: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for image in images:
            w, h = self.sizes[self.seen]
            assert image.shape == (h, w, 3) and image.dtype == np.uint8
            out.append(self.rows[self.seen])
            self.seen += 1
        return out


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> tuple[GroundTruth, list[Path]]:
    images, annotations = make_set(tmp_path_factory.mktemp("shapes"), COCO_CLASSES, images=9)
    truth = load_annotations(annotations)
    return truth, check_images(images, truth.images, str(annotations))


def _boxes(truth: GroundTruth) -> list[list[tuple[np.ndarray, int]]]:
    """Per image, its labelled boxes as (x1, y1, x2, y2) and the model's class index."""
    index = {cid: COCO_CLASSES.index(name) for cid, name in truth.categories.items()}
    per_image: dict[int, list] = {image.id: [] for image in truth.images}
    for a in truth.annotations:
        x, y, w, h = a["bbox"]
        per_image[a["image_id"]].append((np.array([x, y, x + w, y + h]),
                                         index[a["category_id"]]))
    return [per_image[image.id] for image in truth.images]


def _run(truth: GroundTruth, paths: list[Path], rows: list[np.ndarray]) -> dict:
    sizes = [(image.width, image.height) for image in truth.images]
    detector = FixedDetector(rows, sizes)
    report = evaluate([detector], truth.images, paths, source=truth.source, truth=truth,
                      progress=False)
    assert detector.seen == len(paths)
    return report.rows[0].ap


def test_ground_truth_as_detections_scores_ap_1(labelled) -> None:
    truth, paths = labelled
    areas = {a["area"] for a in truth.annotations}
    assert min(areas) < 32**2 and max(areas) > 96**2  # small, medium and large boxes
    assert {a["category_id"] for a in truth.annotations} >= {13, 18, 90}  # ids with gaps
    rng = np.random.default_rng(0)
    rows = [np.array([[*box, rng.uniform(0.1, 1.0), label] for box, label in image])
            for image in _boxes(truth)]
    assert _run(truth, paths, rows) == dict.fromkeys(METRICS, 1.0)


def test_no_detections_score_0(labelled) -> None:
    truth, paths = labelled
    assert _run(truth, paths, [np.zeros((0, 6))] * len(paths)) == dict.fromkeys(METRICS, 0.0)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return w * h / (area - w * h)


def _ap(found: list[tuple[float, float]], boxes: int, threshold: float) -> float:
    """COCO's AP of one class at one IoU threshold, written out: detections (score, IoU with
    the box they cover) by falling score, precision made non-increasing, read at recall
    0, 0.01, ..., 1 (0 past the highest recall reached)."""
    hits = np.array([iou >= threshold for _, iou in sorted(found, key=lambda f: -f[0])])
    tp = np.cumsum(hits)
    recall = tp / boxes
    precision = np.maximum.accumulate((tp / np.arange(1, len(hits) + 1))[::-1])[::-1]
    return float(np.mean([precision[np.argmax(recall >= r)] if (recall >= r).any() else 0.0
                          for r in np.linspace(0, 1, 101)]))


def test_shifted_boxes_score_the_ap_computed_independently(labelled) -> None:
    """Boxes moved sideways by a share of their width land at IoUs of (1 - f) / (1 + f):
    0.92, 0.79, 0.67, 0.54, so each counts at some of the ten IoU thresholds; others are
    missed, or far off, or given the wrong class. Scores are random."""
    truth, paths = labelled
    rng = np.random.default_rng(1)
    cases = ["0.04", "miss", "0.12", "0.2", "far", "0.3", "other-class", "0.12", "0.04"]
    rows, found, boxes = [], {}, {}
    for image in _boxes(truth):
        kept = []
        for box, label in image:
            case = cases[sum(map(len, boxes.values())) % len(cases)]
            boxes.setdefault(label, []).append(box)
            if case == "miss":
                continue
            shifted, detected = box.copy(), label
            width = box[2] - box[0]
            if case == "far":
                shifted -= 1000.0
            elif case == "other-class":
                detected = 40 if label != 40 else 41
            else:
                shifted[[0, 2]] += float(case) * width
            kept.append((shifted, detected))
        scores = rng.uniform(0.05, 1.0, len(kept))
        rows.append(np.array([[*b, s, c] for (b, c), s in zip(kept, scores, strict=True)])
                    .reshape(-1, 6))
        for (shifted, detected), score in zip(kept, scores, strict=True):
            same_image = [b for b, c in image if c == detected]
            ious = [*sorted((_iou(shifted, b) for b in same_image), reverse=True), 0.0, 0.0]
            assert ious[1] < 0.5  # it can only ever match the box it came from
            found.setdefault(detected, []).append((score, ious[0]))
    assert all(min(abs(iou - t) for t in THRESHOLDS) > 1e-3
               for dets in found.values() for _, iou in dets)

    def expected(thresholds: np.ndarray) -> float:
        return float(np.mean([np.mean([_ap(found.get(c, []), len(b), t) for c, b in boxes.items()])
                              for t in thresholds]))

    ap = _run(truth, paths, rows)
    want = {"AP": expected(THRESHOLDS), "AP50": expected(THRESHOLDS[:1]),
            "AP75": expected(THRESHOLDS[5:6])}
    assert all(0.1 < v < 0.95 for v in want.values())
    assert {k: ap[k] for k in want} == pytest.approx(want, abs=1e-9)


def test_reference_mode_scores_agreement_with_the_first_detector(labelled) -> None:
    """No labels: the images are the directory's, the reference's detections with score >= 0.5
    the truth. The reference itself scores 1.0, its confident boxes alone 1.0, nothing 0."""
    truth, paths = labelled
    images = scan_images(paths[0].parent)
    assert [(i.file_name, i.width, i.height) for i in images] == [
        (i.file_name, i.width, i.height) for i in truth.images]
    sizes = [(image.width, image.height) for image in images]
    confident = [np.array([[*box, 0.9, label] for box, label in image]).reshape(-1, 6)
                 for image in _boxes(truth)]
    echo = np.array([5, 5, 5, 5, -0.8, 0])  # a shifted duplicate at score 0.1
    noisy = [np.concatenate([rows, rows[:1] + echo]) for rows in confident]
    detectors = [FixedDetector(noisy, sizes, name="ref"), FixedDetector(confident, sizes),
                 FixedDetector([np.zeros((0, 6))] * len(paths), sizes, name="none")]
    report = evaluate(detectors, images, paths, source="shapes", reference_score=0.5,
                      progress=False)
    assert report.reference == "ref" and report.labels is None
    assert [r.agreement["AP"] for r in report.rows] == [1.0, 1.0, 0.0]
    assert all(r.ap is None for r in report.rows)


def test_categories_the_model_lacks_are_an_error_naming_the_file(labelled) -> None:
    truth, paths = labelled
    detector = FixedDetector([], [], class_names=("cat", "dog"), name="pets.engine")
    with pytest.raises(DatasetError, match=f"^{truth.source}: categories 'person', "
                       r"'car', 'stop sign', \.\.\. are not classes of pets.engine"):
        evaluate([detector], truth.images, paths, source=truth.source, truth=truth)
