"""``diffumask filter``: noise learning, the paper's cross-validated pruning of bad synthetic items.

The items are split into K folds (stratified by each item's class, seeded). For each fold a
segmenter is trained on the other K−1 folds with ``diffumask train``'s own code and predicts the
held-out fold, so every item gets a prediction from a model that never saw it. An item's score is
the IoU between that prediction and its mask over the item's own classes (255 ignored). Items are
ranked within their class, so a hard class is not wiped out, and the worst ``prune`` share of each
class is dropped; the kept ids go to ``ImageSets/Segmentation/<name>.txt``, so that ``diffumask
train DATASET --split <name>`` trains on them. Each item's score and fold are recorded in the
manifest (under ``noise``, with a digest of the mask it was scored on): another share is a re-cut
(``recut=True``) without any training. Scores belong to their masks: once a mask changes (``refine`` again,
which drops the item's scores), finished folds and re-cuts are refused until ``DATASET/noise/`` is deleted.

Work lives in ``DATASET/noise/``: a run folder per fold and its scores, written when the fold is
finished, so a killed filter resumes and keeps finished folds. The paper's per-class area sanity
filters are options: an item whose class covers less than ``min_area`` or more than ``max_area`` of
its image is dropped before the ranking. (The official code's noise learning is selection only,
without folds; this is the paper's description.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import CUT_SUFFIX, IGNORE_INDEX, NOISE_FOLDER, Dataset, scored_masks, write_text_atomic
from .distributed import Worker, current_worker, job_terms, require_no_shard, require_torch_launcher
from .errors import ConfigError, DiffumaskError, one_line
from .formats import open_source
from .segment.data import label_lut
from .segment.predict import iter_predictions, pick_device
from .segment.train import TrainConfig, train

SPLIT_PREFIX = "noise-train-"  # ImageSets/Segmentation/noise-train-<k>.txt: fold k's training items


@dataclass
class FilterConfig:
    """What ``diffumask filter`` does; ``training`` holds ``diffumask train``'s options for the fold models (its
    ``data``, ``out`` and ``split`` are filter's own to set: each fold model trains on the others)."""

    dataset: str
    training: TrainConfig = field(default_factory=lambda: TrainConfig(data=[], out=""))
    folds: int = 3
    prune: float = 0.7  # the paper's best α
    split: str = "train"  # the items cross-validated and cut
    name: str = "filtered"
    min_area: float = 0.0
    max_area: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ConfigError(f"--folds must be at least 2 (each item needs a model that did not see it), got {self.folds}")
        if not 0 <= self.prune < 1:
            raise ConfigError(f"--prune is the share of each class to drop, in [0, 1), got {self.prune}")
        if not 0 <= self.min_area <= self.max_area <= 1:
            raise ConfigError(f"the area filter needs 0 <= --min-area <= --max-area <= 1, got "
                              f"{self.min_area} and {self.max_area}")
        if not self.name or "/" in self.name or self.name.startswith((".", SPLIT_PREFIX)):
            raise ConfigError(f"--name {self.name!r} must be a plain split name")


@dataclass
class ClassCut:
    """One class's cut, as ``filter`` reports it: whether it cuts off a tail of low scores or into a crowd of
    near-equal ones (then the ranking is mostly chance, and pruning mostly removes data)."""

    kept: int
    pruned_by_score: int
    pruned_by_area: int
    lowest_kept: float | None  # the cut: every item scored below it is pruned (None: nothing kept)
    median_kept: float | None
    median_pruned: float | None  # of the items pruned by score (None: none were)


@dataclass
class FilterResult:
    kept: list[str]
    pruned: dict[str, str]  # id → why: "score" or "area"
    split_path: Path
    trained_folds: int  # folds trained by this call (0 for a re-cut or when every fold was finished)
    classes: dict[str, ClassCut]  # primary class → its cut

    def table(self) -> str:
        """What was kept, then each class's cut, as ``diffumask filter`` prints them."""
        by_score = sum(cut.pruned_by_score for cut in self.classes.values())
        by_area = sum(cut.pruned_by_area for cut in self.classes.values())
        names = {name: name or "(no class)" for name in self.classes}
        width = max([len("class"), *map(len, names.values())])
        lines = [f"kept {len(self.kept)} of {len(self.kept) + len(self.pruned)} items ({by_score} pruned by score, "
                 f"{by_area} by area) in {self.split_path}",
                 f"{'class':<{width}}  {'kept':>6}  {'by score':>8}  {'by area':>7}  {'lowest kept':>11}  "
                 f"{'median kept':>11}  {'median pruned':>13}"]
        for name, cut in self.classes.items():
            scores = [f"{s:.3f}" if s is not None else "-" for s in (cut.lowest_kept, cut.median_kept, cut.median_pruned)]
            lines.append(f"{names[name]:<{width}}  {cut.kept:>6}  {cut.pruned_by_score:>8}  {cut.pruned_by_area:>7}  "
                         f"{scores[0]:>11}  {scores[1]:>11}  {scores[2]:>13}")
        lines.append("(scores: each item's IoU with a held-out prediction; a pruned median close to the kept one means "
                     "the cut falls among near-equal items and mostly removes data: check it against --prune 0)")
        return "\n".join(lines)


def primary_class(record: Mapping[str, Any]) -> str:
    """The class an item was drawn for: its first (composed items list the others after it)."""
    return record["classes"][0] if record.get("classes") else ""  # "": an item without any class (all background)


def assign_folds(records: Sequence[Mapping[str, Any]], folds: int, seed: int) -> dict[str, int]:
    """Item id → fold: within each class, items in a seeded order dealt round-robin, so every fold holds
    about 1/K of every class, the folds are disjoint and they cover every item."""
    by_class: dict[str, list[str]] = {}
    for record in records:
        by_class.setdefault(primary_class(record), []).append(record["id"])
    assignment = {}
    for name in sorted(by_class):
        ids = sorted(by_class[name])
        order = np.random.default_rng([seed, len(name), *name.encode()]).permutation(len(ids))
        for position, index in enumerate(order):
            assignment[ids[int(index)]] = position % folds
    return assignment


def item_score(prediction: np.ndarray, mask: np.ndarray, labels: Sequence[int]) -> float:
    """Mean IoU of prediction and mask over the item's own class labels; 255 in the mask is left out."""
    valid = mask != IGNORE_INDEX
    ious = []
    for label in labels:
        predicted, truth = (prediction == label) & valid, (mask == label) & valid
        union = int((predicted | truth).sum())
        if union:
            ious.append(int((predicted & truth).sum()) / union)
    return float(np.mean(ious)) if ious else 0.0


def _work(dataset: Dataset) -> Path:
    return dataset.root / NOISE_FOLDER


def _settings(config: FilterConfig, assignment: Mapping[str, int], masks: Mapping[str, str]) -> dict[str, Any]:
    preset = config.training.resolved_preset()
    digest = hashlib.sha256("".join(f"{i} {masks[i]}\n" for i in sorted(masks)).encode()).hexdigest()
    return json.loads(json.dumps({"folds": config.folds, "seed": config.seed, "train": config.training.settings(preset)
                                  | {"data": None, "split": None}, "assignment": dict(sorted(assignment.items())),
                                  "masks": digest}))


def _mask_digests(dataset: Dataset, records: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Item id → the first 16 hex digits of its mask file's SHA-256: scores are only valid for these masks. A
    mask rewritten by diffumask (refine) has it in its manifest line; only the others' files are read."""
    return {r["id"]: dataset.mask_sha256(r)[:16] for r in records}


def _records(dataset: Dataset, config: FilterConfig) -> list[dict[str, Any]]:
    return [r for r in dataset.records() if r.get("split", "train") == config.split]


def _train_folds(dataset: Dataset, config: FilterConfig, progress: bool) -> tuple[int, dict[str, dict[str, Any]]]:
    """Train and score every unfinished fold: how many were trained, and every item's ``noise`` record.

    Under a launcher the workers train each fold together (``train``'s data parallelism), score a share of
    its held-out items each on their own device, and gather the shares; only the first writes."""
    worker = current_worker()
    require_torch_launcher("filter")
    records = _records(dataset, config)
    by_id = {r["id"]: r for r in records}
    assignment = assign_folds(records, config.folds, config.seed)
    masks = _mask_digests(dataset, records)
    work = _work(dataset)
    work.mkdir(exist_ok=True)
    settings = _settings(config, assignment, masks)
    settings_path = work / "settings.json"
    if settings_path.is_file():
        earlier = json.loads(settings_path.read_text())
        earlier.setdefault("masks", settings["masks"])  # folds from before masks were recorded
        if earlier != settings and {**earlier, "masks": settings["masks"]} == settings:
            raise DiffumaskError(f"the masks of {dataset.root} changed since the folds in {work} were trained (refined "
                                 "again?); delete that folder to train and score them on these masks")
        if earlier != settings:
            raise DiffumaskError(f"{work} holds folds trained with other settings or items; re-run with the same "
                                 "options to resume, or delete that folder to start again")
    if worker.rank == 0:  # a killed run's temporary files (its split lists', its scores'): before the broadcast in
        dataset.remove_old_temporaries()  # _finished_folds, after which the other workers write their own
    finished = _finished_folds(work, config, worker)  # after every worker has read the dataset: then rank 0 writes
    if worker.rank == 0:
        write_text_atomic(settings_path, json.dumps(settings, indent=1) + "\n")
    trained = 0
    updates: dict[str, dict[str, Any]] = {}
    for fold in range(config.folds):
        scores_path = work / f"fold-{fold}" / "scores.json"
        if fold in finished:  # by an earlier run
            scores = finished[fold]
        else:
            scores = _train_fold(dataset, config, fold, assignment, by_id, worker, progress)
            if worker.rank == 0:
                write_text_atomic(scores_path, json.dumps({"fold": fold, "scores": scores}, indent=1) + "\n")
            trained += 1
        updates.update({i: {"noise": {"fold": fold, "score": score, "mask": masks[i]}} for i, score in scores.items()})
    if worker.rank == 0:
        for fold in range(config.folds):  # the folds' training lists are settings.json's assignment: not splits to keep
            (dataset.root / "ImageSets" / "Segmentation" / f"{SPLIT_PREFIX}{fold}.txt").unlink(missing_ok=True)
        dataset.update_records(updates)
    return trained, updates


def _finished_folds(work: Path, config: FilterConfig, worker: Worker) -> dict[int, dict[str, float]]:
    """The scores of the folds an earlier run finished, as the first worker reads them: under a launcher every
    worker must train the same folds (a file seen by one node and not yet by another would pair different folds'
    training steps), so the first opens the workers' group, which train's accelerator then joins, and sends them."""
    finished = {fold: json.loads(path.read_text())["scores"] for fold in range(config.folds)
                if (path := work / f"fold-{fold}" / "scores.json").is_file()} if worker.rank == 0 else {}
    if worker.sharded:
        import torch.distributed
        from accelerate import PartialState

        PartialState(cpu=pick_device(config.training.device).type == "cpu")
        shared = [finished]
        torch.distributed.broadcast_object_list(shared, src=0)
        finished = shared[0]
    return finished


def _train_fold(dataset: Dataset, config: FilterConfig, fold: int, assignment: Mapping[str, int],
                by_id: Mapping[str, Mapping[str, Any]], worker: Worker, progress: bool) -> dict[str, float]:
    """Fold ``fold``'s model, trained on the other folds, and its held-out items' scores (all of them, on every
    worker: each scores its share and the shares are gathered)."""
    held_out = [i for i in by_id if assignment[i] == fold]
    training = [i for i in by_id if assignment[i] != fold]
    write_text_atomic(dataset.root / "ImageSets" / "Segmentation" / f"{SPLIT_PREFIX}{fold}.txt",
                      "".join(f"{i}\n" for i in training))  # the same text from every worker
    run_config = dataclasses.replace(config.training, data=[str(dataset.root)], out=str(_work(dataset) / f"fold-{fold}" / "run"),
                                     split=f"{SPLIT_PREFIX}{fold}", weights=None)
    run = train(run_config, progress=progress and worker.rank == 0, warn_unfinished=False)  # filter writes it
    source = open_source(str(dataset.root))
    lut = label_lut(source, run.classes)
    scores: dict[str, float] = {}
    device = worker.device(str(pick_device(config.training.device)))
    try:
        for item_id, prediction, truth in iter_predictions(run, source, split="", device=device, ids=worker.take(held_out),
                                                           progress=progress and worker.rank == 0):
            labels = [run.classes.index(name) for name in by_id[item_id]["classes"] if name in run.classes]
            scores[item_id] = round(item_score(prediction, lut[truth], labels), 6)
    except Exception as error:  # the others wait in the gather below: tell them, then fail here as usual
        if not worker.sharded:
            raise
        _gather(worker, (None, one_line(error)))
        raise
    if worker.sharded:
        shares = _gather(worker, (scores, None))
        if failed := [(rank, said) for rank, (_, said) in enumerate(shares) if said is not None]:
            rank, said = failed[0]
            raise DiffumaskError(f"worker {rank} of {worker.world_size} failed to score fold {fold}'s held-out items: "
                                 f"{said}")
        scores = {i: score for share, _ in shares for i, score in share.items()}
    return {i: scores[i] for i in held_out}


def _gather(worker: Worker, value: Any) -> list[Any]:
    """Every worker's ``value``, in rank order (through the workers' group, open since _finished_folds)."""
    import torch.distributed

    shares: list[Any] = [None] * worker.world_size
    torch.distributed.all_gather_object(shares, value)
    return shares


def _area(dataset: Dataset, record: Mapping[str, Any]) -> float:
    """The share of the image its class covers (255 counted as not the class)."""
    mask = dataset.read_mask(record["id"])
    return float((mask == dataset.class_index(primary_class(record))).mean())


def filter_dataset(config: FilterConfig, progress: bool = True, recut: bool = False) -> FilterResult:
    """Run ``filter`` (see the module docstring); ``recut`` re-ranks the recorded scores without training."""
    require_no_shard("filter")  # a re-cut too: only the first worker writes the list
    dataset = Dataset(config.dataset)
    records = _records(dataset, config)
    own = {r.get("split", "train") for r in dataset.records()}
    if not records:
        raise DiffumaskError(f"{dataset.root} holds no items in split {config.split!r}; it has: "
                             f"{', '.join(sorted(own)) or 'no items at all'} (--split)")
    if len(records) < config.folds:
        raise DiffumaskError(f"{dataset.root} holds {len(records)} items in split {config.split!r}, fewer than "
                             f"--folds {config.folds}")
    if config.name in own:
        raise DiffumaskError(f"--name {config.name!r} is one of the dataset's own splits ({', '.join(sorted(own))}), "
                             "which filter would overwrite; name the kept list otherwise (default: filtered)")
    dataset.require_files([r["id"] for r in records], "mask", "filter needs a dataset with masks (SegmentationClass)")
    # validate and readers tell this job in flight from a killed one's leftovers; a second launch beside it is refused
    with dataset.writing({"command": "filter", **job_terms()}):
        trained = 0
        if recut:
            if unscored := [r["id"] for r in records if "score" not in (r.get("noise") or {})]:
                fix = (f"their masks may be new since filter ran (refine drops the scores): delete {_work(dataset)} and run "
                       "filter without --recut" if _work(dataset).is_dir() else "run filter without --recut first")
                raise DiffumaskError(f"{len(unscored)} item(s) have no recorded score (e.g. {unscored[0]}); {fix}")
            masks = _mask_digests(dataset, records)
            if stale := [r["id"] for r in records if r["noise"].get("mask", masks[r["id"]]) != masks[r["id"]]]:
                raise DiffumaskError(f"{len(stale)} item(s) have a new mask since they were scored (e.g. {stale[0]}); "
                                     f"delete {_work(dataset)} and run filter without --recut to score them again")
        else:
            trained, updates = _train_folds(dataset, config, progress)
            records = [{**r, **updates.get(r["id"], {})} for r in records]  # as written: another worker may not have yet
        pruned: dict[str, str] = {}
        by_class: dict[str, list[Mapping[str, Any]]] = {}
        by_area: Counter[str] = Counter()
        for record in records:
            name = primary_class(record)
            by_class.setdefault(name, [])
            if config.min_area > 0 or config.max_area < 1:
                area = _area(dataset, record)
                if not config.min_area <= area <= config.max_area:
                    pruned[record["id"]] = "area"
                    by_area[name] += 1
                    continue
            by_class[name].append(record)
        cuts: dict[str, ClassCut] = {}
        for name, members in sorted(by_class.items()):
            ranked = sorted(members, key=lambda r: (r["noise"]["score"], r["id"]))
            cut = math.floor(config.prune * len(ranked))
            for record in ranked[:cut]:
                pruned[record["id"]] = "score"
            low, high = [r["noise"]["score"] for r in ranked[:cut]], [r["noise"]["score"] for r in ranked[cut:]]
            cuts[name] = ClassCut(len(high), len(low), by_area[name], high[0] if high else None,
                                  float(np.median(high)) if high else None, float(np.median(low)) if low else None)
        kept = [r["id"] for r in records if r["id"] not in pruned]
        split_path = dataset.root / "ImageSets" / "Segmentation" / f"{config.name}.txt"
        text = "".join(f"{i}\n" for i in kept)
        cut = {"list_sha256": hashlib.sha256(text.encode()).hexdigest(),
               "scored_masks": scored_masks(r for r in records if r["id"] not in pruned)}  # what Dataset.split_ids checks
        if current_worker().rank == 0:  # under a launcher every worker cuts the same; the first writes
            write_text_atomic(split_path.with_name(f"{config.name}{CUT_SUFFIX}"), json.dumps(cut, indent=1) + "\n")
            write_text_atomic(split_path, text)
    return FilterResult(kept, pruned, split_path, trained, cuts)


__all__ = ["ClassCut", "FilterConfig", "FilterResult", "assign_folds", "filter_dataset", "item_score"]
