"""Shared test settings: GPU tests run only where CUDA is present (the device machine)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from codetr_stream.compile.model_config import CoDinoConfig

DATA = Path(__file__).parent / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run `pytest -m gpu` on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def tiny_config(data_dir: Path) -> CoDinoConfig:
    """tests/data/tiny_config.json, parsed (frozen); `.to_dict()` is the file's dict, a fresh
    one each call (a test may change it)."""
    from codetr_stream.compile.model_config import parse_config

    return parse_config(data_dir / "tiny_config.json")
