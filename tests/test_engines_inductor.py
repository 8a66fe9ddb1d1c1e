"""The Inductor backend: its FP32 engine, as built and as loaded back from its files, equals
eager (CPU); on the GPU its FP16 engine tracks FP32 eager and a fresh process starts from the
engine's saved compiled graphs without compiling. Both with and without the engine graph passes
(compile/engines/passes.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import kernel_source
import pytest
import torch
from codetr_stream.compile import build_model
from codetr_stream.compile.build_commands import DEFAULT_PASSES
from codetr_stream.compile.engines import Manifest, ManifestError, build_engine, load_engine
from codetr_stream.compile.engines.manifest import current_environment
from codetr_stream.compile.engines.precision import PrecisionWrapper
from codetr_stream.compile.export import example_inputs
from engine_helpers import score_drift_in_fresh_process

HW = (128, 160)
PASSES = pytest.mark.parametrize("passes", [[], list(DEFAULT_PASSES)], ids=["baseline", "passes"])
# A fresh process that compiled anything instead of reading the engine's saved graphs would
# still get the right answer, only minutes later; at exit this turns a compile into exit code 3.
NO_RECOMPILE = ("import atexit, os; from torch._dynamo.utils import counters;"
                "atexit.register(lambda c=counters['inductor']: (c['fxgraph_cache_miss'] or"
                " c['fxgraph_cache_bypass']) and (print('recompiled, not from the cache:',"
                " dict(c), file=sys.stderr, flush=True), os._exit(3)));")


def _tiny(data_dir: Path, tiny_config) -> tuple[torch.nn.Module, dict]:
    config = tiny_config.to_dict()
    return build_model(config, data_dir / "tiny_codino.pth"), config


def _inputs(batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = example_inputs(batch, HW, device, seed=5)
    masks[0, 96:, :] = True  # a padded first image: masks reach the compiled graph
    masks[0, :, 130:] = True
    return images, masks


def _assert_parity(got: tuple, want: tuple) -> None:
    """The tiny parity tolerances (docs/model.md §10): scores 1e-4, boxes 1e-2 px, labels."""
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[0], want[0], atol=1e-2, rtol=0)
    assert torch.equal(got[2], want[2])


@pytest.mark.slow
@PASSES
def test_fp32_inductor_engine_equals_eager(data_dir: Path, tmp_path: Path, tiny_config,
                                           passes: list[str]) -> None:
    """One batch size only: every compiled shape costs minutes of C++ builds on 2 CPU cores.
    The engine loaded back from its files (weights and compiled graph) gives the same outputs."""
    model, config = _tiny(data_dir, tiny_config)
    engine, manifest = build_engine(model, tmp_path, backend="inductor", precision="fp32",
                                    input_hw=HW, batch_sizes=[1], config_name="tiny",
                                    config=config, device="cpu", passes=passes)
    assert {"program_b1", "weights_b1", "inductor_b1", "config"} <= manifest.files.keys()
    assert Manifest.load(tmp_path).passes == passes  # what the rebuild command repeats
    assert (f"--passes {','.join(DEFAULT_PASSES)}" in manifest.rebuild_command(tmp_path)
            ) == bool(passes)
    if passes:  # round-norms rounds in FP16 engines only
        assert manifest.measured["pass_sites"] == {
            "fold-masks": 5, "linear-relu": 14, "linear-gelu": 5, "merge-linears": 5,
            "round-norms": 0, "msda-head-major": 4}
    images, masks = _inputs(1, "cpu")
    with torch.no_grad():
        want = model(images, masks)
    built = engine.infer(images, masks)
    _assert_parity(built, want)
    loaded = load_engine(tmp_path, "cpu")
    assert {"weights", "compiled graphs"} <= loaded.start_seconds.keys()
    for got, expected in zip(loaded.infer(images, masks), built, strict=True):
        assert torch.equal(got, expected)
    # The saved graph keeps the code Inductor generated as text: bench/kernel_source.py finds a
    # kernel a profile names, the line that launches it and the buffers it is given.
    code = kernel_source.generated_code(tmp_path, 1)
    names = kernel_source.kernel_names(code)
    assert len(names) > 3
    definition, launches = kernel_source.kernel_source(code, names[-1]).split("# launched as:")
    assert definition.startswith(f"{names[-1]} = async_compile.") and "kernel(" in definition
    assert f"{names[-1]}(buf" in launches and "= empty_strided_cpu(" in launches
    # The same size, other bytes (a disk fault): the file is named, with the rebuild command.
    graph = tmp_path / manifest.files["inductor_b1"]
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=rf"{graph}: unreadable \(.*\); rebuild the engine: "):
        load_engine(tmp_path, "cpu")


def test_an_engine_without_compiled_graphs_is_refused_with_the_rebuild_command(
        tmp_path: Path, tiny_config) -> None:
    """An Inductor engine from before its compiled graphs were saved (a compile cache instead)."""
    env = current_environment("cpu")
    manifest = Manifest(backend="inductor", precision="fp32", input_hw=HW, batch_sizes=[1],
                        config_name="tiny", config=tiny_config.to_dict(), class_names=[],
                        random_weights=True, seed=0, versions=env["versions"])
    manifest.save(tmp_path)
    with pytest.raises(ManifestError, match=r"no compiled graphs .*rebuild it: "
                                            r"codetr-stream compile"):
        load_engine(tmp_path, "cpu")


@pytest.mark.slow
def test_rebuilding_into_an_engine_directory_replaces_its_programs(tiny_config,
                                                                   tmp_path: Path) -> None:
    """The daemon's rebuild command reuses --out: the new weights' program must replace the old
    file (the numerics check sees only the in-memory programs, so it cannot catch a stale one)."""
    config = tiny_config.to_dict()
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = build_model(config)
        build_engine(model, tmp_path, backend="inductor", precision="fp32", input_hw=HW,
                     batch_sizes=[1], config_name="tiny", config=config, device="cpu", seed=seed)
    images, masks = _inputs(1, "cpu")
    program = torch.export.load(str(tmp_path / "program_b1.pt2")).module()
    with torch.no_grad():
        want = model(images, masks)
        _assert_parity(program(images, masks), want)
    _assert_parity(load_engine(tmp_path, "cpu").infer(images, masks), want)


@pytest.mark.gpu
@pytest.mark.parametrize("passes", [[], list(DEFAULT_PASSES), [*DEFAULT_PASSES, "msda-offsets"]],
                         ids=["baseline", "passes", "passes+msda-offsets"])
def test_fp16_engine_tracks_fp32_eager_and_restarts_from_its_compiled_graphs(data_dir: Path,
                                                                   tmp_path: Path, tiny_config,
                                                                   passes: list[str]) -> None:
    model, config = _tiny(data_dir, tiny_config)
    model = model.cuda()
    build_engine(model, tmp_path, backend="inductor", precision="fp16", input_hw=HW,
                 batch_sizes=[1, 2], config_name="tiny", config=config, device="cuda",
                 passes=passes)
    images, masks = _inputs(2, "cuda")
    with torch.no_grad():
        want = model(images, masks)
        half = PrecisionWrapper(copy.deepcopy(model), torch.device("cuda"), "fp16")
        eager_drift = (half(images, masks)[1] - want[1]).abs().max().item()
    # A fresh process with empty compiler caches: load_engine reads the engine's compiled graphs
    # (Triton kernels included) and weights, compiles nothing, runs the CUDA graphs.
    fresh = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "fresh" / "inductor"),
             "TRITON_CACHE_DIR": str(tmp_path / "fresh" / "triton")}
    drift = score_drift_in_fresh_process(tmp_path, images, masks, want, setup=NO_RECOMPILE,
                                         env=fresh)
    # The random tiny model's FP16 noise is its own (0.035 seen on an H200): the engine must be
    # no worse than PyTorch's own FP16 run of the same weights, not meet a fixed number.
    assert drift <= 2 * eager_drift + 5e-3, (drift, eager_drift)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (the x2 machine)")
def test_engine_compiled_on_one_gpu_runs_on_another(data_dir: Path, tmp_path: Path,
                                                    tiny_config) -> None:
    """Inductor's code names the GPU it was compiled for: a daemon worker on cuda:1 loading an
    engine built on cuda:0 compiles it for cuda:1 (and its outputs are cuda:0's)."""
    model, config = _tiny(data_dir, tiny_config)
    engine, _ = build_engine(model.to("cuda:0"), tmp_path, backend="inductor", precision="fp16",
                             input_hw=HW, batch_sizes=[2], config_name="tiny", config=config,
                             device="cuda:0")
    images, masks = _inputs(2, "cuda:0")
    want = engine.infer(images, masks)
    other = load_engine(tmp_path, "cuda:1")
    assert "compile" in other.start_seconds
    got = other.infer(images.to("cuda:1"), masks.to("cuda:1"))
    for g, w in zip(got, want, strict=True):
        assert g.device == torch.device("cuda", 1)
        torch.testing.assert_close(g.cpu(), w.cpu(), atol=1e-3, rtol=0)
