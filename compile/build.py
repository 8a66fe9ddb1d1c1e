"""`build_model`: the one public constructor of the Co-DINO inference model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from codetr_stream.compile.checkpoint import load_checkpoint
from codetr_stream.compile.configs import parse_config
from codetr_stream.compile.model.codino import CoDino


def build_model(config: dict[str, Any] | str | Path, checkpoint: str | Path | None = None, *,
                device: torch.device | str | None = None) -> CoDino:
    """Build Co-DINO from a config dict, a .json path or a built-in name ("co_dino_swin_l"), in
    eval mode. With a checkpoint (mmdet .pth) the weights and class names are loaded; without one
    the weights are random (PyTorch default init). `device="meta"` builds without memory.
    Inference only: no parameter requires grad, so callers cannot leak autograd memory."""
    cfg = parse_config(config)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if checkpoint is None:
        with device:
            model = CoDino(cfg)
    else:
        with torch.device("meta"):
            model = CoDino(cfg)
        model.class_names = load_checkpoint(model, checkpoint, assign=True)
        model.to(device)
    return model.eval().requires_grad_(False)
