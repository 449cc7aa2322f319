"""The recorder against a straightforward reference: store every probability, aggregate by hand."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor

from torch.profiler import ProfilerActivity, profile

from diffumask.attention import RecorderError, cross_attention_layers, fuse, trace
from diffumask.errors import ConfigError
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


def hand_token_grids(store, image: int, n_images: int, tokens: list[int], latent: int,
                     keep=lambda name, call: True) -> dict[int, np.ndarray]:
    """Per resolution, (len(tokens), side, side): mean over steps, layers and heads of each token's
    column, conditional half."""
    by_res: dict[int, list[np.ndarray]] = {}
    calls: dict[str, int] = {}
    for name, probs in store:
        call = calls[name] = calls.get(name, -1) + 1
        if not keep(name, call):
            continue
        cond = n_images + image if probs.shape[0] == 2 * n_images else image
        side = int(round(probs.shape[2] ** 0.5))
        by_res.setdefault(side, []).append(probs[cond].double().numpy())
    return {side: np.mean([p.mean(0) for p in ps], axis=0)[:, tokens].T.reshape(len(tokens), side, side)
            for side, ps in by_res.items()}


def hand_grids(store, image: int, n_images: int, tokens: list[int], latent: int,
               keep=lambda name, call: True) -> dict[int, np.ndarray]:
    """The raw grids of a class: the mean of its token columns."""
    return {side: grid.mean(0) for side, grid in hand_token_grids(store, image, n_images, tokens, latent, keep).items()}


def hand_fuse(token_grids: dict[int, np.ndarray], size: int, resolutions, order: str = "maps") -> np.ndarray:
    """The official code's order ("maps"): per token and resolution, bicubic upsampling (cv2) and
    division by the maximum; mean over resolutions and tokens. "columns": tokens averaged first."""
    maps = []
    for r in resolutions:
        grids = token_grids[r] if token_grids[r].ndim == 3 else token_grids[r][None]
        if order == "columns":
            grids = grids.mean(0, keepdims=True)
        for grid in grids:
            up = cv2.resize(grid.astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
            maps.append(np.clip(up / up.max(), 0, 1))
    return np.mean(maps, axis=0)


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_recorder_matches_reference(saved_pipelines, kind):
    pipe = load_pipeline(saved_pipelines[kind], device="cpu")
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
            token_grids = hand_token_grids(store, i, len(PROMPTS), token_ids, latent)
            assert sorted(token_grids) == sorted(image_maps.grids[name])
            for res, grid in token_grids.items():
                np.testing.assert_allclose(image_maps.token_grids(name)[res], grid, rtol=1e-4, atol=1e-7)
                np.testing.assert_allclose(image_maps.grids[name][res], grid.mean(0), rtol=1e-4, atol=1e-7)
            fused = hand_fuse(token_grids, size, expected_default)
            np.testing.assert_allclose(image_maps[name], fused, atol=1e-5)
            image_maps.resolutions = (16,) if kind != "sdxl" else (8,)  # re-fusing needs no generation
            np.testing.assert_allclose(image_maps[name], hand_fuse(token_grids, size, image_maps.resolutions),
                                       atol=1e-5)
            image_maps.resolutions = expected_default
            assert image_maps[name].shape == (size, size)
            assert 0.0 <= image_maps[name].min() and image_maps[name].max() <= 1.0


def test_multi_token_and_repeated_words_are_averaged(sd1_pipe):
    """Every token of every occurrence counts, in the paper's order (each token's map normalised,
    then averaged); the raw-column order is an option, and the two give different maps here."""
    prompt = "an aeroplane above a potted plant next to a potted plant"
    classes = ["aeroplane", "potted plant"]
    with trace(sd1_pipe, prompt, classes) as paper:
        images = run(sd1_pipe, prompt, [3], steps=2)
    with trace(sd1_pipe, prompt, classes, token_average="columns") as columns:
        run(sd1_pipe, prompt, [3], steps=2)
    _, store = reference_run(sd1_pipe, prompt, [3], steps=2)
    maps, size = paper.maps()[0], images.shape[1]
    # <bos> an aerop|lane above a potted plant next to a potted plant
    assert maps.tokens == {"aeroplane": [2, 3], "potted plant": [6, 7, 11, 12]}
    for name, tokens in maps.tokens.items():
        token_grids = hand_token_grids(store, 0, 1, tokens, 16)
        for res, grid in token_grids.items():
            np.testing.assert_allclose(maps.token_grids(name)[res], grid, rtol=1e-4, atol=1e-7)
        by_maps = hand_fuse(token_grids, size, maps.resolutions, "maps")
        by_columns = hand_fuse(token_grids, size, maps.resolutions, "columns")
        # The orders differ by far more than the tolerance, so this test can tell them apart.
        assert np.abs(by_maps - by_columns).max() > 100 * 1e-5
        np.testing.assert_allclose(maps[name], by_maps, atol=1e-5)
        np.testing.assert_allclose(columns.maps()[0][name], by_columns, atol=1e-5)
        maps.token_average = "columns"  # re-fusing in the other order needs no generation
        np.testing.assert_allclose(maps[name], by_columns, atol=1e-5)
        maps.token_average = "maps"
        # The soft-map file keeps each token's grid, so the paper's order can be re-fused from it.
        soft = maps.soft_maps()
        assert soft[f"{name}@8"].shape == (len(tokens), 8, 8)
        refused = fuse({r: soft[f"{name}@{r}"] for r in maps.resolutions}, (size, size))
        np.testing.assert_allclose(refused, soft[name], atol=1e-6)
    with pytest.raises(ConfigError, match="token_average"):
        trace(sd1_pipe, prompt, classes, token_average="tokens")


def test_trace_reads_what_the_pipeline_encodes(sd1_pipe):
    """The issue's case: a trace of "a photo of a dog" around a call on another prompt used to
    give a "dog" map from column 5, which there is the word "a"."""
    calls = []
    hook = sd1_pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(RecorderError, match="given the prompt.*'a photo of a dog'.* encodes "
                                                ".*'a cat sitting on a red mat'"):
            with trace(sd1_pipe, "a photo of a dog", ["dog"]):
                run(sd1_pipe, "a cat sitting on a red mat", [1], steps=1)
        with pytest.raises(RecorderError, match=r"given the prompt.*\['a photo of a dog on a sofa'\].* encodes "
                                                r"\['a photo of a dog on a sofa', 'a potted plant"):
            with trace(sd1_pipe, PROMPTS[0], ["dog"]):
                run(sd1_pipe, PROMPTS, [1, 2], steps=1)
    finally:
        hook.remove()
    assert not calls, "the mismatch is found before any denoising"
    assert all(isinstance(p, (AttnProcessor, AttnProcessor2_0)) for p in sd1_pipe.unet.attn_processors.values())


def test_every_word_after_the_call(sd1_pipe):
    """DAAM's form: trace(pipe) keeps every token column; any whole word is asked for afterwards
    and equals the independent reference and the classes form."""
    with trace(sd1_pipe) as tr:
        images = run(sd1_pipe, PROMPTS, [7, 8])
    _, store = reference_run(sd1_pipe, PROMPTS, [7, 8])
    with trace(sd1_pipe, PROMPTS, CLASSES) as classed:
        run(sd1_pipe, PROMPTS, [7, 8])
    maps, size = tr.maps(), images.shape[1]
    assert [m.prompt for m in maps] == PROMPTS and maps[0].columns == list(range(77))
    # <bos> a photo of a dog on a sofa | <bos> a potted plant next to a potted plant
    for i, word, tokens in [(0, "dog", [5]), (0, "sofa", [8]), (0, "photo", [2]), (1, "potted plant", [2, 3, 7, 8]),
                            (1, "next", [4])]:
        np.testing.assert_allclose(maps[i][word], hand_fuse(hand_token_grids(store, i, 2, tokens, 16), size,
                                                            maps[i].resolutions), atol=1e-5)
        assert maps[i].tokens[word] == tokens
    for i, names in enumerate(CLASSES):
        for name in names:
            np.testing.assert_allclose(maps[i][name], classed.maps()[i][name], atol=1e-6)
    with pytest.raises(PromptError, match="'cat' does not occur"):
        maps[0]["cat"]
    with pytest.raises(RecorderError, match="'photo' was not recorded"):
        classed.maps()[0]["photo"]
    # A mapping of words: `in` says whether a map can be had, without adding the word; iteration and dict() give
    # the classes (the traced ones, then those asked for); a non-word key is a TypeError that names the classes.
    fresh = tr.maps()[1]
    assert "next" in fresh and "cat" not in fresh and 0 not in fresh and ["next"] not in fresh and list(fresh) == []
    assert "photo" not in classed.maps()[0] and list(classed.maps()[0]) == ["dog", "sofa"]
    assert dict(classed.maps()[0]).keys() == {"dog", "sofa"}
    np.testing.assert_array_equal(dict(classed.maps()[0])["dog"], classed.maps()[0]["dog"])
    with pytest.raises(TypeError, match=r"looked up by word.*not by int 0; these hold \['dog', 'sofa'\]"):
        classed.maps()[0][0]


def test_every_word_form_with_images_per_prompt_and_whole_words(sd1_pipe):
    prompt = "a sheepdog next to a dog"
    with trace(sd1_pipe) as tr:
        sd1_pipe(prompt, num_inference_steps=2, num_images_per_prompt=2, output_type="np",
                 generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    maps = tr.maps()
    assert len(maps) == 2 and maps[0].tokens == {} and maps[0]["dog"].shape == (32, 32)
    assert maps[0].tokens == {"dog": [7]}  # <bos> a sheep|dog next to a dog: only the whole word
    assert not np.allclose(maps[0]["dog"], maps[1]["dog"])
    with pytest.raises(PromptError, match="'dog' occurs only inside 'sheepdog'"):
        trace(sd1_pipe, "a photo of a sheepdog", ["dog"])


def test_classes_without_prompts(sd1_pipe):
    """Classes alone: the prompts are read from the text encoder, the classes found in them before
    denoising, and only their columns kept."""
    with trace(sd1_pipe, classes=["dog"]) as tr:
        run(sd1_pipe, PROMPTS[0], [4], steps=2)
    with trace(sd1_pipe, PROMPTS[0], ["dog"]) as given:
        run(sd1_pipe, PROMPTS[0], [4], steps=2)
    maps = tr.maps()[0]
    assert maps.prompt == PROMPTS[0] and maps.columns == [5] and maps.tokens == {"dog": [5]}
    np.testing.assert_allclose(maps["dog"], given.maps()[0]["dog"], atol=1e-6)
    calls = []
    hook = sd1_pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(PromptError, match="'dog' occurs only inside 'sheepdog'"):
            with trace(sd1_pipe, classes=["dog"]):
                run(sd1_pipe, "a sheepdog on a sofa", [4], steps=1)
    finally:
        hook.remove()
    assert not calls


def test_every_word_form_needs_the_text_encoder(sd1_pipe):
    embeds, negative = sd1_pipe.encode_prompt(PROMPTS[0], "cpu", 1, True)
    with pytest.raises(RecorderError, match="no text encoder did"):
        with trace(sd1_pipe):
            sd1_pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=1)
    with trace(sd1_pipe, PROMPTS[0], ["dog"]) as tr:  # given prompts are trusted when nothing is encoded
        sd1_pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=1, output_type="np")
    assert tr.maps()[0]["dog"].shape == (32, 32)


def test_sdxl_text_encoders_must_agree(saved_pipelines):
    pipe = load_pipeline(saved_pipelines["sdxl"], device="cpu")
    pipe.set_progress_bar_config(disable=True)
    for recorder in (trace(pipe), trace(pipe, PROMPTS[0], ["dog"])):
        with pytest.raises(RecorderError, match=r"\['a photo of a dog on a sofa'\] \(text_encoder\) and "
                                                r"\['a cat on a mat'\] \(text_encoder_2\)"):
            with recorder:
                run(pipe, PROMPTS[0], [1], steps=1, prompt_2="a cat on a mat")
    # The second tokenizer's pad token is "!": another id than the first's "!", the same word.
    prompt = "a dog on a sofa!"
    assert pipe.tokenizer(prompt).input_ids != pipe.tokenizer_2(prompt).input_ids
    with trace(pipe) as tr:
        run(pipe, prompt, [1], steps=1, prompt_2=prompt)
    assert tr.maps()[0].prompt == "a dog on a sofa !" and tr.maps()[0]["sofa"].shape == (32, 32)


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


def test_only_the_recorded_layers_processors_change_and_all_come_back(sd1_pipe, monkeypatch):
    """The recorder sets each hooked layer's processor and no other (set_attn_processor on the whole UNet, twice per
    batch, cost host time while the GPU waited); the processors it replaced come back as the same objects."""
    from diffumask.attention import RecordingProcessor

    names = {module: f"{name}.processor" for name, module in sd1_pipe.unet.named_modules()}
    touched = []
    set_processor = Attention.set_processor

    def noting(module, processor):
        touched.append(names[module])
        return set_processor(module, processor)

    monkeypatch.setattr(Attention, "set_processor", noting)
    before = dict(sd1_pipe.unet.attn_processors)
    with trace(sd1_pipe, PROMPTS[0], ["dog"], layers=["up_blocks.2"], self_attention=1):
        during = sd1_pipe.unet.attn_processors
        recording = {name for name, proc in during.items() if isinstance(proc, RecordingProcessor)}
        expected = {name for name in cross_attention_layers(sd1_pipe.unet) if name.startswith("up_blocks.2")}
        expected |= set(cross_attention_layers(sd1_pipe.unet, cross=False))  # the self-attention, at every layer
        assert recording == expected and len(recording) < len(before)
        assert all(during[name] is before[name] for name in set(before) - recording)
    after = sd1_pipe.unet.attn_processors
    assert after.keys() == before.keys() and all(after[name] is before[name] for name in before)
    assert sorted(touched) == sorted(2 * list(recording))  # set on attaching, set back on detaching: no other


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


def live_tensor_bytes(fn) -> tuple[int, int]:
    """Tensor bytes still allocated after ``fn()`` and the peak during it, from the torch
    profiler's allocation events (not from anything the recorder reports)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        kept = fn()  # noqa: F841 - what fn returns stays alive until the events are summed
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return live, peak


@pytest.mark.parametrize("form", ["classes", "every word"])
def test_memory_is_constant_in_steps(sd1_pipe, form):
    def generate(steps: int, record: bool):
        if not record:
            return run(sd1_pipe, PROMPTS, [1, 2], steps=steps)
        with (trace(sd1_pipe, PROMPTS, CLASSES) if form == "classes" else trace(sd1_pipe)) as recorder:
            images = run(sd1_pipe, PROMPTS, [1, 2], steps=steps)
        return images, recorder  # the images' memory is on both sides

    generate(1, True)  # warm-up: lazily built state outside the recorder
    extra = {}
    for steps in (2, 6):
        (base_live, base_peak), (live, peak) = (live_tensor_bytes(lambda: generate(steps, r)) for r in (False, True))
        extra[steps] = (live - base_live, peak - base_peak)
    assert extra[2] == extra[6], f"what the recorder holds grows with the steps: {extra}"
    # Grids 16, 8 and 4 of 2 images, float32: all 77 token columns, or the 4 columns of the widest
    # image's classes ("potted plant" twice) plus their int64 index; the columns as one-hot values over
    # the 77 keys (float32, the model's dtype), zero-padded to a multiple of each head width the layers
    # have, and once more expanded over each layer shape's heads; and the one-byte flag that notes, on
    # the UNet's device, whether the timesteps ever rose.
    columns = 77 if form == "every word" else 4
    shapes = {(a.heads, a.inner_dim // a.heads) for a in sd1_pipe.unet.modules() if isinstance(a, Attention)
              and a.is_cross_attention}
    one_hot = sum(2 * 77 * -(-columns // w) * w * 4 for w in {w for _, w in shapes})
    one_hot += sum(2 * heads * 77 * -(-columns // w) * w * 4 for heads, w in shapes)
    kept = (2 * (16 * 16 + 8 * 8 + 4 * 4) * columns * 4 + (0 if form == "every word" else 2 * columns * 8)
            + one_hot + 1)
    assert extra[2][0] == kept


def test_second_call_inside_one_trace_is_refused(sd1_pipe):
    with pytest.raises(RecorderError, match="called again"):
        with trace(sd1_pipe, PROMPTS[0], ["dog"]):
            run(sd1_pipe, PROMPTS[0], [1], steps=2)
            run(sd1_pipe, PROMPTS[0], [1], steps=2)


def test_batch_mismatch_is_refused(sd1_pipe):
    with pytest.raises(RecorderError, match="expects 2 images"):
        with trace(sd1_pipe, PROMPTS[0], ["dog"], images_per_prompt=2):
            run(sd1_pipe, PROMPTS[0], [1], steps=1)


def test_replaced_processors_are_refused(saved_pipelines):
    pipe = load_pipeline(saved_pipelines["sd1"], device="cpu")
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
    with trace(sd1_pipe, PROMPTS[0], ["dog"], steps=(30, 50)) as recorder:
        run(sd1_pipe, PROMPTS[0], [5], steps=4)
    with pytest.raises(RecorderError, match=r"window \(30, 50\) holds none of the 4 denoiser calls"):
        recorder.maps()


@pytest.mark.parametrize("steps", [(5, 2), 5, (-1, 3), (1.5, 3), (1, 2, 3)])
def test_a_bad_steps_window_is_refused_up_front(sd1_pipe, steps):
    with pytest.raises(ConfigError, match=r"give \(start, stop\)"):
        trace(sd1_pipe, PROMPTS[0], ["dog"], steps=steps)


def test_what_is_not_a_pipeline_is_refused_in_one_sentence(sd1_pipe):
    from diffusers import DDPMPipeline, DDPMScheduler

    from diffumask.generate import generate_one

    with pytest.raises(ConfigError, match=r"takes a loaded pipeline, not the name 'shapes': pipe = diffumask\.models"):
        trace("shapes")
    for thing in (None, sd1_pipe.unet):
        with pytest.raises(ConfigError, match=f"text-to-image pipeline .*got {type(thing).__name__}"):
            trace(thing)
        with pytest.raises(ConfigError, match="generate takes a diffusers text-to-image pipeline"):
            generate_one(thing, PROMPTS[0], ["dog"])
    unconditional = DDPMPipeline(unet=sd1_pipe.unet, scheduler=DDPMScheduler())
    for call in (lambda: trace(unconditional), lambda: generate_one(unconditional, PROMPTS[0], ["dog"])):
        with pytest.raises(ConfigError, match=r"^DDPMPipeline takes no prompt \(its call reads batch_size, generator, num_inference_steps, \.\.\.\)"):
            call()
    with pytest.raises(ConfigError, match="threshold must lie strictly between 0 and 1"):
        generate_one(sd1_pipe, PROMPTS[0], ["dog"], steps=1, threshold=1.5)
    # One class as a string is that class, not its letters.
    assert generate_one(sd1_pipe, PROMPTS[0], "dog", steps=1).maps.classes == ["dog"]
    with trace(sd1_pipe, PROMPTS[0], "dog") as recorder:
        run(sd1_pipe, PROMPTS[0], [5], steps=1)
    assert recorder.maps()[0].classes == ["dog"]


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
    pipe = load_pipeline(saved_pipelines["sd1"], device="cpu", dtype=dtype)
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


def test_self_attention_every_kth_step_is_the_mean_of_those_steps(sd1_pipe):
    """every=2 over 3 steps records steps 0 and 2: the mean of what windows of step 0 and of step 2 record
    (the cross-attention maps keep every step)."""
    def recorded(**options):
        with trace(sd1_pipe, PROMPTS, CLASSES, self_attention=2, **options) as recorder:
            run(sd1_pipe, PROMPTS, [3, 4])
        return recorder.maps()

    strided = recorded(self_attention_every=2)
    first, third, every = recorded(steps=(0, 1)), recorded(steps=(2, 3)), recorded()
    for i in range(len(PROMPTS)):
        np.testing.assert_allclose(strided[i].self_attention,
                                   (first[i].self_attention + third[i].self_attention) / 2, rtol=1e-5, atol=1e-8)
        assert not np.allclose(strided[i].self_attention, every[i].self_attention, rtol=1e-5, atol=1e-8)
        np.testing.assert_array_equal(strided[i]["dog" if i == 0 else "potted plant"],
                                      every[i]["dog" if i == 0 else "potted plant"])
    with pytest.raises(ConfigError, match="self_attention_every"):
        trace(sd1_pipe, PROMPTS, CLASSES, self_attention=2, self_attention_every=0)


def test_self_attention_grid_is_capped(sd1_pipe):
    """latent/1 (16x16) asked for with at most 8 a side: recorded at 8x8, as latent/2 would be."""
    with trace(sd1_pipe, PROMPTS, CLASSES, self_attention=1, self_attention_max=8) as capped:
        run(sd1_pipe, PROMPTS, [3, 4])
    with trace(sd1_pipe, PROMPTS, CLASSES, self_attention=2) as half:
        run(sd1_pipe, PROMPTS, [3, 4])
    for a, b in zip(capped.maps(), half.maps()):
        assert a.self_attention_grid == (8, 8)
        np.testing.assert_array_equal(a.self_attention, b.self_attention)


def test_second_call_without_text_encoder_is_refused(sd1_pipe):
    """With prompt embeddings no encoder runs; the rising timesteps give the second call away."""
    embeds, negative = sd1_pipe.encode_prompt(PROMPTS[0], "cpu", 1, True)
    with trace(sd1_pipe, PROMPTS[0], ["dog"]) as recorder:
        for _ in range(2):
            sd1_pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=2, output_type="np")
    with pytest.raises(RecorderError, match="called again"):
        recorder.maps()


def test_self_attention_at_a_missing_resolution_is_an_error(sd1_pipe):
    with trace(sd1_pipe, PROMPTS[0], ["dog"], self_attention=16) as recorder:
        run(sd1_pipe, PROMPTS[0], [1], steps=1)
    with pytest.raises(RecorderError, match="latent/16"):
        recorder.maps()


def test_column_probabilities_in_head_wide_groups_with_a_mask():
    """More recorded columns than a head is wide: the one-hot values go in several groups; an additive
    mask enters the softmax as in the layer itself."""
    from diffumask.attention import column_probabilities

    rng = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 3, 10, 4, generator=rng), torch.randn(2, 3, 20, 4, generator=rng)
    mask = torch.zeros(2, 1, 1, 20)
    mask[1, ..., 15:] = -1e4  # the second image's last keys are masked out
    columns = torch.tensor([[3, 5, 7, 9, 11, 13], [0, 1, 2, 14, 15, 19]])
    values = torch.zeros(2, 20, 6)
    values[torch.arange(2)[:, None], columns, torch.arange(6)[None]] = 1
    for given_mask in (None, mask):
        scores = query.double() @ key.double().transpose(-1, -2) / 2  # 1/√d, d = 4
        if given_mask is not None:
            scores = scores + given_mask.double()
        expected = torch.softmax(scores, dim=-1).mean(1)
        expected = torch.stack([expected[i][:, columns[i]] for i in range(2)]).float()
        torch.testing.assert_close(column_probabilities(query, key, values, given_mask), expected,
                                   rtol=1e-5, atol=1e-7)
        padded = torch.nn.functional.pad(values, (0, 2))  # zero columns up to a multiple of the head width
        torch.testing.assert_close(column_probabilities(query, key, padded, given_mask, columns=6), expected,
                                   rtol=1e-5, atol=1e-7)


def test_self_attention_probabilities_in_half_precision_stay_close():
    """A half-precision model's probabilities are computed in its precision (half the bytes on a GPU)
    and averaged in float32: the result is float32 and close to the float32 computation."""
    from diffumask.attention import AttentionRecorder

    rng = torch.Generator().manual_seed(1)
    query, key = torch.randn(2, 4, 64, 16, generator=rng), torch.randn(2, 4, 64, 16, generator=rng)
    full = AttentionRecorder._mean_probabilities(0.25, query, key)
    half = AttentionRecorder._mean_probabilities(0.25, query.bfloat16(), key.bfloat16())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0.05, atol=2e-3)
    torch.testing.assert_close(half.sum(-1), torch.ones_like(half.sum(-1)), rtol=0.01, atol=0)


def test_heads_in_groups_give_the_same_mean():
    """A small byte limit splits the heads into groups; the head mean is the same as in one pass."""
    from diffumask.attention import AttentionRecorder

    rng = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 6, 64, 16, generator=rng), torch.randn(2, 6, 77, 16, generator=rng)
    whole = AttentionRecorder._mean_probabilities(0.125, query, key)
    grouped = AttentionRecorder._mean_probabilities(0.125, query, key, limit=2 * 4 * 2 * 64 * 77 * 4)  # 4 heads
    one_by_one = AttentionRecorder._mean_probabilities(0.125, query, key, limit=1)
    reference = torch.softmax(query.double() @ key.double().transpose(-1, -2) * 0.125, dim=-1).mean(1).float()
    for result in (whole, grouped, one_by_one):
        torch.testing.assert_close(result, reference, rtol=1e-5, atol=1e-7)
