"""The recorder against a straightforward reference: store every probability, aggregate by hand."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor

from diffumask.attention import RecorderError, cross_attention_layers, trace
from diffumask.models import load_pipeline
from diffumask.tokens import PromptError

PROMPTS = ["a photo of a dog on a sofa", "a potted plant next to a potted plant"]
CLASSES = [["dog", "sofa"], ["potted plant"]]


class StoreEverything:
    """Eager attention that keeps every call's full probabilities (the naive, memory-hungry way)."""

    def __init__(self, name: str, store: list):
        self.name, self.store = name, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        out = AttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        probs = attn.get_attention_scores(query.float(), key.float(), None)
        batch = hidden_states.shape[0]
        self.store.append((self.name, probs.reshape(batch, attn.heads, *probs.shape[1:])))
        return out


def run(pipe, prompts, seeds, steps=3, **call):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompts, num_inference_steps=steps, generator=generators, output_type="np", **call).images


def reference_run(pipe, prompts, seeds, steps=3, cross=True, **call):
    store: list = []
    saved = dict(pipe.unet.attn_processors)
    procs = dict(saved)
    for name in cross_attention_layers(pipe.unet, cross=cross):
        procs[name] = StoreEverything(name, store)
    pipe.unet.set_attn_processor(procs)
    try:
        images = run(pipe, prompts, seeds, steps, **call)
    finally:
        pipe.unet.set_attn_processor(saved)
    return images, store


def hand_grids(store, image: int, n_images: int, tokens: list[int], latent: int,
               keep=lambda name, call: True) -> dict[int, np.ndarray]:
    """Mean over steps, layers and heads per resolution, conditional half, mean over tokens."""
    by_res: dict[int, list[np.ndarray]] = {}
    calls: dict[str, int] = {}
    for name, probs in store:
        call = calls[name] = calls.get(name, -1) + 1
        if not keep(name, call):
            continue
        cond = n_images + image if probs.shape[0] == 2 * n_images else image
        side = int(round(probs.shape[2] ** 0.5))
        by_res.setdefault(side, []).append(probs[cond].double().numpy())
    return {side: np.mean([p.mean(0) for p in ps], axis=0)[:, tokens].mean(-1).reshape(side, side)
            for side, ps in by_res.items()}


def hand_fuse(grids: dict[int, np.ndarray], size: int, resolutions) -> np.ndarray:
    maps = []
    for r in resolutions:
        up = cv2.resize(grids[r].astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
        maps.append(np.clip(up / up.max(), 0, 1))
    return np.mean(maps, axis=0)


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_recorder_matches_reference(saved_pipelines, kind):
    pipe = load_pipeline(saved_pipelines[kind])
    pipe.set_progress_bar_config(disable=True)
    before = dict(pipe.unet.attn_processors)
    seeds = [11, 12]
    with trace(pipe, PROMPTS, CLASSES) as recorder:
        images = run(pipe, PROMPTS, seeds)
    assert pipe.unet.attn_processors == before, "detaching must restore the original processors"
    ref_images, store = reference_run(pipe, PROMPTS, seeds)
    np.testing.assert_allclose(images, ref_images, atol=1e-4)  # recording does not change generation

    maps = recorder.maps()
    latent = pipe.unet.config.sample_size
    size = images.shape[1]
    expected_default = (4, 8, 16) if kind != "sdxl" else (4, 8)  # SDXL-shaped: no grid-16 cross-attention
    for i, image_maps in enumerate(maps):
        assert image_maps.resolutions == expected_default
        for name, token_ids in image_maps.tokens.items():
            grids = hand_grids(store, i, len(PROMPTS), token_ids, latent)
            assert sorted(grids) == sorted(image_maps.grids[name])
            for res, grid in grids.items():
                np.testing.assert_allclose(image_maps.grids[name][res], grid, rtol=1e-4, atol=1e-7)
            fused = hand_fuse(grids, size, expected_default)
            np.testing.assert_allclose(image_maps[name], fused, atol=1e-5)
            image_maps.resolutions = (16,) if kind != "sdxl" else (8,)  # re-fusing needs no generation
            np.testing.assert_allclose(image_maps[name], hand_fuse(grids, size, image_maps.resolutions), atol=1e-5)
            image_maps.resolutions = expected_default
            assert image_maps[name].shape == (size, size)
            assert 0.0 <= image_maps[name].min() and image_maps[name].max() <= 1.0


def test_multi_token_and_repeated_words_are_averaged(sd1_pipe):
    with trace(sd1_pipe, PROMPTS[1], ["potted plant"]) as recorder:
        run(sd1_pipe, PROMPTS[1], [3], steps=2)
    tokens = recorder.maps()[0].tokens["potted plant"]
    assert tokens == [2, 3, 7, 8]  # <bos> a potted plant next to a potted plant


def test_step_window_and_layer_selection(sd1_pipe):
    layers = ["up_blocks.2"]
    with trace(sd1_pipe, PROMPTS[0], ["dog"], steps=(1, 3), layers=layers) as recorder:
        run(sd1_pipe, PROMPTS[0], [5], steps=4)
    _, store = reference_run(sd1_pipe, PROMPTS[0], [5], steps=4)
    grids = hand_grids(store, 0, 1, recorder.tokens[0]["dog"], 16,
                       keep=lambda name, call: name.startswith("up_blocks.2") and 1 <= call < 3)
    got = recorder.maps()[0].grids["dog"]
    assert sorted(got) == [16]
    np.testing.assert_allclose(got[16], grids[16], rtol=1e-4, atol=1e-7)


def test_batch_equals_single(sd1_pipe):
    with trace(sd1_pipe, PROMPTS, CLASSES) as batched:
        batch_images = run(sd1_pipe, PROMPTS, [7, 8])
    for i, (prompt, classes, seed) in enumerate(zip(PROMPTS, CLASSES, [7, 8])):
        with trace(sd1_pipe, prompt, classes) as single:
            image = run(sd1_pipe, prompt, [seed])
        np.testing.assert_allclose(batch_images[i], image[0], atol=1e-4)
        for name in classes:
            np.testing.assert_allclose(batched.maps()[i][name], single.maps()[0][name], atol=1e-4)
            for res, grid in single.maps()[0].grids[name].items():
                np.testing.assert_allclose(batched.maps()[i].grids[name][res], grid, rtol=1e-3, atol=1e-7)


def test_images_per_prompt_and_no_guidance(sd1_pipe):
    with trace(sd1_pipe, PROMPTS[0], ["dog"], images_per_prompt=2) as recorder:
        sd1_pipe(PROMPTS[0], num_inference_steps=2, num_images_per_prompt=2, guidance_scale=1.0,
                 generator=[torch.Generator().manual_seed(s) for s in (1, 2)], output_type="np")
    maps = recorder.maps()
    assert len(maps) == 2
    assert not np.allclose(maps[0]["dog"], maps[1]["dog"])  # different seeds, different maps


def test_memory_is_constant_in_steps(sd1_pipe):
    sizes = []
    for steps in (2, 6):
        with trace(sd1_pipe, PROMPTS, CLASSES) as recorder:
            run(sd1_pipe, PROMPTS, [1, 2], steps=steps)
        sizes.append(recorder.state_bytes())
    assert sizes[0] == sizes[1] > 0


def test_second_call_inside_one_trace_is_refused(sd1_pipe):
    with pytest.raises(RecorderError, match="called again"):
        with trace(sd1_pipe, PROMPTS[0], ["dog"]):
            run(sd1_pipe, PROMPTS[0], [1], steps=2)
            run(sd1_pipe, PROMPTS[0], [1], steps=2)


def test_batch_mismatch_is_refused(sd1_pipe):
    with pytest.raises(RecorderError, match="expects 1 images"):
        with trace(sd1_pipe, PROMPTS[0], ["dog"]):
            run(sd1_pipe, PROMPTS, [1, 2], steps=1)


def test_replaced_processors_are_refused(saved_pipelines):
    pipe = load_pipeline(saved_pipelines["sd1"])
    pipe.enable_attention_slicing()
    with pytest.raises(RecorderError, match="SlicedAttnProcessor"):
        trace(pipe, PROMPTS[0], ["dog"]).attach()
    pipe.unet.set_attn_processor(XFormersAttnProcessor())
    with pytest.raises(RecorderError, match="XFormersAttnProcessor"):
        trace(pipe, PROMPTS[0], ["dog"]).attach()
    pipe.unet.set_default_attn_processor()
    pipe.fuse_qkv_projections()
    with pytest.raises(RecorderError, match="FusedAttnProcessor2_0"):
        trace(pipe, PROMPTS[0], ["dog"]).attach()
    pipe.unfuse_qkv_projections()
    trace(pipe, PROMPTS[0], ["dog"]).attach().detach()
    assert all(isinstance(p, (AttnProcessor, AttnProcessor2_0)) for p in pipe.unet.attn_processors.values())


def test_nothing_recorded_is_an_error(sd1_pipe):
    recorder = trace(sd1_pipe, PROMPTS[0], ["dog"])
    with recorder:
        pass
    with pytest.raises(RecorderError, match="no cross-attention was recorded"):
        recorder.maps()


def test_prompt_errors_come_before_denoising(sd1_pipe):
    calls = []
    hook = sd1_pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(PromptError, match="does not occur"):
            trace(sd1_pipe, "a photo of a cat", ["dog"])
        with pytest.raises(PromptError, match="at most 77"):
            trace(sd1_pipe, "a dog " + "very " * 80, ["dog"])
    finally:
        hook.remove()
    assert not calls


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_maps_match_float32(saved_pipelines, sd1_pipe, dtype):
    pipe = load_pipeline(saved_pipelines["sd1"], dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    maps = []
    for p in (pipe, sd1_pipe):
        with trace(p, PROMPTS[0], ["dog"]) as recorder:
            run(p, PROMPTS[0], [1], steps=2)
        maps.append(recorder.maps()[0]["dog"])
    assert np.isfinite(maps[0]).all()
    np.testing.assert_allclose(maps[0], maps[1], atol=0.05)


def test_self_attention_matches_reference(sd1_pipe):
    with trace(sd1_pipe, PROMPTS, CLASSES, self_attention=2) as recorder:
        run(sd1_pipe, PROMPTS, [3, 4])
    _, store = reference_run(sd1_pipe, PROMPTS, [3, 4], cross=False)
    for i, image_maps in enumerate(recorder.maps()):
        wanted = [p[len(PROMPTS) + i].double().mean(0).numpy() for _, p in store if p.shape[-1] == 8 * 8]
        assert image_maps.self_attention_grid == (8, 8) and len(wanted) == 3 * 3  # 3 layers x 3 steps
        np.testing.assert_allclose(image_maps.self_attention, np.mean(wanted, axis=0), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(image_maps.self_attention.sum(1), 1.0, atol=1e-5)
        assert image_maps.soft_maps()["__self__@8"].shape == (64, 64)


def test_self_attention_at_a_missing_resolution_is_an_error(sd1_pipe):
    with trace(sd1_pipe, PROMPTS[0], ["dog"], self_attention=16) as recorder:
        run(sd1_pipe, PROMPTS[0], [1], steps=1)
    with pytest.raises(RecorderError, match="latent/16"):
        recorder.maps()
