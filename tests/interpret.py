"""Run a test module's function in a child process under Triton's interpreter (on CPU tensors).

TRITON_INTERPRET=1 must be set before triton is first imported, so the kernels cannot run in the
pytest process; the child prints the function's result as JSON on its last line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TESTS = Path(__file__).parent
BENCH = TESTS.parent / "bench"  # the benchmark's baseline kernels are tested too


def run_interpreted(module: str, function: str, parts: Sequence[object] = (),
                    timeout: float = 600) -> Any:
    """`module.function()` (a module in tests/) under the interpreter -> its JSON result.

    With `parts`, `module.function(part)` runs for every part, in children of their own at the
    same time (the interpreter is CPU-bound and single-threaded: a 2-core machine halves a
    sweep), and their results, dicts, are merged.
    """
    path = os.pathsep.join(filter(None, [str(TESTS), str(BENCH), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    calls = [f"m.{function}({part!r})" for part in parts] or [f"m.{function}()"]
    children = [subprocess.Popen(
        [sys.executable, "-c", f"import json, {module} as m; print(json.dumps({call}))"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=TESTS)
        for call in calls]
    results = []
    try:
        for child in children:
            stdout, stderr = child.communicate(timeout=timeout)
            assert child.returncode == 0, stderr[-4000:]
            results.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for child in children:
            child.kill()
            child.wait()
    if not parts:
        return results[0]
    return {key: value for result in results for key, value in result.items()}
