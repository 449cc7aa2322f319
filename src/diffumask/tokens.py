"""Which token columns of the text encoder's output belong to a class word.

The mapping uses the pipeline's own tokenizer: the class phrase is tokenised alone and searched
as a sub-sequence of the tokenised prompt, so multi-token names ("potted plant" → 2 tokens,
"aeroplane" → aerop|lane) and repeated words are handled without any per-class keyword lists.
"""

from __future__ import annotations

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


def class_token_indices(tokenizer: Any, prompt: str, classes: Sequence[str]) -> dict[str, list[int]]:
    """Map each class phrase to the positions of its tokens in the encoded prompt.

    Positions count the special start token, i.e. they index the text encoder's output
    (and so the key columns of every cross-attention layer). Every occurrence of the phrase
    is included, so "a dog chasing a dog" averages both dogs.
    """
    full = _ids(tokenizer, prompt, special=True)
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
        starts = [i for i in range(len(body) - len(phrase) + 1) if body[i:i + len(phrase)] == phrase]
        if not starts:
            raise PromptError(
                f"class {name!r} does not occur in the prompt {prompt!r}: the prompt must contain the "
                f"class name as a whole word, spelled as in the class list (e.g. '... a {name} ...')"
            )
        spans[name] = [offset + s + j for s in starts for j in range(len(phrase))]
    return spans
