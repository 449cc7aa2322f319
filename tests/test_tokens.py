"""Word → token-span mapping on the real CLIP BPE (built offline from the open_clip wheel)."""

from __future__ import annotations

import pytest

from diffumask.testing import clip_tokenizer
from diffumask.tokens import PromptError, class_token_indices


@pytest.fixture(scope="module")
def sd1_tokenizer():
    return clip_tokenizer()


def test_clip_ids_match_open_clip(sd1_tokenizer):
    ids = sd1_tokenizer("a photo of a potted plant").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 48581, 3912, 49407]


@pytest.mark.parametrize("name, n_tokens", [("potted plant", 2), ("tv monitor", 2), ("aeroplane", 2),
                                            ("dining table", 2), ("dog", 1)])
def test_multi_token_names(sd1_tokenizer, name, n_tokens):
    spans = class_token_indices(sd1_tokenizer, f"a photo of a {name} in a room", [name])
    assert spans[name] == list(range(5, 5 + n_tokens))


def test_repeated_words_and_case(sd1_tokenizer):
    spans = class_token_indices(sd1_tokenizer, "A Dog chasing a dog.", ["dog"])
    assert spans["dog"] == [2, 5]


def test_whole_words_only(sd1_tokenizer):
    with pytest.raises(PromptError, match="does not occur"):
        class_token_indices(sd1_tokenizer, "a photo of a hotdog", ["dog"])


def test_sd2_zero_padding_gives_the_same_spans(sd1_tokenizer):
    sd2 = clip_tokenizer(pad_token="!")
    prompt = "a photo of a potted plant"
    assert sd2(prompt, padding="max_length", max_length=77).input_ids[-1] == 0
    assert class_token_indices(sd2, prompt, ["potted plant"]) == class_token_indices(
        sd1_tokenizer, prompt, ["potted plant"])


def test_prompt_limit_counts_special_tokens(sd1_tokenizer):
    fits = "dog " * 75  # 75 words + <bos> + <eos> = 77 tokens
    assert class_token_indices(sd1_tokenizer, fits, ["dog"])["dog"][-1] == 75
    with pytest.raises(PromptError, match="78 tokens"):
        class_token_indices(sd1_tokenizer, fits + "dog", ["dog"])
