"""The paper's adaptive threshold (§7, Fig. 3): the γ whose mask best agrees with AffinityNet's.

For each γ of a sweep (default 0.35 … 0.54), the soft maps are thresholded and, by default,
CRF-refined; the candidate is scored per class by IoU against the AffinityNet mask B̂. Per
image, the best-scoring γ wins. Per class, the intersections and unions are pooled over that
class's images first — the class's IoU-vs-γ curve — and the curve's best γ is used for all of
them.

The CRF is most of the cost: one inference per distinct candidate, 10–20 per image. A
*shortlist* of k keeps the choice nearly the same for a fraction of it: every candidate is first
scored raw against B̂ (cheap: :func:`raw_sweep` counts all γ from one pass over the pixels), and only
the k distinct raw masks that agree best are CRF-refined and compete. The per-class curves are then
pooled from the raw scores and the chosen mask alone is CRF-refined.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .assign import assign_labels
from .crf import CRFParams, DenseCRF
from .threshold import PAPER_THRESHOLD, threshold_sweep, winners



def sweep_around(threshold: float) -> tuple[float, ...]:
    """The paper's sweep moved to another model's γ: γ − 0.05 … γ + 0.14 in steps of 0.01.

    The paper sweeps 0.35 … 0.54 around Stable Diffusion's fixed γ 0.4; a model whose fused maps
    want another γ (the shapes model's is 0.6) needs the same bracket around its own.
    """
    return tuple(round(threshold - 0.05 + 0.01 * k, 6) for k in range(20))  # 6 places: 0.355's stays 20 values


DEFAULT_GAMMAS: tuple[float, ...] = sweep_around(PAPER_THRESHOLD)


def gamma_range(start: float, stop: float, step: float) -> tuple[float, ...]:
    """γ values from ``start`` to ``stop`` inclusive, rounded so that 0.35 + 19·0.01 is 0.54."""
    count = int(round((stop - start) / step)) + 1
    if count < 1 or step <= 0:
        raise ValueError(f"empty γ sweep {start}..{stop} step {step}")
    return tuple(round(start + step * k, 6) for k in range(count))


def candidate_mask(image: np.ndarray, maps: Mapping[int, np.ndarray], thresholds: Mapping[int, float] | float,
                   crf: CRFParams | DenseCRF | None) -> np.ndarray:
    """Threshold the maps (one γ, or one per class) and optionally CRF-refine the result."""
    mask = assign_labels(maps, thresholds)
    if crf is None:
        return mask
    return (crf if isinstance(crf, DenseCRF) else DenseCRF(image, [0, *maps], crf))(mask)


Counts = dict[int, list[tuple[int, int]]]


def raw_sweep(maps: Mapping[int, np.ndarray], reference: np.ndarray,
              gammas: Sequence[float]) -> tuple[Counts, list[int]]:
    """Per class, each γ's (|B_γ ∩ B̂|, |B_γ ∪ B̂|) for the raw candidates B_γ = ``threshold_masks(maps, γ)``,
    and each candidate's foreground pixel count: one image's contribution to the IoU-vs-γ curves.

    One pass over the pixels instead of one per γ: a pixel is in B_γ iff its winning value exceeds γ, so
    binning each pixel by how many γ lie below its value gives every γ's counts as suffix sums. The
    candidates are nested (a larger γ keeps a subset), so two γ give the same mask exactly when their
    foreground counts are equal (the maps' labels are classes, never background's 0).
    """
    winner, value = winners(maps)
    order = np.argsort(np.asarray(gammas, np.float32), kind="stable")
    ascending = np.asarray(gammas, np.float32)[order]  # compared in float32, as threshold_masks compares
    below = np.searchsorted(ascending, value.ravel(), side="left")  # how many γ each pixel's value exceeds
    bins = len(gammas) + 1

    def above(selected: np.ndarray | None) -> list[int]:
        """Per γ (in the caller's order), how many of the ``selected`` pixels (all: None) exceed it."""
        histogram = np.bincount(below if selected is None else below[selected], minlength=bins)
        exceeding = np.cumsum(histogram[::-1])[::-1][1:]  # exceeding[j]: pixels above the j-th smallest γ
        out = np.empty(len(gammas), np.int64)
        out[order] = exceeding
        return out.tolist()

    winners_flat, reference_flat = winner.ravel(), np.asarray(reference).ravel()
    counts: Counts = {}
    for label in maps:
        mine = winners_flat == label
        truth = reference_flat == label
        inside, areas, truth_area = above(mine & truth), above(mine), int(truth.sum())
        counts[label] = [(i, a + truth_area - i) for i, a in zip(inside, areas)]
    return counts, above(None)


def sweep(image: np.ndarray, maps: Mapping[int, np.ndarray], reference: np.ndarray, gammas: Sequence[float],
          crf: CRFParams | DenseCRF) -> tuple[Counts, list[np.ndarray]]:
    """Every γ's CRF-refined candidate and, per class, its (|B_γ ∩ B̂|, |B_γ ∪ B̂|) against ``reference``
    (:func:`raw_sweep` for the raw candidates)."""
    dense = crf if isinstance(crf, DenseCRF) else DenseCRF(image, [0, *maps], crf)
    seen: dict[bytes, tuple[np.ndarray, list[tuple[int, int]]]] = {}  # neighbouring γ often give one mask
    truth = {label: reference == label for label in maps}
    counts: Counts = {label: [] for label in maps}
    candidates = []
    for mask in threshold_sweep(maps, gammas):
        key = mask.tobytes()
        if key not in seen:
            candidate = dense(mask)
            mine = {label: candidate == label for label in truth}
            seen[key] = candidate, [(int((mine[label] & b).sum()), int((mine[label] | b).sum()))
                                    for label, b in truth.items()]
        candidate, pairs = seen[key]
        candidates.append(candidate)
        for label, pair in zip(truth, pairs):
            counts[label].append(pair)
    return counts, candidates


def mean_ious(counts: Mapping[int, Sequence[tuple[int, int]]], n_gammas: int) -> np.ndarray:
    """Each γ's IoU against the reference, averaged over classes (0 for a class absent from both)."""
    scores = np.zeros(n_gammas)
    for pairs in counts.values():
        scores += np.array([i / u if u else 0.0 for i, u in pairs])
    return scores / max(len(counts), 1)


def shortlisted_sweep(image: np.ndarray, maps: Mapping[int, np.ndarray], reference: np.ndarray,
                      gammas: Sequence[float], crf: CRFParams | DenseCRF | None,
                      shortlist: int) -> tuple[list[float], Counts, list[np.ndarray] | None]:
    """The γ tried, their counts and their CRF-refined candidates: every γ raw (no candidates: each is
    ``threshold_masks(maps, γ)``) without a CRF; every γ refined with ``shortlist`` 0 (the paper's
    exhaustive sweep); else only the γ of the ``shortlist`` best distinct raw candidates, refined.
    """
    if crf is None:
        return list(gammas), raw_sweep(maps, reference, gammas)[0], None
    if shortlist <= 0:
        return list(gammas), *sweep(image, maps, reference, gammas, crf)
    counts, sizes = raw_sweep(maps, reference, gammas)
    scores = mean_ious(counts, len(gammas))
    kept: dict[int, float] = {}  # distinct raw mask (its foreground count) → its first γ, best raw score first
    for k in np.argsort(-scores, kind="stable"):
        kept.setdefault(sizes[k], gammas[k])
        if len(kept) == shortlist:
            break
    chosen = sorted(kept.values())
    return chosen, *sweep(image, maps, reference, chosen, crf)


def best_gamma(counts: Mapping[int, Sequence[tuple[int, int]]], gammas: Sequence[float]) -> float | None:
    """The γ maximising the mean IoU over classes (first γ on ties); None when every IoU is zero."""
    scores = mean_ious(counts, len(gammas))
    if not scores.any():
        return None
    return float(gammas[int(scores.argmax())])


def pool_counts(per_image: Sequence[Mapping[int, Sequence[tuple[int, int]]]], n_gammas: int) -> dict[int, list[tuple[int, int]]]:
    """Sum each class's (intersection, union) per γ over images: the class's IoU-vs-γ curve."""
    pooled: dict[int, np.ndarray] = {}
    for counts in per_image:
        for label, pairs in counts.items():
            pooled.setdefault(label, np.zeros((n_gammas, 2), np.int64))
            pooled[label] += np.asarray(pairs, np.int64)
    return {label: [tuple(map(int, row)) for row in table] for label, table in pooled.items()}
