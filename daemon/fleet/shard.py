"""Which worker serves which camera: rendezvous (highest-random-weight) hashing of stream names.

Every worker reads the same streams.yaml and computes the same assignment from its own index and
the replica count alone, so no coordinator is needed and each camera has exactly one owner. HRW is
used instead of `hash(name) % replicas` because going from N to N+1 replicas moves only the cameras
the new worker wins (about 1/(N+1) of them), not almost all of them. The hash is blake2b: Python's
`hash()` is salted per process and would give every worker a different answer.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from codetr_stream.daemon.config.schema import DaemonConfig

ENV_INDEX = "CODETR_SHARD_INDEX"
ENV_REPLICAS = "CODETR_SHARD_REPLICAS"
# A StatefulSet pod is named <statefulset>-<ordinal>; Kubernetes sets HOSTNAME to that name.
_ORDINAL = re.compile(r"-(\d+)$")


def _weight(name: str, worker: int) -> int:
    digest = hashlib.blake2b(f"{worker}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(name: str, replicas: int) -> int:
    """The index of the worker (0..replicas-1) that serves stream `name`."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    return max(range(replicas), key=lambda worker: _weight(name, worker))


def assignment(names: Iterable[str], replicas: int) -> dict[int, list[str]]:
    """Every worker index mapped to its streams, in the order given (empty workers included)."""
    table: dict[int, list[str]] = {worker: [] for worker in range(replicas)}
    for name in names:
        table[owner(name, replicas)].append(name)
    return table


def assigned_streams(names: Iterable[str], index: int, replicas: int) -> list[str]:
    """The streams worker `index` of `replicas` serves, in the order given."""
    if not 0 <= index < replicas:
        raise ValueError(f"shard index {index} is outside 0..{replicas - 1} (replicas={replicas})")
    return [name for name in names if owner(name, replicas) == index]


@dataclass(frozen=True)
class Shard:
    """This worker's place in the fleet; Shard(0, 1) serves every stream (no sharding)."""

    index: int
    replicas: int

    def streams(self, names: Iterable[str]) -> list[str]:
        return assigned_streams(names, self.index, self.replicas)

    def restrict(self, config: DaemonConfig) -> DaemonConfig:
        """`config` with only this worker's streams: apply at start and to every reloaded file,
        so reload's diff and everything downstream see just this shard."""
        if self.replicas == 1:
            return config
        mine = tuple(s for s in config.streams if owner(s.name, self.replicas) == self.index)
        return config.model_copy(update={"streams": mine})


def _int_setting(value: str, source: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{source}={value!r} is not an integer; set it to e.g. 0") from None


def resolve_shard(
    index: int | None = None,
    replicas: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Shard:
    """This worker's shard from the CLI values, else the environment, else the pod name.

    Order for the index: `--shard-index`, $CODETR_SHARD_INDEX, then the ordinal of a StatefulSet
    pod name in $HOSTNAME (codetr-stream-3 -> 3). HOSTNAME is read only when replicas > 1, so an
    unsharded daemon on a host that happens to be called `cam-box-2` still serves every stream.
    """
    env = os.environ if env is None else env
    if replicas is None:
        replicas = _int_setting(env[ENV_REPLICAS], ENV_REPLICAS) if ENV_REPLICAS in env else 1
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}; use 1 for an unsharded daemon")
    if index is None and ENV_INDEX in env:
        index = _int_setting(env[ENV_INDEX], ENV_INDEX)
    if index is None and replicas > 1:
        match = _ORDINAL.search(env.get("HOSTNAME", ""))
        if match is None:
            raise ValueError(
                f"replicas={replicas} but no shard index: pass --shard-index, set {ENV_INDEX}, "
                f"or run as a StatefulSet pod (HOSTNAME={env.get('HOSTNAME', '')!r} has no -N)"
            )
        index = int(match.group(1))
    index = 0 if index is None else index
    if not 0 <= index < replicas:
        raise ValueError(
            f"shard index {index} is outside 0..{replicas - 1}: the StatefulSet's replicas and "
            f"{ENV_REPLICAS} (or --replicas) must agree"
        )
    return Shard(index, replicas)
