"""Broken streams.yaml files of every kind an operator (or an attacker with write access to the
config) can produce: wrong types, out-of-range values, odd names and schemes, bad ports, bombs,
binary, recursion, deep nesting, huge files, files that are not files. Each must give one-line
`file[:line]: [field: ]message[ (hint: ...)]` problems (or be accepted), never a traceback, and
within 2 s; checked through `load_config` and through the `check-config` command in
subprocesses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from codetr_stream.compile.engines.manifest import Manifest
from codetr_stream.daemon.config.load import ConfigError, load_config
from codetr_stream.daemon.config.yaml_reader import MAX_BYTES

LIMIT_S = 2.0
HEAD = "engine: {path: e}\n"
CAM = "streams:\n  - name: cam1\n    url: rtsp://192.0.2.1/live\n"


def stream(**fields: str) -> str:
    """A streams.yaml whose one stream has these raw YAML values (name and url by default)."""
    entry = {"name": "cam1", "url": "rtsp://192.0.2.1/live", **fields}
    return HEAD + "streams:\n  - " + "\n    ".join(f"{k}: {v}" for k, v in entry.items()) + "\n"


def bomb(levels: int, where: str = "x") -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return HEAD + "\n".join(lines) + f"\n{where}: *a{levels - 1}\n"


# name -> (file content: str, bytes or None for "made by the test", expected: "ok" or a
# substring of the first problem). {tmp} is the test's directory.
CASES: dict[str, tuple[str | bytes | None, str]] = {
    # -- the document's shape --
    "empty file": ("", "engine: required, missing"),
    "only comments": ("# nothing here\n", "engine: required, missing"),
    "a list": ("- engine\n", "must be a mapping"),
    "a scalar": ("just text\n", "must be a mapping"),
    "two documents": (HEAD + "---\n" + HEAD, "invalid YAML"),
    "syntax error": (HEAD + "streams: [\n", "invalid YAML"),
    "tab indentation": ("engine:\n\tpath: e\n", "invalid YAML"),
    "duplicate key": ("engine: {path: e}\nengine: {path: f}\n", "duplicate key"),
    "unknown section": (HEAD + "bogus: 1\n", "unknown key"),
    "unknown stream key": (stream(nmae="x"), "did you mean 'name'"),
    "yes as a key": (HEAD + "yes: 1\n", "reads as a boolean"),
    "integer key": (HEAD + "1: x\n", "reads as an integer"),
    "null key": (HEAD + "~: x\n", "reads as null"),
    "list as key": (HEAD + "? [a, b]\n: 1\n", "a list as a key"),
    "mapping as key": (HEAD + "? {a: 1}\n: 1\n", "a mapping as a key"),
    "python tag": (HEAD + "x: !!python/object/apply:os.system [id]\n", "not supported here"),
    "python scalar tag": (HEAD + "x: !!python/name:os.system ''\n", "cannot read this value"),
    "unknown tag": (HEAD + "x: !secret abc\n", "cannot read this value"),
    "set tag": (HEAD + "x: !!set {a, b}\n", "not supported here"),
    "binary value": (stream(name="!!binary aGVsbG8="), "ok"),  # bytes of "hello": a name
    "undefined alias": (HEAD + "x: *nothing\n", "invalid YAML"),
    "recursive alias": (HEAD + "x: &a [1, *a]\n", "recursive alias"),
    "recursive mapping alias": (HEAD + "x: &a {b: *a}\n", "recursive alias"),
    "recursive merge": (HEAD + "x: &a {<<: *a}\n", "recursive alias"),
    "merge of a scalar": (HEAD + "x: {<<: 1}\n", "merges mappings only"),
    "alias bomb": (bomb(6), "more than 50,000 values once aliases are expanded"),
    "alias bomb in streams": (bomb(6, "streams"), "more than 50,000 values once aliases"),
    "alias bomb in a key's value": (bomb(7, "engine"), "more than 50,000 values once"),
    "merge-key bomb": (HEAD + "a0: &a0 {k0: 1, k1: 1, k2: 1}\n" + "".join(
        f"a{i}: &a{i} {{<<: [*a{i - 1}, *a{i - 1}, *a{i - 1}]}}\n" for i in range(1, 14)),
        "more than 50,000 values once aliases"),
    "deep list nesting": (HEAD + "x: " + "[" * 5000 + "]" * 5000 + "\n", "nest"),
    "deep mapping nesting": (HEAD + "x: " + "{a: " * 40 + "1" + "}" * 40 + "\n", "nested deeper"),
    "deep block nesting": (HEAD + "".join(f"{'  ' * i}k{i}:\n" for i in range(40)),
                           "nested deeper"),
    "nesting through aliases": (HEAD + "a0: &a0 [" + "[" * 30 + "]" * 30 + "]\n" + "".join(
        f"a{i}: &a{i} [" + "[" * 20 + f"*a{i - 1}" + "]" * 20 + "]\n" for i in range(1, 4)),
        "nested deeper than 32 levels"),
    "huge integer": (HEAD + "x: " + "9" * 5000 + "\n", "cannot read this value"),
    "many values": (HEAD + "x: [" + "1," * 60_000 + "1]\n", "more than 50,000 values"),
    "over the size limit": ("#" * (MAX_BYTES + 1), "larger than 1024 KiB"),
    "long scalar": (HEAD + "x: " + "a" * (MAX_BYTES - 100) + "\n", "unknown key"),
    # -- bytes that are not YAML text --
    "not UTF-8": (HEAD.encode() + b"streams: []\n\xff\n", "not UTF-8 text"),
    "latin-1 password": (HEAD.encode() + b"x: caf\xe9\n", "not UTF-8 text"),
    "UTF-16": ((HEAD + CAM).encode("utf-16"), "not UTF-8 text"),
    "NUL byte": (HEAD + "x: a\x00b\n", "control character U+0000"),
    "escape character": (HEAD + "x: \x1b[31m\n", "control character U+001B"),
    "random bytes": (bytes(range(256)) * 8, "not UTF-8 text"),
    "gzip file": (b"\x1f\x8b\x08\x00" + bytes(100), "not UTF-8 text"),
    "UTF-8 BOM": (("\ufeff" + HEAD + CAM).encode(), "ok"),
    # -- wrong types and values with no sane meaning --
    "engine a list": ("engine: [e]\n", "valid dictionary"),
    "engine.path a number": ("engine: {path: 5}\n", "valid path"),
    "engine.device bogus": ("engine: {path: e, device: tpu}\n", "'auto', 'cuda' or 'cpu'"),
    "gpus negative": ("engine: {path: e, gpus: [-1]}\n", "greater than or equal to 0"),
    "gpus huge": ("engine: {path: e, gpus: [99999999999999999999]}\n", "less than or equal"),
    "max_batch zero": (HEAD + "batching: {max_batch: 0}\n", "greater than or equal to 1"),
    "max_wait_ms nan": (HEAD + "batching: {max_wait_ms: .nan}\n", "finite number"),
    "sndhwm huge": (HEAD + "publish: {sndhwm: 10000000000}\n", "less than or equal to 100000"),
    "sndhwm negative": (HEAD + "publish: {sndhwm: -5}\n", "greater than or equal to 1"),
    "status interval inf": (HEAD + "publish: {status_interval_s: .inf}\n", "finite number"),
    "status interval tiny": (HEAD + "publish: {status_interval_s: 1e-9}\n", "greater than"),
    "endpoint bogus scheme": (HEAD + "publish: {endpoint: 'udp://1.2.3.4:5'}\n", "use tcp://"),
    "endpoint no port": (HEAD + "publish: {endpoint: 'tcp://127.0.0.1'}\n", "port 1-65535"),
    "endpoint port 99999": (HEAD + "publish: {endpoint: 'tcp://127.0.0.1:99999'}\n", "1-65535"),
    "endpoint host:notaport": (HEAD + "publish: {endpoint: 'tcp://host:notaport'}\n", "1-65535"),
    "endpoint ipc over a file": (HEAD + "publish: {endpoint: 'ipc://{tmp}/victim'}\n",
                                 "exists and is not a socket"),
    "health port 99999": (HEAD + "health: {port: 99999}\n", "less than or equal to 65535"),
    "health port -1": (HEAD + "health: {port: -1}\n", "greater than or equal to 0"),
    "health port text": (HEAD + "health: {port: http}\n", "valid integer"),
    "health host a list": (HEAD + "health: {host: [a]}\n", "valid string"),
    "jpeg quality 500": (HEAD + "snapshot: {jpeg_quality: 500}\n", "less than or equal to 95"),
    "open timeout inf": (HEAD + "reconnect: {open_timeout_s: .inf}\n", "finite number"),
    "read timeout nan": (HEAD + "reconnect: {read_timeout_s: .nan}\n", "finite number"),
    "read timeout a year": (HEAD + "reconnect: {read_timeout_s: 31536000}\n", "less than"),
    "stall timeout negative": (HEAD + "reconnect: {stall_timeout_s: -1}\n", "greater than"),
    "backoff 1e-9": (HEAD + "reconnect: {backoff_initial_s: 1e-9}\n", "greater than or equal"),
    "backoff multiplier 1e100": (HEAD + "reconnect: {backoff_multiplier: 1e100}\n", "less than"),
    "backoff max 1e300": (HEAD + "reconnect: {backoff_max_s: 1e300}\n", "less than"),
    "backoff jitter 5": (HEAD + "reconnect: {backoff_jitter: 5}\n", "less than or equal to 1"),
    "backoff order": (HEAD + "reconnect: {backoff_initial_s: 9, backoff_max_s: 1}\n",
                      "must not exceed"),
    "pid_file over a file": (HEAD + "pid_file: {tmp}/victim\n", "exists and is not a pid file"),
    "pid_file a directory": (HEAD + "pid_file: {tmp}\n", "exists and is not a pid file"),
    "pid_file a symlink": (HEAD + "pid_file: {tmp}/link\n", "exists and is not a pid file"),
    "pid_file stale": (HEAD + "pid_file: {tmp}/stale.pid\n", "ok"),
    # -- streams --
    "streams a mapping": (HEAD + "streams: {cam1: rtsp://h/}\n", "valid tuple"),
    "stream a scalar": (HEAD + "streams: [cam1]\n", "valid dictionary"),
    "name with a space": (stream(name="'bad name!'"), "letters, digits, '_' or '-'"),
    "name with a dot": (stream(name="cam.1"), "letters, digits, '_' or '-'"),
    "name with a pipe": (stream(name="'a|b'"), "letters, digits, '_' or '-'"),
    "name 65 characters": (stream(name="c" * 65), "letters, digits, '_' or '-'"),
    "name empty": (stream(name="''"), "letters, digits, '_' or '-'"),
    "name a number": (stream(name="5"), "valid string"),
    "name a date": (stream(name="2024-01-01"), "valid string"),
    "name from /etc/passwd": (stream(name="'${file:/etc/passwd}'"), "not shown"),
    "name from an unset variable": (stream(name="'${CODETR_FUZZ_UNSET}'"), "is not set"),
    "relative secret file": (stream(url="'rtsp://u:${file:pw}@h/'"), "must be absolute"),
    "secret from /dev/zero": (stream(url="'rtsp://u:${file:/dev/zero}@h/'"), "regular file"),
    "bad reference": (stream(url="'rtsp://u:${bad name}@h/'"), "not a variable name"),
    "duplicate names": (HEAD + "streams:\n" + "  - {name: a, url: 'rtsp://h/'}\n" * 2,
                        "duplicate stream name"),
    "url ftp": (stream(url="ftp://h/x"), "unsupported scheme"),
    "url http": (stream(url="http://h/x"), "unsupported scheme"),
    "url javascript": (stream(url="'javascript:alert(1)'"), "unsupported scheme"),
    "url no scheme": (stream(url="camera1"), "unsupported scheme"),
    "url empty": (stream(url="''"), "unsupported scheme"),
    "url no host": (stream(url="'rtsp:///live'"), "no host"),
    "url host:notaport": (stream(url="'rtsp://cam:notaport/live'"), "1-65535"),
    "url port 99999": (stream(url="'rtsp://cam:99999/live'"), "1-65535"),
    "url port 0": (stream(url="'rtsp://cam:0/live'"), "1-65535"),
    "url unescaped @": (stream(url="'rtsp://admin:p@ss@cam/live'"), "%40"),
    "url password with /": (stream(url="'rtsp://admin:pa/ss@cam/live'"), "%2F"),
    "url password with #": (stream(url="'rtsp://admin:pa#ss@cam/live'"), "%23"),
    "url password with ?": (stream(url="'rtsp://admin:pa?ss@cam/live'"), "%3F"),
    "url with a space": (stream(url="'rtsp://cam/my live'"), "percent-encoded"),
    "url with a newline": (stream(url='"rtsp://cam/live\\nx"'), "percent-encoded"),
    "file url no path": (stream(url="'file://'"), "needs a path"),
    "transport quic": (stream(transport="quic"), "'tcp' or 'udp'"),
    "max_fps negative": (stream(max_fps="-1"), "greater than or equal to 0.01"),
    "max_fps inf": (stream(max_fps=".inf"), "finite number"),
    "classes empty": (stream(classes="[]"), "at least 1 item"),
    "classes unknown": (stream(classes="[persn]"), "did you mean 'person'"),
    "classes nested": (stream(classes="[[person]]"), "valid string"),
    "min_score 2": (stream(min_score="2"), "less than or equal to 1"),
    "roi two points": (stream(roi="{points: [[0, 0], [1, 1]]}"), "at least 3 items"),
    "roi collinear": (stream(roi="{points: [[0, 0], [0.5, 0.5], [1, 1]]}"), "no area"),
    "roi out of frame": (stream(roi="{points: [[0, 0], [2, 0], [1, 1]]}"), "less than or equal"),
    # -- not a file --
    "a directory": (None, "cannot read"),
    "missing": (None, "cannot read"),
    "a FIFO": (None, "not a regular file"),
    "a device": (None, "not a regular file"),
    "a symlink loop": (None, "cannot read"),
    # -- accepted --
    "minimal": (HEAD, "ok"),
    "one camera": (HEAD + CAM, "ok"),
    "merge keys": (HEAD + "streams:\n  - &a {name: a, url: 'rtsp://h/', min_score: 0.5}\n"
                   "  - {<<: *a, name: b, min_score: 0.7}\n", "ok"),
    "anchors reused": (HEAD + "streams:\n  - {name: a, url: &u 'rtsp://h/', classes: &c [car]}\n"
                       "  - {name: b, url: *u, classes: *c}\n", "ok"),
    "1000 cameras": (HEAD + "streams:\n" + "".join(
        f"  - name: cam{i}\n    url: rtsp://viewer:pw@10.0.{i // 250}.{i % 250}:554/ch/101\n"
        f"    min_score: 0.4\n    classes: [person, car]\n" for i in range(1000)), "ok"),
    "unicode in comments": ("# caméra d'entrée\n" + HEAD + CAM, "ok"),
    "percent-encoded password": (stream(url="'rtsp://admin:p%40ss%2F%23@cam:554/live'"), "ok"),
    "ipv6 camera": (stream(url="'rtsp://[2001:db8::1]:554/live'"), "ok"),
    "zeromq wildcard port": (HEAD + "publish: {endpoint: 'tcp://127.0.0.1:*'}\n", "ok"),
}


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Every case as a file (or non-file) in tmp_path: name -> (path, expected)."""
    (tmp_path / "victim").write_text("precious data, not a pid\n")
    (tmp_path / "stale.pid").write_text("999999999\n")
    (tmp_path / "link").symlink_to(tmp_path / "victim")
    cases = tmp_path / "cases"
    cases.mkdir()
    # HEAD's engine (`e`, beside the files): a manifest this machine can run, so that a valid file
    # checks OK (exit 0) instead of "run would refuse: engine" (exit 3).
    (cases / "e").mkdir()
    Manifest(backend="eager", precision="fp32", input_hw=(256, 320), batch_sizes=[1],
             config_name="tiny", config={}, class_names=[], random_weights=True,
             seed=0).save(cases / "e")
    out = {}
    for i, (name, (content, expected)) in enumerate(CASES.items()):
        path = cases / f"case{i:03d}.yaml"
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content.replace("{tmp}", str(tmp_path)))
        out[name] = (path, expected)
    out["a directory"] = (tmp_path, out["a directory"][1])
    os.mkfifo(out["a FIFO"][0])
    out["a device"] = (Path("/dev/zero"), out["a device"][1])
    loop = out["a symlink loop"][0]
    loop.symlink_to(loop)
    return out


def test_the_corpus_has_the_kinds_the_issue_asks_for() -> None:
    assert len(CASES) >= 58
    assert sum(expected == "ok" for _, expected in CASES.values()) >= 5


def test_every_broken_config_is_a_one_line_problem_within_2s(corpus, monkeypatch) -> None:
    monkeypatch.delenv("CODETR_FUZZ_UNSET", raising=False)
    slow, wrong = {}, {}
    for name, (path, expected) in corpus.items():
        started = time.perf_counter()
        try:
            load_config(path)
            outcome = "ok"
        except ConfigError as exc:
            outcome = str(exc)
            assert all(one_line(path, line) for line in outcome.splitlines()), (name, outcome)
        if (took := time.perf_counter() - started) > LIMIT_S:
            slow[name] = round(took, 2)
        if expected not in outcome.splitlines()[0] if expected != "ok" else outcome != "ok":
            wrong[name] = outcome[:300]
    assert not wrong, wrong
    assert not slow, f"over {LIMIT_S} s: {slow}"


def one_line(path: Path, line: str) -> bool:
    """`file[:line]: [field: ]message[ (hint: ...)]`, with nothing of /etc/passwd in it."""
    return bool(re.fullmatch(rf"{re.escape(str(path))}(:\d+)?: \S.*", line)) \
        and "root:x:0" not in line


# Runs `codetr-stream check-config` on every file in one interpreter (what the console script
# calls, argv to exit code), each with its stdout and stderr, exit code, time and any traceback.
BATCH = """
import contextlib, io, json, sys, time, traceback
import torch  # the engine check of the first valid file imports it: once, not any file's cost
from codetr_stream.daemon.cli import main
for path in sys.argv[1:]:
    out, err, started = io.StringIO(), io.StringIO(), time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["check-config", path])
        except BaseException:
            code, err = "traceback", io.StringIO(traceback.format_exc())
    print(json.dumps({"path": path, "code": code, "out": out.getvalue(), "err": err.getvalue(),
                      "s": time.perf_counter() - started}), flush=True)
"""


@pytest.mark.slow
def test_check_config_command_gives_one_line_errors_for_the_whole_corpus(corpus) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CODETR_FUZZ_UNSET"}
    paths = [str(path) for path, _ in corpus.values()]
    done = subprocess.run([sys.executable, "-c", BATCH, *paths], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["path"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert len(results) == len(set(paths))
    for name, (path, expected) in corpus.items():
        result = results[str(path)]
        assert result["code"] != "traceback", (name, result["err"])
        assert result["s"] < LIMIT_S, (name, result["s"])
        if expected == "ok":
            assert result["code"] == 0 and result["out"].startswith(f"{path}: OK"), (name, result)
            continue
        lines = result["err"].splitlines()
        assert result["code"] == 1 and result["out"] == "", (name, result)
        assert lines[-1].endswith("problem(s)") and expected in lines[0], (name, lines)
        assert all(one_line(path, line) for line in lines), (name, lines)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["not UTF-8", "list as key", "recursive alias",
                                  "deep list nesting", "alias bomb", "name from /etc/passwd"])
def test_the_issues_cases_through_the_real_console_script(corpus, name: str) -> None:
    """The cases of the issue as separate `codetr-stream check-config` processes."""
    path, expected = corpus[name]
    script = Path(sys.executable).with_name("codetr-stream")
    started = time.monotonic()
    done = subprocess.run([str(script), "check-config", str(path)], capture_output=True,
                          text=True, timeout=60)
    lines = done.stderr.splitlines()
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(lines) == 2 and expected in lines[0] and one_line(path, lines[0]), lines
    assert time.monotonic() - started < 20  # the process, imports included; the check is < 2 s
