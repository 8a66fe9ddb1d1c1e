"""The TensorRT plugin: the AOT kernel build (needs triton only) and an engine (needs TensorRT).

TensorRT could not be installed on any machine of this project, so the engine test has never
run here; it skips with that reason wherever `tensorrt` / `torch_tensorrt` do not import.
"""

from __future__ import annotations

import re

import pytest
import torch
from test_msda_reference import _Block, block_inputs

DTYPES = {"value": "fp16", "spatial_shapes": "i64", "level_start_index": "i64",
          "sampling_locations": "fp16", "attention_weights": "fp16"}


def test_aot_kernel_compiles_to_ptx_for_hopper_with_the_tensorrt_calling_convention():
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[kernel]')")
    from codetr_stream.plugin.tensorrt import compile_kernel

    compiled = compile_kernel(DTYPES, dim=32, levels=5, points=4, capability=90)
    ptx = compiled.asm["ptx"]
    entry = re.search(r"\.entry (\w+)\((.*?)\)", ptx, re.S)
    assert entry and entry.group(1) == compiled.metadata.name
    params = re.findall(r"\.param \.(\w+)", entry.group(2))
    # 5 input pointers, 3 int32 scalars, the output pointer (+ Triton's null scratch pointers)
    assert params[:9] == ["u64"] * 5 + ["u32"] * 3 + ["u64"], params
    assert ".target sm_90" in ptx
    assert "ld.global.v4" in ptx, "corner gathers should be 16-byte vector loads"
    assert compiled.metadata.num_warps * 32 > 0


@pytest.mark.gpu
def test_tensorrt_engine_runs_the_plugin_without_fallback():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (cannot be, on this "
                        "project's machines)")
    torch_tensorrt = pytest.importorskip("torch_tensorrt", reason="torch_tensorrt not installed")
    from codetr_stream.plugin.tensorrt import register

    register()
    model = _Block(2, 8).cuda().eval()
    inputs = block_inputs("cuda")
    with torch.no_grad():
        exported = torch.export.export(model, inputs)
        engine = torch_tensorrt.dynamo.compile(exported, inputs=list(inputs), min_block_size=1)
        leftover = [n for n in engine.graph.nodes
                    if n.target == torch.ops.codetr.ms_deform_attn.default]
        assert not leftover, "the op fell back to PyTorch instead of the TensorRT plugin"
        torch.testing.assert_close(engine(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)
