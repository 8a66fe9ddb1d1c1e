"""The Triton kernels run on the CPU through Triton's interpreter, against the float64 formula.

Every launch shape of the op's kernel (1, 2 and 4 lanes a query row, the packed-float16 bilinear
variant) and the benchmark's baselines (v3, per-output).

The interpreter must be switched on (TRITON_INTERPRET=1) before triton is first imported, so
the kernels run in a child process (`_interpret_all`) and the tests check what it reports.
"""

from __future__ import annotations

import pytest
from interpret import run_interpreted

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[kernel]')")
pytestmark = pytest.mark.slow

CASES = {
    # name: (batch, queries, heads, dim, level shapes (h, w), points, dtype)
    "1x1-map": (1, 1, 1, 16, [(1, 1)], 1, "float32"),
    "3-levels-dim24": (2, 21, 3, 24, [(5, 7), (3, 4), (1, 2)], 2, "float32"),
    "5-levels-dim32": (1, 35, 2, 32, [(8, 6), (4, 3), (2, 2), (1, 1), (3, 9)], 4, "float32"),
    "thin-maps-dim48": (2, 6, 1, 48, [(2, 11), (9, 1)], 3, "float32"),
    "half-dim24": (2, 19, 2, 24, [(6, 5), (3, 3)], 4, "float16"),
    "half-dim40": (2, 13, 3, 40, [(7, 4), (3, 3)], 3, "float16"),
    # The FP16 engine's call: float16 values, float32 locations and weights.
    "half-values-float-locations": (2, 17, 2, 32, [(9, 5), (3, 3)], 4, "mixed"),
}
# name: (plugin.kernel LaunchConfig arguments, or a bench/msda_baselines.py design)
VARIANTS = {
    "lanes1": (128, 1, 4),
    "lanes2": (64, 2, 4),
    "lanes4": (64, 4, 8),  # the op's default
    "half_bilinear": (64, 2, 4, True),  # float16 values only
    "head_major": (64, 4, 8),  # lanes4 given a view of a head-major copy of the value
    "v3": "v3",
    "per_output": "per_output",
}


def _variants(dtype: str) -> list[str]:
    return [name for name in VARIANTS if dtype != "float32" or name != "half_bilinear"]


def _interpret_all(part: int) -> dict[str, float]:
    """Child process: every other case from `part` (0 or 1) through every variant -> max abs
    error per (case, variant)."""
    import torch
    from codetr_stream.plugin.kernel import LaunchConfig, head_major_copy, ms_deform_attn_triton
    from msda_baselines import ms_deform_attn_baseline  # bench/msda_baselines.py
    from test_msda_reference import make_inputs, msda_float64

    errors = {}
    for name, (batch, queries, heads, dim, shapes, points, dtype) in list(CASES.items())[part::2]:
        args = make_inputs(batch, queries, heads, dim, shapes, points,
                           dtype=torch.float16 if dtype == "float16" else torch.float32,
                           seed=len(name))
        if dtype == "mixed":
            args = (args[0].half(), *args[1:])
        expected = msda_float64(*args)
        for variant in _variants(dtype):
            option = VARIANTS[variant]
            if isinstance(option, str):
                got = ms_deform_attn_baseline(*args, design=option)
            elif variant == "head_major":
                got = ms_deform_attn_triton(head_major_copy(args[0]), *args[1:],
                                            config=LaunchConfig(*option))
            else:
                got = ms_deform_attn_triton(*args, config=LaunchConfig(*option))
            assert got.dtype == args[0].dtype, got.dtype
            errors[f"{name}/{variant}"] = (got.double() - expected).abs().max().item()
    return errors


@pytest.fixture(scope="module")
def interpreted_errors() -> dict[str, float]:
    return run_interpreted("test_msda_interpret", "_interpret_all", parts=[0, 1])


@pytest.mark.parametrize(
    ("case", "variant"), [(case, v) for case in CASES for v in _variants(CASES[case][-1])]
)
def test_kernel_matches_float64_formula(interpreted_errors, case, variant):
    """FP32 inputs within 1e-5 of float64; FP16 values (FP32 accumulation) within 2e-3."""
    tolerance = 1e-5 if CASES[case][-1] == "float32" else 2e-3
    assert interpreted_errors[f"{case}/{variant}"] <= tolerance
