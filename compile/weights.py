"""`codetr-stream fetch-weights`: download the official checkpoint into a local cache.

Downloads go to `<name>.part` and resume with an HTTP Range request after an interruption (the
Swin-L file is ~900 MB). The finished file is checked against the sha256 prefix in its name
(OpenMMLab convention: `...-614254c9.pth`) before it is renamed into place, so a file under the
final name is always complete and verified.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

CHECKPOINT_NAME = "co_dino_5scale_swin_large_16e_o365tococo-614254c9.pth"
BASE_URL = "https://download.openmmlab.com/mmdetection/v3.0/codetr/"
DEFAULT_URL = BASE_URL + CHECKPOINT_NAME
CACHE_ENV = "CODETR_STREAM_CACHE"
_CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A download that failed; the one-line message says what to do."""


def default_cache_dir() -> Path:
    """$CODETR_STREAM_CACHE, else $XDG_CACHE_HOME/codetr-stream, else ~/.cache/codetr-stream."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "codetr-stream"


def hash_prefix(name: str) -> str | None:
    """The sha256 prefix in an OpenMMLab file name (`...-614254c9.pth`), if it has one."""
    match = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$", name)
    return match.group(1) if match else None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, prefix: str | None, fix: str) -> str:
    """The file's sha256; `FetchError` (ending with `fix`) if it does not start with `prefix`."""
    digest = sha256_file(path)
    if prefix is not None and not digest.startswith(prefix):
        raise FetchError(f"{path}: sha256 {digest[:len(prefix)]}... does not match the "
                         f"{prefix} in its name, so it is corrupt or not the official file; {fix}")
    return digest


def fetch(url: str = DEFAULT_URL, cache_dir: Path | None = None, *, progress: bool = True,
          retries: int = 3, timeout: float = 30.0) -> Path:
    """Download `url` into `cache_dir` (resuming a `.part` file), verify it, return its path."""
    try:
        urllib.request.Request(url)  # rejects what is not a URL before anything touches the disk
    except ValueError as exc:
        raise FetchError(f"--url {url}: {exc}; give a full https://... address") from None
    name = url.rstrip("/").rsplit("/", 1)[-1]
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"cache dir {directory}: cannot create it ({exc.strerror}); pass "
                         f"--cache-dir DIR or set ${CACHE_ENV} to a writable directory") from None
    target = directory / name
    prefix = hash_prefix(name)
    if target.is_file():
        verify(target, prefix, "delete it and run `codetr-stream fetch-weights` again")
        return target
    part = directory / (name + ".part")
    for attempt in range(retries + 1):
        try:
            _download(url, part, progress=progress, timeout=timeout)
            break
        except _Interrupted as exc:
            if attempt == retries:
                raise FetchError(f"download of {url} interrupted at {exc}; run the same command "
                                 f"again to resume from {part}") from exc
    try:
        verify(part, prefix, "it was deleted: run the same command again; if this repeats, the "
               "URL does not serve the official file")
    except FetchError:
        part.unlink()
        raise
    os.replace(part, target)
    return target


class _Interrupted(Exception):
    """The connection broke mid-file; the .part file keeps what arrived."""


def _download(url: str, part: Path, *, progress: bool, timeout: float) -> None:
    from tqdm import tqdm

    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to fetch: the .part is complete
            return
        raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}; check the URL "
                         "(--url) or download the file by hand into the cache dir") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FetchError(f"cannot reach {url} ({reason}); are you offline? Download it "
                         f"elsewhere and copy it to {part.parent / part.name[:-5]}") from exc
    with response:
        if response.status == 206:
            start = int(re.match(r"bytes (\d+)-", response.headers.get("Content-Range", "")
                                 or "bytes 0-").group(1))
            if start != have:
                raise FetchError(f"{url}: server resumed at byte {start}, asked for {have}")
        else:  # 200: the server ignored Range, start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        mode = "ab" if have else "wb"
        with part.open(mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                        unit_divisor=1024, desc=part.name[:-5],
                                        disable=not progress) as bar:
            try:
                while block := response.read(_CHUNK):
                    f.write(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException) as exc:  # reset, timeout, short read
                raise _Interrupted(f"{f.tell()} of {total} bytes") from exc
            if total is not None and f.tell() < total:
                raise _Interrupted(f"{f.tell()} of {total} bytes")
