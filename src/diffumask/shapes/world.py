"""The shapes world: procedural scenes whose per-pixel class masks are known exactly.

Every scene is a pure function of an integer seed. Shapes are rasterised by testing each pixel
centre against an analytic description of the shape (no anti-aliasing), and the object's colour
is painted exactly where its mask is, so the mask *is* the drawing: there is no annotation error.
Backgrounds are grey (R = G = B) and objects saturated, so "where is the object" can also be read
back from a generated image by its chroma.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")

#: Named saturated object colours (RGB). Well separated in hue so that two objects in one
#: scene can be told apart by colour alone.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 190, 40),
    "blue": (35, 70, 230),
    "yellow": (235, 215, 25),
    "orange": (245, 130, 20),
    "purple": (140, 40, 215),
    "cyan": (25, 200, 215),
    "pink": (240, 70, 170),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
TEXTURES: tuple[str, ...] = ("plain", "striped", "checkered", "noisy", "dotted")

DEFAULT_SIZE = 32
#: Object radius as a fraction of the image size, for scenes with one object and with several.
_RADIUS_SINGLE = (0.25, 0.4)
_RADIUS_MULTI = (0.18, 0.3)
#: Probability of 1, 2 and 3 objects in a scene.
COUNT_PROBS = (0.5, 0.3, 0.2)
#: An object is only kept when at least this fraction of it stays visible under later objects.
_MIN_VISIBLE = 0.6

# Split seeds live in disjoint integer ranges: split k of world seed s uses
# s * _SEED_STRIDE + k * _SPLIT_STRIDE + i for i < _SPLIT_STRIDE.
_SPLIT_STRIDE = 10**7
_SEED_STRIDE = 10 * _SPLIT_STRIDE
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass
class Scene:
    """One rendered scene: image, exact class mask, caption and the objects drawn (in order)."""

    seed: int
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8: 0 background, 1 + CLASSES.index(name) for objects
    objects: list[tuple[str, str]]  # (class, colour) in drawing order; later ones occlude earlier
    texture: str
    caption: str
    instance_masks: list[np.ndarray] = field(repr=False, default_factory=list)  # visible pixels


def class_index(name: str) -> int:
    """Label of a class in masks: 0 is background, so classes start at 1."""
    return 1 + CLASSES.index(name)


def caption_for(objects: Iterable[tuple[str, str]], texture: str | None,
                colours: bool = True) -> str:
    """Caption naming every object: 'a red circle, a blue star and a cyan ring on a plain background'.

    ``texture=None`` drops the background phrase and ``colours=False`` the colour adjectives; the
    trainer uses both to teach the model shorter prompts such as 'a circle'.
    """
    phrases = [f"{'an' if colour == 'orange' else 'a'} {colour} {shape}" if colours else f"a {shape}"
               for shape, colour in objects]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{text} on a {texture} background" if texture else text


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    """Inside test for a shape centred at the origin in its own (rotated) frame (u, v)."""
    rho = np.hypot(u, v)
    if shape == "circle":
        return rho <= radius
    if shape == "ring":
        return (rho <= radius) & (rho >= 0.55 * radius)
    if shape == "square":
        half = 0.78 * radius
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if shape == "cross":
        arm = 0.32 * radius
        return ((np.abs(u) <= arm) & (np.abs(v) <= radius)) | ((np.abs(v) <= arm) & (np.abs(u) <= radius))
    if shape == "triangle":
        # Equilateral triangle with circumradius R: inside all three edges at distance R / 2.
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = np.pi / 2 + np.pi + 2 * np.pi * k / 3  # outward normals, apex pointing up (-v)
            inside &= u * np.cos(a) + v * np.sin(a) <= radius / 2
        return inside
    if shape == "star":
        # Fold the plane into one half-sector of 36 degrees (tip on the axis), then test against
        # the edge from the tip (R, 0) to the inner vertex at angle 36 degrees.
        sector = 2 * np.pi / 5
        theta = np.mod(np.arctan2(v, u) + np.pi / 2, sector)
        beta = np.minimum(theta, sector - theta)
        x, y = rho * np.cos(beta), rho * np.sin(beta)
        tip = np.array([radius, 0.0])
        inner_r = 0.45 * radius
        inner = np.array([inner_r * np.cos(sector / 2), inner_r * np.sin(sector / 2)])
        edge = inner - tip
        return edge[0] * (y - tip[1]) - edge[1] * (x - tip[0]) >= 0
    raise ValueError(f"unknown shape {shape!r}; expected one of {CLASSES}")


def draw_shape(shape: str, size: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Boolean (size, size) mask of one shape, sampled at pixel centres."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy = xs - cx, ys - cy
    c, s = np.cos(angle), np.sin(angle)
    return _shape_mask(shape, c * dx + s * dy, -s * dx + c * dy, radius)


def background(rng: np.random.Generator, texture: str, size: int) -> np.ndarray:
    """Grey (unsaturated) background texture as a (size, size) uint8 luminance image."""
    lo, hi = sorted(rng.uniform(40, 215, size=2))
    if hi - lo < 40:  # keep patterned textures visible
        lo, hi = max(0.0, lo - 20), min(255.0, hi + 20)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    if texture == "plain":
        grey = np.full((size, size), rng.uniform(40, 215))
    elif texture == "striped":
        period = rng.uniform(4, 9)
        a = rng.uniform(0, np.pi)
        grey = np.where(np.mod(xs * np.cos(a) + ys * np.sin(a), period) < period / 2, lo, hi)
    elif texture == "checkered":
        cell = rng.uniform(3, 7)
        grey = np.where((np.floor(xs / cell) + np.floor(ys / cell)) % 2 == 0, lo, hi)
    elif texture == "noisy":
        grey = rng.normal((lo + hi) / 2, 25, size=(size, size))
    elif texture == "dotted":
        step = rng.uniform(5, 8)
        dot = rng.uniform(1.0, 1.8)
        fx, fy = np.mod(xs, step) - step / 2, np.mod(ys, step) - step / 2
        grey = np.where(np.hypot(fx, fy) <= dot, lo, hi)
    else:
        raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)


def render_scene(seed: int, size: int = DEFAULT_SIZE, num_objects: int | None = None) -> Scene:
    """Render the scene of ``seed`` (the same seed always gives the same scene).

    ``num_objects`` fixes the object count (1-3); by default it is drawn from the world's mix.
    Objects in one scene have distinct classes and distinct colours, so a caption never names
    two identical objects and colour alone tells objects apart.
    """
    rng = np.random.default_rng(seed)
    count = num_objects if num_objects is not None else int(rng.choice(3, p=COUNT_PROBS)) + 1
    if not 1 <= count <= 3:
        raise ValueError("num_objects must be 1, 2 or 3")
    texture = str(rng.choice(TEXTURES))
    grey = background(rng, texture, size)
    image = np.repeat(grey[..., None], 3, axis=2)
    mask = np.zeros((size, size), np.uint8)
    owner = np.full((size, size), -1, np.int64)

    shapes = rng.choice(len(CLASSES), size=count, replace=False)
    colours = rng.choice(len(COLOURS), size=count, replace=False)
    lo, hi = _RADIUS_SINGLE if count == 1 else _RADIUS_MULTI
    drawn: list[np.ndarray] = []
    for k in range(count):
        shape = CLASSES[shapes[k]]
        for _ in range(50):  # re-place until the new object leaves earlier ones visible enough
            radius = rng.uniform(lo, hi) * size
            cx, cy = rng.uniform(radius * 0.8, size - radius * 0.8, size=2)
            shape_px = draw_shape(shape, size, cx, cy, radius, rng.uniform(0, 2 * np.pi))
            ok = shape_px.sum() >= 8 and all(
                (d & ~shape_px).sum() >= _MIN_VISIBLE * d.sum() for d in drawn)
            if ok:
                break
        drawn.append(shape_px)
        owner[shape_px] = k
        mask[shape_px] = class_index(shape)
        image[shape_px] = PALETTE[COLOURS[colours[k]]]

    objects = [(CLASSES[shapes[k]], COLOURS[colours[k]]) for k in range(count)]
    return Scene(seed=seed, image=image, mask=mask, objects=objects, texture=texture,
                 caption=caption_for(objects, texture),
                 instance_masks=[owner == k for k in range(count)])


def split_seeds(split: str, n: int, seed: int = 0) -> range:
    """Scene seeds of one split: disjoint integer ranges, so splits can never share a scene."""
    if n > _SPLIT_STRIDE:
        raise ValueError(f"at most {_SPLIT_STRIDE} scenes per split")
    start = seed * _SEED_STRIDE + SPLITS.index(split) * _SPLIT_STRIDE
    return range(start, start + n)


def export_world(out_dir: str | Path, n_train: int, n_val: int, n_test: int, seed: int = 0,
                 size: int = DEFAULT_SIZE) -> Path:
    """Write train / val / test scenes as one dataset directory (the 'real data' of experiments).

    Resumable: scenes already in the manifest are skipped. Images are PNG so pixels stay exact.
    """
    from diffumask.dataset import OBJECT_FOLDER, Dataset, write_palette_png
    from diffumask.distributed import Worker, require_one_process
    from diffumask.errors import ConfigError

    require_one_process("shapes export")

    counts = {"--train": n_train, "--val": n_val, "--test": n_test}
    if min(counts.values()) < 0 or sum(counts.values()) < 1:
        raise ConfigError(f"scene counts must be 0 or more and not all 0, got "
                          f"{', '.join(f'{k} {v}' for k, v in counts.items())}")
    if not 8 <= size:
        raise ConfigError(f"scenes must be at least 8 px, got {size}")
    settings = {"source": "shapes-world", "seed": seed, "size": size,
                "splits": {"train": n_train, "val": n_val, "test": n_test}}
    ds = Dataset.create(out_dir, classes=list(CLASSES), settings=settings, image_format="png", worker=Worker())
    scenes = [(f"{split}_{i:06d}", split, scene_seed) for split, n in zip(SPLITS, (n_train, n_val, n_test))
              for i, scene_seed in enumerate(split_seeds(split, n, seed))]
    with ds.writing():  # validate and readers tell this job in flight from a killed one's leftovers
        done = ds.finished_whole(item_id for item_id, _, _ in scenes)  # an item whose files are gone is made again
        for item_id, split, scene_seed in scenes:
            if item_id in done:
                continue
            scene = render_scene(scene_seed, size)
            record = {"prompt": scene.caption, "seed": scene_seed,
                      "classes": sorted({c for c, _ in scene.objects}, key=CLASSES.index),
                      "objects": [{"class": c, "colour": col} for c, col in scene.objects],
                      "texture": scene.texture, "size": [size, size], "source": "shapes-world"}
            objects = np.zeros((size, size), np.uint8)  # VOC's SegmentationObject: instance number per pixel
            for number, visible in enumerate(scene.instance_masks, start=1):
                objects[visible] = number
            write_palette_png(Path(out_dir) / OBJECT_FOLDER / f"{item_id}.png", objects)
            ds.write_item(item_id, scene.image, record, mask=scene.mask, split=split)  # its line comes last
        ds.finalize(complete={item_id for item_id, _, _ in scenes})  # then a killed run's temporary files go
    return Path(out_dir)
