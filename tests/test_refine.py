"""`diffumask refine` on a synthetic dataset whose right masks are known: every method, several
classes per item, resume, the manifest record and the command line."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from dataset_factory import snapshot

from diffumask.cli import main
from diffumask.dataset import IGNORE_INDEX, Dataset, read_index_png
from diffumask.masks.affinity import AffinityConfig
from diffumask.refine import RefineConfig, refine_dataset
from diffumask.validate import validate_dataset

SIZE, GRID = 32, 16
CLASSES = ["disc", "box"]
#: Small and quick, for the tests' dozen 32 px images.
TINY_AFFINITY = AffinityConfig(width=16, blocks=2, feature_dim=16, train_steps=40, batch_size=4, lr=1e-2,
                               walk_steps=32, background=0.5)


def shape_mask(kind: str, cy: float, cx: float, r: float) -> np.ndarray:
    y, x = np.mgrid[:SIZE, :SIZE] + 0.5
    if kind == "disc":
        return (y - cy) ** 2 + (x - cx) ** 2 <= r * r
    return (abs(y - cy) <= r * 0.8) & (abs(x - cx) <= r * 0.8)


def soft_maps(image: np.ndarray, truths: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Attention-like maps: each object blurred and shifted a pixel, on a raised floor; the
    grids at 16×16; self-attention from colour similarity on the 16×16 grid."""
    out = {}
    for name, truth in truths.items():
        shifted = np.roll(truth, tuple(rng.integers(-1, 2, 2)), axis=(0, 1)).astype(np.float32)
        soft = ndimage.gaussian_filter(shifted, 2.0)
        soft = 0.25 + 0.75 * soft / soft.max()
        out[name] = soft
        out[f"{name}@{GRID}"] = soft.reshape(GRID, 2, GRID, 2).mean(axis=(1, 3))
    colours = image.astype(np.float32).reshape(GRID, 2, GRID, 2, 3).mean(axis=(1, 3)).reshape(-1, 3)
    similarity = np.exp(-((colours[:, None] - colours[None]) ** 2).sum(-1) / (2 * 40.0**2))
    out[f"__self__@{GRID}"] = similarity / similarity.sum(axis=1, keepdims=True)
    return out


def make_dataset(root: Path, n_per_class: int = 5) -> tuple[Dataset, dict[str, np.ndarray]]:
    """Single-object items of each class plus two items with both classes; returns the true masks."""
    dataset = Dataset.create(root, CLASSES, {"made_by": "test"}, image_format="png")
    rng = np.random.default_rng(0)
    truths = {}
    layouts = [[(c, 16 + rng.uniform(-3, 3), 16 + rng.uniform(-3, 3), rng.uniform(7, 10))]
               for c in CLASSES for _ in range(n_per_class)]
    layouts += [[("disc", 10, 9, 6), ("box", 22, 23, 7)], [("box", 9, 22, 6), ("disc", 22, 10, 7)]]
    for k, layout in enumerate(layouts):
        image = np.repeat(rng.integers(100, 150, (SIZE, SIZE, 1)), 3, axis=2).astype(np.uint8)
        label = np.zeros((SIZE, SIZE), np.uint8)
        objects = {}
        for name, cy, cx, r in layout:
            objects[name] = shape_mask(name, cy, cx, r)
            image[objects[name]] = (230, 40, 30) if name == "disc" else (30, 60, 230)
            label[objects[name]] = dataset.class_index(name)
        item_id = f"item_{k:03d}"
        truths[item_id] = label
        names = [name for name, *_ in layout]
        dataset.write_item(item_id, image, {"classes": names, "resolutions": [GRID]},
                           mask=np.zeros_like(label), soft_maps=soft_maps(image, objects, rng))
    dataset.finalize()
    return dataset, truths


def miou(dataset: Dataset, truths: dict[str, np.ndarray]) -> float:
    """Per-class IoU pooled over the items, pixels labelled 255 left out."""
    inter, union = np.zeros(3), np.zeros(3)
    for item_id, truth in truths.items():
        mask = dataset.read_mask(item_id)
        kept = mask != IGNORE_INDEX
        for c in (1, 2):
            inter[c] += ((mask == c) & (truth == c) & kept).sum()
            union[c] += (((mask == c) | (truth == c)) & kept).sum()
    return float(np.mean(inter[1:] / union[1:]))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("refine") / "ds"
    _, truths = make_dataset(root)
    return root, truths


@pytest.fixture
def dataset(template, tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    root, truths = template
    copy = tmp_path / "ds"
    shutil.copytree(root, copy)
    return copy, truths


def files(root: Path, folder: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / folder).iterdir())}


CASES = {
    "threshold 0.5": (RefineConfig(method="threshold", threshold=0.5), 0.78),
    "otsu": (RefineConfig(method="otsu"), 0.82),
    "propagate": (RefineConfig(method="propagate"), 0.85),
    "affinity": (RefineConfig(method="affinity", affinity=TINY_AFFINITY), 0.85),
    "adaptive, no crf": (RefineConfig(method="adaptive", crf=False, gammas=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
                                      affinity=TINY_AFFINITY), 0.82),
}
CRF_CASES = {
    "threshold 0.5 + crf": (RefineConfig(method="threshold", threshold=0.5, crf=True), 0.95),
    "otsu + crf": (RefineConfig(method="otsu", crf=True), 0.95),
    "adaptive": (RefineConfig(method="adaptive", gammas=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8), affinity=TINY_AFFINITY), 0.9),
    "adaptive per class": (RefineConfig(method="adaptive", per_class=True, gammas=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
                                        affinity=TINY_AFFINITY), 0.9),
    "adaptive, CRF-refined reference": (RefineConfig(method="adaptive", gammas=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
                                                     reference_crf=True, affinity=TINY_AFFINITY), 0.9),
    "adaptive per class, CRF-refined reference": (RefineConfig(method="adaptive", per_class=True, reference_crf=True,
                                                               gammas=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
                                                               affinity=TINY_AFFINITY), 0.9),
    "adaptive, the paper's way": (RefineConfig(method="adaptive", gammas=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
                                               crf_shortlist=0, reference_crf=False, affinity=TINY_AFFINITY), 0.9),
    "adaptive per class, CRF'd curves": (RefineConfig(method="adaptive", per_class=True, crf_shortlist=0,
                                                      gammas=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
                                                      affinity=TINY_AFFINITY), 0.9),
}


@pytest.mark.parametrize("case", [*CASES, *CRF_CASES])
def test_each_method_recovers_the_known_objects(dataset, case):
    root, truths = dataset
    config, bound = {**CASES, **CRF_CASES}[case]
    images, soft = files(root, "JPEGImages"), files(root, "SoftMaps")
    result = refine_dataset(root, config, progress=False)
    assert result.refined == result.items == len(truths)
    score = miou(result.dataset, truths)
    assert score >= bound, f"{case}: mIoU {score:.3f} < {bound}"
    assert files(root, "JPEGImages") == images and files(root, "SoftMaps") == soft
    for record in result.dataset.records():
        assert record["refine"]["method"] == config.method
        assert record["refine"]["crf"] == config.use_crf
        assert record["classes"] and record["resolutions"] == [GRID]  # generation's fields kept
        if config.method == "adaptive" and not config.per_class:
            assert record["refine"]["gamma"] in config.gammas
        if config.method == "adaptive" and config.use_crf:
            assert record["refine"]["crf_shortlist"] == config.crf_shortlist
            assert record["refine"]["reference_crf"] == config.reference_crf
        if config.per_class:
            assert record["refine"]["gammas"] == list(config.gammas)
            assert set(record["refine"]["class_gammas"]) == {str(result.dataset.class_index(c)) for c in record["classes"]}


def test_refinement_beats_the_raw_threshold(dataset):
    """The synthetic maps are blurred and shifted like attention: refinement must recover more."""
    root, truths = dataset
    raw = miou(refine_dataset(root, RefineConfig(method="threshold", threshold=0.5, min_area=0, max_hole=0),
                              progress=False).dataset, truths)
    refined = miou(refine_dataset(root, RefineConfig(method="affinity", affinity=TINY_AFFINITY),
                                  progress=False).dataset, truths)
    assert refined > raw + 0.03


@pytest.mark.parametrize("method", ["threshold", "otsu", "propagate"])
def test_items_with_several_classes_get_each_class_where_its_map_wins(dataset, method):
    root, truths = dataset
    result = refine_dataset(root, RefineConfig(method=method, threshold=0.5), progress=False)
    for item_id in ("item_010", "item_011"):
        mask, truth = result.dataset.read_mask(item_id), truths[item_id]
        assert set(np.unique(mask)) - {IGNORE_INDEX} == {0, 1, 2}
        for c in (1, 2):
            kept = mask != IGNORE_INDEX
            inter = ((mask == c) & (truth == c) & kept).sum()
            assert inter / (((mask == c) | (truth == c)) & kept).sum() > 0.7


def test_propagate_marks_an_uncertainty_band(dataset):
    root, _ = dataset
    masks = [refine_dataset(root, RefineConfig(method="propagate", propagate_uncertain=u), progress=False)
             .dataset.read_mask("item_000") for u in (0.3, None)]
    assert (masks[0] == IGNORE_INDEX).any() and not (masks[1] == IGNORE_INDEX).any()


def test_resume_redoes_only_unfinished_items_and_new_settings_start_over(dataset, capsys):
    root, truths = dataset
    config = RefineConfig(method="otsu")
    manifest = root / "manifest.jsonl"
    generated = manifest.read_text().splitlines(keepends=True)
    refine_dataset(root, config, progress=False)
    refined = manifest.read_text().splitlines(keepends=True)
    assert len(refined) == len(truths) and all('"refine"' in line for line in refined)  # compacted at the end
    # the manifest of a run killed while appending the second-to-last item's line: generation's lines,
    # then one per refined item, the last of them torn
    manifest.write_text("".join(generated + refined[:-2]) + refined[-2][:10])
    assert len(Dataset(root).records()) == len(truths)  # the torn line is skipped ...
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # resuming is not refining again: no warning
        again = refine_dataset(root, config, progress=False)
    assert again.refined == 2  # ... and the two items without a refine line are redone
    assert refine_dataset(root, config, progress=False).refined == 0
    with pytest.warns(UserWarning, match=rf"{len(truths)} item\(s\) of .* were refined with other settings"):
        other = refine_dataset(root, RefineConfig(method="threshold", threshold=0.6), progress=False)
    assert other.refined == len(truths)
    assert {r["refine"]["method"] for r in other.dataset.records()} == {"threshold"}
    assert len(manifest.read_text().splitlines()) == len(truths)  # compacted after each finished run
    capsys.readouterr()
    assert main(["refine", str(root), "--method", "otsu", "--quiet"]) == 0  # the command line's warning: one line
    assert capsys.readouterr().err.splitlines() == [
        f"diffumask: warning: {len(truths)} item(s) of {root} were refined with other settings; refining them again "
        "with these (their earlier masks are replaced)"]


@pytest.mark.parametrize("argv, kept", [(["train", "DATA", "--out", "RUN"], "the last checkpoint is kept"),
                                        (["filter", "DATA"], "finished folds are kept"),
                                        (["refine", "DATA", "--method", "otsu"], "finished masks are kept"),
                                        (["generate", "--classes", "dog", "--out", "D"], "finished items are kept"),
                                        (["shapes", "export", "D"], "finished items are kept"),
                                        (["validate", "DATA"], None)])
def test_an_interrupted_command_says_what_it_kept(argv, kept, monkeypatch, capsys):
    from diffumask import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_" + "_".join(argv[:2] if argv[0] == "shapes" else argv[:1]), interrupted)
    assert main(argv) == 130
    said = f"diffumask: interrupted; {kept}, re-run the same command to resume" if kept else "diffumask: interrupted"
    assert capsys.readouterr().err.splitlines() == [said]
    monkeypatch.setenv("RANK", "1")  # under torchrun every worker is interrupted: only the first says so
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(argv) == 130 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(argv) == 130 and capsys.readouterr().err.splitlines() == [said]


def test_a_killed_refine_leaves_every_mask_with_its_manifest_line(dataset, monkeypatch):
    """Killed after k items: those k masks are refined and their lines say so, the others keep the
    generated mask and a line without 'refine'; the re-run finishes exactly as one whole run does."""
    root, truths = dataset
    whole = root.parent / "whole"
    shutil.copytree(root, whole)
    config = RefineConfig(method="otsu")
    refine_dataset(whole, config, progress=False)
    before = files(root, "SegmentationClass")
    real = Dataset.commit_mask
    written: list[str] = []

    def dying(self, record, sha256):
        if len(written) == 5:
            raise KeyboardInterrupt
        real(self, record, sha256)
        written.append(record["id"])

    monkeypatch.setattr(Dataset, "commit_mask", dying)
    with pytest.raises(KeyboardInterrupt):
        refine_dataset(root, config, progress=False)
    monkeypatch.setattr(Dataset, "commit_mask", real)
    records = {r["id"]: r for r in Dataset(root).records()}
    refined = files(whole, "SegmentationClass")
    for item_id, record in records.items():
        on_disk = (root / "SegmentationClass" / f"{item_id}.png").read_bytes()
        if item_id in written:
            assert record["refine"]["method"] == "otsu" and on_disk == refined[f"{item_id}.png"]
        else:
            assert "refine" not in record and on_disk == before[f"{item_id}.png"]
    # what a kill in the middle of atomic writes leaves: a worker's staged mask, a compaction, a saved AffinityNet
    staged = Dataset(root).pending_mask_path(next(iter(records)))
    leftovers = [staged.with_name(f".{staged.name}.a1b2c3.tmp"),  # atomic_write's temporary name
                 root / ".manifest.jsonl.d4e5f6.tmp", root / "refine" / ".affinitynet-0123.safetensors.g7h8.tmp"]
    for path in leftovers:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"partial")
    assert refine_dataset(root, config, progress=False).refined == len(truths) - 5
    assert files(root, "SegmentationClass") == refined
    assert Dataset(root).records() == Dataset(whole).records()
    assert not any(path.exists() for path in leftovers) and validate_dataset(root)[0] == []


def test_a_finished_job_leaves_the_temporary_files_of_commands_begun_since(dataset):
    """Of the dataset's own files' temporaries, a job removes those older than itself (a kill's), not another
    command's in flight (filter writing its split lists), nor those of items it does not finish."""
    root, truths = dataset
    ds = Dataset(root)
    lists = root / "ImageSets" / "Segmentation"
    killed, live = lists / ".noise-train-0.txt.a1.tmp", lists / ".noise-train-1.txt.b2.tmp"
    other_item = root / "JPEGImages" / ".unfinished_item.jpg.c3.tmp"
    for path in (killed, live, other_item):
        path.write_bytes(b"partial")
    os.utime(killed, (ds.opened - 60, ds.opened - 60))
    os.utime(live, (ds.opened + 1, ds.opened + 1))
    ds.remove_interrupted_writes(set(truths))
    assert not killed.exists() and live.exists() and other_item.exists()


def test_a_staged_mask_counts_only_once_committed_with_its_checksum(dataset):
    """Workers stage masks ahead of the parent's commit: a staged mask is invisible to readers, dropped by
    the next writer unless committed, and a commit whose staged file is missing or differs appends nothing."""
    from diffumask.errors import DiffumaskError

    root, truths = dataset
    ds = Dataset(root)
    record = ds.records()[0]
    old_mask, manifest = ds.read_mask(record["id"]), (root / "manifest.jsonl").read_bytes()
    new_mask = np.full_like(old_mask, 1)
    sha256 = ds.stage_mask(record["id"], new_mask)
    np.testing.assert_array_equal(ds.read_mask(record["id"]), old_mask)  # staged, not committed
    with pytest.raises(DiffumaskError, match="not the staged mask"):
        ds.commit_mask(record, "0" * 64)
    assert (root / "manifest.jsonl").read_bytes() == manifest
    assert ds.recover_masks() == 0 and not ds.pending_mask_path(record["id"]).exists()  # dropped
    with pytest.raises(DiffumaskError, match="missing or overwritten"):
        ds.commit_mask(record, sha256)
    assert (root / "manifest.jsonl").read_bytes() == manifest
    ds.commit_mask(record, ds.stage_mask(record["id"], new_mask))
    np.testing.assert_array_equal(ds.read_mask(record["id"]), new_mask)
    assert Dataset(root).records()[0]["mask_sha256"] == sha256 and not ds.pending_mask_path(record["id"]).exists()


@pytest.mark.parametrize("moment", ["before the line", "after the line"])
def test_a_mask_and_its_line_agree_at_every_moment_of_a_rewrite(dataset, monkeypatch, moment):
    """Killed while rewriting one mask: before its line is appended the old mask and line stand; after
    it (the commit), readers get the new mask with the new line, and the next writer finishes the rename."""
    import diffumask.dataset as dataset_module

    root, truths = dataset
    whole = root.parent / "whole"
    shutil.copytree(root, whole)
    config = RefineConfig(method="otsu")
    refine_dataset(whole, config, progress=False)
    refined, before = files(whole, "SegmentationClass"), files(root, "SegmentationClass")
    victim = sorted(truths)[3]
    real_append, real_replace = Dataset._append_record, os.replace

    def append(self, record):
        if record["id"] == victim and moment == "before the line":
            raise KeyboardInterrupt
        real_append(self, record)

    def replace(source, target):
        if str(source).endswith(f".{victim}.pending.png"):
            raise KeyboardInterrupt
        real_replace(source, target)

    monkeypatch.setattr(Dataset, "_append_record", append)
    monkeypatch.setattr(dataset_module.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        refine_dataset(root, config, progress=False)
    monkeypatch.undo()
    ds = Dataset(root)
    record = {r["id"]: r for r in ds.records()}[victim]
    read_back = ds.read_mask(victim)
    if moment == "before the line":
        assert "refine" not in record
        np.testing.assert_array_equal(read_back, read_index_png(root / "SegmentationClass" / f"{victim}.png"))
        assert (root / "SegmentationClass" / f"{victim}.png").read_bytes() == before[f"{victim}.png"]
    else:
        assert record["refine"]["method"] == "otsu"
        np.testing.assert_array_equal(read_back, read_index_png(whole / "SegmentationClass" / f"{victim}.png"))
        assert (root / "SegmentationClass" / f"{victim}.png").read_bytes() == before[f"{victim}.png"]  # not renamed yet
    again = refine_dataset(root, config, progress=False)
    assert again.refined == len(truths) - 3 - (moment == "after the line")  # a committed item is not redone
    assert not list((root / "SegmentationClass").glob(".*"))
    assert files(root, "SegmentationClass") == refined


def test_readers_never_rewrite_the_manifest_and_the_writer_cuts_a_torn_line(dataset):
    root, truths = dataset
    manifest = root / "manifest.jsonl"
    with open(manifest, "ab") as f:  # killed inside a multi-byte character
        f.write('{"id": "item_000", "refine": "é'.encode()[:-1])
    torn = manifest.read_bytes()
    ds = Dataset(root)
    assert len(ds.records()) == len(truths) and ds.finished_ids() == set(truths)
    ds.finalize()
    assert manifest.read_bytes() == torn  # reading (and listing splits) left it alone
    ds.write_item("extra", np.zeros((SIZE, SIZE, 3), np.uint8), {"classes": ["disc"]})
    text = manifest.read_text()
    assert text.encode() == torn[:torn.rindex(b"\n") + 1] + text.splitlines(keepends=True)[-1].encode()
    assert [r["id"] for r in Dataset(root).records()][-1] == "extra"


def test_atomic_writes_sync_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    import os

    from diffumask import dataset as dataset_module

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = dataset_module._fsync_path, os.replace
    monkeypatch.setattr(dataset_module, "_fsync_path", lambda p: (events.append(("fsync", Path(p).name)), real_fsync(p)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", Path(b).name)), real_replace(a, b)))
    dataset_module.write_text_atomic(tmp_path / "sub" / "a.txt", "hello")
    assert (tmp_path / "sub" / "a.txt").read_text() == "hello"
    assert events[0][0] == "fsync" and events[0][1].startswith(".a.txt.") and events[0][1].endswith(".tmp")
    assert events[1:] == [("rename", "a.txt"), ("fsync", "sub")]
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.endswith(".tmp")]


def test_an_exclusive_atomic_write_keeps_the_first_writers_file(tmp_path):
    """Workers of a sharded job that each trained the AffinityNet: the first file stays, the others are told."""
    from diffumask.dataset import atomic_write

    path = tmp_path / "weights.bin"
    assert atomic_write(path, lambda tmp: tmp.write_bytes(b"first"), exclusive=True)
    assert not atomic_write(path, lambda tmp: tmp.write_bytes(b"second"), exclusive=True)
    assert path.read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["weights.bin"]
    assert atomic_write(path, lambda tmp: tmp.write_bytes(b"third")) and path.read_bytes() == b"third"


def test_a_trained_affinity_net_is_saved_and_reused(dataset):
    root, truths = dataset
    first = refine_dataset(root, RefineConfig(method="affinity", affinity=TINY_AFFINITY), progress=False)
    assert first.train_seconds > 0
    (weights,) = (root / "refine").glob("affinitynet-*.safetensors")
    walk_only = RefineConfig(method="affinity", affinity=AffinityConfig(**{**TINY_AFFINITY.as_dict(), "walk_steps": 16}))
    assert refine_dataset(root, walk_only, progress=False).train_seconds == 0  # no retraining for walk settings
    as_is = RefineConfig(method="affinity", affinity_weights=str(weights),
                         affinity=AffinityConfig(**{**TINY_AFFINITY.as_dict(), "train_steps": 0}))
    assert miou(refine_dataset(root, as_is, progress=False).dataset, truths) >= 0.8


def test_cli_refine(dataset, capsys):
    root, truths = dataset
    assert main(["refine", str(root), "--method", "otsu", "--quiet"]) == 0
    assert f"refined {len(truths)} of {len(truths)} items" in capsys.readouterr().out
    record = Dataset(root).records()[0]
    assert record["refine"]["method"] == "otsu" and record["refine"]["min_area"] == RefineConfig().min_area
    assert main(["refine", str(root / "missing"), "--method", "otsu"]) == 2
    assert main(["refine", str(root), "--method", "otsu", "--per-class"]) == 2
    assert "--per-class applies to --method adaptive only" in capsys.readouterr().err
    assert main(["refine", str(root), "--method", "adaptive", "--crf-shortlist", "-1"]) == 2
    assert "--crf-shortlist must be 0 (every candidate) or more" in capsys.readouterr().err


def test_propagate_on_a_dataset_made_without_self_attention_is_refused_before_any_work(dataset, tmp_path, capsys):
    root = tmp_path / "no-self"
    shutil.copytree(dataset[0], root)
    info = json.loads((root / "dataset.json").read_text())
    info["settings"]["self_attention"] = None  # generate --self-attention none
    (root / "dataset.json").write_text(json.dumps(info))
    for path in (root / "SoftMaps").glob("*.npz"):  # and so the soft maps hold none
        with np.load(path) as data:
            kept = {key: data[key] for key in data.files if not key.startswith("__self__")}
        with open(path, "wb") as file:
            np.savez_compressed(file, **kept)
    before = snapshot(root)
    assert main(["refine", str(root), "--method", "propagate"]) == 2  # with its progress bar on
    err = capsys.readouterr().err
    assert err.startswith("diffumask: error: this dataset holds no self-attention") and err.count("\n") == 1, err
    assert snapshot(root) == before


def test_cli_refine_adaptive_the_papers_way(dataset):
    root, truths = dataset
    assert main(["refine", str(root), "--method", "adaptive", "--affinity-steps", "3", "--crf-shortlist", "0",
                 "--quiet"]) == 0
    record = Dataset(root).records()[0]["refine"]
    assert record["crf_shortlist"] == 0 and record["reference_crf"] is False and record["crf"] is True
    assert main(["refine", str(root), "--method", "adaptive", "--affinity-steps", "3", "--reference-crf", "--quiet"]) == 0
    record = Dataset(root).records()[0]["refine"]
    assert record["crf_shortlist"] == 1 and record["reference_crf"] is True


def test_defaults_follow_the_gamma_the_dataset_was_made_with(dataset):
    """No --threshold / --gammas: the dataset's own γ, and the paper's sweep moved around it."""
    from diffumask.masks.adaptive import DEFAULT_GAMMAS, sweep_around

    assert DEFAULT_GAMMAS == tuple(round(0.35 + 0.01 * k, 2) for k in range(20))  # the paper's 0.35 … 0.54
    assert sweep_around(0.7) == tuple(round(0.65 + 0.01 * k, 2) for k in range(20))
    root, _ = dataset
    info = json.loads((root / "dataset.json").read_text())
    info["settings"]["threshold"] = 0.7
    (root / "dataset.json").write_text(json.dumps(info))
    refine_dataset(root, RefineConfig(method="threshold", min_area=0, max_hole=0), progress=False)
    ds = Dataset(root)
    record = ds.records()[0]
    assert record["refine"]["threshold"] == 0.7
    fused = ds.read_soft_maps(record["id"])[record["classes"][0]]
    decided = np.abs(fused - 0.7) > 1e-2
    np.testing.assert_array_equal((ds.read_mask(record["id"]) != 0)[decided], (fused > 0.7)[decided])
    refine_dataset(root, RefineConfig(method="adaptive", crf=False, affinity=TINY_AFFINITY), progress=False)
    refined = Dataset(root).records()[0]["refine"]
    assert refined["gammas"] == list(sweep_around(0.7)) and refined["fallback_threshold"] == 0.7


@pytest.mark.parametrize("extra, fragment", [
    (["--method", "threshold", "--threshold", "1.5"], "--threshold must lie strictly between 0 and 1"),
    (["--method", "threshold", "--threshold", "0.5", "--uncertain", "0"], "--uncertain must lie strictly between"),
    (["--method", "threshold", "--threshold", "0.5", "--uncertain", "0.6"], "--uncertain (0.6) must be below"),
    (["--method", "threshold", "--uncertain", "0.95"], "must be below the dataset's γ"),
    (["--method", "propagate", "--propagate-threshold", "1.2"], "--propagate-threshold must lie strictly"),
    (["--method", "adaptive", "--gammas", "0.5,1.2,0.1"], "every γ of the sweep must lie in (0, 1)"),
    (["--method", "adaptive", "--gammas", "0.5,0.4,0.1"], "empty γ sweep"),
    (["--method", "affinity", "--affinity-background", "1.5"], "--affinity-background must lie strictly"),
    (["--method", "affinity", "--walk-steps", "-1"], "--walk-steps and --affinity-steps must be 0 or more"),
    (["--method", "affinity", "--affinity-steps", "-5"], "--walk-steps and --affinity-steps must be 0 or more"),
    (["--method", "affinity", "--beta", "0"], "--beta must be positive"),
    (["--method", "otsu", "--crf", "--crf-gt-prob", "1"], "--crf-gt-prob) must lie strictly between 0 and 1"),
    (["--method", "otsu", "--crf", "--crf-srgb", "0"], "--crf-srgb must be positive"),
    (["--method", "propagate", "--crf", "--crf-iterations", "0"], "(--crf-iterations) must be at least 1"),
    (["--method", "propagate", "--crf", "--crf-max-size", "4"], "(--crf-max-size) must be at least 8 px (0: full size)"),
    (["--method", "otsu", "--crf-sxy", "-3"], "--crf-sxy must be positive"),
    (["--method", "propagate", "--power", "0"], "--power must be at least 1"),
    (["--method", "otsu", "--min-area", "1.5"], "fractions of the image area"),
    (["--method", "affinity", "--affinity-weights", "/nonexistent/w.safetensors", "--affinity-steps", "0"],
     "cannot use AffinityNet weights"),
])
def test_bad_refine_options_are_one_line_errors_that_change_nothing(dataset, capsys, extra, fragment):
    root, _ = dataset
    before = {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    assert main(["refine", str(root), "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("diffumask: error: ") and fragment in err, err
    assert {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} == before


def test_a_refine_dataset_that_is_not_a_dataset_is_a_one_line_error(dataset, tmp_path, capsys):
    root, _ = dataset
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    (broken / "dataset.json").write_text("{not json")
    no_soft = tmp_path / "no_soft"
    shutil.copytree(root, no_soft)
    shutil.rmtree(no_soft / "SoftMaps")
    for folder, fragment in ((empty, "is not a diffumask dataset"), (a_file, "is not a diffumask dataset"),
                             (tmp_path / "missing", "missing does not exist"),
                             (broken, "classes.json or dataset.json is missing or damaged"),
                             (no_soft, "has no soft maps for 12 item(s)")):
        assert main(["refine", str(folder), "--method", "otsu", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("diffumask: error: ") and fragment in err, err


def test_the_help_quotes_the_readmes_measurements_of_the_papers_affinitynet_ways():
    """--walk-steps, --no-stretch and --seed-grid cite, in order, the README table's rows they compare (the paper's
    way against ours), not older runs."""
    import re

    from diffumask.cli import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("**Where the AffinityNet path differs from the paper's code (PSA), measured.**")[1]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:3]
            for line in table.split("\n\n- ")[0].splitlines() if re.match(r"\| \S.* \| 0\.\d{3} \|", line)}

    def row(start: str) -> list[str]:
        [found] = [values for label, values in rows.items() if label.startswith(start)]
        return found

    ours, stride2 = row("our defaults"), row("grid stride 2 (forced)")
    expected = {"--walk-steps": [row("256 walk steps")[0], ours[0], row("256 walk steps")[1], ours[1]],
                "--no-stretch": [ours[0], row("maps walked as they are")[0], ours[1], row("maps walked as they are")[1]],
                "--seed-grid": [row("grid stride 2, seed cells by vote")[0], stride2[0],
                                row("grid stride 2, seed cells by vote")[1], stride2[1]]}
    refine = build_parser()._subparsers._group_actions[0].choices["refine"]
    quoted = {option: re.findall(r"0\.\d{3}", action.help) for action in refine._actions
              for option in action.option_strings if option in expected}
    assert quoted == expected
