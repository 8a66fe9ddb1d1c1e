"""What a soak run (bench/soak.py) recorded, the verdict on it, and its markdown: the checks, a
row per minute, and detections per camera per minute. Kept apart from the run itself so the same
text serves the live progress file, the final report and bench/RESULTS.md."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from codetr_stream.daemon.monitoring.procstat import ProcessSample
from process_trend import Trend, trend

MB = 1 << 20
DECODE_PATHS = {"nv12": "NVDEC (NV12 frames in GPU memory)", "rgb24": "FFmpeg on the CPU (RGB)"}
COLUMNS = ("t (s)", "RSS MB", "torch GPU MB reserved / live", "device GPU MB", "fds", "threads",
           "detections", "min per camera", "latency p50 / p99 ms", "outages", "reconnects")


def header(table_every: float) -> str:
    """The over-time table's head: a row per minute, or per `table_every` seconds."""
    first = "minute" if table_every == 60 else f"{table_every:g} s window"
    return f"| {first} | " + " | ".join(COLUMNS) + " |\n" + "|---" * (len(COLUMNS) + 1) + "|"


@dataclass
class Row:
    """One table row: the process at the end of a window, and what flowed during it."""

    label: str  # "warm-up" or the window's number (minutes by default)
    t_s: float  # since every camera had published
    window_s: float
    sample: ProcessSample
    messages: dict[str, int]  # detections per camera in this window
    latency_ms: tuple[float, float] | None  # capture -> publish p50, p99
    outages: int  # so far
    reconnects: int  # so far, as the daemon counts them

    def line(self) -> str:
        s = self.sample
        quiet = min(self.messages, key=self.messages.get) if self.messages else "-"
        latency = "-" if self.latency_ms is None else "{:.0f} / {:.0f}".format(*self.latency_ms)
        return (f"| {self.label} | {self.t_s:.0f} | {s.rss_bytes / MB:.0f} "
                f"| {_mb(s.gpu_reserved_bytes)} / {_mb(s.gpu_allocated_bytes)} "
                f"| {_mb(s.gpu_used_bytes)} | {s.open_fds} "
                f"| {s.threads} "
                f"| {sum(self.messages.values())} | {self.messages.get(quiet, 0)} ({quiet}) "
                f"| {latency} | {self.outages} | {self.reconnects} |")


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / MB:.0f}"


@dataclass
class Run:
    """Everything one soak recorded; bench/soak.py fills it in as it goes."""

    command: str
    args: dict[str, Any]
    meta: dict[str, str]
    server: str = ""
    samples: list[ProcessSample] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    measure_from: float | None = None  # time.monotonic()
    measure_to: float | None = None
    probes: int = 0
    probe_failures: list[str] = field(default_factory=list)
    messages: dict[str, int] = field(default_factory=dict)
    outages: dict[str, int] = field(default_factory=dict)
    reconnects: dict[str, int] = field(default_factory=dict)
    recoveries: list[tuple[str, float]] = field(default_factory=list)
    unrecovered: list[str] = field(default_factory=list)
    pixel_formats: set[str] = field(default_factory=set)  # of the decoded frames: the path
    trend: Trend | None = None
    left_after_shutdown: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    done: bool = False
    written_samples: int = 0

    @classmethod
    def describe(cls, args: Any, argv: list[str]) -> Run:
        """The run's command line, machine and engine, before anything starts."""
        import torch

        meta = {"date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC", "torch": torch.__version__}
        if args.device != "cpu" and torch.cuda.is_available():
            meta["device"] = torch.cuda.get_device_name()
            try:
                import PyNvVideoCodec

                meta["pynvvideocodec"] = PyNvVideoCodec.__version__
            except ImportError as exc:
                meta["pynvvideocodec"] = f"missing ({exc})"
        else:
            meta["device"] = f"CPU ({platform.processor() or platform.machine()})"
        manifest = json.loads((args.engine / "manifest.json").read_text())
        h, w = manifest["input_hw"]
        meta["engine"] = (f"{manifest['backend']} {manifest['precision']} {w}x{h} batch "
                          f"{manifest['batch_sizes']} ({manifest['config_name']}, random weights:"
                          f" {manifest['random_weights']})")
        return cls(command="python bench/soak.py " + " ".join(argv),
                   args={k: _plain(v) for k, v in vars(args).items()}, meta=meta)

    @property
    def measured(self) -> list[Row]:
        return self.rows[1:]  # the first row is the warm-up

    def steady_samples(self) -> list[ProcessSample]:
        """The samples of the measured window (after the warm-up)."""
        if self.measure_from is None or self.measure_to is None:
            return []
        return [s for s in self.samples if self.measure_from <= s.time_s <= self.measure_to]

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["written_samples"]
        data["pixel_formats"] = sorted(self.pixel_formats)
        return data


def judge_trend(result: Trend, max_growth: float) -> list[str]:
    """Growth while running, after warm-up, in words."""
    failures = []
    for what, growth in (("RSS", result.rss_growth), ("GPU memory (torch)", result.gpu_growth),
                         ("GPU memory (device)", result.gpu_used_growth)):
        if growth is not None and growth >= max_growth:
            failures.append(f"{what} grew {growth:.2%} after warm-up")
    if result.fd_delta > 0 or result.thread_delta > 0:
        failures.append(f"fds +{result.fd_delta}, threads +{result.thread_delta} after warm-up")
    return failures


def judge_flow(run: Run, names: list[str], args: argparse.Namespace) -> list[str]:
    """Every camera publishes in every measured row, comes back after each outage in time, and
    the daemon counted a reconnect for each outage."""
    failures = []
    for row in run.measured:
        if row.window_s >= args.table_every / 2 and (
                silent := [n for n in names if not row.messages.get(n)]):
            failures.append(f"no detections in window {row.label} from {silent}")
    slow = [(n, round(s, 1)) for n, s in run.recoveries if s > args.max_recovery]
    if slow:
        failures.append(f"cameras back later than {args.max_recovery:g} s after their "
                        f"server returned: {slow}")
    if run.unrecovered:
        failures.append(f"cameras that never published between two outages: {run.unrecovered}")
    short = {n: (run.reconnects.get(n, 0), k) for n, k in run.outages.items()
             if run.reconnects.get(n, 0) < k}
    if short:
        failures.append(f"fewer reconnects than outages (reconnects, outages): {short}")
    return failures


def judge(run: Run, names: list[str], args: argparse.Namespace) -> None:
    """The verdict: growth over the measured samples, flow, probes, and what `soak` found."""
    failures = []
    try:
        run.trend = trend(run.steady_samples(), 0.0)
        failures += judge_trend(run.trend, args.max_growth)
    except ValueError as exc:  # too few samples: stopped or died early
        failures.append(f"no memory trend: {exc}")
    failures += judge_flow(run, names, args)
    if run.probe_failures:
        failures.append(f"{len(run.probe_failures)} of {run.probes} /healthz or /metrics probes "
                        f"failed, first at {run.probe_failures[0]}")
    run.failures = failures + run.failures
    run.done = True


def render(run: Run) -> str:
    """The run as a markdown section: setup, checks (once done), the rows, per-camera counts."""
    args = run.args
    minutes = sum(row.window_s for row in run.measured) / 60
    decode = ", ".join(DECODE_PATHS.get(f, f) for f in sorted(run.pixel_formats)) or "-"
    text = [
        f"## Soak (bench/soak.py): {args['cameras']} cameras with churn, "
        f"{minutes:.1f} min measured{'' if run.done else ' so far'}, {run.meta['device']}\n",
        f"Date: {run.meta['date']}. Command: `{run.command}`\n",
        f"- machine: {run.meta['device']}, torch {run.meta['torch']}"
        + (f", PyNvVideoCodec {run.meta['pynvvideocodec']}" if "pynvvideocodec" in run.meta
           else "") + f"; decoding: {decode}",
        f"- engine: {run.meta['engine']}",
        f"- cameras: {args['cameras']} x {args['size']} @ {args['fps']} fps H.264, one "
        f"{run.server} RTSP server process each; churn: a random camera's server killed every "
        f"{args['churn_every']} s and restarted {args['down']} s later on the same port",
        f"- clock: {float(args['warmup']):g} s warm-up after every camera's first detection "
        f"(left out), then {float(args['minutes']):g} min measured; process sampled every "
        f"{float(args['sample_every']):g} s, /healthz and /metrics probed every 15 s\n",
    ]
    if run.done:
        text += [_checks(run), ""]
    text += ["### Over time (the warm-up row is left out of the verdict)\n",
             header(float(args["table_every"]))]
    text += [row.line() for row in run.rows]
    if run.done and run.measured:
        text += ["", "### Detections per camera per window\n", _per_camera(run)]
    return "\n".join(text) + "\n"


def _checks(run: Run) -> str:
    limit = f"< {float(run.args['max_growth']):.0%}"
    t = run.trend
    rows = [("RSS growth (floor: 10th percentile; first vs last third of the measured samples)",
             _pct(t and t.rss_growth), limit),
            ("GPU memory reserved by torch, growth (same)", _pct(t and t.gpu_growth), limit),
            ("GPU memory in use on the device, growth (same)", _pct(t and t.gpu_used_growth),
             limit),
            ("open fds, change of the floor", "-" if t is None else f"{t.fd_delta:+d}", "0"),
            ("threads, change of the floor", "-" if t is None else f"{t.thread_delta:+d}", "0")]
    per_minute = [(min(r.messages.values(), default=0), r.label) for r in run.measured]
    low = min(per_minute, default=(0, "-"))
    silent = sum(1 for r in run.measured for n in r.messages.values() if n == 0)
    rows.append(("every camera published in every window",
                 f"{'yes' if not silent else f'no ({silent} silent camera-minutes)'}, "
                 f"lowest {low[0]} in a window (window {low[1]})", "yes"))
    rows.append(("outages / reconnects counted by the daemon",
                 f"{sum(run.outages.values())} / {sum(run.reconnects.values())}",
                 "reconnects >= outages, per camera"))
    back = [s for _, s in run.recoveries]
    rows.append(("first detection after the camera's return, p50 / max",
                 f"{statistics.median(back):.1f} / {max(back):.1f} s ({len(back)} returns)"
                 if back else "-", f"< {float(run.args['max_recovery']):g} s"))
    rows.append(("/healthz + /metrics probes failed",
                 f"{len(run.probe_failures)} of {run.probes}", "0"))
    rows.append(("left after shutdown (threads, fds)",
                 "; ".join(run.left_after_shutdown) or "nothing", "nothing"))
    rows.append(("detections published (all cameras, whole run)",
                 f"{sum(run.messages.values())}", ""))
    rows.append(("**verdict**", "**PASS**" if not run.failures else "**FAIL**", ""))
    table = "| check | result | limit |\n|---|---|---|\n" + "\n".join(
        f"| {a} | {b} | {c} |" for a, b, c in rows)
    if run.failures:
        table += "\n\nFailures:\n" + "\n".join(f"- {f}" for f in run.failures)
    return table


def _per_camera(run: Run) -> str:
    labels = [r.label for r in run.measured]
    lines = ["| camera | outages | reconnects | " + " | ".join(labels) + " | total |",
             "|---" * (len(labels) + 4) + "|"]
    for name in sorted(run.messages):
        counts = [r.messages.get(name, 0) for r in run.measured]
        lines.append(f"| {name} | {run.outages.get(name, 0)} | {run.reconnects.get(name, '-')} | "
                     + " | ".join(map(str, counts)) + f" | {run.messages[name]} |")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2%}"


def _plain(value: Any) -> Any:
    """An argument as JSON: a (low, high) span as `30-60` (or `5`), a path as text."""
    if isinstance(value, tuple):
        low, high = value
        return f"{low:g}" if low == high else f"{low:g}-{high:g}"
    return str(value) if isinstance(value, Path) else value


def write_live(folder: Path, run: Run) -> None:
    """progress.md (rewritten) and samples.jsonl (appended): what a cut-off run leaves behind."""
    with (folder / "samples.jsonl").open("a") as f:
        for sample in run.samples[run.written_samples:]:
            f.write(json.dumps(sample.as_dict()) + "\n")
    run.written_samples = len(run.samples)
    tmp = folder / "progress.md.tmp"
    tmp.write_text(render(run))
    tmp.replace(folder / "progress.md")
