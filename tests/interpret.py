"""Run a test module's function in a child process under Triton's interpreter (on CPU tensors).

TRITON_INTERPRET=1 must be set before triton is first imported, so the kernels cannot run in the
pytest process; the child prints the function's result as JSON on its last line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

TESTS = Path(__file__).parent
BENCH = TESTS.parent / "bench"  # the benchmark's baseline kernels are tested too


def run_interpreted(module: str, function: str, timeout: float = 600) -> Any:
    """`module.function()` (a module in tests/) under the interpreter -> its JSON result."""
    path = os.pathsep.join(filter(None, [str(TESTS), str(BENCH), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    code = f"import json, {module} as m; print(json.dumps(m.{function}()))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=timeout, cwd=TESTS)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
