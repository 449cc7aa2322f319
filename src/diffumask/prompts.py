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

Several classes in one image (``generate --compose``) come from two optional lists::

    compose:                    # scenes of named classes: every slot not under slots: (nor a class's
      - "a {person} riding a {horse}"   # own list) names a class: the bank's (or an alias; spaces or _
                                # alike) as its display name, any other as spelled
    pairs:                      # any two classes: {name} and {name2}; {sub2}, {colour2} ... are the
      - "a {name} and a {name2}"        # second class's slots, drawn apart from the first's

A composed item for class *c* draws from the ``compose`` templates that name *c* and only classes of
the dataset; when there is none, from ``pairs`` with a partner drawn from the dataset's classes.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import DiffumaskError
from .models import is_shapes_folder

BUILTIN_BANKS = ("voc", "cityscapes", "shapes", "default")


class PromptBankError(DiffumaskError, ValueError):
    """A prompt bank file is malformed; the message names the file and the entry."""


def _fields(template: str) -> list[str]:
    """A template's slot names, in order, each once."""
    return list(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(template) if f))


@dataclass
class PromptBank:
    templates: list[str]
    slots: dict[str, list[str]] = field(default_factory=dict)
    classes: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "<inline>"
    compose: list[str] = field(default_factory=list)  # templates naming several classes
    pairs: list[str] = field(default_factory=list)  # templates for any two classes: {name}, {name2}

    def __post_init__(self) -> None:
        if not self.templates:
            raise PromptBankError(f"{self.source}: a prompt bank needs at least one template")
        self._aliases: dict[str, str] = {}
        for key, entry in self.classes.items():
            for alias in [key, *entry.get("aliases", [])]:
                self._aliases[_normalise(alias)] = key
        for template in self.templates + [t for e in self.classes.values() for t in e.get("templates", [])]:
            if "name" not in _fields(template):
                raise PromptBankError(f"{self.source}: template {template!r} has no {{name}} slot, "
                                      "so the class word would be missing from the prompt")
        # The slots filled from lists (or the class words): anything else in a compose template names a class.
        self._fillers = {"name", "name2", *self.slots, *(key for e in self.classes.values() for key in e)}
        for template in self.templates + self.pairs + [t for e in self.classes.values() for t in e.get("templates", [])]:
            if unknown := [f for f in _fields(template) if not {f, f.removesuffix("2")} & self._fillers]:
                raise PromptBankError(f"{self.source}: template {template!r} has a slot {{{unknown[0]}}} that neither "
                                      "the bank's slots nor any class defines (a typo?); define it under slots:")
        for template in self.pairs:
            if not {"name", "name2"} <= set(_fields(template)):
                raise PromptBankError(f"{self.source}: pair template {template!r} needs both {{name}} and {{name2}}")
        for template in self.compose:
            if len(self.template_classes(template)) < 2:
                raise PromptBankError(f"{self.source}: compose template {template!r} names fewer than two classes; "
                                      "write each class as a slot, e.g. 'a {person} riding a {horse}'")

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
        return cls([str(t) for t in data["templates"]], slots, classes, source,
                   [str(t) for t in data.get("compose") or []], [str(t) for t in data.get("pairs") or []])

    def key(self, class_name: str) -> str | None:
        """The bank's own name for a class (through its aliases), or None when it has no entry."""
        return self._aliases.get(_normalise(class_name))

    def _compose_key(self, name: str) -> str:
        """How compose templates and a run's classes are matched: the bank's key for its classes, the normalised
        name for any other ('red_panda' and 'red panda' alike)."""
        return self.key(name) or _normalise(name)

    def _class_slots(self, template: str) -> list[tuple[str, str]]:
        """A compose template's slots that name classes, each with its class key, in order of appearance: the
        bank's classes, and any slot that is not a list to draw from (slots:, a class's sub:, ..., or its second
        object's sub2: ...)."""
        return [(f, self._compose_key(f)) for f in _fields(template)
                if self.key(f) is not None or not {f, f.removesuffix("2")} & self._fillers]

    def template_classes(self, template: str) -> list[str]:
        """The classes a compose template names as slots, each once, in order of appearance."""
        return list(dict.fromkeys(key for _, key in self._class_slots(template)))

    def undrawable_compose(self, available: Sequence[str]) -> dict[str, list[str]]:
        """Compose templates naming a slot that is neither a class of the bank nor of ``available`` (the run's
        classes) nor a list to draw from, each with those slots: a run never draws them, and a typo ('{scen}')
        looks just like that."""
        run = {self._compose_key(c) for c in available}
        found = {t: [f for f, key in self._class_slots(t) if self.key(f) is None and key not in run]
                 for t in self.compose}
        return {t: slots for t, slots in found.items() if slots}

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
        return self._fill(template, {"name": self.display_name(class_name)}, [entry], rng)

    def draw_compose(self, class_name: str, seed: int, available: Sequence[str]) -> tuple[str, list[str]]:
        """A prompt with ``class_name`` and at least one other class of ``available`` (the dataset's
        classes), and those classes as ``available`` spells them, in prompt order."""
        rng = random.Random(seed)
        spelled = {self._compose_key(c): c for c in available}
        mine = self._compose_key(class_name)
        named = [t for t in self.compose
                 if mine in (keys := self.template_classes(t)) and all(k in spelled for k in keys)]
        if named:
            template = rng.choice(named)
            values = {f: self.display_name(spelled[key]) for f, key in self._class_slots(template)}
            classes = [spelled[k] for k in self.template_classes(template)]
            return self._fill(template, values, [self.entry(class_name)], rng), classes
        others = [c for c in available if c != class_name]
        if not self.pairs or not others:
            raise PromptBankError(
                f"{self.source}: no multi-class prompt for {class_name!r}: no compose template names it with "
                f"classes of this run, and " + ("the bank has no pair templates" if others else
                                                "a pair needs a second class (--classes)"))
        partner = rng.choice(others)
        template = rng.choice(self.pairs)
        values = {"name": self.display_name(class_name), "name2": self.display_name(partner)}
        return self._fill(template, values, [self.entry(class_name), self.entry(partner)], rng), [class_name, partner]

    def _fill(self, template: str, values: dict[str, str], entries: list[dict[str, Any]], rng: random.Random) -> str:
        """Fill the remaining slots: ``x`` from the first class's list (or the bank's), ``x2`` from the
        second's, drawn apart from ``x`` where the list allows, so two objects get two colours."""
        for slot in _fields(template):
            if slot in values:
                continue
            base, second = (slot[:-1], True) if slot.endswith("2") and len(entries) > 1 else (slot, False)
            entry = entries[1] if second else entries[0]
            options = [str(o) for o in entry.get(base, self.slots.get(base, [""]))]
            if second and base in values and len(set(options) - {values[base]}) > 0:
                options = [o for o in options if o != values[base]]
            values[slot] = rng.choice(options) if options else ""
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
    if model == "shapes" or is_shapes_folder(model):
        return PromptBank.load("shapes")
    default = PromptBank.load("default")
    classes: dict[str, dict[str, Any]] = {}
    taken: set[str] = set()
    compose: list[str] = []
    for name in ("voc", "cityscapes"):
        bank = PromptBank.load(name)
        for key, entry in bank.classes.items():
            if _normalise(key) in taken:
                continue
            classes[key] = {**bank.slots, "templates": bank.templates, **entry}
            taken |= {_normalise(a) for a in [key, *entry.get("aliases", [])]}
        compose += bank.compose
    return PromptBank(default.templates, default.slots, classes, "built-in banks (voc, cityscapes, default)",
                      compose, default.pairs)
