"""``diffumask export``: a dataset folder in the layouts other trainers read with no glue code.

- ``coco``: ``annotations/instances_<split>.json`` (one compressed-RLE annotation per instance) and
  ``annotations/panoptic_<split>.json`` + ``annotations/panoptic_<split>/<name>.png`` (COCO panoptic:
  segment id = R + 256·G + 256²·B, 0 void), images under ``<split>/``. Instances are the item's own
  objects where the dataset has them (``SegmentationObject/<id>.png``, Pascal VOC's instance layer),
  else the connected components (8-connected) of each class. Pixels labelled 255 belong to no instance
  and are void in the panoptic PNG; background is a stuff category (id 0) there. Category id = the
  class's index in ``classes.json``.
- ``cityscapes``: ``gtFine/<split>/diffumask/*_gtFine_labelIds.png`` and ``*_gtFine_labelTrainIds.png``
  plus ``leftImg8bit/<split>/diffumask/*_leftImg8bit.png``; classes map onto the 19 train classes by name
  (:data:`~diffumask.formats.tables.CITYSCAPES_TRAIN_IDS`), everything else is label id 0 / train id 255.
  File names follow Cityscapes' ``city_sequence_frame`` pattern; ``ids.json`` maps them to item ids.
- ``ade20k``: ``ADEChallengeData2016/{images,annotations}/{training,validation}``: 0 = "other" (background
  and 255); class k becomes its ADE20K index when every class is one of ADE's 150, else k with a note.
- ``hf``: a Hugging Face ``datasets.DatasetDict`` (``save_to_disk``) with ``image`` and ``label`` ``Image``
  features (the palette PNG's bytes kept as they are) and the manifest's fields as columns, in Hugging Face's
  names (transformers' segmentation examples read ``image``, ``label``, a ``validation`` split and
  ``id2label.json``, written beside them).

Every export is built in a temporary sibling folder and renamed into place when complete.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..dataset import (IGNORE_INDEX, OBJECT_FOLDER, Dataset, plain_modes, read_index_png, read_label_map, read_rgb,
                       temporary_folder, voc_palette, write_text_atomic)
from ..errors import DiffumaskError, check_sequences
from .names import match_names
from .tables import ADE20K_CLASSES, CITYSCAPES_TRAIN_IDS

EXPORT_FORMATS = ("coco", "cityscapes", "ade20k", "hf")


class ExportError(DiffumaskError, ValueError):
    """An export that cannot be made: no dataset, a taken output folder, no class the format knows."""


@dataclass
class ExportResult:
    out: Path
    format: str
    items: int
    notes: list[str] = field(default_factory=list)


class NoDataset(DiffumaskError, ValueError):
    """The folder is not a dataset, or holds no finished item yet."""


def open_dataset(root: str | os.PathLike[str]) -> Dataset:
    """The dataset at ``root`` with at least one finished item, or a one-line error (export and report)."""
    try:
        dataset = Dataset(root)
    except FileNotFoundError as error:
        raise NoDataset(str(error)) from None
    if not dataset.records():
        raise NoDataset(f"{dataset.root} holds no finished items")
    if reason := dataset.unfinished():
        warnings.warn(f"{dataset.root} is not finished: {reason}", stacklevel=3)
    return dataset


def _items(dataset: Dataset, records: Sequence[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], Path, np.ndarray]]:
    """Each item of ``records`` with its mask: (record, image path, label mask)."""
    for what in ("image", "mask"):  # before any file is written
        dataset.require_files([r["id"] for r in records], what, "export needs a dataset with images and masks")
    for record in records:
        yield record, dataset.image_path(record["id"]), dataset.read_mask(record["id"])


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def _save_rgb(source: Path, target: Path, fmt: str, **options: Any) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(read_rgb(source)).save(target, format=fmt, **options)  # a failed save is not a damaged source


def _write_png(path: Path, array: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path, format="PNG")


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------- instances
def instance_masks(mask: np.ndarray, objects: np.ndarray | None = None) -> list[tuple[int, np.ndarray]]:
    """(class index, boolean mask) of every instance in a label mask; 0 and 255 make none.

    With an object map (VOC ``SegmentationObject``: instance number per pixel), each object's pixels of
    the class most of them carry form one instance; class pixels no object covers fall back to
    connected components, so the instances of a class always cover exactly that class's pixels.
    """
    import cv2

    found: list[tuple[int, np.ndarray]] = []
    rest = mask.copy()
    if objects is not None:
        if objects.shape != mask.shape:
            raise ExportError(f"an object map of shape {objects.shape} does not fit a mask of shape {mask.shape}")
        for number in np.unique(objects):
            if number in (0, IGNORE_INDEX):
                continue
            inside = objects == number
            labels = mask[inside]
            labels = labels[(labels != 0) & (labels != IGNORE_INDEX)]
            if labels.size == 0:
                continue
            label = int(np.bincount(labels).argmax())
            pixels = inside & (rest == label)
            found.append((label, pixels))
            rest[pixels] = 0
    for label in np.unique(rest):
        if label in (0, IGNORE_INDEX):
            continue
        count, components = cv2.connectedComponents((rest == label).astype(np.uint8), connectivity=8)
        found.extend((int(label), components == k) for k in range(1, count))
    return found


def _objects(dataset: Dataset, item_id: str) -> np.ndarray | None:
    path = dataset.root / OBJECT_FOLDER / f"{item_id}.png"
    return read_index_png(path) if path.is_file() else None


def _rle(pixels: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(pixels.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _coco_annotation(rle: dict[str, Any], ann_id: int, image_id: int, category: int) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    encoded = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return {"id": ann_id, "image_id": image_id, "category_id": category, "segmentation": rle,
            "area": float(mask_utils.area(encoded)), "bbox": [float(v) for v in mask_utils.toBbox(encoded)],
            "iscrowd": 0}


def _export_coco(dataset: Dataset, records: Sequence[dict[str, Any]], out: Path) -> list[str]:
    try:
        import pycocotools.mask  # noqa: F401
    except ImportError:
        raise ExportError("--format coco needs pycocotools: pip install 'diffumask[coco]'") from None
    names = ["background", *dataset.classes]
    things = [{"id": i, "name": n, "supercategory": "object"} for i, n in enumerate(names) if i > 0]
    panoptic_categories = [{"id": 0, "name": "background", "supercategory": "background", "isthing": 0,
                            "color": [0, 0, 0]},
                           *({**c, "isthing": 1, "color": list(voc_palette()[c["id"]])} for c in things)]
    splits: dict[str, dict[str, list[Any]]] = {}
    for record, image_path, mask in _items(dataset, records):
        split = record.get("split", "train")
        tables = splits.setdefault(split, {"images": [], "annotations": [], "panoptic": []})
        image_id = len(tables["images"]) + 1
        height, width = mask.shape
        file_name = image_path.name
        tables["images"].append({"id": image_id, "file_name": file_name, "height": height, "width": width,
                                 "diffumask_id": record["id"]})
        _copy(image_path, out / split / file_name)
        segment_ids = np.zeros(mask.shape, np.uint32)
        segments = []
        background = mask == 0
        if background.any():
            segment_ids[background] = 1
            rle = _rle(background)
            annotation = _coco_annotation(rle, 1, image_id, 0)
            segments.append({k: annotation[k] for k in ("id", "category_id", "area", "bbox", "iscrowd")})
        for label, pixels in instance_masks(mask, _objects(dataset, record["id"])):
            annotation = _coco_annotation(_rle(pixels), len(tables["annotations"]) + 1, image_id, label)
            tables["annotations"].append(annotation)
            segment_id = len(segments) + 1
            segment_ids[pixels] = segment_id
            segments.append({**{k: annotation[k] for k in ("category_id", "area", "bbox", "iscrowd")},
                             "id": segment_id})
        png_name = f"{Path(file_name).stem}.png"
        rgb = np.stack([segment_ids % 256, segment_ids // 256 % 256, segment_ids // 65536], axis=-1).astype(np.uint8)
        _write_png(out / "annotations" / f"panoptic_{split}" / png_name, rgb, mode="RGB")
        tables["panoptic"].append({"image_id": image_id, "file_name": png_name, "segments_info": segments})
    info = {"description": f"diffumask export of {dataset.root.name}", "version": "1.0"}
    for split, tables in splits.items():
        _write_json(out / "annotations" / f"instances_{split}.json",
                    {"info": info, "images": tables["images"], "annotations": tables["annotations"],
                     "categories": things})
        _write_json(out / "annotations" / f"panoptic_{split}.json",
                    {"info": info, "images": tables["images"], "annotations": tables["panoptic"],
                     "categories": panoptic_categories})
    return []


# --------------------------------------------------------------------------------------- cityscapes
def cityscapes_lookup(classes: list[str]) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Our label index → Cityscapes label id and train id (0 / 255 for no class), matched by name."""
    by_name = {name: (label_id, train_id) for label_id, (train_id, name) in CITYSCAPES_TRAIN_IDS.items()}
    matched = match_names(classes, list(by_name))
    label_ids, train_ids = np.zeros(256, np.uint8), np.full(256, IGNORE_INDEX, np.uint8)
    for index, name in enumerate(classes, start=1):
        if name in matched:
            label_ids[index], train_ids[index] = by_name[matched[name]]
    return label_ids, train_ids, matched


def _export_cityscapes(dataset: Dataset, records: Sequence[dict[str, Any]], out: Path) -> list[str]:
    label_ids, train_ids, matched = cityscapes_lookup(dataset.classes)
    if not matched:
        raise ExportError(f"none of the classes ({', '.join(dataset.classes)}) is one of Cityscapes' 19 train classes; "
                          "a Cityscapes export would be all 'ignore'")
    names: dict[str, str] = {}
    position = {r["id"]: k for k, r in enumerate(dataset.records())}  # an item's name whatever --only picks
    for record, image_path, mask in _items(dataset, records):
        split, number = record.get("split", "train"), position[record["id"]]
        stem = f"diffumask_{number // 1000000:06d}_{number % 1000000:06d}"
        names[f"{split}/diffumask/{stem}"] = record["id"]
        _save_rgb(image_path, out / "leftImg8bit" / split / "diffumask" / f"{stem}_leftImg8bit.png", "PNG")
        folder = out / "gtFine" / split / "diffumask"
        _write_png(folder / f"{stem}_gtFine_labelIds.png", label_ids[mask])
        _write_png(folder / f"{stem}_gtFine_labelTrainIds.png", train_ids[mask])
    _write_json(out / "ids.json", names)
    unmatched = [c for c in dataset.classes if c not in matched]
    return [f"not Cityscapes classes, written as unlabeled (train id 255): {', '.join(unmatched)}"] if unmatched else []


# --------------------------------------------------------------------------------------- ade20k
ADE_SPLITS = {"train": "training", "val": "validation"}


def ade20k_lookup(classes: list[str]) -> tuple[np.ndarray, list[str], str | None]:
    """Our label index → ADE20K SceneParsing index, the names of the index space, and a note.

    ADE's own indices when every class is one of its 150 (so ADE-trained heads read the export);
    otherwise our own order 1..n (mixing both would let two classes share an index).
    """
    matched = match_names(classes, ADE20K_CLASSES)
    lut = np.zeros(256, np.uint8)  # background, 255 and unknown values → 0 "other"
    if len(matched) == len(classes):
        for index, name in enumerate(classes, start=1):
            lut[index] = ADE20K_CLASSES.index(matched[name]) + 1
        return lut, ["other", *ADE20K_CLASSES], None
    lut[1:len(classes) + 1] = np.arange(1, len(classes) + 1)
    missing = [c for c in classes if c not in matched]
    note = (f"not ADE20K classes: {', '.join(missing)}; so the annotations use this dataset's own indices 1..n "
            "(objectInfo.csv), not ADE20K's 150")
    return lut, ["other", *classes], note


def _export_ade20k(dataset: Dataset, records: Sequence[dict[str, Any]], out: Path) -> list[str]:
    lut, names, note = ade20k_lookup(dataset.classes)
    root = out / "ADEChallengeData2016"
    notes = [note] if note else []
    for record, image_path, mask in _items(dataset, records):
        split = record.get("split", "train")
        folder = ADE_SPLITS.get(split, split)
        target = root / "images" / folder / f"{record['id']}.jpg"
        if image_path.suffix == ".jpg":
            _copy(image_path, target)
        else:  # ADE20K readers look for .jpg: the dataset's quality, colour at full resolution (4:4:4) as its own
            _save_rgb(image_path, target, "JPEG", quality=dataset.jpeg_quality, subsampling=0)  # JPEGs: no edge bleed
        _write_png(root / "annotations" / folder / f"{record['id']}.png", lut[mask])
    other_splits = sorted({r.get("split", "train") for r in records} - set(ADE_SPLITS))
    if other_splits:
        notes.append(f"splits without an ADE20K folder kept their own name: {', '.join(other_splits)}")
    with open(root / "objectInfo.csv", "w", newline="", encoding="utf-8") as file:  # quoted where a name needs it
        csv.writer(file).writerows([("Idx", "Name"), *enumerate(names)])
    return notes


# --------------------------------------------------------------------------------------- hf
def _column_type(values: list[Any]) -> str:
    """How a manifest field becomes a column: a scalar, a list of one scalar type, else JSON text (dicts
    such as ``tokens`` or ``refine`` differ in keys from item to item, which Arrow's structs cannot hold)."""
    present = [v for v in values if v is not None]
    kinds = {type(v) for v in present}
    if kinds <= {str}:
        return "string"
    if kinds <= {bool}:
        return "bool"
    if kinds <= {int}:
        return "int64"
    if kinds <= {int, float}:
        return "float64"
    if kinds <= {list}:
        elements = {type(x) for v in present for x in v}
        for kind, allowed in (("strings", {str}), ("ints", {int}), ("floats", {int, float})):
            if elements <= allowed and bool not in elements:
                return kind
    return "json"


def _hf_rows(root: str, records: list[dict[str, Any]], kinds: dict[str, str]) -> Iterator[dict[str, Any]]:
    """One split's rows, read one item at a time (the files' bytes as they are: a palette PNG stays one)."""
    dataset = Dataset(root)
    for what in ("image", "mask"):
        dataset.require_files([r["id"] for r in records], what, "export needs a dataset with images and masks")
    for record in records:
        mask_path = dataset.mask_path(record["id"])
        image_path = dataset.image_path(record["id"])
        row = {"image": {"bytes": image_path.read_bytes(), "path": image_path.name},
               "label": {"bytes": dataset.current_mask_path(record["id"]).read_bytes(), "path": mask_path.name}}
        for name, kind in kinds.items():
            value = record.get(name)
            if value is not None and kind == "json":
                value = json.dumps(value)
            elif value is not None and kind in ("float64", "floats"):
                value = float(value) if kind == "float64" else [float(x) for x in value]
            row[name] = value
        yield row


HF_SPLITS = {"val": "validation"}  # Hugging Face's split names, where a VOC name differs


def _export_hf(dataset: Dataset, records: Sequence[dict[str, Any]], out: Path) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ExportError("--format hf needs the Hugging Face datasets library: pip install 'diffumask[hf]'") from None
    fields = list(dict.fromkeys(k for r in records for k in r if k not in ("image", "label")))
    kinds = {name: _column_type([r.get(name) for r in records]) for name in fields}
    value = {"string": datasets.Value("string"), "bool": datasets.Value("bool"), "int64": datasets.Value("int64"),
             "float64": datasets.Value("float64"), "strings": datasets.Sequence(datasets.Value("string")),
             "ints": datasets.Sequence(datasets.Value("int64")), "floats": datasets.Sequence(datasets.Value("float64")),
             "json": datasets.Value("string")}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image(),
                                  **{name: value[kind] for name, kind in kinds.items()}})
    split_names = list(dict.fromkeys(r.get("split", "train") for r in records))
    if {"val", "validation"} <= set(split_names):
        raise ExportError("the items hold both a 'val' and a 'validation' split, and Hugging Face's 'validation' can "
                          "only be one of them; rename one of them")
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one bar per split and shard says nothing to an export's user
    # Arrow files, not memory, in the export's own temporary folder: a killed export's go with it (export_dataset)
    cache = out / ".arrow-cache"
    try:
        splits = {HF_SPLITS.get(split, split): split for split in split_names}
        datasets.DatasetDict({name: datasets.Dataset.from_generator(
            _hf_rows, features=features, cache_dir=str(cache), split=datasets.Split(name),
            gen_kwargs={"root": str(dataset.root), "kinds": kinds,
                        "records": [r for r in records if r.get("split", "train") == split]})
            for name, split in splits.items()}).save_to_disk(str(out))
        id2label = dict(enumerate(read_label_map(dataset.root)))
        write_text_atomic(out / "id2label.json", json.dumps(id2label, indent=1) + "\n")
    finally:
        if bars:
            datasets.enable_progress_bars()
        shutil.rmtree(cache, ignore_errors=True)
    json_columns = [name for name, kind in kinds.items() if kind == "json"]
    return [f"manifest fields stored as JSON text (json.loads to read): {', '.join(json_columns)}"] if json_columns else []


_EXPORTERS: dict[str, Callable[[Dataset, Sequence[dict[str, Any]], Path], list[str]]] = {
    "coco": _export_coco, "cityscapes": _export_cityscapes, "ade20k": _export_ade20k, "hf": _export_hf,
}


def export_dataset(root: str | os.PathLike[str], fmt: str, out: str | os.PathLike[str],
                   only: Sequence[str] = ()) -> ExportResult:
    """Write the dataset at ``root`` in format ``fmt`` to the new folder ``out``, all or nothing.

    ``only``: names of item lists in ``ImageSets/Segmentation/`` (``filtered``, which ``diffumask filter``
    writes, or a split); then only the items listed in any of them are written, each under its own split."""
    if fmt not in _EXPORTERS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    check_sequences("export_dataset", only=(only, '["filtered"]'))
    dataset = open_dataset(root)
    records = dataset.records()
    if only:
        lists = dataset.root / "ImageSets" / "Segmentation"
        if missing := [name for name in only if not (lists / f"{name}.txt").is_file()]:
            have = sorted(p.stem for p in lists.glob("*.txt"))
            raise ExportError(f"{dataset.root} has no item list {missing[0]!r} (ImageSets/Segmentation/"
                              f"{missing[0]}.txt); it has: {', '.join(have) or 'none'}")
        listed = {item_id for name in only for item_id in dataset.split_ids(name)}
        records = [r for r in records if r["id"] in listed]
        if not records:
            raise ExportError(f"the item lists {', '.join(only)} of {dataset.root} name none of its finished items")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; --out is the folder the export is written to: choose a new one")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose a new folder for --out")
    with temporary_folder(out.parent, out.name) as tmp:  # what a killed export left there goes first
        notes = _EXPORTERS[fmt](dataset, records, tmp)
        write_text_atomic(tmp / "export.json", json.dumps(
            {"format": fmt, "source": str(dataset.root.resolve()), "items": len(records), "only": list(only),
             "notes": notes}, indent=1) + "\n")
        plain_modes(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    return ExportResult(out, fmt, len(records), notes)


__all__ = ["EXPORT_FORMATS", "ExportError", "ExportResult", "NoDataset", "open_dataset", "ade20k_lookup", "cityscapes_lookup", "export_dataset",
           "instance_masks"]
