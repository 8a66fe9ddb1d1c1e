"""Graph passes on an exported program's module, run when an Inductor engine is built.

They run before the graph is compiled; what they make (merged weights, folded masks) is saved
with the engine's weights, and the exported program stays the model as it was.

- "fold-masks": attention inputs that depend on the weights and the input size only (the Swin
  relative-position bias `table[index]` of every `codetr::window_attention` call, and any
  constant `attn_mask` of an SDPA call) are rebuilt by Inductor on every call, because weights
  are graph inputs. This pass computes them once, in the dtype the attention kernel reads (FP16
  engines: autocast would cast them to FP16 on every call, so the values are the same), and
  keeps them as buffers (the Swin-L biases: 23 MB in FP16).
- "linear-relu": `relu(linear(x))` becomes `torch._addmm_activation`, one cuBLASLt GEMM with a
  bias+ReLU epilogue that Inductor calls as an extern kernel, instead of a GEMM and then a pass
  that reads and writes its whole output again (the encoder FFN's 73,656 x 2048 activations per
  image, ~0.86 ms per 1152x768 image). ReLU is exact, so only the GEMM's own rounding remains.
- "linear-gelu": the same for `gelu(linear(x))`, the Swin MLPs' first layer, through cuBLASLt's
  GELU epilogue, which is GELU's tanh form (within a quarter of an FP16 step of the erf form).
- "round-norms": every LayerNorm / GroupNorm output rounded to the compute dtype. Autocast runs
  the norms in FP32 and returns FP32, so without it the residual streams (Swin blocks, encoder,
  decoder) and the encoder's input tokens are stored in FP32, and every residual add + norm
  reads and writes twice the bytes (the encoder's add + LayerNorm: 0.4-0.7 ms a call at batch
  8). The norm still computes in FP32; its output is stored as FP16, as mmcv's FP16 mode and an
  FP16 eager model store it. Changes values (one rounding per norm), so the numerics probe
  judges it.
- "merge-linears": linears that read the same tensor become one GEMM over their concatenated
  weights, each user reading its slice of the output: the MSDA sampling offsets and attention
  weights of every layer (320 + 160 columns from the same queries), and the six decoder layers'
  value projections of the encoder memory (6 x 256 columns: the memory, 589,248 x 256 at batch
  8, read once instead of six times). The same dot products; only the GEMM's blocking differs.
- "msda-offsets": every MSDA layer's `ms_deform_attn(value, ..., reference + offsets / (w, h),
  softmax(logits))` becomes `ms_deform_attn_from_offsets(value, ..., reference, offsets,
  logits)`: on CUDA one kernel makes each location and weight as it samples, so the FP32
  locations and weights (at batch 8, 1.1 GB a layer) are never written and read back. The same
  float32 arithmetic (the softmax's rounding aside); the CPU path runs the layer's own ops.
- "msda-head-major": every MSDA call reads its value from a head-major copy (B, heads, tokens,
  dim), where a sampling point's horizontal corners are neighbours in memory. The copy is a
  clone of the value projection's masked output, which Inductor fuses into the kernel that
  writes it (pointwise time +0.1 ms at batch 8). On an H200 the engine's MSDA time fell 14.98
  -> 13.74 ms at batch 8, the engine 72.53 -> 71.19 ms (batch 1: 10.40 -> 10.16 ms;
  bench/RESULTS.md). Values unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import itertools
import logging
import sys
from collections.abc import Callable, Iterable

import codetr_stream.plugin.window_attention  # noqa: F401  (registers codetr::window_attention)
import torch
from codetr_stream.plugin.op import ms_deform_attn_from_offsets
from torch import Tensor, fx

log = logging.getLogger(__name__)

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
WINDOW_ATTENTION = torch.ops.codetr.window_attention.default
ASSERTS = (aten._assert_tensor_metadata.default,)


def _is_mutating(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and schema.is_mutable


def _written(node: fx.Node) -> set[fx.Node]:
    """The nodes an in-place op writes into: its mutated arguments and the views they are of."""
    schema = getattr(node.target, "_schema", None)
    out: set[fx.Node] = set()
    if schema is None:
        return out
    for i, arg in enumerate(schema.arguments):
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        while isinstance(value, fx.Node) and value not in out:
            out.add(value)
            is_view = getattr(value.target, "is_view", False)
            value = value.args[0] if is_view and value.args else None
    return out


def _is_random(node: fx.Node) -> bool:
    return torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())


def _constants(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value depends on weights and python constants only (never on an input)."""
    const: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr" or (
                node.op == "call_function" and not _is_random(node) and not _is_mutating(node)
                and all(a in const for a in node.all_input_nodes)):
            const.add(node)
    return const


def _cone(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def attribute(module: torch.nn.Module, target: str) -> Tensor:
    """The tensor (or submodule) a `get_attr` node's dotted `target` names in `module`."""
    for name in target.split("."):
        module = getattr(module, name)
    return module  # type: ignore[return-value]


def _evaluate(gm: fx.GraphModule, node: fx.Node) -> Tensor:
    """The value of a constant node, computed eagerly on the module's device."""
    values: dict[fx.Node, object] = {}
    cone = _cone(node)
    for n in gm.graph.nodes:
        if n not in cone:
            continue
        if n.op == "get_attr":
            values[n] = attribute(gm, n.target)
        else:
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), values.__getitem__)
            values[n] = n.target(*args, **kwargs)
    return values[node]  # type: ignore[return-value]


def _mask_arg(node: fx.Node) -> tuple[int | str, fx.Node | None]:
    """Where an attention call takes its additive mask / bias, and the node given there."""
    if node.target is WINDOW_ATTENTION:
        return 1, node.args[1]
    if len(node.args) > 3:
        return 3, node.args[3]
    return "attn_mask", node.kwargs.get("attn_mask")


def fold_attention_masks(gm: fx.GraphModule, dtype: torch.dtype | None) -> int:
    """Replace every constant `attn_mask` of an SDPA call and every constant bias of a window
    attention call by a precomputed buffer (stored as `dtype` when given); returns how many
    were folded."""
    const = _constants(gm.graph)
    # A mask whose cone an in-place op writes into is not a plain function of its inputs.
    written = set().union(*(_written(n) for n in gm.graph.nodes if _is_mutating(n)))
    folded = 0
    with torch.no_grad():
        for node in list(gm.graph.nodes):
            if node.target not in (SDPA, WINDOW_ATTENTION):
                continue
            where, mask = _mask_arg(node)
            if mask is None or mask.op == "get_attr" or mask not in const:
                continue
            if _cone(mask) & written:
                log.warning("fold-masks: %s's mask is written in place; left as it is", node)
                continue
            value = _evaluate(gm, mask)
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            name = f"_folded_attn_mask_{folded}"
            gm.register_buffer(name, value.contiguous())
            with gm.graph.inserting_before(node):
                new = gm.graph.get_attr(name)
            if isinstance(where, int):
                node.update_arg(where, new)
            else:
                node.update_kwarg(where, new)
            folded += 1
    _drop_dead(gm, const)
    return folded


def _drop_dead(gm: fx.GraphModule, const: set[fx.Node]) -> None:
    """Erase what fed only the folded masks, the export's dtype checks on them included (FX's
    own dead-code elimination keeps those checks: asserts count as side effects)."""
    for node in reversed(list(gm.graph.nodes)):
        if node in const and not node.users and (node.target in ASSERTS
                                                 or node.op != "call_function"
                                                 or not node.is_impure()):
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def _call_own(graph: fx.Graph, fn: Callable[..., Tensor], args: tuple[object, ...]) -> fx.Node:
    """A call of one of our Python functions (traced through when the graph compiles), marked as
    `torch.fx.wrap` marks its calls and with a hash of the function's module source: the cache
    of AOTAutograd, which an engine's saved compiled graph is, takes such a call, keyed by the
    hash; it refuses functions it does not know."""
    node = graph.call_function(fn, args)
    node.meta.update(is_wrapped=True, user_cache_hash=_source_hash(fn.__module__))
    return node


@functools.cache
def _source_hash(module: str) -> str:
    """sha256 of a module's source (read once, not at every call site a pass writes)."""
    return hashlib.sha256(inspect.getsource(sys.modules[module]).encode()).hexdigest()


def _addmm_activation(x: Tensor, weight: Tensor, bias: Tensor, dtype: torch.dtype | None,
                      gelu: bool) -> Tensor:
    """act(x @ weight.T + bias) as one GEMM with a fused bias+activation epilogue (cuBLASLt on
    CUDA). `_addmm_activation` is not on autocast's list, so the FP16 engine's casts are
    explicit here (the ones autocast applies to `linear`)."""
    if dtype is not None:
        x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=gelu)
    return out.view(*x.shape[:-1], weight.shape[0])


def linear_relu(x: Tensor, weight: Tensor, bias: Tensor, dtype: torch.dtype | None) -> Tensor:
    """relu(x @ weight.T + bias) in one GEMM; ReLU is exact, only the GEMM's rounding remains."""
    return _addmm_activation(x, weight, bias, dtype, gelu=False)


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor, dtype: torch.dtype | None) -> Tensor:
    """gelu(x @ weight.T + bias) in one GEMM. cuBLASLt's epilogue is GELU's tanh form, within
    4.8e-4 of the erf form everywhere: under a quarter of an FP16 step at the values (|x| ~ 2.7)
    where they differ most; PyTorch's CPU kernel keeps the erf form."""
    return _addmm_activation(x, weight, bias, dtype, gelu=True)


def _fuse_linear_activation(gm: fx.GraphModule, dtype: torch.dtype | None,
                            activation: torch._ops.OpOverload,
                            fused: Callable[..., Tensor]) -> int:
    """Rewrite `activation(linear(x, w, b))` (the linear used only by the activation, the
    activation in its default form) into `fused`; biases used only there are stored as `dtype`
    once. Returns how many were rewritten."""
    count = 0
    biases: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if node.target is not activation or len(node.args) > 1 or node.kwargs:
            continue
        linear = node.args[0]
        if (not isinstance(linear, fx.Node) or linear.target is not aten.linear.default
                or len(linear.users) != 1 or len(linear.args) < 3 or linear.args[2] is None):
            continue
        x, weight, bias = linear.args[:3]
        with gm.graph.inserting_before(node):
            new = _call_own(gm.graph, fused, (x, weight, bias, dtype))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        gm.graph.erase_node(linear)
        biases.add(bias)
        count += 1
    if dtype is not None:
        for bias in biases:
            if bias.op == "get_attr" and all(u.target is fused for u in bias.users):
                owner, _, name = bias.target.rpartition(".")
                module = attribute(gm, owner) if owner else gm
                param = getattr(module, name)
                setattr(module, name, torch.nn.Parameter(param.detach().to(dtype),
                                                         requires_grad=False))
    gm.graph.lint()
    gm.recompile()
    return count


def fuse_linear_relu(gm: fx.GraphModule, dtype: torch.dtype | None) -> int:
    """`relu(linear(x, w, b))` -> `linear_relu` (the encoder and decoder FFNs)."""
    return _fuse_linear_activation(gm, dtype, aten.relu.default, linear_relu)


def fuse_linear_gelu(gm: fx.GraphModule, dtype: torch.dtype | None) -> int:
    """`gelu(linear(x, w, b))` -> `linear_gelu` (the Swin MLPs' first layer)."""
    return _fuse_linear_activation(gm, dtype, aten.gelu.default, linear_gelu)


NORMS = (aten.layer_norm.default, aten.group_norm.default)


def round_norm_outputs(gm: fx.GraphModule, dtype: torch.dtype | None) -> int:
    """Cast every norm's output to `dtype` (the FP16 engine's compute dtype; nothing in FP32
    engines); returns how many norms were rounded."""
    if dtype is None:
        return 0
    count = 0
    for node in list(gm.graph.nodes):
        if node.target not in NORMS:
            continue
        with gm.graph.inserting_after(node):
            cast = gm.graph.call_function(aten._to_copy.default, (node,), {"dtype": dtype})
        node.replace_all_uses_with(cast, delete_user_cb=lambda user, cast=cast: user is not cast)
        count += 1
    gm.graph.lint()
    gm.recompile()
    return count


ACTIVATIONS = (aten.relu.default, aten.gelu.default)


def merge_shared_input_linears(gm: fx.GraphModule, dtype: torch.dtype | None) -> int:
    """Rewrite linears with the same input (weights and biases parameters; not the ones an
    activation fusion takes, whatever the pass order) into one linear and slices of its
    output; returns how many merged GEMMs there are."""
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if (node.target is aten.linear.default and len(node.args) == 3
                and all(isinstance(a, fx.Node) and a.op == "get_attr" for a in node.args[1:])
                and not any(user.target in ACTIVATIONS for user in node.users)):
            groups.setdefault(node.args[0], []).append(node)
    merged = 0
    with torch.no_grad():
        for x, linears in groups.items():
            if len(linears) < 2:
                continue
            weights = [attribute(gm, linear.args[1].target) for linear in linears]
            biases = [attribute(gm, linear.args[2].target) for linear in linears]
            name = f"_merged_linear_{merged}"
            gm.register_buffer(f"{name}_weight", torch.cat(weights).contiguous())
            gm.register_buffer(f"{name}_bias", torch.cat(biases).contiguous())
            with gm.graph.inserting_before(linears[0]):
                out = gm.graph.call_function(aten.linear.default, (
                    x, gm.graph.get_attr(f"{name}_weight"), gm.graph.get_attr(f"{name}_bias")))
                ends = itertools.accumulate(w.shape[0] for w in weights)
                parts = [gm.graph.call_function(aten.slice.Tensor, (out, -1, end - w.shape[0], end))
                         for w, end in zip(weights, ends, strict=True)]
            for linear, part in zip(linears, parts, strict=True):
                linear.replace_all_uses_with(part)
                gm.graph.erase_node(linear)
            merged += 1
    for node in list(gm.graph.nodes):  # the separate weights and biases, now unread
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return merged


MSDA = torch.ops.codetr.ms_deform_attn.default


def _call(node: object, target: object, *args: object) -> bool:
    """`node` is a call of `target` whose arguments after the first are `args` (as given)."""
    return (isinstance(node, fx.Node) and node.target is target
            and tuple(node.args[1:len(args) + 1]) == args)


def _unsqueezed_points(node: object) -> fx.Node | None:
    """REF of `REF[:, :, None, :, None]` (unsqueeze at 2, then at 4), else None."""
    if _call(node, aten.unsqueeze.default, 4) and _call(node.args[0], aten.unsqueeze.default, 2):
        return node.args[0].args[0]
    return None


def _softmax_logits(weights: fx.Node) -> fx.Node | None:
    """LOGITS of `softmax(LOGITS.view(b, q, heads, levels * points), -1).view(...)`."""
    if _call(weights, aten.view.default) and _call(weights.args[0], aten.softmax.int, -1):
        inner = weights.args[0].args[0]
        if _call(inner, aten.view.default):
            return inner.args[0]
    return None


def _offset_source(node: object) -> fx.Node | None:
    """OFFSETS of `OFFSETS.view(b, q, heads, levels, points, 2)`."""
    if _call(node, aten.view.default) and len(node.args[1]) == 6:
        return node.args[0]
    return None


def _locations(gm: fx.GraphModule, loc: fx.Node, shapes: Tensor,
               points: int) -> tuple[fx.Node, fx.Node] | None:
    """(REF, OFFSETS) of the layer's sampling locations, else None: points
    `REF[:, :, None, :, None, :] + OFFSETS.view(...) / wh` with wh the level shapes as (w, h),
    or boxes `R[..., :2] + OFFSETS.view(...) / points * R[..., 2:] * 0.5`, R = REF[:, :, None,
    :, None]."""
    if not _call(loc, aten.add.Tensor):
        return None
    first, second = loc.args[:2]
    if _call(second, aten.div.Tensor) and (ref := _unsqueezed_points(first)) is not None:
        offsets = _offset_source(second.args[0])
        try:
            wh = _evaluate(gm, second.args[1])
        except (KeyError, TypeError, AttributeError):  # not a constant of the weights
            return None
        if offsets is None or not torch.equal(wh.reshape(-1, 2).cpu().float(),
                                              shapes.flip(-1).cpu().float()):
            return None
        return ref, offsets
    if (_call(first, aten.slice.Tensor, 5, 0, 2) and _call(second, aten.mul.Tensor, 0.5)
            and _call(second.args[0], aten.mul.Tensor)):
        scaled, size = second.args[0].args[:2]
        boxes = first.args[0]
        if (_call(scaled, aten.div.Tensor, points) and _call(size, aten.slice.Tensor, 5, 2)
                and size.args[0] is boxes and (ref := _unsqueezed_points(boxes)) is not None
                and (offsets := _offset_source(scaled.args[0])) is not None):
            return ref, offsets
    return None


def _erase_unused(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> None:
    """Erase the given nodes, and what fed only them, once nothing reads them."""
    todo = list(nodes)
    while todo:
        node = todo.pop()
        if node.graph is gm.graph and not node.users and node.op == "call_function":
            inputs = node.all_input_nodes
            gm.graph.erase_node(node)
            todo.extend(inputs)


def fuse_msda_sampling(gm: fx.GraphModule, dtype: torch.dtype | None) -> int:
    """Rewrite every MSDA call whose locations and weights are the layer's own arithmetic
    (`_locations`, `_softmax_logits`) into `ms_deform_attn_from_offsets`; returns how many."""
    fused = 0
    for node in list(gm.graph.nodes):
        if node.target is not MSDA:
            continue
        value, shape_node, starts, loc, weights = node.args
        logits = _softmax_logits(weights)
        if logits is None:
            continue
        points = weights.args[1][-1]  # the weights' view is (b, q, heads, levels, points)
        try:
            shapes = _evaluate(gm, shape_node)
        except (KeyError, TypeError, AttributeError):  # not a constant of the weights
            continue
        found = _locations(gm, loc, shapes, points) if isinstance(points, int) else None
        if found is None:
            continue
        ref, offsets = found
        with gm.graph.inserting_before(node):
            new = _call_own(gm.graph, ms_deform_attn_from_offsets,
                            (value, shape_node, starts, ref, offsets, logits))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        _erase_unused(gm, [loc, weights])
        fused += 1
    gm.graph.lint()
    gm.recompile()
    return fused


def store_msda_values_head_major(gm: fx.GraphModule, dtype: torch.dtype | None) -> int:
    """Give every MSDA call its value (B, tokens, heads, dim) as a view of a head-major copy
    (`plugin/kernel.py` `stored_head_major`); returns how many calls."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.target is not MSDA:
            continue
        with gm.graph.inserting_before(node):
            heads_first = gm.graph.call_function(aten.transpose.int, (node.args[0], 1, 2))
            stored = gm.graph.call_function(aten.clone.default, (heads_first,),
                                            {"memory_format": torch.contiguous_format})
            node.update_arg(0, gm.graph.call_function(aten.transpose.int, (stored, 1, 2)))
        count += 1
    gm.graph.lint()
    gm.recompile()
    return count


PASSES: dict[str, Callable[[fx.GraphModule, torch.dtype | None], int]] = {
    "fold-masks": fold_attention_masks,
    "linear-relu": fuse_linear_relu,
    "linear-gelu": fuse_linear_gelu,
    "round-norms": round_norm_outputs,
    "merge-linears": merge_shared_input_linears,
    "msda-offsets": fuse_msda_sampling,
    "msda-head-major": store_msda_values_head_major,
}


def check_passes(names: Iterable[str]) -> list[str]:
    """The pass names, validated (a clear error names the known ones)."""
    names = list(names)
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise ValueError(f"unknown engine pass(es) {unknown}; known: {', '.join(PASSES)}")
    return names


def apply_passes(gm: fx.GraphModule, names: Iterable[str],
                 dtype: torch.dtype | None) -> dict[str, int]:
    """Run the named passes in order; returns how many sites each one rewrote."""
    done = {}
    for name in check_passes(names):
        done[name] = PASSES[name](gm, dtype)
        log.info("engine pass %s: %d sites", name, done[name])
    return done
