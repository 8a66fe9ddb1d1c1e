"""The daemon's file-descriptor budget: what its configured limits let it hold, against
RLIMIT_NOFILE.

Cameras, subscriber connections and HTTP connections all hold fds, and running out (EMFILE)
fails camera reconnects and health probes alike. Subscribers and HTTP clients are capped
(`publish.max_subscribers`, `health.max_connections`); this module makes the rest explicit. At
start the soft limit is raised to the hard one (the usual practice since systemd 240, whose
default is 1,024 soft / 524,288 hard: nothing in the daemon uses select(), so fds above 1,024
are safe), and the budget is logged; when it does not fit, a warning says what to raise or
lower. Under systemd, LimitNOFILE sets both limits.
"""

from __future__ import annotations

import logging
import resource
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from codetr_stream.daemon.config.schema import DaemonConfig

log = logging.getLogger(__name__)

# The interpreter, torch and the engine's files, libzmq's own (two per socket and I/O thread),
# the listening sockets, log files: 40-60 measured on the CPU path; twice that for CUDA's.
BASE_FDS = 128
FDS_PER_STREAM = 8  # RTSP over TCP holds one; UDP adds an RTP/RTCP pair; FFmpeg a few more


def needed(config: DaemonConfig) -> int:
    """fds the configured limits allow the daemon to hold at once."""
    return (BASE_FDS + FDS_PER_STREAM * len(config.streams) + config.publish.max_subscribers
            + config.health.max_connections)


def ensure(config: DaemonConfig) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; warn when the budget exceeds it.
    Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # a container may forbid it
            log.debug("cannot raise RLIMIT_NOFILE to %d: %s", target, exc)
    need = needed(config)
    if need > soft:
        log.warning("fd budget: up to %d open files (%d streams, publish.max_subscribers %d, "
                    "health.max_connections %d) but RLIMIT_NOFILE is %d: raise LimitNOFILE= "
                    "(systemd) or `ulimit -n`, or lower those limits", need, len(config.streams),
                    config.publish.max_subscribers, config.health.max_connections, soft)
    else:
        log.info("fd budget: up to %d of %d open files", need, soft)
    return soft
