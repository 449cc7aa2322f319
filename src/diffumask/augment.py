"""Mask-consistent augmentation, the paper's Φ1–Φ4: a dataset folder in, a new dataset folder out.

- Φ1 splicing: k×k mosaics of items, each tile resized to its share of the output size (the
  official code pasted full 512 px images into mosaics of up to 4096 px; here a mosaic has the
  training size, so its objects are k times smaller, which is the point).
- Φ2 Gaussian blur: the image only.
- Φ3 occlusion: a rectangle of another item pasted with its labels, so the mask follows what is
  visible.
- Φ4 perspective: each corner moved by up to a fraction of the side; the mask is warped with
  nearest-neighbour sampling and pixels from outside the image become 255 (ignored).
- Copy-paste (ours, not the paper's; off by default): objects cut out of random items by their masks,
  shrunk and pasted, so that scenes of one large object become scenes of several at several sizes,
  as real benchmarks hold them. Applied after the mosaic, before Φ2–Φ4.

The paper gives no parameters for Φ2–Φ4; the defaults are ours and in :class:`AugmentConfig`. Warps
and blurs are kornia's. Every choice for output item *i* comes from a generator seeded by
(seed, i), so a run writes the same bytes every time, and a killed run resumes where it stopped.
Each output item's manifest line names its sources and every transform with its parameters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from kornia.filters import gaussian_blur2d
from kornia.geometry.transform import get_perspective_transform, warp_perspective
from scipy import ndimage
from tqdm.auto import tqdm

from .dataset import IGNORE_INDEX, Dataset, resize_labels
from .distributed import Worker, require_one_process
from .errors import ConfigError, DiffumaskError, check_sequences

Pair = tuple[np.ndarray, np.ndarray]  # (H, W, 3) uint8 image, (H, W) uint8 labels
_PASTE_TRIES = 10  # random places tried for a pasted object before it is left out


@dataclass(frozen=True)
class AugmentConfig:
    """What ``diffumask augment`` writes (recorded in the new dataset; see ``--help``)."""

    grids: tuple[int, ...] = (2,)  # Φ1: each output is a k×k mosaic, k drawn from these (1: one item)
    split: str = "train"  # the source items drawn from: a manifest split or an ImageSets list (filter's)
    items: int | None = None  # outputs; None: as many as the source has
    size: int | None = None  # output side in pixels; None: the source's first image's height
    blur: float = 0.5  # Φ2: probability per output
    blur_sigma: tuple[float, float] = (0.5, 1.5)  # its σ range in pixels of the output
    occlusion: float = 0.5  # Φ3: probability per output
    occlusion_side: tuple[float, float] = (0.15, 0.35)  # the pasted rectangle's sides, fractions of the image's
    perspective: float = 0.5  # Φ4: probability per output
    perspective_shift: float = 0.15  # each corner moves by up to this fraction of the side
    paste: float = 0.0  # copy-paste: probability per output (ours, not the paper's)
    paste_objects: tuple[int, int] = (1, 2)  # how many random items' objects are pasted, at least and at most
    paste_scale: tuple[float, float] = (0.5, 0.9)  # a pasted item's side, as a fraction of the output's
    paste_keep: float = 0.6  # every object shown (the item's own, each pasted one) keeps at least this share
    seed: int = 0

    def __post_init__(self) -> None:
        check_sequences("AugmentConfig", grids=(self.grids, "(2, 3)"), blur_sigma=(self.blur_sigma, "(0.5, 1.5)"),
                        occlusion_side=(self.occlusion_side, "(0.15, 0.35)"),
                        paste_objects=(self.paste_objects, "(1, 2)"), paste_scale=(self.paste_scale, "(0.5, 0.9)"))
        if not self.grids or min(self.grids) < 1:
            raise ConfigError(f"--grids must be whole numbers of at least 1 (1: no mosaic), got {list(self.grids)}")
        for name, value in (("--blur", self.blur), ("--occlusion", self.occlusion), ("--perspective", self.perspective),
                            ("--paste", self.paste)):
            if not 0 <= value <= 1:
                raise ConfigError(f"{name} is a probability per item, in [0, 1], got {value}")
        if not 0 <= self.perspective_shift < 0.5:
            raise ConfigError(f"--perspective-shift must lie in [0, 0.5), got {self.perspective_shift}")
        for name, (low, high) in (("blur σ", self.blur_sigma), ("occlusion side", self.occlusion_side)):
            if not 0 < low <= high:
                raise ConfigError(f"the {name} range must satisfy 0 < low <= high, got ({low}, {high})")
        if self.occlusion_side[1] > 1:
            raise ConfigError("the occlusion side is a fraction of the image's, at most 1")
        low, high = self.paste_scale
        if not 0 < low <= high <= 1:
            raise ConfigError(f"--paste-scale is a fraction of the image's side, 0 < low <= high <= 1, got ({low}, {high})")
        if not 0 <= self.paste_keep <= 1:
            raise ConfigError(f"--paste-keep is the share of each object's pixels kept visible, in [0, 1], "
                              f"got {self.paste_keep}")
        low, high = self.paste_objects
        if not 1 <= low <= high:
            raise ConfigError(f"--paste-objects must be whole numbers with 1 <= at least <= at most, got ({low}, {high})")
        if self.items is not None and self.items < 1 or self.size is not None and self.size < 8:
            raise ConfigError("--items must be at least 1 and --size at least 8 pixels")


def resize_pair(image: np.ndarray, labels: np.ndarray, size: tuple[int, int]) -> Pair:
    """Image by area averaging (shrinking) or bilinear (growing), labels where the image lands (resize_labels);
    size (h, w)."""
    h, w = size
    shrink = h * w < labels.size
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return image, resize_labels(labels, (w, h))


def mosaic(pairs: Sequence[Pair], k: int, size: int) -> Pair:
    """Φ1: ``k²`` items, row by row, as one ``size``×``size`` item (tile sides differ by a pixel at most)."""
    if len(pairs) != k * k:
        raise ValueError(f"a {k}x{k} mosaic needs {k * k} items, got {len(pairs)}")
    edges = np.linspace(0, size, k + 1).round().astype(int)
    image = np.zeros((size, size, 3), np.uint8)
    labels = np.zeros((size, size), np.uint8)
    for index, (tile_image, tile_labels) in enumerate(pairs):
        (y0, y1), (x0, x1) = edges[index // k:index // k + 2], edges[index % k:index % k + 2]
        image[y0:y1, x0:x1], labels[y0:y1, x0:x1] = resize_pair(tile_image, tile_labels, (y1 - y0, x1 - x0))
    return image, labels


def _tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()


def _image(tensor: torch.Tensor) -> np.ndarray:
    return tensor[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Φ2: the image blurred with a Gaussian of ``sigma`` pixels (kernel ±3σ); labels stay as they are."""
    side = 2 * math.ceil(3 * sigma) + 1
    return _image(gaussian_blur2d(_tensor(image), (side, side), (sigma, sigma)))


def occlude(image: np.ndarray, labels: np.ndarray, patch: Pair, box: tuple[int, int, int, int]) -> Pair:
    """Φ3: the (y0, x0, y1, x1) rectangle of ``patch`` (an item at this item's size) pasted over this
    one, pixels and labels alike."""
    y0, x0, y1, x1 = box
    image, labels = image.copy(), labels.copy()
    image[y0:y1, x0:x1], labels[y0:y1, x0:x1] = patch[0][y0:y1, x0:x1], patch[1][y0:y1, x0:x1]
    return image, labels


def paste_object(image: np.ndarray, labels: np.ndarray, donor: Pair, at: tuple[int, int]) -> Pair:
    """Copy-paste: every pixel of ``donor`` that is not background (its objects, and 255 where its mask
    is unsure) pasted with its label, the donor's top-left corner at ``at`` = (y, x); the donor must fit."""
    donor_image, donor_labels = donor
    y, x = at
    h, w = donor_labels.shape
    if y < 0 or x < 0 or y + h > labels.shape[0] or x + w > labels.shape[1]:
        raise ValueError(f"a {h}x{w} donor at {at} does not fit a {labels.shape[0]}x{labels.shape[1]} image")
    image, labels = image.copy(), labels.copy()
    cut = donor_labels != 0
    image[y:y + h, x:x + w][cut] = donor_image[cut]
    labels[y:y + h, x:x + w][cut] = donor_labels[cut]
    return image, labels


def hidden_share(owners: np.ndarray, sizes: Mapping[int, int], cut: np.ndarray, at: tuple[int, int]) -> float:
    """The largest share of any object that would be hidden once ``cut`` (a boolean cut-out) lands with
    its top-left corner at ``at``: objects are the ids in ``owners`` (0: none) and ``sizes`` their pixel
    counts when they were placed, so hiding adds up over several pastes."""
    y, x = at
    under = owners[y:y + cut.shape[0], x:x + cut.shape[1]][cut]
    worst = 0.0
    for owner in np.unique(under[under > 0]):
        visible = np.count_nonzero(owners == owner) - np.count_nonzero(under == owner)
        worst = max(worst, 1 - visible / sizes[int(owner)])
    return worst


def object_owners(labels: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
    """Each object of an item numbered 1, 2, ... (0: background and 255): the connected regions of each
    class (4-connected), so that tiles of one class in a mosaic count apart; and each one's pixel count."""
    owners = np.zeros(labels.shape, np.int32)
    for value in np.unique(labels):
        if value in (0, IGNORE_INDEX):
            continue
        regions, _ = ndimage.label(labels == value)
        owners[regions > 0] = regions[regions > 0] + owners.max()
    ids, counts = np.unique(owners[owners > 0], return_counts=True)
    return owners, dict(zip(ids.tolist(), counts.tolist()))


def object_box(labels: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, x0, y1, x1) around the pixels that are not background, or None when there are none."""
    ys, xs = np.nonzero(labels != 0)
    return None if ys.size == 0 else (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)


def perspective(image: np.ndarray, labels: np.ndarray, corners: np.ndarray) -> Pair:
    """Φ4: the image's corners (top-left, top-right, bottom-right, bottom-left, as x, y) moved to
    ``corners``; labels warped by nearest neighbour, 255 where a pixel comes from outside the image."""
    h, w = labels.shape
    source = torch.tensor([[[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]]], dtype=torch.float32)
    matrix = get_perspective_transform(source, torch.as_tensor(corners, dtype=torch.float32)[None])
    warped = _image(warp_perspective(_tensor(image), matrix, (h, w), mode="bilinear", padding_mode="zeros"))
    # Labels shifted by one so that the zero padding marks the outside: 0 → 255, v → v - 1.
    shifted = torch.from_numpy(labels.astype(np.float32) + 1)[None, None]
    moved = warp_perspective(shifted, matrix, (h, w), mode="nearest", padding_mode="zeros")[0, 0].round().to(torch.int64)
    out = np.where(moved.numpy() == 0, IGNORE_INDEX, moved.numpy() - 1).astype(np.uint8)
    return warped, out


def random_corners(size: tuple[int, int], shift: float, rng: np.random.Generator) -> np.ndarray:
    """Φ4's target corners: each of the (h, w) image's corners moved by up to ``shift`` of its side."""
    h, w = size
    corners = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], np.float64)
    return corners + rng.uniform(-1, 1, size=(4, 2)) * shift * np.array([w - 1, h - 1])


def paste_objects(image: np.ndarray, labels: np.ndarray, ids: Sequence[str], read: Callable[[str], Pair],
                  config: AugmentConfig, size: int, rng: np.random.Generator, transforms: list[dict[str, Any]]) -> Pair:
    """Copy-paste: the objects of random items (possibly one of this item's own sources), each item
    shrunk to a side of ``config.paste_scale``, cut out by its mask and pasted where every object already
    shown (each connected region of a class, so each tile's object in a mosaic, and each pasted object)
    keeps at least ``config.paste_keep`` of its pixels; an object with no such place is left out. Each
    paste is appended to ``transforms``."""
    owners, sizes = object_owners(labels)
    for _ in range(int(rng.integers(config.paste_objects[0], config.paste_objects[1] + 1))):
        other = ids[int(rng.integers(len(ids)))]
        side = max(1, int(round(size * rng.uniform(*config.paste_scale))))
        donor_image, donor_labels = resize_pair(*read(other), (side, side))
        if (box := object_box(donor_labels)) is None:  # nothing to cut out of this one
            continue
        y0, x0, y1, x1 = box
        cut = (donor_image[y0:y1, x0:x1], donor_labels[y0:y1, x0:x1])
        shape = cut[1] != 0
        for _ in range(_PASTE_TRIES):
            at = int(rng.integers(size - (y1 - y0) + 1)), int(rng.integers(size - (x1 - x0) + 1))
            if hidden_share(owners, sizes, shape, at) <= 1 - config.paste_keep:
                image, labels = paste_object(image, labels, cut, at)
                owner = max(sizes, default=0) + 1
                owners[at[0]:at[0] + shape.shape[0], at[1]:at[1] + shape.shape[1]][shape] = owner
                sizes[owner] = int(shape.sum())
                transforms.append({"name": "paste", "source": other, "side": side, "at": list(at)})
                break
    return image, labels


def augment_item(index: int, ids: Sequence[str], read: Callable[[str], Pair], config: AugmentConfig,
                 size: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Output item ``index``: its image, mask and what made it (sources, transforms, parameters)."""
    return compose(np.random.default_rng([config.seed, index]), ids, read, config, size)


def compose(rng: np.random.Generator, ids: Sequence[str], read: Callable[[str], Pair], config: AugmentConfig,
            size: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One ``size``×``size`` augmented item drawn by ``rng`` from the items ``ids`` (``read`` gives an
    id's image and labels): ``augment`` writes these, ``train --augment mosaic,paste`` makes them per sample."""
    k = int(rng.choice(config.grids))
    sources = [ids[int(i)] for i in rng.integers(len(ids), size=k * k)]
    image, labels = mosaic([read(i) for i in sources], k, size)
    transforms: list[dict[str, Any]] = []
    if config.paste and rng.random() < config.paste:  # no draw when off: older settings keep their bytes
        image, labels = paste_objects(image, labels, ids, read, config, size, rng, transforms)
    if rng.random() < config.blur:
        sigma = float(rng.uniform(*config.blur_sigma))
        image = gaussian_blur(image, sigma)
        transforms.append({"name": "blur", "sigma": round(sigma, 4)})
    if rng.random() < config.occlusion:
        other = ids[int(rng.integers(len(ids)))]
        bh, bw = (max(1, int(round(size * rng.uniform(*config.occlusion_side)))) for _ in range(2))
        y0, x0 = int(rng.integers(size - bh + 1)), int(rng.integers(size - bw + 1))
        image, labels = occlude(image, labels, resize_pair(*read(other), (size, size)), (y0, x0, y0 + bh, x0 + bw))
        transforms.append({"name": "occlusion", "source": other, "box": [y0, x0, y0 + bh, x0 + bw]})
    if rng.random() < config.perspective:
        corners = random_corners((size, size), config.perspective_shift, rng)
        image, labels = perspective(image, labels, corners)
        transforms.append({"name": "perspective", "corners": np.round(corners, 2).tolist()})
    return image, labels, {"sources": sources, "grid": k, "transforms": transforms}


def augment_dataset(source: str | Path, out: str | Path, config: AugmentConfig, progress: bool = True) -> Dataset:
    """Run ``augment`` (see the module docstring): finished items are skipped on a re-run."""
    require_one_process("augment")
    dataset = Dataset(source)
    if Path(out).resolve() == dataset.root.resolve():
        raise ConfigError(f"--out {out} is the dataset being augmented; augment writes a new dataset folder beside it "
                          f"(e.g. --out {dataset.root}-aug), and train reads both")
    listed = set(dataset.split_ids(config.split))  # ImageSets' list, as train reads it: `--split filtered` too
    everything = dataset.records()
    records = [r for r in everything if (r["id"] in listed if listed else r.get("split", "train") == config.split)]
    if unknown := listed - {r["id"] for r in everything}:
        raise DiffumaskError(f"ImageSets/Segmentation/{config.split}.txt of {dataset.root} lists {len(unknown)} item(s) "
                             f"the manifest lacks (e.g. {min(unknown)}); write the list again (filter --recut)")
    if not records:
        raise DiffumaskError(f"{dataset.root} holds no finished items in split {config.split!r} to augment")
    ids = [r["id"] for r in records]
    dataset.require_files(ids, "mask", "augment needs a dataset with masks (SegmentationClass)")
    size = config.size or dataset.read_image(ids[0]).shape[0]
    config = dataclasses.replace(config, size=size, items=config.items or len(ids))
    recorded = dataclasses.asdict(config)
    if not config.paste:  # without copy-paste, the settings (and bytes) of versions before it: those resume
        recorded = {k: v for k, v in recorded.items() if not k.startswith("paste")}
    settings = {"augment": recorded, "source": str(dataset.root.resolve())}
    if config.split not in {r.get("split", "train") for r in everything}:  # a selection (filter's) may be cut again
        settings["source_ids"] = hashlib.sha256("".join(f"{i}\n" for i in sorted(ids)).encode()).hexdigest()[:16]
    target = Dataset.create(out, dataset.classes, settings, image_format=dataset.image_format, worker=Worker())

    def read(item_id: str) -> Pair:
        return dataset.read_image(item_id), dataset.read_mask(item_id)

    every = [f"aug_{i:06d}" for i in range(config.items)]
    with target.writing():  # validate and readers tell this job in flight from a killed one's leftovers
        done = target.finished_whole(every)  # an item whose files are gone is made again
        todo = [i for i, item_id in enumerate(every) if item_id not in done]
        for index in tqdm(todo, desc="augment", unit="img", disable=not progress, dynamic_ncols=True):
            image, labels, made = augment_item(index, ids, read, config, size)
            present = [target.classes[v - 1] for v in np.unique(labels) if 0 < v <= len(target.classes)]
            target.write_item(every[index], image, {"classes": present, "seed": config.seed, **made}, mask=labels)
        target.finalize(order=every, complete=set(every))  # with every item written, a killed run's temporaries go
    return target


__all__ = ["AugmentConfig", "augment_dataset", "augment_item", "compose", "gaussian_blur", "hidden_share", "mosaic",
           "object_box", "object_owners", "occlude", "paste_object", "paste_objects", "perspective", "random_corners",
           "resize_pair"]
