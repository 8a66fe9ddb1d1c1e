"""How far an engine's detections are from the FP32 PyTorch model's: drift and top-k agreement.

Run on every build (the numbers go into the manifest) and by bench/engine.py before timing.
Detections are matched, not compared by position: in FP16 near-equal scores swap places, which
is harmless, while a detection that disappears or moves is not.
"""

from __future__ import annotations

from typing import Any

import torch
from codetr_stream.compile.boxes import box_iou
from codetr_stream.compile.export import example_inputs
from torch import Tensor, nn

MATCH_IOU = 0.9


def compare(reference: tuple[Tensor, Tensor, Tensor], test: tuple[Tensor, Tensor, Tensor],
            top: tuple[int, ...] = (10, 100)) -> dict[str, Any]:
    """Score drift over the sorted lists; for each k in `top`, the share of the reference's
    top-k detections found in the test's top-k (same label, IoU >= 0.9) and the largest box
    coordinate drift (px) among those matched."""
    ref_boxes, ref_scores, ref_labels = (t.detach().cpu() for t in reference)
    boxes, scores, labels = (t.detach().cpu() for t in test)
    result: dict[str, Any] = {
        "score_max_abs": round(float((ref_scores.float() - scores.float()).abs().max()), 6)}
    for k in top:
        k = min(k, ref_scores.shape[1])
        found, drift = 0, 0.0
        for i in range(ref_scores.shape[0]):
            iou = box_iou(ref_boxes[i, :k].float(), boxes[i, :k].float())
            iou[ref_labels[i, :k, None] != labels[i, None, :k]] = 0
            best, index = iou.max(1)
            hit = best >= MATCH_IOU
            found += int(hit.sum())
            if hit.any():
                delta = (ref_boxes[i, :k][hit] - boxes[i, index[hit]]).abs().max()
                drift = max(drift, float(delta))
        result[f"top{k}_agreement"] = round(found / (k * ref_scores.shape[0]), 4)
        result[f"top{k}_box_drift_px"] = round(drift, 4)
    return result


@torch.inference_mode()
def check_engine(engine: Any, model: nn.Module, seed: int = 1) -> dict[str, Any]:
    """The engine vs the FP32 model on one seeded random batch (the smallest batch size)."""
    batch = engine.manifest.batch_sizes[0]
    images, masks = example_inputs(batch, engine.manifest.input_hw, engine.device, seed=seed)
    reference = model.to(engine.device)(images, masks)
    return compare(reference, engine.infer(images, masks))
