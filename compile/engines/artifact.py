"""An Inductor engine's compiled graph as a file, so that a daemon start compiles nothing.

`torch.compile` at every start re-traces the model with Dynamo and looks each graph up in the
engine's compile cache; `torch._inductor.standalone_compile` compiles an FX graph once and
saves what it made (generated code, compiled Triton kernels) as one file, which
`CompiledArtifact.load` turns back into a callable without tracing (kernels with several launch
configurations still time them at the first call: 6.9 s of the H200's 22.7 s warm start).
It takes a flat graph with tensors as inputs, so `flatten` turns a prepared program module
(parameters and buffers read by `get_attr`, pytree calling convention, export's input guard)
into `(*weights, images, masks) -> outputs`, the weights saved beside the artifact. The input
and output casts of `precision.PrecisionWrapper` become graph nodes, and the graph compiles
under the engine's autocast, which AOTAutograd's trace applies as it would under
`torch.compile`.

An artifact loads only under the torch build that made it (`torch_key`, asserted at load);
the manifest's check refuses an engine from another torch, Triton or GPU architecture first.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from codetr_stream.compile.engines import reductions
from codetr_stream.compile.engines.passes import attribute
from codetr_stream.compile.engines.precision import autocast, compute_dtype
from torch import Tensor, fx

aten = torch.ops.aten


def _cast(graph: fx.Graph, node: fx.Node, dtype: torch.dtype) -> fx.Node:
    return graph.call_function(aten._to_copy.default, (node,), {"dtype": dtype})


def flatten(module: fx.GraphModule, precision: str) -> tuple[fx.GraphModule, dict[str, Tensor]]:
    """`module`'s graph as `(*weights, images, masks) -> outputs` with positional inputs and a
    flat output tuple (FP16: images cast to FP16, floating outputs to FP32), and its weights by
    name, in input order. `module` itself is left as it was."""
    graph = fx.Graph()
    outputs = graph.graph_copy(module.graph, {})  # the copy's own output node is left out
    for node in list(graph.nodes):  # export's input check: shapes are fixed per batch here
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    images, masks = (n for n in graph.nodes if n.op == "placeholder")
    weights: dict[str, Tensor] = {}
    inputs: dict[str, fx.Node] = {}
    for node in [n for n in graph.nodes if n.op == "get_attr"]:
        value = attribute(module, node.target)
        if not isinstance(value, Tensor):
            continue  # a subgraph of a higher-order op stays an attribute
        if node.target not in inputs:
            with graph.inserting_before(images):
                inputs[node.target] = graph.placeholder(f"w{len(weights)}")
            inputs[node.target].meta = dict(node.meta)
            weights[node.target] = value.detach()
        node.replace_all_uses_with(inputs[node.target])
        graph.erase_node(node)
    dtype = compute_dtype(precision)
    if dtype is not None:
        with graph.inserting_after(masks):
            cast = _cast(graph, images, dtype)
        images.replace_all_uses_with(cast, delete_user_cb=lambda user: user is not cast)
        outputs = tuple(_cast(graph, o, torch.float32) if _is_floating(o) else o
                        for o in outputs)
    graph.output(tuple(outputs))
    graph.lint()
    holders = {n.target: attribute(module, n.target) for n in graph.nodes if n.op == "get_attr"}
    return fx.GraphModule(holders, graph), weights


def _is_floating(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, Tensor) and value.is_floating_point()


def compile_graph(graph: fx.GraphModule, weights: list[Tensor], images: Tensor, masks: Tensor,
                  precision: str, options: dict[str, Any]) -> Any:
    """Inductor's compiled `graph` for these input shapes (static), a `CompiledArtifact`.
    `options`: Inductor config patches; the reduction heuristics are always added."""
    patches = {**reductions.compile_options(), **options}
    with torch.no_grad(), reductions.installed(), autocast(images.device, precision):
        return torch._inductor.standalone_compile(
            graph, [*weights, images, masks], dynamic_shapes="from_example_inputs",
            options={"config_patches": patches})


def save_weights(weights: dict[str, Tensor], path: Path) -> None:
    """The weights `flatten` lifted, in input order, as a `torch.save` file (written atomically)."""
    partial = path.with_name(path.name + ".partial")
    torch.save({name: t.cpu() for name, t in weights.items()}, partial)
    os.replace(partial, path)


def load_weights(path: Path, device: torch.device) -> list[Tensor]:
    """The saved weights on `device`, in input order (tensors only: `weights_only`)."""
    saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return [t.to(device) for t in saved.values()]


def load(path: Path) -> Callable[..., Any]:
    """The compiled graph saved at `path` (by `CompiledArtifact.save`), ready to call."""
    import codetr_stream.plugin.window_attention  # noqa: F401  (the ops the generated code calls)

    return torch._inductor.CompiledArtifact.load(path=str(path), format="binary")
