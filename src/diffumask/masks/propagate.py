"""Propagating soft maps over a grid: random walks on affinities, self-attention propagation.

Both are the same operation, maps · T^t for a column-stochastic transition matrix T: every step
replaces each pixel's value by an affinity-weighted average of its neighbours' values. It is run
as t products with the (sparse or dense) matrix, never by forming T^t, so a 64×64 grid (4096
nodes, about 80 neighbours each for radius 5) costs t sparse products instead of dense
4096×4096 matrix powers.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from ..attention import fuse
from ..errors import DiffumaskError
from .threshold import threshold_masks

Matrix = np.ndarray | sp.spmatrix | sp.sparray

NO_SELF_ATTENTION = ("this dataset holds no self-attention (no '__self__@<h>' in its soft maps); regenerate it with "
                     "`diffumask generate --self-attention 2` (the default) to use --method propagate")


def half_disc_offsets(radius: int) -> list[tuple[int, int]]:
    """Offsets (dy, dx) to the neighbours within ``radius`` that come later in raster order.

    Every unordered pair of grid pixels closer than ``radius`` appears exactly once (PSA's set:
    (0, 1..r−1) and dy ≥ 1 with dx² + dy² < r²).
    """
    offsets = [(0, dx) for dx in range(1, radius)]
    offsets += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius)
                if dx * dx + dy * dy < radius * radius]
    return offsets


def pair_slices(height: int, width: int, dy: int, dx: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Index windows (source, target) pairing grid pixel (y, x) with (y + dy, x + dx) inside the grid."""
    x0, x1 = max(0, -dx), width - max(0, dx)
    return (slice(0, height - dy), slice(x0, x1)), (slice(dy, height), slice(x0 + dx, x1 + dx))


@functools.lru_cache(maxsize=16)
def _grid_pairs(height: int, width: int, radius: int) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray, np.ndarray]:
    """The sparsity pattern of a grid's affinity matrix, computed once per grid size.

    Returns the offsets that pair any pixels, and the CSR ``indptr``, ``indices`` and the order
    that takes values listed as [diagonal, each offset's pairs (i→j), the same pairs (j→i)] into
    CSR order — the sort is what building the matrix from scratch costs, every image.
    """
    index = np.arange(height * width).reshape(height, width)
    offsets, rows, cols = [], [index.ravel()], [index.ravel()]
    backward_rows, backward_cols = [], []
    for dy, dx in half_disc_offsets(radius):
        src, dst = pair_slices(height, width, dy, dx)
        if src[0].stop - src[0].start <= 0 or src[1].stop <= src[1].start:
            continue
        offsets.append((dy, dx))
        i, j = index[src].ravel(), index[dst].ravel()
        rows.append(i)
        cols.append(j)
        backward_rows.append(j)
        backward_cols.append(i)
    rows_all = np.concatenate(rows + backward_rows)
    cols_all = np.concatenate(cols + backward_cols)
    order = np.lexsort((cols_all, rows_all))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows_all, minlength=height * width))])
    return offsets, indptr, cols_all[order], order


def _affinity_values(features: torch.Tensor, offsets: list[tuple[int, int]]) -> torch.Tensor:
    """a_ij = exp(−mean_c |f_i − f_j|) listed as _grid_pairs orders them before its sort: the diagonal
    (1), then each offset's pairs, then the same pairs the other way round; on the features' device."""
    _, height, width = features.shape
    values = [features.new_ones(height * width)]
    with torch.no_grad():
        for dy, dx in offsets:
            src, dst = pair_slices(height, width, dy, dx)
            values.append(torch.exp(-(features[:, src[0], src[1]] - features[:, dst[0], dst[1]]).abs().mean(0))
                          .ravel())
    return torch.cat(values + values[1:])


def grid_affinity_matrix(features: torch.Tensor, radius: int = 5) -> sp.csr_matrix:
    """Sparse symmetric affinity matrix of one (D, h, w) CPU feature map: a_ij = exp(−mean_c |f_i − f_j|)
    for pixels closer than ``radius``, 1 on the diagonal (PSA's affinity)."""
    _, height, width = features.shape
    offsets, indptr, indices, order = _grid_pairs(height, width, radius)
    values = _affinity_values(features, offsets).numpy()
    n = height * width
    return sp.csr_matrix((values[order], indices.copy(), indptr.copy()), shape=(n, n))


@functools.lru_cache(maxsize=16)
def _device_pairs(height: int, width: int, radius: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """:func:`_grid_pairs` as tensors on ``device`` (CSR indptr, indices, the sort, and each value's row)."""
    _, indptr, indices, order = _grid_pairs(height, width, radius)
    rows = np.repeat(np.arange(height * width), np.diff(indptr))
    return tuple(torch.from_numpy(a.astype(np.int64)).to(device) for a in (indptr, indices, order, rows))


def transposed_transition(features: torch.Tensor, radius: int = 5, beta: float = 16.0) -> torch.Tensor:
    """Tᵀ of :func:`transition_matrix` (:func:`grid_affinity_matrix`) as a sparse CSR tensor on the
    features' device: A is symmetric, so Tᵀ = diag(1 / colsum(A^∘β)) · A^∘β keeps A's sparsity pattern."""
    _, height, width = features.shape
    offsets = _grid_pairs(height, width, radius)[0]
    indptr, indices, order, rows = _device_pairs(height, width, radius, features.device)
    powered = _affinity_values(features, offsets)[order].double() ** beta
    sums = torch.zeros(height * width, dtype=powered.dtype, device=powered.device).index_add_(0, rows, powered)
    with warnings.catch_warnings():  # torch calls CSR tensors beta; the sparse-dense product is all we use
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(indptr, indices, (powered / sums[rows]).float(), size=(height * width,) * 2,
                                       check_invariants=False)


def walk(transposed: torch.Tensor, state: torch.Tensor, steps: int) -> torch.Tensor:
    """state (n, K) ← Tᵀ · state, ``steps`` times (maps · T^steps, transposed), on the tensors' device."""
    for _ in range(steps):
        state = transposed @ state
    return state


def affinity_walk(features: torch.Tensor, maps: np.ndarray, radius: int, beta: float, steps: int) -> np.ndarray:
    """maps (K, h·w) · T^steps for the transition matrix of the (D, h, w) ``features``' affinities, where
    the features are: through scipy on the CPU, as sparse tensors on an accelerator."""
    if features.device.type == "cpu":
        return random_walk(maps, transition_matrix(grid_affinity_matrix(features, radius), beta), steps)
    state = torch.from_numpy(np.ascontiguousarray(np.asarray(maps, np.float32).T)).to(features.device)
    return np.ascontiguousarray(walk(transposed_transition(features, radius, beta), state, steps).T.cpu().numpy())


def transition_matrix(affinity: Matrix, beta: float = 16.0) -> Matrix:
    """Column-stochastic T = A^∘β / colsum(A^∘β) (element-wise power sharpens weak affinities away)."""
    if sp.issparse(affinity):
        powered = sp.csr_matrix(affinity, dtype=np.float64, copy=True)
        powered.data **= beta
        colsum = np.bincount(powered.indices, weights=powered.data, minlength=powered.shape[1])
        powered.data /= colsum[powered.indices]
        return powered
    powered = np.asarray(affinity, np.float64) ** beta
    return powered / powered.sum(axis=0, keepdims=True)


def random_walk(maps: np.ndarray, transition: Matrix, steps: int) -> np.ndarray:
    """maps · T^steps for maps of shape (K, n): ``steps`` rounds of affinity-weighted averaging.

    A sparse T is walked as torch CSR products (three times faster than scipy's here); a dense
    one with numpy.
    """
    if not sp.issparse(transition):
        state = np.asarray(maps, np.float64)
        transition = np.asarray(transition, np.float64)  # once: a float32 operand takes numpy's slow loop each step
        for _ in range(steps):
            state = state @ transition
        return state.astype(np.float32)
    transposed = sp.csr_matrix(transition.T, dtype=np.float32)
    with warnings.catch_warnings():  # torch calls CSR tensors beta; the sparse-dense product is all we use
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        matrix = torch.sparse_csr_tensor(torch.from_numpy(transposed.indptr.astype(np.int64)),
                                         torch.from_numpy(transposed.indices.astype(np.int64)),
                                         torch.from_numpy(transposed.data), size=transposed.shape,
                                         check_invariants=False)  # scipy's CSR is valid by construction
    state = torch.from_numpy(np.ascontiguousarray(np.asarray(maps, np.float32).T))
    return np.ascontiguousarray(walk(matrix, state, steps).T.numpy())


def resize_maps(maps: np.ndarray, size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """(K, h, w) maps resized to ``size`` (area averaging when shrinking, bilinear when growing)."""
    tensor = torch.from_numpy(np.ascontiguousarray(maps, np.float32))[None]
    if mode == "area":
        return F.adaptive_avg_pool2d(tensor, size)[0].numpy()
    return F.interpolate(tensor, size=size, mode=mode, align_corners=False)[0].numpy()


def self_attention_grid(soft_maps: dict[str, np.ndarray]) -> tuple[str, int]:
    """The key and grid height of the self-attention matrix in an item's soft maps."""
    keys = [k for k in soft_maps if k.startswith("__self__@")]
    if not keys:
        raise DiffumaskError(NO_SELF_ATTENTION)
    key = min(keys, key=lambda k: int(k.split("@")[1]))
    return key, int(key.split("@")[1])


def self_attention_inputs(soft_maps: dict[str, np.ndarray], classes: list[str],
                          resolutions: list[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """What the propagation needs of an item's soft maps: each class's cross-attention fused at the
    self-attention grid, (K, h, w), and the (h·w, h·w) self-attention matrix."""
    key, grid_h = self_attention_grid(soft_maps)
    matrix = soft_maps[key]
    grid_w = matrix.shape[0] // grid_h
    cross = []
    for name in classes:
        grids = {int(k.split("@")[1]): v for k, v in soft_maps.items() if k.startswith(f"{name}@")}
        cross.append(fuse(grids, (grid_h, grid_w), resolutions) if grids else resize_maps(
            soft_maps[name][None], (grid_h, grid_w), "area")[0])
    return np.stack(cross), matrix


def dense_walk(matrix: np.ndarray, maps: np.ndarray, steps: int, device: torch.device | str) -> np.ndarray:
    """maps (K, n) · (matrixᵀ)^steps in float64 on ``device`` (an accelerator: on a CPU numpy's
    :func:`random_walk` is as fast), every map in one product per step; float32 out."""
    state = torch.from_numpy(np.ascontiguousarray(maps.T)).to(device).double()
    return walk(torch.from_numpy(matrix).to(device).double(), state, steps).T.float().cpu().numpy()


def self_attention_walk(cross: np.ndarray, matrix: np.ndarray, power: int = 4,
                        device: torch.device | str = "cpu") -> np.ndarray:
    """Each (h, w) map of ``cross`` multiplied by the self-attention matrix ``power`` times (in float64,
    on ``device``, every class in one product), then min–max normalised."""
    maps = cross.reshape(len(cross), -1)
    walked = random_walk(maps, matrix.T, power) if torch.device(device).type == "cpu" else \
        dense_walk(matrix, maps, power, device)
    low = walked.min(axis=1, keepdims=True)
    span = walked.max(axis=1, keepdims=True) - low
    return np.divide(walked - low, span, out=np.zeros_like(walked), where=span > 0).reshape(cross.shape)


def self_attention_maps(soft_maps: dict[str, np.ndarray], classes: list[str], resolutions: list[int] | None,
                        size: tuple[int, int], power: int = 4, device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Dataset Diffusion's refinement: each class's cross-attention, fused at the self-attention
    grid, multiplied by the self-attention matrix ``power`` times, min–max normalised per class,
    then upsampled (bilinear) to the image ``size``.

    Self-attention rows sum to one, so S·m averages each pixel over the pixels it attends to —
    pixels of one object attend to each other — spreading a coarse blob over the object's
    extent and away from the background.
    """
    walked = self_attention_walk(*self_attention_inputs(soft_maps, classes, resolutions), power, device)
    return dict(zip(classes, resize_maps(walked, size).clip(0, 1)))


def propagated_mask(walked: np.ndarray, labels: Sequence[int], size: tuple[int, int], threshold: float = 0.6,
                    uncertain: float | None = 0.5) -> np.ndarray:
    """The label mask of propagated grid maps (K, h, w) (labels in that order) at the image ``size``."""
    return threshold_masks(dict(zip(labels, resize_maps(walked, size).clip(0, 1))), threshold, uncertain)


def propagate_mask(soft_maps: dict[str, np.ndarray], labels: dict[str, int], resolutions: list[int] | None,
                   size: tuple[int, int], power: int = 4, threshold: float = 0.6,
                   uncertain: float | None = 0.5) -> np.ndarray:
    """Label mask by self-attention propagation with Dataset Diffusion's 0.6 threshold and 0.5–0.6 band (255)."""
    walked = self_attention_walk(*self_attention_inputs(soft_maps, list(labels), resolutions), power)
    return propagated_mask(walked, list(labels.values()), size, threshold, uncertain)
