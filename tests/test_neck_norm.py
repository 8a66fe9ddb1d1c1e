"""bench/neck_norm.py's candidate neck (a linear and a GroupNorm over channels-last rows) computes
the neck's 1x1 conv + GroupNorm: the benchmark times the same function two ways."""

from __future__ import annotations

import torch
from codetr_stream.compile.model.neck import ConvGN
from neck_norm import conv_gn, rows


def test_rows_candidate_equals_conv_and_group_norm():
    torch.manual_seed(0)
    levels = [ConvGN(c, 64, 1, 1, 8).eval() for c in (16, 32)]
    for level in levels:
        torch.nn.init.normal_(level.gn.weight, 1.0, 0.3)
        torch.nn.init.normal_(level.gn.bias, 0.0, 0.3)
    # NCHW views of (B, H, W, C) rows, as the backbone hands its maps to the neck.
    maps = [torch.randn(2, h, w, c).permute(0, 3, 1, 2) * 3 + 1
            for (h, w), c in zip(((12, 10), (6, 5)), (16, 32), strict=True)]
    with torch.no_grad():
        want, got = conv_gn(levels, maps), rows(levels, maps)
    assert got.shape == want.shape == (2, 12 * 10 + 6 * 5, 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
