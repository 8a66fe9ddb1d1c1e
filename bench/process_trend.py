"""A process's resources over a soak run: sampled on a thread, then the trend of their floors.

The samples are the `/metrics` numbers (`codetr_stream.daemon.monitoring.procstat`); judging
whether they creep is the soak benchmark's business (bench/soak.py, bench/soak_report.py), not
the daemon's.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from codetr_stream.daemon.monitoring.procstat import ProcessSample, sample_process


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
