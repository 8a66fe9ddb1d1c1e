"""What the process holds: RSS, open fds, threads and GPU memory, sampled cheaply from /proc.

One sampler for both the `/metrics` gauges and the soak benchmark, so a leak seen in a soak
run is the same number an operator graphs in production.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["ProcessSample", "ProcessSampler", "Trend", "gpu_device_used", "gpu_memory",
           "sample_process", "trend"]


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


class ProcessSampler:
    """Samples a process every `interval_s` on a daemon thread (for soak runs)."""

    def __init__(self, interval_s: float, pid: int | None = None) -> None:
        self.interval_s = interval_s
        self.pid = pid
        self.samples: list[ProcessSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(sample_process(self.pid))
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(sample_process(self.pid))


@dataclass(frozen=True)
class Trend:
    """Growth between the first and last window after warm-up."""

    rss_growth: float  # relative, 0.01 = 1 %
    gpu_growth: float | None  # torch's reserved memory
    fd_delta: int
    thread_delta: int
    gpu_used_growth: float | None = None  # the devices' memory in use (gpu_device_used)


def low_floor(values: list[int]) -> int:
    """The 10th percentile: a floor that one unusually low sample cannot set (a window's
    minimum can: in a 20-minute CPU soak the RSS minima of its thirds were 870 / 902 / 969 MB
    while their 10th percentiles were 1030 / 1013 / 1032 MB). Windows of under 10 samples
    get their minimum."""
    return sorted(values)[len(values) // 10]


def trend(samples: list[ProcessSample], warmup_s: float) -> Trend:
    """Compare the floors of the first and last third of the samples taken after `warmup_s`:
    memory by `low_floor`, fds and threads (exact counts, where one leaked shows) by the minimum.

    What a leak raises is the floor; work in flight only adds peaks that fall back: a batch's
    activations (on the CPU path RSS swings by half a gigabyte between batches and most samples
    land mid-batch: medians moved 5 % in a 36 s CI soak with no leak), a reconnect's socket and
    thread. A third of a soak spans several churn cycles, so both floors see an outage.
    """
    start = samples[0].time_s + warmup_s
    steady = [s for s in samples if s.time_s >= start]
    window = max(5, len(steady) // 3)
    if len(steady) < 2 * window:
        raise ValueError(
            f"need at least {2 * window} samples after the {warmup_s:g} s warm-up, got "
            f"{len(steady)}: run longer or sample more often"
        )
    head, tail = steady[:window], steady[-window:]

    def growth(field: str) -> float:
        return (low_floor([getattr(s, field) for s in tail])
                / low_floor([getattr(s, field) for s in head]) - 1.0)

    def floor_delta(field: str) -> int:
        return min(getattr(s, field) for s in tail) - min(getattr(s, field) for s in head)

    has_gpu = all(s.gpu_reserved_bytes for s in head + tail)
    has_used = all(s.gpu_used_bytes for s in head + tail)
    return Trend(
        rss_growth=growth("rss_bytes"),
        gpu_growth=growth("gpu_reserved_bytes") if has_gpu else None,
        fd_delta=floor_delta("open_fds"),
        thread_delta=floor_delta("threads"),
        gpu_used_growth=growth("gpu_used_bytes") if has_used else None,
    )
