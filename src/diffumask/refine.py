"""``diffumask refine``: rewrite a dataset's masks from its soft maps with a better method.

Images and soft maps stay untouched; each item's mask is recomputed, cleaned up (small blobs
dropped, small holes filled) and rewritten atomically, and at once the item's manifest line is
appended again with the method and its parameters under ``refine`` — mask first, then its line,
one item at a time — so a run killed at any moment leaves every finished item's mask with the
line that describes it, and the item in flight with its previous mask or its previous line only
until the re-run redoes it.

The manifest is the progress record: a re-run with the same parameters skips the items whose
line already says so (a killed run resumes); other parameters redo every item. The per-class
adaptive γ's curves are kept in ``DATASET/refine.jsonl`` (a header with the parameters, then one
line per image). A trained AffinityNet is saved in ``DATASET/refine/`` keyed by everything its
training depends on, so resuming does not train again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .dataset import Dataset, write_text_atomic
from .errors import ConfigError, DiffumaskError
from .masks.adaptive import best_gamma, candidate_mask, pool_counts, shortlisted_sweep, sweep, sweep_around
from .masks.affinity import (AffinityConfig, AffinityNet, affinity_mask, build_affinity_net, grid_labels,
                             load_affinity_weights, save_affinity_weights, seed_labels, train_affinity_net)
from .masks.assign import assign_labels
from .masks.cleanup import cleanup_mask
from .masks.crf import SEED_CRF, CRFParams, DenseCRF, crf_refine
from .masks.otsu import otsu_threshold
from .masks.propagate import propagate_mask
from .masks.threshold import PAPER_THRESHOLD, check_band, threshold_masks

METHODS = ("threshold", "otsu", "affinity", "adaptive", "propagate")
LOG_NAME = "refine.jsonl"


@dataclass
class RefineConfig:
    """How ``refine`` turns soft maps into masks; see ``diffumask refine --help`` for each option."""

    method: str = "threshold"
    threshold: float | None = None  # fixed γ, and adaptive's fallback; None: the γ the dataset was made with
    uncertain: float | None = None  # threshold: lower edge of the 255 band
    crf: bool | None = None  # None: the method's default (on for adaptive, off otherwise)
    crf_params: CRFParams = field(default_factory=CRFParams)
    seed_crf_params: CRFParams = SEED_CRF  # the AffinityNet seeds' CRF (when affinity.seed_crf)
    min_area: float = 0.005  # drop components below this fraction of the image
    max_hole: float = 0.01  # fill holes up to this fraction of the image
    per_class: bool = False  # adaptive: one γ per class from its curve instead of one per image
    gammas: tuple[float, ...] | None = None  # None: the paper's sweep around the dataset's γ (sweep_around)
    crf_shortlist: int = 1  # adaptive + CRF: CRF only the k best raw candidates (0: every one, as the paper)
    reference_crf: bool = True  # adaptive + CRF: CRF-refine the AffinityNet mask too before matching (paper: not)
    affinity: AffinityConfig = field(default_factory=AffinityConfig)
    affinity_weights: str | None = None  # initialise the AffinityNet from these weights
    power: int = 4  # propagate: self-attention matrix power
    propagate_threshold: float = 0.6
    propagate_uncertain: float | None = 0.5

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        check_band(self.threshold, self.uncertain)
        check_band(self.propagate_threshold, self.propagate_uncertain,
                   names=("--propagate-threshold", "--propagate-uncertain"))
        if self.gammas is not None and not all(0 < g < 1 for g in self.gammas):
            raise ConfigError(f"every γ of the sweep must lie in (0, 1), got {list(self.gammas)}")
        if self.power < 1:
            raise ConfigError(f"--power must be at least 1, got {self.power}")
        if not (0 <= self.min_area < 1 and 0 <= self.max_hole <= 1):
            raise ConfigError("--min-area and --max-hole are fractions of the image area, in [0, 1]")
        if self.per_class and self.method != "adaptive":
            raise ConfigError("--per-class applies to --method adaptive only")
        if self.gammas is not None and not self.gammas:
            raise ConfigError("the γ sweep is empty")
        if self.crf_shortlist < 0:
            raise ConfigError(f"--crf-shortlist must be 0 (every candidate) or more, got {self.crf_shortlist}")

    @property
    def use_crf(self) -> bool:
        return self.method == "adaptive" if self.crf is None else self.crf

    @property
    def uses_affinity(self) -> bool:
        return self.method in ("affinity", "adaptive")

    def params(self) -> dict[str, Any]:
        """The parameters this method actually uses (what the manifest records)."""
        out: dict[str, Any] = {"method": self.method, "crf": self.use_crf,
                               "min_area": self.min_area, "max_hole": self.max_hole}
        if self.use_crf:
            out["crf_params"] = self.crf_params.as_dict()
        if self.method == "threshold":
            out.update(threshold=self.threshold, uncertain=self.uncertain)
        if self.uses_affinity:
            out.update(affinity=self.affinity.as_dict(), affinity_weights=self.affinity_weights)
            if self.affinity.seed_crf:
                out["seed_crf_params"] = self.seed_crf_params.as_dict()
        if self.method == "adaptive":
            out.update(per_class=self.per_class, gammas=list(self.gammas), fallback_threshold=self.threshold)
            if self.use_crf:
                out.update(crf_shortlist=self.crf_shortlist, reference_crf=self.reference_crf)
        if self.method == "propagate":
            out.update(power=self.power, threshold=self.propagate_threshold, uncertain=self.propagate_uncertain)
        return out


@dataclass
class RefineResult:
    dataset: Dataset
    items: int  # items in the dataset
    refined: int  # items refined by this call (the rest were done by an earlier run)
    train_seconds: float  # AffinityNet seeds + training (0 when loaded or not needed)
    seconds: float  # everything else: the per-item work of this call


class ProgressLog:
    """``refine.jsonl``: a header with the parameters, then one JSON line per finished step (the
    per-class curves; masks are recorded in the manifest)."""

    def __init__(self, path: Path, params: Mapping[str, Any]):
        self.path = path
        self.header = {"refine": json.loads(json.dumps(params))}
        self.entries: list[dict[str, Any]] = []
        if path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            if lines and _loads(lines[0]) == self.header:
                self.entries = [e for line in lines[1:] if line.endswith("\n") and (e := _loads(line))]
                self._rewrite()  # drops a torn last line
                return
        self._rewrite()

    def _rewrite(self) -> None:
        lines = [self.header, *self.entries]
        write_text_atomic(self.path, "".join(json.dumps(e) + "\n" for e in lines))

    def done(self, kind: str) -> dict[str, dict[str, Any]]:
        return {e["id"]: e for e in self.entries if e["kind"] == kind}

    def append(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _loads(line: str) -> dict[str, Any] | None:
    try:
        return json.loads(line)
    except ValueError:
        return None


class _Item:
    """One manifest record with lazily read image and soft maps, keyed by label index."""

    def __init__(self, dataset: Dataset, record: Mapping[str, Any]):
        self.dataset = dataset
        self.record = dict(record)
        self.id: str = record["id"]
        self.classes: list[str] = list(record["classes"])
        self.resolutions: list[int] | None = record.get("resolutions")  # the grids generate fused
        self.labels = {name: dataset.class_index(name) for name in self.classes}

    def image(self) -> np.ndarray:
        return self.dataset.read_image(self.id)

    def soft(self) -> dict[str, np.ndarray]:
        return self.dataset.read_soft_maps(self.id)

    def maps(self, soft: Mapping[str, np.ndarray] | None = None) -> dict[int, np.ndarray]:
        soft = self.dataset.read_soft_maps(self.id, self.classes) if soft is None else soft
        missing = [c for c in self.classes if c not in soft]
        if missing:
            raise DiffumaskError(f"item {self.id} has no soft map for {missing} in {self.dataset.soft_maps_path(self.id)}")
        return {self.labels[c]: soft[c] for c in self.classes}


def _affinity_net(dataset: Dataset, items: list[_Item], config: RefineConfig,
                  progress: bool) -> tuple[AffinityNet, float]:
    """Load the AffinityNet this configuration trains, or compute seeds and train it (timed)."""
    size = tuple(items[0].image().shape[:2])
    net = build_affinity_net(config.affinity, size)
    if config.affinity_weights:
        load_affinity_weights(net, config.affinity_weights)
    key = json.dumps({"affinity": config.affinity.training_dict(), "seed_crf": config.seed_crf_params.as_dict(),
                      "weights": config.affinity_weights and str(Path(config.affinity_weights).resolve()),
                      "items": [i.id for i in items], "size": size}, sort_keys=True)
    path = dataset.root / "refine" / f"affinitynet-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if path.is_file():
        load_affinity_weights(net, path)
        return net.eval(), 0.0
    if config.affinity.train_steps == 0:
        return net.eval(), 0.0
    start = time.perf_counter()
    seed_crf = config.seed_crf_params if config.affinity.seed_crf else None
    seeds = []
    for item in tqdm(items, desc="affinity seeds", unit="img", disable=not progress, dynamic_ncols=True):
        labels = seed_labels(item.image(), item.maps(), config.affinity, seed_crf)
        seeds.append(grid_labels(labels, net.stride, config.affinity.seed_grid))
    bar = tqdm(total=config.affinity.train_steps, desc="train AffinityNet", unit="step", disable=not progress,
               dynamic_ncols=True)
    with bar:
        def report(step: int, loss: float) -> None:
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

        train_affinity_net(net, lambda i: items[i].image(), seeds, config.affinity, report)
    seconds = time.perf_counter() - start
    path.parent.mkdir(exist_ok=True)
    save_affinity_weights(net, path)
    return net.eval(), seconds


def _final_crf(image: np.ndarray, mask: np.ndarray, labels: list[int], config: RefineConfig) -> np.ndarray:
    return crf_refine(image, mask, [0, *labels], config.crf_params) if config.use_crf else mask


def _item_mask(item: _Item, config: RefineConfig, net: AffinityNet | None,
               gammas: Mapping[int, float] | None) -> tuple[np.ndarray, dict[str, Any]]:
    """One item's mask before cleanup, and what to record about it."""
    soft = item.soft() if config.method == "propagate" else None  # only propagate reads the self-attention
    image = item.image()
    maps = item.maps(soft)
    labels = list(maps)
    crf = config.crf_params if config.use_crf else None
    extra: dict[str, Any] = {}
    if config.method == "threshold":
        mask = _final_crf(image, threshold_masks(maps, config.threshold, config.uncertain), labels, config)
    elif config.method == "otsu":
        thresholds = {label: otsu_threshold(m) for label, m in maps.items()}
        extra["thresholds"] = {str(k): round(v, 4) for k, v in thresholds.items()}
        mask = _final_crf(image, assign_labels(maps, thresholds), labels, config)
    elif config.method == "propagate":
        mask = propagate_mask(soft, item.labels, item.resolutions, image.shape[:2], config.power,
                              config.propagate_threshold, config.propagate_uncertain)
        mask = _final_crf(image, mask, labels, config)
    elif config.method == "affinity":
        mask = _final_crf(image, affinity_mask(net, image, maps, config.affinity), labels, config)
    elif gammas is not None:  # adaptive per class, second pass
        mask = candidate_mask(image, maps, {label: gammas[label] for label in labels}, crf)
        extra["class_gammas"] = {str(k): gammas[k] for k in labels}
    else:  # adaptive per image
        dense = DenseCRF(image, [0, *labels], crf) if crf is not None else None  # kernels built once per image
        reference = _reference(net, image, maps, config, dense)
        tried, counts, candidates = shortlisted_sweep(image, maps, reference, config.gammas, dense, config.crf_shortlist)
        gamma = best_gamma(counts, tried)
        extra["gamma"] = gamma
        mask = (candidate_mask(image, maps, config.threshold, dense) if gamma is None
                else candidates[tried.index(gamma)])
    return mask, extra


def _reference(net: AffinityNet, image: np.ndarray, maps: Mapping[int, np.ndarray], config: RefineConfig,
               dense: DenseCRF | None) -> np.ndarray:
    """The AffinityNet mask B̂ that adaptive candidates are matched to; with ``reference_crf`` refined by
    the image's CRF (``dense``) like the candidates, so both sides of the match have the CRF's edges."""
    reference = affinity_mask(net, image, maps, config.affinity)
    return dense(reference) if dense is not None and config.reference_crf else reference


def _class_gammas(log: ProgressLog, items: list[_Item], config: RefineConfig, net: AffinityNet,
                  progress: bool) -> dict[int, float]:
    """Per-class adaptive γ: every image's sweep counts (logged, resumable), pooled per class.

    With a CRF shortlist the curves are pooled from raw candidates (a full CRF sweep per image is
    what the shortlist avoids); the second pass CRF-refines the chosen mask either way.
    """
    done = log.done("curve")
    for item in tqdm([i for i in items if i.id not in done], desc="adaptive curves", unit="img",
                     disable=not progress, dynamic_ncols=True):
        image, maps = item.image(), item.maps()
        needs_crf = config.use_crf and (config.reference_crf or config.crf_shortlist == 0)
        dense = DenseCRF(image, [0, *maps], config.crf_params) if needs_crf else None  # kernels built once
        reference = _reference(net, image, maps, config, dense)
        counts, _ = sweep(image, maps, reference, config.gammas, dense if config.crf_shortlist == 0 else None)
        log.append({"kind": "curve", "id": item.id, "counts": {str(k): v for k, v in counts.items()}})
    curves = [{int(k): v for k, v in e["counts"].items()} for e in log.done("curve").values()]
    pooled = pool_counts(curves, len(config.gammas))
    chosen = {label: best_gamma({label: pairs}, config.gammas) for label, pairs in pooled.items()}
    return {label: config.threshold if gamma is None else gamma for label, gamma in chosen.items()}


def _refined_with(record: Mapping[str, Any], params: Mapping[str, Any]) -> bool:
    """Whether an item's manifest line says it was refined with exactly these parameters."""
    refine = record.get("refine") or {}
    return all(refine.get(key) == value for key, value in params.items())


def refine_dataset(root: str | Path, config: RefineConfig, progress: bool = True, redo: bool = False) -> RefineResult:
    """Run ``refine`` on a dataset folder (see the module docstring); resumable.

    ``redo`` refines every item again even where the manifest says it is done (benchmarks repeat runs).
    """
    dataset = Dataset(root)
    records = dataset.records()
    if not records:
        raise DiffumaskError(f"{dataset.root} holds no finished items to refine")
    if missing := [r["id"] for r in records if not dataset.soft_maps_path(r["id"]).is_file()]:
        raise DiffumaskError(f"{dataset.root} has no soft maps for {len(missing)} item(s) (e.g. "
                             f"{dataset.soft_maps_path(missing[0])}); refine needs a dataset made by `diffumask generate`")
    if config.use_crf or (config.uses_affinity and config.affinity.seed_crf):
        crf_refine(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2), np.uint8), [0, 1], config.crf_params)  # fail early
    recorded = dataset.settings.get("threshold")  # generate's γ; absent in exported ground-truth data
    made_with = PAPER_THRESHOLD if recorded is None else float(recorded)
    if config.threshold is None:
        check_band(made_with, config.uncertain, names=("the dataset's γ (pass --threshold)", "--uncertain"))
        config = replace(config, threshold=made_with)
    if config.gammas is None:
        config = replace(config, gammas=sweep_around(made_with))
    dataset.recover_masks()  # a mask a killed run committed but did not rename yet
    dataset.compact()  # one line per item again before this run appends its own
    params = json.loads(json.dumps(config.params()))
    items = [_Item(dataset, r) for r in records]
    pending = [item for item in items if redo or not _refined_with(item.record, params)]
    net, train_seconds = None, 0.0
    start = time.perf_counter()
    if pending and config.uses_affinity:
        net, train_seconds = _affinity_net(dataset, items, config, progress)
    gammas = None
    if pending and config.per_class:
        if redo:
            (dataset.root / LOG_NAME).unlink(missing_ok=True)
        gammas = _class_gammas(ProgressLog(dataset.root / LOG_NAME, params), items, config, net, progress)
    for item in tqdm(pending, desc=f"refine {config.method}", unit="img", disable=not progress, dynamic_ncols=True):
        mask, extra = _item_mask(item, config, net, gammas)
        mask = cleanup_mask(mask, config.min_area, config.max_hole)
        dataset.rewrite_mask({**item.record, "refine": {**params, **extra}}, mask)
    dataset.compact()  # a finished run leaves one line per item
    seconds = time.perf_counter() - start - train_seconds
    return RefineResult(dataset, len(items), len(pending), train_seconds, seconds)


__all__ = ["METHODS", "RefineConfig", "RefineResult", "refine_dataset"]
