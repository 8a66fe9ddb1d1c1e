"""The distribution installs under one namespace and every package folder is declared."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_declared_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(config["packages"])
    found = set()
    for top in ("compile", "plugin", "daemon"):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT).parts
            found.add(".".join(("codetr_stream", *rel)))
    assert found == declared, f"pyproject packages differ from folders: {found ^ declared}"


def test_cli_lists_its_subcommands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "codetr_stream.daemon.cli", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "codetr-stream" in out
