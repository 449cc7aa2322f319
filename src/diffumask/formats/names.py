"""Matching class names across datasets: "pottedplant" is "potted plant", "airplane" is "aeroplane".

Exact spellings (case, spaces, '-' and '_' aside) match first; the aliases the prompt banks already
know ("tvmonitor", "motorcycle" for "motorbike", ...) only fill in classes left unmatched, and each
class is matched at most once, so a loose alias ("plant") never steals a class that has its own.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

ALIAS_BANKS = ("voc", "cityscapes")
#: Names other datasets give a bank's class that its prompts never use (kept out of the banks: a bank's aliases are
#: part of its fingerprint, so adding one there would stop every dataset made with it from resuming).
DATASET_ALIASES = {"minibike": "motorbike"}  # ADE20K's "minibike;motorbike"


def normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", name.lower())


@functools.lru_cache(maxsize=None)
def _canonical_table() -> dict[str, str]:
    from ..prompts import PromptBank  # prompt banks hold the aliases; yaml only, no diffusers

    table: dict[str, str] = {}
    for bank_name in ALIAS_BANKS:
        for key, entry in PromptBank.load(bank_name).classes.items():
            for alias in [key, entry.get("name", key), *entry.get("aliases", [])]:
                table.setdefault(normalise(alias), normalise(key))
    for alias, key in DATASET_ALIASES.items():
        table.setdefault(normalise(alias), normalise(key))
    return table


def canonical(name: str) -> str:
    """The bank's key for a name or any of its aliases; the normalised name itself otherwise."""
    key = normalise(name)
    return _canonical_table().get(key, key)


def match_names(wanted: Iterable[str], available: Iterable[str]) -> dict[str, str]:
    """Map each name of ``wanted`` to the name of ``available`` that means the same class.

    Names without a counterpart are left out of the result.
    """
    wanted, available = list(wanted), list(available)
    matched: dict[str, str] = {}
    taken: set[str] = set()
    for key in (normalise, canonical):
        for name in wanted:
            if name in matched:
                continue
            for other in available:
                if other not in taken and key(other) == key(name):
                    matched[name] = other
                    taken.add(other)
                    break
    return matched
