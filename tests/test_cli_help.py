"""`codetr-stream --help`, `--version` and every subcommand's help: defaults shown, the paths
and names a newcomer needs (cache, topics, schema) written out."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from codetr_stream.daemon.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "codetr_stream.daemon.cli"]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every (sub)subcommand's parser by its full name (a nested one as "A B")."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = sub
                found.update({f"{name} {k}": v for k, v in subcommands(sub).items()})
    return found


def test_version_is_the_installed_package() -> None:
    done = cli("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"codetr-stream {metadata.version('codetr-stream')}"


@pytest.mark.parametrize("command", sorted(subcommands(build_parser())))
def test_every_option_with_a_default_shows_it(command: str) -> None:
    parser = subcommands(build_parser())[command]
    help_text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            assert action.help and "default" in parser._get_formatter()._get_help_string(action), \
                f"{command} {action.option_strings[0]}: no default in its help"
    assert "usage: codetr-stream" in help_text


def test_compile_help_shows_the_defaults_of_this_machine_kind() -> None:
    done = cli("compile", "--help")
    text = " ".join(done.stdout.split())
    assert done.returncode == 0
    assert "--batch BATCH e.g. 1,2,4,8 (default: 1,2,4,8)" in text
    assert "default: inductor on a GPU, eager on the CPU" in text
    assert "default: fp16 on a GPU, fp32 on the CPU" in text


def test_fetch_weights_help_names_the_cache_path(tmp_path: Path) -> None:
    done = cli("fetch-weights", "--help", env={"CODETR_STREAM_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0
    assert str(tmp_path / "cache") in " ".join(done.stdout.split())


def test_subscribe_help_names_the_topics_and_the_schema_files() -> None:
    done = cli("subscribe", "--help")
    text = " ".join(done.stdout.split())
    assert "det.<stream>|" in text and "status.<stream>|" in text
    for schema in ("docs/schema/detections.schema.json", "docs/schema/status.schema.json"):
        assert schema in text and (ROOT / schema).is_file()
