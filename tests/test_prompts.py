"""Prompt banks: seeded draws, aliases, open vocabulary, malformed files."""

from __future__ import annotations

import pytest

from diffumask.generate import item_seed, work_items
from diffumask.prompts import PromptBank, PromptBankError, resolve_bank

VOC = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dining table", "dog",
       "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor"]
CITYSCAPES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
              "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]


@pytest.mark.parametrize("bank, classes", [("voc", VOC), ("cityscapes", CITYSCAPES)])
def test_builtin_banks_cover_their_classes(bank, classes):
    loaded = PromptBank.load(bank)
    for name in classes:
        assert loaded.entry(name), name
        for seed in range(20):
            prompt = loaded.draw(name, seed)
            assert f" {loaded.display_name(name)}" in f" {prompt}" and "  " not in prompt


def test_voc_aliases_give_display_names():
    bank = PromptBank.load("voc")
    assert bank.display_name("pottedplant") == "potted plant"
    assert bank.display_name("tvmonitor") == "tv monitor"
    assert bank.display_name("diningtable") == "dining table"
    assert len(set(bank.entry("dog")["sub"])) >= 30  # the paper's gain comes from many sub-classes


def test_draw_is_seeded_and_varied():
    bank = resolve_bank("auto", "some/sd-model")
    prompts = [bank.draw("dog", item_seed(0, "dog", k)) for k in range(50)]
    assert prompts == [bank.draw("dog", item_seed(0, "dog", k)) for k in range(50)]
    assert len(set(prompts)) > 30


def test_open_vocabulary_class_gets_default_templates():
    bank = resolve_bank("auto", "some/sd-model")
    assert not bank.entry("zebra") and "zebra" in bank.draw("zebra", 1)
    assert "traffic light" in bank.draw("trafficlight", 3)  # Cityscapes entry reached through auto


def test_work_items_are_stable_when_extending():
    small = work_items(["cat", "dog"], 3, base_seed=5)
    large = work_items(["cat", "dog"], 6, base_seed=5)
    assert all(item in large for item in small)
    assert len({i.seed for i in large}) == len(large)


def test_malformed_banks(tmp_path):
    path = tmp_path / "bank.json"
    path.write_text('{"templates": ["{name} at dawn"], "classes": {"cat": {"sub": ["tabby"]}}}')
    assert PromptBank.load(str(path)).draw("cat", 0) == "cat at dawn"
    path.write_text('{"templates": ["a {name} in {place}"], "classes": {"dog": {}}}')  # {place}: defined nowhere
    with pytest.raises(PromptBankError, match="has a slot {place} that neither the bank's slots nor any class"):
        PromptBank.load(str(path))
    path.write_text('{"templates": ["a {sub} {name} in {place}"], "slots": {"place": ["a park"]},'
                    ' "classes": {"dog": {"sub": ["small"]}, "cat": {}}}')  # a class's own slot stays optional
    assert PromptBank.load(str(path)).draw("cat", 0) == "a cat in a park"
    path.write_text('{"slots": {}}')
    with pytest.raises(PromptBankError, match="'templates' list"):
        PromptBank.load(str(path))
    with pytest.raises(PromptBankError, match="neither a file nor one of the built-in banks"):
        PromptBank.load(str(tmp_path / "missing.yaml"))
    path = tmp_path / "bank.yaml"
    path.write_text("templates: [a photo of a {name\n")
    with pytest.raises(PromptBankError, match="not valid YAML"):
        PromptBank.load(str(path))
