"""Secrets in streams.yaml: `${...}` references, and keeping their values out of every log line.

Camera passwords never sit in the config file itself. A string may reference:

- `${NAME}`: the environment variable NAME; if unset, a file NAME (or `streams_NAME`, the name
  systemd gives files of a `LoadCredential=streams:DIR` directory) in `$CREDENTIALS_DIRECTORY`,
  then `/run/secrets/NAME` (Docker/Compose secrets). Same lookup order as Frigate.
- `${file:/abs/path}`: the contents of that file.
- `${NAME:-default}`: as `${NAME}`, or `default` where it is not found (the shipped example
  config checks as it is; the default is masked in logs like any substituted value).
- `$${` is a literal `${`.

File contents lose one trailing newline (what `echo secret > file` adds). Every substituted value
is remembered so `redact` can blank it wherever it shows up later: URLs, messages, tracebacks.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

_REFERENCE = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DOCKER_SECRETS = Path("/run/secrets")
MASK = "***"
# Shorter values (a GPU id, a port) would blank half of every log line; URL userinfo is always
# masked whatever its length.
MIN_REDACTED_LENGTH = 4

# Substituted secret values, longest first when redacting (a value may contain another).
_known_secrets: set[str] = set()
# URL userinfo (`user:pass@`) and credential-like query parameters (`?password=...`).
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s?#]+@")
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&;](?:[a-z_]*pass(?:word)?|pwd|token|secret|auth|key|sig(?:nature)?)=)[^&#\s]*",
    re.IGNORECASE,
)


class SecretError(ValueError):
    """A `${...}` reference that cannot be resolved; the message names it, never a value."""


def _lookup(name: str) -> str:
    if name.startswith("file:"):
        path = Path(name.removeprefix("file:"))
        if not path.is_absolute():
            raise SecretError(f"${{{name}}}: the secret file path must be absolute")
        return _read_secret_file(path, name)
    if not _ENV_NAME.fullmatch(name):
        raise SecretError(
            f"${{{name}}}: not a variable name; use ${{NAME}} (letters, digits, _) "
            "or ${file:/path}"
        )
    if name in os.environ:
        return os.environ[name]
    candidates = []
    if creds := os.environ.get("CREDENTIALS_DIRECTORY"):
        candidates += [Path(creds) / name, Path(creds) / f"streams_{name}"]
    candidates.append(DOCKER_SECRETS / name)
    for path in candidates:
        if path.is_file():
            return _read_secret_file(path, name)
    raise SecretError(
        f"${{{name}}} is not set (looked in the environment, $CREDENTIALS_DIRECTORY, /run/secrets)"
    )


def _read_secret_file(path: Path, name: str) -> str:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SecretError(f"${{{name}}}: cannot read {path}: {exc.strerror}") from None
    return text.removesuffix("\n")


def substitute(text: str) -> str:
    """`text` with every `${...}` reference replaced; SecretError names every missing one."""

    errors: list[str] = []

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        name, has_default, default = match.group(1).partition(":-")
        try:
            value = _lookup(name)
        except SecretError as exc:
            if not has_default:
                errors.append(str(exc))
                return ""
            value = default
        if len(value) >= MIN_REDACTED_LENGTH:
            _known_secrets.add(value)
        return value

    result = _REFERENCE.sub(replace, text)
    if errors:
        raise SecretError("; ".join(errors))
    return result


def redact(text: str) -> str:
    """`text` safe to log: URL userinfo, credential query parameters and known secrets masked."""
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m.group('key')}{MASK}", text)
    for secret in sorted(_known_secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


class RedactingFormatter(logging.Formatter):
    """Wraps a handler's formatter and redacts the finished line, tracebacks included."""

    def __init__(self, inner: logging.Formatter | None = None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Make every handler of `logger` (default: root) redact what it writes."""
    for handler in (logger or logging.getLogger()).handlers:
        if not isinstance(handler.formatter, RedactingFormatter):
            handler.setFormatter(RedactingFormatter(handler.formatter))
