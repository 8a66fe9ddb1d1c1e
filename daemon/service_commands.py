"""The service-side subcommands: `run`, `check-config`, `reload`, `subscribe`, `curve-keygen`.

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
import time
from pathlib import Path
from typing import Any

from codetr_stream.daemon.cli import positive_float, positive_int
from codetr_stream.daemon.feed.messages import SCHEMA_VERSION

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_UNIT = "codetr-stream"
# The published messages' JSON Schemas (a test validates real messages against them).
DETECTIONS_SCHEMA = "docs/schema/detections.schema.json"
STATUS_SCHEMA = "docs/schema/status.schema.json"
REFUSES = 3  # check-config: the file is valid, but `run` would refuse the engine


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run the detection daemon",
                              description="Read cameras, detect, publish on ZeroMQ. Refuses to "
                              "start (one line, exit 1) on any config problem or an engine that "
                              "cannot run here; SIGINT/SIGTERM stop it, SIGHUP reloads the config.")
    p.add_argument("--config", type=Path, default=Path("streams.yaml"), help="streams.yaml")
    p.add_argument("--shard-index", type=int, default=None,
                   help="this worker's index of $CODETR_SHARD_REPLICAS (default: "
                   "$CODETR_SHARD_INDEX, else a StatefulSet pod ordinal in $HOSTNAME)")
    p.set_defaults(handler=run_command)

    p = subparsers.add_parser(
        "check-config", help="validate a streams.yaml",
        description="Print every problem as file:line: field: message (hint) and exit 1; else, "
        "if `run` would still refuse to start (the engine is missing, stale or needs a GPU that "
        "is not here), print `FILE: run would refuse: engine: REASON` first and exit 3; else "
        "print FILE: OK and a summary (passwords masked) and exit 0.")
    p.add_argument("file", type=Path, help="the streams.yaml to check")
    p.set_defaults(handler=check_config_command)

    p = subparsers.add_parser("reload", help="make the running daemon re-read its config",
                              description="Validate the config, then send SIGHUP to the daemon.")
    p.add_argument("--config", type=Path, default=Path("streams.yaml"),
                   help="the daemon's streams.yaml (checked first; its pid_file is signalled)")
    p.add_argument("--systemd", nargs="?", const=DEFAULT_UNIT, metavar="UNIT",
                   help=f"use `systemctl reload UNIT` (default unit: {DEFAULT_UNIT})")
    p.set_defaults(handler=reload_command)

    p = subparsers.add_parser(
        "subscribe", help="print published messages as JSON lines",
        description="Connect to a daemon's (or the proxy's) ZeroMQ publisher and print one JSON "
        "object per message; lost messages are reported on stderr.\n\n"
        "Topics: det.<stream>| (one message per processed frame) and status.<stream>| (one "
        "heartbeat per stream every publish.status_interval_s). Every message carries "
        f"schema_version {SCHEMA_VERSION}; the JSON Schemas are {DETECTIONS_SCHEMA} and "
        f"{STATUS_SCHEMA} in the source repository.")
    p.add_argument("--endpoint", type=_endpoint, default=DEFAULT_ENDPOINT,
                   help="the publisher: tcp://HOST:PORT or ipc:///path")
    p.add_argument("--stream", action="append", metavar="NAME",
                   help="only this stream (repeatable); default all")
    p.add_argument("--status", action="store_true",
                   help="print the status.<stream>| heartbeats instead of det.<stream>| detections")
    p.add_argument("--count", type=positive_int, metavar="N",
                   help="exit 0 after N messages (default: run until Ctrl-C)")
    p.add_argument("--timeout", type=positive_float, metavar="S",
                   help="exit 1 when nothing arrives for S seconds (default: wait forever)")
    p.add_argument("--curve-server-key", metavar="KEY|FILE",
                   help="the daemon's (or proxy's) CURVE public key: its 40 characters or the "
                   ".pub file from `codetr-stream curve-keygen`")
    p.set_defaults(handler=subscribe_command)

    p = subparsers.add_parser(
        "curve-keygen", help="make a CURVE keypair for an encrypted detection feed",
        description="Write NAME.pub (give it to subscribers and proxies) and NAME.secret (mode "
        "0600: publish.curve_secret_key_file, or a proxy's --curve-secret-key-file).")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="where to write them")
    p.add_argument("--name", default="server", help="file name stem (default: server)")
    p.set_defaults(handler=curve_keygen_command)


def _endpoint(text: str) -> str:
    """An argparse type: a ZeroMQ endpoint a SUB socket can connect to, checked here so that a
    typo is a usage line, not a ZMQError traceback."""
    scheme, sep, rest = text.partition("://")
    if scheme == "tcp" and sep:
        host, colon, port = rest.rpartition(":")
        if not (colon and host and port.isdigit() and 0 < int(port) < 65536):
            raise argparse.ArgumentTypeError(
                f"{text!r} needs a host and a port 1-65535, e.g. tcp://127.0.0.1:5555")
        return text
    if scheme in ("ipc", "inproc") and sep and rest:
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a ZeroMQ endpoint; use tcp://HOST:PORT (e.g. {DEFAULT_ENDPOINT}) or "
        "ipc:///path")


def _engine_class_names(engine_dir: Path) -> tuple[str, ...]:
    """The class names in the engine's manifest if it is built and readable, else COCO's."""
    from codetr_stream.compile.coco_classes import COCO_CLASSES
    from codetr_stream.compile.engines.manifest import Manifest, ManifestError

    try:
        return tuple(Manifest.load(engine_dir).class_names) or COCO_CLASSES
    except ManifestError:  # not built yet: fine for a check, `run` refuses it
        return COCO_CLASSES


def _load(path: Path):
    """The config, or None after printing every problem to stderr.

    Class allow-lists are checked against the engine's own class names when its manifest is
    there (as the daemon does on reload), else against COCO's.
    """
    from codetr_stream.daemon.config.load import ConfigError, load_config

    try:
        return load_config(path, class_names=_engine_class_names)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        print(f"{path}: {len(exc.problems)} problem(s)", file=sys.stderr)
        return None


def _engine_refusal(config: Any) -> str | None:
    """Why `run` would refuse `engine.path` on `engine.device` here (missing, stale, built for
    another machine, no GPU), or None: the manifest checks of a load, without loading."""
    try:
        from codetr_stream.compile.engines import Manifest, check_engine_dir
    except ImportError:  # a daemon-only install: `run` says it when it loads
        return None
    try:
        if config.engine.device != "cuda":  # a missing engine is found before torch loads
            Manifest.load(config.engine.path)
        from codetr_stream.daemon.service import select_devices

        check_engine_dir(config.engine.path, select_devices(config)[0])
    except _engine_errors() as exc:
        return str(exc)
    return None


def _say(text: str, *, file: Any = None) -> None:
    """print(), with anything that came from a secret masked (a path or endpoint may be a
    `${...}` reference too)."""
    from codetr_stream.daemon.config.secrets import redact

    print(redact(text), file=file or sys.stdout)


def check_config_command(args: argparse.Namespace) -> int:
    config = _load(args.file)
    if config is None:
        return 1
    refusal = _engine_refusal(config)
    if refusal is not None:
        _say(f"{args.file}: run would refuse: engine: {refusal}", file=sys.stderr)
    else:
        _say(f"{args.file}: OK")
    enabled = config.enabled_streams
    _say(f"engine: {config.engine.path} (device {config.engine.device}, "
         f"gpus {list(config.engine.gpus)})")
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
    return REFUSES if refusal is not None else 0


def run_command(args: argparse.Namespace) -> int:
    from codetr_stream.daemon.config.secrets import install_log_redaction

    install_log_redaction()
    config = _load(args.config)
    if config is None:
        print(f"{args.config}: refusing to start", file=sys.stderr)
        return 1
    from codetr_stream.daemon import service
    from codetr_stream.daemon.fleet.shard import resolve_shard
    from codetr_stream.daemon.system.pidfile import PidFileError, pid_file

    try:
        shard = resolve_shard(index=args.shard_index)
    except ValueError as exc:
        print(f"{args.config}: {exc}", file=sys.stderr)
        return 2
    # Until service.run installs its handler, a `reload` that found the pid file must not kill
    # the process (SIGHUP's default action): ignore it for that moment.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        # Another daemon on this pid file first: starting it twice is the mistake to name, even
        # when the engine is not there yet.
        with pid_file(config.pid_file):
            refusal = _engine_refusal(config)
            if refusal is not None:
                return _refuse(args.config, f"engine: {refusal}")
            return int(service.run(config, config_path=args.config, restrict=shard.restrict) or 0)
    except PidFileError as exc:
        return _refuse(args.config, f"pid_file: {exc}")
    except _engine_errors() as exc:  # what the manifest could not tell (e.g. no TensorRT)
        return _refuse(args.config, f"engine: {exc}")
    except OSError as exc:  # a port in use, an address not on this host: the message says which
        logging.getLogger(__name__).debug("start failed", exc_info=True)
        plain = exc.strerror and not exc.filename  # the message alone, without "[Errno 98]"
        return _refuse(args.config, exc.strerror if plain else str(exc))


def _refuse(config_path: Path, reason: str) -> int:
    print(f"{config_path}: refusing to start: {reason}", file=sys.stderr)
    return 1


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
    from codetr_stream.daemon.system.pidfile import daemon_pid

    try:
        pid = daemon_pid(config.pid_file)
        os.kill(pid, signal.SIGHUP)
    except (ProcessLookupError, PermissionError) as exc:
        print(f"cannot signal the daemon: {exc}", file=sys.stderr)
        return 1
    print(f"sent SIGHUP to codetr-stream (pid {pid})")
    return 0


def subscribe_command(args: argparse.Namespace) -> int:
    from codetr_stream.daemon.feed.curve import CurveKeyError, key_argument
    from codetr_stream.daemon.feed.subscribe import Subscription

    try:
        server_key = key_argument(args.curve_server_key) if args.curve_server_key else None
    except CurveKeyError as exc:
        print(f"--curve-server-key: {exc}", file=sys.stderr)
        return 2
    received = 0
    reported: dict[str, int] = {}
    skipped_reported = 0.0  # time.monotonic() of the last line about skipped messages
    with Subscription(args.endpoint, args.stream, status=args.status,
                      curve_server_key=server_key) as subscription:
        while args.count is None or received < args.count:
            try:
                message = subscription.receive(args.timeout)
            except ValueError as exc:  # another schema version: nothing after it would parse
                print(f"{args.endpoint}: {exc}", file=sys.stderr)
                return 1
            if subscription.skipped and time.monotonic() - skipped_reported >= 1.0:
                print(f"{subscription.skipped} malformed message(s) skipped so far (last: "
                      f"{subscription.last_skipped})", file=sys.stderr)
                skipped_reported = time.monotonic()
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


def curve_keygen_command(args: argparse.Namespace) -> int:
    from codetr_stream.daemon.feed.curve import write_keypair

    try:
        public, secret = write_keypair(args.out, args.name)
    except FileExistsError as exc:
        print(f"{exc.filename}: exists; remove it or pick another --name", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{args.out}: cannot write the keys: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"public key: {public}\nsecret key: {secret} (mode 0600)")
    return 0
