"""The ``SoftMaps/<id>.npz`` format: what a generated item keeps of its attention, compactly.

Readers always see the logical view that :meth:`ImageMaps.soft_maps` gives: ``name`` (the fused
map at image size), ``name@h`` (raw grids) and ``__self__@h`` (the self-attention matrix,
dense). On disk, tens of thousands of items at 512 px must stay small, so :func:`pack` stores

- the raw grids only, in float32 (a few kB): the fused map is recomputed from them by
  :func:`unpack`, bit for bit what ``generate`` thresholded, with the size, resolutions and token
  average kept in ``__meta__``;
- the self-attention matrix as the largest ``keep`` share of each row (a bit per entry for which
  are kept, 8-bit values scaled by each row's peak): rows are peaked around the pixel's own
  object, and ``unpack`` renormalises each row to sum to one. At 512 px (32² grid, 1/8 kept)
  that is 258 kB before compression instead of 2 MB.

Files written before this format (fused maps and a dense matrix stored as float16) read as they are.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

SELF_KEY = "__self__"  # dense matrix: __self__@h
BITS_KEY = "__selfm__"  # which entries are kept: __selfm__@h, (n, n/8) packed bits
VALUES_KEY = "__selfv__"  # their values in row-major order, uint8 scaled by the row's peak: (n·k,)
SCALES_KEY = "__selfs__"  # each row's peak, float16: (n,)
SPARSE_KEYS = (BITS_KEY, VALUES_KEY, SCALES_KEY)
META_KEY = "__meta__"
#: Default share of each self-attention row kept on disk: on the shapes benchmark propagate's mIoU
#: moves by +0.011 at 1/8 (+0.005 at 1/16), by +0.002 after the CRF; 8-bit values change nothing measurable.
SELF_ATTENTION_KEEP = 1 / 8


def sparsify_rows(matrix: np.ndarray, keep: float) -> dict[str, np.ndarray]:
    """The ``ceil(keep·n)`` largest entries of each row of an (n, n) matrix, as ``bits`` (packed
    positions), ``values`` (uint8, row-major, relative to the row's peak) and ``scales`` (the peaks)."""
    n = matrix.shape[1]
    k = max(1, min(n, math.ceil(keep * n)))
    chosen = np.zeros(matrix.shape, bool)
    np.put_along_axis(chosen, np.argpartition(-matrix, k - 1, axis=1)[:, :k], True, axis=1)
    kept = np.where(chosen, matrix, 0).astype(np.float32)
    scales = kept.max(axis=1).astype(np.float16)
    safe = np.where(scales > 0, scales.astype(np.float32), 1)[:, None]
    values = np.clip(np.rint(kept / safe * 255), 0, 255)[chosen].astype(np.uint8)
    return {"bits": np.packbits(chosen, axis=1), "values": values, "scales": scales}


def densify_rows(bits: np.ndarray, values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The (n, n) row-stochastic matrix from :func:`sparsify_rows`' arrays, each row renormalised."""
    n = scales.shape[0]
    chosen = np.unpackbits(bits, axis=1, count=n).astype(bool)
    dense = np.zeros((n, n), np.float32)
    dense[chosen] = values.astype(np.float32) / 255
    dense *= scales.astype(np.float32)[:, None]
    sums = dense.sum(axis=1, keepdims=True)
    return np.divide(dense, sums, out=dense, where=sums > 0)


def pack(maps: Mapping[str, np.ndarray], size: tuple[int, int], resolutions: Iterable[int],
         token_average: str = "maps", self_attention_keep: float = SELF_ATTENTION_KEEP) -> dict[str, np.ndarray]:
    """Arrays to store for an item's logical soft maps (see the module docstring).

    ``self_attention_keep`` 1 stores the matrix dense (float16), as earlier versions did.
    """
    if not 0 < self_attention_keep <= 1:
        raise ValueError(f"self_attention_keep must lie in (0, 1], got {self_attention_keep}")
    out: dict[str, np.ndarray] = {}
    for key, array in maps.items():
        name, at, grid = key.partition("@")
        if name == SELF_KEY:
            if self_attention_keep < 1:
                parts = sparsify_rows(array, self_attention_keep)
                for part, prefix in zip(("bits", "values", "scales"), SPARSE_KEYS):
                    out[f"{prefix}@{grid}"] = parts[part]
            else:
                out[key] = np.asarray(array, np.float16)
        elif at:
            out[key] = np.asarray(array, np.float32)
        # a fused map (no '@') is left out: unpack recomputes it from the grids
    meta = {"size": list(size), "resolutions": sorted(int(r) for r in resolutions), "token_average": token_average}
    out[META_KEY] = np.array(json.dumps(meta))
    return out


def stored_keys(files: Iterable[str]) -> set[str]:
    """The logical keys a stored file provides (fused names included where only grids are stored)."""
    keys = set()
    for key in files:
        name, at, grid = key.partition("@")
        if name in SPARSE_KEYS:
            keys.add(f"{SELF_KEY}@{grid}")
        elif name != META_KEY:
            keys.add(key)
            if at and name != SELF_KEY:
                keys.add(name)
    return keys


def unpack(stored: Any, keys: Iterable[str] | None = None, fused: bool = True) -> dict[str, np.ndarray]:
    """The logical view (float32) of a stored file (an ``np.load`` result or a dict); only ``keys``
    (those it provides) when given: the self-attention matrix is the costly part to read. ``fused=False``
    leaves out the fused maps that would be recomputed from their grids (upsampling to the image size
    is most of a read when only the grids are needed)."""
    files = list(stored.files if hasattr(stored, "files") else stored)
    available = stored_keys(files)
    wanted = sorted(available) if keys is None else [k for k in keys if k in available]
    meta = json.loads(str(stored[META_KEY])) if META_KEY in files else None
    out: dict[str, np.ndarray] = {}
    for key in wanted:
        name, at, grid = key.partition("@")
        if key in files:
            out[key] = np.asarray(stored[key], np.float32)
        elif name == SELF_KEY:
            out[key] = densify_rows(*(stored[f"{prefix}@{grid}"] for prefix in SPARSE_KEYS))
        elif fused:  # a fused map, from its grids
            from .attention import fuse

            grids = {int(k.partition("@")[2]): stored[k] for k in files if k.partition("@")[0] == name and "@" in k}
            out[key] = fuse(grids, tuple(meta["size"]), meta["resolutions"], meta["token_average"])
    return out


__all__ = ["SELF_ATTENTION_KEEP", "densify_rows", "pack", "sparsify_rows", "stored_keys", "unpack"]
