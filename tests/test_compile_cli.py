"""`codetr-stream compile/export`: user mistakes are one line on stderr and exit code 2;
a good eager build prints a summary and leaves a loadable engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

TINY = ["--config", "tests/data/tiny_config.json"]
ROOT = Path(__file__).resolve().parents[1]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the message without a GPU")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "codetr_stream.daemon.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def _one_line_error(out: subprocess.CompletedProcess[str], text: str) -> None:
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], out.stderr[-2000:]


@pytest.mark.parametrize(("args", "text"), [
    (["--weights", "missing.pth"], "--weights missing.pth: no such file (fetch it with"),
    (["--weights", "tests/data"], "--weights tests/data: is a directory; pass the checkpoint"),
    (["--config", "co_dino_swin_xl", "--random-weights"], "unknown model config 'co_dino_swin_xl'"),
    (["--random-weights", "--size", "1150x768"], "must be multiples of 32"),
    (["--random-weights", "--size", "64x32"], "fewer than the 900 queries"),
    (["--random-weights", "--precision", "fp16", "--device", "cpu"],
     "--precision fp16 needs a CUDA GPU"),
    (["--random-weights", "--backend", "tensorrt", "--precision", "fp32", "--device", "cpu"],
     "--backend tensorrt needs a CUDA GPU and none is visible; build it on a GPU machine with "
     "TensorRT, or use --backend eager --precision fp32 here"),
    pytest.param(["--random-weights", "--precision", "fp32", "--device", "cuda"],
                 "--device cuda: no CUDA GPU is visible; build on the GPU machine, or use "
                 "--device cpu", marks=NO_GPU),
    (["--random-weights", "--precision", "fp32", "--device", "gpu0"],
     "--device gpu0: not a device name; use cpu, cuda or cuda:N"),
], ids=["missing-weights", "weights-is-a-directory", "unknown-config", "size-not-multiple",
        "size-too-small", "fp16-without-gpu", "tensorrt-without-gpu", "cuda-without-gpu",
        "bad-device-name"])
def test_bad_input_is_one_line(tmp_path: Path, args: list[str], text: str) -> None:
    extra = [] if "--precision" in args else ["--precision", "fp32"]
    _one_line_error(cli("compile", "--backend", "eager", *extra, *args, "--out",
                        str(tmp_path / "e")), text)


@pytest.mark.parametrize("case", ["file", "under-a-file", "other-directory"])
def test_out_must_be_a_new_empty_or_engine_directory(tmp_path: Path, case: str) -> None:
    a_file = tmp_path / "engine.txt"
    a_file.write_text("not an engine\n")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"\xff\xd8")
    out, text = {
        "file": (a_file, f"--out {a_file}: is a file; pass a directory"),
        "under-a-file": (a_file / "e", f"--out {a_file / 'e'}: cannot create the directory"),
        "other-directory": (photos, f"--out {photos}: not empty and not an engine directory "
                                    "(no manifest.json); pass a new or empty directory"),
    }[case]
    _one_line_error(cli("compile", *TINY, "--random-weights", "--backend", "eager", "--precision",
                        "fp32", "--size", "160x128", "--device", "cpu", "--out", str(out)), text)
    assert a_file.read_text() == "not an engine\n"
    assert [p.name for p in photos.iterdir()] == ["cat.jpg"]  # nothing written beside it


def test_unknown_engine_pass_names_the_known_ones(tmp_path: Path) -> None:
    out = cli("compile", *TINY, "--random-weights", "--passes", "fold-masks,fast", "--out",
              str(tmp_path / "e"))
    assert out.returncode == 2
    assert "unknown engine pass(es) ['fast']; known: fold-masks, linear-relu" in out.stderr


def test_size_error_names_the_nearest_valid_size(tmp_path: Path) -> None:
    out = cli("compile", *TINY, "--random-weights", "--precision", "fp32", "--size", "390x250",
              "--out", str(tmp_path))
    _one_line_error(out, "nearest: 384x256")


@pytest.mark.slow
def test_eager_compile_prints_a_summary_and_loads(tmp_path: Path) -> None:
    out = cli("compile", *TINY, "--weights", "tests/data/tiny_codino.pth", "--precision", "fp32",
              "--backend", "eager", "--size", "160x128", "--batch", "1,2", "--device", "cpu",
              "--out", str(tmp_path / "e"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "engine " in out.stdout and "weights.pt" in out.stdout
    assert "top10_agreement 1.0" in out.stdout  # the eager engine is the model itself
    from codetr_stream.compile.engines import load_engine

    assert load_engine(tmp_path / "e", "cpu").manifest.batch_sizes == [1, 2]


@pytest.mark.slow
def test_random_weights_are_recorded(tmp_path: Path) -> None:
    out = cli("compile", *TINY, "--random-weights", "--seed", "3", "--precision", "fp32",
              "--backend", "eager", "--size", "160x128", "--batch", "1", "--device", "cpu",
              "--out", str(tmp_path / "e"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(RANDOM WEIGHTS)" in out.stdout
    import json

    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["random_weights"] is True and manifest["seed"] == 3
    assert manifest["checkpoint"] is None


def test_fetch_weights_offline_is_one_line(tmp_path: Path) -> None:
    from rtsp_server import free_port

    url = f"http://127.0.0.1:{free_port()}/model-00000000.pth"  # nothing listens there
    out = cli("fetch-weights", "--url", url, "--cache-dir", str(tmp_path), "--no-progress")
    _one_line_error(out, f"cannot reach {url}")
