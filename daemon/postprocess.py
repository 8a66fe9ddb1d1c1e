"""From the engine's top-K to published detections: threshold, NMS, filters, original pixels.

Runs on whatever device the engine's outputs live on (pure torch), and reads back to the host
once per frame, after the last filter. The NMS is the official test-time one (model_facts.md §8):
class-aware hard NMS with IoU 0.8 over the score-thresholded top-K, as the reference inferencer
does with `torchvision.ops.batched_nms`. That kernel is used when torchvision imports (the GPU
machine has it); otherwise a pure-torch version runs, so the daemon does not depend on
torchvision. Tests check both agree where torchvision is installed.

Order matters only for the ROI: the class allow-list may go before NMS (class-aware NMS never lets
one class suppress another), but the ROI filter comes after it, so a box outside the ROI still
suppresses its duplicate inside, exactly as if the frame had been cropped after detection.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from codetr_stream.daemon.config import StreamConfig, resolve_class_ids
from codetr_stream.daemon.detections import Detection

IOU_THRESHOLD = 0.8
# Anchors are pulled this far inside the frame so a full-frame ROI keeps boxes touching its edge.
_EDGE = 1e-6


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes (N, 4) x (M, 4) -> (N, M), torchvision's formula."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    top_left = torch.max(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


@functools.cache
def _torchvision_batched_nms() -> Callable[..., torch.Tensor] | None:
    try:
        from torchvision.ops import batched_nms

        # A torchvision built for another torch imports but lacks its kernels: try one call.
        one = torch.zeros(1, 4)
        batched_nms(one, one[:, 0], one[:, 0].long(), IOU_THRESHOLD)
    except (ImportError, RuntimeError):
        return None
    return batched_nms


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Class-aware greedy NMS: torchvision's kernel when importable, else `batched_nms_torch`."""
    if (kernel := _torchvision_batched_nms()) is not None:
        return kernel(boxes, scores, labels, iou_threshold)
    return batched_nms_torch(boxes, scores, labels, iou_threshold)


def batched_nms_torch(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Indices kept by class-aware greedy NMS, by decreasing score (as torchvision's).

    Greedy NMS is sequential, but on a few hundred boxes the suppression matrix is tiny, so it is
    solved as a fixed point instead: a box survives iff no surviving higher-scored box of its class
    overlaps it by more than `iou_threshold`. Iterating that rule from "all survive" settles on the
    greedy answer after as many rounds as the longest suppression chain (a handful in practice),
    with no per-box Python loop and no host sync except the convergence check.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = scores.argsort(descending=True, stable=True)
    boxes, labels = boxes[order], labels[order]
    same_class = labels[:, None] == labels[None, :]
    suppresses = ((box_iou(boxes, boxes) > iou_threshold) & same_class).triu(diagonal=1)
    keep = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    for _ in range(len(order)):
        survivors = ~(suppresses & keep[:, None]).any(dim=0)
        if torch.equal(survivors, keep):
            break
        keep = survivors
    return order[keep]


def points_in_polygon(points: torch.Tensor, polygon: torch.Tensor) -> torch.Tensor:
    """Even-odd rule: (N, 2) points x (M, 2) polygon vertices -> (N,) bool."""
    x, y = points[:, :1], points[:, 1:]
    x0, y0 = polygon[:, 0], polygon[:, 1]
    x1, y1 = x0.roll(-1), y0.roll(-1)
    crosses = (y0 > y) != (y1 > y)
    x_cross = x0 + (y - y0) * (x1 - x0) / torch.where(y1 == y0, torch.ones_like(y0), y1 - y0)
    return ((crosses & (x < x_cross)).sum(dim=1) % 2) == 1


def postprocess(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    *,
    scale: float | tuple[float, float],
    frame_size: tuple[int, int],
    stream_cfg: StreamConfig,
    class_names: Sequence[str],
    iou_threshold: float = IOU_THRESHOLD,
) -> list[Detection]:
    """One frame's engine outputs -> its detections in original frame pixels.

    boxes (K, 4) xyxy in engine input pixels, scores (K,), labels (K,) int, on any device.
    `scale` is the preprocessing resize factor (input px = frame px * scale), one for both axes
    with a keep-ratio resize or (sx, sy); `frame_size` is the ORIGINAL frame's (width, height).
    Boxes are clamped to the frame and rounded to 0.01 px, scores to 1e-5. Detections come out
    by decreasing score.
    """
    width, height = frame_size
    keep = scores >= stream_cfg.min_score
    if stream_cfg.classes is not None:
        allowed = resolve_class_ids(tuple(stream_cfg.classes), tuple(class_names))
        keep &= torch.isin(labels, torch.tensor(sorted(allowed), device=labels.device))
    index = keep.nonzero().squeeze(1)
    boxes, scores, labels = boxes[index].float(), scores[index].float(), labels[index]
    index = batched_nms(boxes, scores, labels, iou_threshold)
    boxes, scores, labels = boxes[index], scores[index], labels[index]

    sx, sy = (scale, scale) if isinstance(scale, int | float) else scale
    boxes = boxes / boxes.new_tensor([sx, sy, sx, sy])
    limits = boxes.new_tensor([width, height, width, height])
    boxes = boxes.clamp(min=0).minimum(limits)
    if stream_cfg.roi is not None:
        bottom = stream_cfg.roi.anchor == "bottom_center"
        anchor_y = boxes[:, 3] if bottom else boxes[:, 1::2].mean(1)
        anchors = torch.stack([boxes[:, 0::2].mean(1), anchor_y], dim=1) / limits[:2]
        polygon = boxes.new_tensor(stream_cfg.roi.points)
        inside = points_in_polygon(anchors.clamp(_EDGE, 1 - _EDGE), polygon)
        boxes, scores, labels = boxes[inside], scores[inside], labels[inside]

    # One read-back per frame. Rounded here, vectorised in float64, so the JSON stays short
    # (0.01 px, 1e-5 score) without a per-number round() in the publisher.
    rows = torch.cat([boxes, scores[:, None], labels[:, None]], dim=1).double()
    rows[:, :4] = rows[:, :4].round(decimals=2)
    rows[:, 4] = rows[:, 4].round(decimals=5)
    detections = []
    for x1, y1, x2, y2, score, label in rows.tolist():
        label = int(label)
        name = class_names[label] if label < len(class_names) else str(label)
        detections.append(Detection(label, name, score, (x1, y1, x2, y2)))
    return detections
