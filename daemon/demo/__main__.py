"""`make demo`: the whole service on this machine in about half a minute, nothing to download.

1. A local RTSP server (GStreamer's, `rtsp_server`, else our `rtsp_replay`) streams two
   generated cameras.
2. A tiny Co-DINO (the real architecture, shrunk) with RANDOM weights is built into an eager
   engine: on the GPU when there is one, else on the CPU.
3. `codetr-stream run` starts on a generated streams.yaml, exactly as an operator would run it.
4. A ZeroMQ subscriber prints one line per published frame for ten seconds (`--seconds`; 0
   keeps it running until Ctrl-C, so the snapshot URL it prints can be opened meanwhile).

The detections are meaningless (untrained weights): the demo shows the pipeline, not accuracy.
For real detections compile the official checkpoint (`codetr-stream fetch-weights`, then
`codetr-stream compile --weights ...`) and point streams.yaml at that engine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from codetr_stream.daemon.demo import rtsp_replay, rtsp_server

CAMERAS = {"cam1": "h264:320x240@5/ball", "cam2": "h264:352x288@5/smpte"}
INPUT_HW = (320, 320)


def tiny_config() -> dict:
    """The built-in Co-DINO Swin-L config with every size shrunk (same module tree)."""
    from codetr_stream.compile.model_config import BUILTIN

    cfg = BUILTIN["co_dino_swin_l"]()
    cfg["name"] = "co_dino_demo_tiny"
    cfg["backbone"].update(embed_dims=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8],
                           window_size=7)
    cfg["neck"].update(in_channels=[32, 64, 128, 256], out_channels=64)
    cfg["transformer"].update(embed_dims=64, two_stage_num_proposals=100, encoder_layers=2,
                              decoder_layers=2, msda_heads=4, decoder_self_attn_heads=4,
                              ffn_channels=128)
    cfg["head"].update(num_query=100, max_per_img=50, num_pred_branches=3, pos_num_feats=32)
    return cfg


def build_demo_engine(out: Path) -> Path:
    import torch
    from codetr_stream.compile.build import build_model_engine
    from codetr_stream.compile.coco_classes import COCO_CLASSES

    device = "cuda" if torch.cuda.is_available() else "cpu"
    build_model_engine(tiny_config(), out, input_hw=INPUT_HW, batch_sizes=[1, 2], seed=0,
                       class_names=COCO_CLASSES, device=device)
    return out


@contextlib.contextmanager
def cameras() -> Iterator[dict[str, str]]:
    """Camera name -> RTSP URL: GStreamer's RTSP server where it is installed, else one small
    replay server (PyAV only) per camera at that camera's size, so the demo needs nothing beyond
    the virtualenv and its two cameras differ either way."""
    server = rtsp_server.RtspServer([f"{n}={spec}" for n, spec in CAMERAS.items()])
    try:
        server.start()
    except (RuntimeError, FileNotFoundError, OSError) as exc:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]  # not its traceback
        print(f"GStreamer's RTSP server is not available ({why}); using our replay server "
              "(`sudo bash .ci/system-packages` installs GStreamer on Debian)", flush=True)
        with contextlib.ExitStack() as stack:
            urls = {}
            for name, spec in CAMERAS.items():
                mount = rtsp_server.parse_mount(f"{name}={spec}")
                srv = rtsp_replay.ReplayServer(f"{mount['width']}x{mount['height']}", mount["fps"])
                stack.callback(srv.stop)
                urls[name] = srv.start().url(name)
            yield urls
        return
    try:
        yield {n: server.url(n) for n in CAMERAS}
    finally:
        server.stop()


def write_config(path: Path, engine: Path, urls: dict[str, str], endpoint: str,
                 health_port: int) -> None:
    streams = "\n".join(f'  - {{name: {name}, url: "{url}", min_score: 0.2}}'
                        for name, url in urls.items())
    path.write_text(
        f"engine: {{path: {engine}, device: auto}}\n"
        "batching: {max_batch: 2, max_wait_ms: 20}\n"
        f'publish: {{endpoint: "{endpoint}"}}\n'
        f"health: {{port: {health_port}}}\n"
        f"streams:\n{streams}\n")


HEADER = (f"{'stream':<6} {'frame':>5}  {'size':>7}  {'boxes':>5}  {'latency':>9}  "
          "top detections: class score [x1, y1, x2, y2] (frame pixels)")


def summary(message: dict) -> str:
    """One line per published frame, in HEADER's columns; latency is capture -> publish."""
    dets = message["detections"]
    top = ", ".join(f"{d['class_name']} {d['score']:.2f} "
                    f"[{', '.join(f'{c:.0f}' for c in d['box'])}]" for d in dets[:2])
    latency = (message["publish_ns"] - message["capture_ns"]) / 1e6
    size = f"{message['frame']['width']}x{message['frame']['height']}"
    return (f"{message['stream']:<6} {message['frame_index']:>5}  {size:>7}  {len(dets):>5}  "
            f"{latency:>6.1f} ms  {top}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="how long to print detections; 0 = until Ctrl-C (then the "
                        "snapshot URL stays open)")
    args = parser.parse_args(argv)
    if args.seconds < 0:
        parser.error(f"--seconds must be 0 (until Ctrl-C) or more, got {args.seconds:g}")
    from codetr_stream.daemon.feed.subscribe import subscribe

    print("NOTE: the demo model is a tiny Co-DINO with RANDOM, UNTRAINED weights. Its boxes "
          "and classes are meaningless; they show the pipeline working, not detection quality.")
    code = None
    with tempfile.TemporaryDirectory(prefix="codetr-demo-") as tmp:
        tmp = Path(tmp)
        print("building the demo engine ...", flush=True)
        engine = build_demo_engine(tmp / "engine")
        with cameras() as urls:
            endpoint = f"tcp://127.0.0.1:{rtsp_server.free_port()}"
            health_port = rtsp_server.free_port()
            config = tmp / "streams.yaml"
            write_config(config, engine, urls, endpoint, health_port)
            print(f"RTSP cameras: {', '.join(urls.values())}")
            print(f"daemon: codetr-stream run --config {config}", flush=True)
            daemon = subprocess.Popen([sys.executable, "-m", "codetr_stream.daemon.cli", "run",
                                       "--config", str(config)])
            try:
                messages = subscribe(endpoint, idle_timeout_s=120)
                first = next(messages)
                print(f"snapshots: http://127.0.0.1:{health_port}/snapshot/cam1.jpg (and cam2)")
                print("until " + ("Ctrl-C" if args.seconds == 0 else f"{args.seconds:g} s "
                                  "(--seconds 0: until Ctrl-C)") + ":")
                print(HEADER)
                print(summary(first), flush=True)
                stop_at = time.monotonic() + args.seconds if args.seconds else float("inf")
                while time.monotonic() < stop_at:
                    print(summary(next(messages)), flush=True)
            except KeyboardInterrupt:
                print("stopping (Ctrl-C)")
            finally:
                with contextlib.suppress(ProcessLookupError):
                    daemon.send_signal(signal.SIGTERM)
                code = daemon.wait(timeout=15)
    print(f"daemon exited with {code}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before the daemon started: nothing left to stop
        sys.exit(130)
