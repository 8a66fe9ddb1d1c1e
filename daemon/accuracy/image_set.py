"""The images of an evaluation: that each one is there and opens, then RGB pixels in batches.

Pillow decodes them (a daemon dependency already; no torchvision). Every file's header is read
up front (no pixels, a fraction of a millisecond), so a missing, unreadable or mis-sized image
stops the run before an engine loads. Pixels are decoded in worker threads a few batches ahead
of the engine: Pillow releases the GIL while it decodes.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from codetr_stream.daemon.accuracy.coco import DatasetError, ImageEntry
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@contextlib.contextmanager
def _reading(path: Path, source: str) -> Iterator[None]:
    """Pillow's many failure types -> one line naming the image and the fix."""
    try:
        yield
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such image (listed in {source}); fix --images or the "
                           "entry's file_name") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: unreadable image ({exc}); replace the file, or remove it "
                           f"from {source}") from None


def _size(path: Path, source: str) -> tuple[int, int]:
    with _reading(path, source), Image.open(path) as image:
        return image.size


def check_images(images_dir: Path, entries: Sequence[ImageEntry], source: str) -> list[Path]:
    """Each entry's file under `images_dir`, checked to open at the size the entries give (boxes
    are in those pixels)."""
    paths = []
    for entry in entries:
        path = images_dir / entry.file_name
        width, height = _size(path, source)
        if (width, height) != (entry.width, entry.height):
            raise DatasetError(f"{path}: is {width}x{height} but {source} says {entry.width}x"
                               f"{entry.height} (image id {entry.id}); fix its width/height, or "
                               "use the original image")
        paths.append(path)
    return paths


def scan_images(images_dir: Path) -> list[ImageEntry]:
    """The image files directly in `images_dir`, by name, numbered from 1 (for agreement AP,
    which needs no annotation file)."""
    files = sorted(p for p in images_dir.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"{images_dir}: no images ({', '.join(IMAGE_SUFFIXES)}); pass the "
                           "directory that holds them")
    source = f"--images {images_dir}"
    return [ImageEntry(i, p.name, *_size(p, source)) for i, p in enumerate(files, 1)]


def read_rgb(path: Path, source: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB, whatever the file's mode (greyscale, palette, CMYK, alpha)."""
    with _reading(path, source), Image.open(path) as image:
        return np.array(image.convert("RGB"))


def decoded_batches(paths: Sequence[Path], batch_size: int, source: str, *,
                    ahead: int = 2) -> Iterator[list[np.ndarray]]:
    """The images in order, `batch_size` at a time, `ahead` batches decoding in the background
    (memory stays bounded to those)."""
    chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]

    def read(chunk: Sequence[Path]) -> list[np.ndarray]:
        return [read_rgb(path, source) for path in chunk]

    with ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="decode") as pool:
        pending = deque(pool.submit(read, chunk) for chunk in chunks[:ahead])
        try:
            for i in range(len(chunks)):
                if i + ahead < len(chunks):
                    pending.append(pool.submit(read, chunks[i + ahead]))
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
