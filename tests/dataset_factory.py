"""Small dataset folders for the exporter, validate and report tests, in seconds and without a model.

Scenes come from the shapes world (one to three objects, exact masks, object layers), with the world's
classes renamed so that Cityscapes and ADE20K names occur, a 255 band along every object's edge,
``SegmentationObject`` for every other item, and soft maps shaped like ``generate``'s.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from diffumask.dataset import IGNORE_INDEX, Dataset, write_palette_png
from diffumask.shapes.world import render_scene

#: shapes classes circle, square, triangle, star, ring, cross under other names; "dog" is in neither
#: Cityscapes nor ADE20K, "tree" only in ADE20K.
MIXED_NAMES = ("car", "person", "road", "sky", "dog", "tree")
ADE_NAMES = ("car", "person", "road", "sky", "wall", "tree")


def _band(mask: np.ndarray) -> np.ndarray:
    """Pixels on the edge of any region: the 255 band a refinement leaves around uncertain borders."""
    kernel = np.ones((3, 3), np.uint8)
    edges = np.zeros(mask.shape, bool)
    for value in np.unique(mask):
        region = (mask == value).astype(np.uint8)
        edges |= (cv2.dilate(region, kernel) != cv2.erode(region, kernel))
    return edges


def make_dataset(root: Path, n: int = 12, names: tuple[str, ...] = MIXED_NAMES, size: int = 48, seed: int = 0,
                 noise: bool = False, soft_maps: bool = True, splits: tuple[str, ...] = ("train", "val")) -> Dataset:
    """``n`` items, several classes per image for most, 255 bands, objects for even items."""
    dataset = Dataset.create(root, list(names), {"source": "test", "threshold": 0.5}, image_format="png")
    rng = np.random.default_rng(seed)
    for k in range(n):
        scene = render_scene(1000 * seed + k, size, num_objects=1 + k % 3)
        mask = scene.mask.copy()
        mask[_band(scene.mask) & (scene.mask > 0)] = IGNORE_INDEX
        item_id = f"item_{k:04d}"
        if k % 2 == 0:
            objects = np.zeros(mask.shape, np.uint8)
            for number, pixels in enumerate(scene.instance_masks, start=1):
                objects[pixels] = number
            objects[mask == IGNORE_INDEX] = IGNORE_INDEX
            write_palette_png(root / "SegmentationObject" / f"{item_id}.png", objects)
        classes = [names[i - 1] for i in sorted(set(np.unique(scene.mask)) - {0})]
        maps = None
        if soft_maps:
            maps = {}
            for name in classes:
                truth = (scene.mask == names.index(name) + 1).astype(np.float32)
                fused = cv2.GaussianBlur(truth, (0, 0), 2.0)
                maps[name] = fused / max(float(fused.max()), 1e-6)
                for grid in (8, 16):
                    maps[f"{name}@{grid}"] = cv2.resize(truth, (grid, grid), interpolation=cv2.INTER_AREA) * 0.1
            maps["__self__@16"] = np.full((256, 256), 1 / 256, np.float32)
        record = {"classes": classes, "prompt": scene.caption, "seed": 1000 * seed + k, "size": [size, size],
                  "tokens": {c: [2 + i] for i, c in enumerate(classes)}}
        if noise:
            record["noise"] = {"score": round(float(rng.random()), 4)}
        dataset.write_item(item_id, scene.image, record, mask=mask, soft_maps=maps, split=splits[k % len(splits)])
    dataset.finalize()
    return dataset


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path: two folders written alike compare equal byte for byte."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
