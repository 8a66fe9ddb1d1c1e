"""`codetr-stream shard` and `codetr-stream proxy`: the commands for running many workers as one."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import threading
from pathlib import Path

from codetr_stream.daemon.cli import positive_int
from codetr_stream.daemon.fleet import shard

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "shard",
        help="print which worker serves which stream",
        description="Rendezvous-hash the streams of a config over N workers, as each worker will.",
    )
    p.add_argument("config", type=Path, help="streams.yaml")
    p.add_argument("--replicas", type=positive_int, required=True, help="number of workers")
    p.add_argument("--from-replicas", type=positive_int, metavar="M",
                   help="also list the streams that move when scaling from M workers to N")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=shard_command)

    p = subparsers.add_parser(
        "proxy",
        help="join every worker's detections into one ZeroMQ endpoint",
        description="XSUB/XPUB forwarder: workers publish into --backend, subscribers connect to "
        "--frontend. Endpoints bind; prefix one with '>' to connect to it instead "
        "(e.g. --backend '>tcp://codetr-stream-0.codetr-stream:5556').",
    )
    p.add_argument("--frontend", action="append", metavar="ENDPOINT",
                   help="where subscribers connect (XPUB); default tcp://127.0.0.1:5560")
    p.add_argument("--backend", action="append", metavar="ENDPOINT", required=True,
                   help="a worker's publish endpoint to connect to ('>tcp://host:5555'), or "
                   "an address to bind for publishers that connect (XSUB); repeatable")
    p.add_argument("--replicas", type=positive_int, metavar="N",
                   help="expand '{index}' in --backend to 0..N-1 (default: $CODETR_SHARD_REPLICAS)")
    p.add_argument("--hwm", type=int, default=10_000, help="high-water mark per socket, messages")
    p.add_argument("--max-subscribers", type=_positive, metavar="N",
                   help="subscriber connections at once (default 128)")
    p.add_argument("--max-subscriptions", type=_positive, metavar="N",
                   help="distinct subscriptions over all subscribers (default 5000; keep it "
                   "below the workers' publish.max_subscriptions)")
    p.add_argument("--curve-secret-key-file", type=Path, metavar="FILE",
                   help="serve subscribers over CURVE with this secret key "
                   "(`codetr-stream curve-keygen`)")
    p.add_argument("--backend-curve-server-key", metavar="KEY|FILE",
                   help="the workers' CURVE public key: connect to them over CURVE")
    # Off by default: the counter sees a copy of every message, which measured 2-3x the proxy's
    # own CPU per message (bench/proxy_throughput.py); the workers' /metrics count published
    # frames anyway.
    p.add_argument("--stats-interval", type=float, default=0.0, metavar="S",
                   help="log the message rate every S seconds (default 0: off)")
    p.set_defaults(handler=proxy_command)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _stream_names(path: Path) -> list[str]:
    """The enabled streams' names, validated exactly as a worker validates the file at start."""
    from codetr_stream.daemon.config.load import ConfigError, load_config

    try:
        return [stream.name for stream in load_config(path).enabled_streams]
    except ConfigError as exc:
        raise SystemExit(f"{exc}\n{path}: fix the errors above; workers would refuse it") from None


def shard_command(args: argparse.Namespace) -> int:
    names = _stream_names(args.config)
    table = shard.assignment(names, args.replicas)
    moved = []
    if args.from_replicas:
        moved = [n for n in names
                 if shard.owner(n, args.from_replicas) != shard.owner(n, args.replicas)]
    if args.json:
        out = {"replicas": args.replicas, "workers": {str(k): v for k, v in table.items()}}
        if args.from_replicas:
            out["moved_from"] = {"replicas": args.from_replicas, "streams": moved}
        print(json.dumps(out, indent=2))
        return 0
    print(f"# {len(names)} streams over {args.replicas} workers ({args.config})")
    for worker, streams in table.items():
        print(f"worker {worker}: {len(streams)} streams")
        for name in streams:
            print(f"  {name}")
    if args.from_replicas:
        print(f"# {args.from_replicas} -> {args.replicas} workers moves {len(moved)} of "
              f"{len(names)} streams: {', '.join(moved) or '-'}")
    return 0


def proxy_command(args: argparse.Namespace) -> int:
    from codetr_stream.daemon.feed import curve
    from codetr_stream.daemon.fleet.proxy import (
        DEFAULT_FRONTEND,
        PROXY_LIMITS,
        Proxy,
        expand_endpoints,
    )

    limits = dataclasses.replace(
        PROXY_LIMITS, max_peers=args.max_subscribers or PROXY_LIMITS.max_peers,
        max_subscriptions=args.max_subscriptions or PROXY_LIMITS.max_subscriptions)
    try:
        secret = (curve.read_key(args.curve_secret_key_file)
                  if args.curve_secret_key_file else None)
        server_key = (curve.key_argument(args.backend_curve_server_key)
                      if args.backend_curve_server_key else None)
        replicas = shard.resolve_shard(0, args.replicas).replicas
        backend = expand_endpoints(args.backend, replicas)
        proxy = Proxy(args.frontend or [DEFAULT_FRONTEND], backend,
                      hwm=args.hwm, stats_interval=args.stats_interval, limits=limits,
                      curve_secret_key=secret, backend_server_key=server_key)
    except ValueError as exc:  # CurveKeyError included
        log.error("proxy: %s", exc)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    proxy.start()
    log.info("proxy: workers -> %s, subscribers -> %s", ", ".join(proxy.backend),
             ", ".join(proxy.frontend))
    stop.wait()
    log.info("proxy: stopping")
    proxy.stop()
    return 0
