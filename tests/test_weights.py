"""fetch-weights against a real local HTTP server that serves byte ranges."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from codetr_stream.compile.weights import FetchError, default_cache_dir, fetch, hash_prefix

PAYLOAD = os.urandom(3 * (1 << 20) + 12345)  # a few chunks, not a multiple of the chunk size
GOOD = f"model-{hashlib.sha256(PAYLOAD).hexdigest()[:8]}.pth"
BAD = "model-00000000.pth"


class RangeServer(ThreadingHTTPServer):
    """Serves PAYLOAD under any path, honours `Range: bytes=N-`, can cut the connection."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.cut_after: int | None = None  # bytes of body to send before dropping (once)
        self.ranges: list[str | None] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


class _Handler(BaseHTTPRequestHandler):
    server: RangeServer

    def do_GET(self) -> None:
        if self.path.startswith("/missing/"):
            self.send_error(404)
            return
        header = self.headers.get("Range")
        self.server.ranges.append(header)
        start = int(header.split("=")[1].rstrip("-")) if header else 0
        if start >= len(PAYLOAD):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
            self.end_headers()
            return
        body = PAYLOAD[start:]
        self.send_response(206 if header else 200)
        if header:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut, self.server.cut_after = self.server.cut_after, None
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:
            self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[RangeServer]:
    srv = RangeServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_downloads_and_verifies_the_hash_in_the_name(server: RangeServer, tmp_path: Path) -> None:
    path = fetch(server.url + GOOD, tmp_path, progress=False)
    assert path == tmp_path / GOOD and path.read_bytes() == PAYLOAD
    assert not (tmp_path / (GOOD + ".part")).exists()
    assert fetch(server.url + GOOD, tmp_path, progress=False) == path  # cached: no request
    assert len(server.ranges) == 1


def test_interrupted_download_resumes_with_a_range_request(server: RangeServer,
                                                           tmp_path: Path) -> None:
    server.cut_after = 1_500_000
    with pytest.raises(FetchError, match=r"interrupted.*run the same command again"):
        fetch(server.url + GOOD, tmp_path, progress=False, retries=0)
    part = tmp_path / (GOOD + ".part")
    assert part.stat().st_size == 1_500_000
    path = fetch(server.url + GOOD, tmp_path, progress=False)
    assert server.ranges == [None, "bytes=1500000-"]
    assert path.read_bytes() == PAYLOAD


def test_retries_resume_within_one_call(server: RangeServer, tmp_path: Path) -> None:
    server.cut_after = 10
    assert fetch(server.url + GOOD, tmp_path, progress=False).read_bytes() == PAYLOAD
    assert server.ranges == [None, "bytes=10-"]


def test_complete_part_file_is_finished_without_refetching(server: RangeServer,
                                                           tmp_path: Path) -> None:
    (tmp_path / (GOOD + ".part")).write_bytes(PAYLOAD)
    assert fetch(server.url + GOOD, tmp_path, progress=False).read_bytes() == PAYLOAD
    assert server.ranges == [f"bytes={len(PAYLOAD)}-"]


def test_hash_mismatch_is_one_clear_error_and_keeps_nothing(server: RangeServer,
                                                            tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"does not match the 00000000 in its name.*it was "
                       "deleted: run the same command again"):
        fetch(server.url + BAD, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_cached_file_says_to_delete_it(tmp_path: Path) -> None:
    cached = tmp_path / BAD
    cached.write_bytes(PAYLOAD)
    with pytest.raises(FetchError) as info:
        fetch("http://192.0.2.1/" + BAD, tmp_path, progress=False)  # never contacted
    assert str(info.value).startswith(f"{cached}: sha256 ")
    assert str(info.value).endswith("does not match the 00000000 in its name, so it is corrupt "
                                    "or not the official file; delete it and run "
                                    "`codetr-stream fetch-weights` again")


@pytest.mark.parametrize("case", ["not-a-url", "cache-dir-is-a-file"])
def test_bad_url_or_cache_dir_is_one_clear_error(tmp_path: Path, case: str) -> None:
    a_file = tmp_path / "cache"
    a_file.write_text("")
    url, cache, text = {
        "not-a-url": ("notaurl", tmp_path, "--url notaurl: unknown url type: 'notaurl'; give a "
                                           "full https://... address"),
        "cache-dir-is-a-file": ("http://192.0.2.1/" + GOOD, a_file,  # never contacted
                                f"cache dir {a_file}: cannot create it (File exists); pass "
                                "--cache-dir DIR or set $CODETR_STREAM_CACHE"),
    }[case]
    with pytest.raises(FetchError) as info:
        fetch(url, cache, progress=False, retries=0, timeout=5)
    assert str(info.value).startswith(text)


def test_offline_is_one_clear_error(tmp_path: Path) -> None:
    srv = RangeServer()
    url = srv.url + GOOD
    srv.server_close()  # nothing listens on that port any more
    with pytest.raises(FetchError, match=r"cannot reach .*offline"):
        fetch(url, tmp_path, progress=False, retries=0, timeout=5)


def test_http_error_names_the_url(server: RangeServer, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"missing/.*: HTTP 404 .*check the URL"):
        fetch(server.url + "missing/" + GOOD, tmp_path, progress=False)


def test_cache_dir_follows_env_then_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CODETR_STREAM_CACHE", str(tmp_path / "a"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("CODETR_STREAM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "codetr-stream"


def test_hash_prefix_follows_the_openmmlab_convention() -> None:
    assert hash_prefix("co_dino_5scale_swin_large_16e_o365tococo-614254c9.pth") == "614254c9"
    assert hash_prefix("weights.pth") is None
