"""Dense CRF (Krähenbühl & Koltun) on label masks: in pydensecrf on a CPU (the optional ``crf`` extra, the
fastest there), in torch on a GPU or where pydensecrf is not installed (the same mean field).

Labels are read from the CRF marginals Q by argmax(Q), the most probable label: the official
DiffuMask code's argmax(1 − Q) picks the least probable one (paper notes §13, B4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..dataset import IGNORE_INDEX
from ..errors import ConfigError
from .permutohedral import PermutohedralFilter


#: The guided filter's ε (He et al.), in squared [0, 1] colour units: colour steps above √ε ≈ 8/255 are edges.
GUIDED_EPS = 1e-3


@dataclass(frozen=True)
class CRFParams:
    """Dense CRF settings, spatial ones given for a 512 px image and scaled to the actual size.

    Defaults are the paper's adaptive-threshold CRF (§7) — Gaussian kernel sxy 3 / compat 3,
    bilateral kernel sxy 80 / compat 10, 10 mean-field iterations — except the bilateral colour
    scale: 30 instead of the paper's 13, measured on the shapes benchmark (fixed γ 0.6 + CRF 0.970
    mIoU at 30 against 0.940 at 13; see the README), the one place where masks can be scored.
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


def _pydensecrf() -> Any:
    """pydensecrf's module (the optional ``crf`` extra), or None."""
    try:
        import pydensecrf.densecrf as densecrf
    except ImportError:
        return None
    return densecrf


def pydensecrf_installed() -> bool:
    return _pydensecrf() is not None


def crf_device(device: torch.device | str | None) -> torch.device | None:
    """Where the mean field runs: None is pydensecrf on this CPU, the fastest there (the ``crf`` extra); a
    torch device runs the same lattice filters in torch (:mod:`diffumask.masks.permutohedral`): an
    accelerator's, or this CPU's when pydensecrf is not installed (about twice its time)."""
    if device is None:
        return None if pydensecrf_installed() else torch.device("cpu")
    return torch.device(device)


def label_unary(labels: torch.Tensor, n: int, gt_prob: float) -> torch.Tensor:
    """Unary energies (n, H·W) of a label map whose values are channel + 1, or 0 for unsure: the labelled
    channel has probability ``gt_prob``, the others share the rest, an unsure pixel is uniform (as
    pydensecrf.utils.unary_from_labels with zero_unsure)."""
    flat = labels.reshape(-1).long()
    unary = torch.full((n, flat.numel()), -math.log((1.0 - gt_prob) / (n - 1)), device=labels.device)
    sure = flat > 0
    columns = torch.nonzero(sure).squeeze(1)
    unary[flat[sure] - 1, columns] = -math.log(gt_prob)
    unary[:, ~sure] = -math.log(1.0 / n)
    return unary


class DenseCRF:
    """A dense CRF over one image, built once and run on any number of label masks.

    The pairwise kernels depend only on the image, so a γ sweep (20 candidates per image) pays
    for them once. With ``params.max_size`` below the image's longer side, the CRF runs on a shrunk
    copy (area-averaged image and label probabilities; spatial kernels scale with it): a quarter of
    the pixels at half size. Its marginals come back to full size bilinearly and then through a
    guided filter (He et al.) with the full-size image as guide, which puts each edge back on the
    image's own edge: the CRF's long-range reasoning at the small size, the pixel accuracy of the
    large one (bench/bench_crf_512.py measures both).

    ``device`` None runs the mean field on this CPU, in pydensecrf when it is installed; a torch device runs
    the same lattice filters in torch there (:func:`crf_device`), marginals equal to pydensecrf's to float
    rounding (tested).
    """

    def __init__(self, image: np.ndarray, label_set: Sequence[int], params: CRFParams = CRFParams(),
                 device: torch.device | str | None = None):
        if len(label_set) < 2:
            raise ValueError("a CRF needs at least two labels (background and a class)")
        self.device = crf_device(device)
        self.height, self.width = image.shape[:2]
        self.label_set = np.asarray(label_set, np.uint8)
        self.params = params
        rgb = np.array(image[..., :3], dtype=np.uint8, order="C")  # a copy: pydensecrf needs a writable buffer
        side = max(self.height, self.width)
        self.grid = (self.height, self.width)  # where the CRF runs
        on = self.device or torch.device("cpu")
        if params.max_size is not None and side > params.max_size:
            factor = params.max_size / side
            self.grid = (max(1, round(self.height * factor)), max(1, round(self.width * factor)))
            self._guide = torch.from_numpy(rgb).to(on).permute(2, 0, 1)[None].float().div_(255)
            rgb = np.array(Image.fromarray(rgb).resize(self.grid[::-1], Image.BOX))
        scale = max(self.grid) / params.reference_size
        gaussian_sxy, bilateral_sxy = params.gaussian_sxy * scale, params.bilateral_sxy * scale
        if self.device is None:
            self._crf = _pydensecrf().DenseCRF2D(self.grid[1], self.grid[0], len(label_set))
            self._crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=params.gaussian_compat)
            self._crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=params.bilateral_srgb, rgbim=rgb,
                                           compat=params.bilateral_compat)
        else:  # pydensecrf's features: (x, y) / sxy, then (r, g, b) / srgb, pixels row-major
            ys, xs = torch.meshgrid(torch.arange(self.grid[0], device=on), torch.arange(self.grid[1], device=on),
                                    indexing="ij")
            position = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1).float()
            colour = torch.from_numpy(rgb).to(on).reshape(-1, 3).float()
            self._gaussian = PermutohedralFilter(position / gaussian_sxy)
            self._bilateral = PermutohedralFilter(torch.cat([position / bilateral_sxy, colour / params.bilateral_srgb], 1))
        self._lookup = torch.zeros(256, dtype=torch.uint8)  # 0 = unsure; channel k is written as k + 1
        self._lookup[torch.from_numpy(self.label_set).long()] = torch.arange(1, len(label_set) + 1, dtype=torch.uint8)
        self._lookup[IGNORE_INDEX] = 0
        self._lookup = self._lookup.to(on)

    def _marginals(self, labels: np.ndarray) -> torch.Tensor:
        """Mean-field marginals Q, shape (len(label_set), H, W), on the CRF's device (this CPU for pydensecrf)."""
        if labels.shape != (self.height, self.width):
            raise ValueError(f"labels {labels.shape} do not match the image {(self.height, self.width)}")
        n = len(self.label_set)
        on = self._lookup.device
        unary = label_unary(self._lookup[torch.from_numpy(np.asarray(labels, np.uint8)).to(on).long()], n,
                            self.params.gt_prob)
        shrunk = self.grid != (self.height, self.width)
        if shrunk:  # each pixel's label distribution, averaged over the pixels that shrink into one
            probabilities = unary.neg().exp().reshape(1, n, self.height, self.width)
            unary = F.adaptive_avg_pool2d(probabilities, self.grid).log().neg().reshape(n, -1)
        if self.device is None:
            self._crf.setUnaryEnergy(np.ascontiguousarray(unary.numpy(), dtype=np.float32))
            q = torch.from_numpy(np.asarray(self._crf.inference(self.params.iterations), dtype=np.float32))
        else:
            q = self._mean_field(unary.t().contiguous()).t()
        q = q.reshape(n, *self.grid)
        return self._upsample(q) if shrunk else q

    def _mean_field(self, unary: torch.Tensor) -> torch.Tensor:
        """pydensecrf's inference on (pixels, labels) energies: Q ∝ exp(−U + Σ_k w_k·K_k(Q)), Potts-weighted."""
        q = torch.softmax(-unary, dim=1)
        for _ in range(self.params.iterations):
            message = self.params.gaussian_compat * self._gaussian(q) + self.params.bilateral_compat * self._bilateral(q)
            q = torch.softmax(message - unary, dim=1)
        return q

    def _upsample(self, q: torch.Tensor) -> torch.Tensor:
        """Marginals from the CRF's grid to the image's size, their edges snapped to the image's by a guided
        filter whose radius is twice the shrink factor, its coefficients computed on the CRF's own grid (the
        fast guided filter's subsampling by the shrink factor: no coarser, or thin objects fall between its
        samples); renormalised, as the filter's output need not sum to one. The filter is linear and keeps
        constants, so the last channel is one minus the others' sum: one channel fewer to filter (a quarter
        of its cost with two labels)."""
        from kornia.filters import guided_blur

        q = F.interpolate(q[None, :-1], size=(self.height, self.width), mode="bilinear", align_corners=False)
        factor = max(1, round(max(self.height, self.width) / max(self.grid)))
        q = guided_blur(self._guide, q, 4 * factor + 1, GUIDED_EPS, subsample=factor)[0]
        q = torch.cat([q, 1 - q.sum(dim=0, keepdim=True)]).clamp_(0, 1)
        return q / q.sum(dim=0, keepdim=True).clamp_(min=1e-6)

    def marginals(self, labels: np.ndarray) -> np.ndarray:
        """Mean-field marginals Q, shape (len(label_set), H, W); channel k is ``label_set[k]``.

        Each pixel's unary says its label with probability ``gt_prob`` (the rest shared by the
        other labels); pixels labelled 255, or with a label outside the set, are unsure (uniform).
        """
        return self._marginals(labels).cpu().numpy()

    def __call__(self, labels: np.ndarray) -> np.ndarray:
        """The CRF's label per pixel: argmax of its marginals (the most probable label)."""
        q = self._marginals(labels)
        if q.device.type == "cpu":  # numpy's argmax over the first axis is ~20× torch's on a CPU
            return self.label_set[q.numpy().argmax(axis=0)]
        return self.label_set[q.argmax(dim=0).to(torch.uint8).cpu().numpy()]


def crf_marginals(image: np.ndarray, labels: np.ndarray, label_set: Sequence[int],
                  params: CRFParams = CRFParams(), device: torch.device | str | None = None) -> np.ndarray:
    """Marginals of a dense CRF on ``labels`` over ``image``; see :meth:`DenseCRF.marginals`."""
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    return DenseCRF(image, label_set, params, device).marginals(labels)


def crf_refine(image: np.ndarray, labels: np.ndarray, label_set: Sequence[int],
               params: CRFParams = CRFParams(), device: torch.device | str | None = None) -> np.ndarray:
    """The CRF's label per pixel, argmax of its marginals, as a (H, W) uint8 mask of ``label_set`` values."""
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    return DenseCRF(image, label_set, params, device)(labels)
