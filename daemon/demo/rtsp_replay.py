"""A small RTSP server that replays a generated H.264 clip in a loop, for machines without
GStreamer (the GPU machine has neither GStreamer nor an ffmpeg binary, only pip packages).

It speaks enough RTSP for FFmpeg's client over TCP (OPTIONS, DESCRIBE, SETUP with interleaved
RTP, PLAY, GET_PARAMETER, TEARDOWN) and sends RTP (RFC 6184, single NAL units and FU-A) paced
in real time, every camera path its own independent session. The clip is encoded once at start
with PyAV's libx264. Run it as a process, `python -m codetr_stream.daemon.demo.rtsp_replay --port
P --size 1280x720` (or `ReplayServer` / `start()` from Python); every path
(rtsp://127.0.0.1:P/anything) serves the same clip. Prints `READY <port>` when listening.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from fractions import Fraction

MTU_PAYLOAD = 1400


def encode_clip(width: int, height: int, fps: int, seconds: float) -> list[list[bytes]]:
    """Access units (each a list of NAL units without start codes) of a moving test pattern;
    every IDR carries its own SPS and PPS so a client can start at any keyframe."""
    import av
    import numpy as np

    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt = width, height, "yuv420p"
    codec.time_base = Fraction(1, fps)
    codec.framerate = Fraction(fps)
    codec.gop_size = fps
    codec.options = {"preset": "ultrafast", "tune": "zerolatency", "bframes": "0"}
    y, x = np.mgrid[0:height, 0:width]
    aus, params = [], {}
    for i in range(int(fps * seconds)):
        cx, cy = (width * (0.5 + 0.35 * np.cos(i / 8))), (height * (0.5 + 0.35 * np.sin(i / 8)))
        disc = ((x - cx) ** 2 + (y - cy) ** 2) < (min(width, height) / 6) ** 2
        rgb = np.stack([(x * 255 // width + i * 3) % 256, y * 255 // height,
                        np.where(disc, 255, 40)], -1).astype(np.uint8)
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = i
        for packet in codec.encode(frame):
            aus.append(split_nals(bytes(packet)))
    for packet in codec.encode(None):
        aus.append(split_nals(bytes(packet)))
    for au in aus:
        for nal in au:
            if nal[0] & 0x1F in (7, 8):
                params[nal[0] & 0x1F] = nal
    sps_pps = [params[7], params[8]]
    return [sps_pps + [n for n in au if n[0] & 0x1F not in (7, 8)]
            if any(n[0] & 0x1F == 5 for n in au) else au for au in aus]


def split_nals(annexb: bytes) -> list[bytes]:
    nals, i = [], 0
    starts = []
    while (i := annexb.find(b"\x00\x00\x01", i)) != -1:
        starts.append(i + 3)
        i += 3
    for start, end in itertools.zip_longest(starts, starts[1:]):
        nal = annexb[start:(end - 3 if end else None)].rstrip(b"\x00")
        if nal:
            nals.append(nal)
    return nals


def rtp_payloads(nal: bytes) -> list[bytes]:
    """One NAL unit as RTP payloads: itself if small, else FU-A fragments."""
    if len(nal) <= MTU_PAYLOAD:
        return [nal]
    header, body = nal[0], nal[1:]
    indicator = (header & 0xE0) | 28
    chunks = [body[i:i + MTU_PAYLOAD] for i in range(0, len(body), MTU_PAYLOAD)]
    out = []
    for k, chunk in enumerate(chunks):
        fu = (header & 0x1F) | (0x80 if k == 0 else 0) | (0x40 if k == len(chunks) - 1 else 0)
        out.append(bytes([indicator, fu]) + chunk)
    return out


class Session:
    """One client connection: RTSP requests in, interleaved RTP out after PLAY."""

    def __init__(self, conn: socket.socket, clip: list[list[bytes]], fps: int) -> None:
        self.conn, self.clip, self.fps = conn, clip, fps
        self.lock = threading.Lock()
        self.playing = threading.Event()
        self.closed = threading.Event()
        self.session_id = f"{random.getrandbits(32):08x}"

    def send(self, data: bytes) -> None:
        with self.lock:
            self.conn.sendall(data)

    def reply(self, cseq: str, extra: dict[str, str] | None = None, body: str = "",
              status: str = "200 OK") -> None:
        headers = {"CSeq": cseq, **(extra or {})}
        if body:
            headers.update({"Content-Type": "application/sdp",
                            "Content-Length": str(len(body))})
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.send(f"RTSP/1.0 {status}\r\n{head}\r\n{body}".encode())

    def sdp(self) -> str:
        sps, pps = self.clip[0][0], self.clip[0][1]
        sprop = ",".join(base64.b64encode(p).decode() for p in (sps, pps))
        return ("v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=codetr-stream replay\r\n"
                "c=IN IP4 0.0.0.0\r\nt=0 0\r\nm=video 0 RTP/AVP 96\r\n"
                "a=rtpmap:96 H264/90000\r\n"
                f"a=fmtp:96 packetization-mode=1;profile-level-id={sps[1:4].hex()};"
                f"sprop-parameter-sets={sprop}\r\na=control:trackID=0\r\n")

    def serve(self) -> None:
        buf = b""
        try:
            while not self.closed.is_set():
                data = self.conn.recv(65536)
                if not data:
                    break
                buf += data
                while buf:
                    if buf[:1] == b"$":  # interleaved RTCP from the client: skip it
                        if len(buf) < 4 or len(buf) < 4 + struct.unpack(">H", buf[2:4])[0]:
                            break
                        buf = buf[4 + struct.unpack(">H", buf[2:4])[0]:]
                        continue
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    request, buf = buf[:end].decode(errors="replace"), buf[end + 4:]
                    self.handle(request)
        except OSError:
            pass
        finally:
            self.closed.set()
            self.conn.close()

    def handle(self, request: str) -> None:
        lines = request.split("\r\n")
        method, url = lines[0].split(" ")[:2]
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in lines[1:])}
        cseq = headers.get("cseq", "0")
        if method == "OPTIONS":
            self.reply(cseq, {"Public": "OPTIONS, DESCRIBE, SETUP, PLAY, GET_PARAMETER, "
                                        "TEARDOWN"})
        elif method == "DESCRIBE":
            self.reply(cseq, {"Content-Base": url.rstrip("/") + "/"}, body=self.sdp())
        elif method == "SETUP":
            if "interleaved" not in headers.get("transport", ""):
                self.reply(cseq, status="461 Unsupported Transport")
                return
            self.reply(cseq, {"Transport": "RTP/AVP/TCP;unicast;interleaved=0-1",
                              "Session": f"{self.session_id};timeout=60"})
        elif method == "PLAY":
            self.reply(cseq, {"Session": self.session_id, "Range": "npt=0.000-"})
            if not self.playing.is_set():
                self.playing.set()
                threading.Thread(target=self.stream, daemon=True).start()
        elif method == "TEARDOWN":
            self.reply(cseq, {"Session": self.session_id})
            self.closed.set()
        else:  # GET_PARAMETER keep-alives and anything else
            self.reply(cseq, {"Session": self.session_id})

    def stream(self) -> None:
        seq, ssrc = random.getrandbits(16), random.getrandbits(32)
        start = time.monotonic()
        for n in itertools.count():
            if self.closed.is_set():
                return
            time.sleep(max(0.0, start + n / self.fps - time.monotonic()))
            au = self.clip[n % len(self.clip)]
            stamp = (n * 90000 // self.fps) & 0xFFFFFFFF
            packets = [p for nal in au for p in rtp_payloads(nal)]
            for k, payload in enumerate(packets):
                marker = 0x80 if k == len(packets) - 1 else 0
                rtp = struct.pack(">BBHII", 0x80, marker | 96, seq & 0xFFFF, stamp, ssrc)
                seq += 1
                try:
                    self.send(b"$\x00" + struct.pack(">H", len(rtp) + len(payload)) + rtp
                              + payload)
                except OSError:
                    self.closed.set()
                    return


class ReplayServer:
    """This module as a server process, from the caller's side, with the surface of
    `rtsp_server.RtspServer` (`start`, `stop`, `url`): after the first start (port 0 picks a
    free one) the port stays, so a stopped camera comes back at the same URL."""

    def __init__(self, size: str = "320x240", fps: int = 5, port: int = 0,
                 seconds: float = 10.0) -> None:
        self.size, self.fps, self.port, self.seconds = size, fps, port, seconds
        self.proc: subprocess.Popen | None = None

    def url(self, name: str) -> str:
        return f"rtsp://127.0.0.1:{self.port}/{name}"

    def start(self) -> ReplayServer:
        proc = subprocess.Popen([sys.executable, "-m", __spec__.name, "--port", str(self.port),
                                 "--size", self.size, "--fps", str(self.fps),
                                 "--seconds", str(self.seconds)],
                                stdout=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        if not line.startswith("READY"):
            proc.kill()
            proc.wait()
            proc.stdout.close()
            raise RuntimeError(f"the replay RTSP server did not start on port {self.port}: "
                               f"{line!r}")
        self.proc, self.port = proc, int(line.split()[1])
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.proc = None


def start(size: str = "320x240", fps: int = 5,
          seconds: float = 10.0) -> tuple[subprocess.Popen, int]:
    """This module as a server process on a free loopback port (every path is a camera, each
    looping the same `seconds` clip)."""
    server = ReplayServer(size, fps, seconds=seconds).start()
    return server.proc, server.port


def main() -> None:
    parser = argparse.ArgumentParser(description="Replay a generated H.264 clip over RTSP/TCP.")
    parser.add_argument("--port", type=int, default=0, help="0 (default): any free port")
    parser.add_argument("--size", default="1280x720", help="WxH")
    parser.add_argument("--fps", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length (it loops)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    clip = encode_clip(width, height, args.fps, args.seconds)
    server = socket.create_server(("127.0.0.1", args.port), backlog=128)
    print(f"READY {server.getsockname()[1]}", flush=True)
    while True:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=Session(conn, clip, args.fps).serve, daemon=True).start()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C in the terminal of `make demo` reaches it too
        sys.exit(130)
