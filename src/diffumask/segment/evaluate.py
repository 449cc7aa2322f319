"""``diffumask evaluate``: per-class IoU and mIoU of a run on a labelled split, the papers' way.

Counts are accumulated over the whole split (:mod:`diffumask.metrics`), 255 is ignored, and classes
are matched by name between the run and the evaluation set (aliases included). Evaluation classes
the run does not know are not reported (named in the result), but their pixels still count: a class
predicted there is a false positive of that class. ``unseen`` gives the
zero-shot report (seen, unseen and their harmonic mean, background excluded); a named ``protocol``
merges or drops classes on both sides first (the paper's Cityscapes Human/Vehicle).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..dataset import IGNORE_INDEX, write_text_atomic
from ..distributed import require_one_process
from ..errors import ConfigError
from ..formats import open_source
from ..formats.names import canonical, match_names, normalise
from ..metrics import ConfusionMatrix, harmonic_mean
from .predict import iter_predictions
from .run import RunFolder

#: Named unseen sets for ``--unseen``: the paper's VOC zero-shot split (classes 16-20).
UNSEEN_SETS: dict[str, tuple[str, ...]] = {"voc": ("potted plant", "sheep", "sofa", "train", "tv monitor")}


@dataclass(frozen=True)
class Protocol:
    """Class merges and drops applied to truth and prediction alike, and the classes reported."""

    merge: dict[str, tuple[str, ...]]
    ignore: tuple[str, ...] = ()

    def rename(self, name: str) -> str | None:
        """The protocol's name for a class; None when the protocol drops it."""
        key = canonical(name)  # VOC's "motorbike" is Cityscapes' "motorcycle"
        if key in {canonical(n) for n in self.ignore}:
            return None
        for merged, members in self.merge.items():
            if key in {canonical(m) for m in (merged, *members)}:
                return merged
        return name


#: The paper's Cityscapes evaluation (its evaluation.py): car/truck/bus/train → vehicle, person/rider →
#: human, motorcycle and bicycle ignored; the table reports Human and Vehicle.
PROTOCOLS: dict[str, Protocol] = {
    "cityscapes-human-vehicle": Protocol(merge={"human": ("person", "rider"), "vehicle": ("car", "truck", "bus", "train")},
                                         ignore=("motorcycle", "bicycle")),
}
_REPORTED = {"cityscapes-human-vehicle": ("human", "vehicle")}


@dataclass
class Evaluation:
    classes: list[str]
    iou: list[float]  # NaN: the class is in neither truth nor prediction
    miou: float
    images: int
    not_in_run: list[str] = field(default_factory=list)  # evaluation classes the run cannot predict
    miou_all_classes: float | None = None  # with every class of not_in_run at IoU 0 (the papers' count)
    seen: float | None = None
    unseen: float | None = None
    harmonic: float | None = None
    unseen_classes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["iou"] = {c: (None if math.isnan(v) else v) for c, v in zip(self.classes, self.iou)}
        del data["classes"]
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in data.items()}  # strict JSON

    def table(self) -> str:
        width = max([len(c) for c in self.classes] + [10])
        lines = [f"{'class':<{width}}  IoU"]
        for name, value in zip(self.classes, self.iou):
            lines.append(f"{name:<{width}}  {'n/a' if math.isnan(value) else f'{100 * value:5.1f}'}")
        lines.append(f"{'mIoU':<{width}}  {100 * self.miou:5.1f}   ({len(self.classes)} classes, {self.images} images)")
        if self.seen is not None:
            lines.append(f"zero-shot: seen {100 * self.seen:.1f}, unseen {100 * self.unseen:.1f}, "
                         f"harmonic {100 * self.harmonic:.1f} (unseen: {', '.join(self.unseen_classes)})")
        if self.not_in_run:
            lines.append(f"not in the run, so not reported (predictions on them count as errors): "
                         f"{', '.join(self.not_in_run)}; counting them at IoU 0, mIoU is "
                         f"{100 * self.miou_all_classes:.1f}")
        return "\n".join(lines)


class Scorer:
    """Accumulates (prediction in run indices, truth in source values) pairs into an evaluation."""

    def __init__(self, run_classes: Sequence[str], label_names: dict[int, str], protocol: str | None = None,
                 unseen: Iterable[str] | None = None):
        rename = _protocol(protocol).rename if protocol else (lambda name: name)
        truth_names = {v: rename(n) for v, n in label_names.items()}
        run_names = [rename(n) for n in run_classes]
        ordered = list(dict.fromkeys(n for n in truth_names.values() if n is not None))
        if protocol:
            reported = [n for n in _REPORTED[protocol] if n in ordered]
            if not reported:
                names = list(label_names.values())
                shown = ", ".join(names[:8]) + (f", … ({len(names)} in all)" if len(names) > 8 else "")
                raise ConfigError(f"--protocol {protocol} reports {', '.join(_REPORTED[protocol])}, and the evaluation "
                                  f"set has none of their classes ({shown}); leave it out")
            ordered = reported
        matched = match_names(ordered, [n for n in run_names if n is not None])
        self.classes = [n for n in ordered if n in matched]
        self.not_in_run = [n for n in ordered if n not in matched]
        if all(normalise(c) == "background" for c in self.classes):
            raise ConfigError(f"the run's classes ({', '.join(run_classes)}) and the evaluation set's "
                              f"({', '.join(ordered)}) have none in common besides background; "
                              "evaluate on data of the run's classes")
        k = len(self.classes)  # index k: every pixel or prediction of a class not reported ("other")
        self.truth_lut = np.full(256, IGNORE_INDEX, np.uint8)
        for value, name in truth_names.items():
            if name is not None:
                self.truth_lut[value] = self.classes.index(name) if name in self.classes else k
        by_run_name = {matched[c]: i for i, c in enumerate(self.classes)}
        self.prediction_lut = np.full(256, k, np.int64)
        for index, name in enumerate(run_names):
            if name in by_run_name:
                self.prediction_lut[index] = by_run_name[name]
        self.unseen = self._unseen(unseen)
        self.matrix = ConfusionMatrix(k + 1)
        self.images = 0

    def _unseen(self, unseen: Iterable[str] | None) -> list[str]:
        if unseen is None:
            return []
        names = list(unseen)
        found = match_names(names, self.classes)
        if missing := [n for n in names if n not in found]:
            raise ConfigError(f"--unseen {', '.join(missing)}: not among the evaluated classes "
                              f"({', '.join(self.classes)})")
        chosen = [found[n] for n in names]
        if not [c for c in self.classes if c not in chosen and normalise(c) != "background"]:
            raise ConfigError("--unseen names every evaluated class: the zero-shot report needs seen ones too "
                              "(leave --unseen out for plain mIoU)")
        return chosen

    def update(self, prediction: np.ndarray, truth: np.ndarray) -> None:
        self.matrix.update(self.prediction_lut[prediction], self.truth_lut[truth])
        self.images += 1

    def result(self) -> Evaluation:
        reported = range(len(self.classes))
        iou = self.matrix.iou()[: len(self.classes)]
        miou = self.matrix.mean_iou(reported)
        counted = iou[~np.isnan(iou)]
        evaluation = Evaluation(self.classes, [float(v) for v in iou], miou, self.images, self.not_in_run,
                                float(counted.sum() / (counted.size + len(self.not_in_run))) if counted.size else miou)
        if self.unseen:
            foreground = [i for i, c in enumerate(self.classes) if normalise(c) != "background"]
            unseen = [self.classes.index(c) for c in self.unseen]
            seen = [i for i in foreground if i not in unseen]
            evaluation.seen = self.matrix.mean_iou(seen)
            evaluation.unseen = self.matrix.mean_iou(unseen)
            evaluation.harmonic = harmonic_mean(evaluation.seen, evaluation.unseen)
            evaluation.unseen_classes = self.unseen
        return evaluation


def _protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def parse_unseen(text: str | None) -> list[str] | None:
    """``--unseen``: a named set (``voc``) or comma-separated class names."""
    if text is None:
        return None
    if text in UNSEEN_SETS:
        return list(UNSEEN_SETS[text])
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--unseen needs class names (comma-separated) or a named set: " + ", ".join(UNSEEN_SETS))
    return names


def evaluate_run(run_dir: str | Path | RunFolder, data: str | Path, split: str = "test",
                 unseen: Iterable[str] | None = None, protocol: str | None = None, device: str | None = None,
                 batch_size: int = 16, progress: bool = True, json_path: str | Path | None = None) -> Evaluation:
    """Predict every image of ``split`` with the run and score it; optionally write the result as JSON."""
    require_one_process("evaluate")
    if json_path is not None and Path(json_path).is_dir():
        raise ConfigError(f"--json {json_path} is a folder; name the JSON file to write "
                          f"(e.g. {Path(json_path) / 'eval.json'})")
    run = RunFolder.of(run_dir)
    source = open_source(data)
    scorer = Scorer(run.classes, source.label_names, protocol, unseen)
    for _, prediction, truth in iter_predictions(run, source, split, device, batch_size, progress):
        scorer.update(prediction, truth)
    if scorer.images == 0:
        raise ConfigError(f"{source.spec} has no items in split {split!r}; nothing to evaluate")
    evaluation = scorer.result()
    if json_path is not None:
        record = {"run": str(run.root), "data": source.spec, "split": split, "protocol": protocol,
                  **evaluation.as_dict()}
        write_text_atomic(Path(json_path), json.dumps(record, indent=1) + "\n")
    return evaluation
