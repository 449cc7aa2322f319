"""The compact soft-map format: fused maps recomputed exactly, sparse self-attention against a
row-by-row reference, old files read as they are, and a 512 px item within 0.5 MB."""

from __future__ import annotations

import io

import numpy as np
import pytest

from diffumask.dataset import Dataset
from diffumask.generate import GenerateConfig, generate_dataset, generate_images
from diffumask.masks import threshold_masks
from diffumask.softmaps import SELF_ATTENTION_KEEP, densify_rows, pack, sparsify_rows, unpack


def row_stochastic(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    matrix = rng.random((n, n)) ** 8  # peaked rows, no ties
    return (matrix / matrix.sum(1, keepdims=True)).astype(np.float32)


def test_sparse_rows_against_a_row_by_row_reference():
    matrix = row_stochastic(64)
    keep = 0.125
    restored = densify_rows(**sparsify_rows(matrix, keep))
    for row, got in zip(matrix, restored):
        top = np.argsort(-row)[:8]  # ceil(0.125 * 64) largest, by a full sort
        expected = np.zeros_like(row)
        expected[top] = row[top]
        expected /= expected.sum()
        assert set(np.flatnonzero(got)) <= set(top)
        # 8-bit values relative to the row's peak: each off by at most half a step of the peak
        np.testing.assert_allclose(got, expected, atol=expected.max() / 255 + 1e-3)
        assert got.sum() == pytest.approx(1.0, abs=1e-5)


def test_generated_soft_maps_read_back_as_generate_used_them(tmp_path, sd1_pipe):
    config = GenerateConfig(classes=["dog", "sofa"], out=str(tmp_path / "d"), images_per_class=1, model="tiny-sd1",
                            steps=2, batch_size=1, prompts="voc", threshold=0.6, compose=1)
    dataset = generate_dataset(config, pipe=sd1_pipe, progress=False)
    record = next(r for r in dataset.records() if len(r["classes"]) == 2)
    again = generate_images(sd1_pipe, [record["prompt"]], [record["classes"]], [record["seed"]], steps=2,
                            threshold=0.6, self_attention=2)[0]
    soft = dataset.read_soft_maps(record["id"])
    for name in record["classes"]:
        np.testing.assert_array_equal(soft[name], again.maps[name])  # recomputed bit for bit
    labels = {dataset.class_index(n): soft[n] for n in record["classes"]}
    np.testing.assert_array_equal(threshold_masks(labels, 0.6), dataset.read_mask(record["id"]))
    assert soft["__self__@8"].shape == (64, 64)
    np.testing.assert_allclose(soft["__self__@8"].sum(1), 1.0, atol=1e-5)
    with np.load(dataset.soft_maps_path(record["id"])) as stored:
        assert "dog" not in stored.files and "__self__@8" not in stored.files  # neither is stored
    assert set(dataset.read_soft_maps(record["id"], ["dog"])) == {"dog"}
    grids_only = dataset.read_soft_maps(record["id"], fused=False)  # what propagate reads: no upsampling
    assert set(grids_only) == set(soft) - set(record["classes"])
    for key, value in grids_only.items():
        np.testing.assert_array_equal(value, soft[key])


def test_files_of_earlier_versions_read_as_they_are(tmp_path):
    Dataset.create(tmp_path, ["dog"], {})
    dataset = Dataset(tmp_path)
    fused, self_attention = np.random.default_rng(1).random((8, 8)), row_stochastic(16)
    dataset.write_item("old", np.zeros((8, 8, 3), np.uint8), {"classes": ["dog"]},
                       soft_maps={"dog": fused, "dog@4": fused[::2, ::2], "__self__@4": self_attention})
    soft = dataset.read_soft_maps("old")
    np.testing.assert_array_equal(soft["dog"], fused.astype(np.float16).astype(np.float32))
    assert set(dataset.read_soft_maps("old", fused=False)) == set(soft)  # a stored fused map is read as it is
    np.testing.assert_array_equal(soft["__self__@4"], self_attention.astype(np.float16).astype(np.float32))


def test_a_512px_item_fits_half_a_megabyte():
    """Two one-token classes at 512 px (grids 64, 32, 16, 8) and a 32x32 self-attention matrix with the
    default settings, compressed as the dataset writes it; random rows are the worst case for zlib."""
    rng = np.random.default_rng(0)
    logical = {f"{name}@{h}": rng.random((h, h)).astype(np.float32) for name in ("dog", "sofa") for h in (64, 32, 16, 8)}
    logical["__self__@32"] = row_stochastic(1024)
    stored = pack(logical, (512, 512), (16, 32, 64), self_attention_keep=SELF_ATTENTION_KEEP)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **stored)
    assert buffer.tell() <= 500_000, buffer.tell()
    dense = pack(logical, (512, 512), (16, 32, 64), self_attention_keep=1)
    dense_buffer = io.BytesIO()
    np.savez_compressed(dense_buffer, **dense)
    assert dense_buffer.tell() > 1_500_000  # what the matrix alone cost before
    buffer.seek(0)
    with np.load(buffer) as data:
        assert unpack(data, ["dog"])["dog"].shape == (512, 512)
        grids_only = unpack(data, fused=False)  # what propagate reads: the grids and the matrix, nothing upsampled
        assert set(grids_only) == set(logical) and grids_only["dog@8"].shape == (8, 8)


def test_an_items_size_is_height_then_width_from_the_manifest_else_the_image(tmp_path):
    from diffumask.refine_items import Item

    Dataset.create(tmp_path, ["dog"], {})
    dataset = Dataset(tmp_path)
    dataset.write_item("wide", np.zeros((24, 40, 3), np.uint8), {"classes": ["dog"], "size": [24, 40]})
    dataset.write_item("plain", np.zeros((24, 40, 3), np.uint8), {"classes": ["dog"]})
    records = {r["id"]: r for r in dataset.records()}
    assert Item(dataset, records["wide"]).size() == (24, 40) == Item(dataset, records["plain"]).size()
