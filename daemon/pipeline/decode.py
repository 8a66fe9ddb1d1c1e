"""Video decoders behind one interface: NVDEC into GPU memory, or FFmpeg on the CPU.

The source demuxes with PyAV and hands each compressed packet to `decode`. On a GPU the packets
go to PyNvVideoCodec's NVDEC decoder as Annex-B (through the `h264_mp4toannexb` /
`hevc_mp4toannexb` filter) and the NV12 picture stays in device memory, so pixels never cross
PCIe. Without a GPU (CI, laptops) PyAV decodes and converts to RGB on the CPU.

A decoder is rebuilt when the stream changes under it: a new codec (handled by the source, which
makes a new decoder per connection) or a new picture size mid-stream (handled here).
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

import torch

log = logging.getLogger(__name__)

NVDEC_CODECS = ("h264", "hevc")
START_CODE = b"\x00\x00\x00\x01"


class UnsupportedStream(ValueError):
    """A stream the decoder cannot handle (no video, or a codec NVDEC is not set up for)."""


@dataclass
class Picture:
    """One decoded picture, before it becomes a `Frame` (the source adds name and index)."""

    pixels: torch.Tensor  # uint8, owned (safe to keep after the next decode call)
    pixel_format: str  # "rgb24" (H, W, 3) or "nv12" (H * 3 // 2, W)
    height: int
    width: int
    pts: float | None


class Decoder(Protocol):
    codec: str

    def decode(self, packet) -> list[Picture]: ...


def _seconds(pts: int | None, time_base: Fraction | None) -> float | None:
    return None if pts is None or time_base is None else float(pts * time_base)


class CpuDecoder:
    """FFmpeg software decoding through PyAV, converted to packed RGB on the CPU."""

    def __init__(self, stream) -> None:
        import av

        self.codec = stream.codec_context.name
        self._time_base = stream.time_base
        # A private context (not the demuxer's) so a rebuild starts from a clean state.
        self._ctx = av.CodecContext.create(self.codec, "r")
        if stream.codec_context.extradata:
            self._ctx.extradata = stream.codec_context.extradata
        self._ctx.thread_count = 1  # one thread per stream; many streams share few cores
        self._size: tuple[int, int] | None = None

    def decode(self, packet) -> list[Picture]:
        pictures = []
        for frame in self._ctx.decode(packet):
            size = (frame.height, frame.width)
            if self._size is not None and size != self._size:
                log.info("picture size changed %dx%d -> %dx%d", self._size[1], self._size[0],
                         size[1], size[0])
            self._size = size
            rgb = torch.from_numpy(frame.to_ndarray(format="rgb24"))
            pts = frame.pts if frame.pts is not None else packet.pts
            pictures.append(Picture(rgb, "rgb24", frame.height, frame.width,
                                    _seconds(pts, self._time_base)))
        return pictures


class NvdecDecoder:
    """NVDEC via PyNvVideoCodec: Annex-B packets in, NV12 device tensors out.

    `cuda_stream` is where NVDEC works and the pictures are allocated. A camera passes the same
    one to every decoder it rebuilds: the caching allocator keeps a pool per stream, so a fresh
    stream per reconnect leaves the previous pool's blocks reserved (seen in the GPU soak: +20 MB
    per reconnect, until torch's 32 pooled streams came round again).
    """

    def __init__(self, stream, device: torch.device,
                 cuda_stream: torch.cuda.Stream | None = None) -> None:
        import av
        import PyNvVideoCodec as nvc

        self.codec = stream.codec_context.name
        if self.codec not in NVDEC_CODECS:
            raise UnsupportedStream(f"codec {self.codec!r}: NVDEC decoding is set up for "
                                    f"{', '.join(NVDEC_CODECS)}")
        self._nvc = nvc
        self._device = device
        self._time_base = stream.time_base
        self._cuda_stream = cuda_stream or torch.cuda.Stream(device=device)
        self._bsf = av.bitstream.BitStreamFilterContext(f"{self.codec}_mp4toannexb", stream)
        extradata = stream.codec_context.extradata or b""
        # RTSP gives parameter sets out of band (SDP) as Annex-B extradata, which the filter
        # passes through untouched: NVDEC must see them before the first picture.
        self._prefix = extradata if extradata.startswith((START_CODE, START_CODE[1:])) else b""
        self._decoder = None
        self._size: tuple[int, int] | None = None

    def _build(self) -> None:
        nvc = self._nvc
        codec = {"h264": nvc.cudaVideoCodec.H264, "hevc": nvc.cudaVideoCodec.HEVC}[self.codec]
        self._decoder = nvc.CreateDecoder(
            gpuid=self._device.index or 0, codec=codec, usedevicememory=True,
            cudastream=self._cuda_stream.cuda_stream,
            latency=nvc.DisplayDecodeLatencyType.LOW)

    def decode(self, packet) -> list[Picture]:
        pictures = []
        for annexb in self._bsf.filter(packet):
            data = bytes(annexb)
            if self._decoder is None:
                if not annexb.is_keyframe:
                    continue  # a fresh decoder starts at a keyframe
                self._build()
                data = self._prefix + data
            try:
                pictures += self._decode_bytes(data, annexb.pts)
            except RuntimeError as exc:
                # NVDEC cannot reconfigure past the size it was created for: start over at the
                # next keyframe with a decoder sized for the new stream.
                log.warning("NVDEC decode failed (%s); rebuilding the decoder", exc)
                self._decoder = None
        return pictures

    def _decode_bytes(self, data: bytes, pts: int | None) -> list[Picture]:
        buf = ctypes.create_string_buffer(data, len(data))
        pkt = self._nvc.PacketData()
        pkt.bsl_data = ctypes.addressof(buf)
        pkt.bsl = len(data)
        # One packet is one picture (the demuxer's access unit): with LOW latency this makes
        # NVDEC hand the picture out now instead of after the next packet arrives.
        pkt.decode_flag = self._nvc.VideoPacketFlag.ENDOFPICTURE
        if pts is not None:
            pkt.pts = int(pts)
        pictures = []
        with torch.cuda.stream(self._cuda_stream):
            for frame in self._decoder.Decode(pkt):
                # Own the pixels: the decoder reuses its surfaces on the next call.
                nv12 = torch.from_dlpack(frame).clone()
                height, width = nv12.shape[0] * 2 // 3, nv12.shape[1]
                if self._size is not None and (height, width) != self._size:
                    log.info("picture size changed %dx%d -> %dx%d", self._size[1],
                             self._size[0], width, height)
                self._size = (height, width)
                ts = getattr(frame, "timestamp", None)
                pictures.append(Picture(nv12, "nv12", height, width,
                                        _seconds(ts if ts is not None else pts,
                                                 self._time_base)))
        self._cuda_stream.synchronize()
        return pictures


def make_decoder(stream, device: torch.device,
                 cuda_stream: torch.cuda.Stream | None = None) -> Decoder:
    """The decoder for `stream` on `device`: NVDEC on CUDA devices (on `cuda_stream`), FFmpeg
    on the CPU."""
    if stream.type != "video":
        raise UnsupportedStream(f"stream of type {stream.type!r} is not video")
    if device.type == "cuda":
        return NvdecDecoder(stream, device, cuda_stream)
    return CpuDecoder(stream)
