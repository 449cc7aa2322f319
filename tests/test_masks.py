"""Thresholding against a per-pixel loop, for one class and several."""

from __future__ import annotations

import numpy as np
import pytest

from diffumask.masks import threshold_masks
from diffumask.masks.threshold import threshold_sweep


def loop_reference(maps: dict[int, np.ndarray], threshold: float, uncertain: float | None) -> np.ndarray:
    labels = list(maps)
    height, width = next(iter(maps.values())).shape
    out = np.zeros((height, width), np.uint8)
    for y in range(height):
        for x in range(width):
            values = [maps[label][y, x] for label in labels]
            best = int(np.argmax(values))
            if values[best] > threshold:
                out[y, x] = labels[best]
            elif uncertain is not None and values[best] > uncertain:
                out[y, x] = 255
    return out


@pytest.mark.parametrize("n_classes, uncertain", [(1, None), (1, 0.3), (3, None), (3, 0.25)])
def test_threshold_matches_loop(n_classes, uncertain):
    rng = np.random.default_rng(n_classes)
    maps = {label: rng.random((12, 9)).astype(np.float32) for label in range(2, 2 + n_classes)}
    np.testing.assert_array_equal(threshold_masks(maps, 0.45, uncertain), loop_reference(maps, 0.45, uncertain))


@pytest.mark.parametrize("n_classes", [1, 3])
def test_threshold_sweep_matches_loop_at_each_gamma(n_classes):
    rng = np.random.default_rng(10 + n_classes)
    maps = {label: rng.random((12, 9)).astype(np.float32) for label in range(4, 4 + n_classes)}
    gammas = [0.2, 0.45, 0.5, 0.77]
    for gamma, mask in zip(gammas, threshold_sweep(maps, gammas), strict=True):
        np.testing.assert_array_equal(mask, loop_reference(maps, gamma, None))


def test_known_disc():
    yy, xx = np.mgrid[:32, :32]
    soft = np.clip(1 - np.hypot(yy - 16, xx - 16) / 16, 0, 1)  # a cone: 1 at the centre, 0 at radius 16
    mask = threshold_masks({7: soft}, threshold=0.5)
    assert set(np.unique(mask)) == {0, 7}
    assert np.array_equal(mask == 7, np.hypot(yy - 16, xx - 16) < 8)


def test_band_must_be_below_threshold():
    with pytest.raises(ValueError, match="must be below"):
        threshold_masks({1: np.zeros((2, 2))}, 0.4, 0.5)
