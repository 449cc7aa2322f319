"""Refinement building blocks, each on a hand-checkable case: Otsu, per-class assignment, cleanup,
random walk against a dense reference, self-attention propagation, CRF marginals, AffinityNet."""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from diffumask.dataset import IGNORE_INDEX
from diffumask.errors import DiffumaskError
from diffumask.masks.adaptive import (best_gamma, gamma_range, mean_ious, pool_counts, raw_sweep, shortlisted_sweep,
                                      sweep)
from diffumask.masks.affinity import (AffinityConfig, AffinityNet, affinity_loss, affinity_mask, grid_labels,
                                      one_cycle, seed_labels, train_affinity_net, walked_maps)
from diffumask.masks.assign import assign_labels
from diffumask.masks.cleanup import cleanup_mask
from diffumask.masks.otsu import otsu_threshold
from diffumask.masks.threshold import threshold_masks
from diffumask.masks.propagate import (grid_affinity_matrix, half_disc_offsets, random_walk, self_attention_maps,
                                       transition_matrix)


def disc(size: int, cy: float, cx: float, r: float) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    return (y - cy) ** 2 + (x - cx) ** 2 <= r * r


def blurred(mask: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """A soft map like attention: the object blurred, max-normalised, on a raised floor."""
    soft = ndimage.gaussian_filter(mask.astype(np.float32), sigma)
    return 0.3 + 0.7 * soft / soft.max()


def scene(size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A red disc on a noisy grey background (like the shapes world) and its exact mask."""
    rng = np.random.default_rng(seed)
    truth = disc(size, size * 0.45, size * 0.55, size * 0.25)
    grey = rng.integers(90, 140, (size, size, 1)).repeat(3, axis=2)
    image = np.where(truth[..., None], np.array([220, 30, 30]), grey).astype(np.uint8)
    return image, truth


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


# ----------------------------------------------------------------------------- Otsu, assignment
def test_otsu_splits_a_two_level_map_at_the_object():
    truth = disc(40, 20, 18, 9)
    soft = np.where(truth, 0.8, 0.25) + np.random.default_rng(0).normal(0, 0.03, truth.shape)
    gamma = otsu_threshold(soft)
    assert 0.25 < gamma < 0.8
    np.testing.assert_array_equal(soft > gamma, truth)
    assert otsu_threshold(np.full((8, 8), 0.6)) == 1.0  # a flat map has no object


def test_assign_labels_per_class_thresholds_and_largest_margin():
    a = np.array([[0.7, 0.5, 0.5, 0.1]], np.float32)
    b = np.array([[0.8, 0.75, 0.2, 0.1]], np.float32)
    # a counts above 0.4, b above 0.6. Pixel 0: margins 0.3 vs 0.2 -> a, though b's value is
    # higher; pixel 1: margins 0.1 vs 0.15 -> b; pixel 2: only a passes; pixel 3: neither.
    np.testing.assert_array_equal(assign_labels({1: a, 2: b}, {1: 0.4, 2: 0.6}), [[1, 2, 1, 0]])
    # one shared threshold is the plain argmax against γ
    np.testing.assert_array_equal(assign_labels({1: a, 2: b}, 0.6), [[2, 2, 0, 0]])


# ----------------------------------------------------------------------------- cleanup
def test_cleanup_drops_specks_fills_small_holes_keeps_large_ones_and_other_classes():
    mask = np.zeros((20, 20), np.uint8)
    mask[2:8, 2:8] = 1
    mask[4, 4] = 0  # one-pixel hole: filled
    mask[0, 19] = 1  # one-pixel speck: dropped
    mask[10:19, 8:17] = 2
    mask[12:17, 10:15] = 0  # 25-pixel hole (6 % of the image): kept at max_hole 0.01
    mask[5:7, 5:7] = 3  # another class inside class 1: stays
    out = cleanup_mask(mask, min_area=2 / 400, max_hole=0.01)
    expected = mask.copy()
    expected[4, 4] = 1
    expected[0, 19] = 0
    np.testing.assert_array_equal(out, expected)
    assert cleanup_mask(mask, max_hole=1.0)[14, 12] == 2  # every hole filled
    ignored = np.full((4, 4), IGNORE_INDEX, np.uint8)
    np.testing.assert_array_equal(cleanup_mask(ignored, 0.5, 0.5), ignored)


# ----------------------------------------------------------------------------- random walk
def test_half_disc_offsets_cover_each_close_pair_once():
    radius = 4
    pairs = {(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
             if 0 < dy * dy + dx * dx < radius * radius}
    offsets = half_disc_offsets(radius)
    assert len(offsets) == len(set(offsets)) == len(pairs) // 2
    assert {(-dy, -dx) for dy, dx in offsets}.isdisjoint(offsets) and set(offsets) <= pairs


def test_random_walk_matches_dense_matrix_power():
    torch.manual_seed(0)
    features = torch.randn(3, 4, 5)
    radius, beta, steps = 3, 2.0, 7
    n = 20
    coords = [(y, x) for y in range(4) for x in range(5)]
    dense = np.zeros((n, n))
    for i, (yi, xi) in enumerate(coords):  # direct definition, pixel by pixel
        for j, (yj, xj) in enumerate(coords):
            if (yi - yj) ** 2 + (xi - xj) ** 2 < radius * radius:
                dense[i, j] = np.exp(-(features[:, yi, xi] - features[:, yj, xj]).abs().mean().item())
    sparse = grid_affinity_matrix(features, radius)
    np.testing.assert_allclose(sparse.toarray(), dense, rtol=1e-5)
    transition = dense ** beta / (dense ** beta).sum(axis=0, keepdims=True)
    np.testing.assert_allclose(transition_matrix(sparse, beta).toarray(), transition, rtol=1e-5)
    maps = np.random.default_rng(0).random((2, n))
    expected = maps @ np.linalg.matrix_power(transition, steps)
    np.testing.assert_allclose(random_walk(maps, transition_matrix(sparse, beta), steps), expected, rtol=1e-5)
    np.testing.assert_allclose(random_walk(maps, transition, steps), expected, rtol=1e-5)


def test_self_attention_propagation_recovers_the_object():
    """Pixels attend uniformly within their region (object or background): S·m averages the
    blurry cross-attention over each region, so the normalised result is the object exactly."""
    grid = 8
    truth = disc(grid, 3.5, 4, 2.6).ravel()
    same = truth[:, None] == truth[None, :]
    attention = same / same.sum(axis=1, keepdims=True)
    cross = blurred(disc(grid, 2.5, 3, 2.0), 1.5)  # off-centre, too small, blurred
    soft = {"dog": cross, "dog@8": cross, "__self__@8": attention.astype(np.float32)}
    refined = self_attention_maps(soft, ["dog"], None, (grid, grid), power=1)["dog"]
    np.testing.assert_allclose(refined.ravel(), truth.astype(np.float32), atol=1e-5)


def test_self_attention_walk_of_several_classes_is_each_maps_matrix_power_normalised():
    """All classes walk in one product per step, on numpy (a CPU) and in torch (an accelerator's path,
    run here on the CPU); each is the class's own map times the matrix power, min-max normalised."""
    from diffumask.masks.propagate import dense_walk, self_attention_walk

    rng = np.random.default_rng(1)
    attention = rng.random((36, 36)) ** 8  # rows mostly on a few pixels, so four steps do not flatten the maps
    attention = (attention / attention.sum(axis=1, keepdims=True)).astype(np.float32)
    cross = rng.random((3, 6, 6)).astype(np.float32)
    cross[2] = 0  # a map of zeros stays zeros, not a division by zero
    expected = []
    for m in cross:  # by hand, one class at a time: S^4 · m
        walked = np.linalg.matrix_power(attention.astype(np.float64), 4) @ m.ravel().astype(np.float64)
        span = walked.max() - walked.min()
        expected.append((walked - walked.min()) / span if span > 0 else np.zeros_like(walked))
    expected = np.stack(expected).reshape(cross.shape)
    np.testing.assert_allclose(self_attention_walk(cross, attention, 4, "cpu"), expected, atol=1e-5)
    maps = cross.reshape(3, -1)
    np.testing.assert_allclose(dense_walk(attention, maps, 4, "cpu"), random_walk(maps, attention.T, 4), rtol=1e-6)


# ----------------------------------------------------------------------------- CRF
def test_crf_labels_are_the_argmax_of_the_marginals():
    pytest.importorskip("pydensecrf")
    from diffumask.masks.crf import CRFParams, crf_marginals, crf_refine

    image = np.zeros((6, 6, 3), np.uint8)
    labels = np.zeros((6, 6), np.uint8)
    labels[:, 3:] = 7
    labels[0, 0] = IGNORE_INDEX
    no_pairwise = CRFParams(gt_prob=0.9, gaussian_compat=0, bilateral_compat=0)
    q = crf_marginals(image, labels, [0, 7], no_pairwise)
    np.testing.assert_allclose(q[:, 2, 1], [0.9, 0.1], atol=1e-5)  # label 0 is the likely one
    np.testing.assert_allclose(q[:, 0, 0], [0.5, 0.5], atol=1e-5)  # unsure pixel: uniform
    refined = crf_refine(image, labels, [0, 7], no_pairwise)
    assert refined[2, 1] == 0 and refined[2, 4] == 7  # argmax(1 - q) would swap them (the official bug)


def test_crf_matches_pydensecrf_called_directly_with_the_documented_parameters():
    """The documented defaults (CRFParams' docstring: the paper's §7 CRF) against pydensecrf's own
    DenseCRF2D, built here by hand: unary from labels, Gaussian sxy 3 / compat 3, bilateral sxy 80 /
    compat 10 at 512 px (scaled to the image), 10 iterations, label = most probable."""
    densecrf = pytest.importorskip("pydensecrf.densecrf")
    from pydensecrf.utils import unary_from_labels

    from diffumask.masks.crf import CRFParams, crf_refine

    rng = np.random.default_rng(3)
    size = 48
    image = np.zeros((size, size, 3), np.uint8)
    image[:, size // 2:] = (200, 60, 40)
    image = np.clip(image.astype(int) + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
    labels = np.zeros((size, size), np.uint8)
    labels[:, size // 2 - 4:] = 5  # a boundary four pixels off the colour edge
    labels[rng.random((size, size)) < 0.1] = 9  # speckles of a third label
    labels[10:14, 30:34] = IGNORE_INDEX
    params = CRFParams()
    assert (params.gaussian_sxy, params.gaussian_compat, params.bilateral_sxy, params.bilateral_compat,
            params.iterations, params.reference_size) == (3.0, 3.0, 80.0, 10.0, 10, 512)
    scale = size / 512
    crf = densecrf.DenseCRF2D(size, size, 3)
    index = np.select([labels == 0, labels == 5, labels == 9], [1, 2, 3], 0)  # 0 = unsure
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_labels(index, 3, gt_prob=params.gt_prob, zero_unsure=True)))
    crf.addPairwiseGaussian(sxy=3.0 * scale, compat=3.0)
    crf.addPairwiseBilateral(sxy=80.0 * scale, srgb=params.bilateral_srgb, rgbim=np.ascontiguousarray(image),
                             compat=10.0)
    expected = np.array([0, 5, 9], np.uint8)[np.array(crf.inference(10)).reshape(3, size, size).argmax(0)]
    refined = crf_refine(image, labels, [0, 5, 9], params)
    np.testing.assert_array_equal(refined, expected)
    assert (refined != labels).sum() > 20  # the pairwise terms did change labels, so the comparison is not vacuous


def test_crf_snaps_stray_labels_to_colour_regions():
    pytest.importorskip("pydensecrf")
    from diffumask.masks.crf import CRFParams, crf_refine

    image = np.zeros((16, 16, 3), np.uint8)
    image[:, 8:] = 200
    labels = np.zeros((16, 16), np.uint8)
    labels[:, 8:] = 1
    labels[3, 2] = 1
    labels[12, 13] = 0
    labels[5:8, 8:11] = IGNORE_INDEX
    expected = np.zeros((16, 16), np.uint8)
    expected[:, 8:] = 1
    np.testing.assert_array_equal(crf_refine(image, labels, [0, 1], CRFParams(reference_size=16)), expected)


@pytest.mark.parametrize("size", [(128, 128), (135, 91)])
def test_a_shrunk_crf_keeps_thin_objects(size):
    """Bars 2-3 px wide, at half size: the guided filter's coefficients on the CRF's own grid keep every
    pixel (subsampled twice as coarse, they lost half the bars' pixels: IoU 0.49). At a size the shrink
    factor (2.1) does not divide, the filter still comes back at the image's size, and only the bars' tips
    move (IoU ≥ 0.9)."""
    pytest.importorskip("pydensecrf")
    from scipy import ndimage

    from diffumask.masks.crf import CRFParams, DenseCRF, crf_refine

    h, w = size
    rng = np.random.default_rng(0)
    image = np.full((h, w, 3), 60, np.uint8)
    truth = np.zeros((h, w), bool)
    for x, width in ((13, 2), (30, 2), (47, 3), (66, 2), (85, 3), (101, 2)):
        truth[8:h - 8, x:x + width] = True
    image[truth] = (220, 200, 40)
    image = np.clip(image.astype(int) + rng.integers(-10, 10, image.shape), 0, 255).astype(np.uint8)
    labels = np.where(ndimage.binary_dilation(truth, iterations=2), IGNORE_INDEX, 0).astype(np.uint8)
    labels[truth] = 2
    full = crf_refine(image, labels, [0, 2], CRFParams(reference_size=max(h, w), max_size=None))
    shrunk = DenseCRF(image, [0, 2], CRFParams(reference_size=max(h, w), max_size=64))
    assert max(shrunk.grid) == 64
    np.testing.assert_array_equal(full == 2, truth)
    bars = shrunk(labels) == 2
    if size == (128, 128):
        np.testing.assert_array_equal(bars, truth)
    else:
        assert bars.shape == truth.shape and (bars & truth).sum() / (bars | truth).sum() >= 0.9


def test_a_crf_on_a_shrunk_image_puts_its_edges_back_on_the_image_edges():
    """--crf-max-size: the CRF runs on a half-size copy and its marginals come back at full size through
    a guided filter, so the edge lands on the colour edge, as the full-size CRF puts it, not a pixel or
    two off. At least the image's size, or None (--crf-max-size 0), it is the full-size CRF exactly, and
    manifests record the full size as they did before the option existed."""
    pytest.importorskip("pydensecrf")
    from dataclasses import replace

    from diffumask.masks.crf import CRFParams, DenseCRF, crf_refine

    size = 64
    rng = np.random.default_rng(0)
    image = np.full((size, size, 3), 40, np.uint8)
    image[:, 31:] = (200, 60, 40)  # an edge between two grid cells of the half-size copy
    image = np.clip(image.astype(int) + rng.integers(-15, 15, image.shape), 0, 255).astype(np.uint8)
    labels = np.zeros((size, size), np.uint8)
    labels[:, 25:] = 3  # six pixels off the colour edge
    labels[:, 23:31] = IGNORE_INDEX
    params = CRFParams(reference_size=size, max_size=None)
    full = crf_refine(image, labels, [0, 3], params)
    assert (full[:, :31] == 0).all() and (full[:, 31:] == 3).all()
    shrunk = DenseCRF(image, [0, 3], replace(params, max_size=32))
    marginals = shrunk.marginals(labels)
    assert shrunk.grid == (32, 32) and marginals.shape == (2, size, size)
    np.testing.assert_allclose(marginals.sum(axis=0), 1, atol=1e-5)
    np.testing.assert_array_equal(shrunk(labels), full)
    np.testing.assert_array_equal(crf_refine(image, labels, [0, 3], replace(params, max_size=size)), full)
    assert "max_size" not in params.as_dict() and "upsampling" not in params.as_dict()
    assert replace(params, max_size=32).as_dict()["max_size"] == 32
    assert CRFParams().max_size == 256 and CRFParams().as_dict()["upsampling"] == "guided"


@pytest.mark.parametrize("labels", [2, 3])
def test_the_shrunk_crfs_upsampling_is_the_guided_filter_of_every_channel(labels):
    """One channel fewer is filtered (the last is one minus the others): the same marginals as kornia's guided
    filter run on every channel, clamped and renormalised, at a size the shrink factor does not divide."""
    from kornia.filters import guided_blur

    from diffumask.masks.crf import GUIDED_EPS, CRFParams, DenseCRF

    image, _ = crf_scene(height=70, width=91)
    crf = DenseCRF(image, list(range(labels)), CRFParams(reference_size=91, max_size=40), device="cpu")
    factor = round(91 / max(crf.grid))
    q = torch.softmax(torch.randn(labels, *crf.grid, generator=torch.Generator().manual_seed(0)) * 3, dim=0)
    full = F.interpolate(q[None], size=(70, 91), mode="bilinear", align_corners=False)
    guide = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    expected = guided_blur(guide, full, 4 * factor + 1, GUIDED_EPS, subsample=factor)[0].clamp(0, 1)
    expected = expected / expected.sum(dim=0, keepdim=True)
    torch.testing.assert_close(crf._upsample(q), expected, atol=1e-5, rtol=0)


def crf_scene(height: int = 40, width: int = 52, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """A two-colour image with noise and a label map off its edges, with speckles of a third label and 255s."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.uint8)
    image[:, width // 2:] = (200, 60, 40)
    image[height // 3: height // 2, 5:15] = (30, 160, 220)
    image = np.clip(image.astype(int) + rng.integers(-25, 25, image.shape), 0, 255).astype(np.uint8)
    labels = np.zeros((height, width), np.uint8)
    labels[:, width // 2 - 5:] = 5
    labels[rng.random((height, width)) < 0.1] = 9
    labels[10:14, 30:34] = IGNORE_INDEX
    return image, labels


@pytest.mark.parametrize("max_size", [None, 24])
def test_the_torch_crf_matches_pydensecrf(max_size):
    """The mean field in torch (on the GPU in refine) against pydensecrf's, at full size and shrunk."""
    pytest.importorskip("pydensecrf")
    from diffumask.masks.crf import CRFParams, DenseCRF

    image, labels = crf_scene()
    params = CRFParams(reference_size=52, max_size=max_size)
    reference, ours = DenseCRF(image, [0, 5, 9], params), DenseCRF(image, [0, 5, 9], params, device="cpu")
    assert reference.device is None and ours.device == torch.device("cpu")
    np.testing.assert_allclose(ours.marginals(labels), reference.marginals(labels), atol=1e-4)
    refined = ours(labels)
    np.testing.assert_array_equal(refined, reference(labels))
    assert (refined != labels).sum() > 50  # the pairwise terms changed labels: the comparison is not vacuous


def test_label_unary_matches_pydensecrfs():
    pytest.importorskip("pydensecrf")
    from pydensecrf.utils import unary_from_labels

    from diffumask.masks.crf import label_unary

    index = np.random.default_rng(1).integers(0, 4, (7, 9))  # 0 = unsure, k = channel k − 1
    expected = unary_from_labels(index, 3, gt_prob=0.8, zero_unsure=True)
    np.testing.assert_allclose(label_unary(torch.from_numpy(index), 3, 0.8).numpy(), expected, rtol=1e-6)


def test_the_lattice_filter_is_a_gaussian_blur():
    """Against the exact Gaussian sum, Σ_j exp(−|f_i − f_j|²/2) v_j, normalised the same way, on 2-D features
    (the CRF's spatial kernel); the lattice approximates it within a few per cent."""
    from diffumask.masks.permutohedral import PermutohedralFilter

    generator = torch.Generator().manual_seed(0)
    features, values = torch.rand(300, 2, generator=generator) * 6, torch.rand(300, 3, generator=generator)
    kernel = torch.exp(-torch.cdist(features, features) ** 2 / 2)
    norm = kernel.sum(1, keepdim=True).rsqrt()
    exact = norm * (kernel @ (norm * values))
    assert ((PermutohedralFilter(features)(values) - exact).abs() / exact).max() < 0.1


def test_without_pydensecrf_the_crf_runs_in_torch(monkeypatch):
    """The crf extra only makes a CPU's CRF faster: without it, the same labels come from torch."""
    pytest.importorskip("pydensecrf")
    from diffumask.masks.crf import CRFParams, crf_refine, pydensecrf_installed

    image, labels = crf_scene()
    params = CRFParams(reference_size=52)
    expected = crf_refine(image, labels, [0, 5, 9], params)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    assert not pydensecrf_installed()
    np.testing.assert_array_equal(crf_refine(image, labels, [0, 5, 9], params), expected)


# ----------------------------------------------------------------------------- adaptive γ
def test_sweep_picks_the_gamma_that_matches_the_reference():
    image, truth = scene()
    soft = blurred(truth, 1.0)
    gammas = gamma_range(0.3, 0.9, 0.05)
    assert len(gammas) == 13 and gammas[-1] == 0.9
    reference = assign_labels({4: soft}, 0.6)
    counts, _ = raw_sweep({4: soft}, reference, gammas)
    assert best_gamma(counts, gammas) == 0.6
    assert best_gamma({4: [(0, 5)] * 13}, gammas) is None  # nothing matches: no γ
    pooled = pool_counts([{4: [(1, 2), (3, 4)]}, {4: [(1, 1), (0, 4)], 5: [(2, 2), (0, 1)]}], 2)
    assert pooled == {4: [(2, 3), (3, 8)], 5: [(2, 2), (0, 1)]}


def test_raw_sweep_counts_equal_each_gammas_own_mask():
    """The one-pass counts against each γ's mask counted directly: three classes, γ in any order, values
    exactly at a γ (compared in float32, strictly), a reference with a class the maps miss."""
    rng = np.random.default_rng(3)
    maps = {label: rng.random((40, 56)).astype(np.float32) for label in (2, 5, 7)}
    gammas = (0.55, 0.3, 0.7, 0.5, 0.45, 0.9, 0.5)
    maps[5][:4, :4] = np.float32(0.7)  # on the threshold: not above it
    maps[2][:4, :4] = maps[7][:4, :4] = 0
    reference = rng.choice(np.array([0, 2, 5, 7, 9], np.uint8), size=(40, 56))
    counts, sizes = raw_sweep(maps, reference, gammas)
    for k, gamma in enumerate(gammas):
        mask = threshold_masks(maps, gamma)
        assert sizes[k] == int((mask > 0).sum())
        for label in maps:
            mine, truth = mask == label, reference == label
            assert counts[label][k] == (int((mine & truth).sum()), int((mine | truth).sum()))
    assert sizes[gammas.index(0.5)] == sizes[-1] and len(set(sizes)) == len(set(gammas))


def test_mean_iou_per_gamma_averages_classes():
    counts = {1: [(1, 2), (0, 0)], 2: [(3, 3), (0, 4)]}
    np.testing.assert_allclose(mean_ious(counts, 2), [0.75, 0.0])


def test_shortlist_crf_refines_only_the_best_raw_candidates():
    pytest.importorskip("pydensecrf")
    from diffumask.masks.crf import CRFParams, DenseCRF

    image, truth = scene()
    maps = {4: blurred(truth, 1.5)}
    gammas = gamma_range(0.3, 0.9, 0.05)
    reference = assign_labels(maps, 0.6)
    crf = CRFParams(reference_size=32)
    raw_counts, _ = raw_sweep(maps, reference, gammas)
    raw = [assign_labels(maps, gamma) for gamma in gammas]
    tried, counts, candidates = shortlisted_sweep(image, maps, reference, gammas, crf, 2)
    ranked = mean_ious(raw_counts, len(gammas))
    assert len(tried) == 2 and 0.6 in tried  # the exact match is the best raw candidate
    kept = {raw[gammas.index(g)].tobytes() for g in tried}
    assert len(kept) == 2  # two distinct raw masks, and no other raw mask scores better
    worst_kept = min(ranked[gammas.index(g)] for g in tried)
    assert all(ranked[k] <= worst_kept for k in range(len(gammas)) if raw[k].tobytes() not in kept)
    dense = DenseCRF(image, [0, 4], crf)
    for gamma, candidate in zip(tried, candidates):
        np.testing.assert_array_equal(candidate, dense(assign_labels(maps, gamma)))
    # A shortlist as long as the sweep chooses what the exhaustive sweep chooses; 0 or no CRF is the sweep.
    full_counts, full = sweep(image, maps, reference, gammas, crf)
    tried_all, counts_all, _ = shortlisted_sweep(image, maps, reference, gammas, crf, len(gammas))
    assert best_gamma(counts_all, tried_all) == best_gamma(full_counts, gammas)
    for shortlist, params in ((0, crf), (3, None)):
        every, every_counts, refined = shortlisted_sweep(image, maps, reference, gammas, params, shortlist)
        assert every == list(gammas)
        assert every_counts == (full_counts if params else raw_counts)
        assert (refined is None) == (params is None)


# ----------------------------------------------------------------------------- AffinityNet
def test_seeds_are_sure_inside_and_far_outside_unsure_between():
    image, truth = scene()
    seeds = seed_labels(image, {3: blurred(truth)}, crf=None)
    assert set(np.unique(seeds)) == {0, 3, IGNORE_INDEX}
    assert truth[seeds == 3].all() and not truth[seeds == 0].any()
    assert (seeds == IGNORE_INDEX).any()
    cells = np.array([[1, 1, 0, 0], [1, 1, 0, 2]], np.uint8)
    np.testing.assert_array_equal(grid_labels(cells, 2), [[1, IGNORE_INDEX]])


def test_seed_grid_vote_takes_each_cells_most_frequent_label():
    """PSA's rule (pooled scores, argmax) on label seeds: the majority, ties to the lower label."""
    cells = np.array([[1, 1, 0, 0, 3, 3],
                      [1, 2, 0, 255, 255, 255]], np.uint8)
    np.testing.assert_array_equal(grid_labels(cells, 2, "vote"), [[1, 0, 3]])
    np.testing.assert_array_equal(grid_labels(cells, 2, "unanimous"), [[255, 255, 255]])
    with pytest.raises(DiffumaskError, match="unknown seed grid rule"):
        grid_labels(cells, 2, "mean")


def test_affinity_loss_rewards_same_label_pairs_and_punishes_different_ones():
    labels = torch.tensor([[[0, 0, 1, 1]]])
    constant = torch.zeros(1, 2, 1, 4)  # every affinity is 1
    split = torch.tensor([[[[0.0, 0, 50, 50]], [[0, 0, 50, 50]]]])  # affinity 1 within, ~0 across
    assert affinity_loss(split, labels, radius=2) < 1e-3
    assert affinity_loss(constant, labels, radius=2) > 5  # -log(1e-5) / 2 for the negative pairs


def test_affinity_net_learns_object_boundaries_from_seeds():
    """Trained on seeds of a few scenes, its random walk pulls a blurred, shifted soft map onto
    the object: the walked map is flat inside the object and low outside, and its mask beats
    the soft map's best threshold by a clear margin."""
    config = AffinityConfig(width=16, blocks=2, feature_dim=16, train_steps=60, batch_size=4, lr=1e-2,
                            walk_steps=32, background=0.5)
    scenes = [scene(seed=s) for s in range(4)]
    seeds = [grid_labels(seed_labels(img, {1: blurred(t, 1.0)}, config, crf=None), 1) for img, t in scenes]
    net = train_affinity_net(AffinityNet(1, config.width, config.feature_dim, config.blocks),
                             lambda i: scenes[i][0], seeds, config)
    image, truth = scene(seed=9)
    soft = blurred(np.roll(truth, 2, axis=1), 3.0)
    raw_best = max(iou(soft > g, truth) for g in np.arange(0.3, 0.95, 0.05))
    walked = walked_maps(net, image, {1: soft}, config)[1]
    interior = ndimage.binary_erosion(truth, iterations=2)
    far = ~ndimage.binary_dilation(truth, iterations=3)
    assert walked[interior].min() > 0.6 and walked[far].max() < 0.3
    refined = affinity_mask(net, image, {1: soft}, config) == 1
    assert iou(refined, truth) > raw_best + 0.05


def test_affinity_training_runs_at_every_short_length():
    """Eight epochs of 19 or 20 images are 10 steps, where torch's one-cycle schedule with a 10 % warm-up
    divides by zero; every length warms up, peaks at the rate asked and ends near zero."""
    config = AffinityConfig(width=4, blocks=1, feature_dim=4, batch_size=1, crop=8, lr=1e-2)
    image, truth = scene(seed=0)
    seeds = [grid_labels(truth.astype(np.uint8), 1)]
    for steps in range(1, 26):
        net = train_affinity_net(AffinityNet(1, config.width, config.feature_dim, config.blocks), lambda i: image,
                                 seeds, replace(config, train_steps=steps))
        assert all(torch.isfinite(p).all() for p in net.parameters())
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    for steps in (1, 2, 10, 19, 20, 300):
        schedule = one_cycle(optimizer, 0.5, steps)
        rates = []
        for _ in range(steps):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        assert max(rates) == pytest.approx(0.5, rel=1e-6) or steps < 3, (steps, rates)  # peaks at the rate asked
        assert rates[0] < max(rates) and rates[-1] < max(rates) or steps < 3, (steps, rates)  # warms up, decays


def test_affinity_net_works_on_a_feature_grid_for_large_images():
    """Stable Diffusion-sized images run at a coarser stride (8 at 512 px: a 64×64 grid)."""
    config = AffinityConfig(width=8, blocks=1, feature_dim=8)
    assert [config.grid_stride((s, s)) for s in (32, 64, 128, 256, 512, 1024)] == [1, 1, 2, 4, 8, 8]
    net = AffinityNet(config.grid_stride((256, 200)), config.width, config.feature_dim, config.blocks)
    image = np.random.default_rng(0).integers(0, 255, (256, 200, 3), dtype=np.uint8)
    soft = blurred(disc(256, 120, 100, 50)[:, :200], 8.0)
    walked = walked_maps(net, image, {1: soft}, config)[1]
    assert walked.shape == (256, 200) and 0 <= walked.min() and walked.max() <= 1 + 1e-6
    assert affinity_mask(net, image, {1: soft}, config).shape == (256, 200)
