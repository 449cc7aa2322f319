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

At scale: the AffinityNet, the random walk and the propagation run on ``device`` (a GPU), the
per-item CPU work (reading, CRF, cleanup, and writing the new mask beside the old one) in a pool of
worker processes (:mod:`diffumask.workers`; the steps are in :mod:`diffumask.refine_items`), and this
process alone commits (appends the line, renames the mask), in the items' order. Under torchrun or Slurm each worker refines its share of the items, appending to its own
manifest shard; the worker that finds every item refined merges the shards into the manifest.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .dataset import REFINE_FOLDER, Dataset, write_text_atomic
from .distributed import current_worker, job_terms
from .errors import ConfigError, DiffumaskError, check_sequences
from .masks.adaptive import best_gamma, pool_counts, sweep_around
from .masks.affinity import (AffinityConfig, AffinityNet, build_affinity_net, load_affinity_weights,
                             save_affinity_weights, train_affinity_net)
from .masks.crf import SEED_CRF, CRFParams
from .masks.propagate import NO_SELF_ATTENTION
from .masks.threshold import PAPER_THRESHOLD, check_band
from .models import check_device, resolve_device
from .refine_items import Item, curve_steps, grid_seeds, item_steps
from .workers import check_workers, cpu_pool, ordered

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
    reference_crf: bool = False  # adaptive + CRF: CRF-refine the AffinityNet mask too before matching (+0.006 mIoU
    # per image on the shapes benchmark, for a second CRF per image: 1.4× adaptive's cost at 512 px); paper: not
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
        check_sequences("RefineConfig", gammas=(self.gammas, "gamma_range(0.3, 0.7, 0.05)"))
        if self.gammas is not None and not all(0 < g < 1 for g in self.gammas):
            raise ConfigError(f"every γ of the sweep must lie in (0, 1), got {list(self.gammas)}")
        if self.gammas is not None and list(self.gammas) != sorted(set(self.gammas)):  # (0.3, 0.7, 0.05) is no range
            raise ConfigError(f"the γ sweep lists the values to try, rising and each once, got "
                              f"{list(self.gammas)}; for the command line's START,STOP,STEP use "
                              "diffumask.masks.adaptive.gamma_range")
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
    refined: int  # items refined by this call (the rest of its share were done by an earlier run)
    train_seconds: float  # AffinityNet seeds + training (0 when loaded or not needed)
    seconds: float  # everything else: the per-item work of this call
    share: int | None = None  # under a launcher: the items this worker refines (None: every item, one process)


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


def _affinity_net(dataset: Dataset, items: list[Item], config: RefineConfig, progress: bool, pool: Executor,
                  workers: int, device: torch.device) -> tuple[AffinityNet, float, str | None]:
    """Load the AffinityNet this configuration trains, or compute seeds (in the pool) and train it on
    ``device`` (timed); with the file that holds its weights, which CPU workers load (None: untrained, from
    its seed)."""
    size = tuple(items[0].image().shape[:2])
    net = build_affinity_net(config.affinity, size)
    if config.affinity_weights:
        load_affinity_weights(net, config.affinity_weights)
    steps = config.affinity.train_steps_for(len(items))
    key = json.dumps({"affinity": config.affinity.training_dict(), "steps": steps,
                      "seed_crf": config.seed_crf_params.as_dict(),
                      "weights": config.affinity_weights and str(Path(config.affinity_weights).resolve()),
                      "items": [i.id for i in items], "size": size}, sort_keys=True)
    path = dataset.root / REFINE_FOLDER / f"affinitynet-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if path.is_file():
        load_affinity_weights(net, path)
        return net.to(device).eval(), 0.0, str(path)
    if steps == 0:  # the given weights as they are now (a copy could go stale), or the seed's
        return net.to(device).eval(), 0.0, config.affinity_weights
    start = time.perf_counter()
    seeds = [seed for _, seed in tqdm(ordered(pool, items, functools.partial(grid_seeds, config, net.stride),
                                              window=_window(workers)),
                                      total=len(items), desc="affinity seeds", unit="img", disable=not progress,
                                      dynamic_ncols=True)]
    bar = tqdm(total=steps, desc="train AffinityNet", unit="step", disable=not progress, dynamic_ncols=True)
    with bar:
        def report(step: int, loss: float) -> None:
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

        train_affinity_net(net, lambda i: items[i].image(), seeds, config.affinity, report if progress else None,
                           device)
    seconds = time.perf_counter() - start
    # Each worker of a sharded job trains this same network: same items, seeds and steps, and training is
    # deterministic on one kind of device, so they write identical weights. The save is atomic; a worker
    # that finds another's file already there uses it.
    _save_once(net, path)
    return net.to(device).eval(), seconds, str(path)


def _save_once(net: AffinityNet, path: Path) -> None:
    """Save the weights unless another worker of a sharded job saved the same network first, and use the file
    that stays: it never changes once written, so every worker, and every CPU worker process, walks with it."""
    if not save_affinity_weights(net, path, exclusive=True):
        load_affinity_weights(net, path)


def _class_gammas(log: ProgressLog, items: list[Item], config: RefineConfig, net: AffinityNet, progress: bool,
                  pool: Executor, workers: int, device: torch.device, net_weights: str) -> dict[int, float]:
    """Per-class adaptive γ: every image's sweep counts (logged, resumable), pooled per class.

    With a CRF shortlist the curves are pooled from raw candidates (a full CRF sweep per image is
    what the shortlist avoids); the second pass CRF-refines the chosen mask either way.
    """
    done = log.done("curve")
    todo = [i for i in items if i.id not in done]
    steps = curve_steps(config, net, device, net_weights)
    for item, counts in tqdm(ordered(pool, todo, steps.prepare, steps.device, steps.finish, _window(workers)),
                             total=len(todo), desc="adaptive curves", unit="img", disable=not progress,
                             dynamic_ncols=True):
        log.append({"kind": "curve", "id": item.id, "counts": {str(k): v for k, v in counts.items()}})
    curves = [{int(k): v for k, v in e["counts"].items()} for e in log.done("curve").values()]
    pooled = pool_counts(curves, len(config.gammas))
    chosen = {label: best_gamma({label: pairs}, config.gammas) for label, pairs in pooled.items()}
    return {label: config.threshold if gamma is None else gamma for label, gamma in chosen.items()}


#: What every worker imports, once, in the pool's forkserver: the per-item steps and the CRF's libraries, which
#: would otherwise be imported by each worker at its first item (kornia's filters alone take 0.3 CPU s; a
#: missing optional one, the crf extra, is skipped there).
WORKER_MODULES = ("diffumask.refine_items", "kornia.filters", "pydensecrf.densecrf")


def _window(workers: int) -> int:
    """Items in flight: enough to keep every worker busy while the parent commits, few enough to stay small."""
    return 2 * workers + 2


def _refined_with(record: Mapping[str, Any], params: Mapping[str, Any]) -> bool:
    """Whether an item's manifest line says it was refined with exactly these parameters."""
    refine = record.get("refine") or {}
    return all(refine.get(key) == value for key, value in params.items())


def refine_dataset(root: str | Path, config: RefineConfig, progress: bool = True, redo: bool = False,
                   device: str | None = None, workers: int = 1, device_crf: bool = False) -> RefineResult:
    """Run ``refine`` on a dataset folder (see the module docstring); resumable.

    ``device`` runs the AffinityNet, the random walk and the propagation (None: the GPU when there is one;
    ``cuda`` is this worker's GPU under torchrun or Slurm); ``workers`` processes do the per-item CPU work (reading, CRF,
    cleanup). ``device_crf`` runs the dense CRF on ``device`` in torch, in this process (not for adaptive,
    whose CRF stays in the workers); one call is bound by its kernel launches (~30 ms on an H200), so 16
    CPU workers keep up better, and it is for GPUs with few CPU cores. None of the three changes which
    masks are written (to float rounding), and the manifest records none. Under a
    launcher this process refines its share of the items (:class:`diffumask.distributed.Worker`).
    ``redo`` refines every item again even where the manifest says it is done (benchmarks repeat runs); one
    process only.
    """
    check_workers(workers)
    worker = current_worker()
    device = check_device(resolve_device(device))
    if worker.sharded and config.per_class:
        raise ConfigError("--per-class pools every image's curve before any mask is written; run it as one "
                          "process (without torchrun/srun or --shard)")
    if worker.sharded and redo:  # no worker could tell when every item is redone, so none would merge the shards
        raise ConfigError("redo=True refines every item again, which the manifest cannot tell apart from done work "
                          "across workers; run it as one process (without torchrun/srun or --shard)")
    dataset = Dataset(root)
    records = dataset.records()
    if not records:
        raise DiffumaskError(f"{dataset.root} holds no finished items to refine")
    dataset.require_files([r["id"] for r in records], "soft maps",
                          "refine needs the soft maps `diffumask generate` writes: a SoftMaps folder deleted whole is "
                          "not made again, so generate the dataset anew in another folder")
    if config.method == "propagate" and "self_attention" in dataset.settings and not dataset.settings["self_attention"]:
        raise DiffumaskError(NO_SELF_ATTENTION)  # generated without it: said before any work, not at the first item
    recorded = dataset.settings.get("threshold")  # generate's γ; absent in exported ground-truth data
    made_with = PAPER_THRESHOLD if recorded is None else float(recorded)
    if config.threshold is None:
        check_band(made_with, config.uncertain, names=("the dataset's γ (pass --threshold)", "--uncertain"))
        config = replace(config, threshold=made_with)
    if config.gammas is None:
        config = replace(config, gammas=sweep_around(made_with))
    params = json.loads(json.dumps(config.params()))
    if config.uses_affinity:
        params["affinity_train_steps"] = config.affinity.train_steps_for(len(records))
    # validate and readers tell this job in flight from a killed one's leftovers; a sharded job's workers share params
    with dataset.writing({"command": "refine", **job_terms(), "refine": params}):
        if not worker.sharded:  # other workers may be writing: a pending mask may be theirs, the manifest growing
            with dataset.lock():
                dataset.recover_masks()  # a mask a killed run committed but did not rename yet
                dataset.compact()  # one line per item again before this run appends its own
        items = [Item(dataset, r) for r in records]
        if worker.sharded:  # the one order every worker sees, however the shards interleave (and so one AffinityNet)
            items.sort(key=lambda item: item.id)
        mine = worker.take(items)  # the full, stable list: shares are disjoint however the workers start
        if worker.sharded:  # this worker's share only: a mask its killed run committed but did not rename, before
            dataset.recover_masks(item.id for item in mine)  # a worker stages a new one over it
        pending = [item for item in mine if redo or not _refined_with(item.record, params)]
        earlier = sum(1 for item in pending if item.record.get("refine")) if not redo else 0
        if earlier:  # e.g. refined at full size before the CRF's 256 px default: refined again, not silently
            warnings.warn(f"{earlier} item(s) of {dataset.root} were refined with other settings; refining them again "
                          "with these (their earlier masks are replaced)", stacklevel=2)
        net, train_seconds, net_weights, gammas = None, 0.0, None, None
        start = time.perf_counter()
        if pending:
            with cpu_pool(workers, preload=WORKER_MODULES) as pool:
                if config.uses_affinity:
                    by_id = sorted(items, key=lambda item: item.id)  # one AffinityNet for any number of ranks
                    net, train_seconds, net_weights = _affinity_net(dataset, by_id, config, progress, pool, workers, device)
                if config.per_class:
                    if redo:
                        (dataset.root / LOG_NAME).unlink(missing_ok=True)
                    gammas = _class_gammas(ProgressLog(dataset.root / LOG_NAME, params), items, config, net, progress,
                                           pool, workers, device, net_weights)
                steps = item_steps(config, net, gammas, device, net_weights, device_crf)
                for item, (sha256, extra) in tqdm(ordered(pool, pending, steps.prepare, steps.device, steps.finish,
                                                          _window(workers)),
                                                  total=len(pending), desc=f"refine {config.method}", unit="img",
                                                  disable=not progress, dynamic_ncols=True):
                    record = {k: v for k, v in item.record.items() if k != "noise"}  # scored on the old mask
                    dataset.commit_mask({**record, "refine": {**params, **extra}}, sha256)  # staged by a worker
        with dataset.lock():  # one process, or the worker that finds every item refined, merges the shards ...
            if not worker.sharded or all(_refined_with(record, params) for record in dataset.records()):
                dataset.compact()  # ... into one line per item
                dataset.remove_interrupted_writes({item.id for item in items})  # e.g. a killed run's staged masks
    seconds = time.perf_counter() - start - train_seconds
    return RefineResult(dataset, len(items), len(pending), train_seconds, seconds,
                        len(mine) if worker.sharded else None)


__all__ = ["METHODS", "RefineConfig", "RefineResult", "refine_dataset"]
