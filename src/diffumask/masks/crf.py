"""Dense CRF (Krähenbühl & Koltun) on label masks, through the optional ``pydensecrf2`` extra.

Labels are read from the CRF marginals Q by argmax(Q), the most probable label: the official
DiffuMask code's argmax(1 − Q) picks the least probable one (paper notes §13, B4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..dataset import IGNORE_INDEX
from ..errors import ConfigError, DiffumaskError
from .propagate import resize_maps


#: The guided filter's ε (He et al.), in squared [0, 1] colour units: colour steps above √ε ≈ 8/255 are edges.
GUIDED_EPS = 1e-3


class CRFUnavailable(DiffumaskError, ImportError):
    """The dense CRF extra is not installed."""


@dataclass(frozen=True)
class CRFParams:
    """Dense CRF settings, spatial ones given for a 512 px image and scaled to the actual size.

    Defaults are the paper's adaptive-threshold CRF (§7) — Gaussian kernel sxy 3 / compat 3,
    bilateral kernel sxy 80 / compat 10, 10 mean-field iterations — except the bilateral colour
    scale: 30 instead of the paper's 13, measured on the shapes benchmark (fixed γ 0.6 + CRF 0.942
    mIoU at 30 against 0.890 at 13; see the README), the one place where masks can be scored.
    Its label confidence 0.5 was spread over 21 labels, so a pixel's label was 20× likelier than
    any one other label; ``gt_prob`` 0.95 keeps that ratio for a class against background. These
    defaults are refine's (RefineConfig), the command's and the benchmark's alike.
    """

    gt_prob: float = 0.95
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 30.0
    bilateral_compat: float = 10.0
    iterations: int = 10
    reference_size: int = 512
    max_size: int | None = 256  # not the paper's: larger images run it shrunk to this side (None: full size)

    def __post_init__(self) -> None:
        if not 0 < self.gt_prob < 1:
            raise ConfigError(f"the CRF's label confidence (--crf-gt-prob) must lie strictly between 0 and 1, "
                              f"got {self.gt_prob}")
        for name, value in (("--crf-sxy", self.bilateral_sxy), ("--crf-srgb", self.bilateral_srgb),
                            ("the Gaussian kernel's sxy", self.gaussian_sxy), ("reference_size", self.reference_size)):
            if not value > 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.gaussian_compat < 0 or self.bilateral_compat < 0:
            raise ConfigError("CRF compatibilities must be ≥ 0")
        if self.max_size is not None and self.max_size < 8:
            raise ConfigError(f"the CRF's working size (--crf-max-size) must be at least 8 px (0: full size), "
                              f"got {self.max_size}")
        if self.iterations < 1:
            raise ConfigError(f"the CRF's mean-field iterations (--crf-iterations) must be at least 1, got {self.iterations}")

    def as_dict(self) -> dict[str, Any]:
        """The settings as manifests record them; ``max_size`` only when set, so that datasets refined at full
        size before it existed read as refined with ``max_size=None`` (a re-run resumes rather than starting
        over). A shrunk CRF's marginals come back guided by the image (``upsampling``), which the bilinear
        resize of earlier versions did not."""
        out = asdict(self)
        if self.max_size is None:
            del out["max_size"]
        else:
            out["upsampling"] = "guided"
        return out


#: The seed CRF of the paper's AffinityNet stage (§6.1): surer labels (0.7 over 21 labels, 47× any
#: other label), a narrower bilateral kernel; its colour scale is the result CRF's 30 (the paper: 10),
#: as measured with it, so that one --crf-srgb sets both.
SEED_CRF = CRFParams(gt_prob=0.98, gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=60.0,
                     bilateral_srgb=CRFParams.bilateral_srgb, bilateral_compat=9.0)


def _densecrf() -> Any:
    try:
        import pydensecrf.densecrf as densecrf
    except ImportError:
        raise CRFUnavailable(
            "the dense CRF needs the optional pydensecrf2 package: pip install 'diffumask[crf]' "
            "(or pip install --no-deps --no-build-isolation pydensecrf2); or refine without --crf"
        ) from None
    return densecrf


def crf_available() -> bool:
    try:
        _densecrf()
    except CRFUnavailable:
        return False
    return True


class DenseCRF:
    """A dense CRF over one image, built once and run on any number of label masks.

    The pairwise kernels depend only on the image, so a γ sweep (20 candidates per image) pays
    for them once. With ``params.max_size`` below the image's longer side, the CRF runs on a shrunk
    copy (area-averaged image and label probabilities; spatial kernels scale with it): a quarter of
    the pixels at half size. Its marginals come back to full size bilinearly and then through a
    guided filter (He et al.) with the full-size image as guide, which puts each edge back on the
    image's own edge: the CRF's long-range reasoning at the small size, the pixel accuracy of the
    large one (bench/bench_crf_512.py measures both).
    """

    def __init__(self, image: np.ndarray, label_set: Sequence[int], params: CRFParams = CRFParams()):
        densecrf = _densecrf()
        if len(label_set) < 2:
            raise ValueError("a CRF needs at least two labels (background and a class)")
        self.height, self.width = image.shape[:2]
        self.label_set = np.asarray(label_set, np.uint8)
        self.params = params
        rgb = np.array(image[..., :3], dtype=np.uint8, order="C")  # a copy: pydensecrf needs a writable buffer
        side = max(self.height, self.width)
        self.grid = (self.height, self.width)  # where the CRF runs
        if params.max_size is not None and side > params.max_size:
            factor = params.max_size / side
            self.grid = (max(1, round(self.height * factor)), max(1, round(self.width * factor)))
            self._guide = torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div_(255)
            rgb = np.array(Image.fromarray(rgb).resize(self.grid[::-1], Image.BOX))
        scale = max(self.grid) / params.reference_size
        self._crf = densecrf.DenseCRF2D(self.grid[1], self.grid[0], len(label_set))
        self._crf.addPairwiseGaussian(sxy=params.gaussian_sxy * scale, compat=params.gaussian_compat)
        self._crf.addPairwiseBilateral(sxy=params.bilateral_sxy * scale, srgb=params.bilateral_srgb,
                                       rgbim=rgb, compat=params.bilateral_compat)
        self._lookup = np.zeros(256, np.int32)  # 0 = unsure; channel k is written as k + 1
        self._lookup[self.label_set] = np.arange(1, len(label_set) + 1)
        self._lookup[IGNORE_INDEX] = 0

    def marginals(self, labels: np.ndarray) -> np.ndarray:
        """Mean-field marginals Q, shape (len(label_set), H, W); channel k is ``label_set[k]``.

        Each pixel's unary says its label with probability ``gt_prob`` (the rest shared by the
        other labels); pixels labelled 255, or with a label outside the set, are unsure (uniform).
        """
        from pydensecrf.utils import unary_from_labels

        if labels.shape != (self.height, self.width):
            raise ValueError(f"labels {labels.shape} do not match the image {(self.height, self.width)}")
        n = len(self.label_set)
        unary = unary_from_labels(self._lookup[labels], n, gt_prob=self.params.gt_prob, zero_unsure=True)
        shrunk = self.grid != (self.height, self.width)
        if shrunk:  # each pixel's label distribution, averaged over the pixels that shrink into one
            probabilities = np.exp(-unary).reshape(n, self.height, self.width)
            unary = -np.log(resize_maps(probabilities, self.grid, "area")).reshape(n, -1)
        self._crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
        q = np.asarray(self._crf.inference(self.params.iterations), dtype=np.float32).reshape(n, *self.grid)
        return self._upsample(q) if shrunk else q

    def _upsample(self, q: np.ndarray) -> np.ndarray:
        """Marginals from the CRF's grid to the image's size, their edges snapped to the image's by a guided
        filter whose radius is twice the shrink factor, its coefficients computed on the CRF's own grid (the
        fast guided filter's subsampling by the shrink factor: no coarser, or thin objects fall between its
        samples); renormalised, as the filter's output need not sum to one."""
        from kornia.filters import guided_blur

        q = resize_maps(q, (self.height, self.width))
        factor = max(1, round(max(self.height, self.width) / max(self.grid)))
        q = guided_blur(self._guide, torch.from_numpy(q)[None], 4 * factor + 1, GUIDED_EPS,
                        subsample=factor)[0].numpy().clip(0, 1)
        return q / np.maximum(q.sum(axis=0, keepdims=True), 1e-6)

    def __call__(self, labels: np.ndarray) -> np.ndarray:
        """The CRF's label per pixel: argmax of its marginals (the most probable label)."""
        return self.label_set[self.marginals(labels).argmax(axis=0)]


def crf_marginals(image: np.ndarray, labels: np.ndarray, label_set: Sequence[int],
                  params: CRFParams = CRFParams()) -> np.ndarray:
    """Marginals of a dense CRF on ``labels`` over ``image``; see :meth:`DenseCRF.marginals`."""
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    return DenseCRF(image, label_set, params).marginals(labels)


def crf_refine(image: np.ndarray, labels: np.ndarray, label_set: Sequence[int],
               params: CRFParams = CRFParams()) -> np.ndarray:
    """The CRF's label per pixel, argmax of its marginals, as a (H, W) uint8 mask of ``label_set`` values."""
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    return DenseCRF(image, label_set, params)(labels)
