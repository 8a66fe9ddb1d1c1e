"""`build_model` entry points: torch-free package import, config sources, devices, defaults."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from codetr_stream.compile import build_model
from codetr_stream.compile.model_config import BUILTIN, parse_config


def test_importing_the_package_does_not_import_torch() -> None:
    code = ("import sys, codetr_stream.compile, codetr_stream.compile.model_config; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_json_path_dict_and_defaults_agree(data_dir: Path) -> None:
    raw = json.loads((data_dir / "tiny_config.json").read_text())
    from_path = parse_config(data_dir / "tiny_config.json")
    assert from_path == parse_config(raw)
    del raw["backbone"]["strides"], raw["backbone"]["out_indices"]
    assert parse_config(raw).backbone == from_path.backbone


def test_configs_write_back_the_keys_they_were_read_with(data_dir: Path) -> None:
    """What an engine's manifest stores is the config as written: the tiny file (descriptions,
    training settings and all) and the built-in full model round-trip."""
    raw = json.loads((data_dir / "tiny_config.json").read_text())
    assert parse_config(raw).to_dict() == raw
    assert parse_config(parse_config(raw).to_dict()) == parse_config(raw)
    assert parse_config("co_dino_swin_l").to_dict() == BUILTIN["co_dino_swin_l"]()
    del raw["backbone"]["strides"]  # a default that follows from other fields is written out
    assert parse_config(raw).to_dict()["backbone"]["strides"] == [4, 2, 2, 2]


def test_built_model_is_in_eval_mode_on_the_requested_device(data_dir: Path) -> None:
    model = build_model(data_dir / "tiny_config.json", device="meta")
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.class_names is None
    assert next(build_model(data_dir / "tiny_config.json").parameters()).dtype == torch.float32
