"""The soak benchmark's process sampler records over time, and its trend tells a leak from a
plateau (bench/process_trend.py)."""

from __future__ import annotations

import itertools
import time

import pytest
from codetr_stream.daemon.monitoring.procstat import ProcessSample
from process_trend import ProcessSampler, trend


def test_sampler_records_over_time_and_once_more_at_exit() -> None:
    with ProcessSampler(interval_s=0.02) as sampler:
        deadline = time.monotonic() + 30  # a wait on the samples, not on the clock: loaded CI
        while len(sampler.samples) < 4:
            assert time.monotonic() < deadline, "the sampler took no samples"
            time.sleep(0.02)
    samples = sampler.samples
    assert len(samples) >= 5
    assert all(b.time_s > a.time_s for a, b in itertools.pairwise(samples))
    assert samples[-1].rss_bytes > 0 and samples[-1].open_fds > 0
    assert samples[-1].threads >= 1


def fake(t: float, rss: int, fds: int = 10, threads: int = 4) -> ProcessSample:
    return ProcessSample(t, rss, fds, threads, None, None)


def test_trend_ignores_warmup_and_single_spikes() -> None:
    warmup = [fake(t, 100 + 50 * t) for t in range(10)]  # growth while warming up
    steady = [fake(t, 1000) for t in range(10, 40)]
    steady[-2] = fake(38, 5000)  # one sample mid-batch
    result = trend(warmup + steady, warmup_s=10)
    assert result.rss_growth == 0 and result.fd_delta == 0 and result.thread_delta == 0
    assert result.gpu_growth is None


def test_trend_is_not_set_by_one_low_sample() -> None:
    # The CPU path: RSS swings between batches; one sample caught memory at its lowest early on.
    samples = [fake(t, 1000 + 400 * (t % 3)) for t in range(90)]
    samples[7] = fake(7, 850)
    result = trend(samples, warmup_s=5)
    assert result.rss_growth == 0


def test_trend_sees_a_leak() -> None:
    samples = [fake(t, 1000 + 2 * t, fds=10 + t // 10, threads=4 + t // 10) for t in range(60)]
    result = trend(samples, warmup_s=5)
    assert result.rss_growth > 0.05
    assert result.fd_delta == 4 and result.thread_delta == 4


def test_trend_ignores_fds_and_threads_of_a_reconnect_in_progress() -> None:
    # Every 8 samples a reconnect holds 2 more fds and a thread for 3 samples: no leak, though
    # the last samples catch a reconnect and the first ones do not.
    samples = [fake(t, 1000, fds=12 if t % 8 < 3 else 10, threads=5 if t % 8 < 3 else 4)
               for t in range(60)]
    result = trend(samples, warmup_s=5)
    assert result.fd_delta == 0 and result.thread_delta == 0


def test_trend_needs_enough_samples() -> None:
    with pytest.raises(ValueError, match="run longer"):
        trend([fake(t, 1000) for t in range(8)], warmup_s=0)


def test_trend_sees_device_memory_that_torch_does_not() -> None:
    # torch's allocator flat, the device's memory in use creeping (decoder surfaces, say).
    samples = [ProcessSample(t, 1000, 10, 4, 500, 400, 2000 + 10 * t) for t in range(60)]
    result = trend(samples, warmup_s=5)
    assert result.gpu_growth == 0
    assert result.gpu_used_growth is not None and result.gpu_used_growth > 0.1
