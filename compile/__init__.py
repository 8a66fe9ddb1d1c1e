"""Offline side: the Co-DINO model in PyTorch, checkpoint loading, export and engine builds.

`build_model` is resolved lazily so that importing this package (the CLI does) stays torch-free.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_model"]


def __getattr__(name: str) -> Any:
    if name == "build_model":
        from codetr_stream.compile.build import build_model

        return build_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
