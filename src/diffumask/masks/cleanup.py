"""Mask cleanup shared by every method: drop small blobs, fill small holes (paper §7 step 3)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..dataset import IGNORE_INDEX


def _component_sizes(region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, n = ndimage.label(region)
    sizes = ndimage.sum_labels(region, labels, index=np.arange(1, n + 1)) if n else np.zeros(0)
    return labels, np.asarray(sizes)


def cleanup_mask(mask: np.ndarray, min_area: float = 0.0, max_hole: float = 0.0) -> np.ndarray:
    """Remove each class's connected components smaller than ``min_area`` and fill its holes up
    to ``max_hole`` (both fractions of the image area, so one setting fits 32 px and 512 px).

    Only background (0) and uncertain (255) pixels are filled; an enclosed object of another
    class stays. Dropped blobs become background. A hole larger than ``max_hole`` (a ring's
    middle, the gap between an arm and a body) is kept; ``max_hole=1`` fills every hole.
    """
    out = np.array(mask, dtype=np.uint8, copy=True)
    total = out.size
    for label in np.unique(out):
        if label in (0, IGNORE_INDEX):
            continue
        if min_area > 0:
            components, sizes = _component_sizes(out == label)
            out[np.isin(components, 1 + np.flatnonzero(sizes < min_area * total))] = 0
        if max_hole > 0:
            region = out == label
            fillable = (out == 0) | (out == IGNORE_INDEX)
            holes = ndimage.binary_fill_holes(region) & ~region & fillable
            components, sizes = _component_sizes(holes)
            out[np.isin(components, 1 + np.flatnonzero(sizes <= max_hole * total))] = label
    return out
