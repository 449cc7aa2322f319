"""The diffusion-transformer recorder (SD3, FLUX) against a reference that computes every joint-attention
probability with an explicit softmax and aggregates by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffumask.attention import RecorderError, trace, word_locator
from diffumask.errors import ConfigError
from diffumask.joint_attention import JointAttentionRecorder, joint_layers
from diffumask.models import auto_dtype, load_pipeline
from diffumask.tokens import PromptError

PROMPTS = ["a photo of a dog on a sofa", "an aeroplane over a red tree"]
CLASSES = [["dog", "sofa"], ["aeroplane", "tree"]]


@pytest.fixture(scope="module")
def pipes(saved_transformers):
    loaded = {}
    for kind, folder in saved_transformers.items():
        pipe = load_pipeline(folder, device="cpu")
        pipe.set_progress_bar_config(disable=True)
        loaded[kind] = pipe
    return loaded


def run(pipe, prompts, seeds, steps=2, **call):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    call.setdefault("guidance_scale", 3.0)
    return pipe(prompts, height=32, width=32, num_inference_steps=steps, generator=generators,
                output_type="np", **call).images


class KeepQueriesAndKeys(JointAttentionRecorder):
    """The recorder's processors, but each joint call's queries and keys are kept instead of reduced."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def _record_joint(self, name, query, key, images, text_start, logsumexp=None, mask=None):
        if self._recording:
            self.calls.append((name, self._step, query.detach().clone(), key.detach().clone(), images, text_start))


def by_hand(calls, image, n_images, columns, keep=lambda name, step: True, mask=None):
    """(len(columns), tokens): softmax over every key (those ``mask``, (batch, keys), keeps), conditional row,
    image queries, the columns, mean over heads, then over the kept calls."""
    per_call = []
    for name, step, query, key, images, text_start in calls:
        if not keep(name, step):
            continue
        row = n_images + image if query.shape[0] == 2 * n_images else image
        scores = query[row].double() @ key[row].double().transpose(-1, -2) / query.shape[-1] ** 0.5
        if mask is not None:
            scores = scores.masked_fill(~mask[row], float("-inf"))
        probs = torch.softmax(scores, dim=-1)[:, images]  # (heads, image tokens, keys)
        per_call.append(probs[..., [text_start + c for c in columns]].mean(0).T.numpy())
    return np.mean(per_call, axis=0)


@pytest.mark.parametrize("kernel", ["fused", "math"])
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_recorder_matches_reference(pipes, kind, kernel):
    """The maps against softmax by hand, and the images against the stock processors', bit for bit: with
    the fused kernel the normaliser comes from the layer's own call (its log-sum-exp); under the math
    kernel, which keeps none, from the one-hot second call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pipe = pipes[kind]
    window = (0.0, 1.0)
    backends = [SDPBackend.MATH] if kernel == "math" else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(backends):
        stock_images = run(pipe, PROMPTS, [1, 2], steps=3)
        with KeepQueriesAndKeys(pipe, PROMPTS, CLASSES, block_window=window) as reference:
            expected_images = run(pipe, PROMPTS, [1, 2], steps=3)
        with trace(pipe, PROMPTS, CLASSES, block_window=window, steps=(1, 3)) as recorder:
            images = run(pipe, PROMPTS, [1, 2], steps=3)
    np.testing.assert_array_equal(images, stock_images)
    np.testing.assert_array_equal(expected_images, stock_images)
    assert len(recorder.layers) == len(joint_layers(pipe.transformer)) == 4
    for i, maps in enumerate(recorder.maps()):
        grid = maps.attention[8]  # 32 px: a 16x16 latent, 8x8 tokens
        hand = by_hand(reference.calls, i, 2, maps.columns, keep=lambda name, step: step >= 1)
        np.testing.assert_allclose(grid.reshape(len(maps.columns), -1), hand, rtol=1e-4, atol=1e-6)
        assert maps["dog" if i == 0 else "tree"].shape == (32, 32)


def test_flux_records_the_masked_softmax_the_layer_computes(pipes):
    """FLUX-derived pipelines pass an attention mask over padded text keys; the word maps are then the
    masked softmax, which the kernel's log-sum-exp (unmasked) cannot give: the one-hot pass takes the mask."""
    pipe = pipes["flux"]
    text, image_tokens = 16, 64  # max_sequence_length 16; 32 px: a 16x16 latent packed 2x2
    mask = torch.ones(2, text + image_tokens, dtype=torch.bool)
    mask[:, 10:text] = False  # padding past the prompts' tokens
    call = dict(max_sequence_length=text, joint_attention_kwargs={"attention_mask": mask})
    with KeepQueriesAndKeys(pipe, PROMPTS, CLASSES, block_window=(0.0, 1.0)) as reference:
        run(pipe, PROMPTS, [1, 2], **call)
    with trace(pipe, PROMPTS, CLASSES, block_window=(0.0, 1.0)) as recorder:
        run(pipe, PROMPTS, [1, 2], **call)
    for i, maps in enumerate(recorder.maps()):
        grid = maps.attention[8]
        hand = by_hand(reference.calls, i, 2, maps.columns, mask=mask)
        np.testing.assert_allclose(grid.reshape(len(maps.columns), -1), hand, rtol=1e-4, atol=1e-6)
        unmasked = by_hand(reference.calls, i, 2, maps.columns)
        assert np.abs(unmasked - hand).max() > 1e-3  # the mask matters here


def test_flux_on_another_attention_backend_keeps_it_and_records_the_same_maps(pipes):
    """A FLUX transformer set to a non-native diffusers attention backend (here its math one): the recorder
    lets diffusers dispatch the layer's attention as before (images bit-identical) and takes the one-hot
    pass for the maps, which agree with the native run's."""
    pipe = pipes["flux"]
    with trace(pipe, PROMPTS, CLASSES) as native:
        run(pipe, PROMPTS, [1, 2])
    pipe.transformer.set_attention_backend("_native_math")
    try:
        stock = run(pipe, PROMPTS, [1, 2])
        with trace(pipe, PROMPTS, CLASSES) as other:
            images = run(pipe, PROMPTS, [1, 2])
        assert all(p._attention_backend == "_native_math" for p in pipe.transformer.attn_processors.values())
    finally:
        pipe.transformer.reset_attention_backend()
    np.testing.assert_array_equal(images, stock)
    for a, b in zip(native.maps(), other.maps()):
        np.testing.assert_allclose(a.attention[8], b.attention[8], rtol=1e-4, atol=1e-6)


def test_attention_with_logsumexp_is_the_stock_call():
    """The kernel the fused call picks, called directly: the same output, bit for bit, and the log-sum-exp
    of the scaled scores; None where the kernel keeps none."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from diffumask.joint_attention import attention_with_logsumexp, probabilities_from_logsumexp

    torch.manual_seed(0)
    query, key, value = torch.randn(2, 3, 40, 16), torch.randn(2, 3, 50, 16), torch.randn(2, 3, 50, 16)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
        out, lse = attention_with_logsumexp(q, k, v)
        assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
        scores = q.double() @ k.double().transpose(-1, -2) / 4
        torch.testing.assert_close(lse.double(), scores.logsumexp(-1), rtol=1e-5, atol=1e-5)
        picked = probabilities_from_logsumexp(q, k[:, :, [3, 7]], lse)
        torch.testing.assert_close(picked.double(), scores.softmax(-1)[..., [3, 7]].mean(1), rtol=1e-4, atol=1e-6)
    with sdpa_kernel([SDPBackend.MATH]):
        out, lse = attention_with_logsumexp(query, key, value)
        assert lse is None and torch.equal(out, torch.nn.functional.scaled_dot_product_attention(query, key, value))


def test_a_kernel_that_fails_its_check_is_not_used_again(monkeypatch):
    """The first call per kernel is checked against the stock call; one found wanting (here: marked so) gives
    the stock call and no log-sum-exp from then on, so the recorder takes its one-hot pass."""
    from diffumask import joint_attention

    torch.manual_seed(0)
    query, key, value = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    monkeypatch.setattr(joint_attention, "_KERNEL_CHECKED", {})
    assert joint_attention.attention_with_logsumexp(query, key, value)[1] is not None
    assert list(joint_attention._KERNEL_CHECKED.values()) == [True]
    checked = next(iter(joint_attention._KERNEL_CHECKED))
    joint_attention._KERNEL_CHECKED[checked] = False
    out, lse = joint_attention.attention_with_logsumexp(query, key, value)
    assert lse is None and torch.equal(out, torch.nn.functional.scaled_dot_product_attention(query, key, value))


def test_sd3_records_clip_and_t5_columns(pipes):
    """SD3's context is CLIP's 77 columns then T5's; each part's words are found with its own tokenizer
    ("aeroplane": one CLIP token, ▁aero|plane in T5)."""
    pipe = pipes["sd3"]
    both = word_locator(pipe)(PROMPTS[1], ["aeroplane", "tree"])
    clip = word_locator(pipe, text_tokens="clip")(PROMPTS[1], ["aeroplane", "tree"])
    t5 = word_locator(pipe, text_tokens="t5")(PROMPTS[1], ["aeroplane", "tree"])
    t5_ids = pipe.tokenizer_3(PROMPTS[1]).input_ids
    assert [pipe.tokenizer_3.convert_ids_to_tokens(t5_ids[c - 77]) for c in t5["aeroplane"]] == ["▁aero", "plane"]
    assert all(c < 77 for c in clip["tree"]) and all(c >= 77 for c in t5["tree"])
    assert both == {w: clip[w] + t5[w] for w in both}
    with trace(pipe, PROMPTS[1], ["aeroplane"], text_tokens="t5") as recorder:
        run(pipe, [PROMPTS[1]], [0])
    assert recorder.maps()[0].columns == t5["aeroplane"]
    with pytest.raises(ConfigError, match="T5"):
        trace(pipes["flux"], PROMPTS[0], ["dog"], text_tokens="clip")


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_batch_equals_single(pipes, kind):
    pipe = pipes[kind]
    with trace(pipe, PROMPTS, CLASSES) as together:
        run(pipe, PROMPTS, [1, 2])
    batch = together.maps()
    for i, prompt in enumerate(PROMPTS):
        with trace(pipe, prompt, CLASSES[i]) as alone:
            run(pipe, [prompt], [i + 1])
        for name in CLASSES[i]:
            np.testing.assert_allclose(batch[i][name], alone.maps()[0][name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_images_per_prompt(pipes, kind):
    """num_images_per_prompt 2: four images from two prompts, each with its own maps, read from the batch."""
    pipe = pipes[kind]
    with trace(pipe, PROMPTS, CLASSES) as recorder:
        run(pipe, PROMPTS, [1, 2, 3, 4], num_images_per_prompt=2)
    maps = recorder.maps()
    assert len(maps) == 4 and [m.prompt for m in maps] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert not np.allclose(maps[0]["dog"], maps[1]["dog"])  # two seeds, two pictures


def test_flux_true_cfg_records_the_prompt_branch_only(pipes):
    """With a negative prompt and true_cfg_scale > 1 FLUX calls its transformer twice a step; the first
    step's maps (the same latents either way) must not change."""
    pipe = pipes["flux"]
    with trace(pipe, PROMPTS[0], ["dog"]) as plain:
        run(pipe, [PROMPTS[0]], [0], steps=1)
    with trace(pipe, PROMPTS[0], ["dog"]) as guided:
        run(pipe, [PROMPTS[0]], [0], steps=1, negative_prompt=["a blue car"], true_cfg_scale=4.0)
    np.testing.assert_allclose(guided.maps()[0].attention[8], plain.maps()[0].attention[8], rtol=1e-5, atol=1e-7)
    assert guided._step == 0  # one recorded call: the negative branch is not counted as a step


def test_every_word_form(pipes):
    pipe = pipes["flux"]
    with trace(pipe) as recorder:
        run(pipe, [PROMPTS[0]], [0])
    maps = recorder.maps()[0]
    assert maps.prompt == PROMPTS[0] and maps["sofa"].shape == (32, 32)
    with trace(pipe, PROMPTS[0], ["sofa"]) as chosen:
        run(pipe, [PROMPTS[0]], [0])
    np.testing.assert_allclose(maps["sofa"], chosen.maps()[0]["sofa"], rtol=1e-4, atol=1e-5)


def test_block_window(pipes):
    pipe = pipes["flux"]
    names = list(joint_layers(pipe.transformer))
    assert names[:2] == ["transformer_blocks.0.attn.processor", "transformer_blocks.1.attn.processor"]
    assert trace(pipe, PROMPTS[0], ["dog"]).layers == names[:1]  # the default: the first third of 4
    assert trace(pipe, PROMPTS[0], ["dog"], block_window=(0.5, 1.0)).layers == names[2:]
    assert trace(pipe, PROMPTS[0], ["dog"], layers=["single_"]).layers == names[2:]
    assert trace(pipe, PROMPTS[0], ["dog"], block_window=(0.9, 1.0)).layers == names[3:]  # rounds to the last
    with pytest.raises(ConfigError, match="block_window"):
        trace(pipe, PROMPTS[0], ["dog"], block_window=(0.6, 0.2))
    with pytest.raises(ConfigError, match="diffusion transformers"):
        from diffumask.testing import tiny_pipeline
        trace(tiny_pipeline("sd1"), PROMPTS[0], ["dog"], block_window=(0.0, 1.0))


@pytest.mark.parametrize("kind,limit", [("sd3", None), ("flux", None), ("flux", 2 * 4 * 16 * 64 * 2)])
def test_self_attention_matches_reference(pipes, kind, limit):
    """The middle recorded block's image-to-image attention, softmax over image keys, pooled to 4x4 cells;
    also computed a band of cells and two heads at a time (``limit``)."""
    pipe = pipes[kind]
    with KeepQueriesAndKeys(pipe, PROMPTS[0], ["dog"], block_window=(0.0, 1.0)) as reference:
        run(pipe, [PROMPTS[0]], [0])
    recorder = trace(pipe, PROMPTS[0], ["dog"], block_window=(0.0, 1.0), self_attention=2, self_attention_max=4)
    recorder.self_attention_bytes = limit or recorder.self_attention_bytes
    with recorder:
        run(pipe, [PROMPTS[0]], [0])
    maps = recorder.maps()[0]
    assert maps.self_attention_grid == (4, 4)
    middle = recorder.layers[2]
    rows = []
    for name, _, query, key, images, _ in reference.calls:
        if name != middle:
            continue
        row = query.shape[0] - 1  # the conditional image (SD3 batches [uncond; cond])
        q, k = query[row][:, images].double(), key[row][:, images].double()
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1).mean(0)  # (64, 64)
        cell = torch.zeros(64, 16, dtype=torch.float64)  # token (y, x) of the 8x8 grid -> cell (y//2, x//2)
        for y in range(8):
            for x in range(8):
                cell[y * 8 + x, (y // 2) * 4 + x // 2] = 1
        rows.append((cell.T @ probs @ cell / 4).numpy())  # a cell's row: mean of its 4 tokens' rows, summed keys
    np.testing.assert_allclose(maps.self_attention, np.mean(rows, axis=0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(maps.self_attention.sum(1), 1.0, rtol=1e-5)


def test_unknown_processors_are_refused(saved_transformers):
    for kind in ("sd3", "flux"):
        pipe = load_pipeline(saved_transformers[kind], device="cpu")
        pipe.transformer.fuse_qkv_projections()
        with pytest.raises(RecorderError, match="fused|Fused"):
            trace(pipe, PROMPTS[0], ["dog"]).attach()


def test_prompt_errors_come_before_denoising(pipes):
    with pytest.raises(PromptError, match="hotdog"):
        trace(pipes["sd3"], "a sheepdog eating a hotdog", ["dog"])
    with pytest.raises(RecorderError, match="encodes 'a cat on a mat' in text_encoder_3, which reads prompt_3"):
        with trace(pipes["sd3"], PROMPTS[0], ["dog"]):
            run(pipes["sd3"], [PROMPTS[0]], [0], prompt_3=["a cat on a mat"])
    with pytest.raises(RecorderError, match="different prompts"):  # CLIP reads prompt_2
        with trace(pipes["sd3"]):
            run(pipes["sd3"], [PROMPTS[0]], [0], prompt_2=["a cat on a mat"])
    # A prompt other than trace's is named as such, though SD3's CLIPs read it before its T5 (the words' source).
    with pytest.raises(RecorderError, match="trace was given .* encodes 'a cat on a mat'; pass trace the prompts"):
        with trace(pipes["sd3"], PROMPTS[0], ["dog"]):
            run(pipes["sd3"], ["a cat on a mat"], [0])


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_words_without_prompts_keep_case_and_punctuation(pipes, kind):
    """trace(pipe) reads the prompts from T5's ids, which keep what CLIP's lose ("A Dog, on" -> "a dog , on")."""
    prompt = "A photo of a Dog, on a sofa"
    with trace(pipes[kind]) as recorder:
        run(pipes[kind], [prompt], [0])
    maps = recorder.maps()[0]
    assert maps.prompt == prompt and maps["sofa"].shape == (32, 32)


def test_flux_reads_long_prompts_from_t5_alone(pipes):
    """FLUX's CLIP cuts a prompt at 77 tokens but only pools it; the maps come from T5, which reads 512."""
    prompt = "a photo of a dog on a sofa " + "with a red tree " * 20 + "and a cat"
    assert len(pipes["flux"].tokenizer(prompt).input_ids) > 77
    with trace(pipes["flux"], prompt, ["cat"]) as recorder:
        run(pipes["flux"], [prompt], [0])
    assert recorder.maps()[0]["cat"].shape == (32, 32)


def test_maps_do_not_keep_the_recorder(pipes):
    """ImageMaps may outlive its recorder, whose buffers (on the GPU, in real use) must then be freed."""
    import gc
    import weakref

    recorder = trace(pipes["sd3"], PROMPTS[0], ["dog"])
    with recorder:
        run(pipes["sd3"], [PROMPTS[0]], [0])
    maps = recorder.maps()
    gone = weakref.ref(recorder)
    del recorder
    gc.collect()
    assert gone() is None and maps[0]["dog"].shape == (32, 32)


def test_self_attention_cells_divide_any_token_grid(pipes):
    """FLUX at 40 px has 10x10 tokens; at most 4 cells a side asks for 3x3, which does not divide 10, so the
    cells are 2x2 (of 5x5 tokens each)."""
    pipe = pipes["flux"]
    with trace(pipe, PROMPTS[0], ["dog"], self_attention=2, self_attention_max=4) as recorder:
        pipe([PROMPTS[0]], height=40, width=40, num_inference_steps=1, output_type="np",
             generator=[torch.Generator().manual_seed(0)])
    maps = recorder.maps()[0]
    assert maps.self_attention_grid == (2, 2) and maps["dog"].shape == (40, 40)
    np.testing.assert_allclose(maps.self_attention.sum(1), 1.0, rtol=1e-5)


def test_auto_dtype(saved_transformers, saved_pipelines):
    assert auto_dtype(saved_transformers["flux"], "cuda") == "bfloat16"
    assert auto_dtype(saved_transformers["sd3"], "cuda") == "bfloat16"
    assert auto_dtype(saved_pipelines["sd1"], "cuda") == "float16"
    assert auto_dtype("black-forest-labs/FLUX.1-dev", "cuda") == "bfloat16"
    assert auto_dtype("stabilityai/stable-diffusion-3.5-medium", "cuda:1") == "bfloat16"


def test_auto_dtype_reads_a_cached_hub_ids_model_index(tmp_path, monkeypatch):
    """A hub id whose name does not say what it is: its cached model_index.json decides (offline, nothing
    fetched); an id neither cached nor reachable falls back to its name."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    commit = "0123456789abcdef0123456789abcdef01234567"
    for repo, pipeline in (("someone/my-finetune", "FluxPipeline"), ("someone/flux-named-unet", "StableDiffusionPipeline")):
        cached = tmp_path / f"models--{repo.replace('/', '--')}"
        (cached / "refs").mkdir(parents=True)
        (cached / "refs" / "main").write_text(commit)
        (cached / "snapshots" / commit).mkdir(parents=True)
        (cached / "snapshots" / commit / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    assert auto_dtype("someone/my-finetune", "cuda") == "bfloat16"
    assert auto_dtype("someone/flux-named-unet", "cuda") == "float16"  # the file, not the name
    assert auto_dtype("someone/other-finetune", "cuda") == "float16"
    assert auto_dtype("someone/my-finetune", "cpu") == "float32"
    assert auto_dtype("stabilityai/stable-diffusion-3.5-medium", "cpu") == "float32"


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_generate_and_refine_a_transformer_dataset(saved_transformers, tmp_path, kind):
    from diffumask.dataset import Dataset
    from diffumask.generate import GenerateConfig, generate_dataset
    from diffumask.refine import RefineConfig, refine_dataset
    from diffumask.softmaps import unpack

    config = GenerateConfig(classes=["dog", "cat"], out=str(tmp_path / "data"), model=saved_transformers[kind],
                            images_per_class=1, steps=2, size=32, batch_size=2, block_window=(0.0, 1.0))
    dataset = generate_dataset(config, progress=False)
    records = dataset.records()
    assert [r["classes"] for r in records] == [["dog"], ["cat"]]
    assert all(r["resolutions"] == [8] for r in records)
    arrays = unpack(np.load(dataset.root / "SoftMaps" / f"{records[0]['id']}.npz"))
    assert arrays["dog"].shape == (32, 32) and "__self__@8" in arrays
    refine_dataset(dataset.root, RefineConfig(method="propagate"), progress=False, workers=1)
    assert len(Dataset(dataset.root).records()) == 2
    if kind == "flux":
        with pytest.raises(ConfigError, match="negative-prompt"):
            generate_dataset(GenerateConfig(classes=["dog"], out=str(tmp_path / "neg"), model=saved_transformers[kind],
                                            images_per_class=1, steps=1, size=32, negative_prompt="blurry"),
                             progress=False)


def test_settings_name_the_dit_options_only_when_set(tmp_path):
    """Datasets written before the DiT options existed hold no such keys, and must still resume."""
    from diffumask.generate import GenerateConfig

    plain = GenerateConfig(classes=["dog"], out=str(tmp_path)).settings()
    assert "block_window" not in plain and "text_tokens" not in plain
    chosen = GenerateConfig(classes=["dog"], out=str(tmp_path), block_window=(0.0, 0.5), text_tokens="t5").settings()
    assert chosen["block_window"] == (0.0, 0.5) and chosen["text_tokens"] == "t5"
