"""Secrets never leave the daemon in any spelling: URL userinfo with odd characters, the query
parameters cameras and clouds put credentials in, substituted values escaped for JSON or repr,
and `${file:...}` values, which no error message quotes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from codetr_stream.daemon.config import secrets
from codetr_stream.daemon.config.secrets import SecretError, redact, redact_text, shown, substitute

SECRET = "Xy7-SECRET"


@pytest.mark.parametrize("url", [
    f"rtsp://192.0.2.1/live?loginuse=admin&loginpas={SECRET}",
    f"rtsp://192.0.2.1/live?user=admin&password={SECRET}",
    f"rtsp://192.0.2.1/live?usr=admin&pwd={SECRET}",
    f"rtsp://192.0.2.1/live?passwd={SECRET}&channel=1",
    f"rtsp://192.0.2.1/live?channel=1&pw={SECRET}",
    f"rtsps://192.0.2.1/live?apikey={SECRET}",
    f"rtsps://192.0.2.1/live?api_key={SECRET}#frag",
    f"rtsps://192.0.2.1/live?access_token={SECRET}",
    f"rtsps://192.0.2.1/live;auth_token={SECRET}",
    f"https://cdn.example/v.mp4?token={SECRET}",
    f"https://cdn.example/v.mp4?key={SECRET}",
    f"https://cdn.example/v.mp4?secret={SECRET}",
    f"https://bucket.example/v.mp4?X-Amz-Credential=AKIA{SECRET}&X-Amz-Signature={SECRET}",
    f"https://cdn.example/v.mp4?sig={SECRET}&Signature={SECRET}",
    f"rtsp://admin:{SECRET}@192.0.2.1/live",  # userinfo, plain
    f"rtsp://admin:p@ss{SECRET}@192.0.2.1/live",  # a literal '@' in the password
    f"rtsp://admin:pa/ss{SECRET}@192.0.2.1/live",  # a literal '/'
    f"rtsp://admin:pa#ss{SECRET}@192.0.2.1/live",  # a literal '#'
    f"rtsp://admin:pa?ss{SECRET}@192.0.2.1/live",  # a literal '?'
])
def test_redact_masks_credentials_in_urls_and_messages(url: str) -> None:
    for text in (url, f"error opening '{url}': refused", json.dumps({"error": url})):
        clean = redact(text)
        assert SECRET not in clean, clean
        assert "***" in clean
    assert "192.0.2.1" in redact(url) or "example" in redact(url)  # where it went stays readable


def test_redact_keeps_what_is_not_a_credential() -> None:
    for text in ("rtsp://192.0.2.1:554/Streaming/Channels/101?channel=1&subtype=0",
                 "file:///var/lib/clips/demo.mp4", "no picture for 5.0 s"):
        assert redact(text) == text


def test_substituted_secrets_are_masked_escaped_for_json_and_repr(monkeypatch) -> None:
    value = 'pa"ss\\word\n2'
    monkeypatch.setenv("ODD_SECRET", value)
    substitute("${ODD_SECRET}")
    for spelling in (value, json.dumps(value), repr(value)):
        assert "pa" not in redact(f"error: {spelling}"), spelling


def test_redact_text_masks_the_urls_own_credentials_in_any_spelling() -> None:
    url = "rtsp://admin:p%40ss-word@10.0.0.1:554/live"
    text = f"error opening {url}: user admin password p@ss-word (p%40ss-word)"
    clean = redact_text(text, url)
    assert "p@ss-word" not in clean and "p%40ss-word" not in clean and "admin" not in clean
    assert "10.0.0.1:554/live" in clean


def test_shown_never_quotes_a_substituted_or_long_value(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "not-a-secret").write_text("line one\nline two\n")
    value = substitute(f"${{file:{tmp_path}/not-a-secret}}")
    assert shown(value) == "(a value of 17 characters, not shown)"
    monkeypatch.setenv("SHORT", "ab")  # too short to redact, still never quoted
    assert shown(substitute("${SHORT}")).startswith("(a value of 2")
    assert shown("bad name!") == "'bad name!'"
    assert shown("x" * 200).startswith("(a value of 200")


def test_secret_files_are_bounded_and_regular(tmp_path: Path, monkeypatch) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big"
    big.write_bytes(b"x" * (secrets.MAX_SECRET_BYTES + 1))
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe")
    cases = {"/dev/zero": "is not a regular file", str(fifo): "is not a regular file",
             str(big): "is larger than 64 KiB", str(binary): "is not UTF-8 text",
             str(tmp_path / "absent"): "cannot read"}
    for path, message in cases.items():
        with pytest.raises(SecretError, match=message):
            substitute(f"${{file:{path}}}")
