"""Load an mmdet-format Co-DINO checkpoint into our modules, strictly.

The official file also holds training-only heads; exactly these prefixes are dropped, anything
else that does not match is an error naming the keys, so a wrong file never half-loads.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

# Training-only parts of the official checkpoint (docs/checkpoint.md).
IGNORED_PREFIXES = ("query_head.dn_generator.", "rpn_head.", "roi_head.", "bbox_head.")
_SHOWN = 10


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the keys."""


def _listing(keys: list[str]) -> str:
    more = f" ... and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _unreadable(path: Path, detail: str) -> str:
    return (f"{path}: cannot read checkpoint, the file is truncated, corrupt or not a PyTorch "
            f"checkpoint (re-download it, or check the path): {detail}")


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], list[str] | None]:
    """The state dict (training-only keys dropped) and class names of an mmdet .pth file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        raw: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's text for these tells how to load with weights_only=False: not an option here.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found is None:
            raise CheckpointError(_unreadable(path, "UnpicklingError")) from exc
        raise CheckpointError(
            f"{path}: holds Python objects ({found.group(1)}) besides tensors, which "
            "weights_only loading refuses (unpickling them can run code); re-save it with only "
            "tensors, dicts, lists, strings and numbers, e.g. "
            "torch.save({'state_dict': model.state_dict()}, path)") from exc
    except Exception as exc:  # torch raises several types for truncated/corrupt zip files
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(_unreadable(path, f"{type(exc).__name__}: {first}")) from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a dict with 'state_dict', "
                              f"got {type(raw).__name__}")
    state = raw.get("state_dict", raw)
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {_listing(bad)}")
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    classes = raw.get("meta", {}).get("dataset_meta", {}).get("classes")
    return state, (list(classes) if classes is not None else None)


def load_checkpoint(model: nn.Module, path: str | Path, *,
                    assign: bool = False) -> list[str] | None:
    """Load weights into `model` after checking keys and shapes; returns the class names."""
    state, classes = read_checkpoint(path)
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = [f"{k} {tuple(state[k].shape)} != model {tuple(expected[k].shape)}"
              for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {_listing(sorted(shapes))}")
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not fit the model config; "
                              + "; ".join(problems))
    cfg = getattr(model, "config", None)
    if classes is not None and cfg is not None and len(classes) != cfg.head.num_classes:
        raise CheckpointError(f"{path}: meta.dataset_meta.classes has {len(classes)} names, the "
                              f"model config has {cfg.head.num_classes} classes")
    state = {k: v.to(expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=assign)
    return classes
