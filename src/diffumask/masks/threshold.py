"""The paper's binarisation B = 1[M > γ], for several classes at once, with an optional 255 band."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..dataset import IGNORE_INDEX
from ..errors import ConfigError

#: γ of the paper's fixed-threshold baseline on Stable Diffusion (its Table 4a).
PAPER_THRESHOLD = 0.4


def check_band(threshold: float | None, uncertain: float | None,
               names: tuple[str, str] = ("--threshold", "--uncertain"), unit_interval: bool = True) -> None:
    """The one check of a γ and its uncertainty band: each in (0, 1) (maps are divided by their
    maximum, so γ ≥ 1 gives all-background masks and γ ≤ 0 all-foreground ones), and the band's
    lower edge below γ. ``None`` is "not given"; ``unit_interval=False`` checks the order only (for
    margins, which may be negative)."""
    if unit_interval:
        for name, value in zip(names, (threshold, uncertain)):
            if value is not None and not 0 < value < 1:
                raise ConfigError(f"{name} must lie strictly between 0 and 1 (soft maps are in [0, 1]), got {value}")
    if threshold is not None and uncertain is not None and not uncertain < threshold:
        raise ConfigError(f"{names[1]} ({uncertain}) must be below {names[0]} ({threshold})")


def winners(maps: Mapping[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's highest-scoring label (ties to the first) and its value."""
    if not maps:
        raise ValueError("no soft maps to threshold")
    labels = np.array(list(maps), dtype=np.uint8)
    stack = np.stack([np.asarray(m, dtype=np.float32) for m in maps.values()])
    best = stack.argmax(axis=0)
    return labels[best], np.take_along_axis(stack, best[None], axis=0)[0]


def threshold_sweep(maps: Mapping[int, np.ndarray], thresholds: Sequence[float]) -> list[np.ndarray]:
    """``threshold_masks(maps, γ)`` for each γ, finding each pixel's winning label once."""
    winner, value = winners(maps)
    return [np.where(value > np.float32(gamma), winner, 0).astype(np.uint8) for gamma in thresholds]


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
    check_band(threshold, uncertain, names=("the threshold", "the uncertainty band's lower edge"), unit_interval=False)
    winner, value = winners(maps)  # float32 values, compared with float32 thresholds whatever their type
    threshold = np.float32(threshold)
    mask = np.where(value > threshold, winner, 0).astype(np.uint8)
    if uncertain is not None:
        mask[(value > np.float32(uncertain)) & (value <= threshold)] = IGNORE_INDEX
    return mask
