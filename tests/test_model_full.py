"""The full Co-DINO Swin-L: exactly the official inference keys and shapes, and it exports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from codetr_stream.compile import build_model


def spec_keys(data_dir: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """tests/data/swin_l_codino_keys.tsv (docs/checkpoint.md): key -> (shape, dtype)."""
    rows = (line.split("\t") for line in
            (data_dir / "swin_l_codino_keys.tsv").read_text().splitlines()[1:])
    return {key: (tuple(int(s) for s in shape.split("x")), dtype)
            for key, shape, dtype, _ in rows}


def test_full_model_has_the_official_keys_and_shapes(data_dir: Path) -> None:
    model = build_model("co_dino_swin_l", device="meta")
    state = model.state_dict()
    spec = spec_keys(data_dir)
    assert len(spec) == 680
    assert sorted(state) == sorted(spec)
    got = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()}
    assert got == spec
    assert sum(p.numel() for p in model.parameters()) == 219_166_336
    assert model.query_head.max_per_img == 300


@pytest.mark.slow
def test_full_model_exports_at_768x1152() -> None:
    """Export only (about 15 s on 2 cores); running it on CPU would take over a minute."""
    model = build_model("co_dino_swin_l")
    images = torch.zeros(1, 3, 768, 1152)
    masks = torch.zeros(1, 768, 1152, dtype=torch.bool)
    program = torch.export.export(model, (images, masks))
    output = next(n for n in program.graph.nodes if n.op == "output")
    vals = [arg.meta["val"] for arg in output.args[0]]
    assert [tuple(v.shape) for v in vals] == [(1, 300, 4), (1, 300), (1, 300)]
    assert [v.dtype for v in vals] == [torch.float32, torch.float32, torch.int64]
