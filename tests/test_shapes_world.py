"""The shapes world: exact masks, deterministic scenes, captions, disjoint exported splits."""

from __future__ import annotations

import numpy as np
import pytest

from diffumask.shapes import CLASSES, PALETTE, render_scene
from diffumask.shapes.model import build_tokenizer
from diffumask.shapes.world import draw_shape, export_world, split_seeds


@pytest.mark.parametrize("seed", range(40))
def test_mask_matches_drawing_exactly(seed: int) -> None:
    scene = render_scene(seed)
    grey = (scene.image[..., 0] == scene.image[..., 1]) & (scene.image[..., 1] == scene.image[..., 2])
    assert np.array_equal(scene.mask == 0, grey)  # background exactly where the mask says 0
    for (shape, colour), visible in zip(scene.objects, scene.instance_masks):
        drawn = np.all(scene.image == PALETTE[colour], axis=2)
        assert np.array_equal(drawn, visible)  # the object's colour exactly on its visible pixels
        assert np.all(scene.mask[visible] == 1 + CLASSES.index(shape))
        assert visible.sum() >= 8


def test_later_objects_occlude_earlier_ones() -> None:
    for seed in range(300):
        scene = render_scene(seed, num_objects=3)
        masks = scene.instance_masks
        assert not np.any(masks[0] & masks[1]) and not np.any(masks[1] & masks[2])
        assert sum(m.sum() for m in masks) == (scene.mask > 0).sum()


def test_scenes_are_deterministic_and_varied() -> None:
    a, b = render_scene(123), render_scene(123)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.caption == b.caption
    assert not np.array_equal(render_scene(124).image, a.image)
    counts = {len(render_scene(s).objects) for s in range(100)}
    assert counts == {1, 2, 3}


def test_shapes_have_their_geometry() -> None:
    circle = draw_shape("circle", 64, 32, 32, 20, 0.0)
    assert abs(circle.sum() - np.pi * 20**2) < 0.03 * np.pi * 20**2
    ring = draw_shape("ring", 64, 32, 32, 20, 0.0)
    assert not ring[32, 32] and ring[32, 32 + 15]
    cross = draw_shape("cross", 64, 32, 32, 20, 0.0)
    assert cross[32, 50] and not cross[50, 50]
    star = draw_shape("star", 64, 32, 32, 20, 0.0)
    assert star[32, 32] and star.sum() < 0.5 * circle.sum()
    square = draw_shape("square", 64, 32, 32, 20, np.pi / 2)
    assert np.array_equal(square, draw_shape("square", 64, 32, 32, 20, 0.0))


def test_captions_name_every_object_and_tokenize_word_by_word() -> None:
    tokenizer = build_tokenizer()
    for seed in range(50):
        scene = render_scene(seed)
        for shape, colour in scene.objects:
            assert f"{colour} {shape}" in scene.caption
        assert scene.caption.endswith(f"on a {scene.texture} background")
        ids = tokenizer(scene.caption, add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in ids
        assert len(ids) == len(scene.caption.replace(",", " ,").split())
        padded = tokenizer(scene.caption, padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids
        assert padded.shape == (1, tokenizer.model_max_length)
        assert padded[0, 0] == tokenizer.bos_token_id and padded[0, len(ids) + 1] == tokenizer.eos_token_id


def test_export_splits_are_disjoint_and_deterministic(tmp_path) -> None:
    from diffumask.dataset import Dataset

    export_world(tmp_path / "a", 6, 3, 3, seed=5)
    export_world(tmp_path / "b", 6, 3, 3, seed=5)
    a, b = Dataset(tmp_path / "a"), Dataset(tmp_path / "b")
    ids = {split: a.split_ids(split) for split in ("train", "val", "test")}
    assert [len(ids[s]) for s in ("train", "val", "test")] == [6, 3, 3]
    seeds = {s: {r["seed"] for r in a.records() if r["split"] == s} for s in ids}
    assert not (seeds["train"] & seeds["val"]) and not (seeds["train"] & seeds["test"])
    assert not (seeds["val"] & seeds["test"])
    assert set(split_seeds("test", 3, seed=5)) == seeds["test"]
    for record in a.records():
        scene = render_scene(record["seed"])
        assert np.array_equal(a.read_image(record["id"]), scene.image)  # PNG: exact pixels
        assert np.array_equal(a.read_mask(record["id"]), scene.mask)
        assert np.array_equal(b.read_image(record["id"]), scene.image)
        assert record["prompt"] == scene.caption
    export_world(tmp_path / "a", 6, 3, 3, seed=5)  # resuming rewrites nothing
    assert len(a.records()) == 12


@pytest.mark.parametrize("counts", [("--train", "-1"), ("--val", "-3"), ("--train", "0", "--val", "0", "--test", "0")])
def test_export_refuses_negative_or_no_scenes(tmp_path, capsys, counts):
    from diffumask.cli import main

    out = tmp_path / "world"
    assert main(["shapes", "export", str(out), *counts]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "scene counts must be 0 or more and not all 0" in err
    assert not out.exists()
