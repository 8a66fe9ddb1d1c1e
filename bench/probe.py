"""Feature-level numerics of an engine: the model with its encoder memory, last decoder state and
per-query boxes as extra outputs, and the measures the engine benchmark reports from them.

Top-k agreement means little with seeded random weights (their scores are flat, so any rounding
re-ranks them); feature similarity does not depend on the ranking. `FeatureProbe` wraps the model
with forward hooks, so torch.export (non-strict) records the hooked tensors as graph outputs and
the probe builds into an engine like the model itself, passes and FP16 policy included.
"""

from __future__ import annotations

from typing import Any

import torch
from codetr_stream.compile.model.decoder import inverse_sigmoid
from torch import Tensor, nn

FEATURES = ("memory", "state", "query_boxes", "query_tokens")


class FeatureProbe(nn.Module):
    """model(images, masks) + (encoder memory (B,S,C), last decoder state after its norm
    (B,Q,C), every query's box (B,Q,4) in normalised cxcywh before the top-k, and the encoder
    token each query was selected from (B,Q) int64)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config, self.class_names = model.config, model.class_names
        self._seen: dict[str, Any] = {}
        head = model.query_head
        transformer = head.transformer
        selection = head.cls_branches[len(transformer.decoder.layers)]  # the encoder's scores
        self._hooks = [transformer.encoder.register_forward_hook(self._keep("memory")),
                       selection.register_forward_hook(self._keep("encoder_scores")),
                       transformer.decoder.register_forward_hook(self._keep("decoder"))]

    def remove_hooks(self) -> None:
        """Leave the wrapped model as it was (the hooks keep its last features alive)."""
        for hook in self._hooks:
            hook.remove()
        self._seen.clear()

    def _keep(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._seen[name] = output
        return hook

    def forward(self, images: Tensor, masks: Tensor) -> tuple[Tensor, ...]:
        boxes, scores, labels = self.model(images, masks)
        state, reference, _ = self._seen.pop("decoder")
        head = self.model.query_head
        last = len(head.transformer.decoder.layers) - 1
        query_boxes = (head.reg_branches[last](state) + inverse_sigmoid(reference)).sigmoid()
        # The queries' tokens, as the two-stage selection picks them (query_selection.py).
        tokens = self._seen.pop("encoder_scores").max(-1).values.topk(state.shape[1], dim=1)
        return (boxes, scores, labels, self._seen.pop("memory"), state, query_boxes,
                tokens.indices)


def _one_minus_cosine(a: Tensor, b: Tensor) -> float:
    """1 - cosine similarity of two tensors taken as single vectors (float64)."""
    a, b = a.double().flatten(), b.double().flatten()
    return float(1 - (a @ b) / (a.norm() * b.norm()).clamp_min(1e-300))


def _relative_max_error(ref: Tensor, got: Tensor) -> float:
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


def feature_drift(reference: tuple[Tensor, ...], got: tuple[Tensor, ...],
                  hw: tuple[int, int]) -> dict[str, float | bool]:
    """Probe outputs of a variant against the FP32 reference's, per image, worst image reported:
    1 - cosine and max |error| / max |value| of the encoder memory; the queries both runs have
    in the same slot with the same encoder token, their share, 1 - cosine of their last decoder
    state, and the largest difference of their final boxes in input pixels (p99 and max);
    whether every output is finite."""
    ref = {k: t.cpu() for k, t in zip(FEATURES, reference[3:], strict=True)}
    out = {k: t.cpu() for k, t in zip(FEATURES, got[3:], strict=True)}
    h, w = hw
    scale = torch.tensor([w, h, w, h], dtype=torch.float64)
    memory_cos, memory_err, state_cos, shares, drifts = [], [], [], [], []
    for i in range(ref["memory"].shape[0]):
        memory_cos.append(_one_minus_cosine(ref["memory"][i], out["memory"][i]))
        memory_err.append(_relative_max_error(ref["memory"][i], out["memory"][i]))
        # A query is its slot (the content embedding is the slot's) and its token (the
        # position): the same query is the same slot holding the same token in both runs.
        same = out["query_tokens"][i] == ref["query_tokens"][i]
        shares.append(float(same.double().mean()))
        if same.any():
            state_cos.append(_one_minus_cosine(ref["state"][i][same], out["state"][i][same]))
            moved = (out["query_boxes"][i][same].double()
                     - ref["query_boxes"][i][same].double()).abs() * scale
            drifts.append(moved.amax(-1))
    drift = torch.cat(drifts) if drifts else torch.full((1,), float("nan"), dtype=torch.float64)
    return {"memory_1_minus_cos": max(memory_cos), "memory_rel_max_err": max(memory_err),
            "same_token_share": min(shares),
            "state_1_minus_cos": max(state_cos) if state_cos else float("nan"),
            "query_box_p99_px": round(float(drift.quantile(0.99)), 3),
            "query_box_max_px": round(float(drift.max()), 3),
            "finite": all(bool(torch.isfinite(t.float()).all())
                          for t in (*got[:2], *got[3:6]))}


def pass_every_output() -> None:
    """For an older checkout (bench/engine.py --baseline-code), whose PrecisionWrapper unpacks
    exactly (boxes, scores, labels): give it a forward that passes every output on, floating
    ones as FP32, as the current one does."""
    from codetr_stream.compile.engines import precision

    def forward(self: nn.Module, images: Tensor, masks: Tensor) -> tuple[Tensor, ...]:
        if self.precision == "fp16":
            images = images.half()
        with precision.autocast(self.device, self.precision):
            outputs = self.module(images, masks)
        return tuple(o.float() if o.is_floating_point() else o for o in outputs)

    precision.PrecisionWrapper.forward = forward

