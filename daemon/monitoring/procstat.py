"""What the process holds: RSS, open fds, threads and GPU memory, sampled cheaply from /proc.

One sampler for both the `/metrics` gauges and the soak benchmark (bench/process_trend.py samples
with it over time and judges the trend), so a leak seen in a soak run is the same number an
operator graphs in production.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["ProcessSample", "gpu_device_used", "gpu_memory", "sample_process"]


@dataclass(frozen=True)
class ProcessSample:
    """One reading. GPU fields are None where CUDA is not in use by this process."""

    time_s: float  # time.monotonic()
    rss_bytes: int
    open_fds: int
    threads: int
    gpu_reserved_bytes: int | None  # torch's caching allocator, all devices
    gpu_allocated_bytes: int | None  # live tensors, all devices
    gpu_used_bytes: int | None = None  # in use on those devices, by anything (gpu_device_used)

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def _status_fields(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def gpu_memory() -> dict[int, tuple[int, int]]:
    """device -> (reserved, allocated) bytes from torch's allocator.

    Empty unless torch is already imported and CUDA initialized: sampling must neither import
    torch nor create a CUDA context. Memory outside torch's allocator (the CUDA context,
    NVDEC surfaces) shows in `nvidia-smi`, not here.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return {}
    return {
        device: (torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device))
        for device in range(torch.cuda.device_count())
    }


def gpu_device_used() -> int | None:
    """Bytes in use (total - free) on the GPUs where torch holds memory, or None without CUDA.

    Device-wide, so it also sees what torch's allocator cannot: the CUDA context, NVDEC
    surfaces, CUDA graph pools of other libraries, other processes. A decoder that leaks its
    surfaces on every reconnect grows this number and no other. It asks the driver
    (cudaMemGetInfo): not while another thread captures a CUDA graph on the device (the daemon
    captures only while loading its engines, before /metrics serves).
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    used = 0
    for device in range(torch.cuda.device_count()):
        if torch.cuda.memory_reserved(device):  # only devices with a context: asking creates one
            free, total = torch.cuda.mem_get_info(device)
            used += total - free
    return used or None


def sample_process(pid: int | None = None) -> ProcessSample:
    """Read /proc for `pid` (this process by default; GPU fields only for this process)."""
    own = pid is None or pid == os.getpid()
    pid = os.getpid() if pid is None else pid
    status = _status_fields(pid)
    gpu = gpu_memory() if own else {}
    return ProcessSample(
        time_s=time.monotonic(),
        rss_bytes=int(status["VmRSS"].split()[0]) * 1024,
        open_fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(status["Threads"]),
        gpu_reserved_bytes=sum(r for r, _ in gpu.values()) if gpu else None,
        gpu_allocated_bytes=sum(a for _, a in gpu.values()) if gpu else None,
        gpu_used_bytes=gpu_device_used() if own else None,
    )
