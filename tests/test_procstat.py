"""The process sample reads real /proc values (the soak's sampler and trend: test_soak_trend)."""

from __future__ import annotations

import subprocess
import sys

from codetr_stream.daemon.monitoring.procstat import sample_process


def test_sample_of_another_process_sees_its_fds_and_threads() -> None:
    code = (
        "import threading, time, os\n"
        "fds = [os.open('/dev/null', os.O_RDONLY) for _ in range(40)]\n"
        "ts = [threading.Thread(target=time.sleep, args=(30,), daemon=True) for _ in range(5)]\n"
        "[t.start() for t in ts]\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        sample = sample_process(child.pid)
    finally:
        child.kill()
        child.wait()
    assert sample.open_fds >= 43  # stdin/out/err + 40
    assert sample.threads >= 6
    assert sample.rss_bytes > 1 << 20
    assert sample.gpu_reserved_bytes is None
