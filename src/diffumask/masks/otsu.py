"""Otsu's threshold per soft map: a training-free, parameter-free baseline."""

from __future__ import annotations

import cv2
import numpy as np

#: A map whose values span less than this carries no location; nothing in it is foreground.
FLAT_SPAN = 1e-3


def otsu_threshold(soft: np.ndarray) -> float:
    """The γ that splits ``soft`` (values in [0, 1]) into two classes of maximal between-class variance.

    Computed by OpenCV on the map quantised to 256 levels; OpenCV's level t means "foreground is
    above t", which on the float map is ``value > (t + 0.5) / 255``. A flat map returns 1.0.
    """
    soft = np.asarray(soft, dtype=np.float32)
    if float(soft.max() - soft.min()) < FLAT_SPAN:
        return 1.0
    levels = np.clip(np.rint(soft * 255), 0, 255).astype(np.uint8)
    level, _ = cv2.threshold(levels, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    return (float(level) + 0.5) / 255
