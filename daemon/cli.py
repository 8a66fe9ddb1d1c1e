"""The one `codetr-stream` command: a thin dispatcher over the subcommands of each package.

Each command module exposes `register(subparsers)`, adding its subcommands with a `handler`
default that takes the parsed arguments and returns an exit code: 0 done, 1 a runtime refusal
(the config, the engine or the machine says no), 2 a usage error (argparse's own code), 3 only
from `check-config` (the file is valid but `run` would refuse). Modules import their heavy
dependencies (torch, av, zmq) inside handlers, so `codetr-stream --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import textwrap
from collections.abc import Sequence
from importlib import metadata
from typing import NoReturn

# Offline side first (checkpoint -> engine), then the service side (engine -> detections),
# then accuracy (engine -> COCO AP).
COMMAND_MODULES = (
    "codetr_stream.compile.build_commands",
    "codetr_stream.daemon.service_commands",
    "codetr_stream.daemon.fleet.scaleout_commands",
    "codetr_stream.daemon.accuracy.eval_commands",
)
INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


class _Formatter(argparse.HelpFormatter):
    """Descriptions keep their paragraphs (blank lines), paths and flags are never broken at a
    hyphen; each option's help ends with its default, unless it has none (None, a flag's
    False) or the help already says it."""

    def _wrap(self, text: str, width: int, indent: str = "") -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, initial_indent=indent,
                             subsequent_indent=indent, break_on_hyphens=False,
                             break_long_words=False)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return self._wrap(text, width)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join("\n".join(self._wrap(part, width, indent))
                            for part in text.split("\n\n"))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default == argparse.SUPPRESS
                or "default" in text or not action.option_strings):
            return text
        if isinstance(default, list | tuple):
            default = ",".join(map(str, default))
        return f"{text} (default: {default})"


class _Parser(argparse.ArgumentParser):
    """Every subcommand's --help shows each option's default; a usage error is one line (the
    message and where to look), not argparse's usage block first."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a count of messages, workers, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def version() -> str:
    try:
        return metadata.version("codetr-stream")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="codetr-stream",
        description="Co-DETR detection for RTSP camera fleets: compile an engine, run the daemon.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                       parser_class=_Parser)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # that side of the project is not installed
        module.register(subparsers)
    return parser


def _exit_now(code: int) -> NoReturn:
    """Flush and leave without the interpreter's teardown: after a torch.compile its final
    garbage collection of the FX graphs alone took 7-8 s, so Ctrl-C seemed ignored, and a
    stopped daemon lingered 1-2 s. Every command closes what it opened before it returns."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command line (default: sys.argv) and return its exit code; Ctrl-C is 130."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code = int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print(f"codetr-stream {args.command}: interrupted", file=sys.stderr)
        code = INTERRUPTED
    return code


def console() -> NoReturn:
    """The `codetr-stream` command: `main`, then out without the interpreter's teardown."""
    _exit_now(main())


if __name__ == "__main__":
    console()
