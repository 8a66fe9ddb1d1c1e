"""The one `codetr-stream` command: a thin dispatcher over the subcommands of each package.

Each command module exposes `register(subparsers)`, adding its subcommands with a `handler`
default that takes the parsed arguments and returns an exit code. Modules import their heavy
dependencies (torch, av, zmq) inside handlers, so `codetr-stream --help` stays fast.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import logging
import sys
from collections.abc import Sequence

# Offline side first (checkpoint -> engine), then the service side (engine -> detections),
# then accuracy (engine -> COCO AP).
COMMAND_MODULES = (
    "codetr_stream.compile.cli",
    "codetr_stream.daemon.commands",
    "codetr_stream.daemon.scaleout_commands",
    "codetr_stream.daemon.eval_commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codetr-stream",
        description="Co-DETR detection for RTSP camera fleets: compile an engine, run the daemon.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # that side of the project is not installed
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # The interpreter's last collections at exit walk every object torch and PyAV made: 2-6 s of
    # a SIGTERM's 5 s budget on 2 busy cores, 1 s when they are frozen first (atexit handlers run
    # before those collections; by then the daemon has closed its sockets and files).
    atexit.register(gc.freeze)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
