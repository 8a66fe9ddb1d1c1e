"""Engine graph passes (compile/engines/passes.py): each rewrite leaves the outputs bit for bit
as they were, in FP32 and under reduced-precision autocast, and the mask folding refuses a mask
that the graph writes into."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from codetr_stream.compile import build_model
from codetr_stream.compile.engines.passes import SDPA, apply_passes, fold_attention_masks
from codetr_stream.compile.engines.precision import drop_dtype_asserts
from codetr_stream.compile.export import example_inputs, export_for_batches
from codetr_stream.compile.model.swin import shift_mask, window_partition
from torch import nn

HW = (128, 160)
BOTH = ["fold-masks", "linear-relu"]


@pytest.fixture(scope="module")
def program(data_dir: Path) -> torch.export.ExportedProgram:
    """The tiny model exported with a dynamic batch (as the Inductor engine does)."""
    config = json.loads((data_dir / "tiny_config.json").read_text())
    model = build_model(config, data_dir / "tiny_codino.pth")
    programs = export_for_batches(model, HW, [1, 2], "cpu")
    return programs[2]


def _inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = example_inputs(batch, HW, "cpu", seed=7)
    masks[0, 100:, :] = True
    masks[0, :, 120:] = True
    return images, masks


def _targets(gm: torch.fx.GraphModule) -> set[object]:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def _assert_same(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_shift_mask_labels_regions_as_mmdet_does() -> None:
    """mmdet's slice-assignment labelling, written out, against the comparison-based one."""
    for h, w, window, shift in ((14, 14, 7, 3), (192, 288, 12, 6), (156, 156, 12, 6),
                                (12, 24, 12, 6), (28, 21, 7, 3)):
        region = torch.zeros(h, w)
        count = 0
        for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                region[hs, ws] = count
                count += 1
        ids = window_partition(region[None, :, :, None], window).squeeze(-1)
        want = torch.where(ids[:, None, :] != ids[:, :, None], -100.0, 0.0)
        assert torch.equal(shift_mask(h, w, window, shift, torch.device("cpu")), want)


@pytest.mark.slow
def test_passes_keep_fp32_outputs_identical_at_every_batch(
        program: torch.export.ExportedProgram) -> None:
    before = program.module()
    after = copy.deepcopy(before)
    assert apply_passes(after, BOTH, None) == {"fold-masks": 5, "linear-relu": 14}
    masks = [n.args[3] for n in after.graph.nodes if n.target is SDPA and len(n.args) > 3]
    assert len(masks) == 5 and all(m.op == "get_attr" for m in masks)
    kinds = _targets(after)
    assert torch.ops.aten.index.Tensor not in kinds  # no bias-table gather left
    assert torch.ops.aten.relu.default not in kinds
    for batch in (1, 2):
        with torch.no_grad():
            _assert_same(after(*_inputs(batch)), before(*_inputs(batch)))


@pytest.mark.slow
def test_passes_under_autocast_store_and_compute_the_low_precision_values(
        program: torch.export.ExportedProgram) -> None:
    """CPU bfloat16 autocast stands in for the GPU's FP16: the folded masks are stored in the
    compute dtype and the fused GEMMs get autocast's casts, so nothing changes."""
    before = drop_dtype_asserts(program.module())
    after = copy.deepcopy(before)
    apply_passes(after, BOTH, torch.bfloat16)
    folded = [b for name, b in after.named_buffers() if name.startswith("_folded_attn_mask")]
    assert len(folded) == 5 and all(b.dtype == torch.bfloat16 for b in folded)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _assert_same(after(*_inputs(2)), before(*_inputs(2)))


class _Attention(nn.Module):
    """A constant mask, optionally written in place (through a view, so that SDPA reads the
    node of the constant itself) with an input-dependent value."""

    def __init__(self, write: bool) -> None:
        super().__init__()
        self.write = write
        self.register_buffer("bias", torch.randn(1, 2, 4, 4, generator=torch.Generator()
                                                 .manual_seed(0)))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        mask = self.bias * 2
        if self.write:
            mask[:, :1].add_(q.mean())
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)


@pytest.mark.parametrize("write", [False, True], ids=["constant", "written-in-place"])
def test_only_masks_no_input_can_change_are_folded(write: bool) -> None:
    q = torch.randn(3, 2, 4, 8)
    module = torch.export.export(_Attention(write), (q,), strict=False).module()
    want = module(q)
    assert fold_attention_masks(module, None) == (0 if write else 1)
    torch.testing.assert_close(module(q), want, rtol=0, atol=0)


def test_unknown_pass_names_the_known_ones(program: torch.export.ExportedProgram) -> None:
    with pytest.raises(ValueError, match=r"unknown engine pass.*fold-masks, linear-relu"):
        apply_passes(program.module(), ["fold-mask"], None)
