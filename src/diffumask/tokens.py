"""Which token columns of the text encoder's output belong to a class word.

The mapping uses the pipeline's own tokenizer: the class phrase is tokenised alone and searched
as a sub-sequence of the tokenised prompt, so multi-token names ("potted plant" → 2 tokens,
"aeroplane" → aerop|lane) and repeated words are handled without any per-class keyword lists.
A match counts only at word boundaries of the prompt's text (found through the tokenizer's
character offsets): CLIP's BPE spells "sheepdog" sheep|dog, whose last token is the token of
"dog", yet the prompt holds no dog.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .errors import DiffumaskError


class PromptError(DiffumaskError, ValueError):
    """A prompt cannot give a class map: the class word is missing or the prompt is too long."""


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special, truncation=False).input_ids)


def max_prompt_tokens(tokenizer: Any) -> int:
    limit = int(getattr(tokenizer, "model_max_length", 77))
    return limit if limit < 100_000 else 77  # tokenizers without a limit report a huge sentinel


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The ids the text encoder reads for ``prompt`` (special tokens included, no padding)."""
    return _ids(tokenizer, prompt, special=True)


def trim_padding(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """A padded encoder input row cut after its end token (pads differ: SD 1.x <eos>, SD 2.x 0)."""
    ids = [int(i) for i in ids]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and eos in ids[1:]:
        return ids[:ids.index(eos, 1) + 1]
    pad = getattr(tokenizer, "pad_token_id", None)
    while pad is not None and ids and ids[-1] == pad:
        ids.pop()
    return ids


def prompt_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """The text of an encoder input row (``trim_padding``-ed), without its start and end tokens."""
    ids = list(ids)
    # Only the wrapping specials go: SD 2.x pads with id 0, which is also the real token "!".
    start = 1 if ids and ids[0] == getattr(tokenizer, "bos_token_id", None) else 0
    stop = len(ids) - 1 if len(ids) > start and ids[-1] == getattr(tokenizer, "eos_token_id", None) else len(ids)
    return tokenizer.decode(ids[start:stop])


def decode_prompt(tokenizer: Any, ids: Sequence[int]) -> str:
    """The text of an encoder input row (``trim_padding``-ed), such that encoding it gives ``ids`` back.

    Raises PromptError when the tokenizer cannot round-trip the row (then the words of the
    prompt cannot be located and the prompts must be given).
    """
    text = prompt_text(tokenizer, ids)
    if prompt_ids(tokenizer, text) != list(ids):
        raise PromptError(
            f"cannot recover the prompt's words from the token ids the text encoder read ({list(ids)[:8]}…): "
            "pass the prompts to trace(pipe, prompts, classes)"
        )
    return text


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token's text, to compare what two tokenizers put in each position: SDXL's second one
    spells "!" as its pad token, a different id for the same word."""
    return [tokenizer.decode([i]).strip() for i in ids]


def _offsets(tokenizer: Any, prompt: str) -> list[tuple[int, int]]:
    try:
        encoded = tokenizer(prompt, add_special_tokens=False, truncation=False, return_offsets_mapping=True)
    except NotImplementedError as error:
        raise PromptError(
            f"{type(tokenizer).__name__} gives no character offsets, so class words cannot be matched "
            "as whole words; load the pipeline with its fast (tokenizers-backed) tokenizer"
        ) from error
    return [tuple(o) for o in encoded.offset_mapping]


def _is_boundary(text: str, start: int, end: int) -> bool:
    """Whether text[start:end] neither starts nor ends inside a word. A sentencepiece word-start
    token ("▁dog", T5's) may carry the space before its word in its character span."""
    while start < end and text[start].isspace():
        start += 1
    return (start == 0 or not text[start - 1].isalnum()) and (end == len(text) or not text[end].isalnum())


def _enclosing_words(prompt: str, name: str) -> list[str]:
    """The longer words of ``prompt`` that hold ``name`` (case-insensitive), for error messages."""
    words = []
    for match in re.finditer(re.escape(name.lower()), prompt.lower()):
        start, end = match.start(), match.end()
        while start > 0 and prompt[start - 1].isalnum():
            start -= 1
        while end < len(prompt) and prompt[end].isalnum():
            end += 1
        if (start, end) != match.span() and prompt[start:end] not in words:
            words.append(prompt[start:end])
    return words


def class_token_indices(tokenizer: Any, prompt: str, classes: Sequence[str]) -> dict[str, list[int]]:
    """Map each class phrase to the positions of its tokens in the encoded prompt.

    Positions count the special start token, i.e. they index the text encoder's output
    (and so the key columns of every cross-attention layer). Only whole-word occurrences count
    ("dog" is not in "sheepdog"); every one is included, so "a dog chasing a dog" averages both.
    """
    full = prompt_ids(tokenizer, prompt)
    limit = max_prompt_tokens(tokenizer)
    if len(full) > limit:
        raise PromptError(
            f"prompt has {len(full)} tokens but the text encoder reads at most {limit} "
            f"(tokens past the limit are cut, so their classes would get empty maps): {prompt!r}; "
            "shorten the prompt"
        )
    body = _ids(tokenizer, prompt, special=False)
    offset = next((i for i in range(len(full) - len(body) + 1) if full[i:i + len(body)] == body), None)
    if offset is None:  # the tokenizer does something other than wrap the body in specials
        raise PromptError(f"cannot locate the prompt's tokens among its encoded ids: {prompt!r}")
    chars = _offsets(tokenizer, prompt)
    spans: dict[str, list[int]] = {}
    for name in classes:
        phrase = _ids(tokenizer, name, special=False)
        if not phrase:
            raise PromptError(f"class name {name!r} tokenises to nothing; use a real word")
        # CLIP's unknown token is its end token, which byte-level BPE never emits for real text;
        # word-level tokenizers (the shapes model's) map any word they lack to a real <unk>.
        unknown = getattr(tokenizer, "unk_token_id", None)
        if unknown is not None and unknown in phrase and unknown not in _ids(tokenizer, "", special=True):
            raise PromptError(
                f"class {name!r} is not in this model's vocabulary (it tokenises to the unknown token); "
                "choose a class the model knows"
            )
        n = len(phrase)
        starts = [i for i in range(len(body) - n + 1) if body[i:i + n] == phrase
                  and _is_boundary(prompt, chars[i][0], chars[i + n - 1][1])]
        if not starts:
            inside = _enclosing_words(prompt, name)
            if inside:
                raise PromptError(
                    f"{name!r} occurs only inside {', '.join(map(repr, inside))} in the prompt {prompt!r}, "
                    f"not as a whole word: write '{name}' as a word of its own in the prompt, or name the "
                    f"class as the prompt spells it ({inside[0]!r})"
                )
            raise PromptError(
                f"class {name!r} does not occur in the prompt {prompt!r}: the prompt must contain the "
                f"class name as a whole word, spelled as in the class list (e.g. '... a {name} ...')"
            )
        spans[name] = [offset + s + j for s in starts for j in range(n)]
    return spans
