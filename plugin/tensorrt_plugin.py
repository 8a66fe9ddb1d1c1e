"""TensorRT plugin for `codetr::ms_deform_attn`: plugin/kernel.py compiled ahead of time.

`register_plugin()` registers, through TensorRT's Python plugin API (`tensorrt.plugin`; AOT
plugins came with TensorRT 10.9):
- the plugin's output description: (B, Q, H*D) in value's dtype;
- an AOT implementation: `msda_fwd_kernel` compiled by Triton to PTX for the build GPU, with its
  launch grid as symbolic shape expressions. TensorRT embeds the PTX in the engine, so the engine
  runs with no Python, no plugin registration and no .so (NVIDIA's quickly_deployable_plugins
  sample: "it does not require any Python modules or definitions to be present at runtime").
`register()` adds the Torch-TensorRT converter of `torch.ops.codetr.ms_deform_attn.default` onto
that plugin, so a model containing the op compiles to TensorRT with no fallback to PyTorch. Only
building needs either; loading an engine needs neither.

The kernel keeps TensorRT's AOT calling convention (input pointers, then the int32 `extra_args`,
then the output pointer: "located after the tensor inputs and before the tensor outputs",
`tensorrt.plugin.aot_impl` docs). Triton appends two scratch pointers that TensorRT leaves null
(Torch-TensorRT's kernels/_triton.py); they are unused when their sizes are 0, which
`compile_kernel` checks. H, D, L and P must be static (they are in the model: the kernel
specialises on them); B, S and Q may be dynamic. Pointers are declared 16-byte aligned
(TensorRT's I/O buffers are). TensorRT, Torch-TensorRT and Triton are imported only inside the
functions. No `from __future__ import annotations` here: `tensorrt.plugin` reads the plugin
functions' annotations as live objects.
"""

from typing import Any

OP_NAME = "codetr::ms_deform_attn"
INPUTS = ("value", "spatial_shapes", "level_start_index", "sampling_locations",
          "attention_weights")
SCALARS = ("num_tokens", "num_queries", "num_heads")
_registered: set[str] = set()


def compile_kernel(dtypes: dict[str, str], dim: int, levels: int, points: int,
                   capability: int) -> Any:
    """Compile `msda_fwd_kernel` with Triton for compute capability `capability` (e.g. 90).

    dtypes: Triton element type ("fp16", "fp32", "bf16", "i64", "i32") of each input in INPUTS;
    the output takes value's. Returns Triton's compiled kernel (PTX in `.asm["ptx"]`).
    """
    import triton
    from codetr_stream.plugin.kernel import launch_config, msda_fwd_kernel
    from triton.backends.compiler import GPUTarget

    config = launch_config()
    signature = {
        "value_ptr": f"*{dtypes['value']}",
        "shapes_ptr": f"*{dtypes['spatial_shapes']}",
        "starts_ptr": f"*{dtypes['level_start_index']}",
        "loc_ptr": f"*{dtypes['sampling_locations']}",
        "attw_ptr": f"*{dtypes['attention_weights']}",
        **dict.fromkeys(SCALARS, "i32"),
        "out_ptr": f"*{dtypes['value']}",
    }
    itemsize = {"fp32": 4, "fp16": 2, "bf16": 2}[dtypes["value"]]
    constexprs = {"DIM": dim, "LEVELS": levels, "POINTS": points,
                  **config.constexprs(dim, itemsize)}
    if list(signature) + list(constexprs) != list(msda_fwd_kernel.arg_names):
        raise RuntimeError(f"{__file__}: signature out of date with msda_fwd_kernel's arguments")
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    pointers = [i for i, kind in enumerate(signature.values()) if kind.startswith("*")]
    source = triton.compiler.ASTSource(
        fn=msda_fwd_kernel,
        signature=signature,
        constexprs=constexprs,
        attrs={(i,): [["tt.divisibility", 16]] for i in pointers},
    )
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": config.num_warps})
    # TensorRT launches a plain grid of `num_warps * 32` threads with no scratch buffers: a kernel
    # that needs scratch memory, thread-block clusters, a cooperative or a PDL launch cannot run.
    unsupported = {"global_scratch_size": 0, "profile_scratch_size": 0, "num_ctas": 1,
                   "launch_cooperative_grid": False, "launch_pdl": False}
    for field, plain in unsupported.items():
        value = getattr(compiled.metadata, field, plain)
        if value != plain:
            raise RuntimeError(f"msda_fwd_kernel has {field}={value}: no TensorRT AOT launch")
    return compiled


def _static(expr: Any, what: str) -> int:
    if not expr.is_constant:
        raise ValueError(f"{OP_NAME} TensorRT plugin: {what} must be static in the engine")
    return int(expr.constant_value())  # a method of tensorrt.plugin.ShapeExpr, not a property


def register_plugin() -> None:
    """Register the plugin's description and AOT implementation with TensorRT (idempotent)."""
    if "plugin" in _registered:
        return
    import codetr_stream.plugin  # noqa: F401  (defines torch.ops.codetr.ms_deform_attn)
    import tensorrt as trt
    import tensorrt.plugin as trtp
    import torch
    from codetr_stream.plugin.kernel import launch_config

    if not hasattr(trtp, "aot_impl"):
        raise ImportError(f"TensorRT {trt.__version__} has no tensorrt.plugin.aot_impl; the MSDA "
                          "plugin needs TensorRT 10.9 or newer")
    triton_type = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16",
                   trt.int64: "i64", trt.int32: "i32"}

    @trtp.register(OP_NAME)
    def _describe(
        value: trtp.TensorDesc,
        spatial_shapes: trtp.TensorDesc,
        level_start_index: trtp.TensorDesc,
        sampling_locations: trtp.TensorDesc,
        attention_weights: trtp.TensorDesc,
    ) -> tuple[trtp.TensorDesc]:
        shape = value.shape_expr
        queries = sampling_locations.shape_expr[1]
        return (trtp.from_shape_expr((shape[0], queries, shape[2] * shape[3]),
                                     dtype=value.dtype),)

    @trtp.aot_impl(OP_NAME)
    def _aot(
        value: trtp.TensorDesc,
        spatial_shapes: trtp.TensorDesc,
        level_start_index: trtp.TensorDesc,
        sampling_locations: trtp.TensorDesc,
        attention_weights: trtp.TensorDesc,
        outputs: tuple[trtp.TensorDesc],
        tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        descs = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        dtypes = {name: triton_type[desc.dtype] for name, desc in zip(INPUTS, descs, strict=True)}
        batch, tokens, heads = (value.shape_expr[i] for i in range(3))
        locs = sampling_locations.shape_expr
        queries = locs[1]
        dim = _static(value.shape_expr[3], "head dim D")
        major, minor = torch.cuda.get_device_capability()
        compiled = compile_kernel(dtypes, dim, _static(locs[3], "levels L"),
                                  _static(locs[4], "points P"), 10 * major + minor)
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(queries, launch_config().block_q)
        launch.grid_y = trtp.SymInt32(batch * heads)
        launch.block_x = compiled.metadata.num_warps * 32
        launch.shared_mem = compiled.metadata.shared
        # One SymInt32 per int32 kernel scalar, in SCALARS order (TensorRT requires SymInt32).
        extra_args = trtp.SymIntExprs.from_tuple(
            [trtp.SymInt32(tokens), trtp.SymInt32(queries), trtp.SymInt32(heads)]
        )
        return (compiled.metadata.name.encode(), compiled.asm["ptx"].encode(), launch,
                extra_args)

    _registered.add("plugin")


def register() -> None:
    """`register_plugin()` plus the Torch-TensorRT converter onto it (idempotent; for building)."""
    if "converter" in _registered:
        return
    register_plugin()
    import torch_tensorrt

    # With an aot_impl registered, the converter adds the layer with `add_plugin(..., aot=True)`.
    torch_tensorrt.dynamo.conversion.plugins.generate_plugin_converter(
        OP_NAME, supports_dynamic_shapes=True, use_aot_if_available=True
    )
    _registered.add("converter")
