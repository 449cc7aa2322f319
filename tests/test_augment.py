"""Φ1–Φ4: image and mask stay aligned on scenes of known geometry, the warp agrees with OpenCV's, the
output is deterministic and resumable, and bad input is one sentence."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import cv2
import numpy as np
import pytest
from dataset_factory import MIXED_NAMES, make_dataset, snapshot

from diffumask.augment import (AugmentConfig, augment_dataset, augment_item, hidden_share, mosaic, occlude,
                               paste_object, perspective, resize_pair)
from diffumask.cli import main
from diffumask.dataset import IGNORE_INDEX, Dataset, resize_labels
from diffumask.errors import ConfigError, DiffumaskError
from diffumask.segment.data import IMAGENET_MEAN, IMAGENET_STD, resize_short_side

RED = (220, 30, 30)


def square_scene(size: int = 64, box=(16, 20, 40, 44), label: int = 1, colour=RED):
    """A grey image with one coloured rectangle, and its exact mask."""
    image = np.full((size, size, 3), 128, np.uint8)
    labels = np.zeros((size, size), np.uint8)
    y0, x0, y1, x1 = box
    image[y0:y1, x0:x1] = colour
    labels[y0:y1, x0:x1] = label
    return image, labels


def red(image: np.ndarray) -> np.ndarray:
    return (image[..., 0] > 150) & (image[..., 1] < 90)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def test_perspective_moves_the_mask_with_the_pixels_as_opencv_does():
    image, labels = square_scene()
    corners = np.array([[6.5, 3.0], [60.0, 9.25], [55.5, 58.0], [2.0, 61.0]])
    warped, moved = perspective(image, labels, corners)
    assert iou(red(warped), moved == 1) > 0.9  # the object's pixels and its label coincide
    # An independent reference: OpenCV's own perspective warp of the same corners, nearest neighbour,
    # 255 outside. They agree except on pixels exactly at a sampling boundary.
    src = np.float32([[0, 0], [63, 0], [63, 63], [0, 63]])
    matrix = cv2.getPerspectiveTransform(src, corners.astype(np.float32))
    reference = cv2.warpPerspective(labels, matrix, (64, 64), flags=cv2.INTER_NEAREST,
                                    borderMode=cv2.BORDER_CONSTANT, borderValue=IGNORE_INDEX)
    assert (reference == moved).mean() > 0.98
    outside = moved == IGNORE_INDEX
    # nothing from outside the image is content: black there, but for bilinear blends along the border
    assert outside.any() and (warped[outside] < 40).all(axis=1).mean() > 0.95


def test_mosaic_keeps_each_tile_aligned():
    scenes = [square_scene(48, (8, 8, 30, 30), label=k + 1) for k in range(4)]
    image, labels = mosaic(scenes, 2, 64)
    assert image.shape == (64, 64, 3) and labels.shape == (64, 64)
    for k, (y, x) in enumerate([(0, 0), (0, 32), (32, 0), (32, 32)]):
        tile_image, tile_labels = image[y:y + 32, x:x + 32], labels[y:y + 32, x:x + 32]
        assert set(np.unique(tile_labels)) == {0, k + 1}
        assert iou(red(tile_image), tile_labels == k + 1) > 0.85
    with pytest.raises(ValueError, match="needs 9 items"):
        mosaic(scenes, 3, 64)


@pytest.mark.parametrize("source, target", [(512, 64), (96, 32), (32, 40), (300, 512), (64, 48), (64, 32), (128, 32)])
def test_resized_masks_stay_centred_on_their_resized_images(source, target):
    """Every label resize (training's random scale, augment's tiles and pastes) lands where the image's does: the
    reference is the object's own indicator resized as images are (area shrinking, bilinear growing) and cut at
    0.5. Plain INTER_NEAREST gives 0.93, 0.89, 0.90, 0.99, 0.90 here and sits 0.3-0.5 px up and left; the centre's
    nearest pixel alone, at a whole factor of 2 (64 -> 32), 0.93 and 0.26 px."""
    rng = np.random.default_rng(source + target)
    ious, offsets = [], []
    while len(ious) < 40:
        (y0, y1), (x0, x1) = np.sort(rng.integers(0, source, (2, 2)), axis=1)
        if min(y1 - y0, x1 - x0) < source // 6:
            continue
        labels = np.zeros((source, source), np.uint8)
        labels[y0:y1, x0:x1] = 3
        shown = cv2.resize((labels == 3).astype(np.float32), (target, target),
                           interpolation=cv2.INTER_AREA if target < source else cv2.INTER_LINEAR)
        for resized in (resize_short_side(np.zeros((source, source, 3), np.uint8), labels, target)[1],
                        resize_pair(np.zeros((source, source, 3), np.uint8), labels, (target, target))[1]):
            ours = resized == 3
            ious.append(iou(shown > 0.5, ours))
            rows, cols = np.nonzero(ours)
            grid = np.arange(target)
            offsets.append((rows.mean() - (shown.sum(1) * grid).sum() / shown.sum(),
                            cols.mean() - (shown.sum(0) * grid).sum() / shown.sum()))
    assert np.mean(ious) > 0.95
    assert np.abs(np.mean(offsets, axis=0)).max() < 0.25


def test_whole_factor_shrink_takes_each_blocks_most_frequent_label():
    """Against a count by hand in every block: the most frequent label, a tie to the lower one (255 last)."""
    rng = np.random.default_rng(7)
    labels = rng.choice(np.array([0, 1, 2, 5, IGNORE_INDEX], np.uint8), size=(24, 36), p=[0.4, 0.2, 0.2, 0.1, 0.1])
    labels[:2, :2] = [[1, 2], [2, 1]]  # a tie: 1
    labels[:2, 2:4] = [[IGNORE_INDEX, 0], [IGNORE_INDEX, 0]]  # a tie: 0 before 255
    for fy, fx in [(2, 2), (3, 2), (4, 6)]:
        expected = np.zeros((24 // fy, 36 // fx), np.uint8)
        for i in range(expected.shape[0]):
            for j in range(expected.shape[1]):
                counts = Counter(labels[i * fy:(i + 1) * fy, j * fx:(j + 1) * fx].ravel().tolist())
                expected[i, j] = min(counts, key=lambda value: (-counts[value], value))
        assert (resize_labels(labels, (36 // fx, 24 // fy)) == expected).all()
    assert resize_labels(labels, (18, 12))[0, 0] == 1 and resize_labels(labels, (18, 12))[0, 1] == 0


def test_occlusion_pastes_pixels_and_labels_together():
    image, labels = square_scene()
    patch = square_scene(box=(0, 0, 64, 64), label=2, colour=(30, 30, 220))
    occluded_image, occluded = occlude(image, labels, patch, (10, 10, 30, 34))
    assert (occluded[10:30, 10:34] == 2).all() and (occluded_image[10:30, 10:34] == (30, 30, 220)).all()
    assert (occluded[30:, :] == labels[30:, :]).all() and (occluded_image[30:, :] == image[30:, :]).all()
    visible = red(occluded_image)
    assert (visible == (occluded == 1)).all()  # the mask follows what is visible


def test_paste_cuts_the_object_out_with_its_label_and_nothing_else():
    image, labels = square_scene()  # red square rows 16-40, columns 20-44
    donor_image, donor_labels = square_scene(20, (4, 6, 14, 16), label=2, colour=(30, 30, 220))
    donor_labels[4, 6] = IGNORE_INDEX  # an unsure pixel travels with the object, still unsure
    pasted_image, pasted = paste_object(image, labels, (donor_image, donor_labels), (30, 36))
    blue = (pasted_image[..., 2] > 150) & (pasted_image[..., 0] < 90)
    assert (blue == np.isin(pasted, (2, IGNORE_INDEX))).all() and blue.sum() == 100  # 10 x 10 moved to (34, 42)
    assert (pasted[34:44, 42:52] != 0).all() and pasted[34, 42] == IGNORE_INDEX
    assert (red(pasted_image) == (pasted == 1)).all()  # the square keeps what is still visible, and only that
    assert (pasted_image[~blue & ~red(image)] == 128).all()  # the donor's background stayed behind
    with pytest.raises(ValueError, match="does not fit"):
        paste_object(image, labels, (donor_image, donor_labels), (50, 50))


def test_hidden_share_adds_up_per_object():
    rng = np.random.default_rng(0)
    owners = rng.choice([0, 1, 2, 256], size=(24, 24), p=[0.4, 0.3, 0.2, 0.1]).astype(np.int32)
    sizes = {1: int((owners == 1).sum()) + 30, 2: int((owners == 2).sum()), 256: int((owners == 256).sum()) + 5}
    cut = rng.random((9, 7)) < 0.5
    placed = np.zeros(owners.shape, bool)
    placed[5:14, 11:18] = cut
    # by hand: an object's share lost = 1 - what stays visible after the cut, over its size when placed
    expected = max(1 - ((owners == o) & ~placed).sum() / sizes[o] for o in (1, 2, 256) if ((owners == o) & placed).any())
    assert hidden_share(owners, sizes, cut, (5, 11)) == pytest.approx(expected)
    assert hidden_share(np.zeros((8, 8), np.int32), {}, np.ones((2, 2), bool), (0, 0)) == 0.0


def test_paste_leaves_each_shown_class_visible_enough():
    scenes = [square_scene(48, (4, 4, 24, 24), label=k + 1, colour=c)
              for k, c in enumerate([RED, (30, 220, 30), (30, 30, 220)])]
    for keep in (0.6, 1.0):
        config = AugmentConfig(grids=(1,), blur=0, occlusion=0, perspective=0, paste=1, paste_objects=(2, 2),
                               paste_keep=keep, seed=1)
        pastes = 0
        for index in range(20):
            image, labels, made = augment_item(index, ["0", "1", "2"], lambda i: scenes[int(i)], config, 48)
            base = scenes[int(made["sources"][0])][1]
            for value in np.unique(base[base > 0]):  # the first item's object keeps `keep` of its pixels
                assert ((labels == value) & (base == value)).sum() >= keep * (base == value).sum()
            coloured = np.ptp(image.astype(int), axis=2) > 95  # grey background, saturated objects
            assert (coloured == (labels > 0)).mean() > 0.97  # pixels and labels coincide (edges blend)
            pastes += sum(t["name"] == "paste" for t in made["transforms"])
        assert pastes > (0 if keep == 1 else 20)  # at 0.6 most pastes find a place; at 1 only those beside it


def test_paste_keeps_each_object_visible_in_mosaics_and_after_later_pastes():
    """One class, six colours: every object is told apart by its colour. Each tile's object in a 2x2
    mosaic, and each pasted object after the pastes that follow it, keeps its share (measured on the pixels
    of its exact colour, so blended edges count as hidden: a little below the rule's 0.6)."""
    colours = [(220, 30, 30), (30, 220, 30), (30, 30, 220), (220, 220, 30), (30, 220, 220), (220, 30, 220)]
    scenes = [square_scene(48, (12, 12, 36, 36), label=1, colour=c) for c in colours]
    ids = [str(i) for i in range(len(scenes))]
    config = AugmentConfig(grids=(2,), blur=0, occlusion=0, perspective=0, paste=1, paste_objects=(2, 3), seed=2)
    pastes = 0
    for index in range(30):
        image, labels, made = augment_item(index, ids, lambda i: scenes[int(i)], config, 48)
        before, _ = mosaic([scenes[int(i)] for i in made["sources"]], 2, 48)
        objects = []  # (pixels of the object's exact colour when it was placed, that colour)
        for tile, source in enumerate(made["sources"]):
            inside = np.zeros((48, 48), bool)
            inside[24 * (tile // 2):24 * (tile // 2) + 24, 24 * (tile % 2):24 * (tile % 2) + 24] = True
            objects.append((inside & (before == colours[int(source)]).all(axis=2), colours[int(source)]))
        for paste in (t for t in made["transforms"] if t["name"] == "paste"):
            donor = cv2.resize(scenes[int(paste["source"])][0], (paste["side"],) * 2, interpolation=cv2.INTER_AREA)
            exact = (donor == colours[int(paste["source"])]).all(axis=2)
            ys, xs = np.nonzero(exact)
            placed = np.zeros((48, 48), bool)  # the cut-out starts at the donor's object box, placed at "at"
            box = np.nonzero(resize_labels(scenes[int(paste["source"])][1], (paste["side"],) * 2))
            y, x = paste["at"]
            placed[ys - box[0].min() + y, xs - box[1].min() + x] = True
            objects.append((placed, colours[int(paste["source"])]))
            pastes += 1
        for footprint, colour in objects:
            still = footprint & (image == colour).all(axis=2)
            assert still.sum() >= 0.5 * footprint.sum(), (index, colour)
    assert pastes > 30


def test_blur_leaves_the_labels_alone():
    image, labels = square_scene()
    config = AugmentConfig(grids=(1,), blur=1, occlusion=0, perspective=0)
    blurred, same, made = augment_item(0, ["a"], lambda _: (image, labels), config, 64)
    assert (same == labels).all() and not (blurred == image).all()
    assert [t["name"] for t in made["transforms"]] == ["blur"] and made["sources"] == ["a"]


def test_augment_dataset_is_deterministic_resumable_and_aligned(tmp_path, monkeypatch):
    from diffumask.shapes.classifier import foreground

    source = make_dataset(tmp_path / "source", n=8, size=48)
    config = AugmentConfig(grids=(1, 2), items=10, blur=0, occlusion=0.5, perspective=0.5, paste=0.5, seed=3)
    first = augment_dataset(source.root, tmp_path / "a", config, progress=False)
    records = first.records()
    assert len(records) == 10 and {r["grid"] for r in records} == {1, 2}
    assert all(set(r["sources"]) <= set(source.split_ids("train")) for r in records)  # never the val items
    assert {t["name"] for r in records for t in r["transforms"]} == {"occlusion", "perspective", "paste"}
    for record in records:  # the objects' pixels (by their chroma) and the labelled pixels coincide
        labels = first.read_mask(record["id"])
        known = labels != IGNORE_INDEX
        objects = foreground(first.read_image(record["id"]))
        assert ((objects == (labels > 0)) | ~known).mean() > 0.9
    # a run killed after three items resumes to the same bytes
    real_write = Dataset.write_item
    written = []

    def dying_write(self, item_id, *args, **kwargs):
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(item_id)
        return real_write(self, item_id, *args, **kwargs)

    monkeypatch.setattr(Dataset, "write_item", dying_write)
    with pytest.raises(KeyboardInterrupt):
        augment_dataset(source.root, tmp_path / "b", config, progress=False)
    monkeypatch.setattr(Dataset, "write_item", real_write)
    augment_dataset(source.root, tmp_path / "b", config, progress=False)
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")


def test_an_augmentation_from_before_copy_paste_resumes(tmp_path):
    """Without --paste the settings recorded are those of versions before it, so their folders resume."""
    source = make_dataset(tmp_path / "source", n=4, size=32)
    config = AugmentConfig(grids=(2,), items=4, seed=1)
    first = augment_dataset(source.root, tmp_path / "out", config, progress=False)
    assert list(first.settings["augment"]) == ["grids", "split", "items", "size", "blur", "blur_sigma", "occlusion",
                                               "occlusion_side", "perspective", "perspective_shift", "seed"]  # as before
    assert len(augment_dataset(source.root, tmp_path / "out", config, progress=False).records()) == 4
    with pytest.raises(DiffumaskError, match="other settings"):  # copy-paste is a change of settings
        augment_dataset(source.root, tmp_path / "out", replace(config, paste=0.5), progress=False)
    with pytest.raises(DiffumaskError, match=r"other settings \(augment\.seed differs: 1 in the dataset, 2 now\)"):
        augment_dataset(source.root, tmp_path / "out", replace(config, seed=2), progress=False)  # named, not cut off


def test_bad_input_is_one_sentence(tmp_path, capsys):
    for bad in (dict(grids=(0,)), dict(blur=1.5), dict(perspective_shift=0.6), dict(items=0), dict(paste=-0.1),
                dict(paste_scale=(0.5, 1.5)), dict(paste_objects=(2, 1)), dict(paste_keep=2)):
        with pytest.raises(ConfigError):
            AugmentConfig(**bad)
    source = make_dataset(tmp_path / "source", n=2, size=32)
    for path in (tmp_path / "source" / "SegmentationClass").glob("*.png"):
        path.unlink()
    with pytest.raises(DiffumaskError, match="needs a dataset with masks"):
        augment_dataset(source.root, tmp_path / "out", AugmentConfig(), progress=False)
    assert main(["augment", str(source.root), "--out", str(tmp_path / "cli"), "--grids", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--grids" in err[0]
    whole = make_dataset(tmp_path / "whole", n=2, size=32)
    generated = Dataset.create(tmp_path / "generated", whole.classes, {"model": "shapes", "seed": 0}, image_format="png")
    generated.write_item("item_0000", whole.read_image("item_0000"), {"classes": []},
                         mask=whole.read_mask("item_0000"))
    generated.finalize()
    for out, expected in ((whole.root, "is the dataset being augmented"),
                          (f"{tmp_path}/./whole", "is the dataset being augmented"),
                          (generated.root, "holds a dataset another command made")):
        assert main(["augment", str(whole.root), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
    with pytest.raises(DiffumaskError, match=r"\(a differs: absent in the dataset, 1 now; b .*; d differs: absent in "
                                             r"the dataset, 4 now; and 2 more\)"):  # the first four of six, by name
        Dataset.create(generated.root, whole.classes, {"model": "other", "seed": 1, "a": 1, "b": 2, "c": 3, "d": 4})
    with pytest.raises(DiffumaskError, match=r"\(seed differs: 0 in the dataset, absent now\)"):  # not "()"
        Dataset.create(generated.root, whole.classes, {"model": "shapes"})
    far = "/data/" + "x" * 300 + "/model"  # a long value in full: the end is what differs
    with pytest.raises(DiffumaskError, match=f'model differs: "shapes" in the dataset, "{far}" now'):
        Dataset.create(generated.root, whole.classes, {"model": far, "seed": 0})


def test_cli_writes_an_augmented_dataset(tmp_path, capsys):
    source = make_dataset(tmp_path / "source", n=4, size=32)
    assert main(["augment", str(source.root), "--out", str(tmp_path / "out"), "--items", "3", "--grids", "2",
                 "--paste", "1", "--paste-objects", "1,1", "--paste-scale", "0.4,0.5", "--quiet"]) == 0
    records = Dataset(tmp_path / "out").records()
    assert len(records) == 3 and Dataset(tmp_path / "out").settings["augment"]["paste_scale"] == [0.4, 0.5]
    assert all(sum(t["name"] == "paste" for t in r["transforms"]) <= 1 for r in records)
    assert Dataset(tmp_path / "out").classes == source.classes
    kept = source.split_ids("train")[:2]  # what filter kept: an ImageSets list, as train --split reads it
    (source.root / "ImageSets" / "Segmentation" / "filtered.txt").write_text("".join(f"{i}\n" for i in kept))
    assert main(["augment", str(source.root), "--out", str(tmp_path / "kept"), "--split", "filtered", "--items", "4",
                 "--grids", "1,2", "--quiet"]) == 0
    drawn = {s for r in Dataset(tmp_path / "kept").records() for s in r["sources"]}
    assert drawn and drawn <= set(kept)
    capsys.readouterr()
    (source.root / "ImageSets" / "Segmentation" / "filtered.txt").write_text(f"{kept[0]}\n")  # cut again
    again = ["augment", str(source.root), "--out", str(tmp_path / "kept"), "--split", "filtered", "--items", "4",
             "--grids", "1,2", "--quiet"]
    assert main(again) == 2 and "source_ids differs" in capsys.readouterr().err  # a re-cut list is not resumed into
    (source.root / "ImageSets" / "Segmentation" / "filtered.txt").write_text("ghost\n")
    assert main(again) == 2 and "lists 1 item(s) the manifest lacks (e.g. ghost)" in capsys.readouterr().err


def test_training_blurs_and_warps_on_the_fly_with_the_same_transforms():
    from diffumask.segment.data import augment_pair, check_augment

    image, labels = square_scene()
    warped = blurred = 0
    for seed in range(12):
        out_image, out_labels = augment_pair(image, labels, np.random.default_rng(seed), 64, (1.0, 1.0),
                                             check_augment(["perspective"]))
        assert iou(red(out_image), out_labels == 1) > 0.85
        warped += bool((out_labels == IGNORE_INDEX).any())
        out_image, out_labels = augment_pair(image, labels, np.random.default_rng(seed), 64, (1.0, 1.0),
                                             check_augment(["blur"]))
        assert (out_labels == labels).all()
        blurred += not np.isin(out_image, [30, 128, 220]).all()  # edges mixed: the blur ran
    assert 0 < warped < 12 and 0 < blurred < 12  # each with probability 1/2


def test_training_shifts_keep_mask_and_pixels_together_and_ignore_what_comes_in():
    from diffumask.segment.data import augment_pair, check_augment

    image, labels = square_scene()  # red square rows 16-40, columns 20-44
    moves = set()
    for seed in range(20):
        out_image, out_labels = augment_pair(image, labels, np.random.default_rng(seed), 64, (1.0, 1.0),
                                             check_augment(["shift"]))
        assert (red(out_image) == (out_labels == 1)).all()  # exactly aligned
        ys, xs = np.nonzero(out_labels == 1)
        dy, dx = ys.min() - 16, xs.min() - 20
        assert max(abs(dy), abs(dx)) <= 64 // 8 and (ys.max() - ys.min(), xs.max() - xs.min()) == (23, 23)
        moves.add((dy, dx))
        uncovered = out_labels == IGNORE_INDEX  # the strips that came in from outside: black, ignored
        assert uncovered.sum() == 64 * 64 - (64 - abs(dy)) * (64 - abs(dx))
        assert (out_image[uncovered] == 0).all()
    assert len(moves) > 10


def test_training_channel_shuffles_reorder_rgb_and_leave_the_mask():
    from diffumask.segment.data import augment_pair, check_augment

    colour = (220, 90, 30)
    image, labels = square_scene(colour=colour)
    orders = set()
    for seed in range(20):
        out_image, out_labels = augment_pair(image, labels, np.random.default_rng(seed), 64, (1.0, 1.0),
                                             check_augment(["channels"]))
        assert (out_labels == labels).all()
        shown = tuple(int(v) for v in out_image[20, 30])
        assert sorted(shown) == sorted(colour) and (out_image[0, 0] == 128).all()
        orders.add(shown)
    assert len(orders) == 6  # every order of R, G, B


def _training_samples(root, augment: tuple[str, ...], share: float, seed: int = 0):
    """train's samples of ``root``'s train split at crop 48 and one scale, as (image, labels) arrays."""
    from diffumask.formats import open_source
    from diffumask.segment.data import TrainingSamples, open_splits, union_classes

    sources = [open_source(str(root))]
    samples = TrainingSamples(open_splits(sources, "train", union_classes(sources)), None, 48, (1.0, 1.0), augment,
                              seed, share)

    def sample(step: int, slot: int) -> tuple[np.ndarray, np.ndarray]:
        image, labels = samples[(step, slot)]
        pixels = (image.numpy().transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN).round().clip(0, 255)
        return pixels.astype(np.uint8), labels.numpy().astype(np.uint8)
    return sample


def test_paste_on_the_fly_needs_a_background_to_cut_objects_out_of(tmp_path):
    from diffumask.formats import open_source
    from diffumask.segment.data import TrainingSamples, open_splits, union_classes

    source = make_dataset(tmp_path / "source", n=4, size=32)
    sources = [open_source(str(source.root))]
    part = open_splits(sources, "train", union_classes(sources))[0]
    TrainingSamples([part], None, 32, (1.0, 1.0), ("paste",), 0, 0.5)
    part.lut[0] = IGNORE_INDEX  # as Cityscapes' and ADE20K's tables: every value a class or ignored
    with pytest.raises(ConfigError, match="has no background class"):
        TrainingSamples([part], None, 32, (1.0, 1.0), ("paste",), 0, 0.5)
    TrainingSamples([part], None, 32, (1.0, 1.0), ("mosaic",), 0, 0.5)  # mosaics need none


def _kind(image: np.ndarray, labels: np.ndarray, items: list[tuple[np.ndarray, np.ndarray]]) -> str:
    """"item" when the sample is one of ``items`` as it is, "mosaic" when each quadrant is one of them at half
    size (as augment's mosaic resizes tiles), else "other"."""
    def same(a, b):
        return np.abs(a[0].astype(int) - b[0]).max() <= 1 and (a[1] == b[1]).all()
    if any(same((image, labels), item) for item in items):
        return "item"
    halves = [resize_pair(*item, (24, 24)) for item in items]
    quadrants = [(image[y:y + 24, x:x + 24], labels[y:y + 24, x:x + 24]) for y in (0, 24) for x in (0, 24)]
    if all(any(same(q, half) for half in halves) for q in quadrants):
        return "mosaic"
    return "other"


def test_training_makes_mosaics_on_the_fly_for_its_share_of_the_samples(tmp_path):
    """`train --augment mosaic`: a composite sample is four train items at half size, the others one item
    as it is, in the share asked for; every sample is a function of (seed, step, slot)."""
    source = make_dataset(tmp_path / "source", n=8, size=48)
    items = [(source.read_image(i), source.read_mask(i)) for i in source.split_ids("train")]
    for share, low, high in ((0.0, 0, 0), (0.5, 8, 32), (1.0, 40, 40)):
        sample = _training_samples(source.root, ("mosaic",), share)
        kinds = [_kind(*sample(step, slot), items) for step in range(10) for slot in range(4)]
        assert "other" not in kinds and low <= kinds.count("mosaic") <= high, (share, kinds)
    sample, again = _training_samples(source.root, ("mosaic",), 0.5), _training_samples(source.root, ("mosaic",), 0.5)
    first = sample(7, 3)  # from an empty cache; `again` reads it warm, after other samples
    [again(step, slot) for step in range(6) for slot in range(4)]
    assert all((a == b).all() for a, b in zip(first, again(7, 3)))
    assert all((a == b).all() for a, b in zip(sample(0, 0), again(0, 0)))
    assert not (sample(0, 0)[0] == sample(0, 1)[0]).all()


def test_training_composites_take_each_datas_labels_in_the_runs_indices(tmp_path):
    """A DATA whose classes come in another order than the run's: its composites carry the run's indices."""
    from diffumask.formats import open_source
    from diffumask.segment.data import TrainingSamples, open_splits, union_classes

    make_dataset(tmp_path / "first", n=4, size=48)
    second = make_dataset(tmp_path / "second", n=8, size=48, seed=1, names=tuple(reversed(MIXED_NAMES)))
    sources = [open_source(str(tmp_path / "first")), open_source(str(second.root))]
    classes = union_classes(sources)
    by_hand = np.full(256, IGNORE_INDEX, np.uint8)  # the second's label v (its class v) -> the run's index of that name
    by_hand[0] = 0
    for value, name in enumerate(reversed(MIXED_NAMES), start=1):
        by_hand[value] = classes.index(name)
    items = [(second.read_image(i), by_hand[second.read_mask(i)]) for i in second.split_ids("train")]
    samples = TrainingSamples(open_splits(sources, "train", classes), [0, 1], 48, (1.0, 1.0), ("mosaic",), 2, 1.0)
    for slot in range(6):
        image, labels = samples[(0, slot)]
        pixels = (image.numpy().transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN).round().clip(0, 255)
        assert _kind(pixels.astype(np.uint8), labels.numpy().astype(np.uint8), items) == "mosaic"


def test_training_pastes_on_the_fly_with_pixels_and_labels_together(tmp_path):
    from diffumask.shapes.classifier import foreground

    source = make_dataset(tmp_path / "source", n=8, size=48)
    items = [(source.read_image(i), source.read_mask(i)) for i in source.split_ids("train")]
    sample = _training_samples(source.root, ("mosaic", "paste", "flip"), 1.0, seed=4)
    pasted = 0
    for slot in range(16):
        image, labels = sample(0, slot)
        known = labels != IGNORE_INDEX
        assert ((foreground(image) == (labels > 0)) | ~known).mean() > 0.9  # objects by chroma = labelled pixels
        pasted += _kind(image, labels, items) == "other" and _kind(image[:, ::-1], labels[:, ::-1], items) == "other"
    assert pasted > 8  # most mosaics got objects pasted onto them


def test_composite_options_keep_older_runs_and_bad_shares_are_one_line(tmp_path, capsys):
    from diffumask.segment import TrainConfig, get_preset

    tiny = get_preset("tiny")
    composite = TrainConfig(data=["d"], out="r", augment=["+mosaic", "paste"]).resolved_preset()
    assert composite.schedule.augment == (*tiny.schedule.augment, "mosaic", "paste")  # "+": besides the preset's
    assert TrainConfig(data=["d"], out="r", augment=["+flip", "+paste"]).resolved_preset().schedule.augment == (
        *tiny.schedule.augment, "paste")
    assert TrainConfig(data=["d"], out="r", augment=["mosaic", "+paste"]).resolved_preset().schedule.augment == (
        *tiny.schedule.augment, "mosaic", "paste")  # a + on any name adds them all
    assert TrainConfig(data=["d"], out="r", augment=["mosaic"]).resolved_preset().schedule.augment == ("mosaic",)
    # runs without composites record the settings they did before the option existed, so they resume
    assert "composite_share" not in tiny.as_dict()["schedule"]
    assert composite.as_dict()["schedule"]["composite_share"] == 0.75
    source = make_dataset(tmp_path / "source", n=4, size=32)
    assert main(["train", str(source.root), "--out", str(tmp_path / "bad"), "--augment", "+mosaic",
                 "--composite-share", "1.5", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--composite-share" in err[0]
    assert main(["train", str(source.root), "--out", str(tmp_path / "bad"), "--composite-share", "0.5", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # a share with nothing to share out
    assert len(err) == 1 and "--composite-share needs mosaic, paste or occlusion" in err[0]
    assert main(["train", str(source.root), "--out", str(tmp_path / "run"), "--augment", "+mosaic,paste,occlusion",
                 "--composite-share", "0.5", "--steps", "2", "--batch-size", "2", "--crop", "32", "--workers", "0",
                 "--quiet"]) == 0
    schedule = json.loads((tmp_path / "run" / "settings.json").read_text())["preset"]["schedule"]
    assert schedule["augment"][-3:] == ["mosaic", "paste", "occlusion"] and schedule["composite_share"] == 0.5
