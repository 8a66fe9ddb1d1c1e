"""Top-k detections from the last decoder layer: the seam where an exported engine ends.

No NMS: Co-DINO's network output is the top-K over queries x classes (docs/model.md §8).
"""

from __future__ import annotations

import torch
from codetr_stream.compile.model.masks import valid_size
from torch import Tensor


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), -1)


def topk_detections(cls_logits: Tensor, boxes: Tensor, image_mask: Tensor,
                    k: int) -> tuple[Tensor, Tensor, Tensor]:
    """cls_logits (B,Q,C), boxes (B,Q,4) sigmoid cxcywh, image_mask (B,H,W) True = padding ->
    boxes (B,K,4) xyxy pixels of each image's valid area, scores (B,K), labels (B,K) int64."""
    num_classes = cls_logits.shape[-1]
    # Scores in FP32 even in an FP16 engine: FP16 sigmoid quantises them into ties (~5e-4 steps).
    scores, index = cls_logits.float().sigmoid().flatten(1).topk(k, dim=1)
    labels = index % num_classes
    picked = boxes.gather(1, (index // num_classes)[..., None].expand(-1, -1, 4))
    valid_h, valid_w = valid_size(image_mask, boxes.dtype)
    size = torch.stack((valid_w, valid_h, valid_w, valid_h), -1)[:, None]
    xyxy = torch.minimum((cxcywh_to_xyxy(picked) * size).clamp(min=0), size)
    return xyxy, scores, labels
