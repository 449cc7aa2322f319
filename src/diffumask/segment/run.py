"""A training run's folder, with a dataset's habits: label map, settings, a jsonl log, atomic files.

    RUN/
      classes.json        the run's label space, in a dataset's format (predictions use these indices)
      settings.json       what the run was started with; a re-run must match it to resume
      items.json          the ids it trains on, per DATA (and --negatives) in order: a re-cut list cannot resume it
      train_log.jsonl     step, loss, lr, seconds per step, one line every few steps
      checkpoint.pt       the latest training state (model, optimiser, schedule, step), written atomically
      model/              the trained model (transformers ``save_pretrained``), written when training ends
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..dataset import atomic_write, plain_modes, read_label_map, write_label_map, write_text_atomic
from ..errors import ABSENT, DiffumaskError, setting_differences
from ..formats.readers import FORMATS
from .model import Segmenter, build_segmenter, load_segmenter
from .presets import Preset, Schedule


CHECKPOINT = "checkpoint.pt"  # in a run folder: the latest step's weights, optimiser and schedule
ITEMS = "items.json"  # in a run folder: the ids trained on, one list per DATA (then --negatives)


class RunError(DiffumaskError, ValueError):
    """A run folder that is not one, or that was started with other settings."""


def _located(key: str, value: Any) -> Any:
    """A setting as compared on resume: DATA folders by where they are, so a re-run that spells a folder
    relative where the first run spelled it absolute (or the reverse, from the same directory) resumes; a setting
    a run from before it was recorded lacks as None (unset), as it always resumed."""
    if value is ABSENT:
        return None
    if key not in ("data", "negatives") or not isinstance(value, list):
        return value
    located = []
    for spec in value:
        form, colon, path = str(spec).partition(":")
        located.append(f"{form}:{Path(path).resolve()}" if colon and form in FORMATS else str(Path(spec).resolve()))
    return located


def _has_trained(root: Path) -> bool:
    """Whether a run folder holds training state (a checkpoint or a finished model) that its items produced."""
    return (root / CHECKPOINT).is_file() or (root / "model").is_dir()


class RunFolder:
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        if not (self.root / "settings.json").is_file() or not (self.root / "classes.json").is_file():
            raise RunError(f"{self.root} is not a training run (no settings.json / classes.json); "
                           "make one with `diffumask train DATA --out RUN`")
        self.settings: dict[str, Any] = json.loads((self.root / "settings.json").read_text())
        self.classes: list[str] = read_label_map(self.root)

    @classmethod
    def of(cls, run: str | os.PathLike[str] | RunFolder) -> RunFolder:
        """``run`` itself, or the run in that folder: the Python API takes what ``train`` returns or a path."""
        return run if isinstance(run, RunFolder) else cls(run)

    @classmethod
    def check(cls, root: str | os.PathLike[str], classes: list[str], settings: Mapping[str, Any]) -> None:
        """Refuse (read-only) a folder that holds another run, or anything else."""
        root = Path(root)
        settings = json.loads(json.dumps(dict(settings)))  # tuples → lists, so the comparison is exact
        if (root / "settings.json").is_file():
            run = cls(root)
            changed = setting_differences(run.settings, settings, "run", normalise=_located)
            if changed:
                raise RunError(f"{root} holds a run started with other settings ({'; '.join(changed)}); give "
                               "options that match them to resume it (a preset's defaults may have changed), "
                               "or choose another --out")
            if run.classes != classes:
                raise RunError(f"{root} holds a run of classes {run.classes[1:]}, not {classes[1:]}; choose another --out")
        elif root.exists() and (not root.is_dir() or any(p.name != "classes.json" for p in root.iterdir()
                                                          if not p.name.startswith("."))):
            raise RunError(f"{root} exists and is not a training run; choose an empty or new folder for --out")

    @staticmethod
    def check_items(root: str | os.PathLike[str], items: list[dict[str, Any]]) -> None:
        """Refuse to resume a run on other items than it started on (a split list re-cut by filter, items added):
        the settings name the split, not what it holds. A run with no checkpoint yet starts afresh on today's items;
        runs made before items.json resume unchecked."""
        path = Path(root) / ITEMS
        if not path.is_file() or not _has_trained(Path(root)):
            return
        before = json.loads(path.read_text())["items"]
        for old, new in zip(before, items):
            if old["ids"] != new["ids"]:
                differ = len(set(old["ids"]) ^ set(new["ids"]))
                what = (f"{len(old['ids'])} items then, {len(new['ids'])} now, {differ} in one only: the list was "
                        "re-cut or extended" if differ or len(old["ids"]) != len(new["ids"]) else
                        "the same items in another order, which changes every batch")
                raise RunError(f"{root} was started on other items of {new['data']} split {new['split']!r} "
                               f"({what}); restore it to resume, or choose another --out")

    def record_items(self, items: list[dict[str, Any]]) -> None:
        """Write items.json while the run holds no training state (:meth:`check_items` compared it after); a run
        started before items.json existed gets none, since what it trained on is unknown."""
        if not _has_trained(self.root):
            write_text_atomic(self.root / ITEMS, json.dumps({"items": items}) + "\n")

    def trained_ids(self) -> list[list[str]] | None:
        """The ids trained on, one list per DATA (then --negatives); None for a run made before items.json."""
        path = self.root / ITEMS
        return [part["ids"] for part in json.loads(path.read_text())["items"]] if path.is_file() else None

    @classmethod
    def create(cls, root: str | os.PathLike[str], classes: list[str], settings: Mapping[str, Any]) -> RunFolder:
        """Start a run, or reopen one started with the same settings (to resume it).

        ``settings.json`` is written last: a folder without it (a start that was killed) starts afresh.
        Temporary files of a killed write are removed.
        """
        root = Path(root)
        cls.check(root, classes, settings)
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".*"):
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        if not (root / "settings.json").is_file():
            write_label_map(root, classes)
            write_text_atomic(root / "settings.json", json.dumps(json.loads(json.dumps(dict(settings))), indent=1) + "\n")
        return cls(root)

    # ----------------------------------------------------------------- paths
    @property
    def checkpoint_path(self) -> Path:
        return self.root / CHECKPOINT

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def log_path(self) -> Path:
        return self.root / "train_log.jsonl"

    @property
    def preset(self) -> Preset:
        data = self.settings["preset"]
        schedule = {k: tuple(v) if isinstance(v, list) else v for k, v in data["schedule"].items()}
        return Preset(family=data["family"], model=data["model"], schedule=Schedule(**schedule),
                      backbone=data.get("backbone", {}))

    # ----------------------------------------------------------------- state
    def save_checkpoint(self, state: Mapping[str, Any]) -> None:
        atomic_write(self.checkpoint_path, lambda tmp: torch.save(dict(state), tmp))

    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self.checkpoint_path.is_file():
            return None
        return torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)

    def save_model(self, segmenter: Segmenter) -> None:
        """Write ``model/`` under a temporary name and rename it: a reader sees all of it or none."""
        tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=self.root))
        try:
            segmenter.save(tmp)
            plain_modes(tmp)
            if self.model_dir.exists():
                shutil.rmtree(self.model_dir)
            os.replace(tmp, self.model_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def load_segmenter(self) -> Segmenter:
        """The finished model, else the latest checkpoint (evaluate a run while it trains)."""
        family = self.settings["preset"]["family"]
        if self.model_dir.is_dir():
            return load_segmenter(self.model_dir, family)
        state = self.load_checkpoint()
        if state is None:
            raise self._untrained()
        segmenter = build_segmenter(self.preset, self.classes)
        segmenter.model.load_state_dict(state["model"])
        return segmenter

    def weights_sha256(self) -> str:
        """A digest of the weights ``load_segmenter`` reads (the finished model's files, else the checkpoint): what a
        predictions folder records, so that predictions of another run, or of an earlier state of this one, are
        never mixed into it."""
        paths = [p for p in (sorted(self.model_dir.iterdir()) if self.model_dir.is_dir() else [self.checkpoint_path])
                 if p.is_file()]
        if not paths:
            raise self._untrained()
        digest = hashlib.sha256()
        for path in paths:
            digest.update(path.name.encode() + b"\0")
            with open(path, "rb") as file:
                while chunk := file.read(1 << 24):
                    digest.update(chunk)
        return digest.hexdigest()

    def _untrained(self) -> RunError:
        return RunError(f"{self.root} has no trained model or checkpoint yet; let `diffumask train` run first")

    # ----------------------------------------------------------------- log
    def log_entries(self) -> list[dict[str, Any]]:
        if not self.log_path.is_file():
            return []
        entries = []
        for line in self.log_path.read_text().splitlines(keepends=True):
            if line.endswith("\n"):  # a torn last line (a killed run) is not an entry
                entries.append(json.loads(line))
        return entries

    def truncate_log(self, step: int) -> None:
        """Keep the log up to ``step`` (the checkpoint a resumed run restarts from)."""
        kept = [e for e in self.log_entries() if e["step"] <= step]
        write_text_atomic(self.log_path, "".join(json.dumps(e) + "\n" for e in kept))

    def append_log(self, entry: Mapping[str, Any]) -> None:
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(entry)) + "\n")
