"""Post-processing: the official class-aware NMS, filters, and boxes in original frame pixels."""

from __future__ import annotations

import pytest
import torch
from codetr_stream.daemon.config import StreamConfig
from codetr_stream.daemon.detections import COCO_CLASSES
from codetr_stream.daemon.postprocess import (
    IOU_THRESHOLD,
    batched_nms,
    batched_nms_torch,
    points_in_polygon,
    postprocess,
)


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
               threshold: float) -> list[int]:
    """The textbook loop in plain Python floats, one box at a time: the independent reference."""

    def iou(a: list[float], b: list[float]) -> float:
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
        return w * h / union

    box, score, label = boxes.tolist(), scores.tolist(), labels.tolist()
    kept: list[int] = []
    for i in sorted(range(len(score)), key=lambda i: -score[i]):
        if all(label[i] != label[j] or iou(box[i], box[j]) <= threshold for j in kept):
            kept.append(i)
    return kept


def clustered_boxes(n: int, seed: int, classes: int = 3) -> tuple[torch.Tensor, ...]:
    """Jittered copies of a few boxes, so many pairs overlap around the 0.8 IoU threshold."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(6, 2, generator=g) * 500
    pick = torch.randint(0, 6, (n,), generator=g)
    size = 40 + torch.rand(n, 2, generator=g) * 10
    xy = centres[pick] + torch.randn(n, 2, generator=g) * 3
    boxes = torch.cat([xy, xy + size], dim=1)
    return boxes, torch.rand(n, generator=g), torch.randint(0, classes, (n,), generator=g)


def stream(**kwargs) -> StreamConfig:
    return StreamConfig(name="cam1", url="rtsp://h/", **{"min_score": 0.0, **kwargs})


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("threshold", [0.5, IOU_THRESHOLD])
def test_nms_equals_the_greedy_loop(seed: int, threshold: float) -> None:
    boxes, scores, labels = clustered_boxes(300, seed)
    expected = greedy_nms(boxes, scores, labels, threshold)
    kept = batched_nms_torch(boxes, scores, labels, threshold)
    assert kept.tolist() == expected
    assert 0 < len(expected) < 300  # the case suppresses something and keeps something


def test_nms_is_class_aware() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10.5], [0, 0, 10, 10]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7])
    kept = batched_nms_torch(boxes, scores, torch.tensor([1, 1, 2]), IOU_THRESHOLD)
    assert kept.tolist() == [0, 2]  # the second box of class 1 goes, class 2 stays
    assert batched_nms_torch(boxes[:0], scores[:0], scores[:0].long(), 0.8).tolist() == []


def test_pure_torch_nms_agrees_with_torchvision() -> None:
    ops = pytest.importorskip("torchvision.ops", reason="torchvision not installed (CPU CI)")
    for seed in range(5):
        boxes, scores, labels = clustered_boxes(300, seed)
        expected = ops.batched_nms(boxes, scores, labels, IOU_THRESHOLD)
        assert batched_nms_torch(boxes, scores, labels, IOU_THRESHOLD).tolist() == expected.tolist()


def test_tiny_model_outputs_through_postprocess(data_dir) -> None:
    vectors = torch.load(data_dir / "tiny_vectors.pt", map_location="cpu", weights_only=True)
    boxes, scores, labels = vectors["B_boxes"][0], vectors["B_scores"][0], vectors["B_labels"][0]
    detections = postprocess(boxes, scores, labels, scale=0.5, frame_size=(640, 640),
                             stream_cfg=stream(), class_names=COCO_CLASSES)
    kept = greedy_nms(boxes, scores, labels, IOU_THRESHOLD)
    assert [d.class_id for d in detections] == labels[kept].tolist()
    got = torch.tensor([d.box for d in detections])
    torch.testing.assert_close(got, (boxes[kept] * 2).clamp(0, 640), atol=0.005, rtol=0)
    assert [d.score for d in detections] == pytest.approx(scores[kept].tolist(), abs=5e-6)
    assert all(d.class_name == COCO_CLASSES[d.class_id] for d in detections)


def test_threshold_and_class_allow_list() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70.]])
    scores = torch.tensor([0.9, 0.6, 0.5, 0.2])
    labels = torch.tensor([0, 2, 7, 0])
    args = dict(scale=1.0, frame_size=(100, 100), class_names=COCO_CLASSES)
    kept = postprocess(boxes, scores, labels, stream_cfg=stream(min_score=0.3), **args)
    assert [d.class_name for d in kept] == ["person", "car", "truck"]
    kept = postprocess(boxes, scores, labels, stream_cfg=stream(classes=["truck", 0]), **args)
    assert [(d.class_name, round(d.score, 2)) for d in kept] == [
        ("person", 0.9), ("truck", 0.5), ("person", 0.2)]


def test_boxes_map_to_frame_pixels_per_axis_and_are_clamped() -> None:
    boxes = torch.tensor([[-4.0, 10.0, 60.0, 30.0], [100.0, 50.0, 700.0, 400.0]])
    out = postprocess(boxes, torch.tensor([0.9, 0.8]), torch.tensor([0, 1]),
                      scale=(0.5, 0.25), frame_size=(1000, 1000), stream_cfg=stream(),
                      class_names=COCO_CLASSES)
    assert [d.box for d in out] == [(0.0, 40.0, 120.0, 120.0), (200.0, 200.0, 1000.0, 1000.0)]


def test_points_in_polygon_concave() -> None:
    # An L shape: the notch at the top right is outside.
    polygon = torch.tensor([[0, 0], [0.5, 0], [0.5, 0.5], [1, 0.5], [1, 1], [0, 1.]])
    points = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.75, 0.75], [1.5, 0.75]])
    assert points_in_polygon(points, polygon).tolist() == [True, False, True, False]


def test_roi_anchor_bottom_center_or_center() -> None:
    # A box spanning the top half to just below the middle: centre above, bottom below y=0.5.
    boxes = torch.tensor([[40.0, 10.0, 60.0, 60.0]])
    lower_half = {"points": [[0, 0.5], [1, 0.5], [1, 1], [0, 1]]}
    args = dict(scale=1.0, frame_size=(100, 100), class_names=COCO_CLASSES)
    one = (boxes, torch.tensor([0.9]), torch.tensor([0]))
    assert len(postprocess(*one, stream_cfg=stream(roi=lower_half), **args)) == 1
    centre = {**lower_half, "anchor": "center"}
    assert postprocess(*one, stream_cfg=stream(roi=centre), **args) == []


def test_full_frame_roi_keeps_boxes_touching_the_frame_edges() -> None:
    boxes = torch.tensor([[0.0, 0.0, 20.0, 100.0], [80.0, 0.0, 100.0, 100.0], [0.0, 0.0, 100, 100]])
    full = {"points": [[0, 0], [1, 0], [1, 1], [0, 1]]}
    out = postprocess(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 1, 2]), scale=1.0,
                      frame_size=(100, 100), stream_cfg=stream(roi=full), class_names=COCO_CLASSES)
    assert len(out) == 3


def test_roi_applies_after_nms() -> None:
    # Two near-identical boxes: the better one's bottom-centre is outside the ROI, the duplicate's
    # inside. NMS removes the duplicate first, so nothing is published, as on a cropped frame.
    boxes = torch.tensor([[10.0, 10.0, 50.0, 49.0], [10.0, 10.0, 50.0, 52.0]])
    roi = {"points": [[0, 0.5], [1, 0.5], [1, 1], [0, 1]]}
    out = postprocess(boxes, torch.tensor([0.9, 0.8]), torch.tensor([0, 0]), scale=1.0,
                      frame_size=(100, 100), stream_cfg=stream(roi=roi), class_names=COCO_CLASSES)
    assert out == []


def test_half_precision_outputs_and_unknown_label_names() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float16)
    out = postprocess(boxes, torch.tensor([0.5], dtype=torch.float16), torch.tensor([3]),
                      scale=1.0, frame_size=(20, 20), stream_cfg=stream(),
                      class_names=("a", "b"))
    assert out[0].class_name == "3" and out[0].box == (0.0, 0.0, 10.0, 10.0)


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    boxes, scores, labels = clustered_boxes(300, seed=7)
    roi = {"points": [[0, 0], [0.8, 0], [0.8, 0.9], [0, 0.9]]}
    args = dict(scale=(0.6, 0.6), frame_size=(900, 900), class_names=COCO_CLASSES,
                stream_cfg=stream(min_score=0.2, roi=roi, classes=[0, 1]))
    on_cpu = postprocess(boxes, scores, labels, **args)
    on_gpu = postprocess(boxes.cuda(), scores.cuda(), labels.cuda(), **args)
    assert [d.class_id for d in on_gpu] == [d.class_id for d in on_cpu]
    torch.testing.assert_close(torch.tensor([d.box for d in on_gpu]),
                               torch.tensor([d.box for d in on_cpu]))
    kept = batched_nms_torch(boxes.cuda(), scores.cuda(), labels.cuda(), IOU_THRESHOLD)
    assert kept.tolist() == batched_nms(boxes, scores, labels, IOU_THRESHOLD).tolist()
