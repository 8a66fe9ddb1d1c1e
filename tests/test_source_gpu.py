"""NVDEC decoding (GPU machine): RTSP packets -> NV12 in device memory, the picture FFmpeg
decodes (H.264 decoding is bit-exact, so the luma planes must agree)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from codetr_stream.daemon.pipeline.decode import CpuDecoder, NvdecDecoder
from codetr_stream.daemon.pipeline.preprocess import nv12_to_rgb

REPLAY = "codetr_stream.daemon.demo.rtsp_replay"


@pytest.fixture
def camera_url():
    proc = subprocess.Popen([sys.executable, "-m", REPLAY, "--port", "0", "--size", "640x360",
                             "--seconds", "4"], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline().split()[1])
    yield f"rtsp://127.0.0.1:{port}/cam"
    proc.kill()
    proc.wait()


@pytest.mark.gpu
def test_nvdec_decodes_rtsp_to_device_memory_like_ffmpeg(camera_url) -> None:
    import av

    container = av.open(camera_url, options={"rtsp_transport": "tcp", "analyzeduration": "0",
                                             "probesize": "32"}, timeout=(5, 5))
    stream = container.streams.video[0]
    gpu = NvdecDecoder(stream, torch.device("cuda", 0))
    cpu = CpuDecoder(stream)
    ffmpeg = av.CodecContext.create("h264", "r")
    ffmpeg.extradata = stream.codec_context.extradata
    triples = []
    for packet in container.demux(stream):
        if packet.size:  # CPU first: the Annex-B filter of the NVDEC path consumes the packet
            yuv = [f.to_ndarray(format="yuv420p") for f in ffmpeg.decode(packet)]
            rgb = cpu.decode(packet)
            triples += list(zip(gpu.decode(packet), rgb, yuv, strict=False))
        if len(triples) >= 12:
            break
    container.close()
    assert len(triples) >= 12
    for nv12, rgb, yuv in triples:
        assert nv12.pixel_format == "nv12" and nv12.pixels.is_cuda
        assert (nv12.height, nv12.width) == (rgb.height, rgb.width) == (360, 640)
        luma = nv12.pixels[:360].cpu().int()
        assert (luma - torch.from_numpy(yuv[:360]).int()).abs().max() <= 1
        ours = nv12_to_rgb(nv12.pixels, 360, 640).cpu().int()
        # Colour conversions differ at hard chroma edges (subsampling); the bulk agrees.
        assert (ours - rgb.pixels.int()).abs().float().median() <= 3


@pytest.mark.gpu
def test_decoders_rebuilt_on_one_stream_reuse_its_memory(camera_url) -> None:
    """Every reconnect rebuilds the camera's decoder. On the camera's one CUDA stream the new
    pictures come from the same allocator pool; a stream per decoder left each pool's blocks
    reserved (+20 MB per reconnect in the GPU soak). The control with fresh streams shows the
    measure can see that growth."""
    import av

    device = torch.device("cuda", 0)

    def decode_some(cuda_stream: torch.cuda.Stream) -> None:
        container = av.open(camera_url, options={"rtsp_transport": "tcp", "analyzeduration": "0",
                                                 "probesize": "32"}, timeout=(5, 5))
        stream = container.streams.video[0]
        decoder = NvdecDecoder(stream, device, cuda_stream)
        pictures = 0
        for packet in container.demux(stream):
            pictures += len(decoder.decode(packet))  # dropped at once
            if pictures >= 6:
                break
        container.close()
        assert pictures >= 6

    shared = torch.cuda.Stream(device)
    decode_some(shared)
    reserved = torch.cuda.memory_reserved(device)
    for _ in range(3):
        decode_some(shared)
    assert torch.cuda.memory_reserved(device) == reserved
    for _ in range(3):
        decode_some(torch.cuda.Stream(device))
    assert torch.cuda.memory_reserved(device) > reserved
