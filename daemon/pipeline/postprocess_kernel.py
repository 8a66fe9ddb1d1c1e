"""A batch's score threshold, class filter, NMS and scaling to frame pixels as one Triton kernel.

One program per frame walks the official greedy NMS (class-aware, IoU > threshold suppresses):
pick the highest-scored remaining candidate (ties: the lower index, as a stable sort), keep it,
drop the candidates of its class it overlaps. The loop runs once per KEPT box, all on the GPU, so
the batch needs no host round trip between the engine and the single read-back of its results.

Arithmetic follows `postprocess.select` op for op (IoU as torchvision's formula with an IEEE
division, boxes divided by the resize scale, clamped to the frame); FP contraction is off so the
compiler cannot fuse a product into an add the reference rounds separately.

Output per frame: [count, then count rows of x1, y1, x2, y2, score, label] by decreasing score,
as float32 (labels < 2**24 are exact); the unused tail is left unwritten.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Per-frame parameters (float32; the kernel reads them by position), then one 0/1 column per
# class id, read when filter_classes is 1.
PARAMS = ("min_score", "scale_x", "scale_y", "width", "height", "filter_classes")


@triton.jit
def select_kernel(
    boxes_ptr, scores_ptr, labels_ptr, params_ptr, out_ptr,
    box_stride, score_stride, label_stride, k, num_classes, iou_threshold,
    PARAMS_ROW: tl.constexpr, BLOCK_K: tl.constexpr,
):
    f = tl.program_id(0)
    idx = tl.arange(0, BLOCK_K)
    valid = idx < k
    box = boxes_ptr + f * box_stride + idx * 4
    x1 = tl.load(box, mask=valid, other=0.0).to(tl.float32)
    y1 = tl.load(box + 1, mask=valid, other=0.0).to(tl.float32)
    x2 = tl.load(box + 2, mask=valid, other=0.0).to(tl.float32)
    y2 = tl.load(box + 3, mask=valid, other=0.0).to(tl.float32)
    score = tl.load(scores_ptr + f * score_stride + idx, mask=valid, other=0.0).to(tl.float32)
    label = tl.load(labels_ptr + f * label_stride + idx, mask=valid, other=0).to(tl.int32)

    params = params_ptr + f * PARAMS_ROW  # the columns of `PARAMS`, then the classes
    known = valid & (label >= 0) & (label < num_classes)
    # Every class passes where filter_classes is 0.
    allowed = tl.maximum(tl.load(params + 6 + label, mask=known, other=0.0),
                         1.0 - tl.load(params + 5))
    candidate = valid & (score >= tl.load(params + 0)) & (allowed != 0.0)
    area = (x2 - x1) * (y2 - y1)

    rank = tl.full([BLOCK_K], -1, tl.int32)
    kept = tl.full([], 0, tl.int32)
    while tl.max(candidate.to(tl.int32), axis=0) > 0:
        best = tl.max(tl.where(candidate, score, -float("inf")), axis=0)
        i = tl.min(tl.where(candidate & (score == best), idx, BLOCK_K), axis=0)
        picked = idx == i
        bx1 = tl.sum(tl.where(picked, x1, 0.0), axis=0)
        by1 = tl.sum(tl.where(picked, y1, 0.0), axis=0)
        bx2 = tl.sum(tl.where(picked, x2, 0.0), axis=0)
        by2 = tl.sum(tl.where(picked, y2, 0.0), axis=0)
        blabel = tl.sum(tl.where(picked, label, 0), axis=0)
        inter_w = tl.maximum(tl.minimum(bx2, x2) - tl.maximum(bx1, x1), 0.0)
        inter_h = tl.maximum(tl.minimum(by2, y2) - tl.maximum(by1, y1), 0.0)
        inter = inter_w * inter_h
        iou = tl.div_rn(inter, ((bx2 - bx1) * (by2 - by1) + area) - inter)
        suppressed = (label == blabel) & (iou > iou_threshold)
        rank = tl.where(picked, kept, rank)
        candidate = candidate & ~suppressed & ~picked
        kept += 1

    sx = tl.load(params + 1)
    sy = tl.load(params + 2)
    width = tl.load(params + 3)
    height = tl.load(params + 4)
    row = out_ptr + f * (1 + 6 * k) + 1 + rank * 6
    out = rank >= 0
    tl.store(row, tl.minimum(tl.maximum(tl.div_rn(x1, sx), 0.0), width), mask=out)
    tl.store(row + 1, tl.minimum(tl.maximum(tl.div_rn(y1, sy), 0.0), height), mask=out)
    tl.store(row + 2, tl.minimum(tl.maximum(tl.div_rn(x2, sx), 0.0), width), mask=out)
    tl.store(row + 3, tl.minimum(tl.maximum(tl.div_rn(y2, sy), 0.0), height), mask=out)
    tl.store(row + 4, score, mask=out)
    tl.store(row + 5, label.to(tl.float32), mask=out)
    tl.store(out_ptr + f * (1 + 6 * k), kept.to(tl.float32))


def launch(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
           params: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """boxes (n, K, 4), scores (n, K), labels (n, K) on one device, params (n, len(PARAMS) + C)
    float32 there -> (n, 1 + 6K) float32 as described above."""
    n, k = scores.shape
    if boxes.stride(2) != 1 or boxes.stride(1) != 4 or scores.stride(1) != 1 or (
            labels.stride(1) != 1) or not params.is_contiguous():
        raise ValueError("engine outputs must have contiguous rows")
    out = torch.empty((n, 1 + 6 * k), dtype=torch.float32, device=scores.device)
    select_kernel[(n,)](boxes, scores, labels, params, out, boxes.stride(0), scores.stride(0),
                        labels.stride(0), k, params.shape[1] - len(PARAMS), iou_threshold,
                        PARAMS_ROW=params.shape[1], BLOCK_K=triton.next_power_of_2(k),
                        num_warps=1, enable_fp_fusion=False)
    return out
