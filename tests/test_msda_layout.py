"""The op's kernel compiles (for sm_90, here on the CPU) to the lane layout its speed rests on.

plugin/kernel.py shapes its tile so that Triton's coalescing gives the op's launch shape
(`launch_config`: 4 lanes a query row, measured fastest on an H200) 16-byte loads, with the rest
of the row in registers. A Triton upgrade that changes that choice would silently bring back a
different lane count (the 1- and 2-lane shapes ran 1.7-2.8x slower, bench/RESULTS.md) or
shared-memory layout conversions; these tests catch it without a GPU.
"""

from __future__ import annotations

import re

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[kernel]')")


@pytest.mark.parametrize(("value", "elements_per_load"), [("fp16", 8), ("bf16", 8), ("fp32", 4)])
def test_default_launch_gives_four_lanes_a_row_and_16_byte_loads(value, elements_per_load):
    from codetr_stream.plugin.tensorrt_plugin import compile_kernel

    locations = "fp32" if value == "fp32" else "fp16"
    dtypes = {"value": value, "spatial_shapes": "i64", "level_start_index": "i64",
              "sampling_locations": locations, "attention_weights": locations}
    compiled = compile_kernel(dtypes, dim=32, levels=5, points=4, capability=90)
    gather_layouts = re.findall(r"#ttg\.blocked<\{sizePerThread = \[1, 1, (\d+)\], "
                                r"threadsPerWarp = \[(\d+), 1, (\d+)\]", compiled.asm["ttgir"])
    assert gather_layouts == [(str(elements_per_load), "8", "4")]
    ptx = compiled.asm["ptx"]
    assert "ld.global.v4" in ptx, "corner rows should be read with 16-byte loads"
    assert compiled.metadata.shared == 0 and "bar.sync" not in ptx, "no shared-memory shuffles"
