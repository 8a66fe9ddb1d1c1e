"""The TensorRT plugin: the AOT kernel build (needs triton only) and engines (need TensorRT).

TensorRT could not be installed on any machine of this project, so the engine tests have never
run here; they skip with that reason wherever `tensorrt` / `torch_tensorrt` do not import.
"""

from __future__ import annotations

import re

import pytest
import torch
from test_msda_gpu import TOLERANCE
from test_msda_reference import _Block, block_inputs, make_inputs, msda_float64

DTYPES = {"value": "fp16", "spatial_shapes": "i64", "level_start_index": "i64",
          "sampling_locations": "fp16", "attention_weights": "fp16"}
NO_TENSORRT = "TensorRT is not installed (cannot be, on this project's machines)"


def test_aot_kernel_compiles_to_ptx_for_hopper_with_the_tensorrt_calling_convention():
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[kernel]')")
    from codetr_stream.plugin.tensorrt_plugin import compile_kernel

    compiled = compile_kernel(DTYPES, dim=32, levels=5, points=4, capability=90)
    ptx = compiled.asm["ptx"]
    entry = re.search(r"\.entry (\w+)\((.*?)\)", ptx, re.S)
    assert entry and entry.group(1) == compiled.metadata.name
    params = re.findall(r"\.param \.(\w+)", entry.group(2))
    # 5 input pointers, 3 int32 scalars, the output pointer: TensorRT passes exactly these.
    assert params[:9] == ["u64"] * 5 + ["u32"] * 3 + ["u64"], params
    # Beyond them only Triton's scratch pointers, which TensorRT leaves null: sizes must be 0.
    assert params[9:] == ["u64"] * len(params[9:]) and len(params) <= 11, params
    assert compiled.metadata.global_scratch_size == compiled.metadata.profile_scratch_size == 0
    assert ".target sm_90" in ptx
    assert "ld.global.v4" in ptx, "corner gathers should be 16-byte vector loads"
    assert compiled.metadata.num_warps * 32 > 0


def _run(trt, engine, named: dict[str, torch.Tensor], output: str) -> torch.Tensor:
    """One synchronous run of `engine` on `named` inputs, dynamic input shapes set per call."""
    context = engine.create_execution_context()
    for name, tensor in named.items():
        if -1 in tuple(engine.get_tensor_shape(name)):
            assert context.set_input_shape(name, tuple(tensor.shape))
        assert context.set_tensor_address(name, tensor.data_ptr())
    dtype = {trt.float32: torch.float32, trt.float16: torch.float16}[
        engine.get_tensor_dtype(output)]
    out = torch.empty(tuple(context.get_tensor_shape(output)), dtype=dtype, device="cuda")
    assert context.set_tensor_address(output, out.data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_plain_tensorrt_network_with_the_aot_plugin_matches_float64(dtype):
    """No Torch-TensorRT: the plugin in a hand-built network, batch and queries dynamic."""
    trt = pytest.importorskip("tensorrt", reason=NO_TENSORRT)
    import tensorrt.plugin as trtp
    from codetr_stream.plugin.tensorrt_plugin import INPUTS, register_plugin

    register_plugin()
    shapes, heads, dim, points = [(6, 4), (3, 2)], 2, 16, 3
    # Two runs of one engine: the grid (queries / 64 blocks, batch * heads) follows the shapes.
    cases = [make_inputs(2, 70, heads, dim, shapes, points, dtype=dtype, device="cuda", seed=1),
             make_inputs(1, 130, heads, dim, shapes, points, dtype=dtype, device="cuda", seed=2)]
    trt_type = {torch.float32: trt.float32, torch.float16: trt.float16, torch.int64: trt.int64}
    dynamic = {"value": (0,), "sampling_locations": (0, 1), "attention_weights": (0, 1)}
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    tensors = []
    for index, name in enumerate(INPUTS):
        sizes = [tuple(case[index].shape) for case in cases]
        axes = dynamic.get(name, ())
        shape = [-1 if axis in axes else n for axis, n in enumerate(sizes[0])]
        tensors.append(network.add_input(name, trt_type[cases[0][index].dtype], shape))
        if axes:
            low, high = (tuple(pick(s[a] for s in sizes) for a in range(len(shape)))
                         for pick in (min, max))
            profile.set_shape(name, low, high, high)
    config.add_optimization_profile(profile)
    layer = network.add_plugin(trtp.op.codetr.ms_deform_attn(*tensors), aot=True)
    layer.get_output(0).name = "out"
    network.mark_output(layer.get_output(0))
    plan = builder.build_serialized_network(network, config)
    assert plan is not None, "TensorRT could not build the network with the AOT plugin"
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
    assert engine is not None
    for case in cases:
        got = _run(trt, engine, dict(zip(INPUTS, case, strict=True)), "out")
        expected = msda_float64(*case)
        assert got.dtype == dtype and got.shape == expected.shape
        error = (got.double() - expected).abs().max().item()
        assert error <= TOLERANCE[dtype], f"max abs error {error:.3g}"


@pytest.mark.gpu
def test_torch_tensorrt_converts_the_op_to_the_plugin_without_fallback():
    pytest.importorskip("tensorrt", reason=NO_TENSORRT)
    torch_tensorrt = pytest.importorskip("torch_tensorrt", reason="torch_tensorrt not installed")
    from codetr_stream.plugin.tensorrt_plugin import register

    register()
    model = _Block(2, 8).cuda().eval()
    inputs = block_inputs("cuda")
    with torch.no_grad():
        exported = torch.export.export(model, inputs)
        compiled = torch_tensorrt.dynamo.compile(exported, arg_inputs=list(inputs),
                                                 min_block_size=1, require_full_compilation=True)
        # A fallback would sit in a PyTorch submodule (`_run_on_gpu_*`): search every graph.
        leftover = [node.name for module in compiled.modules()
                    if isinstance(module, torch.fx.GraphModule) for node in module.graph.nodes
                    if node.target == torch.ops.codetr.ms_deform_attn.default]
        assert not leftover, f"the op ran in PyTorch, not in the TensorRT plugin: {leftover}"
        torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)
