"""``diffumask validate`` on a sound dataset and on copies broken one way each."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from dataset_factory import make_dataset
from PIL import Image

from diffumask.augment import AugmentConfig, augment_dataset
from diffumask.cli import main
from diffumask.dataset import Dataset, DatasetMismatch, MissingItemFile, _save_npz, write_palette_png
from diffumask.errors import DiffumaskError
from diffumask.generate import GenerateConfig, generate_dataset
from diffumask.noise import FilterConfig, filter_dataset
from diffumask.refine import RefineConfig, refine_dataset
from diffumask.segment.train import TrainConfig
from diffumask.shapes.world import export_world
from diffumask.validate import validate_dataset


@pytest.fixture(scope="module")
def sound(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("sound") / "data", n=6).root


def _lines(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_a_sound_dataset_passes(sound, capsys):
    assert main(["validate", str(sound)]) == 0
    assert _lines(capsys) == [f"{sound}: 6 items, no problems"]


def _remove(path: str) -> Callable[[Path], None]:
    return lambda root: (root / path).unlink()


def _bigger_mask(root: Path) -> None:
    write_palette_png(root / "SegmentationClass" / "item_0002.png", np.zeros((50, 48), np.uint8))


def _small_objects(root: Path) -> None:
    write_palette_png(root / "SegmentationObject" / "item_0004.png", np.zeros((48, 40), np.uint8))


def _bad_label(root: Path) -> None:
    mask = np.array(Image.open(root / "SegmentationClass" / "item_0003.png"))
    mask[0, 0], mask[0, 1] = 7, 200  # 6 classes: 7 and 200 are no class
    write_palette_png(root / "SegmentationClass" / "item_0003.png", mask)


def _small_soft_map(root: Path) -> None:
    dataset = Dataset(root)
    maps = dataset.read_soft_maps("item_0001")
    name = dataset.records()[1]["classes"][0]
    maps[name] = maps[name][:24, :24]
    _save_npz(root / "SoftMaps" / "item_0001.npz", maps)


def _drop_from_split(root: Path) -> None:
    path = root / "ImageSets" / "Segmentation" / "val.txt"
    path.write_text(path.read_text().replace("item_0001\n", "") + "ghost_0001\n")


def _torn_manifest(root: Path) -> None:
    with open(root / "manifest.jsonl", "a") as f:
        f.write('{"id": "item_0006", "spl')


def _torn_mid_character(root: Path) -> None:
    with open(root / "manifest.jsonl", "ab") as f:
        f.write('{"id": "é'.encode()[:-1])


def _bad_shard_line(root: Path) -> None:
    """A shard with a line that is no record before its last one: every run that reads the dataset stops on it."""
    (root / "manifest.1.jsonl").write_text('{"id": "item_0099"\n{"id": "item_0098"}\n')
    for folder, suffix in (("JPEGImages", "png"), ("SegmentationClass", "png"), ("SoftMaps", "npz")):
        shutil.copy(root / folder / f"item_0000.{suffix}", root / folder / f"item_0098.{suffix}")


def _duplicate_line(root: Path) -> None:
    lines = (root / "manifest.jsonl").read_text().splitlines(keepends=True)
    (root / "manifest.jsonl").write_text("".join(lines + lines[:1]))


def _leftovers(root: Path) -> None:
    (root / "SegmentationClass" / ".item_0004.png.ab12cd.tmp").write_bytes(b"half")
    line = (root / "manifest.jsonl").read_text().splitlines()[0]  # item_0000, as a sharded refine rewrote it
    (root / "manifest.1.jsonl").write_text('{"id": "item_0099"}\n' + line + "\n")  # and a sharded run's new item
    for folder, suffix in (("JPEGImages", "png"), ("SegmentationClass", "png"), ("SoftMaps", "npz")):
        shutil.copy(root / folder / f"item_0000.{suffix}", root / folder / f"item_0099.{suffix}")
    shutil.copy(root / "JPEGImages" / "item_0000.png", root / "JPEGImages" / "item_0098.png")  # an unfinished one


def _broken_item_in_a_shard(root: Path) -> None:
    """A stopped sharded run's finished item lost its mask: its line is only in the shard, and was not checked."""
    _shards_only(root)
    (root / "SegmentationClass" / "item_0004.png").unlink()


def _shards_only(root: Path) -> None:
    """A sharded run stopped before any merge: every line in a rank's shard, none in manifest.jsonl (and one of its
    lines torn mid-character); and a refined mask committed but not yet renamed into place."""
    (root / "manifest.jsonl").rename(root / "manifest.0.jsonl")
    with open(root / "manifest.0.jsonl", "ab") as shard:
        shard.write('{"id": "é'.encode()[:-1])
    (root / "manifest.orig.jsonl").write_text('{"id": "item_0002"}\n')  # not a rank's shard: never merged
    shutil.copy(root / "SegmentationClass" / "item_0001.png", root / "SegmentationClass" / ".item_0001.pending.png")
    for split in root.glob("ImageSets/Segmentation/*.txt"):
        split.unlink()


REMADE = ": run again the command that made the dataset to make the item again"
SHARDS_ONLY = [
    "manifest.0.jsonl:7: torn last line (a killed write); the next run will drop it",
    "manifest.0.jsonl: manifest shard not merged into manifest.jsonl: 6 finished item(s), 6 not listed there yet "
    "(a sharded run stopped before its end: re-run the same command, with any number of workers, to finish)",
    "manifest.orig.jsonl: not a manifest shard diffumask writes (manifest.<rank>.jsonl), so never merged; move it "
    "out of the dataset",
    "SegmentationClass/.item_0001.pending.png: a mask a stopped refine wrote beside the item's own (committed or "
    "not): re-run refine to finish, do not delete it"]
BREAKS = {
    "missing image": (_remove("JPEGImages/item_0000.png"),
                      [f"item_0000: image missing (JPEGImages/item_0000.png){REMADE}"]),
    "missing mask": (_remove("SegmentationClass/item_0004.png"),
                     [f"item_0004: mask missing (SegmentationClass/item_0004.png){REMADE}"]),
    "missing soft maps": (_remove("SoftMaps/item_0005.npz"),
                          ["item_0005: soft maps missing (SoftMaps/item_0005.npz): refine needs them; delete the "
                           "item's image too, and run again the command that made the dataset to make the item again "
                           "whole"]),
    "mask size": (_bigger_mask, ["item_0002: mask is 48x50 but the image is 48x48"]),
    "object map size": (_small_objects, ["item_0004: object map is 40x48 but the image is 48x48"]),
    "label values": (_bad_label, ["item_0003: mask values [7, 200] are neither classes of classes.json (0..6) nor 255"]),
    "soft map size": (_small_soft_map, ["item_0001: soft map {name!r} is (24, 24) but the image is (48, 48)"]),
    "splits": (_drop_from_split, [
        "ImageSets/Segmentation/val.txt: lists 1 items the manifest has not in split 'val': ghost_0001",
        "ImageSets/Segmentation/val.txt: lacks 1 of the manifest's val items: item_0001 (if the command that writes "
        "the dataset was stopped: re-run it to finish)"]),
    "torn manifest": (_torn_manifest,
                      ["manifest.jsonl:7: torn last line (a killed write); the next run will drop it"]),
    "torn mid-character": (_torn_mid_character,
                           ["manifest.jsonl:7: torn last line (a killed write); the next run will drop it"]),
    "bad shard line": (_bad_shard_line, [
        "manifest.1.jsonl:1: not a JSON object with an 'id'",
        "manifest.1.jsonl: manifest shard not merged into manifest.jsonl: 1 finished item(s), 1 not listed there yet "
        "(a sharded run stopped before its end: re-run the same command, with any number of workers, to finish)"]),
    "duplicate": (_duplicate_line, ["item_0000: listed twice in manifest.jsonl (a refine was interrupted: re-run it to finish)"]),
    "leftovers": (_leftovers, [
        "SegmentationClass/.item_0004.png.ab12cd.tmp: temporary file of an interrupted write: re-run the command that "
        "was stopped (it removes its own), or delete it",
        "manifest.1.jsonl: manifest shard not merged into manifest.jsonl: 2 finished item(s), 1 not listed there yet "
        "(a sharded run stopped before its end: re-run the same command, with any number of workers, to finish)",
        "JPEGImages/item_0098.png: belongs to no manifest item (an unfinished item: re-run the command that "
        "made the dataset, or delete it)"]),
    "shards only": (_shards_only, SHARDS_ONLY),
    "broken item in a shard": (_broken_item_in_a_shard, [  # its item's problem comes before the files'
        SHARDS_ONLY[0], f"item_0004: mask missing (SegmentationClass/item_0004.png){REMADE}", *SHARDS_ONLY[1:]]),
    "lists not written": (_remove("ImageSets/Segmentation/train.txt"), [
        "ImageSets/Segmentation/train.txt: missing, but the manifest has 3 train items (the command that writes "
        "the dataset stopped before its end: re-run it to finish)"]),
}


@pytest.mark.parametrize("kind", list(BREAKS))
def test_each_break_is_one_line_and_a_failing_exit(sound, tmp_path, capsys, kind):
    root = tmp_path / "data"
    shutil.copytree(sound, root)
    breaker, expected = BREAKS[kind]
    breaker(root)
    if kind == "soft map size":
        name = Dataset(root).records()[1]["classes"][0]
        expected = [line.format(name=name) for line in expected]
    manifests = {p.name: p.read_bytes() for p in root.glob("manifest*.jsonl")}
    assert main(["validate", str(root)]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == expected
    assert f"{len(expected)} problem" in captured.err
    assert {p.name: p.read_bytes() for p in root.glob("manifest*.jsonl")} == manifests  # it reports, repairs nothing


def test_problems_add_up_and_the_api_returns_them(sound, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(sound, root)
    _remove("JPEGImages/item_0000.png")(root)
    _bad_label(root)
    (root / "manifest.r2.jsonl").write_text("")
    problems, items = validate_dataset(root)
    assert items == 6 and [p.where for p in problems] == ["item_0000", "item_0003", "manifest.r2.jsonl"]


WRITING = (".: a diffumask command (generate, refine, filter, augment, shapes export) is writing the dataset now: its "
           "finished items were checked, not its lists and files in progress; validate again once it ends")


def test_a_command_writing_the_dataset_is_told_apart_from_a_killed_ones_leftovers(sound, tmp_path, capsys):
    """While a command writes, its files in flight (an unlisted item, a temporary file, a shard, a refine's appended
    line) are no problems, yet its finished items are checked; once its process dies, they are a kill's leftovers."""
    root = tmp_path / "data"
    shutil.copytree(sound, root)
    _leftovers(root)
    _duplicate_line(root)
    _bad_label(root)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom diffumask.dataset import Dataset\n"
                               "with Dataset(sys.argv[1]).writing():\n    print('writing', flush=True)\n    time.sleep(300)",
                               str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "writing\n"
        assert main(["validate", str(root)]) == 1
        bad_label = "item_0003: mask values [7, 200] are neither classes of classes.json (0..6) nor 255"
        assert capsys.readouterr().out.splitlines() == [WRITING, bad_label]
        assert Dataset(root).unfinished().startswith("a diffumask command (generate, refine, filter, augment, shapes "
                                                     "export) is writing")
        (root / "manifest.jsonl").rename(root / "kept")  # before its first item: nothing finished, nothing to say
        (root / "manifest.1.jsonl").rename(root / "kept.1")
        assert [str(p) for p in validate_dataset(root)[0]] == [WRITING]
        (root / "kept").rename(root / "manifest.jsonl")
        (root / "kept.1").rename(root / "manifest.1.jsonl")
    finally:
        holder.kill()  # as a kill would: the kernel drops its lock
        holder.wait()
    assert main(["validate", str(root)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == [bad_label, BREAKS["duplicate"][1][0], *BREAKS["leftovers"][1]]
    assert Dataset(root).unfinished().startswith("a sharded run on it stopped before its end")


def test_a_command_that_starts_during_the_scan_is_seen_before_its_files_are_called_leftovers(sound, tmp_path,
                                                                                           monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(sound, root)
    _leftovers(root)
    _bad_label(root)
    probes = iter([False, True])  # none when validate starts; one by the time it looks at the files
    monkeypatch.setattr(Dataset, "being_written", lambda self: next(probes))
    assert [str(p) for p in validate_dataset(root)[0]] == [
        WRITING, "item_0003: mask values [7, 200] are neither classes of classes.json (0..6) nor 255"]


def test_the_writing_lock_is_told_apart_from_a_reader_probing_and_outlives_no_writer(sound, tmp_path, monkeypatch):
    """Two readers probing at once meet (each takes the lock alone for a moment): that is no writer. A forked child
    (a data loader's worker) still holding the file after the command's block ends holds no lock."""
    root = tmp_path / "data"
    shutil.copytree(sound, root)
    dataset = Dataset(root)
    with open(root / ".running", "r+") as other_reader:
        fcntl.flock(other_reader, fcntl.LOCK_EX)  # another reader's probe, met in its middle, ends before the retry
        monkeypatch.setattr(time, "sleep", lambda seconds: fcntl.flock(other_reader, fcntl.LOCK_UN))
        assert not dataset.being_written()
    monkeypatch.undo()
    with dataset.writing():
        assert dataset.being_written()
        child = os.fork()
        if child == 0:  # holds the open file until it is killed
            time.sleep(60)
            os._exit(0)
    try:
        assert not dataset.being_written()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_a_writer_starting_while_a_reader_probes_waits_for_the_probe(sound, tmp_path, monkeypatch):
    """A writer takes the lock without waiting (a second command is refused at once); a reader's probe, which
    holds it a moment, must not refuse a writer starting then: the writer tries again."""
    import diffumask.dataset as dataset_module

    root = tmp_path / "data"
    shutil.copytree(sound, root)
    probe = open(root / ".running", "a+")
    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the reader, mid-probe
    waits: list[float] = []

    def probe_ends(seconds: float) -> None:
        waits.append(seconds)
        fcntl.flock(probe, fcntl.LOCK_UN)

    monkeypatch.setattr(dataset_module.time, "sleep", probe_ends)
    with Dataset(root).writing():
        assert len(waits) == 1
        monkeypatch.undo()
        assert Dataset(root).being_written()
    probe.close()


def test_the_writing_lock_works_where_flock_is_a_posix_lock(sound, tmp_path, monkeypatch):
    """NFSv4 turns flock into a POSIX lock, which needs a file open for reading to share it and open for writing to
    hold it alone (EBADF otherwise); emulated here, as no NFS mount is at hand."""
    root = tmp_path / "data"
    shutil.copytree(sound, root)
    real = fcntl.flock

    def posix_like(file, operation):
        mode = fcntl.fcntl(file.fileno() if hasattr(file, "fileno") else file, fcntl.F_GETFL) & os.O_ACCMODE
        if (operation & fcntl.LOCK_SH and mode == os.O_WRONLY) or (operation & fcntl.LOCK_EX and mode == os.O_RDONLY):
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real(file, operation)

    monkeypatch.setattr(fcntl, "flock", posix_like)
    dataset = Dataset(root)
    assert not dataset.being_written()
    with dataset.writing():
        assert dataset.being_written()
    assert validate_dataset(root) == ([], 6)


def test_a_read_only_dataset_is_validated_and_its_writer_still_seen(sound, tmp_path, monkeypatch):
    """On a read-only mount the probe cannot open the lock file for writing (EROFS): it reads it, and a local file
    system locks it all the same; no error either way."""
    import builtins

    import diffumask.dataset as dataset_module

    root = tmp_path / "data"
    shutil.copytree(sound, root)

    def read_only(path, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wa+x"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return builtins.open(path, mode, *args, **kwargs)

    with Dataset(root).writing():
        monkeypatch.setattr(dataset_module, "open", read_only, raising=False)
        assert [str(p) for p in validate_dataset(root)[0]] == [WRITING]
    assert validate_dataset(root) == ([], 6)


def _writer(command: str, tmp_path: Path) -> Callable[[], Path]:
    """A run of ``augment`` or ``shapes export`` into ``tmp_path/out``, to be repeated."""
    if command == "augment":
        source = make_dataset(tmp_path / "source", n=4, size=32, soft_maps=False).root
        return lambda: augment_dataset(source, tmp_path / "out", AugmentConfig(grids=(1,), items=3), progress=False).root
    return lambda: export_world(tmp_path / "out", 3, 1, 0, size=32)


@pytest.mark.parametrize("command", ["augment", "shapes export"])
def test_a_rerun_removes_what_a_killed_ones_writes_left(tmp_path, command):
    """As generate and refine do: once every item is written, the temporary files a kill left are gone (validate
    says to re-run the command for them)."""
    run = _writer(command, tmp_path)
    root = run()
    first = Dataset(root).records()[0]["id"]
    (root / "manifest.jsonl").write_text("".join((root / "manifest.jsonl").read_text().splitlines(True)[:-1]))
    leftovers = [root / "JPEGImages" / f".{first}.png.ab12.tmp", root / ".manifest.jsonl.cd34.tmp",
                 root / "ImageSets" / "Segmentation" / ".train.txt.ef56.tmp"]
    for path in leftovers:
        path.write_bytes(b"half")
        os.utime(path, (time.time() - 60,) * 2)
    assert validate_dataset(root)[0]
    run()
    assert not [path for path in leftovers if path.exists()] and validate_dataset(root)[0] == []


@pytest.mark.parametrize("command", ["augment", "shapes export"])
def test_a_rerun_makes_again_the_items_whose_files_are_gone(tmp_path, command):
    """As generate does: an item whose image or mask is gone is made again, byte for byte, its line superseding the
    old one (validate said to run the command again for it)."""
    run = _writer(command, tmp_path)
    root = run()
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    ids = [r["id"] for r in Dataset(root).records()]
    (root / "JPEGImages" / f"{ids[0]}.png").unlink()
    (root / "SegmentationClass" / f"{ids[-1]}.png").unlink()
    assert [p.where for p in validate_dataset(root)[0]] == [ids[0], ids[-1]]
    run()
    after = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    manifest = Path("manifest.jsonl")
    assert after.pop(manifest).replace(b', "rev": 2', b"") == before.pop(manifest) and after == before
    assert [r.get("rev", 0) for r in Dataset(root).records()] == [2] + [0] * (len(ids) - 2) + [2]
    assert validate_dataset(root)[0] == []


def _killed_at(monkeypatch, method: str, run: Callable[[], Path]) -> None:
    """``run`` killed (^C) as it calls ``Dataset.<method>``."""
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Dataset, method, killed)
        with pytest.warns(UserWarning, match="lost their files"), pytest.raises(KeyboardInterrupt):
            run()


def test_a_run_killed_while_it_makes_lost_items_again_is_said_to_be_re_run(tmp_path, monkeypatch):
    """Killed after it marked an item lost: the item's split list is refused with the fix (augment said to re-cut
    it with filter, train stopped at the missing file) and validate names the item. Killed after it made the item
    again but before it compacted the manifest: the dataset read as a stopped refine's, in validate too."""
    def run() -> Path:
        return export_world(tmp_path / "out", 3, 1, 0, size=32)

    root = run()
    (root / "JPEGImages" / "train_000001.png").unlink()
    _killed_at(monkeypatch, "write_item", run)
    dataset = Dataset(root)
    refused = (f"ImageSets/Segmentation/train.txt of {root} lists 1 item(s) that lost their files (e.g. train_000001: "
               "image missing (JPEGImages/train_000001.png)), and the run making them again stopped before its end: "
               "re-run it to finish")
    with pytest.raises(DiffumaskError) as error:
        dataset.split_ids("train")
    assert str(error.value) == refused
    with pytest.raises(DiffumaskError) as error:
        augment_dataset(root, tmp_path / "aug", AugmentConfig(grids=(1,), items=2), progress=False)
    assert str(error.value) == refused
    assert [str(p) for p in validate_dataset(root)[0]] == ["train_000001: image missing (JPEGImages/train_000001.png): "
                                                           "a run making the item again stopped before it had; re-run "
                                                           "it to finish"]
    run()
    (root / "SegmentationClass" / "train_000002.png").unlink()
    _killed_at(monkeypatch, "finalize", run)
    assert Dataset(root).split_ids("train") == ["train_000000", "train_000001", "train_000002"]
    assert Dataset(root).unfinished() == ("the run that made again its items that had lost their files stopped before "
                                          "its end: re-run it to finish")
    assert [str(p) for p in validate_dataset(root)[0]] == ["train_000002: listed again in manifest.jsonl: made again "
                                                           "after it lost its files, by a run that stopped before its "
                                                           "end: re-run it to finish"]
    with Dataset(root).writing():  # the run at work again: not a stopped one
        assert [str(p) for p in validate_dataset(root)[0]] == [WRITING]
    run()
    assert validate_dataset(root)[0] == [] and Dataset(root).unfinished() is None


def test_an_unreadable_file_is_named_with_the_decoders_words_and_the_fix_once(sound, tmp_path):
    """validate wrapped the reader's whole error, fix included, in its own: two fixes in one line."""
    root = tmp_path / "data"
    shutil.copytree(sound, root)
    (root / "JPEGImages/item_0001.png").write_bytes(b"not an image")  # validate reads images' headers only
    (root / "SegmentationClass/item_0003.png").write_bytes((root / "SegmentationClass/item_0003.png").read_bytes()[:100])
    problems = [str(p) for p in validate_dataset(root)[0]]
    assert len(problems) == 2
    for problem, what in zip(problems, ("item_0001: image", "item_0003: mask")):
        assert re.fullmatch(rf"{what} unreadable \([^;()]+\): delete it, and run again the command that made the "
                            "dataset to make the item again", problem), problem


def test_a_worker_marks_items_lost_only_between_merges(tmp_path):
    """Another worker of a sharded job merging the shards (under the dataset's lock) would remove a mark appended
    while it read them: marks wait for the lock."""
    import threading

    root = export_world(tmp_path / "out", 2, 0, 0, size=32)
    (root / "JPEGImages" / "train_000001.png").unlink()
    dataset = Dataset(root)
    kept: list[set[str]] = []
    with Dataset(root).lock():
        marking = threading.Thread(target=lambda: kept.append(dataset.finished_whole(["train_000000", "train_000001"])))
        marking.start()
        marking.join(0.5)
        assert marking.is_alive() and '"lost"' not in (root / "manifest.jsonl").read_text()
    marking.join()
    assert kept == [{"train_000000"}] and '"lost"' in (root / "manifest.jsonl").read_text()


def test_items_that_lost_their_files_are_named_as_lost_though_none_of_those_asked_for_is_left(tmp_path):
    """Only ids whose files are all gone, while the folder holds others': lost, not 'never made'."""
    root = export_world(tmp_path / "out", 2, 1, 0, size=32)
    (root / "JPEGImages" / "val_000000.png").unlink()
    with pytest.raises(MissingItemFile, match=r"^item val_000000 of .* lost its image"):
        Dataset(root).require_files(["val_000000"], "image", "export needs images")
    shutil.rmtree(root / "SegmentationClass")
    with pytest.raises(DiffumaskError, match=r"has no mask for 3 item\(s\) .*; export needs masks$"):
        Dataset(root).require_files(["train_000000", "train_000001", "val_000000"], "mask", "export needs masks")


def test_a_dataset_whose_items_are_all_marked_lost_still_refuses_other_settings(tmp_path, monkeypatch):
    """Every item lost and marked so by a killed re-run: the folder read as holding no dataset, so a run with
    another seed was taken for a new one and rewrote dataset.json over the marked items."""
    root = export_world(tmp_path / "out", 2, 0, 0, size=32)
    shutil.rmtree(root / "JPEGImages")
    _killed_at(monkeypatch, "write_item", lambda: export_world(root, 2, 0, 0, size=32))
    assert Dataset(root).records() == []
    with pytest.raises(DatasetMismatch, match=r"made with other settings \(seed differs: 0 in the dataset, 7 now\)"):
        export_world(root, 2, 0, 0, seed=7, size=32)


def test_reading_an_item_reads_no_manifest(sound, monkeypatch):
    """The fix a damaged file's error names depends on the manifest (was the dataset refined?): it was worked out,
    reading the whole manifest, on every read of every item, so a 20,000-item dataset read in quadratic time."""
    dataset = Dataset(sound)
    monkeypatch.setattr(Dataset, "_lines", lambda self: pytest.fail("an item's read read the manifest"))
    assert dataset.read_image("item_0001").shape == (48, 48, 3) and dataset.read_mask("item_0001").shape == (48, 48)
    assert dataset.read_soft_maps("item_0001")


def test_a_report_shows_an_item_that_lost_its_image_without_it(sound, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(sound, root)
    (root / "JPEGImages" / "item_0000.png").unlink()  # the first item, which Fig. 2 shows
    assert main(["report", str(root), "--out", str(tmp_path / "report.html"), "--quiet"]) == 0


def test_every_command_that_writes_a_dataset_says_so_while_it_runs(tmp_path, sd1_pipe, monkeypatch):
    """Each manifest write of generate, refine, filter, augment and the shapes export happens while the dataset
    reads as being written, and not after the command returns."""
    seen: list[tuple[str, bool]] = []
    for name in ("_append_record", "_rewrite_manifest"):
        def watched(self, *args, _write=getattr(Dataset, name), **kwargs):
            seen.append((self.root.name, self.being_written()))
            return _write(self, *args, **kwargs)
        monkeypatch.setattr(Dataset, name, watched)
    generated = tmp_path / "generated"
    generate_dataset(GenerateConfig(classes=["dog", "cat"], out=str(generated), images_per_class=2, model="tiny-sd1",
                                    steps=2, batch_size=2, prompts="voc", threshold=0.8), pipe=sd1_pipe, progress=False)
    refine_dataset(generated, RefineConfig(method="threshold", crf=False), progress=False)
    export_world(tmp_path / "world", 4, 0, 0, size=32)
    filter_dataset(FilterConfig(dataset=str(tmp_path / "world"), folds=2, prune=0.5, training=TrainConfig(
        data=[], out="", steps=1, batch_size=2, crop=32, workers=0, device="cpu")), progress=False)
    augment_dataset(tmp_path / "world", tmp_path / "augmented", AugmentConfig(grids=(1,), items=2), progress=False)
    assert {name for name, _ in seen} == {"generated", "world", "augmented"} and all(writing for _, writing in seen)
    assert [n for n, _ in seen].count("world") > 4  # the export's lines, then filter's rewrite
    assert not any(Dataset(tmp_path / name).being_written() for name in ("generated", "world", "augmented"))


def test_not_a_dataset_is_a_one_line_error(tmp_path, capsys):
    assert main(["validate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"diffumask: error: {tmp_path} is not a diffumask dataset (no classes.json)\n"
    (tmp_path / "classes.json").write_text(json.dumps({"classes": [{"index": 0, "name": "background"}]}))
    assert main(["validate", str(tmp_path)]) == 2
    assert "no dataset.json" in capsys.readouterr().err
    missing = tmp_path / "nosuch"  # a typo in the path: said so, not "not a dataset (no classes.json)"
    for command in (["validate", str(missing)], ["refine", str(missing), "--method", "otsu"], ["filter", str(missing), "--quiet"],
                    ["augment", str(missing), "--out", str(tmp_path / "aug")],
                    ["export", str(missing), "--format", "coco", "--out", str(tmp_path / "coco")],
                    ["report", str(missing), "--out", str(tmp_path / "report.html")]):
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{missing} does not exist; give the folder of a" in err[0], (command, err)


@pytest.mark.parametrize("what, command", [
    ("image", ["export", "{root}", "--format", "coco", "--out", "{tmp}/coco"]),
    ("mask", ["train", "{root}", "--out", "{tmp}/run", "--steps", "1", "--quiet"]),
    ("soft maps", ["refine", "{root}", "--method", "threshold", "--quiet"]),
    ("mask", ["augment", "{root}", "--out", "{tmp}/aug", "--quiet"]),
    ("mask", ["filter", "{root}", "--quiet"]),
])
def test_a_lost_file_stops_a_command_in_one_line_that_names_the_item_and_the_fix(sound, tmp_path, capsys, what,
                                                                                command):
    """A finished item whose file is gone stopped export, augment and train with the system's bare 'No such file or
    directory', and refine with 'refine needs a dataset made by `diffumask generate`' (it was)."""
    root = tmp_path / "data"
    shutil.copytree(sound, root)
    path = {"image": "JPEGImages/item_0002.png", "mask": "SegmentationClass/item_0002.png",
            "soft maps": "SoftMaps/item_0002.npz"}[what]
    (root / path).unlink()
    assert main([part.format(root=root, tmp=tmp_path) for part in command]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"diffumask: error: item item_0002 of {root} lost its {what} ({path}); `diffumask validate {root}` lists every "
        "damaged item, and running again the command that made the dataset makes them again"
        + (" whole, once their images are deleted too" if what == "soft maps" else ""))
