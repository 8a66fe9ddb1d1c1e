"""Post-processing: the official class-aware NMS, filters, and boxes in original frame pixels."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from codetr_stream.compile.coco_classes import COCO_CLASSES
from codetr_stream.daemon.config.schema import StreamConfig
from codetr_stream.daemon.pipeline import postprocess as postprocess_module
from codetr_stream.daemon.pipeline.postprocess import (
    IOU_THRESHOLD,
    FrameFilter,
    batched_nms,
    batched_nms_torch,
    finish,
    points_in_polygon,
    postprocess,
    select,
    select_batch,
    unpack,
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
    polygon = np.array([[0, 0], [0.5, 0], [0.5, 0.5], [1, 0.5], [1, 1], [0, 1.]], np.float32)
    points = np.array([[0.25, 0.25], [0.75, 0.25], [0.75, 0.75], [1.5, 0.75]], np.float32)
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


# ---- the batched path: select_batch (+ unpack, finish) against the per-frame reference ----

NUM_CLASSES = 5
FILTERS = [FrameFilter(0.0), FrameFilter(0.3), FrameFilter(0.1, frozenset({0, 2})),
           FrameFilter(float("inf")), FrameFilter(0.7, frozenset({1, 4}))]
SCALES = [(0.6, 0.6), (0.5, 0.25), (1.0, 1.0), (2.0, 2.0), (1.6, 1.6)]
SIZES = [(900, 900), (1000, 2000), (300, 300), (640, 480), (640, 480)]


def batch_case(dtype: torch.dtype = torch.float32, k: int = 120,
               ties: bool = False) -> tuple[torch.Tensor, ...]:
    """Engine-like outputs for len(FILTERS) frames: clustered boxes (many IoUs near 0.8), labels
    past NUM_CLASSES (not in the model's names), scores quantised to force ties if `ties`."""
    frames = [clustered_boxes(k, seed, classes=NUM_CLASSES + 2) for seed in range(len(FILTERS))]
    boxes, scores, labels = (torch.stack(t) for t in zip(*frames, strict=True))
    if ties:
        scores = (scores * 8).round() / 8
    return boxes.to(dtype), scores.to(dtype), labels


def batched_against_per_frame(device: torch.device, fused: bool,
                              dtype: torch.dtype) -> list[bool]:
    """Per frame: do `select_batch`'s rows equal `select`'s (exactly)?

    `select`'s NMS is the pure-torch one here, the same arithmetic as the kernel: torchvision's
    (where installed) offsets each class's boxes, which moves IoUs by a rounding error, and its
    tie order is its sort's.
    """
    boxes, scores, labels = (t.to(device) for t in batch_case(dtype))
    packed = select_batch(boxes, scores, labels, FILTERS, scales=SCALES, frame_sizes=SIZES,
                          num_classes=NUM_CLASSES, fused=fused)
    got = unpack(packed.cpu().numpy())
    equal = []
    with mock.patch.object(postprocess_module, "_torchvision_batched_nms", lambda: None):
        for i, keep in enumerate(FILTERS):
            want = select(boxes[i], scores[i], labels[i], keep, scale=SCALES[i],
                          frame_size=SIZES[i]).cpu().numpy()
            equal.append(got[i].shape == want.shape and bool((got[i] == want).all()))
    return equal


def test_batched_rows_equal_the_per_frame_reference_on_the_cpu() -> None:
    assert batched_against_per_frame(torch.device("cpu"), False, torch.float32) == [True] * 5


def test_batched_path_publishes_what_postprocess_publishes() -> None:
    """select_batch -> unpack -> finish equals `postprocess` frame by frame, ROI included."""
    boxes, scores, labels = batch_case()
    names = COCO_CLASSES[:NUM_CLASSES]
    roi = {"points": [[0.1, 0.1], [0.9, 0.2], [0.7, 0.95], [0.05, 0.8]], "anchor": "center"}
    configs = [stream(min_score=0.2), stream(classes=["person", 2], roi=roi),
               stream(min_score=0.5, roi=roi), stream(classes=[4]), stream()]
    keeps = [FrameFilter.of(c, names) for c in configs]
    packed = select_batch(boxes, scores, labels, keeps, scales=SCALES, frame_sizes=SIZES,
                          num_classes=NUM_CLASSES)
    for i, rows in enumerate(unpack(packed.numpy())):
        got = finish(rows, frame_size=SIZES[i], roi=configs[i].roi, class_names=names)
        want = postprocess(boxes[i], scores[i], labels[i], scale=SCALES[i],
                           frame_size=SIZES[i], stream_cfg=configs[i], class_names=names)
        assert got == want and len(want) > 0, i
    assert keeps[1] == FrameFilter(0.0, frozenset({0, 2}))


def _interpret_select() -> dict:
    """Child process (TRITON_INTERPRET=1): the kernel on CPU tensors against `select`, and on
    tied scores against the greedy loop (ties go to the lower index, as a stable sort)."""
    cpu = torch.device("cpu")
    results = {str(dtype): batched_against_per_frame(cpu, True, dtype)
               for dtype in (torch.float32, torch.float16)}
    boxes, scores, labels = batch_case(ties=True)
    packed = select_batch(boxes, scores, labels, [FrameFilter(0.0)] * len(FILTERS),
                          scales=[(1.0, 1.0)] * len(FILTERS), frame_sizes=[(10**4, 10**4)] * 5,
                          num_classes=NUM_CLASSES, fused=True)
    results["ties"] = [rows[:, 4].tolist() == scores[i][kept].tolist()
                       and rows[:, 5].tolist() == labels[i][kept].tolist()
                       for i, rows in enumerate(unpack(packed.numpy()))
                       for kept in [greedy_nms(boxes[i], scores[i], labels[i], IOU_THRESHOLD)]]
    return results


@pytest.mark.slow
def test_select_kernel_equals_the_reference_in_the_interpreter() -> None:
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[kernel]')")
    from interpret import run_interpreted

    results = run_interpreted("test_postprocess", "_interpret_select")
    assert results == {"torch.float32": [True] * 5, "torch.float16": [True] * 5,
                       "ties": [True] * 5}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_select_kernel_equals_the_reference_on_the_gpu(dtype: torch.dtype) -> None:
    assert batched_against_per_frame(torch.device("cuda"), True, dtype) == [True] * 5
