"""`build_model`: the one public constructor of the Co-DINO inference model; `build_model_engine`:
that model as an engine."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from codetr_stream.compile.checkpoint import load_checkpoint
from codetr_stream.compile.model.codino import CoDino
from codetr_stream.compile.model_config import CoDinoConfig, parse_config

if TYPE_CHECKING:
    from codetr_stream.compile.engines.base import Engine
    from codetr_stream.compile.engines.manifest import Manifest


def build_model(config: CoDinoConfig | dict[str, Any] | str | Path,
                checkpoint: str | Path | None = None, *,
                device: torch.device | str | None = None) -> CoDino:
    """Build Co-DINO from a config (parsed, a dict, a .json path or a built-in name), in
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


def build_model_engine(config: CoDinoConfig | dict[str, Any] | str | Path, out: str | Path, *,
                       input_hw: tuple[int, int], batch_sizes: Sequence[int],
                       checkpoint: str | Path | None = None, seed: int = 0,
                       class_names: Sequence[str] | None = None, backend: str = "eager",
                       precision: str = "fp32", device: torch.device | str = "cpu",
                       **options: Any) -> tuple[Engine, Manifest]:
    """`build_model` then `engines.build_engine`: the model of `config` with the checkpoint's
    weights, or random ones seeded with `seed`, built on `device` as an engine in `out`.

    The one way an engine is made from a config outside the `compile` command: the demo's and
    the tests' tiny engines, the benchmarks' full-size ones, `eval --eager`'s reference.
    `class_names` replaces the checkpoint's (random weights have none)."""
    from codetr_stream.compile.engines import build_engine

    cfg = parse_config(config)
    if checkpoint is None:
        torch.manual_seed(seed)
    model = build_model(cfg, checkpoint, device=device)
    if class_names is not None:
        model.class_names = list(class_names)
    return build_engine(model, out, backend=backend, precision=precision, input_hw=input_hw,
                        batch_sizes=list(batch_sizes), config_name=cfg.name, config=cfg.to_dict(),
                        device=device, checkpoint=None if checkpoint is None else str(checkpoint),
                        seed=seed if checkpoint is None else None, **options)
