"""Dataset-accumulated IoU: the number segmentation papers report.

IoU_c = TP_c / (T_c + P_c - TP_c), with every count summed over the whole evaluation set before the
division (not averaged per image), and pixels whose truth is the ignore index left out. A class
absent from both truth and prediction has no IoU (NaN, shown as n/a), not 0, and is left out of the
mean. Low in the tree: evaluation, noise filtering and benchmarks share it, and it needs only numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE_INDEX = 255


class ConfusionMatrix:
    """Pixel counts ``counts[truth, prediction]`` over ``num_classes`` classes, summed over updates.

    Predictions outside ``[0, num_classes)`` are counted in an extra "other" column: they are wrong
    for the truth class without being a class of their own.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        if num_classes < 1:
            raise ValueError("a confusion matrix needs at least one class")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = np.zeros((num_classes, num_classes + 1), dtype=np.int64)

    def update(self, prediction: np.ndarray, truth: np.ndarray) -> None:
        if prediction.shape != truth.shape:
            raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ in shape")
        truth = truth.astype(np.int64).ravel()
        prediction = prediction.astype(np.int64).ravel()
        keep = truth != self.ignore_index
        truth, prediction = truth[keep], prediction[keep]
        if truth.size and (truth.min() < 0 or truth.max() >= self.num_classes):
            raise ValueError(f"truth labels must lie in [0, {self.num_classes}) or be {self.ignore_index}")
        n = self.num_classes
        prediction = np.where((prediction >= 0) & (prediction < n), prediction, n)
        self.counts += np.bincount(truth * (n + 1) + prediction, minlength=n * (n + 1)).reshape(n, n + 1)

    def intersections_unions(self) -> tuple[np.ndarray, np.ndarray]:
        tp = np.diag(self.counts[:, : self.num_classes])
        union = self.counts.sum(axis=1) + self.counts[:, : self.num_classes].sum(axis=0) - tp
        return tp, union

    def iou(self) -> np.ndarray:
        """Per-class IoU; NaN for a class that is in neither truth nor prediction."""
        tp, union = self.intersections_unions()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def mean_iou(self, classes: Sequence[int] | None = None) -> float:
        """Mean IoU over ``classes`` (default all), classes without an IoU left out; NaN if none has one."""
        ious = self.iou()
        picked = ious if classes is None else ious[list(classes)]
        picked = picked[~np.isnan(picked)]
        return float(picked.mean()) if picked.size else float("nan")


def harmonic_mean(seen: float, unseen: float) -> float:
    """The zero-shot literature's hIoU = 2SU / (S + U)."""
    return 0.0 if seen + unseen == 0 else 2 * seen * unseen / (seen + unseen)
