"""Read labelled image folders: our own datasets and the real benchmarks, behind one small interface.

A DATA argument is ``FORMAT:PATH`` (``diffumask``, ``voc``, ``cityscapes``, ``ade20k``) or a bare PATH
whose format is detected from its layout. Every reader gives item ids per split, the RGB image and
its label map, and ``label_names`` (label value → class name); pixels without a class read as 255.

- ``diffumask``: a folder made by ``generate``/``refine``/``shapes export`` (``classes.json``).
- ``voc``: ``VOCdevkit/VOC2012`` (or the ``VOC2012`` folder): ``ImageSets/Segmentation/<split>.txt``,
  masks from ``SegmentationClass``, else ``SegmentationClassAug`` (the 10,582-image ``train_aug``).
- ``cityscapes``: ``gtFine/<split>/<city>/*_gtFine_labelIds.png`` mapped to the 19 train ids,
  images from ``leftImg8bit``; ids are ``<split>/<city>/<name>``.
- ``ade20k``: ``ADEChallengeData2016/{images,annotations}/{training,validation}``; 0 ("other")
  reads as 255, classes 1…150 keep their index.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..dataset import IGNORE_INDEX, Dataset, read_index_png, read_rgb
from ..errors import DiffumaskError
from .tables import ADE20K_CLASSES, CITYSCAPES_TRAIN_IDS, VOC_CLASSES

FORMATS = ("diffumask", "voc", "cityscapes", "ade20k")


class SourceError(DiffumaskError, ValueError):
    """A DATA argument names no readable dataset, or a split or item it does not have."""


class LabelledSource:
    """Images with semantic label maps; subclasses know one on-disk layout each."""

    format: str = ""

    def __init__(self, root: Path, label_names: dict[int, str]):
        self.root = root
        self.label_names = label_names

    @property
    def spec(self) -> str:
        return f"{self.format}:{self.root}"

    def splits(self) -> list[str]:
        raise NotImplementedError

    def _split_ids(self, split: str) -> list[str] | None:
        raise NotImplementedError

    def ids(self, split: str = "train") -> list[str]:
        """Item ids of a split; a missing split is an error that lists the ones there are."""
        ids = self._split_ids(split)
        if ids is None:
            have = ", ".join(self.splits()) or "none"
            raise SourceError(f"{self.spec} has no split {split!r} (it has: {have}); choose one with --split")
        return ids

    def read_image(self, item_id: str) -> np.ndarray:
        raise NotImplementedError

    def read_labels(self, item_id: str) -> np.ndarray:
        raise NotImplementedError

    def check_labels(self, ids: list[str]) -> None:
        """Fail now, in one line, rather than in a loader process mid-training, when a label map is missing."""
        for item_id in ids:
            if not self.labels_path(item_id).is_file():
                raise SourceError(f"{self.spec}: item {item_id!r} has no label map ({self.labels_path(item_id)})")

    def labels_path(self, item_id: str) -> Path:
        raise NotImplementedError

    def _require(self, *folders: str) -> None:
        if missing := [f for f in folders if not (self.root / f).is_dir()]:
            raise SourceError(f"{self.root} is not a {self.format} folder: it has no {', '.join(missing)}")

    def read(self, item_id: str) -> tuple[np.ndarray, np.ndarray]:
        image, labels = self.read_image(item_id), self.read_labels(item_id)
        if image.shape[:2] != labels.shape:
            raise SourceError(f"{self.spec}: item {item_id!r} has a {image.shape[1]}x{image.shape[0]} image but a "
                              f"{labels.shape[1]}x{labels.shape[0]} label map")
        return image, labels

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec}>"


class DiffumaskSource(LabelledSource):
    format = "diffumask"

    def __init__(self, root: Path):
        try:
            self.dataset = Dataset(root)
        except (OSError, ValueError, KeyError) as error:
            raise SourceError(f"{root} is not a readable diffumask dataset ({error}); a training run or a "
                              "predictions folder is not a dataset") from None
        super().__init__(Path(root), dict(enumerate(["background", *self.dataset.classes])))

    def splits(self) -> list[str]:
        folder = self.root / "ImageSets" / "Segmentation"
        return sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []

    def _split_ids(self, split: str) -> list[str] | None:
        if split not in self.splits():
            if not self.splits() and (finished := len(self.dataset.finished_ids())):
                raise SourceError(f"{self.spec} holds {finished} finished item(s) but no split lists yet (ImageSets/"
                                  "Segmentation): the command that made it stopped before its end; re-run it to finish")
            if not self.splits():
                raise SourceError(f"{self.spec} holds no items yet; generate some first (diffumask generate)")
            return None
        return self.dataset.split_ids(split)

    def read_image(self, item_id: str) -> np.ndarray:
        return self.dataset.read_image(item_id)

    def labels_path(self, item_id: str) -> Path:
        return self.dataset.mask_path(item_id)

    def check_labels(self, ids: list[str]) -> None:
        self.dataset.require_files(ids, "mask", "training needs a dataset with masks (SegmentationClass)")

    def read_labels(self, item_id: str) -> np.ndarray:
        return self.dataset.read_mask(item_id)  # the mask that agrees with the item's manifest line


class VOCSource(LabelledSource):
    format = "voc"

    def __init__(self, root: Path):
        if (root / "VOC2012").is_dir():
            root = root / "VOC2012"
        super().__init__(root, dict(enumerate(VOC_CLASSES)))
        self._require("JPEGImages", "ImageSets/Segmentation")

    def splits(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "ImageSets" / "Segmentation").glob("*.txt"))

    def _split_ids(self, split: str) -> list[str] | None:
        path = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        return path.read_text().split() if path.is_file() else None

    def read_image(self, item_id: str) -> np.ndarray:
        return read_rgb(self.root / "JPEGImages" / f"{item_id}.jpg")

    def labels_path(self, item_id: str) -> Path:
        """SegmentationClass's mask, else SegmentationClassAug's (SBD) one."""
        path = self.root / "SegmentationClass" / f"{item_id}.png"
        return path if path.is_file() else self.root / "SegmentationClassAug" / f"{item_id}.png"

    def read_labels(self, item_id: str) -> np.ndarray:
        return read_index_png(self.labels_path(item_id))


class CityscapesSource(LabelledSource):
    format = "cityscapes"
    _SUFFIX = "_gtFine_labelIds.png"

    def __init__(self, root: Path):
        super().__init__(root, {train_id: name for train_id, name in CITYSCAPES_TRAIN_IDS.values()})
        self._require("gtFine", "leftImg8bit")
        self._lut = np.full(256, IGNORE_INDEX, np.uint8)
        for label_id, (train_id, _) in CITYSCAPES_TRAIN_IDS.items():
            self._lut[label_id] = train_id

    def splits(self) -> list[str]:
        return sorted(p.name for p in (self.root / "gtFine").iterdir() if p.is_dir())

    def _split_ids(self, split: str) -> list[str] | None:
        folder = self.root / "gtFine" / split
        if not folder.is_dir():
            return None
        return sorted(f"{split}/{p.parent.name}/{p.name[:-len(self._SUFFIX)]}" for p in folder.glob(f"*/*{self._SUFFIX}"))

    def read_image(self, item_id: str) -> np.ndarray:
        return read_rgb(self.root / "leftImg8bit" / f"{item_id}_leftImg8bit.png")

    def labels_path(self, item_id: str) -> Path:
        return self.root / "gtFine" / f"{item_id}{self._SUFFIX}"

    def read_labels(self, item_id: str) -> np.ndarray:
        return self._lut[read_index_png(self.labels_path(item_id))]


def ade20k_names(root: Path) -> list[str]:
    """The classes of annotation values 1, 2, …: those ``objectInfo.csv`` lists (``diffumask export --format
    ade20k`` writes it, ``Idx,Name`` from 0 = other: ADE's 150, or the dataset's own classes when they are not all
    ADE's), else ADE20K's 150 (the official release has no such file)."""
    listing = root / "objectInfo.csv"
    if not listing.is_file():
        return list(ADE20K_CLASSES)
    with open(listing, newline="", encoding="utf-8-sig") as file:  # -sig: a table saved again by a spreadsheet
        rows = list(csv.DictReader(file))
    if (not rows or [row.get("Idx") for row in rows] != [str(i) for i in range(len(rows))]
            or any(None in row or row.get("Name") is None for row in rows)):
        raise SourceError(f"{listing} is not an Idx,Name table numbered 0, 1, 2, … (the one diffumask export writes); "
                          "move it out of the dataset to read it with ADE20K's 150 classes")
    return [row["Name"] for row in rows[1:]]


class ADE20KSource(LabelledSource):
    format = "ade20k"
    _FOLDERS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}

    def __init__(self, root: Path):
        if (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        super().__init__(root, {i + 1: name for i, name in enumerate(ade20k_names(root))})
        self._require("images", "annotations")
        self._folder_of: dict[str, str] = {}

    def splits(self) -> list[str]:
        return [s for s, folder in (("train", "training"), ("val", "validation"))
                if (self.root / "annotations" / folder).is_dir()]

    def _split_ids(self, split: str) -> list[str] | None:
        folder = self._FOLDERS.get(split)
        if folder is None or not (self.root / "annotations" / folder).is_dir():
            return None
        ids = sorted(p.stem for p in (self.root / "annotations" / folder).glob("*.png"))
        self._folder_of.update(dict.fromkeys(ids, folder))
        return ids

    def _folder(self, item_id: str) -> str:
        if item_id not in self._folder_of:
            for split in self.splits():
                self._split_ids(split)
        if item_id not in self._folder_of:
            raise SourceError(f"{self.spec}: no annotation for item {item_id!r}")
        return self._folder_of[item_id]

    def read_image(self, item_id: str) -> np.ndarray:
        return read_rgb(self.root / "images" / self._folder(item_id) / f"{item_id}.jpg")

    def labels_path(self, item_id: str) -> Path:
        return self.root / "annotations" / self._folder(item_id) / f"{item_id}.png"

    def read_labels(self, item_id: str) -> np.ndarray:
        labels = read_index_png(self.labels_path(item_id))
        return np.where(labels == 0, IGNORE_INDEX, labels).astype(np.uint8)


_READERS: dict[str, type[LabelledSource]] = {
    "diffumask": DiffumaskSource, "voc": VOCSource, "cityscapes": CityscapesSource, "ade20k": ADE20KSource,
}


def detect_format(root: Path) -> str:
    """The layout of a folder, from the files that only that layout has."""
    if (root / "classes.json").is_file():
        return "diffumask"
    if (root / "gtFine").is_dir() and (root / "leftImg8bit").is_dir():
        return "cityscapes"
    ade = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
    if (ade / "images").is_dir() and (ade / "annotations").is_dir():
        return "ade20k"
    voc = root / "VOC2012" if (root / "VOC2012").is_dir() else root
    if (voc / "JPEGImages").is_dir() and any((voc / f).is_dir() for f in ("SegmentationClass", "SegmentationClassAug")):
        return "voc"
    raise SourceError(
        f"{root} is none of the layouts diffumask reads (a diffumask dataset with classes.json, VOC's "
        "JPEGImages + SegmentationClass, Cityscapes' gtFine + leftImg8bit, ADE20K's images + annotations); "
        "name the format as voc:PATH, cityscapes:PATH, ade20k:PATH or diffumask:PATH")


def open_source(spec: str | Path) -> LabelledSource:
    """Open ``FORMAT:PATH`` or a bare PATH (format detected)."""
    text = str(spec)
    name, sep, rest = text.partition(":")
    if sep and name in _READERS:
        fmt, root = name, Path(rest)
    else:
        fmt, root = None, Path(text)
    if not root.is_dir():
        raise SourceError(f"{root} is not a folder; DATA is a dataset folder, optionally as FORMAT:PATH "
                          f"with FORMAT one of {', '.join(FORMATS)}")
    return _READERS[fmt or detect_format(root)](root)
