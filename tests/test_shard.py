"""Sharding: each camera has exactly one worker, workers agree, and scaling moves few cameras."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from codetr_stream.daemon.fleet.shard import (
    ENV_INDEX,
    ENV_REPLICAS,
    Shard,
    assigned_streams,
    assignment,
    owner,
    resolve_shard,
)

NAMES = [f"site{i // 40}-cam{i % 40}" for i in range(1000)]


@pytest.mark.parametrize("replicas", [1, 2, 3, 5, 8])
def test_every_camera_has_exactly_one_worker(replicas: int) -> None:
    per_worker = [assigned_streams(NAMES, i, replicas) for i in range(replicas)]
    flat = [name for streams in per_worker for name in streams]
    assert sorted(flat) == sorted(NAMES)
    assert per_worker == list(assignment(NAMES, replicas).values())


def test_workers_in_other_processes_agree() -> None:
    """Python's hash() is salted per process; the assignment must not be."""
    code = (
        "import json, sys; from codetr_stream.daemon.fleet.shard import assignment;"
        "print(json.dumps(assignment(json.loads(sys.stdin.read()), 7)))"
    )
    answers = set()
    for seed in ("1", "2", "random"):
        out = subprocess.run(
            [sys.executable, "-c", code], input=json.dumps(NAMES), capture_output=True,
            text=True, check=True, env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        answers.add(out)
    assert len(answers) == 1
    assert json.loads(answers.pop()) == {str(k): v for k, v in assignment(NAMES, 7).items()}


def test_assignment_is_pinned_across_releases() -> None:
    """Workers of two releases side by side in a rolling update must still agree."""
    got = {f"cam-{i:03d}": owner(f"cam-{i:03d}", 4) for i in range(8)}
    assert got == {"cam-000": 1, "cam-001": 3, "cam-002": 1, "cam-003": 2,
                   "cam-004": 1, "cam-005": 0, "cam-006": 0, "cam-007": 0}


@pytest.mark.parametrize("replicas", range(1, 9))
def test_scaling_up_by_one_moves_about_one_share(replicas: int) -> None:
    before = {name: owner(name, replicas) for name in NAMES}
    after = {name: owner(name, replicas + 1) for name in NAMES}
    moved = [name for name in NAMES if before[name] != after[name]]
    assert len(moved) <= 1.5 * len(NAMES) / (replicas + 1)
    # Only the new worker takes cameras; nobody else's set changes.
    assert {after[name] for name in moved} <= {replicas}


@pytest.mark.parametrize("replicas", [2, 4, 8])
def test_load_is_spread_evenly(replicas: int) -> None:
    share = len(NAMES) / replicas
    for streams in assignment(NAMES, replicas).values():
        assert 0.7 * share <= len(streams) <= 1.3 * share


def test_index_comes_from_flag_then_env_then_pod_ordinal() -> None:
    env = {ENV_REPLICAS: "4", ENV_INDEX: "2", "HOSTNAME": "codetr-stream-3"}
    assert resolve_shard(1, env=env) == Shard(1, 4)
    assert resolve_shard(env=env) == Shard(2, 4)
    assert resolve_shard(env={ENV_REPLICAS: "4", "HOSTNAME": "codetr-stream-3"}) == Shard(3, 4)
    assert resolve_shard(replicas=5, env={"HOSTNAME": "codetr-stream-4"}) == Shard(4, 5)


def test_unsharded_daemon_ignores_its_hostname() -> None:
    shard = resolve_shard(env={"HOSTNAME": "cam-box-2"})
    assert shard == Shard(0, 1)
    assert shard.streams(NAMES) == NAMES


@pytest.mark.parametrize(
    ("index", "replicas", "env", "message"),
    [
        (None, 3, {"HOSTNAME": "gpu-box"}, "no shard index"),
        (None, None, {ENV_REPLICAS: "2", "HOSTNAME": "codetr-stream-2"}, "outside 0..1"),
        (None, None, {ENV_REPLICAS: "two"}, "CODETR_SHARD_REPLICAS='two' is not an integer"),
        (0, 0, {}, "replicas must be >= 1"),
    ],
)
def test_bad_shard_settings_say_what_to_fix(index, replicas, env, message) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_shard(index, replicas, env=env)


def write_config(path, names: list[str]) -> None:
    path.write_text("engine: {path: engines/tiny}\nstreams:\n" + "".join(
        f"  - name: {n}\n    url: rtsp://192.0.2.1/{n}\n" for n in names))  # never contacted


def test_restricted_configs_partition_the_streams(tmp_path) -> None:
    from codetr_stream.daemon.config.load import load_config

    write_config(tmp_path / "streams.yaml", NAMES[:60])
    config = load_config(tmp_path / "streams.yaml")
    parts = [Shard(i, 3).restrict(config) for i in range(3)]
    assert sorted(s.name for part in parts for s in part.streams) == sorted(NAMES[:60])
    assert all(part.engine == config.engine and part.publish == config.publish for part in parts)
    assert Shard(0, 1).restrict(config) is config


def test_shard_command_prints_the_assignment(tmp_path) -> None:
    config = tmp_path / "streams.yaml"
    names = [f"cam{i}" for i in range(20)]
    write_config(config, names)
    cmd = [sys.executable, "-m", "codetr_stream.daemon.cli", "shard", str(config)]
    out = json.loads(subprocess.run([*cmd, "--replicas", "3", "--from-replicas", "2", "--json"],
                                    capture_output=True, text=True, check=True).stdout)
    assert out["workers"] == {str(k): v for k, v in assignment(names, 3).items()}
    assert out["moved_from"]["streams"] == out["workers"]["2"]
    text = subprocess.run([*cmd, "--replicas", "2"], capture_output=True, text=True,
                          check=True).stdout
    assert "worker 1:" in text
    config.write_text("engine: {path: e}\nstreams:\n  - {name: cam.1, url: rtsp://h/x}\n")
    bad = subprocess.run([*cmd, "--replicas", "2"], capture_output=True, text=True)
    assert bad.returncode != 0
    assert f"{config}:3: streams[0].name" in bad.stderr


@pytest.mark.parametrize("flag", ["--replicas", "--from-replicas"])
def test_shard_command_refuses_zero_workers_in_one_line(tmp_path, flag: str) -> None:
    config = tmp_path / "streams.yaml"
    write_config(config, ["cam1"])
    args = ["--replicas", "2", flag, "0"] if flag == "--from-replicas" else [flag, "0"]
    done = subprocess.run([sys.executable, "-m", "codetr_stream.daemon.cli", "shard",
                           str(config), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"codetr-stream shard: error: argument {flag}: must be 1 or more, got 0 (see "
        "`codetr-stream shard --help`)"]
