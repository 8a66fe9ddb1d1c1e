"""Checkpoint loading is strict, names what is wrong, and ignores only training-only heads."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from codetr_stream.compile import build_model
from codetr_stream.compile.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def config(tiny_config) -> dict:
    return tiny_config.to_dict()


@pytest.fixture(scope="module")
def checkpoint(data_dir: Path) -> dict:
    return torch.load(data_dir / "tiny_codino.pth", map_location="cpu", weights_only=True)


def save_edited(checkpoint: dict, path: Path, edit) -> Path:
    state = dict(checkpoint["state_dict"])
    edit(state)
    torch.save({"meta": checkpoint["meta"], "state_dict": state}, path)
    return path


def test_loads_weights_and_class_names(config, checkpoint, data_dir: Path) -> None:
    model = build_model(config, data_dir / "tiny_codino.pth")
    assert model.class_names[:3] == ["person", "bicycle", "car"] and len(model.class_names) == 80
    key = "query_head.transformer.level_embeds"
    assert torch.equal(model.state_dict()[key], checkpoint["state_dict"][key])
    assert not model.training


def test_training_only_heads_are_ignored(config, checkpoint, tmp_path: Path) -> None:
    def add_extras(state: dict) -> None:
        for key in ("query_head.dn_generator.label_embedding.weight", "rpn_head.rpn_conv.weight",
                    "roi_head.0.bbox_head.fc_cls.weight", "bbox_head.0.atss_cls.weight"):
            state[key] = torch.zeros(2, 2)

    build_model(config, save_edited(checkpoint, tmp_path / "extra.pth", add_extras))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s.pop("neck.convs.0.gn.bias"), r"missing keys \(1\): neck.convs.0.gn.bias"),
    (lambda s: s.__setitem__("query_head.extra.weight", torch.zeros(1)),
     r"unexpected keys \(1\): query_head.extra.weight"),
    (lambda s: s.__setitem__("query_head.transformer.query_embed.weight", torch.zeros(900, 64)),
     r"query_head.transformer.query_embed.weight \(900, 64\) != model \(100, 64\)"),
], ids=["missing", "unexpected", "shape"])
def test_mismatched_checkpoints_name_the_keys(config, checkpoint, tmp_path: Path, edit,
                                              message) -> None:
    path = save_edited(checkpoint, tmp_path / "bad.pth", edit)
    with pytest.raises(CheckpointError, match=message):
        build_model(config, path)


def test_truncated_file_names_the_file(config, data_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "truncated.pth"
    data = (data_dir / "tiny_codino.pth").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pth: cannot read checkpoint"):
        build_model(config, path)
    with pytest.raises(CheckpointError, match="not found"):
        build_model(config, tmp_path / "absent.pth")


@pytest.mark.parametrize("data", [b"not a checkpoint\n", b"garbage that is not a pickle"],
                         ids=["text", "garbage"])
def test_a_file_that_is_not_a_checkpoint_is_one_line(config, tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "notes.pth"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        build_model(config, path)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot read checkpoint, the file is truncated, corrupt "
                              "or not a PyTorch checkpoint (re-download it, or check the path)")
    assert "\n" not in message and "weights_only" not in message


def test_python_objects_are_refused_with_how_to_resave(config, checkpoint,
                                                       tmp_path: Path) -> None:
    path = tmp_path / "pickled.pth"
    torch.save({"meta": argparse.Namespace(classes=[]), "state_dict": checkpoint["state_dict"]},
               path)
    with pytest.raises(CheckpointError) as info:
        build_model(config, path)
    message = str(info.value)
    assert message.startswith(f"{path}: holds Python objects (argparse.Namespace) besides "
                              "tensors, which weights_only loading refuses")
    assert "re-save it with only tensors" in message
    assert "\n" not in message and "weights_only=False" not in message  # torch's own advice


def test_class_count_must_match_the_config(config, checkpoint, tmp_path: Path) -> None:
    path = tmp_path / "classes.pth"
    torch.save({"meta": {"dataset_meta": {"classes": ["a", "b"]}},
                "state_dict": checkpoint["state_dict"]}, path)
    with pytest.raises(CheckpointError, match="2 names, the model config has 80 classes"):
        build_model(config, path)
