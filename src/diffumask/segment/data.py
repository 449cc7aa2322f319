"""Training samples for the segmenter: one label space over several sources, seeded augmentation.

Every sample is a pure function of (seed, step, slot): which source and item it shows and how it is
augmented come from a generator seeded by those three numbers. So a run gives the same batches with
any number of loader workers or processes, and a resumed run continues exactly where it stopped
(only the step counter needs saving).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Sampler

from ..augment import AugmentConfig, compose, gaussian_blur, perspective, random_corners
from ..dataset import resize_labels
from ..errors import ConfigError
from ..formats import LabelledSource, SourceError, match_names
from .presets import COMPOSITES, uses_composites

IGNORE_INDEX = 255
CACHE_BYTES = 512 * 2**20  # decoded items kept per training split and process (see SourceSplit)
#: "shift": up to crop/8 px each way, uncovered pixels black and ignored; "channels": a random RGB order;
#: "blur" and "perspective": augment's Φ2 and Φ4, each with p = 0.5. The composites "mosaic", "paste" and
#: "occlusion" make a sample of several items of one DATA, as `diffumask augment` writes them (a 2×2 mosaic,
#: copy-paste of 1-2 other items' objects, Φ3 with p = 0.5), for the schedule's ``composite_share`` of the samples.
AUGMENTATIONS = ("flip", "rot90", "hue", "channels", "shift", "blur", "perspective", *COMPOSITES)
AUGMENT_DEFAULTS = AugmentConfig()  # blur σ, perspective shift, occlusion and paste sizes, as augment draws them
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


@dataclass
class SourceSplit:
    """One DATA argument's split, with the lookup table from its label values to the run's indices.

    With ``cache_limit`` bytes (training with composites sets ``CACHE_BYTES``), decoded items are kept in
    memory, read-only, per split and process: a composite sample reads five or six items, and decoding them
    again every epoch would starve the training step of CPU (a small set, such as the shapes benchmark's, is
    then read from disk once)."""

    source: LabelledSource
    split: str
    ids: list[str]
    lut: np.ndarray  # (256,) uint8: source label value → run class index, 255 where none
    cache_limit: int = 0
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False, compare=False)
    cached_bytes: int = field(default=0, compare=False)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.read_id(self.ids[index])

    def read_id(self, item_id: str) -> tuple[np.ndarray, np.ndarray]:
        if (pair := self.cache.get(item_id)) is None:
            image, labels = self.source.read(item_id)
            pair = (image, self.lut[labels])
            size = pair[0].nbytes + pair[1].nbytes
            if self.cached_bytes + size <= self.cache_limit:
                for array in pair:
                    array.flags.writeable = False  # shared by every later sample: nothing may change it
                self.cache[item_id], self.cached_bytes = pair, self.cached_bytes + size
        return pair

    @cached_property
    def side(self) -> int:
        """A composite sample's side: the height of the split's first image, as `augment` sizes its items (each
        tile is resized to a square: other aspect ratios are squeezed)."""
        return self.read(0)[1].shape[0]


def union_classes(sources: Sequence[LabelledSource]) -> list[str]:
    """The run's classes: background, then every source's classes in first-seen order (aliases merged)."""
    names = ["background"]
    for source in sources:
        earlier = list(names)  # a source's own classes are all distinct, even where an alias joins them
        for name in source.label_names.values():
            if name not in match_names([name], earlier):
                names.append(name)
    return names


def label_lut(source: LabelledSource, run_classes: Sequence[str]) -> np.ndarray:
    """Source label value → run class index (by name), 255 for values the run does not know."""
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    matched = match_names(source.label_names.values(), run_classes)
    for value, name in source.label_names.items():
        if name in matched:
            lut[value] = run_classes.index(matched[name])
    return lut


def negative_lut(source: LabelledSource, run_classes: Sequence[str]) -> np.ndarray:
    """For a negatives source: its pixels of the run's classes keep them, every other class is background
    (a cat's pixels are "not dog" for a dog run), 255 stays ignored."""
    lut = label_lut(source, run_classes)
    known = np.zeros(256, bool)
    known[list(source.label_names)] = True
    lut[(lut == IGNORE_INDEX) & known] = 0
    return lut


def open_splits(sources: Sequence[LabelledSource], split: str, run_classes: Sequence[str],
                negatives: bool = False) -> list[SourceSplit]:
    """Each source's items of ``split`` with its label lookup (``negatives``: see :func:`negative_lut`).

    ``split`` names one split for every source, or one per source, comma-separated (``filtered,train``: what
    filter kept of a synthetic set, and a real set's train split)."""
    names = split.split(",")
    if len(names) == 1:
        names *= len(sources)
    if len(names) != len(sources) or not all(names):
        raise ConfigError(f"--split {split!r}: give one split for every DATA, or one per DATA in their order "
                          f"({len(sources)}), comma-separated")
    parts = []
    for source, split in zip(sources, names):
        ids = source.ids(split)
        if not ids:
            raise SourceError(f"{source.spec} has no items in split {split!r}; generate some, or choose another --split")
        source.check_labels(ids)
        lut = negative_lut(source, run_classes) if negatives else label_lut(source, run_classes)
        parts.append(SourceSplit(source, split, ids, lut))
    return parts


def normalise(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) → float (3, H, W), ImageNet mean/std (what pretrained backbones expect)."""
    return torch.from_numpy(((image.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).copy())


def resize_short_side(image: np.ndarray, labels: np.ndarray | None, short: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale so the shorter side is ``short`` px: bilinear for the image, labels where it lands (resize_labels)."""
    h, w = image.shape[:2]
    scale = short / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    if labels is not None:
        labels = resize_labels(labels, size)
    return image, labels


def augment_pair(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, crop: int,
                 scale_range: tuple[float, float], augment: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Random resize (short side = crop × ratio), pad, random crop, then the named augmentations."""
    image, labels = resize_short_side(image, labels, crop * rng.uniform(*scale_range))
    h, w = labels.shape
    pad_h, pad_w = max(0, crop - h), max(0, crop - w)
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
        labels = np.pad(labels, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
        h, w = labels.shape
    y, x = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    image, labels = image[y:y + crop, x:x + crop], labels[y:y + crop, x:x + crop]
    if "shift" in augment:
        image, labels = shift(image, labels, rng, max(1, crop // 8))
    if "flip" in augment and rng.random() < 0.5:
        image, labels = image[:, ::-1], labels[:, ::-1]
    if "rot90" in augment:
        k = int(rng.integers(4))
        image, labels = np.rot90(image, k), np.rot90(labels, k)
    if "hue" in augment:
        hsv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV_FULL)
        hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(rng.integers(256))) % 256
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)
    if "channels" in augment:
        image = image[..., rng.permutation(3)]
    if "blur" in augment and rng.random() < 0.5:
        image = gaussian_blur(np.ascontiguousarray(image), float(rng.uniform(*AUGMENT_DEFAULTS.blur_sigma)))
    if "perspective" in augment and rng.random() < 0.5:
        corners = random_corners(labels.shape, AUGMENT_DEFAULTS.perspective_shift, rng)
        image, labels = perspective(np.ascontiguousarray(image), np.ascontiguousarray(labels), corners)
    return np.ascontiguousarray(image), np.ascontiguousarray(labels)


def shift(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, most: int) -> tuple[np.ndarray, np.ndarray]:
    """Translate by up to ``most`` px on each axis; what comes in from outside is black and ignored."""
    dy, dx = (int(d) for d in rng.integers(-most, most + 1, size=2))
    moved_image, moved_labels = np.zeros_like(image), np.full_like(labels, IGNORE_INDEX)
    h, w = labels.shape
    target = np.s_[max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)]
    source = np.s_[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    moved_image[target], moved_labels[target] = image[source], labels[source]
    return moved_image, moved_labels


def composite_config(augment: Sequence[str]) -> AugmentConfig | None:
    """How composite samples are made for these augmentation names; None when none is named."""
    if not uses_composites(augment):
        return None
    return AugmentConfig(grids=(2,) if "mosaic" in augment else (1,), paste=1.0 if "paste" in augment else 0.0,
                         occlusion=AUGMENT_DEFAULTS.occlusion if "occlusion" in augment else 0.0, blur=0.0,
                         perspective=0.0)  # blur and perspective, when named, act after the crop as on every sample


def check_augment(names: Sequence[str]) -> tuple[str, ...]:
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ConfigError(f"unknown augmentation {', '.join(unknown)}; choose from {', '.join(AUGMENTATIONS)}")
    return tuple(names)


class TrainingSamples(TorchDataset):
    """Indexed by (step, slot): the slot-th sample of the step-th global batch."""

    def __init__(self, parts: list[SourceSplit], weights: Sequence[float] | None, crop: int,
                 scale_range: tuple[float, float], augment: Sequence[str], seed: int, composite_share: float):
        self.parts, self.crop, self.scale_range, self.augment, self.seed = parts, crop, scale_range, augment, seed
        self.composite, self.composite_share = composite_config(augment), composite_share
        if self.composite is not None:
            for part in parts:
                part.cache_limit = CACHE_BYTES
                if self.composite.paste and not (part.lut == 0).any():
                    raise ConfigError(f"paste cuts objects out where their mask is background, and {part.source.spec} "
                                      "has no background class (Cityscapes, ADE20K): leave paste out of --augment")
        sizes = np.array([len(p.ids) for p in parts], np.float64)
        share = sizes if weights is None else np.asarray(weights, np.float64)
        if len(share) != len(parts) or not np.isfinite(share).all() or (share < 0).any() or share.sum() <= 0:
            raise ConfigError(f"--weights needs one finite, non-negative weight per DATA and --negatives dataset "
                              f"({len(parts)}), not all zero")
        self.probabilities = share / share.sum()

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        step, slot = key
        rng = np.random.default_rng([self.seed, step, slot])
        part = self.parts[int(rng.choice(len(self.parts), p=self.probabilities))]
        if self.composite is not None and rng.random() < self.composite_share:  # no draw without composites
            image, labels, _ = compose(rng, part.ids, part.read_id, self.composite, part.side)
        else:
            image, labels = part.read(int(rng.integers(len(part.ids))))
        image, labels = augment_pair(image, labels, rng, self.crop, self.scale_range, self.augment)
        return normalise(image), torch.from_numpy(labels.astype(np.int64))


class StepBatches(Sampler):
    """This process's share of each global batch, from ``start`` to ``stop`` steps."""

    def __init__(self, start: int, stop: int, batch_size: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ConfigError(f"--batch-size {batch_size} does not split evenly over {world_size} processes")
        self.start, self.stop, self.per_rank, self.rank = start, stop, batch_size // world_size, rank

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        first = self.rank * self.per_rank
        for step in range(self.start, self.stop):
            yield [(step, slot) for slot in range(first, first + self.per_rank)]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)
