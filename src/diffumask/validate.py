"""``diffumask validate``: check a dataset folder against its contract before anyone trains on it.

Every item of the manifest must have its image, its mask and (when the dataset holds soft maps) its
soft maps; their sizes must agree; mask values must be classes of ``classes.json`` or 255; the
``ImageSets`` lists must hold exactly the manifest's items of each split; no temporary file of an
interrupted write may be left, and no per-rank manifest shard (``manifest.<rank>.jsonl``) unmerged. While a
command writes the dataset (:meth:`Dataset.being_written`) only its finished items are checked, and that is said.
Sizes are read from file headers (the PNG/JPEG header, the ``.npy`` header inside the ``.npz``), so
a check of 10,000 items decompresses only the masks.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import softmaps
from .dataset import (IGNORE_INDEX, ITEM_FOLDERS, LOST, OBJECT_FOLDER, PENDING_MASK, Dataset, read_index_png,
                      read_manifest_text)
from .errors import DiffumaskError

#: Names that ``dataset.atomic_write`` gives a file while it is being written: ``.<name>.<random>.tmp``.
TEMPORARY = re.compile(r"^\..+\.tmp$")
TORN = "torn last line (a killed write); the next run will drop it"
TWICE = "listed twice in manifest.jsonl (a refine was interrupted: re-run it to finish)"
NO_ITEM = "missing: the dataset has no finished item"
REMAKE = "run again the command that made the dataset to make the item again"
REMADE_STOPPED = ("listed again in manifest.jsonl: made again after it lost its files, by a run that stopped "
                  "before its end: re-run it to finish")


class ValidateError(DiffumaskError, ValueError):
    """The folder is not a dataset at all (no classes.json / dataset.json)."""


@dataclass(frozen=True)
class Problem:
    where: str  # an item id or a path relative to the dataset
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


#: The first problem while a command writes the dataset: it is not finished, and its files in flight are no leftovers.
WRITING = Problem(".", "a diffumask command (generate, refine, filter, augment, shapes export) is writing the dataset "
                       "now: its finished items were checked, not its lists and files in progress; validate again once "
                       "it ends")


def _npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Array shapes of an ``.npz`` from the ``.npy`` headers alone (nothing is decompressed beyond them)."""
    shapes = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            with archive.open(name) as member:
                version = np.lib.format.read_magic(member)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, _ = read_header(member)
            shapes[name.removesuffix(".npy")] = tuple(shape)
    return shapes


def _entries(path: Path) -> Iterator[Problem | dict]:
    """A manifest file's lines as records, or problems for lines that are not (without repairing anything):
    a torn last line is what a killed write leaves, and the next run drops it; any other bad line stops every run."""
    lines = read_manifest_text(path).splitlines(keepends=True)  # a shard a merge removed since: no lines
    for number, line in enumerate(lines, start=1):
        try:
            if not line.endswith("\n"):
                raise ValueError
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("id"), str):
                raise ValueError
        except ValueError:
            torn = number == len(lines) and not line.endswith("\n")
            yield Problem(f"{path.name}:{number}", TORN if torn else "not a JSON object with an 'id'")
            continue
        yield record


def _check_item(dataset: Dataset, record: dict, n_classes: int, soft_maps: bool) -> Iterator[Problem]:
    item_id = record["id"]
    size = None
    image_path = dataset.image_path(item_id)
    if not image_path.is_file():
        yield Problem(item_id, f"image missing ({image_path.relative_to(dataset.root)}): {REMAKE}")
    else:
        try:
            with Image.open(image_path) as image:
                size = (image.height, image.width)
        except OSError as error:
            yield Problem(item_id, f"image unreadable ({error}): delete it, and {REMAKE}")
    mask_path = dataset.mask_path(item_id)
    if not mask_path.is_file():
        yield Problem(item_id, f"mask missing ({mask_path.relative_to(dataset.root)}): {REMAKE}")
    else:
        try:
            mask = read_index_png(mask_path)
        except (OSError, ValueError) as error:
            yield Problem(item_id, f"mask unreadable ({getattr(error, 'reason', error)}): delete it, and {REMAKE}")
        else:
            if size is not None and mask.shape != size:
                yield Problem(item_id, f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {size[1]}x{size[0]}")
            values = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
            if bad := [int(v) for v in values if v > n_classes and v != IGNORE_INDEX]:
                yield Problem(item_id, f"mask values {bad} are neither classes of classes.json (0..{n_classes}) nor 255")
    objects = dataset.root / OBJECT_FOLDER / f"{item_id}.png"  # optional per-item instance layer
    if objects.is_file() and size is not None:
        with Image.open(objects) as image:
            if (image.height, image.width) != size:
                yield Problem(item_id, f"object map is {image.width}x{image.height} but the image is {size[1]}x{size[0]}")
    for name in record.get("classes", []):
        if name not in dataset.classes:
            yield Problem(item_id, f"manifest class {name!r} is not in classes.json")
    if soft_maps:
        path = dataset.soft_maps_path(item_id)
        if not path.is_file():
            yield Problem(item_id, f"soft maps missing ({path.relative_to(dataset.root)}): refine needs them; delete "
                                   f"the item's image too, and {REMAKE} whole")
            return
        try:
            shapes = _npz_shapes(path)
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            yield Problem(item_id, f"soft maps unreadable ({error}): delete them and the item's image, and {REMAKE} "
                                   "whole")
            return
        if softmaps.META_KEY in shapes:  # fused maps are recomputed from the grids at the recorded size
            with np.load(path) as data:
                meta_size = tuple(json.loads(str(data[softmaps.META_KEY]))["size"])
            if size is not None and meta_size != size:
                yield Problem(item_id, f"soft maps are recorded for {meta_size} but the image is {size}")
        for name in record.get("classes", []):
            if name in shapes:
                if size is not None and shapes[name] != size:
                    yield Problem(item_id, f"soft map {name!r} is {shapes[name]} but the image is {size}")
            elif softmaps.META_KEY not in shapes or not any(k.startswith(f"{name}@") for k in shapes):
                yield Problem(item_id, f"soft maps lack the fused map of {name!r}")


def validate_dataset(root: str | os.PathLike[str]) -> tuple[list[Problem], int]:
    """Every problem of the dataset at ``root``, and the number of manifest items checked."""
    root = Path(root)
    if not root.exists():
        raise ValidateError(f"{root} does not exist; give the folder of a diffumask dataset")
    for name in ("classes.json", "dataset.json"):
        if not (root / name).is_file():
            raise ValidateError(f"{root} is not a diffumask dataset (no {name})")
    try:
        dataset = Dataset(root)
    except (OSError, ValueError, KeyError) as error:
        raise ValidateError(f"{root}: dataset.json or classes.json is unreadable ({error})") from None
    running = dataset.being_written()  # then what it has not finished yet is no problem, and not checked
    problems: list[Problem] = []
    n_classes = len(dataset.classes)
    soft_maps = (root / "SoftMaps").is_dir() and any((root / "SoftMaps").iterdir())
    records = []
    seen: set[str] = set()
    shard_ids: dict[Path, set[str]] = {}  # finished items of a sharded run that was stopped, in its unmerged shards
    sharded: dict[str, dict] = {}  # their latest lines
    for path in dataset.shard_paths():
        for entry in _entries(path):
            if isinstance(entry, Problem):
                problems.append(entry)
            else:
                shard_ids.setdefault(path, set()).add(entry["id"])
                if entry.get("rev", 0) >= sharded.get(entry["id"], {}).get("rev", 0):
                    sharded[entry["id"]] = entry
    if not dataset.manifest_path.is_file() and not shard_ids:  # else the shards' own problem says what happened
        problems.append(Problem("manifest.jsonl", NO_ITEM))
    manifest = list(_entries(dataset.manifest_path)) if dataset.manifest_path.is_file() else []
    latest = dataset._latest([e for e in manifest if isinstance(e, dict)] + list(sharded.values()))  # as readers see
    lost = {entry["id"]: entry for entry in latest if entry.get(LOST)}
    remade = {e["id"] for e in manifest if isinstance(e, dict) and e.get(LOST)} - set(lost)  # lines not compacted yet
    stopped = [Problem(item_id, f"{entry[LOST]}: a run making the item again stopped before it had; re-run it to "
                                "finish") for item_id, entry in lost.items()]  # unless that run is at work now
    for entry in manifest:
        if isinstance(entry, Problem):
            problems.append(entry)
            continue
        if entry["id"] in lost:  # its files are gone, and said so: only its split is checked
            if entry["id"] not in seen:
                seen.add(entry["id"])
                records.append(entry)
            continue
        if entry["id"] in seen:
            if entry["id"] not in remade:
                problems.append(Problem(entry["id"], TWICE))
            elif entry.get(LOST):  # said once, at its mark
                problems.append(Problem(entry["id"], REMADE_STOPPED))
            continue
        seen.add(entry["id"])
        if entry.get("flagged"):
            continue  # flagged by the pipeline's safety checker: a line and no files, by design
        records.append(entry)
        problems.extend(_check_item(dataset, entry, n_classes, soft_maps))
    checked = len(records)
    for item_id, entry in sharded.items():  # finished, so checked as well, before the shards are merged
        if item_id not in seen and not entry.get("flagged") and item_id not in lost:
            checked += 1
            problems.extend(_check_item(dataset, entry, n_classes, soft_maps))
    leftovers = [] if running else [*_check_splits(dataset, records), *_check_files(dataset, seen, shard_ids)]
    if running or dataset.being_written():  # probed again last: a job begun during the scan has files in flight
        # A line being appended reads as torn, a refine appends each item's new line, a new dataset has no item yet.
        return [WRITING, *(p for p in problems if p.what not in (TORN, TWICE, NO_ITEM, REMADE_STOPPED))], checked
    return stopped + problems + leftovers, checked


def _check_splits(dataset: Dataset, records: list[dict]) -> Iterator[Problem]:
    by_split: dict[str, list[str]] = {}
    for record in records:
        by_split.setdefault(record.get("split", "train"), []).append(record["id"])
    folder = dataset.root / "ImageSets" / "Segmentation"
    listed = {p.stem: p for p in folder.glob("*.txt")} if folder.is_dir() else {}
    every = {i for ids in by_split.values() for i in ids}
    for split in sorted(set(by_split) | set(listed)):
        where = f"ImageSets/Segmentation/{split}.txt"
        if split not in listed:
            yield Problem(where, f"missing, but the manifest has {len(by_split[split])} {split} items (the command "
                                 "that writes the dataset stopped before its end: re-run it to finish)")
            continue
        ids = listed[split].read_text().split()
        if split not in by_split:  # a selection (filter's "filtered", its fold lists): any manifest items
            if problem := dataset.cut_problem(split, records):  # refused where it is read
                yield Problem(where, problem)
            if unknown := [i for i in ids if i not in every]:
                yield Problem(where, f"lists {len(unknown)} items the manifest does not hold: "
                              f"{', '.join(unknown[:5])}{' …' if len(unknown) > 5 else ''}")
            if len(ids) != len(set(ids)):
                yield Problem(where, "lists an item more than once")
            continue
        wanted = set(by_split.get(split, []))
        if extra := [i for i in ids if i not in wanted]:
            yield Problem(where, f"lists {len(extra)} items the manifest has not in split {split!r}: "
                          f"{', '.join(extra[:5])}{' …' if len(extra) > 5 else ''}")
        if missing := sorted(wanted - set(ids)):
            yield Problem(where, f"lacks {len(missing)} of the manifest's {split} items: "
                          f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''} (if the command that writes "
                          "the dataset was stopped: re-run it to finish)")
        if len(ids) != len(set(ids)):
            yield Problem(where, "lists an item more than once")


def _check_files(dataset: Dataset, listed: set[str], shard_ids: Mapping[Path, set[str]]) -> Iterator[Problem]:
    """Leftovers of interrupted writes, unmerged or foreign manifest shards, and files of no item that
    manifest.jsonl (``listed``) or an unmerged shard holds: with no command writing the dataset."""
    root = dataset.root
    ids = listed.union(*shard_ids.values())
    for path in sorted(root.rglob("*")):
        if path.is_file() and TEMPORARY.match(path.name):
            yield Problem(str(path.relative_to(root)), "temporary file of an interrupted write: re-run the command "
                                                       "that was stopped (it removes its own), or delete it")
    shards = set(dataset.shard_paths())
    for path in sorted(root.glob("manifest.*.jsonl")):
        if path in shards:
            held = shard_ids.get(path, set())
            yield Problem(path.name, f"manifest shard not merged into manifest.jsonl: {len(held)} finished item(s), "
                                     f"{len(held - listed)} not listed there yet (a sharded run stopped before "
                                     "its end: re-run the same command, with any number of workers, to finish)")
        else:
            yield Problem(path.name, "not a manifest shard diffumask writes (manifest.<rank>.jsonl), so never "
                                     "merged; move it out of the dataset")
    for folder, suffixes in ITEM_FOLDERS.items():
        if not (root / folder).is_dir():
            continue
        for path in sorted((root / folder).iterdir()):
            if path.is_file() and path.name.startswith(".") and path.name.endswith(PENDING_MASK):
                yield Problem(str(path.relative_to(root)), "a mask a stopped refine wrote beside the item's own (committed "
                              "or not): re-run refine to finish, do not delete it")
            elif path.is_file() and path.suffix in suffixes and path.stem not in ids and not TEMPORARY.match(path.name):
                yield Problem(str(path.relative_to(root)), "belongs to no manifest item (an unfinished item: "
                              "re-run the command that made the dataset, or delete it)")


__all__ = ["Problem", "ValidateError", "validate_dataset"]
