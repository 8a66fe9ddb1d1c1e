"""streams.yaml's schema: the daemon's whole configuration as frozen, typed pydantic sections.

Every section forbids unknown keys, so a typo fails loudly instead of silently falling back to a
default, and every field carries its documentation, which `load.load_config` shows as the hint of
a problem. Nothing here is mutated at runtime: a reload validates a new object.
"""

from __future__ import annotations

import difflib
import importlib
import re
import stat
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from codetr_stream.daemon.config.secrets import redact, shown
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

STREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
STREAM_NAME_RULE = "use 1-64 letters, digits, '_' or '-', starting with a letter or digit"
SOURCE_SCHEMES = ("rtsp", "rtsps", "file")
PUBLISH_SCHEMES = ("tcp", "ipc", "inproc")
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
        if dupes := duplicate_names([s.name for s in streams]):
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


def duplicate_names(names: list[Any]) -> list[tuple[str, int, int]]:
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
