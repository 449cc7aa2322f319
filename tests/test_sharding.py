"""Sharded generation: workers from torchrun/Slurm variables, per-rank manifest shards, the same
dataset for any number of workers, resume with another number."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dataset_factory import make_dataset, snapshot

from diffumask.cli import main
from diffumask.dataset import Dataset
from diffumask.distributed import Worker, current_worker, job_terms
from diffumask.errors import ConfigError
from diffumask.generate import GenerateConfig, generate_dataset
from diffumask.validate import validate_dataset

BIN = Path(sys.executable).parent
CLASSES = ["dog", "cat"]


def test_each_worker_gets_its_own_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # torchrun on a 4-GPU node
    assert Worker(5, 8, 1).device("cuda") == "cuda:1" and Worker().device("cuda") == "cuda"
    assert Worker(5, 8, 1).device("cuda:2") == "cuda:2" and Worker(5, 8, 1).device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # srun --gpus-per-task 1: one visible GPU
    assert Worker(5, 8, 3).device("cuda") == "cuda:0"


def test_worker_from_launcher_variables():
    assert current_worker({}) == Worker(0, 1, 0)
    assert current_worker({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == Worker(3, 8, 1)
    assert current_worker({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "6", "SLURM_LOCALID": "2"}) == Worker(5, 6, 2)
    # a batch script outside srun: the job's task count is not this process's share
    assert current_worker({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) == Worker(0, 1, 0)
    # torchrun's variables win over Slurm's (torchrun inside an salloc)
    both = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}
    assert current_worker(both) == Worker(1, 2, 1)
    for bad in ({"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}):
        with pytest.raises(ConfigError):
            current_worker(bad)


def test_a_share_of_independent_jobs_splits_again_under_a_launcher():
    """DIFFUMASK_SHARD=INDEX/COUNT (a job array's task) is one share of COUNT; a launcher inside it splits that
    share, whatever its size, and never reaches into another share."""
    assert current_worker({"DIFFUMASK_SHARD": "3/16"}) == Worker(3, 16, 0)
    assert current_worker({"DIFFUMASK_SHARD": "0/1"}) == Worker(0, 1, 0)
    launched = {"DIFFUMASK_SHARD": "2/3", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert current_worker(launched) == Worker(5, 6, 1)  # local rank: this node's GPU
    units = list(range(47))
    for size in (1, 2, 4):  # each share run by a launcher of any size takes what the plain share takes
        for index in range(3):
            inside = [current_worker({"DIFFUMASK_SHARD": f"{index}/3", "RANK": str(r), "WORLD_SIZE": str(size)})
                      for r in range(size)]
            taken = [u for worker in inside for u in worker.take(units)]
            assert sorted(taken) == Worker(index, 3).take(units) and len(taken) == len(set(taken))
    for bad in ("3/3", "-1/2", "1/0", "x/2", "3", "1/2/3", ""):
        with pytest.raises(ConfigError, match="DIFFUMASK_SHARD .* is not INDEX/COUNT with 0 <= INDEX < COUNT"):
            current_worker({"DIFFUMASK_SHARD": bad})
    # what the workers of one job must share: the shares' COUNT, whatever launcher runs each; else the launcher's size
    assert job_terms(launched) == job_terms({"DIFFUMASK_SHARD": "0/3"}) == {"shares": 3}
    step = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "8", "SLURM_JOB_ID": "41", "SLURM_STEP_ID": "0"}
    assert job_terms(step) == {"workers": 8, "launch": {"SLURM_JOB_ID": "41", "SLURM_STEP_ID": "0"}}
    torchrun = {"RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "n1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}
    assert job_terms(torchrun) == {"workers": 4, "launch": {"MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}}
    assert job_terms(torchrun) == job_terms({**torchrun, "RANK": "3", "LOCAL_RANK": "3"})  # one launch, any worker
    assert job_terms(torchrun) == job_terms({**torchrun, "MASTER_ADDR": "10.0.0.1"})  # a static rendezvous' nodes
    assert job_terms(torchrun) != job_terms({**torchrun, "MASTER_PORT": "29501"})  # a second launch beside it
    assert job_terms({}) == {"workers": 1, "launch": {}}


def test_shares_are_disjoint_and_cover_everything():
    units = list(range(23))
    for size in (1, 2, 3, 7):
        shares = [Worker(rank, size).take(units) for rank in range(size)]
        assert sorted(u for share in shares for u in share) == units


def test_shards_merge_and_the_latest_rev_wins(tmp_path):
    Dataset.create(tmp_path, ["a"], {})
    image = np.zeros((4, 4, 3), np.uint8)
    first, second = Dataset(tmp_path, Worker(0, 2)), Dataset(tmp_path, Worker(1, 2))
    first.write_item("x", image, {"classes": ["a"]}, mask=np.zeros((4, 4), np.uint8))
    second.write_item("y", image, {"classes": ["a"]}, mask=np.zeros((4, 4), np.uint8))
    assert sorted(p.name for p in tmp_path.glob("manifest*")) == ["manifest.0.jsonl", "manifest.1.jsonl"]
    # rank 1 rewrites x's mask (rev 1) although x was written to rank 0's shard, which sorts first
    record = next(r for r in first.records() if r["id"] == "x")
    second.rewrite_mask(record, np.ones((4, 4), np.uint8))
    merged = Dataset(tmp_path)
    assert [r["id"] for r in merged.records()] == ["x", "y"]
    assert next(r for r in merged.records() if r["id"] == "x")["rev"] == 1
    assert merged.read_mask("x").max() == 1
    first.finalize(order=["y", "x"], complete={"x", "y"})
    assert not merged.shard_paths()
    lines = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [(r["id"], r.get("rev", 0)) for r in lines] == [("y", 0), ("x", 1)]
    assert (tmp_path / "ImageSets" / "Segmentation" / "train.txt").read_text() == "y\nx\n"


def sharded_dataset(root: Path) -> np.ndarray:
    Dataset.create(root, ["a"], {})
    image = np.zeros((4, 4, 3), np.uint8)
    for rank, item_id in enumerate(["x", "y"]):
        Dataset(root, Worker(rank, 2)).write_item(item_id, image, {"classes": ["a"]}, mask=np.zeros((4, 4), np.uint8))
    Dataset(root, Worker(0, 2)).finalize()  # the split lists of the items so far; the shards stay
    return image


def test_a_reader_sees_every_item_while_the_last_worker_merges_the_shards(tmp_path, monkeypatch):
    """A merge that removes shard 1 after a reader listed it and read shard 0 (a worker starting late, or
    validate, while the last worker merges): the shard's lines are read from manifest.jsonl, written first."""
    read_text, merged = Path.read_text, []

    def merge_first(path, *args, **kwargs):
        if path.name == "manifest.1.jsonl" and path.parent not in merged:
            merged.append(path.parent)
            with Dataset(path.parent).lock():
                Dataset(path.parent).compact()
        return read_text(path, *args, **kwargs)

    for reader, root in ((lambda root: [r["id"] for r in Dataset(root).records()], tmp_path / "records"),
                         (lambda root: validate_dataset(root)[0], tmp_path / "validate")):
        sharded_dataset(root)
        monkeypatch.setattr(Path, "read_text", merge_first)
        result = reader(root)
        monkeypatch.undo()
        assert root in merged and not Dataset(root).shard_paths()
        assert result == (["x", "y"] if root.name == "records" else [])


def test_a_merge_keeps_a_shard_begun_while_it_read(tmp_path, monkeypatch):
    """A worker's first line lands in a new shard while the merge reads the others (appends take no lock; today's
    merges wait for every item, so this guards the order): that shard stays, and no line is removed unread."""
    image = sharded_dataset(tmp_path)
    Dataset(tmp_path).compact()  # manifest.jsonl holds x and y ...
    Dataset(tmp_path, Worker(1, 2)).rewrite_mask(Dataset(tmp_path).records()[1], np.ones((4, 4), np.uint8))
    read_text, appended = Path.read_text, []  # ... and shard 1 y's new line

    def append_after(path, *args, **kwargs):
        text = read_text(path, *args, **kwargs)
        if path.name == "manifest.jsonl":  # after each of the merge's reads, worker 2 of 3 finishes an item
            appended.append(f"z{len(appended)}")
            Dataset(tmp_path, Worker(2, 3)).write_item(appended[-1], image, {"classes": ["a"]},
                                                        mask=np.zeros((4, 4), np.uint8))
        return text

    with Dataset(tmp_path).lock():
        monkeypatch.setattr(Path, "read_text", append_after)
        Dataset(tmp_path).compact()
        monkeypatch.undo()
    assert appended and [r["id"] for r in Dataset(tmp_path).records()] == ["x", "y", *appended]
    assert Dataset(tmp_path).records()[1]["rev"] == 1


def test_an_unfinished_job_keeps_its_shards(tmp_path):
    Dataset.create(tmp_path, ["a"], {})
    worker = Dataset(tmp_path, Worker(1, 2))
    worker.write_item("x", np.zeros((4, 4, 3), np.uint8), {"classes": ["a"]})
    worker.finalize(complete={"x", "y"})  # y is another worker's, not written yet
    assert [p.name for p in worker.shard_paths()] == ["manifest.1.jsonl"]
    assert (tmp_path / "ImageSets" / "Segmentation" / "train.txt").read_text() == "x\n"


def config(out: Path, **changes) -> GenerateConfig:
    values = dict(classes=CLASSES, out=str(out), images_per_class=5, model="tiny-sd1", steps=2,
                  batch_size=2, prompts="voc", threshold=0.8)
    return GenerateConfig(**{**values, **changes})


def test_resume_with_another_number_of_workers(tmp_path, sd1_pipe, monkeypatch):
    reference = tmp_path / "one"
    generate_dataset(config(reference), pipe=sd1_pipe, progress=False)
    out = tmp_path / "sharded"
    # worker 0 of 3 runs alone (the other two were killed before writing anything) ...
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    generate_dataset(config(out), pipe=sd1_pipe, progress=False)
    partial = Dataset(out)
    assert 0 < len(partial.records()) < 10 and [p.name for p in partial.shard_paths()] == ["manifest.0.jsonl"]
    # ... and the job is resumed by two workers, one after the other
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        generate_dataset(config(out), pipe=sd1_pipe, progress=False)
    assert snapshot(out) == snapshot(reference)


def test_lost_items_are_made_again_by_their_workers_and_hold_the_merge_until_then(tmp_path, sd1_pipe, monkeypatch):
    """Items whose image is gone, one in each worker's share (batches of 2: batch 0 is worker 0's, batch 1 worker
    1's). Worker 0 marks its own lost and is killed; worker 1 makes its own again and must not take the job for
    complete and merge the shards (worker 0's item is not made yet); worker 0, resumed, finishes and merges."""
    import shutil

    reference = tmp_path / "one"
    generate_dataset(config(reference), pipe=sd1_pipe, progress=False)
    out = tmp_path / "sharded"
    shutil.copytree(reference, out)
    ids = [r["id"] for r in Dataset(out).records()]
    for item_id in (ids[0], ids[2]):
        (out / "JPEGImages" / f"{item_id}.jpg").unlink()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    real_write = Dataset.write_item

    def dying_write(self, item_id, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Dataset, "write_item", dying_write)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(config(out), pipe=sd1_pipe, progress=False)
    monkeypatch.setattr(Dataset, "write_item", real_write)
    monkeypatch.setenv("RANK", "1")
    generate_dataset(config(out), pipe=sd1_pipe, progress=False)
    dataset = Dataset(out)
    assert [p.name for p in dataset.shard_paths()] == ["manifest.0.jsonl", "manifest.1.jsonl"]  # not merged
    assert {r["id"] for r in dataset.records()} == set(ids) - {ids[0]}
    monkeypatch.setenv("RANK", "0")
    generate_dataset(config(out), pipe=sd1_pipe, progress=False)
    after, before = snapshot(out), snapshot(reference)
    revs = [json.loads(line).pop("rev", 0) for line in after["manifest.jsonl"].splitlines()]
    assert revs == [2 if i in (ids[0], ids[2]) else 0 for i in ids]
    assert after.pop("manifest.jsonl").replace(b', "rev": 2', b"") == before.pop("manifest.jsonl")
    assert after == before and validate_dataset(out)[0] == []


def test_a_sharded_generate_says_it_finished_its_share_or_the_dataset(tmp_path, saved_pipelines, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "d"
    assert main(["generate", "--model", saved_pipelines["sd1"], "--classes", "dog,cat", "--images-per-class", "2",
                 "--steps", "1", "--batch-size", "1", "--out", str(out), "--quiet"]) == 0
    written = len(Dataset(out).records())
    assert 0 < written < 4  # this worker's batches only
    assert capsys.readouterr().out.splitlines() == [
        f"{written} items in {out} so far (worker 2 of 2 finished its share; the dataset is whole once the others have finished theirs)"]
    monkeypatch.setenv("RANK", "0")  # the other worker, finishing last, merges the shards: it says so
    assert main(["generate", "--model", saved_pipelines["sd1"], "--classes", "dog,cat", "--images-per-class", "2",
                 "--steps", "1", "--batch-size", "1", "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"4 items in {out} (worker 1 of 2 finished the last share: the dataset is complete)"]
    assert not Dataset(out).shard_paths() and (out / "manifest.jsonl").is_file()


def test_a_bad_recorder_option_under_a_launcher_leaves_no_folder(tmp_path, saved_pipelines, monkeypatch, capsys):
    """`--layers nosuch` failed at the first batch, after the dataset was made: under a launcher the folder stayed,
    bare (dataset.json, classes.json), since no worker can tell whether another one uses it."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "d"
    assert main(["generate", "--model", saved_pipelines["sd1"], "--classes", "dog", "--images-per-class", "1",
                 "--steps", "1", "--layers", "nosuch", "--out", str(out), "--quiet"]) == 2
    assert "no cross-attention layer matches ['nosuch']" in capsys.readouterr().err
    assert not out.exists()


def test_a_worker_without_a_share_does_not_call_the_dataset_complete(tmp_path, saved_pipelines, monkeypatch, capsys):
    """Two batches, three workers: the third has none, and finished before the others wrote anything, which it
    took for 'no shard left to merge: the dataset is complete'."""
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    out = tmp_path / "d"
    assert main(["generate", "--model", saved_pipelines["sd1"], "--classes", "dog,cat", "--images-per-class", "1",
                 "--steps", "1", "--batch-size", "1", "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"0 items in {out} so far (worker 3 of 3 finished its share; the dataset is whole once the others have finished theirs)"]


def test_a_dataset_extended_by_one_worker_reads_as_one_made_in_one_go(tmp_path, sd1_pipe):
    """The manifest of a dataset extended by one process kept its write order (the old items, then the new ones),
    unlike one made in one go or by several workers, whose lines follow the items' order."""
    generate_dataset(config(tmp_path / "once", images_per_class=3), pipe=sd1_pipe, progress=False)
    generate_dataset(config(tmp_path / "twice", images_per_class=2), pipe=sd1_pipe, progress=False)
    generate_dataset(config(tmp_path / "twice", images_per_class=3), pipe=sd1_pipe, progress=False)
    assert snapshot(tmp_path / "twice") == snapshot(tmp_path / "once")


def test_job_array_tasks_write_what_one_process_writes(tmp_path, saved_pipelines, capsys):
    """`generate --shard INDEX/3`, the three tasks one after the other in any order (an array run one task at a
    time), one of them under a launcher of two workers: byte for byte one process's dataset; the last merges.
    Then `refine --shard` the same way: what one refine writes."""
    def generate(out: Path, *extra: str) -> list[str]:
        assert main(["generate", "--model", saved_pipelines["sd1"], "--classes", "dog,cat", "--images-per-class", "3",
                     "--steps", "1", "--batch-size", "1", "--threshold", "0.8", "--out", str(out), "--quiet",
                     *extra]) == 0
        return capsys.readouterr().out.splitlines()

    generate(tmp_path / "one")
    out = tmp_path / "array"
    assert generate(out, "--shard", "2/3") == [
        f"2 items in {out} so far (worker 3 of 3 finished its share; the dataset is whole once the others have "
        "finished theirs)"]
    assert [p.name for p in Dataset(out).shard_paths()] == ["manifest.2.jsonl"]
    os.environ.update(RANK="1", WORLD_SIZE="2")  # task 0 runs torchrun with two workers: the second first
    try:
        assert generate(out, "--shard", "0/3") == [
            f"3 items in {out} so far (worker 4 of 6 finished its share; the dataset is whole once the others have "
            "finished theirs)"]
        os.environ["RANK"] = "0"
        generate(out, "--shard", "0/3")
    finally:
        del os.environ["RANK"], os.environ["WORLD_SIZE"]
    assert "DIFFUMASK_SHARD" not in os.environ  # --shard is the command's, not the calling process's
    assert generate(out, "--shard", "1/3") == [
        f"6 items in {out} (worker 2 of 3 finished the last share: the dataset is complete)"]
    assert snapshot(out) == snapshot(tmp_path / "one") and validate_dataset(out) == ([], 6)

    def refine(root: Path, *extra: str) -> None:
        assert main(["refine", str(root), "--method", "threshold", "--workers", "1", "--quiet", *extra]) == 0

    refine(tmp_path / "one")
    for index in (1, 0):
        refine(out, "--shard", f"{index}/2")
        assert bool(Dataset(out).shard_paths()) == (index == 1)
    assert snapshot(out) == snapshot(tmp_path / "one")


def test_a_bad_shard_and_commands_that_cannot_take_one_are_one_line_errors(tmp_path, monkeypatch, capsys):
    data = make_dataset(tmp_path / "data", n=2, size=32, soft_maps=False)
    with pytest.raises(SystemExit):
        main(["generate", "--classes", "dog", "--shard", "16/16", "--out", str(tmp_path / "out")])
    assert capsys.readouterr().err.splitlines()[-1] == (
        "diffumask generate: error: argument --shard: '16/16' is not INDEX/COUNT with 0 <= INDEX < COUNT, e.g. 3/16 "
        "for the fourth of 16 shares (in a Slurm array --array=0-15: $SLURM_ARRAY_TASK_ID/16)")
    monkeypatch.setenv("DIFFUMASK_SHARD", "1/4")  # exported for a job array's generate, then other commands run
    for command in (["train", str(data.root), "--out", str(tmp_path / "run"), "--steps", "1"],
                    ["filter", str(data.root), "--recut"]):
        assert main(command) == 2
        assert capsys.readouterr().err == (
            f"diffumask: error: {command[0]} trains across its workers through torch.distributed, and DIFFUMASK_SHARD "
            f"(--shard) splits only generate's and refine's work between independent jobs: unset it and run "
            f"{command[0]} as one job (with torchrun inside it for several GPUs)\n")
    assert main(["augment", str(data.root), "--out", str(tmp_path / "aug")]) == 2
    assert capsys.readouterr().err == (
        "diffumask: error: augment runs as one process; run it without torchrun/srun and with DIFFUMASK_SHARD unset "
        "(generate, refine, train and filter are the commands that share their work between workers)\n")
    assert not (tmp_path / "run").exists() and not (tmp_path / "aug").exists()


def test_every_share_of_a_job_array_says_what_happened_in_its_own_log(tmp_path, saved_pipelines, monkeypatch, capsys):
    """Each task of an array is a job with a log of its own: share 2 of 2 is told of its interrupt and shown the
    usage with an options error, as a lone process is (a launcher's workers, sharing one log, leave it to the
    first). A --shard given over an exported DIFFUMASK_SHARD holds for the command only."""
    import diffumask.generate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(diffumask.generate, "generate_images", interrupted)
    monkeypatch.setenv("DIFFUMASK_SHARD", "0/4")
    assert main(["generate", "--model", saved_pipelines["sd1"], "--classes", "dog,cat", "--images-per-class", "2",
                 "--steps", "1", "--batch-size", "1", "--out", str(tmp_path / "d"), "--quiet", "--shard", "1/2"]) == 130
    assert capsys.readouterr().err.splitlines()[-1].startswith("diffumask: interrupted; ")
    assert os.environ["DIFFUMASK_SHARD"] == "0/4"
    monkeypatch.setenv("DIFFUMASK_SHARD", "1/2")
    with pytest.raises(SystemExit):
        main(["generate", "--classes", "dog,,cat", "--out", str(tmp_path / "e")])
    assert capsys.readouterr().err.startswith("usage: diffumask generate")


def test_a_command_run_alone_and_a_sharded_job_never_write_one_dataset_at_once(tmp_path, saved_pipelines, monkeypatch,
                                                                               capsys):
    """A second run of a job, or a plain run beside a sharded job's workers (an array still running), redid their
    items and compacted the manifest under them. A command run as one process holds the dataset's lock alone, a
    sharded job's workers share it: whichever comes second is refused in one line and writes nothing, and the
    shares of one job go on together."""
    out = tmp_path / "d"
    args = ["--model", saved_pipelines["sd1"], "--classes", "dog,cat", "--images-per-class", "2", "--steps", "1",
            "--batch-size", "1", "--threshold", "0.8", "--out", str(out), "--quiet"]
    alone = ("another diffumask command (generate, refine, filter, augment, shapes export) is writing {} now: wait "
             "for it to end, then run this one again (to split one job between several commands, give each --shard "
             "INDEX/COUNT)")
    starting = Dataset.create(tmp_path / "new", ["dog", "cat"], {}, worker=Worker(0, 2))
    before = snapshot(starting.root)
    with starting.writing():  # a job's first share, no item finished yet: its settings are not rewritten
        assert main(["generate", "--model", saved_pipelines["sd1"], "--classes", "bird", "--steps", "1", "--out",
                     str(starting.root), "--quiet"]) == 2
    assert capsys.readouterr().err == f"diffumask: error: {alone.format(starting.root)}\n"
    assert snapshot(starting.root) == before
    with Dataset(starting.root, worker=Worker()).writing():  # a command run alone, its first item not yet done
        assert main(["generate", "--model", saved_pipelines["sd1"], "--classes", "bird", "--steps", "1", "--out",
                     str(starting.root), "--quiet", "--shard", "0/2"]) == 2
    assert "a diffumask command run as one process is writing" in capsys.readouterr().err
    assert snapshot(starting.root) == before
    joined = joined_terms(monkeypatch)
    assert main(["generate", *args, "--shard", "0/2"]) == 0
    assert not (out / ".job.json").exists()
    capsys.readouterr()
    with Dataset(out, worker=Worker(0, 2)).writing(joined[-1]):  # share 0, at work
        before = snapshot(out)
        for command in (["generate", *args], ["refine", str(out), "--method", "threshold", "--workers", "1"]):
            assert main(command) == 2
            assert capsys.readouterr().err == f"diffumask: error: {alone.format(out)}\n"
        assert snapshot(out) == before
        assert main(["generate", *args, "--shard", "1/2"]) == 0
    assert "the dataset is complete" in capsys.readouterr().out
    before = snapshot(out)
    with Dataset(out).writing():  # a command run alone (a refine), at work
        for command in (["generate", *args], ["refine", str(out), "--method", "threshold", "--workers", "1"]):
            assert main([*command, "--shard", "0/2"]) == 2
            assert capsys.readouterr().err == (
                f"diffumask: error: a diffumask command run as one process is writing {out} now: wait for it to end, "
                "then start this job's workers again\n")
        assert snapshot(out) == before and out.is_dir()
    (out / ".job.json").write_text('{"command": "generate", "shares": 2}')  # a killed job's terms and rank lock
    (out / ".worker.1.lock").touch()
    assert main(["refine", str(out), "--method", "threshold", "--workers", "1", "--quiet"]) == 0
    assert not [p for p in (".job.json", ".worker.1.lock") if (out / p).exists()]  # gone with the next writer


def joined_terms(monkeypatch) -> list:
    """The terms each sharded worker joins its job on (diffumask.dataset._join's), as the calls come."""
    import diffumask.dataset

    seen = []
    join = diffumask.dataset._join

    def spy(handle, root, terms, tries=10):
        seen.append(terms)
        return join(handle, root, terms, tries)

    monkeypatch.setattr(diffumask.dataset, "_join", spy)
    return seen


def test_a_share_started_with_other_terms_than_the_job_at_work_is_refused(tmp_path, saved_pipelines, monkeypatch,
                                                                         capsys):
    """The shares of one job split the items by their worker count and batches: a share started with another --shard
    COUNT or batch size beside the others would make some items twice and others never, and one with other settings
    re-initialised dataset.json under the first share's first batch. Refused in one line, writing nothing (a sharded
    refine beside a sharded generate too); once the job has ended, a job on other terms resumes the dataset."""
    import diffumask.generate

    out = tmp_path / "d"
    args = ["--model", saved_pipelines["sd1"], "--classes", "dog,cat", "--images-per-class", "2", "--steps", "1",
            "--threshold", "0.8", "--out", str(out), "--quiet"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    joined = joined_terms(monkeypatch)
    with monkeypatch.context() as patch:  # share 0 of 2 in its first batch, no item finished yet
        patch.setattr(diffumask.generate, "generate_images", interrupted)
        assert main(["generate", *args, "--batch-size", "1", "--shard", "0/2"]) == 130
    terms = joined[-1]
    assert (terms["command"], terms["shares"], terms["batch_size"]) == ("generate", 2, 1)
    assert not (out / ".job.json").exists()  # its last worker gone, the job's terms go
    capsys.readouterr()
    with Dataset(out, worker=Worker(0, 2)).writing(terms):
        before = snapshot(out)
        for extra, difference in ((["--batch-size", "1", "--shard", "1/3"],
                                   "shares differs: 2 in the job at work, 3 now"),
                                  (["--batch-size", "2", "--shard", "1/2"],
                                   "batch_size differs: 1 in the job at work, 2 now"),
                                  (["--batch-size", "1", "--shard", "1/2", "--seed", "7"],
                                   "dataset.settings.seed differs: 0 in the job at work, 7 now")):
            assert main(["generate", *args, *extra]) == 2
            assert capsys.readouterr().err == (
                f"diffumask: error: the workers of a sharded diffumask generate are writing {out} now with other terms "
                f"({difference}); the workers of one job run the same command but for --shard's INDEX: start this one "
                "so, or wait for the job to end\n")
        assert snapshot(out) == before  # dataset.json keeps share 0's seed
        assert main(["generate", *args, "--batch-size", "1", "--shard", "0/2"]) == 2  # share 0 again, beside itself
        assert capsys.readouterr().err == (
            f"diffumask: error: the sharded job's worker 0 (of 2) is writing {out} already: its share or launch was "
            "started twice; let that run end, then re-run it to resume what is left\n")
        assert snapshot(out) == before
        with monkeypatch.context() as patch:  # the job's other share, under a launcher of its own
            patch.setenv("RANK", "1")
            patch.setenv("WORLD_SIZE", "2")
            assert main(["generate", *args, "--batch-size", "1", "--shard", "1/2"]) == 0
    assert main(["generate", *args, "--batch-size", "2", "--shard", "0/3"]) == 0  # a later job, on its own terms
    terms = joined[-1]
    with Dataset(out, worker=Worker(0, 3)).writing(terms):
        assert main(["refine", str(out), "--method", "threshold", "--workers", "1", "--shard", "1/3"]) == 2
        assert capsys.readouterr().err.endswith(
            f"error: the workers of a sharded diffumask generate are writing {out} now: wait for them to end, then run "
            "refine\n")
    assert main(["refine", str(out), "--method", "threshold", "--workers", "1", "--shard", "0/2", "--quiet"]) == 0
    with Dataset(out, worker=Worker(0, 2)).writing(joined[-1]):  # refine's share 0, at work
        assert main(["refine", str(out), "--method", "otsu", "--workers", "1", "--shard", "1/2"]) == 2
        assert ('(refine.method differs: "threshold" in the job at work, "otsu" now; '
                in capsys.readouterr().err)  # the method first, not its parameters


def test_a_sharded_worker_joins_a_job_only_on_its_terms(tmp_path):
    """The lock protocol itself, with one open file per worker as separate processes hold them: workers on the same
    terms share the lock, one on others is refused while any of them is at work and starts its own job after; a
    reader's probe at the moment the first worker comes does not make it read a finished job's terms as live."""
    import fcntl
    import threading

    from diffumask.dataset import BeingWritten, _join, _leave

    root = tmp_path
    running = root / ".running"
    running.touch()
    first, second, other = (open(running, "a+") for _ in range(3))
    _join(first, root, {"command": "generate", "workers": 2})
    _join(second, root, {"command": "generate", "workers": 2})
    with pytest.raises(BeingWritten, match=r"other terms \(workers differs: 2 in the job at work, 4 now\)"):
        _join(other, root, {"command": "generate", "workers": 4})
    _leave(first, root)
    with pytest.raises(BeingWritten):  # one worker of the job still at work
        _join(other, root, {"command": "generate", "workers": 4})
    _leave(second, root)
    assert not (root / ".job.json").exists()  # gone with the job's last worker
    (root / ".job.json").write_text('{"command": "generate", "workers": 2}')  # a killed job's
    _join(other, root, {"command": "generate", "workers": 4})  # no job at work: this one sets the terms
    assert json.loads((root / ".job.json").read_text()) == {"command": "generate", "workers": 4}
    fcntl.flock(other, fcntl.LOCK_UN)
    probe = open(running, "r+")
    fcntl.flock(probe, fcntl.LOCK_EX)  # a reader's probe (Dataset.being_written), let go a moment later
    threading.Timer(0.05, fcntl.flock, (probe, fcntl.LOCK_UN)).start()
    _join(first, root, {"command": "refine", "workers": 2})  # not refused for the stale generate terms
    assert json.loads((root / ".job.json").read_text()) == {"command": "refine", "workers": 2}
    threading.Timer(0.05, _leave, (first, root)).start()  # the job's last worker, leaving a moment later ...
    _join(second, root, {"command": "generate", "workers": 8})  # ... and a new job's worker, which waits for it
    assert json.loads((root / ".job.json").read_text()) == {"command": "generate", "workers": 8}
    _leave(second, root)
    assert not (root / ".job.json").exists()
    torchrun = {"command": "filter", "workers": 2, "launch": {"MASTER_ADDR": "n1", "MASTER_PORT": "29500"}}
    _join(first, root, torchrun)
    with pytest.raises(BeingWritten, match=r"another launch of a sharded diffumask filter \(torchrun, srun\) is "):
        _join(other, root, {**torchrun, "launch": {"MASTER_ADDR": "n1", "MASTER_PORT": "29501"}})
    _leave(first, root)
    for handle in (first, second, other, probe):
        handle.close()


HOLD_AND_FORK = """
import multiprocessing, sys, time
from diffumask.dataset import Dataset
from diffumask.distributed import Worker
sharded = sys.argv[2] == "1"
with Dataset(sys.argv[1], worker=Worker(0, 2) if sharded else Worker()).writing({"command": "filter"}):
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))  # as a data loader forks
    child.start()
    print(child.pid, flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("sharded", [False, True], ids=["alone", "sharded"])
def test_a_forked_child_does_not_keep_a_killed_writers_lock(tmp_path, sharded):
    """filter forks data loader workers while it holds the dataset; a flock belongs to the open file, which a fork
    shares, so after filter was killed outright its orphaned workers held the dataset for seconds and the re-run was
    told that another command was writing. The child's copies of the locks are dropped at the fork."""
    import signal

    root = Dataset.create(tmp_path / "d", ["dog"], {}, worker=Worker()).root
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_FORK, str(root), str(int(sharded))],
                              stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        holder.kill()
        holder.wait()
        os.kill(child, 0)  # the forked child lives on
        if sharded:  # the killed worker's share run again: its rank's lock is free
            with Dataset(root, worker=Worker(0, 2)).writing({"command": "filter"}):
                pass
        with Dataset(root, worker=Worker()).writing():
            pass
    finally:
        os.kill(child, signal.SIGKILL)
        holder.stdout.close()


def test_a_writer_that_finds_its_dataset_re_initialised_since_it_opened_it_is_refused(tmp_path):
    """Two commands started together on a folder with no finished item each re-initialise it before either holds
    the lock: the one whose settings dataset.json no longer holds is refused when it takes the lock."""
    from diffumask.dataset import BeingWritten

    first = Dataset.create(tmp_path / "d", ["dog"], {"steps": 1}, worker=Worker())
    second = Dataset.create(tmp_path / "d", ["dog"], {"steps": 2}, worker=Worker())
    with pytest.raises(BeingWritten, match="re-initialised .* with other settings just now"):
        with first.writing():
            pass
    with second.writing():
        pass


def test_commands_that_do_not_shard_refuse_a_launcher(tmp_path, monkeypatch, capsys):
    """augment, predict and evaluate under torchrun/srun: every worker would do all the work and append each item to
    the manifest once per worker; refused in one line before anything is written."""
    data = make_dataset(tmp_path / "data", n=2, size=32, soft_maps=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for command in (["augment", str(data.root), "--out", str(tmp_path / "aug")],
                    ["predict", str(tmp_path / "run"), str(data.root), "--out", str(tmp_path / "pred")],
                    ["evaluate", str(tmp_path / "run"), str(data.root)],
                    ["shapes", "export", str(tmp_path / "world"), "--train", "2", "--val", "0", "--test", "0"]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        name = " ".join(command[:2]) if command[0] == "shapes" else command[0]
        assert err == (f"diffumask: error: {name} runs as one process; run it without torchrun/srun (generate, "
                       "refine, train and filter are the commands that share their work between workers)\n"), err
    assert not [p for p in ("aug", "pred", "world") if (tmp_path / p).exists()]


@pytest.mark.parametrize("rank", ["0", "1"])
def test_under_a_launcher_only_the_first_worker_prints_the_usage_with_a_command_line_error(
        tmp_path, monkeypatch, capsys, rank):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(SystemExit) as stop:
        main(["generate", "--classes", "circle,,star", "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == ("diffumask generate: error: argument --classes: 'circle,,star' has an empty name between two "
                       "commas; list each name once, e.g. dog,cat")
    assert err[0].startswith("usage: diffumask generate") == (rank == "0")
    assert len(err) == 1 or rank == "0"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_torchrun_workers_write_the_same_dataset(tmp_path, saved_pipelines):
    """1 and 3 workers (torchrun on CPU) make byte-identical datasets: ids, images, masks, soft maps,
    manifest and split lists."""
    args = ["diffumask", "generate", "--model", saved_pipelines["sd1"], "--classes", ",".join(CLASSES),
            "--images-per-class", "5", "--steps", "2", "--batch-size", "2", "--prompts", "voc",
            "--threshold", "0.8", "--device", "cpu", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([str(BIN / "diffumask"), *args[1:], "--out", str(tmp_path / "one")], check=True, env=env,
                   capture_output=True)
    subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "3", "--no-python",
                    str(BIN / "diffumask"), *args[1:], "--out", str(tmp_path / "three")], check=True, env=env,
                   capture_output=True)
    one, three = snapshot(tmp_path / "one"), snapshot(tmp_path / "three")
    assert len(Dataset(tmp_path / "three").records()) == 10
    assert one == three


def test_refine_workers_share_the_node_between_torchrun_ranks(monkeypatch):
    from diffumask.workers import available_cores

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert available_cores() == max(1, cores // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores * 4))
    assert available_cores() == 1
