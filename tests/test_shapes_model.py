"""The shipped shapes model: loads offline, behaves like an SD pipeline, and its masks measure up."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler
from safetensors.torch import load_file

from diffumask.shapes import CLASSES, PALETTE, ShapesPipeline, load_pipeline
from diffumask.shapes.classifier import foreground, load_classifier, training_masks
from diffumask.shapes.model import DEFAULT_THRESHOLD, WEIGHTS_DIR
from diffumask.shapes.train import TrainSettings, train, training_batch, training_scenes
from diffumask.shapes.world import TEXTURES, background, draw_shape


@pytest.fixture(scope="module")
def pipe() -> ShapesPipeline:
    return load_pipeline()


def test_shipped_weights_are_small_and_documented() -> None:
    size = sum(f.stat().st_size for f in WEIGHTS_DIR.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    record = json.loads((WEIGHTS_DIR / "training.json").read_text())
    assert record["command"].startswith("python -m diffumask.shapes.train")
    assert record["settings"]["steps"] >= record["steps_done"] > 0


def test_components_look_like_stable_diffusion(pipe: ShapesPipeline) -> None:
    tok = pipe.tokenizer
    assert tok("a red circle", add_special_tokens=False).input_ids == [tok.convert_tokens_to_ids(w)
                                                                      for w in ("a", "red", "circle")]
    ids = tok("a photo of a star", padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (1, tok.model_max_length) and tok.unk_token_id in ids.tolist()[0]
    context = pipe.text_encoder(ids).last_hidden_state
    assert context.shape[-1] == pipe.unet.config.cross_attention_dim
    assert pipe.vae_scale_factor == 1 and pipe.scheduler.config.prediction_type == "v_prediction"
    assert any(name.endswith("attn2.processor") for name in pipe.unet.attn_processors)


def test_batched_image_equals_same_seed_alone(pipe: ShapesPipeline) -> None:
    prompts = ["a red circle on a plain background", "a blue star on a dotted background"]
    batch = pipe(prompts, num_inference_steps=4, output_type="np",
                 generator=[torch.Generator().manual_seed(s) for s in (1, 2)]).images
    alone = pipe(prompts[1], num_inference_steps=4, output_type="np",
                 generator=[torch.Generator().manual_seed(2)]).images
    assert batch.shape == (2, 32, 32, 3) and 0 <= batch.min() and batch.max() <= 1
    np.testing.assert_allclose(batch[1], alone[0], atol=1e-4)


def test_call_options(pipe: ShapesPipeline) -> None:
    seen = []

    def callback(p, i, t, state):
        seen.append(i)
        return state

    out = pipe("a ring", num_inference_steps=3, num_images_per_prompt=2, negative_prompt="a cross",
               callback_on_step_end=callback, generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 2 and out.images[0].size == (32, 32) and seen == [0, 1, 2]
    unguided = pipe(["a ring", "a star"], guidance_scale=1.0, num_inference_steps=2, output_type="np",
                    return_dict=False)[0]
    assert unguided.shape == (2, 32, 32, 3) and not pipe.do_classifier_free_guidance


@pytest.mark.parametrize("scheduler", [PNDMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_other_schedulers_give_images(pipe: ShapesPipeline, scheduler) -> None:
    default = pipe.scheduler
    pipe.scheduler = scheduler.from_config(default.config)
    try:
        image = pipe("a yellow square on a plain background", num_inference_steps=10, output_type="np",
                     generator=torch.Generator().manual_seed(3)).images[0]
    finally:
        pipe.scheduler = default
    assert np.isfinite(image).all() and image.std() > 0.05


def test_recorder_gives_maps(pipe: ShapesPipeline) -> None:
    from diffumask import trace

    prompts = ["a red circle and a blue star on a plain background", "a green cross"]
    with trace(pipe, prompts, classes=[["circle", "star"], ["cross"]]) as tr:
        pipe(prompts, num_inference_steps=4)
    maps = tr.maps()
    assert maps[0]["circle"].shape == (32, 32)
    # each grid (16 and 8 px here) is max-normalised before the mean, so the fused peak is near 1
    assert 0.5 < maps[1]["cross"].max() <= 1 + 1e-6 and maps[1]["cross"].min() >= 0
    assert not np.allclose(maps[0]["circle"], maps[0]["star"])


def test_classifier_knows_the_world() -> None:
    classifier = load_classifier()
    masks, labels = training_masks(300, seed=77)
    predicted = classifier.predict(masks)
    assert np.mean([CLASSES.index(p) == y for p, y in zip(predicted, labels)]) >= 0.95


@pytest.mark.parametrize("radius", [4.0, 11.0, 14.0])  # about 5 %, 37 % and 60 % of the image
def test_foreground_reads_back_objects_small_and_large_on_tinted_grey(radius: float) -> None:
    """The read-back that judges generated images finds the object's exact pixels, on every texture, on a
    background tinted as the generator tints it, and when the object covers most of the image (a median
    background estimate loses the object from half the image on)."""
    rng = np.random.default_rng(5)
    shape = draw_shape("circle", 32, 16.0, 16.0, radius, 0.0)
    for texture in TEXTURES:
        image = np.repeat(background(rng, texture, 32)[..., None], 3, axis=2).astype(np.int16)
        image = np.clip(image + np.array([12, 0, -12]), 0, 255).astype(np.uint8)  # a warm tint: chroma 24
        image[shape] = PALETTE["purple"]
        assert (foreground(image) == shape).all(), texture


def test_masks_measure_up_on_a_small_sample(pipe: ShapesPipeline) -> None:
    """Issue 4's presence (90 %), right-shape (80 %) and mask mIoU (0.55) targets, with a
    small-sample tolerance (this sample of 24, today's weights and judge: present 100 %, right shape 100 %,
    mIoU 0.77)."""
    from diffumask.shapes.evaluate import generate, judge, prompts_for, summarise

    samples, _ = generate(pipe, prompts_for(1, 4, seed=31), seed=4_000)
    judge(samples, load_classifier())
    figures = summarise(samples, DEFAULT_THRESHOLD)
    assert figures["images"] == 24
    assert figures["present"] >= 0.85
    assert figures["right_shape"] >= 0.75
    assert figures["miou"] >= 0.6
    assert figures["miou"] == max(figures["miou_sweep"].values())  # the model's γ is the best fixed one here


def test_training_mix_follows_the_single_object_share() -> None:
    def counts(share: float) -> list[int]:
        settings = TrainSettings(batch_size=64, single_object_share=share)
        rng = np.random.default_rng(0)
        return [len(scene.objects) for step in (1, 2) for scene in training_scenes(step, settings, rng)]

    assert set(counts(1.0)) == {1} and set(counts(0.0)) == {2, 3}
    mixed = counts(0.85)
    assert 0.75 < mixed.count(1) / len(mixed) < 0.95
    images, captions = training_batch(3, TrainSettings(batch_size=8))
    again = training_batch(3, TrainSettings(batch_size=8))
    assert torch.equal(images, again[0]) and captions == again[1]  # a pure function of (seed, step)


def test_diffumask_shapes_train_hands_its_options_to_the_trainer(tmp_path, capsys) -> None:
    from diffumask.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["shapes", "train", "--help"])
    shown = capsys.readouterr().out
    assert exited.value.code == 0 and "--single-object-share" in shown and shown.startswith("usage: diffumask shapes train")
    assert main(["shapes", "train", "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2",
                 "--single-object-share", "1"]) == 0
    record = json.loads((tmp_path / "run" / "training.json").read_text())
    assert record["steps_done"] == 1 and record["settings"]["single_object_share"] == 1.0
    with pytest.raises(SystemExit) as exited:
        main(["shapes", "export", str(tmp_path / "x"), "--bogus"])
    assert exited.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_training_command_writes_a_loadable_pipeline(tmp_path, caplog) -> None:
    out = train(tmp_path / "run", TrainSettings(steps=2, batch_size=4, warmup_steps=1))
    # saving in fp16 is not inference on a CPU: no warning that such a pipeline cannot run there
    assert not [r for r in caplog.records if "float16" in r.getMessage()]
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert {t.dtype for t in load_file(out / part).values()} == {torch.float16}
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 1 and np.isfinite(log[0]["loss"])
    record = json.loads((out / "training.json").read_text())
    assert record["steps_done"] == 2 and record["settings"]["batch_size"] == 4
    reloaded = load_pipeline(path=out)
    assert reloaded(["a star"], num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)


def test_loader_workers_give_the_weights_of_rendering_in_the_loop(tmp_path) -> None:
    """Scenes rendered in loader processes (as on a GPU) give the very weights of rendering in the loop: the
    batches are a pure function of (seed, step) and come in step order."""
    weights = []
    for workers in (0, 2):
        out = train(tmp_path / f"run{workers}", TrainSettings(steps=3, batch_size=4, warmup_steps=1,
                                                              loader_workers=workers))
        weights.append(load_file(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_the_scene_loader_gives_each_step_its_batch_and_leaves_the_models_random_draws_alone() -> None:
    """What a run without a loader drew from torch's generator, a run with one draws too: old runs reproduce."""
    from diffumask.shapes.train import scene_batches

    settings = TrainSettings(steps=3, batch_size=4)
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    batches = list(scene_batches(settings))
    assert torch.equal(torch.rand(4), expected)
    assert len(batches) == 3
    for step, (images, captions) in enumerate(batches, start=1):
        reference = training_batch(step, settings)
        assert torch.equal(images, reference[0]) and captions == reference[1]


def test_init_from_goes_on_from_saved_weights(tmp_path) -> None:
    """--init-from starts from a saved pipeline, not from a fresh initialisation; a wrong folder or backbone is a
    one-line error."""
    from diffumask.errors import ConfigError

    name = "unet/diffusion_pytorch_model.safetensors"
    shipped = load_file(WEIGHTS_DIR / name)
    settings = dict(steps=3, batch_size=2, warmup_steps=1, lr=1e-4)
    went_on = load_file(train(tmp_path / "on", TrainSettings(**settings, init_from=str(WEIGHTS_DIR))) / name)
    fresh = load_file(train(tmp_path / "fresh", TrainSettings(**settings)) / name)
    gap = lambda w: max((w[k].float() - shipped[k].float()).abs().max().item() for k in shipped)  # noqa: E731
    assert 0 < gap(went_on) < 1e-2 < gap(fresh)  # trained on, a little, from the shipped weights
    history = json.loads((tmp_path / "on" / "training.json").read_text())["init_from_record"]
    assert history == json.loads((WEIGHTS_DIR / "training.json").read_text())  # where the weights came from
    assert "init_from_record" not in json.loads((tmp_path / "fresh" / "training.json").read_text())
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    for folder in (tmp_path, tmp_path / "sd"):
        with pytest.raises(ConfigError, match="no saved shapes pipeline"):
            train(tmp_path / "x", TrainSettings(**settings, init_from=str(folder)))
    assert not (tmp_path / "x").exists()  # nothing is written before the start is known to be good
    with pytest.raises(ConfigError, match="holds a unet pipeline; pass --backbone unet"):
        train(tmp_path / "y", TrainSettings(**settings, init_from=str(WEIGHTS_DIR), backbone="dit"))


def test_a_wider_unet_trains_loads_and_records(tmp_path, capsys) -> None:
    """--channels / --layers-per-block shape a larger UNet that generate's loader reads back with its recorder's
    maps; impossible shapes are one-line usage errors."""
    from diffumask.cli import main
    from diffumask.generate import GenerateConfig, generate_dataset

    out = tmp_path / "wide"
    assert main(["shapes", "train", "--out", str(out), "--steps", "1", "--batch-size", "2", "--channels", "48,96,96",
                 "--layers-per-block", "2"]) == 0
    record = json.loads((out / "training.json").read_text())
    config = json.loads((out / "unet" / "config.json").read_text())
    for saved in (record["unet_config"], config):
        assert list(saved["block_out_channels"]) == [48, 96, 96] and saved["layers_per_block"] == 2
    dataset = generate_dataset(GenerateConfig(classes=["star"], out=str(tmp_path / "ds"), model=str(out),
                                              images_per_class=1, steps=2))
    assert len(dataset.records()) == 1 and dataset.read_mask(dataset.records()[0]["id"]).shape == (32, 32)
    for bad, says in ((["--channels", "48,96"], "three positive multiples of 16"),
                      (["--channels", "40,96,96"], "three positive multiples of 16"),
                      (["--channels", "a,b,c"], "three comma-separated numbers"),
                      (["--layers-per-block", "0"], "give 1 or more"),
                      (["--channels", "48,96,96", "--init-from", str(WEIGHTS_DIR)], "not with --backbone dit or"),
                      (["--batch-size", "0"], "--batch-size must be at least 1"), (["--lr", "-1"], "--lr must be positive"),
                      (["--steps", "0"], "--steps must be at least 1")):
        with pytest.raises(SystemExit) as exited:
            main(["shapes", "train", "--out", str(tmp_path / "bad"), "--steps", "1", *bad])
        assert exited.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit) as exited:  # a folder with something in it (a pipeline, a dataset) is not overwritten
        main(["shapes", "train", "--out", str(tmp_path / "wide"), "--steps", "1"])
    assert exited.value.code == 2 and "exists and is not an empty folder" in capsys.readouterr().err


def test_the_diffusion_transformer_trains_and_records(tmp_path) -> None:
    """The SD3-shaped twin: trains (flow matching), reloads through the model loader, and the joint-attention
    recorder reads its maps."""
    from diffumask.attention import trace
    from diffumask.models import load_pipeline as load_model

    out = train(tmp_path / "dit", TrainSettings(steps=2, batch_size=4, warmup_steps=1, backbone="dit"))
    record = json.loads((out / "training.json").read_text())
    assert record["settings"]["backbone"] == "dit" and "transformer_config" in record
    saved = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float16}
    pipe = load_model(str(out))
    assert type(pipe).__name__ == "ShapesDiTPipeline"
    from diffumask.prompts import PromptBank, resolve_bank
    assert resolve_bank("auto", str(out)).source == PromptBank.load("shapes").source  # its world's captions
    with trace(pipe, ["a red star on a plain background"], ["star"]) as recorder:
        images = pipe(["a red star on a plain background"], num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3)
    maps = recorder.maps()[0]
    assert maps["star"].shape == (32, 32) and list(maps.attention) == [16]
