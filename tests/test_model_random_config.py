"""Nothing in the model is tied to the tiny or full sizes: another shape of config builds,
runs, exports (batch-dynamic too) and reloads its own checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from codetr_stream.compile import build_model


def other_config() -> dict:
    """3 Swin stages, 4 levels, window 5, odd sizes everywhere."""
    return {
        "name": "other",
        "num_classes": 7,
        "backbone": {"type": "SwinTransformer", "embed_dims": 48, "depths": [2, 2, 3],
                     "num_heads": [3, 6, 4], "window_size": 5, "patch_size": 4,
                     "strides": [4, 2, 2], "mlp_ratio": 2, "out_indices": [0, 1, 2]},
        "neck": {"type": "ChannelMapper", "in_channels": [48, 96, 192], "out_channels": 96,
                 "num_outs": 4, "gn_num_groups": 16},
        "transformer": {"type": "CoDinoTransformer", "embed_dims": 96, "num_feature_levels": 4,
                        "encoder_layers": 1, "decoder_layers": 3, "msda_heads": 3,
                        "msda_points": 2, "decoder_self_attn_heads": 6, "ffn_channels": 80},
        "head": {"type": "CoDINOHead", "num_query": 37, "num_classes": 7, "max_per_img": 20,
                 "pos_num_feats": 48},
    }


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two images of 150x206 with different padding (valid 150x206 and 101x133)."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 150, 206)
    masks = torch.zeros(2, 150, 206, dtype=torch.bool)
    masks[1, 101:], masks[1, :, 133:] = True, True
    images[1][:, masks[1]] = 0
    return images, masks


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(other_config())


def test_runs_with_per_image_valid_sizes(model) -> None:
    images, masks = inputs()
    with torch.no_grad():
        boxes, scores, labels = model(images, masks)
    assert boxes.shape == (2, 20, 4) and scores.shape == (2, 20) and labels.dtype == torch.int64
    assert (scores[:, :-1] >= scores[:, 1:]).all() and ((labels >= 0) & (labels < 7)).all()
    assert (boxes[1, :, 0::2] <= 133).all() and (boxes[1, :, 1::2] <= 101).all()
    assert (boxes[0, :, 0::2] <= 206).all() and (boxes >= 0).all()


def test_checkpoint_round_trip(model, tmp_path: Path) -> None:
    names = [f"c{i}" for i in range(7)]
    path = tmp_path / "other.pth"
    torch.save({"meta": {"dataset_meta": {"classes": names}},
                "state_dict": model.state_dict()}, path)
    loaded = build_model(other_config(), path)
    assert loaded.class_names == names
    images, masks = inputs()
    with torch.no_grad():
        for a, b in zip(model(images, masks), loaded(images, masks), strict=True):
            assert torch.equal(a, b)


@pytest.mark.slow
def test_batch_dynamic_export_equals_eager(model) -> None:
    images, masks = inputs()
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(model, (images, masks),
                                  dynamic_shapes=({0: batch}, {0: batch}))
    exported = program.module()
    with torch.no_grad():
        for b in (1, 2, 3):
            index = torch.arange(b) % 2
            got = exported(images[index], masks[index])
            want = model(images[index], masks[index])
            for a, e in zip(got, want, strict=True):
                assert torch.equal(a, e)
