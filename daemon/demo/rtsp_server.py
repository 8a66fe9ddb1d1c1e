"""A real RTSP server for the demo, the tests and the benchmarks: GStreamer's gst-rtsp-server.

Two halves in one file. Run by the system Python (`/usr/bin/python3`, where Debian's `python3-gi`
and `gir1.2-gst-rtsp-server-1.0` live; the project venv has no GObject bindings), the `__main__`
half is the server process: each mount is a live GStreamer pipeline that generates and encodes
video (x264enc/x265enc), so a camera streams for as long as the server runs, like a real one. Run
from the caller's Python (stdlib only), `RtspServer` starts that process (this file, by path: the
system Python does not see the package), waits until it listens and stops it.

Mount spec (`--mount`): `NAME=KIND[:WxH][@FPS][/PATTERN]`, KIND one of h264, hevc, audio
(no video at all), and h264-switch (H.264 whose resolution changes every few seconds).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

SYSTEM_PYTHON = os.environ.get("CODETR_GST_PYTHON", "/usr/bin/python3")
ENCODERS = {
    "h264": "x264enc tune=zerolatency speed-preset=ultrafast bframes=0 key-int-max={fps} "
            "! rtph264pay name=pay0 pt=96 config-interval=-1",
    "hevc": "x265enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} "
            "! rtph265pay name=pay0 pt=96 config-interval=-1",
}


def parse_mount(spec: str) -> dict:
    """`cam1=h264:320x240@5/ball` -> {"name", "kind", "width", "height", "fps", "pattern"}."""
    name, _, rest = spec.partition("=")
    rest, _, pattern = rest.partition("/")
    rest, _, fps = rest.partition("@")
    kind, _, size = rest.partition(":")
    width, _, height = (size or "320x240").partition("x")
    if not name or kind not in (*ENCODERS, "audio", "h264-switch"):
        raise ValueError(f"bad mount {spec!r}: want NAME=h264|hevc|audio|h264-switch[:WxH][@FPS]")
    return {"name": name, "kind": kind, "width": int(width), "height": int(height),
            "fps": int(fps or 5), "pattern": pattern or "ball"}


def launch_line(mount: dict) -> str:
    """The gst-launch description of one mount's live pipeline."""
    if mount["kind"] == "audio":
        return ("( audiotestsrc is-live=true ! audio/x-raw,rate=8000,channels=1 ! audioconvert "
                "! rtpL16pay name=pay0 pt=97 )")
    codec = "h264" if mount["kind"] == "h264-switch" else mount["kind"]
    caps = f"video/x-raw,format=I420,width={mount['width']},height={mount['height']}"
    return (f"( videotestsrc is-live=true pattern={mount['pattern']} "
            f"! video/x-raw,framerate={mount['fps']}/1 ! videoscale ! capsfilter name=size "
            f"caps={caps} ! {ENCODERS[codec].format(fps=mount['fps'])} )")


def serve(port: int, mounts: Sequence[dict], auth: str | None) -> None:  # pragma: no cover
    """The server process (system Python with GObject): serve the mounts until killed."""
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(port))
    if auth:
        user, _, password = auth.partition(":")
        rtsp_auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string("media.factory.role", "viewer")
        rtsp_auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password), token)
        server.set_auth(rtsp_auth)
    switchers = []
    for mount in mounts:
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(launch_line(mount))
        factory.set_shared(True)
        if auth:
            factory.add_role_from_structure(Gst.Structure.from_string(
                "viewer, media.factory.access=(boolean)true, "
                "media.factory.construct=(boolean)true")[0])
        if mount["kind"] == "h264-switch":
            factory.connect("media-configure", lambda _f, media: switchers.append(media))
        server.get_mount_points().add_factory(f"/{mount['name']}", factory)

    def switch_size() -> bool:
        """Alternate the size of every h264-switch stream: the daemon must rebuild its decoder."""
        for media in switchers:
            size = media.get_element().get_by_name("size")
            caps = size.get_property("caps").get_structure(0)
            wide = caps.get_value("width") == 320
            w, h = (480, 360) if wide else (320, 240)
            size.set_property("caps", Gst.Caps.from_string(
                f"video/x-raw,format=I420,width={w},height={h}"))
        return True

    GLib.timeout_add_seconds(3, switch_size)
    if server.attach(None) == 0:
        sys.exit(f"rtsp_server: cannot listen on 127.0.0.1:{port}")
    print(f"READY {server.get_bound_port()}", flush=True)
    GLib.MainLoop().run()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RtspServer:
    """The server process, from the caller's side: `with RtspServer(["cam1=h264"]) as srv:`.

    Without a `port` the first start lets the server bind any free one (no port is guessed and
    then raced for); it is kept, so a stopped server comes back at the same URL.
    """

    def __init__(self, mounts: Sequence[str], port: int | None = None, auth: str | None = None):
        for spec in mounts:
            parse_mount(spec)
        self.mounts = list(mounts)
        self.port = port or 0
        self.auth = auth
        self.proc: subprocess.Popen | None = None

    def url(self, name: str, userinfo: str | None = None) -> str:
        at = f"{userinfo}@" if userinfo else ""
        return f"rtsp://{at}127.0.0.1:{self.port}/{name}"

    def start(self, timeout: float = 20.0) -> RtspServer:
        argv = [SYSTEM_PYTHON, str(Path(__file__).resolve()), "--port", str(self.port)]
        argv += [a for spec in self.mounts for a in ("--mount", spec)]
        if self.auth:
            argv += ["--auth", self.auth]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline and not line.startswith("READY"):
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"rtsp_server exited: {self.proc.stderr.read()[-2000:]}")
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"rtsp_server did not start within {timeout} s")
        self.port = int(line.split()[1])
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.kill()
        self.proc.wait(timeout=10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            pipe.close()
        self.proc = None

    def __enter__(self) -> RtspServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> None:  # pragma: no cover
    parser = argparse.ArgumentParser(description="Serve generated live video over RTSP.")
    parser.add_argument("--port", type=int, default=0, help="0 (default): any free port")
    parser.add_argument("--mount", action="append", required=True, help="NAME=KIND[:WxH][@FPS]")
    parser.add_argument("--auth", help="USER:PASSWORD required by every mount")
    args = parser.parse_args(argv)
    serve(args.port, [parse_mount(m) for m in args.mount], args.auth)


if __name__ == "__main__":
    main()
