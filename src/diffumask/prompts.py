"""Prompt banks as data: templates × per-class sub-classes × scenes, drawn reproducibly per item.

A bank is a YAML or JSON file::

    templates: ["a photo of a {sub} {name}", "a photo of a {name} {scene}"]
    slots:                      # lists any template may use, shared by all classes
      scene: ["in a park", "on a beach"]
    classes:
      potted plant:             # the class as the user names it
        aliases: [pottedplant]  # other spellings that select it
        name: potted plant      # the words put in the prompt (and searched for its map)
        sub: [fern, cactus, ""] # a class's own slot lists override the shared ones

Every template must contain ``{name}``, so the class word is always in the prompt. A class with
no entry gets the bank's templates with empty class slots (open vocabulary). The draw for an
item is seeded by the item's own seed, so a run is reproducible and independent of batching.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import DiffumaskError

BUILTIN_BANKS = ("voc", "cityscapes", "shapes", "default")


class PromptBankError(DiffumaskError, ValueError):
    """A prompt bank file is malformed; the message names the file and the entry."""


@dataclass
class PromptBank:
    templates: list[str]
    slots: dict[str, list[str]] = field(default_factory=dict)
    classes: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "<inline>"

    def __post_init__(self) -> None:
        if not self.templates:
            raise PromptBankError(f"{self.source}: a prompt bank needs at least one template")
        self._aliases: dict[str, str] = {}
        for key, entry in self.classes.items():
            for alias in [key, *entry.get("aliases", [])]:
                self._aliases[_normalise(alias)] = key
        for template in self.templates + [t for e in self.classes.values() for t in e.get("templates", [])]:
            fields = {f for _, f, _, _ in string.Formatter().parse(template) if f}
            if "name" not in fields:
                raise PromptBankError(f"{self.source}: template {template!r} has no {{name}} slot, "
                                      "so the class word would be missing from the prompt")

    @classmethod
    def load(cls, path_or_name: str | Path) -> PromptBank:
        """A built-in bank by name (``voc``, ``cityscapes``, ``shapes``, ``default``) or a YAML/JSON file."""
        text, source = _read_bank(path_or_name)
        try:
            data = yaml.safe_load(text) if not source.endswith(".json") else json.loads(text)
        except (yaml.YAMLError, json.JSONDecodeError) as error:
            raise PromptBankError(f"{source}: not valid YAML/JSON ({error})") from None
        if not isinstance(data, Mapping) or "templates" not in data:
            raise PromptBankError(f"{source}: a prompt bank is a mapping with a 'templates' list")
        classes = {str(k): (v or {}) for k, v in (data.get("classes") or {}).items()}
        slots = {str(k): [str(x) for x in v] for k, v in (data.get("slots") or {}).items()}
        return cls([str(t) for t in data["templates"]], slots, classes, source)

    def entry(self, class_name: str) -> dict[str, Any]:
        key = self._aliases.get(_normalise(class_name))
        return self.classes[key] if key is not None else {}

    def display_name(self, class_name: str) -> str:
        """The words that stand for the class in prompts (e.g. 'pottedplant' → 'potted plant')."""
        key = self._aliases.get(_normalise(class_name), class_name)
        return str(self.entry(class_name).get("name", key))

    def draw(self, class_name: str, seed: int) -> str:
        """The prompt for one item: a seeded choice of template and of every slot it uses."""
        entry = self.entry(class_name)
        rng = random.Random(seed)
        template = rng.choice(entry.get("templates") or self.templates)
        values: dict[str, str] = {"name": self.display_name(class_name)}
        for _, slot, _, _ in string.Formatter().parse(template):
            if slot and slot not in values:
                options = entry.get(slot, self.slots.get(slot, [""]))
                values[slot] = str(rng.choice(options)) if options else ""
        return re.sub(r"\s+", " ", template.format(**values)).strip()


def _normalise(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def _read_bank(path_or_name: str | Path) -> tuple[str, str]:
    name = str(path_or_name)
    if name in BUILTIN_BANKS:
        resource = resources.files("diffumask") / "banks" / f"{name}.yaml"
        return resource.read_text(encoding="utf-8"), f"built-in bank {name!r}"
    path = Path(name).expanduser()
    if not path.is_file():
        raise PromptBankError(f"prompt bank {name!r} is neither a file nor one of the built-in banks "
                              f"({', '.join(BUILTIN_BANKS)})")
    return path.read_text(encoding="utf-8"), str(path)


def resolve_bank(prompts: str = "auto", model: str = "shapes") -> PromptBank:
    """The bank a run uses: a named/file bank, or ``auto``.

    ``auto`` is the shapes bank for the shapes model; otherwise each class takes its entry from
    the first built-in bank that has it (VOC, then Cityscapes), and any other class the open-
    vocabulary default templates.
    """
    if prompts != "auto":
        return PromptBank.load(prompts)
    if model == "shapes":
        return PromptBank.load("shapes")
    default = PromptBank.load("default")
    classes: dict[str, dict[str, Any]] = {}
    taken: set[str] = set()
    for name in ("voc", "cityscapes"):
        bank = PromptBank.load(name)
        for key, entry in bank.classes.items():
            if _normalise(key) in taken:
                continue
            classes[key] = {**bank.slots, "templates": bank.templates, **entry}
            taken |= {_normalise(a) for a in [key, *entry.get("aliases", [])]}
    return PromptBank(default.templates, default.slots, classes, "built-in banks (voc, cityscapes, default)")
