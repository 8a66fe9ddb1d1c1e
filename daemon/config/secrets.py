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

import json
import logging
import os
import re
import stat
from pathlib import Path
from urllib.parse import quote, unquote

_REFERENCE = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DOCKER_SECRETS = Path("/run/secrets")
MASK = "***"
# Shorter values (a GPU id, a port) would blank half of every log line; URL userinfo is always
# masked whatever its length.
MIN_REDACTED_LENGTH = 4
SHOWN_LENGTH = 64  # longer values are never quoted in an error message
MAX_SECRET_BYTES = 64 << 10

# Every spelling of each substituted secret value (as is, JSON- and repr-escaped, percent-encoded).
_known_secrets: set[str] = set()
# Every substituted value, however short: error messages never quote one.
_substituted: set[str] = set()
# URL userinfo: from `scheme://` to the last '@' before a space or a quote, so that a password
# with a literal '@', '/', '?' or '#' is masked whole (a path with an '@' is masked too: harmless).
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^\s\"'<>]*@")
# Query parameters, and the names that hold credentials in camera and cloud URLs: password,
# passwd, pwd, pw, loginuse/loginpas, user, apikey, api_key, access_token, auth_token, token,
# key, secret, signature, X-Amz-Credential, sessionid...
_QUERY_PARAM = re.compile(r"(?P<key>[?&;](?P<name>[\w.-]{1,64})=)[^&#\s\"'<>]*")
_SECRET_PARAM = re.compile(
    r"pass|pwd|^pw$|token|secret|key|sig|auth|cred|session|^user|^usr|^login", re.IGNORECASE
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
    """The file's text, from a regular file of at most MAX_SECRET_BYTES (`${file:/dev/zero}`
    must not read forever, a FIFO must not block)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise SecretError(f"${{{name}}}: {path} is not a regular file")
            raw = f.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise SecretError(f"${{{name}}}: cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_SECRET_BYTES:
        raise SecretError(f"${{{name}}}: {path} is larger than {MAX_SECRET_BYTES >> 10} KiB")
    try:
        return raw.decode().removesuffix("\n")
    except UnicodeDecodeError:
        raise SecretError(f"${{{name}}}: {path} is not UTF-8 text") from None


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
        _remember(value)
        return value

    result = _REFERENCE.sub(replace, text)
    if errors:
        raise SecretError("; ".join(errors))
    return result


def _remember(value: str) -> None:
    _substituted.add(value)
    if len(value) >= MIN_REDACTED_LENGTH:
        _known_secrets.update({value, json.dumps(value)[1:-1], repr(value)[1:-1],
                               quote(value, safe=""), quote(value)})


def _mask_param(match: re.Match[str]) -> str:
    return f"{match['key']}{MASK}" if _SECRET_PARAM.search(match["name"]) else match[0]


def redact(text: str) -> str:
    """`text` safe to log: URL userinfo, credential query parameters and known secrets masked."""
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    text = _QUERY_PARAM.sub(_mask_param, text)
    for secret in sorted(_known_secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def redact_text(text: str, url: str) -> str:
    """`text` (an exception message, say) safe to log: `redact`, plus this URL's own user and
    password in any spelling, since FFmpeg may quote them outside a URL."""
    if userinfo := _USERINFO.match(url):
        user, _, password = userinfo[0][len(userinfo["scheme"]):-1].partition(":")
        for secret in (password, user):
            if len(secret) >= MIN_REDACTED_LENGTH:
                for form in sorted({secret, unquote(secret), quote(unquote(secret), safe="")},
                                   key=len, reverse=True):
                    text = text.replace(form, MASK)
    return redact(text)


def shown(value: str) -> str:
    """`value` quoted for an error message, unless it came from a `${...}` reference, holds a
    secret, spans lines or is long (a `${file:...}` of the wrong file): then only its length."""
    if (len(value) <= SHOWN_LENGTH and value.isprintable() and value not in _substituted
            and not any(secret in value for secret in _known_secrets)):
        return repr(value)
    return f"(a value of {len(value)} characters, not shown)"


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
