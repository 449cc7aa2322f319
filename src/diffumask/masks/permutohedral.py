"""The dense CRF's Gaussian filtering on a permutohedral lattice (Adams, Baek & Davis 2010), in torch.

This is the filter pydensecrf runs for each pairwise kernel, computed the same way — the same lattice,
splat weights, [1 2 1]/2 blur along each of its d+1 axes and slice scaling — so the marginals agree with
pydensecrf's to float rounding (tested), but as sparse matrix products that run wherever torch does: on
the GPU that generated the images, where `refine`'s CRF otherwise waits for CPU workers, and without a
compiled extra to install. The lattice is built once per image; each mean-field iteration is then a
handful of sparse products.
"""

from __future__ import annotations

import math
import warnings

import torch


class PermutohedralFilter:
    """Gaussian filtering of values over points with ``features`` (N, d): out_i ≈ Σ_j exp(−|f_i − f_j|²/2) v_j,
    as the permutohedral lattice approximates it, and normalised symmetrically as pydensecrf's kernels
    are by default (``norm · K(norm · v)``, norm = K(1)^−½)."""

    def __init__(self, features: torch.Tensor):
        n, d = features.shape
        device = features.device
        keys, weights = _enclosing_simplices(features.float())  # (N·(d+1), d), (N·(d+1),)
        packed, radix = _packed(keys, margin=d)
        vertices, inverse = torch.unique(packed, return_inverse=True)  # sorted
        m = len(vertices)
        points = torch.arange(n, device=device).repeat_interleave(d + 1)
        with warnings.catch_warnings():  # torch calls its sparse CSR tensors beta; products are all we use
            warnings.simplefilter("ignore", UserWarning)
            self._splat = _csr(inverse, points, weights, (m, n))
            self._slice = _csr(points, inverse, weights * (1.0 / (1 + 2.0 ** -d)), (n, m))
            self._blurs = [_blur(vertices, _step(axis, d, radix)) for axis in range(d + 1)]
            if device.type != "cpu":  # one matrix for the d+1 passes: denser, but a GPU's cost is its launches
                composed = self._blurs[0]
                for blur in self._blurs[1:]:
                    composed = blur @ composed
                self._blurs = [composed]
            self._norm = self._filter(torch.ones(n, 1, device=device)).add_(1e-20).rsqrt_()

    def _filter(self, values: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            lattice = self._splat @ values
            for blur in self._blurs:
                lattice = blur @ lattice
            return self._slice @ lattice

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        """The filtered (N, C) ``values``."""
        return self._norm * self._filter(self._norm * values)


def _enclosing_simplices(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each point's d+1 enclosing lattice vertices (their first d coordinates) and barycentric weights,
    point-major: the elevation onto the plane Σx = 0 scaled for a unit-variance Gaussian, the nearest
    remainder-0 point by rounding, the simplex from the coordinates' ranks."""
    n, d = features.shape
    device = features.device
    scale = torch.tensor([math.sqrt(2.0 / 3.0) * (d + 1) / math.sqrt((i + 2) * (i + 1)) for i in range(d)],
                         device=device)
    scaled = features * scale
    after = torch.cat([scaled.flip(1).cumsum(1).flip(1), torch.zeros(n, 1, device=device)], dim=1)  # Σ_{i≥j}
    elevated = torch.empty(n, d + 1, device=device)
    elevated[:, 0] = after[:, 0]
    elevated[:, 1:] = after[:, 1:] - torch.arange(1, d + 1, device=device) * scaled
    nearest = torch.round(elevated / (d + 1))
    remainder0 = nearest * (d + 1)
    total = nearest.sum(1, keepdim=True).long()
    offset = elevated - remainder0
    above = offset[:, :, None] < offset[:, None, :]  # [i, j]: coordinate j lies further above its point than i
    later = torch.ones(d + 1, d + 1, dtype=torch.bool, device=device).triu(1)
    rank = (above & later).sum(2) + (~above & later).sum(1) + total  # descending order, ties to the first
    low, high = rank < 0, rank > d
    rank = rank + (d + 1) * low - (d + 1) * high
    remainder0 = remainder0 + (d + 1) * low - (d + 1) * high
    share = (elevated - remainder0) / (d + 1)
    barycentric = torch.zeros(n, d + 2, device=device)
    barycentric.scatter_add_(1, d - rank, share)
    barycentric.scatter_add_(1, d - rank + 1, -share)
    barycentric[:, 0] += 1 + barycentric[:, d + 1]
    r = torch.arange(d + 1, device=device)
    canonical = torch.where(r[None, :] <= d - r[:, None], r[:, None], r[:, None] - (d + 1))  # [remainder, rank]
    keys = remainder0[:, None, :d].long() + canonical[:, rank[:, :d]].permute(1, 0, 2)  # (N, d+1, d)
    return keys.reshape(-1, d), barycentric[:, : d + 1].reshape(-1)


def _packed(keys: torch.Tensor, margin: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer rows as one int64 each (mixed radix over their range, widened by ``margin`` on both sides so
    that a neighbour's key packs by adding the packed step), and the radix."""
    low = keys.amin(0) - margin
    span = keys.amax(0) + margin - low + 1
    if float(span.double().log().sum()) >= 62 * math.log(2.0):
        raise ValueError("the CRF's features span too far for its lattice's keys; scale them down")
    radix = torch.cumprod(torch.cat([span.new_ones(1), span[:-1]]), 0)
    return ((keys - low) * radix).sum(1), radix


def _step(axis: int, d: int, radix: torch.Tensor) -> int:
    """The packed offset to a vertex's neighbour along one of the lattice's d+1 axes: −1 in every
    coordinate but ``axis``, which moves by +d (the last axis moves every stored coordinate by −1)."""
    step = torch.full((d,), -1, dtype=radix.dtype, device=radix.device)
    if axis < d:
        step[axis] = d
    return int((step * radix).sum())


def _blur(vertices: torch.Tensor, step: int) -> torch.Tensor:
    """The [1 2 1]/2 blur along one axis as a sparse (M, M) matrix: each vertex keeps its value and adds
    half of each neighbour's (a neighbour not in the lattice adds nothing)."""
    m = len(vertices)
    own = torch.arange(m, device=vertices.device)
    rows, columns, values = [own], [own], [torch.ones(m, device=vertices.device)]
    for neighbour in (vertices + step, vertices - step):
        at = torch.searchsorted(vertices, neighbour).clamp_(max=m - 1)
        hit = vertices[at] == neighbour
        rows.append(own[hit])
        columns.append(at[hit])
        values.append(torch.full((len(rows[-1]),), 0.5, device=vertices.device))
    return _csr(torch.cat(rows), torch.cat(columns), torch.cat(values), (m, m))


def _csr(rows: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A sparse CSR matrix from distinct (row, column) entries in any order."""
    order = torch.argsort(rows * shape[1] + columns)
    crow = torch.zeros(shape[0] + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)
    return torch.sparse_csr_tensor(crow.int(), columns[order].int(), values[order], shape)  # int32: the BLAS's own
