"""The model exports whole with torch.export (one graph, MSDA as single op nodes), and the
exported program computes exactly what eager does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from codetr_stream.compile import build_model


@pytest.mark.slow
def test_static_export_of_tiny_equals_eager(data_dir: Path, tiny_config) -> None:
    config = tiny_config.to_dict()
    model = build_model(config, data_dir / "tiny_codino.pth")
    vectors = torch.load(data_dir / "tiny_vectors.pt", map_location="cpu", weights_only=True)
    images, masks = vectors["A_images"], vectors["A_masks"]
    program = torch.export.export(model, (images, masks))
    msda = [n for n in program.graph.nodes if n.target is torch.ops.codetr.ms_deform_attn.default]
    t = config["transformer"]
    assert len(msda) == t["encoder_layers"] + t["decoder_layers"]
    with torch.no_grad():
        got, want = program.module()(images, masks), model(images, masks)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(got[1], vectors["A_scores"], atol=1e-4, rtol=0)
