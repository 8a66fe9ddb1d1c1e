"""Shared by the GPU engine tests: run an engine in a fresh process against saved expectations."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

_SCORE_DRIFT = (
    "import sys, torch; {setup}"
    "from codetr_stream.compile.engines import load_engine;"
    "i, m, want = torch.load(sys.argv[2], weights_only=True);"
    "b, s, l = load_engine(sys.argv[1], 'cuda').infer(i.cuda(), m.cuda());"
    "assert b.dtype == s.dtype == torch.float32 and l.dtype == torch.int64;"
    "print(float((s.cpu() - want[1]).abs().max()))"
)


def score_drift_in_fresh_process(engine_dir: Path, images: torch.Tensor, masks: torch.Tensor,
                                 want: tuple[torch.Tensor, ...], *, setup: str = "",
                                 env: dict[str, str] | None = None) -> float:
    """Max |score - want| of the engine loaded by a new Python process (`setup` runs first)."""
    case = engine_dir / "case.pt"
    torch.save((images.cpu(), masks.cpu(), [t.cpu() for t in want]), case)
    out = subprocess.run([sys.executable, "-c", _SCORE_DRIFT.format(setup=setup),
                          str(engine_dir), str(case)], env={**os.environ, **(env or {})},
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.strip().splitlines()[-1])
