"""streams.yaml: the daemon's whole configuration, validated once into frozen, typed objects.

Every section forbids unknown keys, so a typo fails loudly instead of silently falling back to a
default. `load_config` reports every problem at once, each with its file, line, field path and a
hint (the field's own documentation, or the key you probably meant), because an operator fixing a
camera list at 3 a.m. should not have to iterate one error at a time. Reload builds a new object
and `diff` says what changed; nothing here is mutated at runtime.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from codetr_stream.daemon.config.problems import (
    ConfigError,
    KeyPath,
    Problem,
    dotted,
    validation_problems,
)
from codetr_stream.daemon.config.secrets import SecretError, redact, shown, substitute
from codetr_stream.daemon.config.yaml_reader import read_yaml
from codetr_stream.daemon.feed.messages import COCO_CLASSES
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

__all__ = [
    "ConfigDiff", "ConfigError", "DaemonConfig", "Problem", "StreamConfig",
    "diff", "load_config", "redact", "resolve_class_ids",
]  # fmt: skip

log = logging.getLogger(__name__)

STREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
STREAM_NAME_RULE = "use 1-64 letters, digits, '_' or '-', starting with a letter or digit"
SOURCE_SCHEMES = ("rtsp", "rtsps", "file")
PUBLISH_SCHEMES = ("tcp", "ipc", "inproc")
SECRET_HINT = ("export the variable, or provide a systemd credential (LoadCredential=) or Docker "
               "secret file of that name")
MAX_PROBLEMS = 50  # reported of one file; a broken file can hold thousands
# Upper bounds on times: beyond an hour a value is a typo, and Event.wait() raises OverflowError
# past ~9e9 s (`.inf` and `.nan` are refused for every number).
MAX_SECONDS = 3600.0


Fraction = Annotated[float, Field(ge=0, le=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class EngineConfig(_Section):
    path: Path = Field(
        description="engine directory (with manifest.json) from `codetr-stream compile`; "
        "relative paths are relative to this file"
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto = the GPUs in `gpus` when CUDA is available, else the CPU path"
    )
    gpus: tuple[Annotated[int, Field(ge=0, le=255)], ...] = Field(
        (0,), min_length=1, description="CUDA device ids; one engine worker per GPU"
    )


class BatchingConfig(_Section):
    max_batch: int = Field(8, ge=1, le=64, description="largest batch sent to the engine")
    max_wait_ms: float = Field(
        10.0, ge=0, le=1000, description="how long a partial batch waits for more frames"
    )


class PublishConfig(_Section):
    endpoint: str = Field(
        "tcp://127.0.0.1:5555",
        description="ZeroMQ PUB bind address (tcp://, ipc://); loopback unless you mean it",
    )
    sndhwm: int = Field(
        1000, ge=1, le=100_000,
        description="messages queued per subscriber before ZeroMQ drops for it (at most "
        "100,000: a few hundred MB for one stuck subscriber)",
    )
    status_interval_s: float = Field(
        1.0, ge=0.05, le=60, description="seconds between `status.<stream>` heartbeats"
    )
    max_subscribers: int = Field(
        64, ge=1, le=100_000, description="subscriber connections at once; more are refused"
    )
    max_subscriptions: int = Field(
        10_000, ge=1, le=1_000_000, description="distinct subscriptions over all subscribers; "
        "past it the subscriber that sent the most is disconnected"
    )
    curve_secret_key_file: Path | None = Field(
        None, description="encrypt the feed with CURVE: the server's secret key file from "
        "`codetr-stream curve-keygen` (subscribers need the .pub); null = plain ZeroMQ"
    )

    @field_validator("curve_secret_key_file")
    @classmethod
    def _curve_key(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return _credential_file(value, info, "codetr_stream.daemon.feed.curve", "read_key")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        scheme, sep, rest = value.partition("://")
        if not sep or scheme not in PUBLISH_SCHEMES:
            raise ValueError(f"use tcp://HOST:PORT or ipc:///path, not {shown(redact(value))}")
        if scheme == "tcp":
            host, colon, port = rest.rpartition(":")
            if not (colon and host) or not (port in ("*", "0") or _valid_port(port)):
                raise ValueError("use tcp://HOST:PORT with a port 1-65535 (or * for any free "
                                 "one), e.g. tcp://127.0.0.1:5555")
        # '@' starts a name in Linux's abstract namespace, not a path.
        if scheme == "ipc" and not rest.startswith("@") and \
                (why := _foreign_file(Path(rest), stat.S_ISSOCK, "a socket")):
            raise ValueError(f"{rest} {why}")
        return value


class HealthConfig(_Section):
    host: str = Field(
        "127.0.0.1", description="HTTP bind address for /healthz, /metrics and snapshots"
    )
    port: int = Field(8090, ge=0, le=65535, description="HTTP port; 0 picks a free one")
    token_file: Path | None = Field(
        None, description="/metrics and /snapshot require `Authorization: Bearer <the token in "
        "this file>`; /healthz stays open; null = no token"
    )
    max_connections: int = Field(
        64, ge=1, le=10_000, description="HTTP connections at once; when full, the oldest "
        "unfinished request is dropped"
    )
    request_timeout_s: float = Field(
        10.0, gt=0, le=300, description="a connection's whole life: send the request, read "
        "the answer"
    )

    @field_validator("token_file")
    @classmethod
    def _token(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return _credential_file(value, info, "codetr_stream.daemon.monitoring.health", "read_token")


class SnapshotConfig(_Section):
    enabled: bool = Field(True, description="serve /snapshot/<stream>.jpg (annotated latest frame)")
    jpeg_quality: int = Field(80, ge=1, le=95, description="JPEG quality of snapshots")
    max_width: int | None = Field(
        1280, ge=64, description="downscale wider frames to this width; null keeps full size"
    )


class ReconnectConfig(_Section):
    open_timeout_s: float = Field(
        10.0, ge=0.1, le=MAX_SECONDS, description="give up connecting after this long"
    )
    read_timeout_s: float = Field(
        5.0, ge=0.1, le=MAX_SECONDS, description="socket read timeout of the demuxer"
    )
    stall_timeout_s: float = Field(
        10.0, ge=0.1, le=MAX_SECONDS,
        description="reconnect when no frame was decoded for this long (open, silent)",
    )
    backoff_initial_s: float = Field(
        0.5, ge=0.05, le=MAX_SECONDS, description="first wait before reconnecting"
    )
    backoff_max_s: float = Field(
        30.0, ge=0.05, le=MAX_SECONDS, description="longest wait between reconnects"
    )
    backoff_multiplier: float = Field(
        2.0, ge=1, le=10, description="wait grows by this after failures"
    )
    backoff_jitter: float = Field(
        0.25, ge=0, le=1, description="random +/- fraction of each wait, so cameras don't sync up"
    )

    @model_validator(mode="after")
    def _ordered(self) -> ReconnectConfig:
        if self.backoff_initial_s > self.backoff_max_s:
            raise ValueError("backoff_initial_s must not exceed backoff_max_s")
        return self


class RoiConfig(_Section):
    points: tuple[tuple[Fraction, Fraction], ...] = Field(
        min_length=3,
        description="polygon vertices [x, y] as fractions of frame width/height (0..1), "
        "so the ROI survives a resolution change",
    )
    anchor: Literal["bottom_center", "center"] = Field(
        "bottom_center",
        description="box point tested against the polygon: bottom_center (where people and "
        "vehicles touch the ground) or center",
    )

    @field_validator("points")
    @classmethod
    def _has_area(cls, points: tuple[tuple[float, float], ...]) -> tuple[tuple[float, float], ...]:
        closed = zip(points, points[1:] + points[:1], strict=True)
        if abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in closed)) < 1e-9:  # shoelace
            raise ValueError("the polygon has no area (points are collinear or repeated)")
        return points


class StreamConfig(_Section):
    name: str = Field(
        description="unique id: letters, digits, '_' and '-' (it becomes the ZeroMQ topic "
        "det.<name> and a metrics label)",
    )
    url: str = Field(
        repr=False,
        description="rtsp://[user:pass@]host[:port]/path, rtsps://..., or file:///path (tests); "
        "put passwords in ${ENV_VAR} references",
    )
    enabled: bool = Field(True, description="false keeps the entry but does not connect")
    transport: Literal["tcp", "udp"] = Field(
        "tcp", description="RTSP transport: tcp (robust through NAT and loss) or udp"
    )
    max_fps: float | None = Field(
        None, ge=0.01, le=1000,
        description="process at most this many frames per second; null = every frame",
    )
    classes: tuple[str | int, ...] | None = Field(
        None, min_length=1, description="publish only these classes (names or ids); null = all"
    )
    min_score: float = Field(0.3, ge=0, le=1, description="drop detections scoring below this")
    roi: RoiConfig | None = Field(None, description="publish only detections inside this polygon")

    @field_validator("name")
    @classmethod
    def _topic_safe(cls, name: str) -> str:
        if not STREAM_NAME.fullmatch(name):
            raise ValueError(f"{shown(name)} is not a valid stream name: {STREAM_NAME_RULE}")
        return name

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        if not url.isprintable() or " " in url:
            raise ValueError("spaces and control characters in the URL must be percent-encoded "
                             "(a space is %20)")
        parts = urlsplit(url)
        if parts.scheme not in SOURCE_SCHEMES:
            raise ValueError(f"unsupported scheme {shown(parts.scheme)}; use rtsp://, rtsps:// "
                             "or file://")
        if parts.scheme == "file":
            if not parts.path:
                raise ValueError("a file:// URL needs a path, e.g. file:///videos/cam1.mp4")
            return url
        if parts.netloc.count("@") > 1:
            raise ValueError("an '@' in the user or password: percent-encode it as %40")
        if "@" in url.partition("://")[2][len(parts.netloc):]:
            raise ValueError("an '@' after the host: percent-encode '/', '?' and '#' in a "
                             "password as %2F, %3F and %23 (and '@' as %40)")
        if not parts.hostname:
            raise ValueError("no host in the URL; percent-encode '@', '/' and ':' in passwords")
        try:
            port = parts.port
        except ValueError:  # not a number, or above 65535
            port = 0
        if port is not None and not 1 <= port <= 65535:
            raise ValueError("the port must be a number 1-65535 (host:port, e.g. cam:554)")
        return url

    @field_validator("classes")
    @classmethod
    def _known_classes(cls, classes: tuple[str | int, ...] | None, info: ValidationInfo):
        names = (info.context or {}).get("class_names")
        if classes is not None and names is not None:
            resolve_class_ids(classes, tuple(names))
        return classes

    @property
    def safe_url(self) -> str:
        """The URL with credentials masked: the only form that may be logged."""
        return redact(self.url)


class DaemonConfig(_Section):
    engine: EngineConfig = Field(description="the compiled engine and where it runs")
    batching: BatchingConfig = Field(BatchingConfig(), description="cross-camera batching")
    publish: PublishConfig = Field(PublishConfig(), description="ZeroMQ output")
    health: HealthConfig = Field(HealthConfig(), description="/healthz, /metrics and snapshots")
    snapshot: SnapshotConfig = Field(SnapshotConfig(), description="annotated JPEG per stream")
    reconnect: ReconnectConfig = Field(ReconnectConfig(), description="camera fault handling")
    pid_file: Path | None = Field(
        None, description="`run` writes its pid here so `codetr-stream reload` can signal it"
    )
    streams: tuple[StreamConfig, ...] = Field((), description="the cameras")

    @field_validator("engine", "pid_file", mode="after")
    @classmethod
    def _relative_to_file(cls, value: Any, info: ValidationInfo) -> Any:
        base = (info.context or {}).get("base_dir")
        if base is None or value is None:
            return value
        if isinstance(value, EngineConfig):
            return value.model_copy(update={"path": Path(base) / value.path})
        return Path(base) / value

    @field_validator("pid_file", mode="after")
    @classmethod
    def _pid_file_is_ours(cls, path: Path | None) -> Path | None:
        if path is not None and (why := _foreign_file(path, stat.S_ISREG, "a pid file")):
            raise ValueError(f"{path} {why}")
        return path

    @field_validator("streams")
    @classmethod
    def _unique_names(cls, streams: tuple[StreamConfig, ...]) -> tuple[StreamConfig, ...]:
        if dupes := _duplicates([s.name for s in streams]):
            raise ValueError(f"duplicate stream names: {', '.join(shown(d[0]) for d in dupes)}")
        return streams

    @property
    def enabled_streams(self) -> tuple[StreamConfig, ...]:
        return tuple(s for s in self.streams if s.enabled)


def _valid_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 5 and 1 <= int(text) <= 65535


PID_TEXT = re.compile(rb"\s*\d{0,10}\s*")


def _foreign_file(path: Path, is_kind: Callable[[int], bool], kind: str) -> str | None:
    """Why the daemon must not replace `path` with its own `kind` (its pid file or its ZeroMQ
    socket), or None. ZeroMQ unlinks whatever sits at an ipc path and `run` overwrites its pid
    file, then both delete the file at exit: anything there but a stale one of theirs (or an
    empty file) belongs to someone else."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot be checked: {exc.strerror}"
    if not is_kind(mode):
        return f"exists and is not {kind}; refusing to replace it: choose another path"
    if stat.S_ISREG(mode):
        try:
            with path.open("rb") as f:
                head = f.read(64)
        except OSError as exc:
            return f"cannot be read: {exc.strerror}"
        if not PID_TEXT.fullmatch(head):
            return f"exists and is not {kind}; refusing to overwrite it: choose another path"
    return None


def _duplicates(names: list[Any]) -> list[tuple[str, int, int]]:
    """(name, first index, repeated index) for each repeated string name."""
    first: dict[str, int] = {}
    out = []
    for i, name in enumerate(names):
        if isinstance(name, str) and name in first:
            out.append((name, first[name], i))
        elif isinstance(name, str):
            first[name] = i
    return out


@lru_cache(maxsize=256)
def resolve_class_ids(
    classes: tuple[str | int, ...], class_names: tuple[str, ...]
) -> frozenset[int]:
    """Label ids for an allow-list of names and/or ids; ValueError names each unknown entry."""
    ids, unknown = set(), []
    lookup = {name: i for i, name in enumerate(class_names)}
    for entry in classes:
        if isinstance(entry, int) and 0 <= entry < len(class_names):
            ids.add(entry)
        elif isinstance(entry, int):
            unknown.append(str(entry))
        elif entry in lookup:
            ids.add(lookup[entry])
        else:
            close = difflib.get_close_matches(entry, class_names, n=1)
            unknown.append(f"{entry!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if unknown:
        raise ValueError(
            f"unknown classes {', '.join(unknown)}; use one of the model's {len(class_names)} "
            f"class names or an id 0..{len(class_names) - 1}"
        )
    return frozenset(ids)


# ---- files named by path that hold credentials: checked when loading, never printed ----


def _credential_file(value: Path | None, info: ValidationInfo, module: str,
                     reader: str) -> Path | None:
    """`value` made relative to the config file, after `module.reader(path)` accepted it (its
    ValueError names the file and the fix). Imported here only when such a file is set."""
    if value is None:
        return None
    base = (info.context or {}).get("base_dir")
    path = Path(base) / value if base is not None else value
    getattr(importlib.import_module(module), reader)(path)
    return path


# ---- loading: YAML with line numbers -> substitution -> validation -> ConfigError ----


def _substitute_all(data: Any, path: KeyPath, file: str, lines: dict[KeyPath, int],
                    problems: list[Problem]) -> Any:
    if isinstance(data, dict):
        return {k: _substitute_all(v, (*path, k), file, lines, problems) for k, v in data.items()}
    if isinstance(data, list):
        return [_substitute_all(v, (*path, i), file, lines, problems) for i, v in enumerate(data)]
    if isinstance(data, str):
        try:
            return substitute(data)
        except SecretError as exc:
            problems.append(Problem(file, lines.get(path), dotted(path), str(exc), SECRET_HINT))
    return data


def load_config(
    path: str | Path, *, class_names: tuple[str, ...] | None = COCO_CLASSES
) -> DaemonConfig:
    """Read, substitute and validate a streams.yaml; raises ConfigError listing every problem.

    `class_names` checks stream class allow-lists (COCO by default; pass the engine manifest's
    names once it is loaded, or None to skip the check). Nothing else is raised: whatever goes
    wrong reading a file is a problem in that file.
    """
    file = str(path)
    try:
        config, problems = _load(Path(path), file, class_names)
    except Exception as exc:  # a bug here must not kill a daemon on reload: say where it was
        log.debug("reading %s failed", file, exc_info=True)
        config, problems = None, [Problem(file, None, "", f"cannot be read ({type(exc).__name__}"
                                          "); please report this with the file")]
    if problems:
        problems.sort(key=lambda p: (p.line or 0, p.field))
        if len(problems) > MAX_PROBLEMS:
            more = len(problems) - MAX_PROBLEMS
            problems[MAX_PROBLEMS:] = [Problem(file, None, "", f"{more} more problems not shown")]
        raise ConfigError(problems)
    return config


def _load(path: Path, file: str,
          class_names: tuple[str, ...] | None) -> tuple[DaemonConfig | None, list[Problem]]:
    problems: list[Problem] = []
    data, lines = read_yaml(path, file, problems)
    if problems:
        return None, problems
    if not isinstance(data, dict):
        return None, [Problem(file, 1, "", "the file must be a mapping of sections",
                              "start with `engine:` and `streams:`; see streams.yaml")]
    data = _substitute_all(data, (), file, lines, problems)
    raw_streams = data.get("streams") if isinstance(data.get("streams"), list) else []
    names = [entry.get("name") if isinstance(entry, dict) else None for entry in raw_streams]
    for name, first, index in _duplicates(names):  # here too, so they come with every other problem
        line = lines.get(("streams", index, "name"))
        problems.append(Problem(file, line, f"streams[{index}].name",
                                f"duplicate stream name {shown(name)}",
                                f"used by streams[{first}]"))
    reported = {p.field for p in problems}
    context = {"base_dir": path.resolve().parent,
               "class_names": tuple(class_names) if class_names else None}
    try:
        return DaemonConfig.model_validate(data, context=context), problems
    except ValidationError as exc:
        found = validation_problems(exc, DaemonConfig, file, lines)
        problems += [p for p in found if p.field not in reported
                     and not (p.field == "streams" and p.message.startswith("duplicate"))]
    return None, problems


# ---- reload ----


@dataclass(frozen=True)
class ConfigDiff:
    """What a reload changes. Streams are compared by name over the *enabled* ones, so turning a
    stream off shows up as removed. `changed` holds the new versions; `reconnect` names the changed
    streams whose source (url, transport) differs, the others only changed filters or fps.
    `restart_required` names non-stream sections that differ: they take effect at restart only.
    """

    added: tuple[StreamConfig, ...]
    removed: tuple[StreamConfig, ...]
    changed: tuple[StreamConfig, ...]
    reconnect: tuple[str, ...]
    restart_required: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.restart_required)


def diff(old: DaemonConfig, new: DaemonConfig) -> ConfigDiff:
    before = {s.name: s for s in old.enabled_streams}
    after = {s.name: s for s in new.enabled_streams}
    changed = tuple(s for name, s in after.items() if name in before and before[name] != s)
    return ConfigDiff(
        added=tuple(s for name, s in after.items() if name not in before),
        removed=tuple(s for name, s in before.items() if name not in after),
        changed=changed,
        reconnect=tuple(
            s.name for s in changed
            if (s.url, s.transport) != (before[s.name].url, before[s.name].transport)
        ),
        restart_required=tuple(
            name for name in DaemonConfig.model_fields
            if name != "streams" and getattr(old, name) != getattr(new, name)
        ),
    )  # fmt: skip
