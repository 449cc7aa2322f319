"""Several classes, each with its own threshold, into one label mask."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .threshold import threshold_masks


def assign_labels(maps: Mapping[int, np.ndarray], thresholds: Mapping[int, float] | float) -> np.ndarray:
    """Label mask where each class passes its own threshold and the largest margin wins.

    A pixel goes to the label whose map exceeds its threshold by the most, background 0 where
    no map passes. With one threshold for all classes this is exactly :func:`threshold_masks`
    (the margin order is then the value order), so per-class thresholds (Otsu, adaptive per
    class) and a shared γ assign several classes the same way.
    """
    if isinstance(thresholds, Mapping):
        missing = set(maps) - set(thresholds)
        if missing:
            raise ValueError(f"no threshold for labels {sorted(missing)}")
        return threshold_masks({label: np.asarray(m, np.float32) - np.float32(thresholds[label])
                                for label, m in maps.items()}, 0.0)
    return threshold_masks(maps, float(thresholds))
