"""The dataset directory: the one contract between diffumask's stages.

Layout (Pascal VOC compatible, plus soft maps and a manifest)::

    DATASET/
      dataset.json                  how the dataset was made (checked on every re-run)
      classes.json                  label map: 0 background, 1..n classes, 255 ignore
      manifest.jsonl                one line per finished item (+ manifest.<rank>.jsonl while sharded)
      JPEGImages/<id>.jpg|png
      SoftMaps/<id>.npz             per-class soft maps, float16
      SegmentationClass/<id>.png    palette PNG, class index per pixel, 255 = uncertain
      ImageSets/Segmentation/<split>.txt
      .running                      every command writing the dataset holds a lock on it (shared by a sharded
                                    job's workers, alone otherwise)
      .job.json                     the terms every worker of the sharded job at work must share (Dataset.writing)
      .worker.<rank>.lock           held by that worker of the sharded job at work

Every file is written under a temporary name, flushed to the disk (``fsync``) and renamed, and the
folder is synced after the rename; an item counts as finished only once its manifest line is
written (last, and synced too), so a run killed at any moment — or a power cut — leaves whole
items only. While a stage runs the manifest is appended to: a later line for an id (``refine`` appends
one per item with its new mask) supersedes the earlier one, so a stage that rewrites masks records each
one as it goes; a finished stage compacts it to each item's latest line (:meth:`Dataset.compact`, an
atomic rewrite). Readers never change the manifest; a writer cuts a torn last line before appending.

Workers of a sharded job (torchrun, Slurm: :mod:`diffumask.distributed`) never write the same item,
and each appends to its own shard ``manifest.<rank>.jsonl``, so no two processes ever append to
one file. Readers merge the shards; a line's ``rev`` (how many times the item was rewritten) says
which line of an item is the latest across files. The worker that finishes the last item merges
the shards back into ``manifest.jsonl`` (under a lock file), so a finished dataset has one manifest.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import fcntl
import functools
import glob
import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from . import softmaps
from .distributed import Worker, current_worker
from .errors import ConfigError, DiffumaskError, UnreadableFile, setting_differences

IGNORE_INDEX = 255
OBJECT_FOLDER = "SegmentationObject"  # optional per-item instance numbers (VOC's layout): 0 none, 255 void
SKIPPED_FILE = ".skipped"  # ids a run chose not to write (flagged="skip"), one per line
RUNNING_FILE = ".running"  # a command writing the dataset holds a lock on it (Dataset.writing)
JOB_FILE = ".job.json"  # the terms of the sharded job writing the dataset, which each of its workers must share
WORKER_LOCK = ".worker.{rank}.lock"  # held by a sharded job's worker of that rank while it writes, so it runs once
LOCK_FILE = ".lock"  # held for short steps of a sharded job's workers: merging the manifest, joining the job
_APPENDING = threading.Lock()  # one process's manifest appends, one at a time (a Dataset must pickle: no lock in it)
JPEG_QUALITY = 95  # of images written as JPEG (at 4:4:4: colours do not bleed across object edges)
PENDING_MASK = ".pending.png"  # SegmentationClass/.<id>.pending.png: a rewritten mask not yet renamed into place
LOST = "lost"  # a manifest line's key: the item's files went missing and a run makes it again (Dataset.finished_whole)
IMAGE_FORMATS = ("jpg", "png")
#: The folders of one file per item, with the suffixes their files take.
ITEM_FOLDERS = {"JPEGImages": tuple(f".{f}" for f in IMAGE_FORMATS), "SegmentationClass": (".png",),
                "SoftMaps": (".npz",), OBJECT_FOLDER: (".png",)}
REFINE_FOLDER = "refine"  # what refine keeps between runs: its trained AffinityNets
NOISE_FOLDER = "noise"  # what filter keeps between runs: its folds' settings, training runs and scores
#: The folders of the dataset's own files, not items' (globs).
METADATA_FOLDERS = (".", "ImageSets/Segmentation", REFINE_FOLDER, NOISE_FOLDER, f"{NOISE_FOLDER}/fold-*")


class DatasetMismatch(DiffumaskError, ValueError):
    """The output folder holds a dataset made with other classes or settings."""


class BeingWritten(DiffumaskError):
    """Another command writes the dataset now (see :meth:`Dataset.writing`)."""


class NotADataset(DiffumaskError, FileNotFoundError):
    """A folder given as a dataset is not one (or its label map / settings cannot be read)."""


class MissingItemFile(UnreadableFile, FileNotFoundError):
    """A finished item's image, mask or soft maps are gone from the disk: named, with the fix."""


@functools.lru_cache(maxsize=None)
def voc_palette(n: int = 256) -> tuple[tuple[int, int, int], ...]:
    """Pascal VOC's bit-interleaved colour map (index 255 is (224, 224, 192) in VOC itself).

    Cached: every mask write needs it, and building it cost more than writing a small PNG.
    """
    palette = []
    for index in range(n):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.append((r, g, b))
    palette[IGNORE_INDEX] = (224, 224, 192)
    return tuple(palette)


BARE_DATASET = frozenset({"dataset.json", "classes.json"})  # what Dataset.create writes before any item


def _fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's) data to the disk; a rename is durable only after both."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _set_and_restore_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


_IMPORT_UMASK = _set_and_restore_umask()  # where the kernel does not report it (setting it races with threads)


def current_umask() -> int:
    """The process's umask as it is now, read without changing it where Linux reports it (``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return _IMPORT_UMASK


def plain_modes(root: Path) -> None:
    """Give ``root`` and all below it the modes mkdir/open would (umask applied): mkdtemp and
    mkstemp, which make outputs appear whole, make them owner-only, unreadable by other users of a
    shared file system (another job's UID, a web server)."""
    umask = current_umask()
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def atomic_write(path: Path, write: Any, exclusive: bool = False, sync: bool = True) -> bool:
    """Call ``write(tmp_path)``, fsync it, rename it over ``path`` and fsync the folder.

    Readers never see a partial file, and after a power cut the file is either the old one or
    the whole new one (the data is on disk before the rename, the rename before we return).
    ``exclusive`` never replaces an existing ``path``: the first of several writers wins, and the
    others get False. ``sync=False`` skips the fsyncs, for a file that means nothing after a crash.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        plain_modes(Path(tmp))
        if sync:
            _fsync_path(Path(tmp))
        if not exclusive:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails where path exists, unlike a rename
            except FileExistsError:
                return False
    finally:
        Path(tmp).unlink(missing_ok=True)
    if sync:
        _fsync_path(path.parent)
    return True


def remove_old_temporaries(folder: Path, before: float) -> None:
    """Delete the temporary files :func:`atomic_write` left in ``folder`` (``.<name>.<random>.tmp``) when its
    writer was killed, of those last changed before ``before`` (a job's start): one changed since is another
    command's write in flight."""
    for path in folder.glob(".*.tmp") if folder.is_dir() else ():
        with contextlib.suppress(FileNotFoundError):  # another cleaner was first
            if path.is_file() and path.stat().st_mtime < before:
                path.unlink()


#: Descriptors of the locks this process holds for a whole command, which a forked child must not keep.
_HELD_LOCKS: set[int] = set()


@contextlib.contextmanager
def _not_inherited(descriptor: int) -> Iterator[None]:
    """Keep a forked child (a data loader's worker, forked while ``filter`` trains its fold models) from holding
    the lock on ``descriptor`` while the block runs: a flock belongs to the open file, which a fork shares, so a
    child outliving a parent killed outright held the dataset for seconds, and the re-run was told that another
    command was writing."""
    _HELD_LOCKS.add(descriptor)
    try:
        yield
    finally:
        _HELD_LOCKS.discard(descriptor)


def _drop_inherited_locks() -> None:
    """In a forked child: point each held lock's descriptor at /dev/null (the number stays valid for the parent's
    objects the child holds), so the lock lives and ends with the parent alone."""
    if not _HELD_LOCKS:
        return
    null = os.open(os.devnull, os.O_RDONLY)
    for descriptor in _HELD_LOCKS:
        os.dup2(null, descriptor, inheritable=False)
    os.close(null)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


#: Seconds a temporary folder must stand unlocked and unchanged before a later run takes it for a killed run's.
ABANDONED_AFTER = 10.0


@contextlib.contextmanager
def temporary_folder(parent: Path, prefix: str) -> Iterator[Path]:
    """A new hidden folder ``parent/.<prefix>.<host>.<random>.tmp`` for output renamed into place once whole;
    removed when the block fails. Its run holds a lock on it, so the next run on this machine removes the ones
    killed runs left beside it (:func:`_remove_abandoned`); where folders cannot be locked (NFS), none is removed.
    The host's name keeps a machine from removing another's: where locks are not shared between machines (NFS with
    ``local_lock``, sshfs), a lock another machine holds is not seen."""
    parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{prefix}.{socket.gethostname()}"
    _remove_abandoned(parent, prefix)
    while True:
        tmp = Path(tempfile.mkdtemp(prefix=f".{prefix}.", suffix=".tmp", dir=parent))
        handle = os.open(tmp, os.O_RDONLY)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a cleaner whose clock runs ahead is removing it: make another
            os.close(handle)
            continue
        except OSError:  # NFS locks no folder: then no run removes it either
            pass
        break
    try:
        with _not_inherited(handle):
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(handle)


def _remove_abandoned(parent: Path, prefix: str) -> None:
    """Remove the folders in ``parent`` named as :func:`temporary_folder` names them after ``prefix`` (mkdtemp's
    eight characters) that no run holds (its lock is free) and that have not changed for :data:`ABANDONED_AFTER`
    seconds (one just made is locked a moment later)."""
    for path in parent.glob(f".{glob.escape(prefix)}." + "[a-z0-9_]" * 8 + ".tmp"):
        try:
            if path.is_symlink() or not path.is_dir() or time.time() - path.stat().st_mtime < ABANDONED_AFTER:
                continue
            handle = os.open(path, os.O_RDONLY)
        except OSError:  # removed meanwhile, or not ours to open
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a run at work holds it, or it cannot be locked here
            os.close(handle)
            continue
        shutil.rmtree(path, ignore_errors=True)
        os.close(handle)


def _flock_soon(handle: IO[Any], operation: int, tries: int) -> bool:
    """Whether ``handle`` got the flock ``operation`` within ``tries`` non-blocking tries, a little apart: a writer
    holds ``.running``'s lock for its whole job, a reader's probe for microseconds (milliseconds on NFS), so a few
    tries tell the two apart. Other lock errors (ENOLCK, NFSv4's EBADF) are raised."""
    for attempt in range(tries):
        try:
            fcntl.flock(handle, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt < tries - 1:
                time.sleep(0.01 * (attempt + 1))
    return False


@contextlib.contextmanager
def _held(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created), waiting for it: for short steps that must not interleave."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _running_lock(root: Path, worker: Worker, job: Any, tries: int = 10) -> Iterator[None]:
    """Hold ``.running``'s lock while the block runs: alone for a command run as one process, without waiting
    beyond the tries (half a second in all), and then a killed sharded job's files go; shared for a worker of a
    sharded job on the terms ``job`` (:func:`_join`), which also holds its rank's own lock (:func:`_own_rank`).
    Opened for reading and writing: NFSv4 takes flock as a POSIX lock, which asks for the mode of the lock (EBADF
    otherwise). Refused: :class:`BeingWritten`."""
    with open(root / RUNNING_FILE, "a+") as handle, _not_inherited(handle.fileno()):
        if not worker.sharded:
            if not _flock_soon(handle, fcntl.LOCK_EX, tries):
                raise BeingWritten(_refusal(root, alone=True))
            _remove_job_files(root)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
            return
        _join(handle, root, job, tries)
        try:
            with _own_rank(root, worker):
                yield
        finally:
            _leave(handle, root)


@contextlib.contextmanager
def _own_rank(root: Path, worker: Worker) -> Iterator[None]:
    """Hold the lock of this worker's rank: a share (or a launch) started twice beside itself joins on the same
    terms, and would make its items twice. Taken after joining and let go before leaving, so a worker holds it only
    while it holds ``.running`` shared, and the job's last worker may remove the file (:func:`_leave`)."""
    with open(root / WORKER_LOCK.format(rank=worker.rank), "a") as handle, _not_inherited(handle.fileno()):
        if not _flock_soon(handle, fcntl.LOCK_EX, 5):
            raise BeingWritten(f"the sharded job's worker {worker.rank} (of {worker.world_size}) is writing {root} "
                               "already: its share or launch was started twice; let that run end, then re-run it to "
                               "resume what is left")
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_job_files(root: Path) -> None:
    """Remove a sharded job's terms and its workers' rank locks, as one holding ``.running`` alone may: no worker of
    the job is at work."""
    (root / JOB_FILE).unlink(missing_ok=True)
    for path in root.glob(WORKER_LOCK.format(rank="*")):
        path.unlink(missing_ok=True)


def _join(handle: IO[str], root: Path, terms: Any, tries: int = 10) -> None:
    """Take ``.running``'s lock on ``handle`` shared, as a worker of a sharded job whose ``terms`` (its command, which
    job it is (:func:`diffumask.distributed.job_terms`) and whatever else decides which worker makes which item,
    and how) every worker at work must share: shares started with another --shard COUNT or batch size would make
    some items twice and others never. The worker that finds none at work writes its terms to :data:`JOB_FILE` (a
    stale file, a killed job's, is overwritten, so a later job resumes with any terms); the others compare theirs.
    Each try runs under the ``.lock`` file, so joining and leaving workers take turns; between tries a leaving worker
    may end the job at work. Refused: :class:`BeingWritten`."""
    terms = json.loads(json.dumps(terms))  # tuples as lists, as they read back
    refusal = _refusal(root, alone=False)
    for attempt in range(tries):
        with _held(root / LOCK_FILE):
            if _flock_soon(handle, fcntl.LOCK_EX, 1):  # no other writer at work: this worker sets the terms
                write_text_atomic(root / JOB_FILE, json.dumps(terms, sort_keys=True) + "\n", sync=False)
            if _flock_soon(handle, fcntl.LOCK_SH, 1):  # on a local file system Linux converts it in one step
                try:
                    recorded = json.loads((root / JOB_FILE).read_text())
                except (OSError, ValueError):
                    recorded = None
                if recorded == terms:
                    return
                fcntl.flock(handle, fcntl.LOCK_UN)  # perhaps a reader's probe kept this worker from writing them
                refusal = _other_terms(root, recorded, terms)
        if attempt < tries - 1:
            time.sleep(0.01 * (attempt + 1))
    raise BeingWritten(refusal)


def _leave(handle: IO[str], root: Path) -> None:
    """Let go of a sharded job's shared lock on ``handle``; the job's last worker to leave removes its terms and rank
    locks, so a dataset reads the same whichever number of workers made it (a killed job's stay until the next
    command that writes the dataset). Taking the lock alone without waiting drops this worker's share of it, and
    any other worker at work keeps it from being taken; a few tries outlast a reader's probe. Each try runs under
    the ``.lock`` file, where a new job's first worker writes its terms and takes its share at once, so a later try
    never removes them; the waits between tries do not hold up the other workers."""
    for attempt in range(5):
        with _held(root / LOCK_FILE):
            if _flock_soon(handle, fcntl.LOCK_EX, 1):
                _remove_job_files(root)
                break
        time.sleep(0.01 * (attempt + 1))
    fcntl.flock(handle, fcntl.LOCK_UN)


def _other_terms(root: Path, recorded: Any, terms: Any) -> str:
    """Why a sharded job's worker may not join the one at work, and what to do."""
    command = recorded.get("command") if isinstance(recorded, dict) else None
    if not isinstance(command, str):
        return (f"a sharded job of another diffumask version is writing {root} now: wait for it to end, then start "
                "this job's workers again")
    if command != terms.get("command"):
        return (f"the workers of a sharded diffumask {command} are writing {root} now: wait for them to end, then "
                f"run {terms.get('command')}")
    if recorded.get("launch") != terms.get("launch") and {"workers", "launch"} <= recorded.keys() & terms.keys():
        return (f"another launch of a sharded diffumask {command} (torchrun, srun) is writing {root} now: wait for it "
                "to end, then start this one again (to run several at once, give each --shard INDEX/COUNT)")
    changed = sorted(setting_differences(recorded, terms, "job at work"),  # a method first, then the shortest
                     key=lambda line: (".method differs" not in line, len(line)))
    shown = "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
    return (f"the workers of a sharded diffumask {command} are writing {root} now with other terms ({shown}); the "
            "workers of one job run the same command but for --shard's INDEX: start this one so, or wait for the job "
            "to end")


def _refusal(root: Path, alone: bool) -> str:
    """Why a writer is refused the lock, and what to do."""
    if alone:
        return (f"another diffumask command (generate, refine, filter, augment, shapes export) is writing {root} now: "
                "wait for it to end, then run this one again (to split one job between several commands, give each "
                "--shard INDEX/COUNT)")
    return (f"a diffumask command run as one process is writing {root} now: wait for it to end, then start this "
            "job's workers again")


def write_text_atomic(path: Path, text: str, sync: bool = True) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), sync=sync)


def read_manifest_text(path: Path) -> str:
    """A manifest file's text; empty where there is none, or where a merge removed a shard since it was listed
    (the merge writes manifest.jsonl first, and readers read it after the shards, so no line goes missing)."""
    try:
        # errors="replace": a line torn inside a multi-byte character is still only a torn line
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def palette_png(mask: np.ndarray) -> bytes:
    """Class indices as palette PNG bytes: viewers show colours, trainers read indices."""
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H, W), got shape {mask.shape}")
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette([v for rgb in voc_palette() for v in rgb])
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def write_palette_png(path: Path, mask: np.ndarray) -> None:
    """A mask as a palette PNG file (:func:`palette_png`), written atomically."""
    data = palette_png(mask)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


REPLACE_FILE = ("replace the file, or take its item out of the split list read; in a dataset diffumask made, delete "
                "it and run again the command that made the dataset, which makes the item again")


@contextlib.contextmanager
def decoding(path: Path, fix: str | Callable[[], str] = REPLACE_FILE) -> Iterator[None]:
    """Turn a decoder's failure on a damaged file into an error that names the file and ``fix`` (a callable: made
    only then)."""
    try:
        yield
    except (OSError, SyntaxError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:  # PIL: truncated
        # or unidentified data, bad chunks; numpy's .npz: a truncated or corrupt archive
        if isinstance(error, UnreadableFile) or getattr(error, "errno", None) is not None:
            raise  # the system's own errors (missing file, permissions) say what they are
        raise UnreadableFile(f"{path} cannot be read ({error}); {fix if isinstance(fix, str) else fix()}",
                             reason=str(error)) from None


def read_rgb(path: Path, fix: str | Callable[[], str] = REPLACE_FILE) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB."""
    with decoding(path, fix), Image.open(path) as image:
        return np.array(image.convert("RGB"))


def read_index_png(path: Path, fix: str | Callable[[], str] = REPLACE_FILE) -> np.ndarray:
    """Read a palette (or grey) PNG back as class indices, never as colours."""
    with decoding(path, fix), Image.open(path) as image:
        if image.mode not in ("P", "L"):
            raise UnreadableFile(f"{path} is a {image.mode} image, not a class-index PNG")
        return np.array(image)


CUT_SUFFIX = ".cut.json"  # ImageSets/Segmentation/<name>.cut.json, beside a list `diffumask filter` cut: what on


def scored_mask(record: Mapping[str, Any]) -> str:
    """The digest of the mask an item's noise score was computed on, ``stale`` where the score no longer belongs
    to the item's mask (refine drops the score of a mask it replaces; a mask rewritten otherwise records a digest
    the score's no longer matches), "" for a score recorded before filter kept mask digests."""
    noise = record.get("noise") or {}
    if "score" not in noise or "mask" in noise and record.get("mask_sha256", "")[:16] not in ("", noise["mask"]):
        return "stale"
    return noise.get("mask", "")


def scored_masks(records: Iterable[Mapping[str, Any]]) -> str:
    """One digest of :func:`scored_mask` over these items: ``filter`` records it for the items of each list it cuts."""
    return hashlib.sha256("".join(f"{r['id']} {scored_mask(r)}\n" for r in sorted(records, key=lambda r: r["id"]))
                          .encode()).hexdigest()


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A label map resized to ``size`` (w, h) where its image lands: by the nearest source pixel to each pixel's
    centre (cv2's INTER_NEAREST_EXACT), and, shrunk by a whole factor (a 2×2 mosaic's tiles), by the label most of
    each block holds, which is centred on the block whatever its size (at an even factor no source pixel lies at
    the block's centre). Plain INTER_NEAREST, what mmseg and torch's ``nearest`` do, samples at the top-left corner
    instead: a mask shrunk 8x sits 0.4 px off its image, one grown 1.7x 0.5 px; a block's corner pixel puts a 2x
    shrink 0.25 px off."""
    import cv2  # here, not at the top: reading and writing datasets needs no OpenCV

    height, width = labels.shape
    fy, fx = height // size[1], width // size[0]
    if fy * fx > 1 and (height, width) == (fy * size[1], fx * size[0]):
        return block_vote(labels, fy, fx)
    return cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST_EXACT)


def block_vote(labels: np.ndarray, fy: int, fx: int) -> np.ndarray:
    """Each fy×fx block's most frequent label (a tie goes to the lower one: the background before an object, an
    object before 255), for a label map whose sides are whole multiples of the blocks'. Each block's labels are
    sorted, so equal ones form runs; the first longest run is the lowest of the most frequent labels."""
    rows, cols = labels.shape[0] // fy, labels.shape[1] // fx
    ordered = np.sort(labels.reshape(rows, fy, cols, fx).transpose(0, 2, 1, 3).reshape(rows, cols, fy * fx), axis=-1)
    position = np.arange(fy * fx)
    starts = np.ones(ordered.shape, bool)
    starts[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    run_length = position - np.maximum.accumulate(np.where(starts, position, 0), axis=-1)  # within its run, from 0
    return np.take_along_axis(ordered, run_length.argmax(axis=-1)[..., None], axis=-1)[..., 0]


def write_label_map(folder: Path, names: Sequence[str]) -> None:
    """``classes.json``: index, name and palette colour of every class (0 background), 255 ignored.

    Datasets and training runs share it, so a run's predictions read like a dataset's masks.
    """
    palette = voc_palette()
    label_map = {"ignore_index": IGNORE_INDEX,
                 "classes": [{"index": i, "name": name, "color": list(palette[i])} for i, name in enumerate(names)]}
    write_text_atomic(Path(folder) / "classes.json", json.dumps(label_map, indent=1) + "\n")


def read_label_map(folder: Path) -> list[str]:
    """Class names by index from a ``classes.json`` (index 0 first)."""
    label_map = json.loads((Path(folder) / "classes.json").read_text())
    return [c["name"] for c in sorted(label_map["classes"], key=lambda c: c["index"])]


class Dataset:
    """A dataset directory on disk; see the module docstring for the layout."""

    def __init__(self, root: str | os.PathLike[str], worker: Worker | None = None):
        self.root = Path(root)
        self.worker = current_worker() if worker is None else worker  # whose manifest shard appends go to
        self.opened = time.time()  # what a job that opened it now may take as left over from before
        self._remade: dict[str, int] = {}  # lost items this run makes again → the rev their new line takes
        if not self.root.exists():
            raise NotADataset(f"{self.root} does not exist; give the folder of a dataset `diffumask generate` made")
        if not (self.root / "classes.json").is_file():
            raise NotADataset(
                f"{self.root} is not a diffumask dataset (no classes.json); "
                "create one with `diffumask generate` or Dataset.create()"
            )
        try:
            self.classes: list[str] = read_label_map(self.root)[1:]
            info = json.loads((self.root / "dataset.json").read_text())
            self.settings: dict[str, Any] = info["settings"]
            self.dataset_json: dict[str, Any] = info  # as opened: a writer finds it unchanged (writing)
            self.image_format: str = info["image_format"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise NotADataset(f"{self.root} is not a readable diffumask dataset: classes.json or dataset.json "
                              f"is missing or damaged ({type(error).__name__}: {error})") from None

    @staticmethod
    def check_location(root: str | os.PathLike[str]) -> Path:
        """Refuse, before any work, an output path that can never hold a dataset (a file, or under one)."""
        root = Path(root)
        for folder in [root, *root.parents]:
            if folder.exists():
                if not folder.is_dir():
                    what = "is a file" if folder == root else f"lies under {folder}, which is a file"
                    raise ConfigError(f"cannot write a dataset to {root}: it {what}; choose a folder")
                if not os.access(folder, os.W_OK | os.X_OK):
                    raise ConfigError(f"cannot write a dataset to {root}: {folder} is not writable")
                break
        return root

    # ----------------------------------------------------------------- creation
    @staticmethod
    def info(settings: Mapping[str, Any], image_format: str = "jpg", jpeg_quality: int = JPEG_QUALITY) -> dict[str, Any]:
        """dataset.json's contents, normalised (tuples as lists) so that comparisons are exact."""
        return json.loads(json.dumps({"image_format": image_format, "jpeg_quality": jpeg_quality,
                                      "settings": dict(settings)}))

    @classmethod
    def check_resumable(cls, root: Path, classes: Sequence[str], info: Mapping[str, Any],
                        unknown: Iterable[str] = ()) -> bool:
        """Whether ``root`` holds finished items of a dataset made with these classes and ``info`` (dataset.json's
        contents: settings, image format); a :class:`DatasetMismatch` when it holds one made otherwise. Settings
        named in ``unknown`` are not compared (a caller that checks before loading the model does not know them
        all yet)."""
        if not ((root / "dataset.json").is_file() and (root / "classes.json").is_file() and cls(root)._latest()):
            return False
        existing = json.loads((root / "dataset.json").read_text())
        old_classes = [c["name"] for c in json.loads((root / "classes.json").read_text())["classes"][1:]]
        if old_classes != list(classes):
            raise DatasetMismatch(f"{root} holds a dataset of classes {old_classes}, not {list(classes)}; "
                                  "choose another output folder")
        skip = set(unknown)
        existing = {**existing, "settings": {k: v for k, v in existing.get("settings", {}).items() if k not in skip}}
        info = {**info, "settings": {k: v for k, v in info["settings"].items() if k not in skip}}
        if existing != info:
            old_keys, new_keys = set(existing["settings"]), set(info["settings"])
            if old_keys and new_keys and not old_keys & new_keys:
                raise DatasetMismatch(f"{root} holds a dataset another command made (its settings share none "
                                      "with these); choose another output folder")
            changed = setting_differences(existing["settings"], info["settings"], "dataset")
            changed = changed or setting_differences(existing, info, "dataset")  # the image format
            shown = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
            raise DatasetMismatch(
                f"{root} holds a dataset made with other settings ({shown}); "
                "re-run with the same settings to resume, or choose another output folder"
            )
        return True

    @classmethod
    def create(
        cls,
        root: str | os.PathLike[str],
        classes: Iterable[str],
        settings: Mapping[str, Any],
        image_format: str = "jpg",
        jpeg_quality: int = JPEG_QUALITY,
        worker: Worker | None = None,
        job: Any = None,
    ) -> Dataset:
        """Create the directory, or reopen it when it was made with the same classes and settings.

        A folder whose dataset has no finished item yet is simply re-initialised, unless a command is at work on
        it: for a worker of a sharded job, one of another job (``job``, its terms: :meth:`writing`).
        """
        root = Dataset.check_location(root)
        classes = list(classes)
        if not classes:
            raise ValueError("a dataset needs at least one class")
        if len(set(classes)) != len(classes):
            raise ValueError(f"duplicate class names in {classes}")
        if reserved := [c for c in classes if c.startswith("__") or "@" in c]:
            raise ConfigError(f"class names may not start with '__' or contain '@' (soft-map keys use them): {reserved}")
        if len(classes) >= IGNORE_INDEX:
            raise ConfigError(f"at most {IGNORE_INDEX - 1} classes fit in a palette PNG, got {len(classes)}")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        info = cls.info(settings, image_format, jpeg_quality)
        if cls.check_resumable(root, classes, info):
            return cls(root, worker)
        # A run that failed before its first item, or another worker of this job creating it right now
        # (the lock file comes first, then dataset.json, and temporary files are hidden: it never looks foreign).
        holds_empty_dataset = (root / "dataset.json").is_file()
        if root.exists() and any(not p.name.startswith(".") for p in root.iterdir()) and not holds_empty_dataset:
            raise DatasetMismatch(f"{root} exists and is not a diffumask dataset; choose an empty or new folder")
        root.mkdir(parents=True, exist_ok=True)
        # Written under the lock: never under a command at work on the folder (its first item not yet done), and
        # a command that opened it before finds the change when it takes the lock (writing).
        with _running_lock(root, current_worker() if worker is None else worker, job):
            if not cls.check_resumable(root, classes, info):  # again: a job at work may have finished its first item
                write_text_atomic(root / "dataset.json", json.dumps(info, indent=1) + "\n")
                write_label_map(root, ["background", *classes])
        return cls(root, worker)

    @property
    def jpeg_quality(self) -> int:
        return int(json.loads((self.root / "dataset.json").read_text())["jpeg_quality"])

    def class_index(self, name: str) -> int:
        return self.classes.index(name) + 1

    # ----------------------------------------------------------------- paths
    def image_path(self, item_id: str) -> Path:
        return self.root / "JPEGImages" / f"{item_id}.{self.image_format}"

    def mask_path(self, item_id: str) -> Path:
        return self.root / "SegmentationClass" / f"{item_id}.png"

    def soft_maps_path(self, item_id: str) -> Path:
        return self.root / "SoftMaps" / f"{item_id}.npz"

    @property
    def manifest_path(self) -> Path:
        """The merged manifest (what a finished dataset holds)."""
        return self.root / "manifest.jsonl"

    @property
    def append_path(self) -> Path:
        """Where this process appends: the manifest, or its own shard when the job is sharded."""
        return self.root / f"manifest.{self.worker.rank}.jsonl" if self.worker.sharded else self.manifest_path

    def shard_paths(self) -> list[Path]:
        """Per-rank manifest shards, by rank."""
        shards = [p for p in self.root.glob("manifest.*.jsonl") if p.name.split(".")[1].isdigit()]
        return sorted(shards, key=lambda p: int(p.name.split(".")[1]))

    # ----------------------------------------------------------------- manifest
    def _lines(self) -> list[dict[str, Any]]:
        """Every complete line of the manifest, then of each shard; a torn last line (a killed run) is
        skipped, never rewritten."""
        # Shards are read before the manifest: a compaction between the two reads then shows its lines twice
        # (harmless: the latest wins), never not at all.
        texts = {path: read_manifest_text(path) for path in self.shard_paths()}
        texts = {self.manifest_path: read_manifest_text(self.manifest_path), **texts}
        out = []
        for path, text in texts.items():
            lines = text.splitlines(keepends=True)
            for number, line in enumerate(lines):
                try:
                    if not line.endswith("\n"):
                        raise ValueError("unterminated line")
                    out.append(json.loads(line))
                except ValueError:
                    if number != len(lines) - 1:
                        raise DiffumaskError(f"{path}: line {number + 1} is not valid JSON") from None
        return out

    def _latest(self, lines: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Every item's latest manifest line (the highest ``rev``; among equal ones the later line), in the
        order items were first written; flagged items too. ``lines``: :meth:`_lines`, already read."""
        latest: dict[str, dict[str, Any]] = {}
        for record in self._lines() if lines is None else lines:
            known = latest.get(record["id"])
            if known is None or record.get("rev", 0) >= known.get("rev", 0):
                latest[record["id"]] = record  # dict order stays the order of first appearance
        return list(latest.values())

    def records(self) -> list[dict[str, Any]]:
        """Finished items in the order they were first written, each as its latest manifest line; items
        the pipeline's safety checker flagged (a line, no files: see :meth:`record_flagged`) left out.

        Read-only: a torn last line is skipped here and cut by the next writer.
        """
        return [r for r in self._latest() if not r.get("flagged") and not r.get(LOST)]

    def flagged_records(self) -> list[dict[str, Any]]:
        return [r for r in self._latest() if r.get("flagged")]

    def finished_ids(self) -> set[str]:
        """Ids a re-run need not make again: written items and flagged ones (not those marked lost)."""
        return {r["id"] for r in self._latest() if not r.get(LOST)}

    def lost_ids(self) -> set[str]:
        """Items marked lost (:meth:`finished_whole`) that no run has made again yet."""
        return {r["id"] for r in self._latest() if r.get(LOST)}

    def finished_whole(self, share: Iterable[str]) -> set[str]:
        """The finished ids a re-run keeps: :meth:`finished_ids`, less those of ``share`` (the items this run makes)
        whose image or mask is gone (a disk fault, a file deleted by hand), so a re-run makes them again. Soft maps
        alone do not count: a SoftMaps folder emptied to save space must not make every later re-run remake the
        dataset (validate says to delete such an item's image too, to have it made again whole).

        Each such item first gets a line marking it lost, so no reader takes it and no worker of a sharded job takes
        the job for complete (and merges the shards under this one) until it is made again; its new line then
        supersedes the mark (a higher ``rev``, however often the item was rewritten before). An item a stopped run
        marked is made again too. Folders are listed once: no file is opened."""
        latest = {r["id"]: r for r in self._latest()}
        present = {name: _names(self.root / name) for name in ("JPEGImages", "SegmentationClass")}
        marks, remade = [], {}
        for item_id in share:
            record = latest.get(item_id)
            if record is None or record.get("flagged"):
                continue
            if not record.get(LOST):
                if (gone := self._gone(item_id, present)) is None:
                    continue
                record = {"id": item_id, "split": record.get("split", "train"), "rev": record.get("rev", 0) + 1,
                          LOST: gone}
                marks.append(record)
            remade[item_id] = record["rev"] + 1
        if marks:
            with self.lock():  # not while another worker merges the shards: it would remove a mark unread
                for record in marks:
                    self._append_record(record)
            warnings.warn(f"{len(marks)} finished item(s) of {self.root} lost their files (e.g. {marks[0]['id']}: "
                          f"{marks[0][LOST]}): making them again", stacklevel=2)
        self._remade.update(remade)
        return {item_id for item_id, record in latest.items() if not record.get(LOST)} - set(remade)

    def _gone(self, item_id: str, present: Mapping[str, set[str]]) -> str | None:
        """Which file of a finished item, its image or its mask, is gone, if one is."""
        for what, path in (("image", self.image_path(item_id)), ("mask", self.mask_path(item_id))):
            staged = what == "mask" and self.pending_mask_path(item_id).name in present["SegmentationClass"]
            if path.name not in present[path.parent.name] and not staged:
                return f"{what} missing ({path.relative_to(self.root)})"
        return None

    def _repair_manifest(self) -> None:
        """Cut a torn last line (a run killed mid-append) of this process's manifest file, so the next
        line starts clean. Writers only."""
        if not self.append_path.is_file():
            return
        with open(self.append_path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            data = f.read()
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())

    def _append_record(self, record: Mapping[str, Any]) -> None:
        if (rev := self._remade.pop(record["id"], None)) is not None:  # a lost item made again
            record = {**record, "rev": max(rev, record.get("rev", 0))}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with _APPENDING:  # several writer threads append lines (and repair a torn one) in turn
            self._repair_manifest()
            created = not self.append_path.exists()
            with open(self.append_path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            if created:
                _fsync_path(self.root)  # the new file's name is durable too

    # ----------------------------------------------------------------- items
    def write_item(
        self,
        item_id: str,
        image: np.ndarray | Image.Image,
        record: Mapping[str, Any],
        mask: np.ndarray | None = None,
        soft_maps: Mapping[str, np.ndarray] | None = None,
        split: str = "train",
        in_order: Callable[[Callable[[], Any]], Any] | None = None,
    ) -> None:
        """Write one item's files, then its manifest line (which marks it finished); ``in_order``: what runs the
        append (a :class:`BackgroundWriter`'s ``in_turn``, so that several threads append in submission order)."""
        if "/" in item_id or item_id.startswith("."):
            raise ValueError(f"invalid item id {item_id!r}")
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
        pil = pil.convert("RGB")
        if self.image_format == "jpg":
            quality = self.jpeg_quality
            atomic_write(self.image_path(item_id),
                          lambda tmp: pil.save(tmp, format="JPEG", quality=quality, subsampling=0))
        else:
            atomic_write(self.image_path(item_id), lambda tmp: pil.save(tmp, format="PNG"))
        if soft_maps is not None:
            # softmaps.pack's arrays are stored as they are; plain maps (no __meta__) as float16
            arrays = (dict(soft_maps) if softmaps.META_KEY in soft_maps
                      else {k: np.asarray(v, dtype=np.float16) for k, v in soft_maps.items()})
            atomic_write(self.soft_maps_path(item_id), lambda tmp: _save_npz(tmp, arrays))
        if mask is not None:
            if mask.shape != (pil.height, pil.width):
                raise ValueError(f"mask shape {mask.shape} does not match image size {(pil.height, pil.width)}")
            write_palette_png(self.mask_path(item_id), mask)
        append = functools.partial(self._append_record, {"id": item_id, "split": split, **record})
        if in_order is None:
            append()
        else:
            in_order(append)

    def note_skipped(self, item_id: str) -> None:
        """Note an item a worker chose not to write (a flagged image with flagged="skip"), so the worker that
        finishes last still knows the job is done; a re-run tries it again."""
        with self.lock(), open(self.root / SKIPPED_FILE, "a", encoding="utf-8") as f:
            f.write(item_id + "\n")
            f.flush()
            os.fsync(f.fileno())

    def retry_skipped(self, ids: Iterable[str]) -> None:
        """Take these ids off the skipped list: this worker makes them again, so until it has, the job is not
        complete (another worker finishing first would merge the shards under it)."""
        with self.lock():
            skipped = self.skipped_ids()
            if again := skipped & set(ids):
                write_text_atomic(self.root / SKIPPED_FILE, "".join(f"{i}\n" for i in sorted(skipped - again)))

    def remove_interrupted_writes(self, ids: set[str]) -> None:
        """Delete what killed writers left (atomic_write's ``.<file>.<random>.tmp``) of these finished items' files
        (image, mask, soft maps, a refine's staged mask), and :meth:`remove_old_temporaries`: the resumed run wrote
        each whole under its own name, and ``validate`` would report every leftover. Under the lock, once all of a
        job's items are finished, when none of their files is being written."""
        for folder in (self.root / name for name in ITEM_FOLDERS):
            for path in folder.glob(".*.tmp") if folder.is_dir() else ():
                written = path.name[1:-len(".tmp")].rsplit(".", 1)[0]  # atomic_write's ".<name>.<random>.tmp"
                staged = written.startswith(".") and written.endswith(PENDING_MASK)  # ".<id>.pending.png"
                if (written[1:-len(PENDING_MASK)] if staged else Path(written).stem) in ids:
                    path.unlink(missing_ok=True)  # another cleaner may have been first
        self.remove_old_temporaries()

    def remove_old_temporaries(self) -> None:
        """Delete what killed writers left of the dataset's own files (manifest, split lists, an AffinityNet's
        weights, filter's fold scores): the temporary files older than this job (its :class:`Dataset` was
        opened); one begun since is another command's in flight (``filter``'s split lists during a refine)."""
        for pattern in METADATA_FOLDERS:
            for folder in [self.root] if pattern == "." else self.root.glob(pattern):
                remove_old_temporaries(folder, self.opened)

    def unfinished(self) -> str | None:
        """Why the dataset is not whole yet, as a reader that takes every item should warn (None: it is)."""
        if self.being_written():
            return ("a diffumask command (generate, refine, filter, augment, shapes export) is writing it now, so it "
                    "holds only the items finished so far: wait for that command to end")
        if self.shard_paths():
            return ("a sharded run on it stopped before its end (its manifest shards are not merged), so it holds only "
                    "the items finished so far: re-run that command, with any number of workers, to finish")
        pending = (self.root / "SegmentationClass").glob(f".*{PENDING_MASK}")
        lines = self._lines()
        latest = self._latest(lines)
        if lost := [r for r in latest if r.get(LOST)]:
            return (f"{len(lost)} of its items lost their files (e.g. {lost[0]['id']}: {lost[0][LOST]}) and the run "
                    "making them again stopped before its end, so they are left out: re-run it to finish")
        if any(line.get(LOST) for line in lines):  # made again, but the manifest not compacted yet
            return ("the run that made again its items that had lost their files stopped before its end: re-run it "
                    "to finish")
        if next(pending, None) is not None or len(lines) != len({line["id"] for line in lines}):
            return ("a refine on it stopped before its end, so some items hold refined masks and the others earlier "
                    "ones: re-run the same refine to finish")
        items = [r for r in latest if not r.get("flagged")]
        if unrefined := [r["id"] for r in items if "refine" not in r] if any("refine" in r for r in items) else []:
            return (f"{len(unrefined)} of its items (e.g. {unrefined[0]}) were made since it was refined, and hold "
                    "unrefined masks: run the same refine again to refine them")
        return None

    def is_complete(self, ids: set[str]) -> bool:
        """Whether every one of ``ids`` is finished (written, flagged, or skipped by the safety checker)."""
        return ids <= self.finished_ids() | self.skipped_ids()

    def skipped_ids(self) -> set[str]:
        path = self.root / SKIPPED_FILE
        return set(path.read_text(encoding="utf-8").split()) if path.is_file() else set()

    def record_flagged(self, item_id: str, record: Mapping[str, Any], reason: str = "safety_checker") -> None:
        """Mark an item finished without files: the pipeline's safety checker replaced its image with a
        black one, which must never reach a trainer with a mask drawn from the real image's attention."""
        self._append_record({"id": item_id, "split": "flagged", **record, "flagged": reason})

    def rewrite_mask(self, record: Mapping[str, Any], mask: np.ndarray) -> None:
        """Replace a finished item's mask and append its updated manifest line (``record``, whole), as one
        step even across a kill or a power cut: :meth:`stage_mask`, then :meth:`commit_mask`."""
        self.commit_mask(record, self.stage_mask(record["id"], mask))

    def stage_mask(self, item_id: str, mask: np.ndarray) -> str:
        """Write a new mask durably beside the item's current one (its pending file) and return the file's
        SHA-256, for :meth:`commit_mask`. Any process may stage (``refine``'s workers do, so that encoding and
        syncing run in parallel); until the commit, readers and a re-run ignore the pending file."""
        data = palette_png(mask)
        atomic_write(self.pending_mask_path(item_id), lambda tmp: tmp.write_bytes(data))
        return hashlib.sha256(data).hexdigest()

    def commit_mask(self, record: Mapping[str, Any], mask_sha256: str) -> None:
        """Commit a staged mask: append the item's line (``record``, whole) with the pending file's SHA-256,
        then rename the pending file over the mask. The process that appends to the manifest calls this.

        Killed before the append: the old mask and old line stand. Killed after it: the line is new and
        :meth:`read_mask` reads the pending mask, until the next writer (:meth:`recover_masks`) renames it
        into place. Either way every mask agrees with its item's latest line.
        """
        item_id = record["id"]
        pending = self.pending_mask_path(item_id)
        if not pending.is_file() or _file_sha256(pending) != mask_sha256:  # never commit a line without its mask
            raise DiffumaskError(f"{pending} is not the staged mask {mask_sha256[:12]}… (missing or overwritten)")
        self._append_record({**record, "rev": record.get("rev", 0) + 1, "mask_sha256": mask_sha256})
        os.replace(pending, self.mask_path(item_id))
        _fsync_path(pending.parent)

    def mask_sha256(self, record: Mapping[str, Any]) -> str:
        """The SHA-256 of an item's current mask: its manifest line's (:meth:`commit_mask` records it) or the file's."""
        return record.get("mask_sha256") or _file_sha256(self.current_mask_path(record["id"]))

    def pending_mask_path(self, item_id: str) -> Path:
        return self.root / "SegmentationClass" / f".{item_id}{PENDING_MASK}"

    def current_mask_path(self, item_id: str) -> Path:
        """The mask file that agrees with the item's latest manifest line (a committed pending one, if any)."""
        pending = self.pending_mask_path(item_id)
        if pending.is_file() and self._committed(item_id, pending):
            return pending
        return self.mask_path(item_id)

    def _committed(self, item_id: str, pending: Path) -> bool:
        latest = next((r for r in self.records() if r["id"] == item_id), None)
        return latest is not None and latest.get("mask_sha256") == _file_sha256(pending)

    def recover_masks(self, ids: Iterable[str] | None = None) -> int:
        """Writers call this first: finish (rename) each committed pending mask a killed rewrite left, and drop
        the uncommitted ones. ``ids``: only these items' (a sharded worker's own share: no other worker writes
        those masks, so it may recover them while the others run). Returns how many were finished."""
        folder = self.root / "SegmentationClass"
        wanted = None if ids is None else set(ids)
        latest: dict[str, Mapping[str, Any]] | None = None
        finished = 0
        for pending in sorted(folder.glob(f".*{PENDING_MASK}")):
            item_id = pending.name[1:-len(PENDING_MASK)]
            if wanted is not None and item_id not in wanted:
                continue
            if latest is None:  # the manifest is read once, and only when there is something to recover
                latest = {r["id"]: r for r in self.records()}
            if latest.get(item_id, {}).get("mask_sha256") == _file_sha256(pending):
                os.replace(pending, self.mask_path(item_id))
                finished += 1
            else:
                pending.unlink()
            _fsync_path(folder)
        return finished

    def update_records(self, updates: Mapping[str, Mapping[str, Any]]) -> None:
        """Merge fields into items' manifest lines (e.g. how a later stage changed them), atomically, with
        any shards merged in (a shard's line would otherwise stay the latest). One process only."""
        with self.lock():
            shards = self.shard_paths()  # before the lines are read, as in compact
            records = self._latest()
            unknown = set(updates) - {r["id"] for r in records}
            if unknown:
                raise KeyError(f"no such items in {self.root}: {sorted(unknown)[:5]}")
            self._rewrite_manifest([{**r, **updates.get(r["id"], {})} for r in records])
            self._remove(shards)

    def compact(self, order: Sequence[str] | None = None) -> None:
        """Rewrite the manifest as one line per item (its latest), shards merged in, atomically; a no-op
        when it is one already. ``order``: ids in the order their lines should take (others follow).

        Only when no other process appends: a sharded job's workers leave it to :meth:`finalize`.
        """
        shards = self.shard_paths()  # before the lines are read: appends take no lock, and a shard begun since
        # (never so far: merges wait for every item) must not be removed unread
        lines = self._lines()
        records = self._latest(lines)
        if order is not None:
            rank = {item_id: i for i, item_id in enumerate(order)}
            records.sort(key=lambda r: rank.get(r["id"], len(rank)))
        torn = self.manifest_path.is_file() and not self.manifest_path.read_bytes().endswith(b"\n")
        if shards or torn or [r["id"] for r in lines] != [r["id"] for r in records]:
            self._rewrite_manifest(records)
            self._remove(shards)

    def _remove(self, shards: Sequence[Path]) -> None:
        """Delete merged shards (another merger may have been first)."""
        for shard in shards:
            shard.unlink(missing_ok=True)
        if shards:
            _fsync_path(self.root)

    def _rewrite_manifest(self, records: Iterable[Mapping[str, Any]]) -> None:
        write_text_atomic(self.manifest_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the dataset's lock file (``.lock``) against the other workers of a sharded job."""
        with _held(self.root / LOCK_FILE):
            yield

    @contextlib.contextmanager
    def writing(self, job: Any = None, tries: int = 10) -> Iterator[None]:
        """Mark the dataset as being written while the block runs: a lock on ``.running``, which the kernel drops
        when a writer dies, so :meth:`being_written` tells a job in flight from a killed one's leftovers. A sharded
        job's workers share it, if they share its terms (``job``: :func:`_join`); a command run as one process holds
        it alone. So a second command on a dataset being written is refused at once, whichever starts first
        (:class:`BeingWritten`; :meth:`create` asks the same before it re-initialises a folder with no finished
        item), and so is a writer that finds dataset.json changed since it opened the dataset (another command
        re-initialised it in between, before either held the lock)."""
        with _running_lock(self.root, self.worker, job, tries):
            try:
                now = json.loads((self.root / "dataset.json").read_text())
            except (OSError, ValueError):
                now = None
            if now != self.dataset_json:
                raise BeingWritten(f"another diffumask command re-initialised {self.root} with other settings "
                                   "just now: wait for it to end, then run this one again")
            yield

    def being_written(self, tries: int = 5) -> bool:
        """Whether a command is writing the dataset now (holds :meth:`writing`). Probed with an exclusive lock
        taken and dropped at once, so two readers probing at the same moment may meet: a few tries tell a writer
        from another reader (:func:`_flock_soon`). False where it cannot
        tell: a mount without locks across nodes (NFS ``local_lock=flock``), or on NFS a user who may not write
        the dataset (NFSv4 holds a lock alone only for a file open for writing); never an error (a read-only mount)."""
        path = self.root / RUNNING_FILE
        try:
            handle = open(path, "r+")  # read and write, for NFSv4; never created: readers write nothing
        except FileNotFoundError:
            return False
        except OSError:  # a read-only mount or another user's dataset: a local file system locks it all the same
            try:
                handle = open(path, "rb")
            except OSError:
                return False
        with handle:
            try:
                taken = _flock_soon(handle, fcntl.LOCK_EX, tries)
            except OSError:  # no locks here (ENOLCK), or NFSv4 and a file open for reading only (EBADF)
                return False
            if taken:
                fcntl.flock(handle, fcntl.LOCK_UN)
            return not taken

    def finalize(self, order: Sequence[str] | None = None, complete: set[str] | None = None) -> None:
        """Rewrite the ImageSets split lists from the manifest (ids in ``order``, else in write order).

        ``complete``: every id the job makes. When all of them are finished, the shards are merged
        into ``manifest.jsonl`` first, one line per item in ``order``, so a dataset extended or resumed by
        one worker reads line for line as one made by several, or in one go. Under the lock, so of several
        workers finishing at once the last one writes lists that hold every item.
        """
        with self.lock():
            records = self.records()
            finished = self.finished_ids() if complete is not None else set()
            if complete is not None and complete <= finished | self.skipped_ids():
                # One line per item (a lost item made again had three), in ``order`` unless items beyond the job
                # have their places: a smaller re-run does not reorder the manifest.
                self.compact(order if self.shard_paths() or finished <= set(order or ()) else None)
                records = self.records()
                self.remove_interrupted_writes(complete & finished)  # a skipped item's is a live retry
            if order is not None:
                rank = {item_id: i for i, item_id in enumerate(order)}
                records.sort(key=lambda r: rank.get(r["id"], len(rank)))
            splits: dict[str, dict[str, None]] = {}
            for record in records:
                splits.setdefault(record.get("split", "train"), {})[record["id"]] = None
            for split, ids in splits.items():
                write_text_atomic(self.root / "ImageSets" / "Segmentation" / f"{split}.txt",
                                  "".join(f"{i}\n" for i in ids))

    # ----------------------------------------------------------------- reading
    def read_image(self, item_id: str) -> np.ndarray:
        path = self.image_path(item_id)
        with self._item_file(item_id, "image", path):
            return read_rgb(path, functools.partial(self._remake_fix, item_id))

    def read_mask(self, item_id: str) -> np.ndarray:
        path = self.current_mask_path(item_id)
        with self._item_file(item_id, "mask", path):
            return read_index_png(path, functools.partial(self._remake_fix, item_id))

    def read_soft_maps(self, item_id: str, keys: Iterable[str] | None = None,
                       fused: bool = True) -> dict[str, np.ndarray]:
        """An item's soft maps as float32 (fused ``name``, grids ``name@h``, ``__self__@h``: see
        :mod:`diffumask.softmaps`); only ``keys`` (those present) when given, since the self-attention
        matrix costs more to read than everything else a fixed-γ refine does; ``fused=False`` skips the
        fused maps that would be recomputed from the stored grids."""
        path = self.soft_maps_path(item_id)
        fix = functools.partial(self._remake_fix, item_id)
        with self._item_file(item_id, "soft maps", path), decoding(path, fix):
            with np.load(path) as data:
                return softmaps.unpack(data, keys, fused)

    @contextlib.contextmanager
    def _item_file(self, item_id: str, what: str, path: Path) -> Iterator[None]:
        """A finished item's file that is gone, as an error that names the item and the fix, not the system's."""
        try:
            yield
        except FileNotFoundError as error:
            if isinstance(error, DiffumaskError):
                raise
            raise self.lost_files([item_id], what, path) from None

    def lost_files(self, ids: Sequence[str], what: str, path: Path) -> MissingItemFile:
        """The error for finished items whose ``what`` (image, mask, soft maps) is gone; ``path``: the first's."""
        which = (f"item {ids[0]} of {self.root} lost its {what}" if len(ids) == 1 else
                 f"{len(ids)} items of {self.root} lost their {what} (e.g. {ids[0]})")
        again = "running again the command that made the dataset makes them again" + (
            " whole, once their images are deleted too" if what == "soft maps" else "")
        return MissingItemFile(f"{which} ({path.relative_to(self.root)}); `diffumask validate {self.root}` lists every "
                               f"damaged item, and {again}{self._refined_hint()}")

    def require_files(self, ids: Sequence[str], what: str, needs: str) -> None:
        """Refuse, before any work, items whose ``what`` (image, mask, soft maps) is not on disk: lost, where others
        keep theirs, else never made (``needs``: what the command needs instead)."""
        path = {"image": self.image_path, "mask": self.current_mask_path, "soft maps": self.soft_maps_path}[what]
        if not (missing := [item_id for item_id in ids if not path(item_id).is_file()]):
            return
        if len(missing) < len(ids) or _holds_files(path(missing[0]).parent):  # others' are there: these were lost
            raise self.lost_files(missing, what, path(missing[0]))
        raise DiffumaskError(f"{self.root} has no {what} for {len(missing)} item(s) (e.g. {path(missing[0])}); {needs}")

    def _remake_fix(self, item_id: str) -> str:
        return (f"delete it, and run again the command that made {self.root} to make item {item_id} again (`diffumask "
                f"validate {self.root}` lists every damaged item){self._refined_hint()}")

    def _refined_hint(self) -> str:
        refined = any("refine" in record for record in self.records())  # its first item may be one made since
        return "; then refine again with the same options, since it was refined" if refined else ""

    def split_ids(self, split: str = "train") -> list[str]:
        path = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not path.is_file():
            return []
        if problem := self.cut_problem(split):
            raise DiffumaskError(f"ImageSets/Segmentation/{split}.txt of {self.root} {problem}")
        ids = path.read_text().split()
        lost = {r["id"]: r[LOST] for r in self._latest() if r.get(LOST)}
        if stopped := [item_id for item_id in ids if item_id in lost]:
            raise DiffumaskError(f"ImageSets/Segmentation/{split}.txt of {self.root} lists {len(stopped)} item(s) that "
                                 f"lost their files (e.g. {stopped[0]}: {lost[stopped[0]]}), and the run making them "
                                 "again stopped before its end: re-run it to finish")
        return ids

    def cut_problem(self, split: str, records: Sequence[Mapping[str, Any]] | None = None) -> str | None:
        """Why a list ``diffumask filter`` cut may not be read any more: the masks its ranking was made on were
        replaced, so that ranking says nothing about the new ones, and training on it would keep an arbitrary
        selection (None: it may be read, or filter did not cut it). A list rewritten since (by hand: its text is
        not the one filter wrote) is the user's and read as it is. ``records``: the manifest, if already read."""
        path = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        cut_path = path.with_name(f"{split}{CUT_SUFFIX}")
        if not cut_path.is_file() or not path.is_file():
            return None
        text = path.read_text()
        try:
            cut = json.loads(cut_path.read_text())
            written, scored = cut["list_sha256"], cut["scored_masks"]
        except (ValueError, KeyError, TypeError) as error:
            return (f"has a damaged {cut_path.name} ({type(error).__name__}: {error}); delete it to read the list as "
                    f"it is, or cut it again: diffumask filter {self.root} --recut --name {split} --prune α")
        if hashlib.sha256(text.encode()).hexdigest() != written:
            return None
        listed = set(text.split())
        records = [r for r in (self.records() if records is None else records) if r["id"] in listed]
        if scored_masks(records) == scored:
            return None
        recut = f"cut it again from today's scores: diffumask filter {self.root} --recut --name {split} --prune α"
        if gone := sorted(listed - {r["id"] for r in records}):
            return f"lists {len(gone)} item(s) the manifest no longer holds (e.g. {gone[0]}); {recut}"
        if stale := [r["id"] for r in records if scored_mask(r) == "stale"]:
            return (f"was cut by `diffumask filter` on masks that {len(stale)} of its items no longer have (e.g. "
                    f"{stale[0]}, refined since); delete {self.root / 'noise'} and run filter again to cut on these masks")
        return f"was cut by `diffumask filter` on scores of other masks than today's (filter has scored these since); {recut}"


class BackgroundWriter:
    """Runs write jobs (whole items) in ``threads`` background threads, so fusing, thresholding, JPEG/PNG encoding
    and soft-map compression overlap the next batch's denoising instead of stalling the GPU.

    Jobs run side by side, but what a job hands to :meth:`in_turn` (its manifest line) runs in the order the jobs
    were submitted, so the manifest reads the same however the threads interleave, and a failed job does not
    hold up the others. At most ``depth`` jobs wait (memory stays flat); an error in a job is raised by the next
    :meth:`submit` or by leaving the ``with`` block. Each job writes its item atomically with its manifest line
    last, so a kill loses only unfinished items, which a re-run makes again.
    """

    def __init__(self, depth: int = 16, threads: int = 1):
        self.depth = depth
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="diffumask-writer")
        self._queued: collections.deque[concurrent.futures.Future[Any]] = collections.deque()
        self._submitted = 0
        self._serving = 0  # the ticket whose turn it is
        self._turn = threading.Condition()
        self._job = threading.local()
        self._failed: Exception | None = None

    def submit(self, job: Any, *args: Any, **kwargs: Any) -> None:
        if self._failed is not None:  # as soon as any job failed, not once it reaches the head of the queue
            raise self._failed
        while self._queued and (self._queued[0].done() or len(self._queued) >= self.depth):
            self._queued.popleft().result()
        self._queued.append(self._pool.submit(self._run, self._submitted, job, args, kwargs))
        self._submitted += 1

    def _run(self, ticket: int, job: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._job.ticket = ticket
        try:
            return job(*args, **kwargs)
        except Exception as error:
            self._failed = self._failed or error
            raise
        finally:  # the next job's turn, whether this one used its own or failed first
            with self._turn:
                self._turn.wait_for(lambda: self._serving == ticket)
                self._serving += 1
                self._turn.notify_all()

    def in_turn(self, action: Callable[[], Any]) -> Any:
        """Run ``action`` once every job submitted before the calling one has had its turn (from a job only).
        Threads take jobs in submission order, so the job whose turn it is always runs: no deadlock."""
        ticket = self._job.ticket
        with self._turn:
            self._turn.wait_for(lambda: self._serving == ticket)
            return action()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, kind: Any, *exc: Any) -> None:
        if kind is not None and not issubclass(kind, Exception):  # ^C: drop the queue (each item is whole), but
            self._pool.shutdown(wait=True, cancel_futures=True)  # let the running jobs end before the caller cleans up
            return
        try:
            while self._queued:  # finish the queued items even after an error: each is whole
                future = self._queued.popleft()
                if kind is None:
                    future.result()
                else:
                    future.exception()
        finally:
            self._pool.shutdown(wait=True)


def _names(folder: Path) -> set[str]:
    """The names in a folder (none when it is not there)."""
    try:
        with os.scandir(folder) as entries:
            return {entry.name for entry in entries}
    except FileNotFoundError:
        return set()


def _holds_files(folder: Path) -> bool:
    """Whether a folder has any entry (False when it is not there), without listing it whole."""
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is not None
    except FileNotFoundError:
        return False


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    with open(path, "wb") as f:  # a file object stops numpy from appending ".npz" to the temp name
        np.savez_compressed(f, **arrays)
