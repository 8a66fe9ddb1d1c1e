"""An AOTInductor package of a small model containing the MSDA op compiles, loads and runs."""

from __future__ import annotations

import pytest
import torch
from test_msda_reference import _Block, block_inputs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        torch.__version__ < "2.13",
        reason="aoti_load_package segfaults on torch 2.11 for every package, even one Linear "
        "(seen on the GPU machine's torch 2.11.0+cu130; README, The MSDA kernel); loads from "
        "torch 2.13",
    ),
]


def test_aoti_package_of_a_model_with_the_op_matches_eager(tmp_path):
    model = _Block(2, 8).eval()
    inputs = block_inputs()
    with torch.no_grad():
        eager = model(*inputs)
        exported = torch.export.export(model, inputs)
        package = torch._inductor.aoti_compile_and_package(
            exported, package_path=str(tmp_path / "msda_block.pt2")
        )
        runner = torch._inductor.aoti_load_package(package)
        fresh = block_inputs()
        fresh = (torch.randn_like(fresh[0]), *fresh[1:])
        torch.testing.assert_close(runner(*inputs), eager, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(runner(*fresh), model(*fresh), rtol=1e-5, atol=1e-6)
