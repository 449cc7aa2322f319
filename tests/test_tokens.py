"""Word → token-span mapping on the real CLIP BPE (built offline from the open_clip wheel)."""

from __future__ import annotations

import pytest

from diffumask.testing import clip_tokenizer
from diffumask.tokens import PromptError, class_token_indices, decode_prompt, prompt_ids, trim_padding


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


@pytest.mark.parametrize("word, longer, pieces", [
    ("dog", "sheepdog", ["sheep", "dog</w>"]),
    ("boat", "sailboat", ["sail", "boat</w>"]),
    ("boat", "motorboat", ["motor", "boat</w>"]),
    ("bus", "minibus", ["mini", "bus</w>"]),
    ("dog", "bulldog", ["bulldog</w>"]),  # one BPE token: the word's ids are not even a sub-sequence
])
def test_a_word_inside_a_longer_word_is_not_the_word(sd1_tokenizer, word, longer, pieces):
    # The premise, on the real CLIP BPE: the longer word ends in the word's own token (or is one token).
    assert sd1_tokenizer.tokenize(longer) == pieces
    assert (sd1_tokenizer.tokenize(word) == pieces[-1:]) == (len(pieces) > 1)
    with pytest.raises(PromptError, match=f"^'{word}' occurs only inside '{longer}'"):
        class_token_indices(sd1_tokenizer, f"a photo of a {longer} on a lake", [word])


def test_only_the_whole_word_occurrences_count(sd1_tokenizer):
    # <bos> a sheep|dog and a dog 's bone , a dog - sled: the whole word 'dog' is at 6 and 11, not 3
    prompt = "a sheepdog and a dog's bone, a dog-sled"
    assert sd1_tokenizer.tokenize(prompt)[:9] == ["a</w>", "sheep", "dog</w>", "and</w>", "a</w>", "dog</w>",
                                                  "'s</w>", "bone</w>", ",</w>"]
    assert class_token_indices(sd1_tokenizer, prompt, ["dog"])["dog"] == [6, 11]
    assert class_token_indices(sd1_tokenizer, "two sailboats, a boat", ["boat"])["boat"] == [6]


def test_absent_word_says_so(sd1_tokenizer):
    with pytest.raises(PromptError, match="class 'dog' does not occur in the prompt 'a photo of a cat'"):
        class_token_indices(sd1_tokenizer, "a photo of a cat", ["dog"])


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])  # SD 2.x pads with id 0, the token "!"
def test_decoded_prompt_round_trips(pad):
    tokenizer = clip_tokenizer(pad_token=pad)
    ids = tokenizer("A Dog's life, 2 sheepdogs!", padding="max_length", max_length=77).input_ids
    row = trim_padding(tokenizer, ids)
    assert len(row) == 11 and row[-1] == tokenizer.eos_token_id
    text = decode_prompt(tokenizer, row)
    assert text == "a dog 's life , 2 sheepdogs !" and prompt_ids(tokenizer, text) == row
    assert class_token_indices(tokenizer, text, ["dog"])["dog"] == [2]


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
