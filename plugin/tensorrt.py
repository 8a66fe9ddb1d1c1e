"""TensorRT plugin for `codetr::ms_deform_attn`: plugin/kernel.py compiled ahead of time.

`register()` (call it once before building an engine) registers, through TensorRT's Python plugin
API (`tensorrt.plugin`, TensorRT >= 10.8):
- the plugin's output description: (B, Q, H*D) in value's dtype;
- an AOT implementation: `msda_fwd_kernel` compiled by Triton to PTX for the build GPU, with its
  launch grid as symbolic shape expressions. TensorRT embeds the PTX in the engine, so the engine
  runs with no Python and no .so;
- the Torch-TensorRT converter of `torch.ops.codetr.ms_deform_attn.default` onto that plugin, so a
  model containing the op compiles to TensorRT with no fallback to PyTorch.

The kernel keeps TensorRT's AOT calling convention (input pointers, int32 scalars, output
pointer). H, D, L and P must be static (they are in the model: the kernel specialises on them);
B, S and Q may be dynamic. Pointers are declared 16-byte aligned (TensorRT's I/O buffers are).
TensorRT and Torch-TensorRT are imported only inside `register()`. No `from __future__ import
annotations` here: `tensorrt.plugin` reads the plugin functions' annotations as live objects.
"""

from typing import Any

OP_NAME = "codetr::ms_deform_attn"
INPUTS = ("value", "spatial_shapes", "level_start_index", "sampling_locations",
          "attention_weights")
SCALARS = ("num_tokens", "num_queries", "num_heads")
_registered = False


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
    # TensorRT passes no scratch buffers: a kernel that needs one cannot run as an AOT plugin.
    for field in ("global_scratch_size", "profile_scratch_size"):
        if getattr(compiled.metadata, field, 0):
            raise RuntimeError(f"msda_fwd_kernel needs {field}; TensorRT AOT cannot launch it")
    return compiled


def _static(expr: Any, what: str) -> int:
    if not expr.is_constant:
        raise ValueError(f"{OP_NAME} TensorRT plugin: {what} must be static in the engine")
    return int(expr.constant_value)


def register() -> None:
    """Register the plugin and the Torch-TensorRT converter (idempotent)."""
    global _registered
    if _registered:
        return
    import codetr_stream.plugin  # noqa: F401  (defines torch.ops.codetr.ms_deform_attn)
    import tensorrt as trt
    import tensorrt.plugin as trtp
    import torch
    import torch_tensorrt
    from codetr_stream.plugin.kernel import launch_config

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
        block_q = launch_config().block_q
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(queries, block_q)
        launch.grid_y = trtp.SymInt32(batch * heads)
        launch.block_x = compiled.metadata.num_warps * 32
        launch.shared_mem = compiled.metadata.shared
        extra_args = trtp.SymIntExprs.from_tuple(
            [trtp.SymInt32(tokens), trtp.SymInt32(queries), trtp.SymInt32(heads)]
        )
        return (compiled.metadata.name.encode(), compiled.asm["ptx"].encode(), launch,
                extra_args)

    torch_tensorrt.dynamo.conversion.plugins.generate_plugin_converter(
        OP_NAME, supports_dynamic_shapes=True, use_aot_if_available=True
    )
    _registered = True
