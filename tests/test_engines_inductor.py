"""The Inductor backend: its FP32 engine equals eager (CPU here, GPU on the device machine),
and a fresh process starts from the engine's saved compile cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from codetr_stream.compile import build_model
from codetr_stream.compile.engines import build_engine, load_engine
from codetr_stream.compile.export import example_inputs

HW = (128, 160)


def _tiny(data_dir: Path) -> tuple[torch.nn.Module, dict]:
    config = json.loads((data_dir / "tiny_config.json").read_text())
    return build_model(config, data_dir / "tiny_codino.pth"), config


def _inputs(batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = example_inputs(batch, HW, device, seed=5)
    masks[0, 96:, :] = True  # a padded first image: masks reach the compiled graph
    masks[0, :, 130:] = True
    return images, masks


def _assert_parity(got: tuple, want: tuple) -> None:
    """The tiny parity tolerances (tests/data/README.md): scores 1e-4, boxes 1e-2 px, labels."""
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[0], want[0], atol=1e-2, rtol=0)
    assert torch.equal(got[2], want[2])


@pytest.mark.slow
def test_fp32_inductor_engine_equals_eager_and_restarts_from_its_cache(
        data_dir: Path, tmp_path: Path) -> None:
    model, config = _tiny(data_dir)
    engine, manifest = build_engine(model, tmp_path, backend="inductor", precision="fp32",
                                    input_hw=HW, batch_sizes=[1], config_name="tiny",
                                    config=config, device="cpu")
    assert {"program_b1", "inductor_cache", "config"} <= manifest.files.keys()
    images, masks = _inputs(1, "cpu")
    with torch.no_grad():
        want = model(images, masks)
    _assert_parity(engine.infer(images, masks), want)
    torch.save((images, masks, want), tmp_path / "case.pt")
    # A new process with empty compiler caches: load_engine must restore the saved cache
    # (no codegen) and give the same detections.
    code = ("import sys, torch; from codetr_stream.compile.engines import load_engine;"
            "images, masks, want = torch.load(sys.argv[2], weights_only=True);"
            "got = load_engine(sys.argv[1], 'cpu').infer(images, masks);"
            "print(max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, want)))")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "fresh_cache"))
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(tmp_path / "case.pt")],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-2


@pytest.mark.gpu
def test_fp16_inductor_engine_tracks_fp32_eager_on_the_gpu(data_dir: Path,
                                                           tmp_path: Path) -> None:
    model, config = _tiny(data_dir)
    build_engine(model, tmp_path, backend="inductor", precision="fp16", input_hw=HW,
                 batch_sizes=[1, 2], config_name="tiny", config=config, device="cuda")
    images, masks = _inputs(2, "cuda")
    with torch.no_grad():
        want = model.cuda()(images, masks)
    boxes, scores, labels = load_engine(tmp_path, "cuda").infer(images, masks)
    assert boxes.dtype == scores.dtype == torch.float32 and labels.dtype == torch.int64
    assert float((scores - want[1]).abs().max()) < 2e-2
