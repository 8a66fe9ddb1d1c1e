"""The FP16 Inductor engine runs an FP32-exported program under autocast: the dtype checks that
torch.export records for casts must go, or the first reduced-precision call fails."""

from __future__ import annotations

import pytest
import torch
from codetr_stream.compile import build_model
from codetr_stream.compile.engines.precision import drop_dtype_asserts
from codetr_stream.compile.export import example_inputs

CHECK = torch.ops.aten._assert_tensor_metadata.default


@pytest.mark.slow
def test_fp32_program_runs_under_autocast_once_dtype_checks_are_dropped(data_dir,
                                                                      tiny_config) -> None:
    model = build_model(tiny_config, data_dir / "tiny_codino.pth")
    # Seeded: torch seeds its global generator differently in every process, and this random
    # model's bfloat16 drift ranges over 0.017-0.045 across inputs (0.029 for seed 0).
    images, masks = example_inputs(1, (128, 160), "cpu", seed=0)
    module = torch.export.export(model, (images, masks), strict=False).module()
    # CPU autocast (bfloat16) stands in for the GPU's FP16 autocast: same mechanism.
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="dtype"):
        module(images, masks)

    drop_dtype_asserts(module)
    assert not any(node.target is CHECK for node in module.graph.nodes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        boxes, scores, labels = module(images, masks)
    assert scores.dtype == torch.float32  # the model's FP32 top-k survives autocast
    assert boxes.shape == (1, 50, 4) and labels.shape == (1, 50)
    assert torch.isfinite(boxes).all() and torch.isfinite(scores).all()
    expected = model(images, masks)[1]
    assert (scores - expected).abs().max() < 0.05  # bfloat16 noise, not a broken graph
