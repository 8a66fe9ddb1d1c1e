"""`codetr-stream compile/export`: user mistakes are one line on stderr and exit code 2 (what
the machine or network refuses: 1); a good eager build prints a summary and leaves a loadable
engine; a failed or interrupted one leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import default_sigint, interrupt

TINY = ["--config", "tests/data/tiny_config.json"]
ROOT = Path(__file__).resolve().parents[1]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the message without a GPU")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI's output as written: decoded here, since text mode would turn a progress bar's
    carriage returns into newlines."""
    out = subprocess.run([sys.executable, "-m", "codetr_stream.daemon.cli", *args], cwd=ROOT,
                         capture_output=True, timeout=600)
    return subprocess.CompletedProcess(out.args, out.returncode, out.stdout.decode(),
                                       out.stderr.decode())


def on_screen(text: str) -> list[str]:
    """The non-blank lines a terminal shows for `text`: a progress bar redrawn with carriage
    returns, then erased, leaves nothing."""
    return [line.split("\r")[-1] for line in text.split("\n") if line.split("\r")[-1].strip()]


def _one_line_error(out: subprocess.CompletedProcess[str], text: str, code: int = 2) -> None:
    assert out.returncode == code, out.stderr[-2000:]
    lines = on_screen(out.stderr)
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
                 "--device cuda: no CUDA GPU is visible; build on the GPU machine, or leave "
                 "--device out to build the CPU engine here", marks=NO_GPU),
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


@pytest.mark.parametrize("case", ["directory", "under-a-file"])
def test_export_out_must_be_a_writable_file_path(tmp_path: Path, case: str) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x\n")
    out, text = {"directory": (tmp_path, f"--out {tmp_path}: is a directory; pass the .pt2"),
                 "under-a-file": (a_file / "m.pt2", f"--out {a_file / 'm.pt2'}: cannot create "
                                  f"{a_file}")}[case]
    _one_line_error(cli("export", *TINY, "--random-weights", "--size", "160x128", "--device",
                        "cpu", "--out", str(out)), text)


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
@NO_GPU
def test_cpu_defaults_build_the_cpu_engine_and_record_random_weights(tmp_path: Path) -> None:
    """No --backend/--precision on a CPU machine: eager FP32 (the GPU's Inductor FP16 default
    cannot build here), said in one line."""
    out = cli("compile", *TINY, "--random-weights", "--seed", "3", "--size", "160x128",
              "--batch", "1", "--out", str(tmp_path / "e"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "codetr-stream compile: building eager fp32 on cpu (the defaults on a CPU; --backend " \
           "and --precision choose)" in out.stderr
    assert "(RANDOM WEIGHTS)" in out.stdout
    import json

    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert (manifest["backend"], manifest["precision"]) == ("eager", "fp32")
    assert manifest["random_weights"] is True and manifest["seed"] == 3
    assert manifest["checkpoint"] is None


@pytest.mark.slow
def test_failed_build_leaves_no_out_directory_and_no_progress_bar(tmp_path: Path) -> None:
    bad = tmp_path / "model.pth"
    bad.write_text("not a checkpoint\n")
    out = cli("compile", *TINY, "--weights", str(bad), "--size", "160x128", "--device", "cpu",
              "--backend", "eager", "--precision", "fp32", "--out", str(tmp_path / "new" / "e"))
    _one_line_error(out, f"{bad}", code=1)
    assert not (tmp_path / "new" / "e").exists()


@pytest.mark.slow
def test_ctrl_c_during_the_inductor_build_exits_at_once_and_removes_out(tmp_path: Path) -> None:
    """SIGINT to the process group (what Ctrl-C sends) while Inductor compiles: exit 130 within
    seconds, not after the interpreter's teardown of the compiled graphs (7-8 s seen)."""
    out_dir = tmp_path / "e"
    proc = subprocess.Popen(
        [sys.executable, "-m", "codetr_stream.daemon.cli", "compile", *TINY, "--random-weights",
         "--backend", "inductor", "--precision", "fp32", "--size", "160x128", "--batch", "1",
         "--device", "cpu", "--out", str(out_dir)],
        cwd=ROOT, stderr=subprocess.PIPE, start_new_session=True, preexec_fn=default_sigint,
        env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")})
    seen = threading.Event()
    lines: list[str] = []

    def watch() -> None:
        for raw in proc.stderr:
            line = raw.decode()
            lines.append(line)
            if "engine pass" in line:  # the graph passes run just before Inductor compiles
                seen.set()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    seen.wait(300)
    time.sleep(3)  # inside Inductor's lowering and code generation
    code, took = interrupt(proc, group=True)
    thread.join(timeout=5)
    assert seen.is_set(), "".join(lines)[-2000:]
    assert code == 130, "".join(lines)[-2000:]
    assert took < 3.0, f"exited {took:.1f} s after SIGINT"
    assert not out_dir.exists()
    assert on_screen("".join(lines))[-1] == "codetr-stream compile: interrupted"
    # Inductor's compile workers ignore SIGINT; they leave once they see their parent gone.
    deadline = time.monotonic() + 30
    while workers_of(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not workers_of(proc.pid)


def workers_of(pid: int) -> list[int]:
    """Inductor compile-worker processes started by `pid` (they carry --parent=PID)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):  # gone meanwhile
            if f"--parent={pid}".encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def test_fetch_weights_offline_is_one_line(tmp_path: Path) -> None:
    from codetr_stream.daemon.demo.rtsp_server import free_port

    url = f"http://127.0.0.1:{free_port()}/model-00000000.pth"  # nothing listens there
    out = cli("fetch-weights", "--url", url, "--cache-dir", str(tmp_path), "--no-progress")
    _one_line_error(out, f"cannot reach {url}", code=1)
