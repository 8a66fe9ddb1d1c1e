"""CURVE for the detection feed: encryption and a server that subscribers can authenticate.

Off by default; for networks the operator does not trust. Keys are Z85 text of 40 characters,
as `zmq.curve_keypair()` makes them and `codetr-stream curve-keygen` writes them: NAME.pub, the
public key that every subscriber (and a proxy in front of the workers) is given, and NAME.secret
(mode 0600), the one file the daemon reads (`publish.curve_secret_key_file`, for instance a
systemd credential). A subscriber makes a fresh keypair of its own for each connection: the
daemon does not check who subscribes, it guarantees that the feed is encrypted and that a
subscriber talks to the holder of the secret key. A plain (non-CURVE) peer cannot complete the
handshake, so it receives nothing and holds no subscriptions.
"""

from __future__ import annotations

import os
from pathlib import Path

import zmq
from zmq.utils import z85

KEY_CHARS = 40  # Z85 of a 32-byte key


class CurveKeyError(ValueError):
    """A key that is missing or malformed; the message names the file, never the key."""


def parse_key(text: str, where: str) -> bytes:
    """The Z85 key in `text` (surrounding whitespace ignored) as bytes for pyzmq."""
    key = text.strip()
    try:
        valid = len(key) == KEY_CHARS and len(z85.decode(key)) == 32
    except (ValueError, KeyError, IndexError):
        valid = False
    if not valid:
        raise CurveKeyError(f"{where}: not a CURVE key (expected {KEY_CHARS} Z85 characters, "
                            "as `codetr-stream curve-keygen` writes them)")
    return key.encode("ascii")


def read_key(path: Path) -> bytes:
    """The key stored in `path`."""
    try:
        text = Path(path).read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise CurveKeyError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_key(text, str(path))


def key_argument(value: str) -> bytes:
    """A command-line key: the 40 characters themselves, or a file holding them."""
    if len(value.strip()) == KEY_CHARS and not Path(value).exists():
        return parse_key(value, "the key given")
    return read_key(Path(value))


def serve(sock: zmq.Socket, secret_key: bytes) -> None:
    """Make `sock` a CURVE server (call before bind)."""
    sock.curve_secretkey = secret_key
    sock.curve_server = True


def connect_to(sock: zmq.Socket, server_key: bytes) -> None:
    """Make `sock` a CURVE client of the server whose public key is `server_key` (before
    connect), with a keypair of its own made here."""
    public, secret = zmq.curve_keypair()
    sock.curve_serverkey = server_key
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def write_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """NAME.pub and NAME.secret (0600) in `directory`; never overwrites either."""
    public, secret = zmq.curve_keypair()
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / f"{name}.pub", directory / f"{name}.secret"
    for path, key, mode in zip(paths, (public, secret), (0o644, 0o600), strict=True):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w") as out:
            out.write(key.decode("ascii") + "\n")
    return paths
