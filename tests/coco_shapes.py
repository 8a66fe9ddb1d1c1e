"""A labelled image set made on the spot: drawn rectangles and ellipses, their boxes as COCO
annotations. For the eval tests, and for the GPU machine, which cannot download COCO.

Boxes are the exact pixel extent of each drawn shape, shapes of one image never overlap (so
which box a detection belongs to is never in doubt), and their sizes span COCO's small (< 32^2
px), medium and large areas. Categories are given class names with given ids (COCO's own 80 ids,
1..90 with gaps, by default for COCO's names), so the mapping from a model's class index to a
category id is exercised too.

    python tests/coco_shapes.py --out DIR [--images N] [--classes-from ENGINE_DIR]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# COCO's category ids of its 80 detection classes, in the order of the model's class index.
COCO_IDS = (*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
            *range(72, 83), *range(84, 91))
SIZES = ((320, 240), (400, 300), (240, 320), (360, 270))  # W x H; the third is portrait
AREAS = ((12, 30), (40, 90), (100, 160))  # box side ranges: small, medium, large


def _place(rng: np.random.Generator, width: int, height: int, taken: list[list[int]],
           side_range: tuple[int, int]) -> list[int] | None:
    """A box [x0, y0, x1, y1) inside the image that overlaps no box in `taken`."""
    for _ in range(50):
        w, h = (int(v) for v in rng.integers(*side_range, size=2))
        w, h = min(w, width - 2), min(h, height - 2)
        x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        box = [x0, y0, x0 + w, y0 + h]
        if all(box[2] <= t[0] or t[2] <= box[0] or box[3] <= t[1] or t[3] <= box[1]
               for t in taken):
            return box
    return None


def make_set(out: Path, class_names: Sequence[str], *, images: int = 8, seed: int = 0,
             classes: Sequence[int] = (0, 2, 11, 16, 79), category_ids: Sequence[int] | None = None,
             sizes: Sequence[tuple[int, int]] = SIZES) -> tuple[Path, Path]:
    """`images` pictures in out/images and out/annotations.json; returns both paths. Shapes
    are labelled with the class indexes in `classes` (taken modulo the number of classes)."""
    if category_ids is None:
        category_ids = COCO_IDS if len(class_names) == len(COCO_IDS) else range(
            1, len(class_names) + 1)
    rng = np.random.default_rng(seed)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    records, annotations = [], []
    for index in range(images):
        width, height = sizes[index % len(sizes)]
        background = rng.integers(0, 256, size=3)
        ramp = np.linspace(0, 60, width)[None, :, None]
        pixels = np.clip(background + ramp + rng.normal(0, 8, (height, width, 3)), 0, 255)
        picture = Image.fromarray(pixels.astype(np.uint8))
        draw = ImageDraw.Draw(picture)
        taken: list[list[int]] = []
        for k in range(int(rng.integers(2, 6))):
            box = _place(rng, width, height, taken, AREAS[(index + k) % len(AREAS)])
            if box is None:
                continue
            taken.append(box)
            colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
            mask = Image.new("L", (width, height))
            shape = ImageDraw.Draw(mask)
            x0, y0, x1, y1 = box
            if k % 2:
                shape.ellipse([x0, y0, x1 - 1, y1 - 1], fill=255)
            else:
                shape.rectangle([x0, y0, x1 - 1, y1 - 1], fill=255)
            draw.bitmap((0, 0), mask, fill=colour)
            left, top, right, bottom = mask.getbbox()
            label = classes[(index + k) % len(classes)] % len(class_names)
            annotations.append({
                "id": len(annotations) + 1, "image_id": index + 1,
                "category_id": int(category_ids[label]), "iscrowd": 0,
                "bbox": [left, top, right - left, bottom - top],
                "area": (right - left) * (bottom - top)})
        name = f"{index:04d}." + ("png" if index % 3 == 2 else "jpg")
        picture.save(image_dir / name, quality=95)
        records.append({"id": index + 1, "file_name": name, "width": width, "height": height})
    path = out / "annotations.json"
    path.write_text(json.dumps({
        "images": records, "annotations": annotations,
        "categories": [{"id": int(i), "name": n}
                       for i, n in zip(category_ids, class_names, strict=True)]}))
    return image_dir, path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes-from", type=Path, metavar="ENGINE_DIR",
                        help="the engine whose class names label the set (default: COCO's)")
    parser.add_argument("--sizes", default="640x480,640x427,480x640,500x375",
                        help="image sizes WxH, cycled")
    args = parser.parse_args()
    if args.classes_from is not None:
        manifest = json.loads((args.classes_from / "manifest.json").read_text())
        names = manifest["class_names"]
    else:
        from codetr_stream.compile.coco_classes import COCO_CLASSES

        names = list(COCO_CLASSES)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    images, annotations = make_set(args.out, names, images=args.images, seed=args.seed,
                                   sizes=sizes)
    print(f"{args.images} images in {images}, annotations {annotations}")


if __name__ == "__main__":
    main()
