"""From the engine's top-K to published detections: threshold, NMS, filters, original pixels.

Two steps. `select` keeps the detections a stream wants and maps them to frame pixels: score
threshold and class allow-list, the official test-time NMS (docs/model.md §8: class-aware hard NMS
with IoU 0.8 over the score-thresholded top-K, as the reference inferencer does with
`torchvision.ops.batched_nms`), then boxes divided by the resize scale and clamped to the frame.
`finish` runs on the host: the ROI filter, rounding, and `Detection` objects.

`select_batch` does the first step for a whole batch where the engine's outputs are: on CUDA one
Triton kernel (`postprocess_kernel`, tested equal to `select`) packing each frame's row count and
kept rows into one fixed-size buffer (6 floats per top-K slot: the size of the raw outputs), read
back once per batch; elsewhere `select` per frame. `postprocess` (one frame, both steps) is the
reference. `select` uses torchvision's NMS kernel when it imports (the GPU machine has it),
otherwise a pure-torch version, so the daemon does not depend on torchvision; tests check both
agree where torchvision is installed.

Order matters only for the ROI: the class allow-list may go before NMS (class-aware NMS never lets
one class suppress another), but the ROI filter comes after it, so a box outside the ROI still
suppresses its duplicate inside, exactly as if the frame had been cropped after detection.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from codetr_stream.compile.boxes import box_iou
from codetr_stream.daemon.config.schema import RoiConfig, StreamConfig, resolve_class_ids
from codetr_stream.daemon.feed.messages import Detection

try:
    from codetr_stream.daemon.pipeline import postprocess_kernel
except ImportError:  # no triton: `select` per frame everywhere
    postprocess_kernel = None

IOU_THRESHOLD = 0.8
# Anchors are pulled this far inside the frame so a full-frame ROI keeps boxes touching its edge.
_EDGE = 1e-6


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


def points_in_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd rule: (N, 2) points x (M, 2) polygon vertices -> (N,) bool (in their dtype)."""
    x, y = points[:, :1], points[:, 1:]
    x0, y0 = polygon[:, 0], polygon[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    crosses = (y0 > y) != (y1 > y)
    x_cross = x0 + (y - y0) * (x1 - x0) / np.where(y1 == y0, np.ones_like(y0), y1 - y0)
    return ((crosses & (x < x_cross)).sum(axis=1) % 2) == 1


@dataclass(frozen=True)
class FrameFilter:
    """What a stream keeps before NMS: a minimum score and the allowed class ids (None: all)."""

    min_score: float
    class_ids: frozenset[int] | None = None

    @staticmethod
    def of(stream_cfg: StreamConfig, class_names: tuple[str, ...]) -> FrameFilter:
        """The stream's threshold and allow-list (names resolved to the engine's ids)."""
        classes = stream_cfg.classes
        return FrameFilter(stream_cfg.min_score, None if classes is None
                           else resolve_class_ids(tuple(classes), class_names))


# Keeps nothing: for frames whose stream went away while they waited.
DROP_ALL = FrameFilter(float("inf"))


def select(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    keep: FrameFilter,
    *,
    scale: float | tuple[float, float],
    frame_size: tuple[int, int],
    iou_threshold: float = IOU_THRESHOLD,
) -> torch.Tensor:
    """One frame's engine outputs -> (m, 6) float32 rows x1, y1, x2, y2, score, label on the
    same device, by decreasing score: thresholded, class-filtered, NMS, in frame pixels.

    boxes (K, 4) xyxy in engine input pixels, scores (K,), labels (K,) int. `scale` is the
    preprocessing resize factor (input px = frame px * scale), one for both axes with a
    keep-ratio resize or (sx, sy); `frame_size` is the ORIGINAL frame's (width, height).
    """
    width, height = frame_size
    kept = scores >= keep.min_score
    if keep.class_ids is not None:
        kept &= torch.isin(labels, torch.tensor(sorted(keep.class_ids), device=labels.device))
    index = kept.nonzero().squeeze(1)
    boxes, scores, labels = boxes[index].float(), scores[index].float(), labels[index]
    index = batched_nms(boxes, scores, labels, iou_threshold)
    boxes, scores, labels = boxes[index], scores[index], labels[index]

    sx, sy = (scale, scale) if isinstance(scale, int | float) else scale
    boxes = boxes / boxes.new_tensor([sx, sy, sx, sy])
    boxes = boxes.clamp(min=0).minimum(boxes.new_tensor([width, height, width, height]))
    return torch.cat([boxes, scores[:, None], labels[:, None].float()], dim=1)


def select_batch(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    keeps: Sequence[FrameFilter],
    *,
    scales: Sequence[tuple[float, float]],
    frame_sizes: Sequence[tuple[int, int]],
    num_classes: int,
    iou_threshold: float = IOU_THRESHOLD,
    fused: bool | None = None,
) -> torch.Tensor:
    """`select` for the first n = len(keeps) rows of a batch's outputs, where they are, packed
    for one read-back: (n, 1 + 6K) float32, per frame the row count then the rows (`unpack`).

    `fused` (default: on CUDA when triton imports): one kernel for the batch, queued on the
    current stream with no host sync; otherwise `select` frame by frame. Labels >= `num_classes`
    pass only unfiltered.
    """
    n, k = len(keeps), scores.shape[1]
    if fused is None:
        fused = scores.is_cuda and postprocess_kernel is not None
    if fused:
        params = torch.from_numpy(_frame_params(keeps, scales, frame_sizes, num_classes,
                                                scores.dtype))
        # From pageable memory: staged before the call returns, ordered on the current stream.
        params = params.to(scores.device, non_blocking=True)
        return postprocess_kernel.launch(boxes[:n], scores[:n], labels[:n], params,
                                         iou_threshold)
    packed = scores.new_zeros((n, 1 + 6 * k), dtype=torch.float32)
    for i, keep in enumerate(keeps):
        rows = select(boxes[i], scores[i], labels[i], keep, scale=scales[i],
                      frame_size=frame_sizes[i], iou_threshold=iou_threshold)
        packed[i, 0] = len(rows)
        packed[i, 1:1 + rows.numel()] = rows.flatten()
    return packed


_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}


def _frame_params(keeps: Sequence[FrameFilter], scales: Sequence[tuple[float, float]],
                  frame_sizes: Sequence[tuple[int, int]], num_classes: int,
                  score_dtype: torch.dtype) -> np.ndarray:
    """`postprocess_kernel.PARAMS` per frame, then the class allow-list as 0/1 columns."""
    columns = len(postprocess_kernel.PARAMS)
    params = np.zeros((len(keeps), columns + num_classes), dtype=np.float32)
    # `select` compares scores with the threshold in the scores' dtype: round it the same way
    # (in numpy where it has the dtype: no torch call, no GIL hand-off).
    minimums = [k.min_score for k in keeps]
    if score_dtype in _NUMPY_DTYPES:
        thresholds = np.array(minimums, dtype=_NUMPY_DTYPES[score_dtype]).astype(np.float32)
    else:
        thresholds = torch.tensor(minimums, dtype=score_dtype).float().numpy()
    for i, (keep, (sx, sy), (width, height)) in enumerate(
            zip(keeps, scales, frame_sizes, strict=True)):
        params[i, :columns] = (thresholds[i], sx, sy, width, height, keep.class_ids is not None)
        if keep.class_ids is not None:
            params[i, columns + np.array(sorted(keep.class_ids), dtype=np.int64)] = 1.0
    return params


def unpack(packed: np.ndarray) -> list[np.ndarray]:
    """`select_batch`'s output on the host -> each frame's (m, 6) float32 rows (views)."""
    counts = packed[:, 0].astype(np.int64)
    return [packed[i, 1:1 + 6 * m].reshape(m, 6) for i, m in enumerate(counts.tolist())]


def finish(rows: np.ndarray, *, frame_size: tuple[int, int], roi: RoiConfig | None,
           class_names: Sequence[str]) -> list[Detection]:
    """`select`'s rows on the host -> detections: the ROI filter (float32, as on the device),
    boxes rounded to 0.01 px and scores to 1e-5 so the JSON stays short."""
    if roi is not None and len(rows):
        limits = np.array(frame_size, dtype=np.float32)
        half = np.float32(0.5)
        anchor_x = (rows[:, 0] + rows[:, 2]) * half
        anchor_y = rows[:, 3] if roi.anchor == "bottom_center" else (rows[:, 1] + rows[:, 3]) * half
        anchors = np.stack([anchor_x, anchor_y], axis=1) / limits
        anchors = np.clip(anchors, np.float32(_EDGE), np.float32(1 - _EDGE))
        rows = rows[points_in_polygon(anchors, np.array(roi.points, dtype=np.float32))]
    # Rounded vectorised in float64 (as torch.round(decimals=)), not per number in the publisher.
    rows = rows.astype(np.float64)
    rows[:, :4] = rows[:, :4].round(2)
    rows[:, 4] = rows[:, 4].round(5)
    detections = []
    for x1, y1, x2, y2, score, label in rows.tolist():
        label = int(label)
        name = class_names[label] if label < len(class_names) else str(label)
        detections.append(Detection(label, name, score, (x1, y1, x2, y2)))
    return detections


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
    """One frame's engine outputs (any device) -> its detections in original frame pixels, by
    decreasing score: `select`, one read-back, `finish`. The reference for the batched path."""
    keep = FrameFilter.of(stream_cfg, tuple(class_names))
    rows = select(boxes, scores, labels, keep, scale=scale, frame_size=frame_size,
                  iou_threshold=iou_threshold)
    return finish(rows.cpu().numpy(), frame_size=frame_size, roi=stream_cfg.roi,
                  class_names=class_names)
