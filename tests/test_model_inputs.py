"""Bad input to the model or the builder fails at the top with a message that says the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from codetr_stream.compile import build_model
from codetr_stream.compile.model_config import ConfigError


@pytest.fixture(scope="module")
def model(tiny_config) -> torch.nn.Module:
    return build_model(tiny_config)


@pytest.mark.parametrize(("images", "masks", "message"), [
    (torch.zeros(3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool), r"\(B, 3, H, W\)"),
    (torch.zeros(1, 4, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool), r"\(B, 3, H, W\)"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), torch.zeros(1, 64, 64, dtype=torch.bool),
     "float32"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.float64), torch.zeros(1, 64, 64, dtype=torch.bool),
     "float32"),
    (torch.zeros(1, 3, 64, 64), torch.zeros(1, 64, 64), "bool"),
    (torch.zeros(1, 3, 64, 64), torch.zeros(1, 64, 32, dtype=torch.bool), r"\(1, 64, 64\)"),
    (torch.zeros(2, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool), r"\(2, 64, 64\)"),
    (torch.zeros(1, 3, 64, 64), torch.zeros(64, 64, dtype=torch.bool), "masks must be"),
    (torch.zeros(1, 3, 16, 16), torch.zeros(1, 16, 16, dtype=torch.bool), "too small"),
])
def test_bad_inputs_are_named(model, images, masks, message) -> None:
    with pytest.raises(ValueError, match=message):
        model(images, masks)


def test_unknown_config_name_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown model config 'co_dino_swin_x'.*co_dino_swin_l"):
        build_model("co_dino_swin_x")


def test_bad_config_fields_are_named(data_dir: Path, tiny_config) -> None:
    config = tiny_config.to_dict()
    del config["transformer"]["msda_points"]
    with pytest.raises(ConfigError, match=r"transformer\.msda_points' is missing"):
        build_model(config)
    config = tiny_config.to_dict()
    config["neck"]["in_channels"] = [32, 64, 128, 512]
    with pytest.raises(ConfigError, match=r"neck\.in_channels"):
        build_model(config)
    with pytest.raises(ConfigError, match=r"missing\.json: cannot read"):
        build_model(str(data_dir / "missing.json"))
