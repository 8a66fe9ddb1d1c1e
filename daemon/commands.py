"""The service-side subcommands: `run`, `check-config`, `reload` and `subscribe`.

`run` validates the config exactly like `check-config` and refuses to start on any problem, so a
bad edit never takes the cameras down. `reload` asks a running daemon to re-read its config with
SIGHUP, after checking the new file first (the daemon would reject it anyway and keep running
the old one, but the operator sees why right here):

- under systemd: `codetr-stream reload --systemd` (= `systemctl reload codetr-stream`, whose
  ExecReload sends SIGHUP to the main pid);
- elsewhere: set `pid_file:` in streams.yaml; `run` writes its pid there and removes it on exit,
  and `reload --config streams.yaml` signals that pid.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_UNIT = "codetr-stream"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run the detection daemon",
                              description="Read cameras, detect, publish on ZeroMQ.")
    p.add_argument("--config", type=Path, default=Path("streams.yaml"), help="streams.yaml")
    p.add_argument("--shard-index", type=int, default=None,
                   help="this worker's index of $CODETR_SHARD_REPLICAS (default: "
                   "$CODETR_SHARD_INDEX, else a StatefulSet pod ordinal in $HOSTNAME)")
    p.set_defaults(handler=run_command)

    p = subparsers.add_parser("check-config", help="validate a streams.yaml",
                              description="Print every problem as file:line: field: message "
                              "(hint); exit 1 if there is any, else print a summary.")
    p.add_argument("file", type=Path)
    p.set_defaults(handler=check_config_command)

    p = subparsers.add_parser("reload", help="make the running daemon re-read its config",
                              description="Validate the config, then send SIGHUP to the daemon.")
    p.add_argument("--config", type=Path, default=Path("streams.yaml"),
                   help="the daemon's streams.yaml (checked first; its pid_file is signalled)")
    p.add_argument("--systemd", nargs="?", const=DEFAULT_UNIT, metavar="UNIT",
                   help=f"use `systemctl reload UNIT` (default unit: {DEFAULT_UNIT})")
    p.set_defaults(handler=reload_command)

    p = subparsers.add_parser("subscribe", help="print published messages as JSON lines",
                              description="Connect to a daemon's ZeroMQ publisher and print one "
                              "JSON object per message.")
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help=f"default {DEFAULT_ENDPOINT}")
    p.add_argument("--stream", action="append", metavar="NAME",
                   help="only this stream (repeatable); default all")
    p.add_argument("--status", action="store_true",
                   help="print the per-stream heartbeats instead of detections")
    p.add_argument("--count", type=int, metavar="N", help="exit 0 after N messages")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="exit 1 when nothing arrives for S seconds")
    p.set_defaults(handler=subscribe_command)


def _engine_manifest(engine_dir: Path) -> tuple[Any, str | None]:
    """(the engine's manifest, None) if it is built and readable, else (None, why not)."""
    try:
        from codetr_stream.compile.engines.manifest import Manifest, ManifestError
    except ImportError:  # a daemon-only install
        return None, None
    try:
        return Manifest.load(engine_dir), None
    except ManifestError as exc:  # not built yet: fine for a check, `run` refuses it
        return None, str(exc)


def _engine_class_names(engine_dir: Path) -> tuple[str, ...] | None:
    """The class names in the engine's manifest, if it is already built and readable."""
    manifest, _ = _engine_manifest(engine_dir)
    return (tuple(manifest.class_names) or None) if manifest is not None else None


def _load(path: Path):
    """The config, or None after printing every problem to stderr.

    Class allow-lists are checked against the engine's own class names when its manifest is
    there (as the daemon does on reload), else against COCO's.
    """
    from codetr_stream.daemon.config import ConfigError, load_config
    from codetr_stream.daemon.detections import COCO_CLASSES

    try:
        names = _engine_class_names(load_config(path, class_names=None).engine.path)
    except ConfigError:
        names = None  # the full report below says why
    try:
        return load_config(path, class_names=names or COCO_CLASSES)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        print(f"{path}: {len(exc.problems)} problem(s)", file=sys.stderr)
        return None


def _say(text: str, *, file: Any = None) -> None:
    """print(), with anything that came from a secret masked (a path or endpoint may be a
    `${...}` reference too)."""
    from codetr_stream.daemon.secrets import redact

    print(redact(text), file=file or sys.stdout)


def check_config_command(args: argparse.Namespace) -> int:
    config = _load(args.file)
    if config is None:
        return 1
    enabled = config.enabled_streams
    _say(f"{args.file}: OK")
    _say(f"engine: {config.engine.path} (device {config.engine.device}, "
         f"gpus {list(config.engine.gpus)})")
    _, problem = _engine_manifest(config.engine.path)
    if problem is not None:
        _say(f"{args.file}: warning: `run` will refuse to start: engine: {problem}",
             file=sys.stderr)
    _say(f"batching: max_batch {config.batching.max_batch}, "
         f"max_wait_ms {config.batching.max_wait_ms:g}")
    _say(f"publish: {config.publish.endpoint} (sndhwm {config.publish.sndhwm})")
    _say(f"health: http://{config.health.host}:{config.health.port}/healthz")
    _say(f"streams: {len(enabled)} enabled of {len(config.streams)}")
    for stream in config.streams:
        classes = ",".join(map(str, stream.classes)) if stream.classes else "all"
        state = "" if stream.enabled else " [disabled]"
        _say(f"  {stream.name}: {stream.safe_url} ({stream.transport}, classes {classes}, "
             f"min_score {stream.min_score:g}{', roi' if stream.roi else ''}){state}")
    return 0


def run_command(args: argparse.Namespace) -> int:
    from codetr_stream.daemon.secrets import install_log_redaction

    install_log_redaction()
    config = _load(args.config)
    if config is None:
        print(f"{args.config}: refusing to start", file=sys.stderr)
        return 1
    from codetr_stream.daemon import service
    from codetr_stream.daemon.pidfile import PidFileError, pid_file
    from codetr_stream.daemon.shard import resolve_shard

    try:
        shard = resolve_shard(index=args.shard_index)
    except ValueError as exc:
        print(f"{args.config}: {exc}", file=sys.stderr)
        return 2
    # Until service.run installs its handler, a `reload` that found the pid file must not kill
    # the process (SIGHUP's default action): ignore it for that moment.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with pid_file(config.pid_file):
            code = int(service.run(config, config_path=args.config, restrict=shard.restrict) or 0)
    except PidFileError as exc:
        print(f"{args.config}: pid_file: {exc}", file=sys.stderr)
        print(f"{args.config}: refusing to start", file=sys.stderr)
        return 1
    except _engine_errors() as exc:
        print(f"{args.config}: engine: {exc}", file=sys.stderr)
        print(f"{args.config}: refusing to start", file=sys.stderr)
        return 1
    _exit_now(code)


def _exit_now(code: int) -> NoReturn:
    """End the stopped daemon's process without the interpreter's teardown.

    Its sockets are closed, its pid file is gone and its logs are flushed here; what is left is
    Python finalizing every module, whose garbage collection of torch's object graph took 2-5 s
    after "stopped" on the 2-core CI machine (gdb: Py_FinalizeEx -> finalize_modules -> gc), so
    SIGTERM took up to 6.8 s to end the process.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _engine_errors() -> tuple[type[Exception], ...]:
    """What loading `engine.path` on `engine.device` raises for an engine that is missing, stale
    or cannot run here: each message names the file and the fix, so it needs no traceback."""
    from codetr_stream.compile.checkpoint import CheckpointError
    from codetr_stream.compile.engines.manifest import IncompatibleEngine, ManifestError
    from codetr_stream.compile.engines.tensorrt import TensorRTUnavailable
    from codetr_stream.daemon.service import NoGpu

    return (CheckpointError, IncompatibleEngine, ManifestError, NoGpu, TensorRTUnavailable)


def reload_command(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        print(f"{args.config}: not reloading; the daemon keeps its current config",
              file=sys.stderr)
        return 1
    if args.systemd:
        return subprocess.run(["systemctl", "reload", args.systemd], check=False).returncode
    if config.pid_file is None:
        print(f"{args.config}: no pid_file set; add `pid_file: /run/codetr-stream/pid` (or use "
              "--systemd)", file=sys.stderr)
        return 1
    from codetr_stream.daemon.pidfile import daemon_pid

    try:
        pid = daemon_pid(config.pid_file)
        os.kill(pid, signal.SIGHUP)
    except (ProcessLookupError, PermissionError) as exc:
        print(f"cannot signal the daemon: {exc}", file=sys.stderr)
        return 1
    print(f"sent SIGHUP to codetr-stream (pid {pid})")
    return 0


def subscribe_command(args: argparse.Namespace) -> int:
    from codetr_stream.daemon.subscribe import Subscription

    received = 0
    reported: dict[str, int] = {}
    with Subscription(args.endpoint, args.stream, status=args.status) as subscription:
        while args.count is None or received < args.count:
            message = subscription.receive(args.timeout)
            if message is None:
                print(f"no message from {args.endpoint} for {args.timeout:g} s", file=sys.stderr)
                return 1
            try:
                print(json.dumps(message, separators=(",", ":")), flush=True)
            except BrokenPipeError:  # `... | head` closed the pipe: a normal way to stop
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return 0
            received += 1
            for topic, missed in subscription.missed.items():
                if missed != reported.get(topic, 0):
                    print(f"{topic}: {missed} message(s) missed so far", file=sys.stderr)
                    reported[topic] = missed
    return 0
