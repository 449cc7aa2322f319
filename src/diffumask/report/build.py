"""``diffumask report``: one static HTML page (plus a folder of thumbnails) to *look at* a dataset.

``REPORT.html`` holds the statistics, plots (inline SVG) and the gallery's code; ``REPORT_files/``
holds one small JPEG strip per item (image, mask overlay, soft maps; 96 px each, in folders of 1,000) and
``items.js``, the gallery's item list, loaded by a ``<script>`` tag so the page works from
``file://`` with no server and no network. The gallery pages through the items in the browser, so
a 10,000-item dataset costs 10,000 small thumbnails, not 10,000 inlined images.

Shown when present:

- each item's image, its mask over it in the palette colours, and each class's fused soft map, with a
  class filter and sorting by mask area or by the noise-learning score ``record["noise"]["score"]``
  (the held-out IoU ``diffumask filter`` records; higher = cleaner), when items carry one;
- per class: items naming it, items whose mask has it, its area distribution, the share of 255;
- the paper's Fig. 3 from ``refine --method adaptive --per-class``: each class's IoU against the
  AffinityNet mask over the γ sweep (``refine.jsonl``'s pooled curves), the chosen γ marked;
- the paper's Fig. 2 for a few items: the per-resolution attention maps beside the fused one;
- what ``refine`` did (manifest ``refine`` fields), training runs (``--run``) and evaluations
  (``--evaluation``, the JSON of ``diffumask evaluate --json``) with a per-class IoU table and chart.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from ..dataset import (IGNORE_INDEX, Dataset, decoding, plain_modes, resize_labels, temporary_folder, voc_palette,
                       write_text_atomic)
from ..errors import DiffumaskError
from ..formats.export import open_dataset
from . import plots

THUMB = 96  # thumbnail side in pixels (the longer side); the gallery shows them at this size
GAP = 2  # white pixels between the panels of an item's strip
FIG2_SIDE = 160
PAGE_SIZE = 48  # gallery cards per page
JPEG_QUALITY = 82
RESOLUTION_KEY = re.compile(r"^(?P<name>.+)@(?P<res>\d+)$")


class ReportError(DiffumaskError, ValueError):
    """The report cannot be made: no dataset, an unreadable run or evaluation file, a bad --out."""


@dataclass
class ReportResult:
    html: Path
    assets: Path
    items: int
    seconds: float

    @property
    def size_bytes(self) -> int:
        return self.html.stat().st_size + sum(p.stat().st_size for p in self.assets.rglob("*") if p.is_file())


def _colormap(values: np.ndarray) -> np.ndarray:
    """[0, 1] → RGB (viridis), the usual heat-map colours of attention maps."""
    grey = np.clip(np.nan_to_num(values) * 255, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB)


def _fit(shape: tuple[int, int], side: int) -> tuple[int, int]:
    """(width, height) with the longer side ``side``."""
    h, w = shape
    scale = side / max(h, w)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _save_jpeg(path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb).save(path, format="JPEG", quality=JPEG_QUALITY)


def _read_image_small(path: Path, side: int) -> np.ndarray:
    """The image at about ``side`` px; JPEGs are decoded at reduced scale (draft), which is most of the saving."""
    with decoding(path), Image.open(path) as image:
        image.draft("RGB", (side, side))
        return np.array(image.convert("RGB"))


def _overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """The mask's palette colours blended over the image; background left as it is."""
    palette = np.array(voc_palette(), np.float32)
    colours = palette[mask]
    blend = np.where((mask != 0)[..., None], (1 - alpha) * image + alpha * colours, image)
    return blend.astype(np.uint8)


def _soft_map_thumb(soft: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    grid = soft.mean(axis=0) if soft.ndim == 3 else soft  # a class of several tokens: their mean
    resized = cv2.resize(grid.astype(np.float32), size, interpolation=cv2.INTER_CUBIC)
    top = float(resized.max())
    return _colormap(resized / top if top > 0 else resized)


class _Stats:
    """Per-class counts and areas, accumulated item by item from the masks."""

    def __init__(self, n_classes: int):
        self.named = np.zeros(n_classes + 1, np.int64)
        self.present = np.zeros(n_classes + 1, np.int64)
        self.areas: list[list[float]] = [[] for _ in range(n_classes + 1)]
        self.ignored = np.zeros(n_classes + 1, np.int64)  # 255 pixels in items whose mask has the class
        self.pixels = np.zeros(n_classes + 1, np.int64)  # all pixels of those items
        self.total_ignored = 0
        self.total_pixels = 0

    def add(self, named: Iterable[int], counts: np.ndarray | None) -> None:
        for k in named:
            self.named[k] += 1
        if counts is None:
            return
        total = int(counts.sum())
        self.total_pixels += total
        self.total_ignored += int(counts[IGNORE_INDEX])
        for k in np.flatnonzero(counts[1:len(self.named)]) + 1:
            self.present[k] += 1
            self.areas[k].append(float(counts[k]) / total)
            self.ignored[k] += int(counts[IGNORE_INDEX])
            self.pixels[k] += total


def _item_assets(dataset: Dataset, record: Mapping[str, Any], number: int, assets: Path, names: list[str],
                 stats: _Stats) -> dict[str, Any]:
    """Write one item's thumbnails; return its gallery entry."""
    item_id = record["id"]
    folder = f"{number // 1000:03d}"
    stem = f"{folder}/{number:06d}"
    (assets / folder).mkdir(exist_ok=True)
    named = [names.index(c) for c in record.get("classes", []) if c in names]
    entry: dict[str, Any] = {"i": item_id, "f": stem, "s": record.get("split", "train"), "c": named,
                             "p": record.get("prompt", ""), "a": None, "u": None, "z": None}
    noise = record.get("noise")
    if isinstance(noise, Mapping) and isinstance(noise.get("score"), (int, float)):
        entry["z"] = round(float(noise["score"]), 4)
    image_path = dataset.image_path(item_id)
    image = _read_image_small(image_path, THUMB) if image_path.is_file() else None
    mask_path = dataset.mask_path(item_id)
    mask = dataset.read_mask(item_id) if mask_path.is_file() else None
    counts = None if mask is None else np.bincount(mask.ravel(), minlength=256)
    stats.add(named, counts)
    shape = image.shape[:2] if image is not None else (mask.shape if mask is not None else (THUMB, THUMB))
    size = _fit(shape, THUMB)
    panels: list[tuple[str | int, np.ndarray]] = []  # one strip per item: fewer, larger files than one per panel
    if image is not None:
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if image.shape[1] > size[0] else cv2.INTER_CUBIC)
        panels.append(("image", image))
    if counts is not None:
        total = int(counts.sum())
        entry["a"] = round(float(total - counts[0] - counts[IGNORE_INDEX]) / total, 4)
        entry["u"] = round(float(counts[IGNORE_INDEX]) / total, 4)
        entry["c"] = sorted(set(named) | {int(k) for k in np.flatnonzero(counts[1:len(names)]) + 1})
        small = resize_labels(mask, size)
        base = image if image is not None else np.full((*small.shape, 3), 128, np.uint8)
        panels.append(("mask", _overlay(base, small)))
    soft_path = dataset.soft_maps_path(item_id)
    if soft_path.is_file():
        wanted = [names[k] for k in entry["c"]]
        for name, soft in dataset.read_soft_maps(item_id, wanted).items():  # only the fused maps are read
            panels.append((names.index(name), _soft_map_thumb(soft, size)))
    entry["v"] = [code for code, _ in panels]
    entry["w"] = size[0]
    if panels:
        gap = np.full((size[1], GAP, 3), 255, np.uint8)
        strip = [part for _, panel in panels for part in (panel, gap)][:-1]
        _save_jpeg(assets / f"{stem}.jpg", np.hstack(strip))
    return entry


def _class_table(stats: _Stats, names: list[str]) -> list[dict[str, Any]]:
    rows = []
    palette = voc_palette()
    for k in range(1, len(names)):
        areas = np.array(stats.areas[k])
        top = max(0.05, math.ceil(float(areas.max()) * 20) / 20) if areas.size else 1.0
        rows.append({
            "index": k, "name": names[k], "color": palette[k], "named": int(stats.named[k]),
            "present": int(stats.present[k]),
            "area": None if not areas.size else {q: float(np.quantile(areas, p)) for q, p in
                                                  (("min", 0), ("p25", 0.25), ("median", 0.5), ("p75", 0.75), ("max", 1))},
            "ignored": float(stats.ignored[k] / stats.pixels[k]) if stats.pixels[k] else None,
            "histogram": plots.histogram(areas.tolist(), 10, 0.0, top, palette[k], f"{names[k]}: mask area",
                                         "share of the image") if areas.size else "",
        })
    return rows


def _gamma_curves(dataset: Dataset, records: Sequence[Mapping[str, Any]], names: list[str]) -> dict[str, Any] | None:
    """Fig. 3: each class's pooled IoU-vs-γ curve from ``refine.jsonl``, when adaptive --per-class ran."""
    if not any(r.get("refine", {}).get("method") == "adaptive" and r["refine"].get("per_class") for r in records):
        return None
    from ..masks.adaptive import best_gamma, pool_counts
    from ..refine import LOG_NAME

    path = dataset.root / LOG_NAME
    if not path.is_file():
        return None
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    header = lines[0].get("refine", {}) if lines else {}
    gammas = header.get("gammas")
    curves = [{int(k): v for k, v in e["counts"].items()} for e in lines[1:] if e.get("kind") == "curve"]
    if not gammas or not curves or not header.get("per_class"):
        return None
    pooled = pool_counts(curves, len(gammas))
    palette = voc_palette()
    series, marks, rows = [], [], []
    for label in sorted(pooled):
        pairs = pooled[label]
        ious = [i / u if u else 0.0 for i, u in pairs]
        best = best_gamma({label: pairs}, gammas)
        series.append((names[label] if label < len(names) else str(label), ious, palette[label]))
        marks.append(best)
        rows.append({"name": series[-1][0], "color": palette[label], "gamma": best,
                     "iou": None if best is None else ious[gammas.index(best)], "images": len(curves)})
    svg = plots.line_chart(gammas, series, "IoU against the AffinityNet mask per γ", "γ", "IoU", marks, y_max=1.0, zoom=True)
    return {"svg": svg, "rows": rows, "gammas": gammas}


def _fig2(dataset: Dataset, records: Sequence[Mapping[str, Any]], names: list[str], assets: Path,
          count: int) -> list[dict[str, Any]]:
    """Fig. 2 for the first ``count`` items whose soft maps keep the per-resolution grids."""
    figures: list[dict[str, Any]] = []
    for record in records:
        if len(figures) == count:
            break
        path = dataset.soft_maps_path(record["id"])
        if not path.is_file() or not record.get("classes") or not dataset.image_path(record["id"]).is_file():
            continue  # the gallery shows an item's files that are there, and validate names the lost ones
        name = record["classes"][0]
        with np.load(path) as data:
            grids = sorted((int(m["res"]), key) for key in data.files
                           if (m := RESOLUTION_KEY.match(key)) and m["name"] == name)
        if not grids:
            continue
        maps = dataset.read_soft_maps(record["id"], [name, *(key for _, key in grids)])
        image_path = dataset.image_path(record["id"])
        image = _read_image_small(image_path, FIG2_SIDE)
        size = _fit(image.shape[:2], FIG2_SIDE)
        stem = f"fig2_{len(figures)}"
        _save_jpeg(assets / f"{stem}_image.jpg", cv2.resize(image, size, interpolation=cv2.INTER_CUBIC))
        panels = [{"src": f"{stem}_image.jpg", "label": "image"}]
        for res, key in grids:
            _save_jpeg(assets / f"{stem}_{res}.jpg", _soft_map_thumb(maps[key], size))
            panels.append({"src": f"{stem}_{res}.jpg", "label": f"{res}×{res}"})
        if name in maps:
            _save_jpeg(assets / f"{stem}_fused.jpg", _soft_map_thumb(maps[name], size))
            panels.append({"src": f"{stem}_fused.jpg", "label": "fused"})
        figures.append({"id": record["id"], "class": name, "prompt": record.get("prompt", ""), "panels": panels})
    return figures


def _refine_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    refined = [r["refine"] for r in records if isinstance(r.get("refine"), Mapping)]
    if not refined:
        return None
    methods = Counter(f"{r.get('method')}{' + CRF' if r.get('crf') else ''}" for r in refined)
    params = {k: v for k, v in refined[0].items() if k not in ("gamma", "class_gammas") and not isinstance(v, Mapping)}
    gammas = [float(r["gamma"]) for r in refined if isinstance(r.get("gamma"), (int, float))]
    hist = plots.histogram(gammas, 10, min(gammas), max(gammas) + 1e-9, (70, 110, 170), "per-image adaptive γ", "γ") \
        if gammas else ""
    return {"count": len(refined), "methods": dict(methods), "params": params, "gamma_histogram": hist}


def _noise_summary(entries: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    scores = [e["z"] for e in entries if e["z"] is not None]
    if not scores:
        return None
    return {"count": len(scores), "median": float(np.median(scores)),
            "histogram": plots.histogram(scores, 10, min(scores), max(scores) + 1e-9, (170, 90, 60),
                                         "noise score", "score (higher = cleaner)")}


def _runs(paths: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    if not paths:
        return []
    from ..segment.run import RunError, RunFolder
    from ..segment.train import train_summary

    runs = []
    for path in paths:
        try:
            run = RunFolder(path)
        except RunError as error:
            raise ReportError(str(error)) from None
        entries = run.log_entries()
        preset = run.settings.get("preset", {})
        summary = {"path": str(run.root), "name": run.root.name, "classes": run.classes[1:],
                   "data": run.settings.get("data"), "split": run.settings.get("split"),
                   "preset": run.settings.get("preset_name") or preset.get("family"),
                   "model": preset.get("model") if isinstance(preset.get("model"), str) else None,
                   "finished": run.model_dir.is_dir(), **train_summary(run), "svg": ""}
        if len(entries) >= 2:
            summary["svg"] = plots.line_chart([e["step"] for e in entries], [("loss", [e["loss"] for e in entries],
                                                                             (60, 100, 160))],
                                              f"{run.root.name}: training loss", "step", "loss")
        runs.append(summary)
    return runs


def _evaluations(paths: Sequence[str | os.PathLike[str]]) -> dict[str, Any] | None:
    if not paths:
        return None
    evaluations = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            iou, miou = dict(data["iou"]), float(data["miou"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ReportError(f"{path} is not the JSON of `diffumask evaluate --json` ({error})") from None
        label = f"{Path(str(data.get('run', path))).name} on {data.get('data', '?')} ({data.get('split', '?')})"
        evaluations.append({"label": label, "iou": iou, "miou": miou, "images": data.get("images"),
                            "seen": data.get("seen"), "unseen": data.get("unseen"), "harmonic": data.get("harmonic")})
    classes = list(dict.fromkeys(c for e in evaluations for c in e["iou"]))
    palette = voc_palette()
    for e in evaluations:
        values = [None if e["iou"].get(c) is None else 100 * e["iou"][c] for c in classes]
        e["svg"] = plots.bar_chart([*classes, "mIoU"], [*values, 100 * e["miou"]],
                                   [palette[k] if k else (150, 150, 150) for k in range(len(classes))] + [(40, 40, 40)],
                                   f"per-class IoU: {e['label']}", "IoU (%)", y_max=100)
    return {"classes": classes, "evaluations": evaluations}


def _templates() -> Any:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("diffumask.report", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda v, digits=1: "n/a" if v is None else f"{100 * v:.{digits}f} %"
    return env


def _replace_folder(new: Path, target: Path) -> None:
    """Put ``new`` where ``target`` is, with no moment at which ``target`` holds a mix of both. The old one goes
    through a temporary folder, which a later run removes if this one is killed before it does."""
    with temporary_folder(target.parent, target.name) as trash:
        if target.exists():
            os.replace(target, trash / "old")
        os.replace(new, target)
        shutil.rmtree(trash, ignore_errors=True)


def build_report(dataset_root: str | os.PathLike[str], out: str | os.PathLike[str],
                 runs: Sequence[str | os.PathLike[str]] = (), evaluations: Sequence[str | os.PathLike[str]] = (),
                 fig2_items: int = 4, page_size: int = PAGE_SIZE, progress: bool = False) -> ReportResult:
    """Write the report of the dataset at ``dataset_root`` to ``out`` (an ``.html`` file) and its ``_files``."""
    start = time.perf_counter()
    dataset = open_dataset(dataset_root)
    records = dataset.records()
    html = Path(out)
    if html.suffix.lower() not in (".html", ".htm"):
        raise ReportError(f"--out must name an .html file (its thumbnails go beside it in a _files folder), got {html}")
    if page_size < 1:
        raise ReportError(f"the page size must be at least 1, got {page_size}")
    if fig2_items < 0:
        raise ReportError(f"--fig2-items is a count of items (0: no Fig. 2), got {fig2_items}")
    run_summaries = _runs(runs)  # read before anything is written: a bad --run writes nothing
    evaluation_summary = _evaluations(evaluations)
    html.parent.mkdir(parents=True, exist_ok=True)
    assets_name = f"{html.stem}_files"
    assets_url = urllib.parse.quote(assets_name)  # a page named "r #1.html": '#' and '%' are not a path's in a URL
    with temporary_folder(html.parent, assets_name) as tmp:  # what a killed report left there goes first
        names = ["background", *dataset.classes]
        stats = _Stats(len(dataset.classes))
        from tqdm.auto import tqdm

        entries = [_item_assets(dataset, record, number, tmp, names, stats)
                   for number, record in enumerate(tqdm(records, desc="report", unit="item", disable=not progress))]
        figures = _fig2(dataset, records, names, tmp, fig2_items)
        palette = voc_palette()
        meta = {"names": names, "colors": [list(palette[k]) for k in range(len(names))], "pageSize": page_size,
                "assets": assets_url, "noise": any(e["z"] is not None for e in entries)}
        write_text_atomic(tmp / "items.js", "window.DIFFUMASK = " + json.dumps({"meta": meta, "items": entries},
                                                                               separators=(",", ":")) + ";\n")
        splits = Counter(e["s"] for e in entries)
        page = _templates().get_template("report.html.j2").render(
            title=dataset.root.name, root=str(dataset.root), items=len(entries), splits=dict(splits),
            classes=_class_table(stats, names), ignored=(stats.total_ignored / stats.total_pixels)
            if stats.total_pixels else None, with_masks=sum(e["a"] is not None for e in entries),
            with_maps=sum(any(isinstance(v, int) for v in e["v"]) for e in entries), settings=dataset.settings,
            assets=assets_name, assets_url=assets_url, fig3=_gamma_curves(dataset, records, names), fig2=figures,
            refine=_refine_summary(records),
            noise=_noise_summary(entries), runs=run_summaries, evaluation=evaluation_summary, meta=meta,
            generated=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        plain_modes(tmp)
        _replace_folder(tmp, html.parent / assets_name)
    write_text_atomic(html, page)
    return ReportResult(html, html.parent / assets_name, len(entries), time.perf_counter() - start)


__all__ = ["PAGE_SIZE", "ReportError", "ReportResult", "THUMB", "build_report"]
