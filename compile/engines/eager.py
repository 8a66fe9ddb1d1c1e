"""Backend "eager": the PyTorch model itself, on CPU or GPU.

The daemon's CPU path and the reference every compiled backend is checked against. The engine
directory holds the weights as an mmdet-format checkpoint (plain `torch.save` of tensors and
class names, read back with `weights_only=True` by the same strict loader as official files) and
the model config; loading rebuilds the model from them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from codetr_stream.compile.engines.base import Engine, Outputs
from codetr_stream.compile.engines.manifest import Manifest
from codetr_stream.compile.engines.precision import PrecisionWrapper
from torch import Tensor, nn

WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "config.json"


def save_config(out_dir: Path, manifest: Manifest) -> None:
    """config.json: the model sizes, for rebuilding and for the eager loader."""
    (out_dir / CONFIG_FILE).write_text(json.dumps(manifest.config, indent=2) + "\n")
    manifest.files["config"] = CONFIG_FILE


def save_model_files(model: nn.Module, out_dir: Path, manifest: Manifest) -> None:
    """Write weights.pt and config.json: what the eager backend loads."""
    state = {k: v.detach().to("cpu", copy=True).contiguous()
             for k, v in model.state_dict().items()}
    meta = {"dataset_meta": {"classes": list(manifest.class_names)}}
    torch.save({"meta": meta, "state_dict": state}, out_dir / WEIGHTS_FILE)
    manifest.files["weights"] = WEIGHTS_FILE
    save_config(out_dir, manifest)


def build(model: nn.Module, out_dir: Path, manifest: Manifest, device: torch.device) -> None:
    save_model_files(model, out_dir, manifest)


def load_model(path: Path, manifest: Manifest, device: torch.device) -> nn.Module:
    """The PyTorch model of an engine directory on `device`, under the manifest's precision."""
    from codetr_stream.compile import build_model

    model = build_model(manifest.config, path / manifest.files["weights"], device=device)
    return PrecisionWrapper(model, device, manifest.precision)


class EagerEngine(Engine):
    def __init__(self, path: Path, manifest: Manifest, device: torch.device) -> None:
        super().__init__(path, manifest, device)
        self.model = load_model(self.path, manifest, device)

    @torch.inference_mode()
    def _run(self, images: Tensor, masks: Tensor) -> Outputs:
        return self.model(images, masks)


def load(path: Path, manifest: Manifest, device: torch.device) -> EagerEngine:
    return EagerEngine(path, manifest, device)
