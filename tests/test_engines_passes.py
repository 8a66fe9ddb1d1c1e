"""Engine graph passes (compile/engines/passes.py): each rewrite leaves the outputs bit for bit
as they were, in FP32 and under reduced-precision autocast, and the mask folding refuses a mask
that the graph writes into."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from codetr_stream.compile import build_model
from codetr_stream.compile.engines.passes import (
    WINDOW_ATTENTION,
    apply_passes,
    fold_attention_masks,
    fuse_msda_sampling,
)
from codetr_stream.compile.engines.precision import drop_dtype_asserts
from codetr_stream.compile.export import example_inputs, export_for_batches
from codetr_stream.compile.model.deformable import MultiScaleDeformableAttention
from torch import nn

HW = (128, 160)
PASSES = ["fold-masks", "linear-relu", "linear-gelu", "merge-linears", "msda-offsets",
          "round-norms"]


@pytest.fixture(scope="module")
def program(data_dir: Path, tiny_config) -> torch.export.ExportedProgram:
    """The tiny model exported with a dynamic batch (as the Inductor engine does)."""
    model = build_model(tiny_config, data_dir / "tiny_codino.pth")
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


@pytest.mark.slow
def test_passes_keep_fp32_outputs_identical_at_every_batch(
        program: torch.export.ExportedProgram) -> None:
    before = program.module()
    after = copy.deepcopy(before)
    # The tiny model's MSDA offsets + weights (2 encoder, 2 decoder layers) and its decoder
    # value projections make 5 merged GEMMs; its 4 MSDA layers take their sampling from the
    # projections; norms are rounded in reduced precision only.
    assert apply_passes(after, PASSES, None) == {"fold-masks": 5, "linear-relu": 14,
                                                 "linear-gelu": 5, "merge-linears": 5,
                                                 "msda-offsets": 4, "round-norms": 0}
    biases = [n.args[1] for n in after.graph.nodes if n.target is WINDOW_ATTENTION]
    assert len(biases) == 5 and all(b.op == "get_attr" for b in biases)
    kinds = _targets(after)
    assert torch.ops.aten.index.Tensor not in kinds  # no bias-table gather left
    assert torch.ops.aten.relu.default not in kinds
    assert torch.ops.aten.gelu.default not in kinds
    assert torch.ops.aten.softmax.int not in kinds  # the MSDA weights' softmax went with it
    assert torch.ops.codetr.ms_deform_attn.default not in kinds
    shared = [n.args[0] for n in after.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert len(shared) == len(set(shared))  # no two linears read one tensor any more
    for batch in (1, 2):
        with torch.no_grad():
            _assert_same(after(*_inputs(batch)), before(*_inputs(batch)))


def test_msda_head_major_gives_every_msda_call_a_head_major_value_and_the_same_outputs(
        program: torch.export.ExportedProgram) -> None:
    before = program.module()
    after = copy.deepcopy(before)
    assert apply_passes(after, ["msda-head-major"], None) == {"msda-head-major": 4}
    calls = [n for n in after.graph.nodes if n.target is torch.ops.codetr.ms_deform_attn.default]
    for call in calls:
        value = call.args[0]
        assert value.target is torch.ops.aten.transpose.int
        assert value.args[0].target is torch.ops.aten.clone.default
    with torch.no_grad():
        _assert_same(after(*_inputs(2)), before(*_inputs(2)))


@pytest.mark.slow
def test_passes_under_autocast_store_and_compute_the_low_precision_values(
        program: torch.export.ExportedProgram) -> None:
    """CPU bfloat16 autocast stands in for the GPU's FP16: the folded masks are stored in the
    compute dtype and the fused GEMMs get autocast's casts, so nothing changes."""
    before = drop_dtype_asserts(program.module())
    after = copy.deepcopy(before)
    exact = [name for name in PASSES if name != "round-norms"]
    apply_passes(after, exact, torch.bfloat16)
    folded = [b for name, b in after.named_buffers() if name.startswith("_folded_attn_mask")]
    assert len(folded) == 5 and all(b.dtype == torch.bfloat16 for b in folded)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _assert_same(after(*_inputs(2)), before(*_inputs(2)))


@pytest.mark.slow
def test_round_norms_stores_every_norm_output_in_the_compute_dtype(
        program: torch.export.ExportedProgram) -> None:
    """Under autocast the norms compute and return FP32; after the pass every one of them (30
    LayerNorms, 5 GroupNorms) is read by one cast to the compute dtype only, and the outputs
    move by that rounding alone: finite, scores within bfloat16's steps of the unrounded run."""
    before = drop_dtype_asserts(program.module())
    after = copy.deepcopy(before)
    assert apply_passes(after, ["round-norms"], torch.bfloat16) == {"round-norms": 35}
    for node in after.graph.nodes:
        if node.target in (torch.ops.aten.layer_norm.default, torch.ops.aten.group_norm.default):
            (cast,) = node.users
            assert cast.target is torch.ops.aten._to_copy.default
            assert cast.kwargs == {"dtype": torch.bfloat16}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = before(*_inputs(2)), after(*_inputs(2))
    assert all(t.isfinite().all() for t in got if t.is_floating_point())
    scores = [t[1].sort(dim=1, descending=True).values for t in (want, got)]
    torch.testing.assert_close(scores[1], scores[0], rtol=0, atol=0.02)
    assert not torch.equal(scores[1], scores[0])  # the rounding did happen


class _Sampling(nn.Module):
    """One MSDA layer over two levels with 2-d (point) or 4-d (box) references."""

    SHAPES = ((6, 5), (3, 3))

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = MultiScaleDeformableAttention(16, 2, 2, 3)

    def forward(self, x: torch.Tensor, value: torch.Tensor,
                reference: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(value.shape[:2], dtype=torch.bool)
        return self.layer(x, x, value, mask, reference, list(self.SHAPES))


def _nudge(gm: torch.fx.GraphModule, ref_dims: int) -> None:
    """Change the layer's location formula slightly: the level sizes doubled (points) or the
    box half-size factor 0.5 -> 0.25 (boxes)."""
    aten = torch.ops.aten
    for node in gm.graph.nodes:
        if (ref_dims == 2 and node.target is aten.div.Tensor
                and isinstance(node.args[1], torch.fx.Node)):
            with gm.graph.inserting_before(node):
                node.update_arg(1, gm.graph.call_function(aten.mul.Tensor, (node.args[1], 2.0)))
            break
        if ref_dims == 4 and node.target is aten.mul.Tensor and node.args[1:] == (0.5,):
            node.update_arg(1, 0.25)
            break
    gm.recompile()


@pytest.mark.parametrize("ref_dims", [2, 4], ids=["points", "boxes"])
@pytest.mark.parametrize("nudged", [False, True], ids=["layer", "other-formula"])
def test_msda_offsets_takes_only_the_layers_own_sampling(ref_dims: int, nudged: bool) -> None:
    """The layer's MSDA call is rewritten (same outputs); a call whose locations differ from the
    layer's formula in one constant is left as it is."""
    x, value = torch.randn(2, 7, 16), torch.randn(2, 39, 16)
    reference = torch.rand(2, 7, 2, ref_dims)
    module = torch.export.export(_Sampling(), (x, value, reference), strict=False).module()
    if nudged:
        _nudge(module, ref_dims)
    with torch.no_grad():
        want = module(x, value, reference)
        assert fuse_msda_sampling(module, None) == (0 if nudged else 1)
        torch.testing.assert_close(module(x, value, reference), want, rtol=0, atol=0)


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
