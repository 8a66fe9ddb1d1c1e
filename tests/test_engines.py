"""Engine directories: the eager backend equals the model, the manifest refuses foreign builds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from codetr_stream.compile import build_model
from codetr_stream.compile.engines import (
    IncompatibleEngine,
    Manifest,
    ManifestError,
    build_engine,
    load_engine,
)
from codetr_stream.compile.engines.manifest import current_environment
from codetr_stream.compile.export import example_inputs

HW = (128, 160)  # 1,020 tokens >= 100 queries; small for 2 CI cores


@pytest.fixture(scope="module")
def tiny(data_dir: Path, tiny_config) -> tuple[torch.nn.Module, dict]:
    config = tiny_config.to_dict()
    return build_model(config, data_dir / "tiny_codino.pth"), config


@pytest.fixture(scope="module")
def eager_dir(tiny: tuple[torch.nn.Module, dict], tmp_path_factory: pytest.TempPathFactory,
              data_dir: Path) -> Path:
    model, config = tiny
    out = tmp_path_factory.mktemp("eager")
    build_engine(model, out, backend="eager", precision="fp32", input_hw=HW, batch_sizes=[1, 2],
                 config_name="tiny", config=config, device="cpu",
                 checkpoint=str(data_dir / "tiny_codino.pth"))
    return out


def _inputs(batch: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = example_inputs(batch, HW, "cpu", seed=seed)
    masks[0, 100:, :] = True  # real padding in the first image
    masks[0, :, 120:] = True
    return images, masks


def test_eager_engine_equals_the_model(eager_dir: Path,
                                       tiny: tuple[torch.nn.Module, dict]) -> None:
    engine = load_engine(eager_dir, "cpu")
    images, masks = _inputs(2)
    with torch.no_grad():
        want = tiny[0](images, masks)
    for got_t, want_t in zip(engine.infer(images, masks), want, strict=True):
        assert torch.equal(got_t, want_t)
    assert engine.manifest.class_names[0] == "person"
    assert not engine.manifest.random_weights


def test_partial_and_oversized_batches_are_padded_and_split(
        eager_dir: Path, tiny: tuple[torch.nn.Module, dict]) -> None:
    engine = load_engine(eager_dir, "cpu")
    images, masks = _inputs(3)
    boxes, scores, labels = engine.infer(images, masks)  # 2 + 1 (padded to 1)
    assert boxes.shape[0] == scores.shape[0] == labels.shape[0] == 3
    with torch.no_grad():
        alone = tiny[0](images[2:], masks[2:])
    assert torch.equal(scores[2:], alone[1]) and torch.equal(labels[2:], alone[2])


def test_manifest_records_what_the_daemon_needs(eager_dir: Path) -> None:
    raw = json.loads((eager_dir / "manifest.json").read_text())
    assert raw["backend"] == "eager" and raw["precision"] == "fp32"
    assert raw["input_hw"] == list(HW) and raw["batch_sizes"] == [1, 2]
    assert [s["name"] for s in raw["inputs"]] == ["images", "masks"]
    assert raw["outputs"][0] == {"name": "boxes", "shape": ["B", 50, 4], "dtype": "float32"}
    assert len(raw["checkpoint_sha256"] or "x" * 64) == 64
    assert raw["versions"]["torch"] == torch.__version__
    assert Manifest.load(eager_dir).input_hw == HW


def test_infer_rejects_inputs_of_another_size(eager_dir: Path) -> None:
    engine = load_engine(eager_dir, "cpu")
    with pytest.raises(ValueError, match=r"takes images \(N,3,128,160\)"):
        engine.infer(torch.zeros(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool masks"):
        engine.infer(torch.zeros(1, 3, *HW), torch.zeros(1, *HW))


def _manifest(**changes: object) -> Manifest:
    env = current_environment("cpu")
    fields = dict(backend="inductor", precision="fp32", input_hw=(768, 1152), batch_sizes=[1, 8],
                  config_name="co_dino_swin_l", config={}, class_names=[], random_weights=True,
                  seed=0, device_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
                  versions=dict(env["versions"]))
    fields.update(changes)
    return Manifest(**fields)  # type: ignore[arg-type]


def _gpu_env(name: str = "NVIDIA H100 80GB HBM3", capability: str = "9.0") -> dict:
    env = current_environment("cpu")
    return {**env, "device": "cuda", "device_name": name, "compute_capability": capability}


def test_compatibility_rules_per_backend() -> None:
    assert _manifest().mismatches(_gpu_env()) == []
    assert _manifest().mismatches(_gpu_env("NVIDIA H200")) == []  # same sm_90 kernels
    assert "compute capability 9.0" in _manifest().mismatches(_gpu_env("RTX 4090", "8.9"))[0]
    old_torch = _manifest(versions={**_manifest().versions, "torch": "2.11.0+cu130"})
    assert "built with torch 2.11.0+cu130" in old_torch.mismatches(_gpu_env())[0]
    trt = _manifest(backend="tensorrt", versions={"tensorrt": "10.13.0"})
    problems = trt.mismatches(_gpu_env("NVIDIA H200"))
    assert any("TensorRT plan built on NVIDIA H100" in p for p in problems)
    assert any("built with tensorrt 10.13.0" in p for p in problems)
    eager_fp16 = _manifest(backend="eager", precision="fp16")
    assert eager_fp16.mismatches(_gpu_env("anything", "8.0")) == []
    assert "need a CUDA GPU" in eager_fp16.mismatches(current_environment("cpu"))[0]


def test_load_refuses_a_gpu_engine_on_this_machine_with_the_rebuild_command(
        tmp_path: Path) -> None:
    _manifest().save(tmp_path)
    with pytest.raises(IncompatibleEngine) as info:
        load_engine(tmp_path, "cpu")
    message = str(info.value)
    assert "built for cuda (NVIDIA H100 80GB HBM3), running on cpu" in message
    # The rebuild must work here: a GPU's Inductor engine becomes the CPU path's eager one.
    assert (f"codetr-stream compile --config co_dino_swin_l --random-weights --seed 0 "
            f"--precision fp32 --size 1152x768 --batch 1,8 --backend eager --out {tmp_path}"
            in message)


def test_rebuild_command_fits_the_machine_it_is_shown_on(tmp_path: Path) -> None:
    """A GPU's FP16 engine refused on a CPU machine: the command shown must build there."""
    gpu_fp16 = _manifest(precision="fp16", passes=["fold-masks"])
    on_gpu = gpu_fp16.rebuild_command(tmp_path, "cuda")
    assert "--precision fp16" in on_gpu and "--backend inductor --passes fold-masks" in on_gpu
    on_cpu = gpu_fp16.rebuild_command(tmp_path, "cpu")
    assert "--precision fp32" in on_cpu and "--backend eager" in on_cpu
    assert "--passes" not in on_cpu
    assert "--backend eager" in _manifest(backend="tensorrt").rebuild_command(tmp_path, "cpu")
    cpu_inductor = _manifest(compute_capability=None, device_name="cpu")
    assert "--backend inductor" in cpu_inductor.rebuild_command(tmp_path, "cpu")  # as chosen


def test_malformed_manifests_are_named(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no manifest"):
        load_engine(tmp_path, "cpu")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="unreadable manifest"):
        load_engine(tmp_path, "cpu")
    raw = json.loads(json.dumps(_manifest().__dict__, default=list))
    raw["surprise"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=r"unknown fields \['surprise'\]"):
        load_engine(tmp_path, "cpu")
    del raw["surprise"]
    raw["file_bytes"] = ["weights.pt", 12]
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=r"file_bytes is not a mapping of file names to int"):
        load_engine(tmp_path, "cpu")


def test_manifest_errors_say_how_to_build_or_rebuild(tmp_path: Path) -> None:
    def message(engine: Path) -> str:
        with pytest.raises(ManifestError) as info:
            load_engine(engine, "cpu")
        assert "\n" not in str(info.value)
        return str(info.value)

    build = "build one with `codetr-stream compile --weights PATH --out"
    missing = tmp_path / "nowhere"
    assert message(missing) == f"{missing}: no such engine directory; fix the path, or {build} " \
                               f"{missing}`"
    engine = tmp_path / "engine"
    engine.mkdir()
    assert message(engine).endswith(f"(or its build was interrupted); {build} {engine}`")
    (engine / "weights.pt").write_bytes(b"")  # compile refuses a non-empty --out without one
    assert message(engine).endswith(f"interrupted); remove it, then {build} {engine}`")
    (engine / "weights.pt").unlink()
    raw = json.loads(json.dumps(_manifest().__dict__, default=list))
    (engine / "manifest.json").write_text(json.dumps({**raw, "format_version": 2}))
    assert message(engine).endswith(
        "format_version 2 is newer than the 1 this codetr-stream reads; upgrade codetr-stream, "
        "or rebuild the engine: codetr-stream compile --config co_dino_swin_l --random-weights "
        f"--seed 0 --precision fp32 --size 1152x768 --batch 1,8 --backend eager --out {engine}")
    (engine / "manifest.json").write_text(json.dumps({"backend": "inductor"}))
    assert message(engine).endswith(
        "format_version None is older than the 1 this codetr-stream reads; rebuild the engine: "
        f"codetr-stream compile --weights PATH --out {engine}")


def test_files_missing_from_an_engine_are_named_with_the_rebuild_command(
        tmp_path: Path) -> None:
    _manifest(backend="eager", files={"config": "config.json", "weights": "weights.pt"}).save(
        tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ManifestError) as info:
        load_engine(tmp_path, "cpu")
    assert str(info.value) == (
        f"{tmp_path}: weights.pt listed in manifest.json but missing (copied in part?); rebuild "
        f"the engine: codetr-stream compile --config {tmp_path / 'config.json'} --random-weights "
        f"--seed 0 --precision fp32 --size 1152x768 --batch 1,8 --backend eager --out {tmp_path}")


def test_a_file_cut_short_is_named_with_its_sizes(eager_dir: Path, tmp_path: Path) -> None:
    """An engine copied in part (an interrupted scp): the build recorded every file's size."""
    shutil.copytree(eager_dir, tmp_path / "engine")
    weights = tmp_path / "engine" / "weights.pt"
    built = weights.stat().st_size
    assert json.loads((tmp_path / "engine" / "manifest.json").read_text())["file_bytes"][
        "weights.pt"] == built
    with weights.open("r+b") as f:
        f.truncate(built // 2)
    with pytest.raises(ManifestError, match=(
            rf"weights.pt \({built // 2} bytes, built {built}\): not the size the build wrote "
            r"\(copied in part\?\); copy the engine again, or rebuild it: codetr-stream compile")):
        load_engine(tmp_path / "engine", "cpu")


def test_numerics_match_detections_not_positions() -> None:
    from codetr_stream.compile.engines.numerics import compare

    boxes = torch.tensor([[[0.0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 70]]])
    scores = torch.tensor([[0.9, 0.8, 0.7]])
    labels = torch.tensor([[1, 2, 3]])
    swapped = (boxes[:, [1, 0, 2]] + 0.25, scores[:, [1, 0, 2]], labels[:, [1, 0, 2]])
    result = compare((boxes, scores, labels), swapped, top=(2, 3))
    assert result["top2_agreement"] == 1.0 and result["top3_agreement"] == 1.0
    assert result["top3_box_drift_px"] == 0.25 and result["score_max_abs"] == pytest.approx(0.1)
    relabelled = (boxes, scores, torch.tensor([[1, 2, 4]]))
    assert compare((boxes, scores, labels), relabelled, top=(3,))["top3_agreement"] == 0.6667
