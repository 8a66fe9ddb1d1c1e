"""compile/export.py: one dynamic-batch program serves every batch size, input sizes checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from codetr_stream.compile import build_model
from codetr_stream.compile.export import (
    SizeError,
    check_input_size,
    example_inputs,
    export_for_batches,
    level_tokens,
    size_multiple,
)
from codetr_stream.compile.model_config import parse_config


def test_full_model_size_rules() -> None:
    cfg = parse_config("co_dino_swin_l")
    assert size_multiple(cfg) == 32
    assert level_tokens(cfg, (768, 1152)) == 73_656  # docs/model.md §3
    for hw in ((768, 1152), (608, 608), (1280, 1920)):
        check_input_size(cfg, hw)
    with pytest.raises(SizeError, match=r"size 1150x768 .*multiples of 32.*nearest: 1152x768"):
        check_input_size(cfg, (768, 1150))


@pytest.mark.slow
def test_one_dynamic_batch_program_equals_eager_at_each_batch(data_dir: Path,
                                                             tiny_config) -> None:
    model = build_model(tiny_config, data_dir / "tiny_codino.pth")
    programs = export_for_batches(model, (128, 160), [1, 3], "cpu")
    assert programs[1] is programs[3]  # the batch dimension exported dynamic
    for batch in (1, 3):
        images, masks = example_inputs(batch, (128, 160), "cpu", seed=batch)
        masks[0, 100:] = True
        with torch.no_grad():
            got, want = programs[batch].module()(images, masks), model(images, masks)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
