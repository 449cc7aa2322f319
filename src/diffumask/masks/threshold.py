"""The paper's binarisation B = 1[M > γ], for several classes at once, with an optional 255 band."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..dataset import IGNORE_INDEX

#: γ of the paper's fixed-threshold baseline on Stable Diffusion (its Table 4a).
PAPER_THRESHOLD = 0.4


def _winners(maps: Mapping[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's highest-scoring label (ties to the first) and its value."""
    if not maps:
        raise ValueError("no soft maps to threshold")
    labels = np.array(list(maps), dtype=np.uint8)
    stack = np.stack([np.asarray(m, dtype=np.float32) for m in maps.values()])
    best = stack.argmax(axis=0)
    return labels[best], np.take_along_axis(stack, best[None], axis=0)[0]


def threshold_sweep(maps: Mapping[int, np.ndarray], thresholds: Sequence[float]) -> list[np.ndarray]:
    """``threshold_masks(maps, γ)`` for each γ, finding each pixel's winning label once."""
    winner, value = _winners(maps)
    return [np.where(value > gamma, winner, 0).astype(np.uint8) for gamma in thresholds]


def threshold_masks(
    maps: Mapping[int, np.ndarray],
    threshold: float = PAPER_THRESHOLD,
    uncertain: float | None = None,
) -> np.ndarray:
    """Label mask from soft maps keyed by label index.

    A pixel takes the label whose map is highest there if that value exceeds ``threshold``
    (ties go to the first label), else background 0. With ``uncertain`` (< ``threshold``),
    pixels whose best value lies in (uncertain, threshold] get 255, which trainers ignore.
    """
    if uncertain is not None and not uncertain < threshold:
        raise ValueError(f"the uncertainty band's lower edge ({uncertain}) must be below the threshold ({threshold})")
    winner, value = _winners(maps)
    mask = np.where(value > threshold, winner, 0).astype(np.uint8)
    if uncertain is not None:
        mask[(value > uncertain) & (value <= threshold)] = IGNORE_INDEX
    return mask
