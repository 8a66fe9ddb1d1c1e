"""`codetr-stream eval` as a user runs it: the tiny real model through the daemon's pre- and
postprocessing on a set of drawn shapes, side by side with its FP32 eager model; bad input is
one line; the GPU machine's script runs its whole flow on the CPU."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from coco_shapes import make_set
from codetr_stream.compile.coco_classes import COCO_CLASSES
from daemon_helpers import DATA, build_tiny_engine

ROOT = Path(__file__).resolve().parents[1]
EAGER = ["--eager", str(DATA / "tiny_config.json"), "--weights", str(DATA / "tiny_codino.pth")]


def cli(*args: str | Path, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "codetr_stream.daemon.cli", "eval",
                           *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_engine(tmp_path_factory.mktemp("eval") / "engine", (1, 2, 4))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_set(tmp_path_factory.mktemp("shapes"), COCO_CLASSES, images=5)


def _finite(metrics: dict[str, float | None]) -> bool:
    return all(v is None or (math.isfinite(v) and 0.0 <= v <= 1.0) for v in metrics.values())


@pytest.mark.slow
def test_tiny_engine_and_its_eager_model_side_by_side(engine: Path, shapes: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    """Same weights, same FP32, same batches: the same AP; each agrees fully with the other."""
    images, annotations = shapes
    report = tmp_path / "report.json"
    out = cli("--engine", engine, *EAGER, "--images", images, "--annotations", annotations,
              "--reference", "--reference-score", "0.2", "--limit", "4", "--device", "cpu",
              "--out", report)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(report.read_text())
    eager, compiled = result["rows"]
    assert result["images"] == 4 and eager["name"] == "eager fp32 (tiny_codino.pth)"
    assert compiled["engine"] == str(engine) and compiled["batch_size"] == 4
    for row in (eager, compiled):
        assert _finite(row["ap"]) and row["ap"]["AP"] is not None
        assert row["agreement"]["AP"] == 1.0
        assert row["images_per_s"] > 0
    assert eager["ap"] == compiled["ap"]
    lines = out.stdout.splitlines()
    assert f"COCO box AP (%) on 4 images of {annotations}:" in lines
    assert any(line.startswith(f"| {engine} | eager | fp32 | 4 | ") for line in lines)
    assert "| engine | backend | precision | batch | images/s | AP | AP50 | AP75 | APs | APm | " \
           "APl |" in lines


def _annotations(path: Path, shapes: tuple[Path, Path], change) -> Path:
    data = json.loads(shapes[1].read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def _another_gpu(engine: Path, out: Path) -> Path:
    shutil.copytree(engine, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(backend="inductor", device_name="NVIDIA H200", compute_capability="9.0")
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _unicorn(data: dict) -> None:
    data["categories"].append({"id": 200, "name": "unicorn"})
    data["annotations"][0]["category_id"] = 200


# case: (the flags it changes given tmp_path, the set and the engine; None drops one, True is a
# bare flag), exit code, what the one line says
BAD = {
    "annotations-missing": (lambda t, s, e: {"--annotations": t / "none.json"}, 2,
                            "none.json: no such annotation file; pass a COCO instances JSON"),
    "annotations-not-json": (lambda t, s, e: {"--annotations": _write(t / "a.json", "{images")},
                             2, "a.json: not valid JSON (Expecting property name"),
    "annotation-without-bbox": (
        lambda t, s, e: {"--annotations": _annotations(
            t / "a.json", s, lambda d: d["annotations"][1].pop("bbox"))}, 2,
        "a.json: annotations[1].bbox must be [x, y, width, height] with width, height >= 0, "
        "got None; fix that record"),
    "image-missing": (
        lambda t, s, e: {"--annotations": _annotations(
            t / "a.json", s, lambda d: d["images"][2].update(file_name="gone.jpg"))}, 2,
        "gone.jpg: no such image (listed in"),
    "image-unreadable": (lambda t, s, e: {"--images": _broken_copy(s[0], t / "images")}, 2,
                         "0001.jpg: unreadable image (cannot identify image file"),
    "image-size-differs": (
        lambda t, s, e: {"--annotations": _annotations(
            t / "a.json", s, lambda d: d["images"][0].update(width=640))}, 2,
        "0000.jpg: is 320x240 but"),
    "category-not-a-model-class": (
        lambda t, s, e: {"--annotations": _annotations(t / "a.json", s, _unicorn)}, 2,
        "categories 'unicorn' are not classes of engine"),
    "engine-for-another-gpu": (
        lambda t, s, e: {"--engine": _another_gpu(e, t / "h200")}, 1,
        "(inductor, fp32) cannot run here: built for cuda (NVIDIA H200), running on cpu"),
    "not-an-engine": (lambda t, s, e: {"--engine": t}, 1, "no manifest, so"),
    "no-ground-truth": (lambda t, s, e: {"--annotations": None}, 2,
                        "no ground truth; pass --annotations instances.json, or --reference"),
    "reference-of-one": (lambda t, s, e: {"--reference": True}, 2,
                         "--reference compares engines: pass at least two"),
    "eager-without-weights": (lambda t, s, e: {"--eager": "co_dino_swin_l"}, 2,
                              "--eager CONFIG and --weights PTH go together"),
    "eager-unknown-config": (
        lambda t, s, e: {"--eager": "co_dino_swin_xl", "--weights": DATA / "tiny_codino.pth"}, 2,
        "unknown model config 'co_dino_swin_xl'"),
    "images-missing": (lambda t, s, e: {"--images": t / "nowhere"}, 2,
                       "nowhere: no such directory; pass the directory that holds the images"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _broken_copy(images: Path, out: Path) -> Path:
    shutil.copytree(images, out)
    (out / "0001.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return out


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line(case: str, engine: Path, shapes: tuple[Path, Path],
                               tmp_path: Path) -> None:
    change, code, text = BAD[case]
    args = {"--engine": engine, "--images": shapes[0], "--annotations": shapes[1],
            "--device": "cpu", "--no-progress": True, **change(tmp_path, shapes, engine)}
    argv = [str(v) for flag, value in args.items() if value is not None
            for v in ((flag,) if value is True else (flag, value))]
    out = cli(*argv)
    assert out.returncode == code, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("codetr-stream eval: error: "), out.stderr
    assert text in lines[0], lines[0]


def test_without_pycocotools_it_says_how_to_install_it(shapes: tuple[Path, Path],
                                                        tmp_path: Path) -> None:
    hidden = tmp_path / "pycocotools"
    hidden.mkdir()
    (hidden / "__init__.py").write_text("raise ImportError('not installed, for the test')\n")
    out = cli("--engine", tmp_path, "--images", shapes[0], "--annotations", shapes[1],
              env={"PYTHONPATH": str(tmp_path)})
    assert (out.returncode, out.stderr) == (1, "codetr-stream eval: error: pycocotools is not "
                                               "installed; pip install 'codetr-stream[eval]'\n")


@pytest.mark.slow
def test_gpu_script_runs_its_flow_on_the_cpu(engine: Path, tmp_path: Path) -> None:
    """bench/eval_gpu.sh with the tiny engine: set, eager row and engine row, files in $OUT."""
    shellcheck = Path(sys.executable).parent / "shellcheck"
    subprocess.run([str(shellcheck), "-x", "bench/eval_gpu.sh"], cwd=ROOT, check=True)
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable,
           "OUT": str(tmp_path / "out"), "EVAL_IMAGES": "2", "EVAL_SIZES": "320x240,240x320",
           "EVAL_DEVICE": "cpu", "WHEELS": str(tmp_path / "none"), "HOME": str(tmp_path)}
    out = subprocess.run(["bash", "bench/eval_gpu.sh", str(engine)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert [row["name"] for row in result["rows"]] == ["eager fp32 (weights.pt)", str(engine)]
    assert result["images"] == 2 and result["reference"] == "eager fp32 (weights.pt)"
    assert all(_finite(row["ap"]) and _finite(row["agreement"]) for row in result["rows"])
    assert (tmp_path / "out" / "eval.md").read_text() in out.stdout
