"""The TensorRT backend: build through Torch-TensorRT, run with plain TensorRT. Skipped (with the
reason) where TensorRT cannot be imported, which is every machine this project has so far; the
choice of Torch-TensorRT options runs everywhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from codetr_stream.compile.engines.tensorrt import (
    TensorRTUnavailable,
    _convert_options,
    import_tensorrt,
)
from engine_helpers import score_drift_in_fresh_process

HW = (128, 160)


def _tensorrt_problem() -> str | None:
    try:
        import_tensorrt()
    except TensorRTUnavailable as exc:
        return str(exc)
    return None


needs_tensorrt = pytest.mark.skipif(_tensorrt_problem() is not None,
                                    reason=f"{_tensorrt_problem()}")


def test_cli_says_tensorrt_is_absent_in_one_line(tmp_path: Path) -> None:
    problem = _tensorrt_problem()
    if problem is None:
        pytest.skip("TensorRT is installed here")
    out = subprocess.run([sys.executable, "-m", "codetr_stream.daemon.cli", "compile",
                          "--random-weights", "--backend", "tensorrt", "--precision", "fp32",
                          "--device", "cpu", "--out", str(tmp_path / "e")],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "needs a CUDA GPU" in out.stderr or "TensorRT is not installed" in out.stderr


@pytest.mark.gpu
@needs_tensorrt
def test_tensorrt_engine_matches_eager_without_torch_tensorrt_at_run_time(
        data_dir: Path, tmp_path: Path, tiny_config) -> None:
    pytest.importorskip("torch_tensorrt", reason="torch_tensorrt (needed to build) not installed")
    from codetr_stream.compile import build_model
    from codetr_stream.compile.engines import build_engine
    from codetr_stream.compile.export import example_inputs

    config = tiny_config.to_dict()
    model = build_model(config, data_dir / "tiny_codino.pth", device="cuda")
    build_engine(model, tmp_path, backend="tensorrt", precision="fp32", input_hw=HW,
                 batch_sizes=[1, 2], config_name="tiny", config=config, device="cuda")
    images, masks = example_inputs(2, HW, "cuda", seed=2)
    with torch.no_grad():
        want = model(images, masks)
    # Run in a process where importing torch_tensorrt fails: only tensorrt + torch are used.
    drift = score_drift_in_fresh_process(tmp_path, images, masks, want,
                                         setup="sys.modules['torch_tensorrt'] = None;")
    assert drift < 1e-3


# Parameter lists of `convert_exported_program_to_serialized_trt_engine` in Torch-TensorRT
# releases (pytorch/TensorRT py/torch_tensorrt/dynamo/_compiler.py): older ones with
# enabled_precisions only, then with use_explicit_typing too, main strongly typed with neither.
def _convert_precisions(exported_program, inputs=None, *, arg_inputs=None,
                        enabled_precisions=None, min_block_size=5, device=None,
                        require_full_compilation=False, **kwargs): ...


def _convert_explicit_typing(exported_program, inputs=None, *, arg_inputs=None,
                             enabled_precisions=None, min_block_size=5, device=None,
                             require_full_compilation=False, use_explicit_typing=False,
                             **kwargs): ...


def _convert_main(exported_program, inputs=None, *, arg_inputs=None, device=None,
                  require_full_compilation=False, min_block_size=5, **kwargs): ...


@pytest.mark.parametrize(("convert", "precision", "typing"), [
    (_convert_precisions, "fp16", {"enabled_precisions": {torch.float16, torch.float32}}),
    (_convert_precisions, "fp32", {}),
    (_convert_explicit_typing, "fp16", {"use_explicit_typing": True}),
    (_convert_main, "fp16", {}),
])
def test_convert_options_fit_each_torch_tensorrt_signature(convert, precision, typing) -> None:
    device = torch.device("cuda", 1)
    options = _convert_options(convert, precision, device)
    # The device is explicit: some releases default it to the GPU current at their import.
    assert options == {"require_full_compilation": True, "min_block_size": 1, "device": device,
                       **typing}
