"""Pipelines the recorders do not read, and calls generate cannot make, are refused in one line: from
model_index.json before any weights load, and on a pipeline passed in from Python."""

from __future__ import annotations

import json

import pytest
import torch

from diffumask.attention import RecorderError, trace
from diffumask.cli import main
from diffumask.errors import ConfigError
from diffumask.generate import generate_one
from diffumask.models import load_pipeline
from diffumask.supported import SUPPORTED, check_model_index


def index(pipeline: str, **parts: list[str]) -> dict:
    return {"_class_name": pipeline, "_diffusers_version": "0.42.1", **parts}


UNET = ["diffusers", "UNet2DConditionModel"]


@pytest.mark.parametrize("model_index, refusal", [
    (index("PixArtSigmaPipeline", transformer=["diffusers", "PixArtTransformer2DModel"]),
     "PixArtSigmaPipeline denoises with PixArtTransformer2DModel, whose attention diffumask does not record"),
    (index("QwenImagePipeline", transformer=["diffusers", "QwenImageTransformer2DModel"]),
     "denoises with QwenImageTransformer2DModel"),
    (index("Flux2Pipeline", transformer=["diffusers", "Flux2Transformer2DModel"]), "denoises with Flux2Transformer2DModel"),
    (index("AnimateDiffPipeline", unet=["diffusers", "UNetMotionModel"]), "denoises with UNetMotionModel"),
    (index("WuerstchenCombinedPipeline", prior_prior=["diffusers", "WuerstchenPrior"]), "has no UNet or transformer"),
    (index("KandinskyV22Pipeline", unet=UNET), "KandinskyV22Pipeline takes no prompt"),
    (index("StableDiffusionPAGPipeline", unet=UNET), "adds perturbed-attention guidance"),
])
def test_pipelines_no_recorder_reads_are_refused_from_their_model_index(model_index, refusal):
    for prompts_only in (False, True):
        with pytest.raises(ConfigError, match=refusal) as caught:
            check_model_index(model_index, prompts_only)
        message = str(caught.value)
        assert "\n" not in message and message.startswith(model_index["_class_name"])
        assert "perturbed" in refusal or message.endswith(SUPPORTED)


@pytest.mark.parametrize("pipeline, parts, needs", [
    ("StableDiffusionImg2ImgPipeline", {"unet": UNET}, "image"),
    ("StableDiffusionInpaintPipeline", {"unet": UNET}, "image and mask_image"),
    ("StableDiffusionControlNetPipeline", {"unet": UNET}, "image"),
    ("FluxKontextPipeline", {"transformer": ["diffusers", "FluxTransformer2DModel"]}, "image"),
    ("FluxControlPipeline", {"transformer": ["diffusers", "FluxTransformer2DModel"]}, "control_image"),
])
def test_generate_refuses_pipelines_that_need_an_image_which_trace_records(pipeline, parts, needs):
    check_model_index(index(pipeline, **parts))  # trace records your own calls with the image
    with pytest.raises(ConfigError, match=f"^{pipeline} reads {needs} besides the prompt"):
        check_model_index(index(pipeline, **parts), prompts_only=True)


@pytest.mark.parametrize("pipeline, parts", [
    ("StableDiffusionPipeline", {"unet": UNET}),
    ("StableDiffusionXLPipeline", {"unet": UNET}),
    ("LatentConsistencyModelPipeline", {"unet": UNET}),
    ("StableDiffusion3Pipeline", {"transformer": ["diffusers", "SD3Transformer2DModel"]}),
    ("FluxPipeline", {"transformer": ["diffusers", "FluxTransformer2DModel"]}),
    ("MyPipeline", {"unet": ["my_library", "MyUNet"]}),  # not diffusers' own: the loaded pipeline is checked
])
def test_the_recorded_families_pass(pipeline, parts):
    check_model_index(index(pipeline, **parts), prompts_only=True)


def test_the_refusal_comes_before_any_weights_load(tmp_path, capsys):
    """A folder holding only its model_index.json: the check runs on it alone, and generate writes nothing."""
    folder = tmp_path / "pixart"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(index(
        "PixArtSigmaPipeline", transformer=["diffusers", "PixArtTransformer2DModel"],
        text_encoder=["transformers", "T5EncoderModel"], vae=["diffusers", "AutoencoderKL"])))
    with pytest.raises(ConfigError, match="denoises with PixArtTransformer2DModel"):
        load_pipeline(str(folder), device="cpu")
    out = tmp_path / "out"
    assert main(["generate", "--model", str(folder), "--classes", "dog", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "PixArtTransformer2DModel, whose attention diffumask does not record" in err
    assert not out.exists()


def test_a_hub_id_is_refused_from_its_model_index_before_the_download(tmp_path):
    """Only model_index.json is in the cache (the one file fetched first): the refusal names the denoiser,
    where the download of the whole snapshot would have come first."""
    import os
    import subprocess
    import sys

    repo = tmp_path / "hub" / "models--someone--pixart"
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "model_index.json").write_text(json.dumps(index(
        "PixArtSigmaPipeline", transformer=["diffusers", "PixArtTransformer2DModel"])))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "diffumask", "generate", "--model", "someone/pixart", "--classes",
                             "dog", "--out", str(tmp_path / "out"), "--quiet"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"diffumask: error: PixArtSigmaPipeline denoises with PixArtTransformer2DModel, whose attention diffumask "
        f"does not record; {SUPPORTED}"]


def _tiny_pixart():
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    from diffumask.testing import _t5_encoder, t5_tokenizer

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=1, cross_attention_dim=16, sample_size=8, patch_size=2,
                                           caption_channels=32, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16,), latent_channels=4, norm_num_groups=8, layers_per_block=1)
    return PixArtSigmaPipeline(tokenizer=t5_tokenizer(), text_encoder=_t5_encoder(32), vae=vae,
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())


def test_a_loaded_pipeline_of_another_family_is_refused_before_it_runs():
    """A cross-attention transformer (PixArt-Σ) went to the joint-attention recorder, which said it had
    'no joint-attention layers'."""
    pipe = _tiny_pixart()
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ConfigError, match="^PixArtSigmaPipeline denoises with PixArtTransformer2DModel"):
        trace(pipe)
    with pytest.raises(ConfigError, match="^PixArtSigmaPipeline denoises with PixArtTransformer2DModel"):
        generate_one(pipe, "a photo of a dog", ["dog"], steps=1)
    assert not calls


def test_an_image_to_image_pipeline_is_traced_but_not_generated_from(sd1_pipe):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPAGPipeline

    img2img = StableDiffusionImg2ImgPipeline(**sd1_pipe.components)
    img2img.set_progress_bar_config(disable=True)
    start = torch.rand(1, 3, 64, 64)
    with trace(img2img, "a photo of a dog", ["dog"]) as recorder:
        img2img("a photo of a dog", image=start, strength=1.0, num_inference_steps=2, output_type="np")
    dog = recorder.maps()[0]["dog"]
    assert dog.shape == (64, 64) and dog.max() > 0
    with pytest.raises(ConfigError, match="^StableDiffusionImg2ImgPipeline reads image besides the prompt"):
        generate_one(img2img, "a photo of a dog", ["dog"], steps=1)
    pag = StableDiffusionPAGPipeline(**sd1_pipe.components, pag_applied_layers=["mid"])
    with pytest.raises(ConfigError, match="^StableDiffusionPAGPipeline adds perturbed-attention guidance"):
        trace(pag)


def test_a_unet_that_reads_text_as_extra_keys_is_named_so():
    """DeepFloyd IF's UNet (AttnAddedKVProcessor) was said to hide its probabilities 'as xformers does'."""
    from diffusers import DDPMScheduler, IFPipeline, UNet2DConditionModel

    from diffumask.testing import _t5_encoder, t5_tokenizer

    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=[16, 32],
        down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"], in_channels=3, out_channels=6,
        cross_attention_dim=32, encoder_hid_dim=32, attention_head_dim=8, addition_embed_type="text",
        addition_embed_type_num_heads=2, cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift",
        act_fn="gelu", norm_num_groups=8)
    pipe = IFPipeline(tokenizer=t5_tokenizer(), text_encoder=_t5_encoder(32), unet=unet, scheduler=DDPMScheduler(),
                      safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    with pytest.raises(RecorderError, match="AttnAddedKVProcessor.*: this UNet reads the text as extra keys beside "
                                            "the image's own \\(DeepFloyd IF, UnCLIP\\)"):
        with trace(pipe, "a photo of a dog", ["dog"]):
            pass


def test_flux_kontexts_reference_image_tokens_are_named_in_the_refusal():
    """FLUX Kontext passes the checks (FLUX.1's transformer, a prompt) but appends its reference image's tokens."""
    from diffusers import FluxKontextPipeline

    from diffumask.testing import tiny_pipeline

    pipe = FluxKontextPipeline(**tiny_pipeline("flux").components)
    pipe.set_progress_bar_config(disable=True)
    reference = torch.rand(1, 3, 32, 32)
    with pytest.raises(RecorderError, match="image tokens, not the .* grid: the pipeline adds tokens the recorder "
                                            "does not place \\(FLUX Kontext's reference image does\\)"):
        with trace(pipe, "a photo of a dog", ["dog"]):
            pipe(prompt="a photo of a dog", image=reference, _auto_resize=False, height=32, width=32,
                 num_inference_steps=1, output_type="np")
    with pytest.raises(ConfigError, match="^FluxKontextPipeline reads image besides the prompt"):
        generate_one(pipe, "a photo of a dog", ["dog"], steps=1)


def test_a_community_pipelines_optional_image_is_left_alone(sd1_pipe):
    from diffusers import StableDiffusionPipeline

    class LongPrompt(StableDiffusionPipeline):
        def __call__(self, prompt=None, image=None, mask_image=None, height=None, width=None,  # as lpw's
                     num_inference_steps=50, guidance_scale=7.5, negative_prompt=None, **options):
            return super().__call__(prompt=prompt, height=height, width=width, num_inference_steps=num_inference_steps,
                                    guidance_scale=guidance_scale, negative_prompt=negative_prompt, **options)

    LongPrompt.__module__ = "diffusers_modules.local.lpw_stable_diffusion"  # where custom_pipeline= puts it
    pipe = LongPrompt(**sd1_pipe.components)
    result = generate_one(pipe, "a photo of a dog", ["dog"], steps=1)
    assert result.maps["dog"].max() > 0


def test_a_subclass_that_wraps_the_call_reads_its_parents_parameters(sd1_pipe):
    """A subclass timing or logging its parent's call with (*args, **kwargs) was refused: 'takes no prompt'."""
    from diffusers import StableDiffusionPipeline, StableDiffusionPAGPipeline

    calls = []

    class Timed(StableDiffusionPipeline):
        def __call__(self, *args, **kwargs):
            calls.append(kwargs["prompt"])
            return super().__call__(*args, **kwargs)

    result = generate_one(Timed(**sd1_pipe.components), "a photo of a dog", ["dog"], steps=1)
    assert result.maps["dog"].max() > 0 and calls == [["a photo of a dog"]]

    class Logged(StableDiffusionPipeline):  # names one argument, passes the rest on: the parent's defaults hold
        def __call__(self, prompt, **kwargs):
            return super().__call__(prompt, **kwargs)

    from diffumask.supported import call_parameters

    assert call_parameters(Logged)["num_inference_steps"].default == 50
    assert list(call_parameters(Logged))[0] == "prompt" and "kwargs" not in call_parameters(Logged)

    class TimedPAG(StableDiffusionPAGPipeline):  # the parent's own parameters are still checked
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    with pytest.raises(ConfigError, match="^TimedPAG adds perturbed-attention guidance"):
        trace(TimedPAG(**sd1_pipe.components, pag_applied_layers=["mid"]))


def test_a_call_without_default_steps_asks_for_them(sd1_pipe):
    from diffusers import StableDiffusionPipeline

    class Explicit(StableDiffusionPipeline):
        def __call__(self, prompt, num_inference_steps, guidance_scale, **options):
            return super().__call__(prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                    **options)

    pipe = Explicit(**sd1_pipe.components)
    with pytest.raises(ConfigError, match="^Explicit's call has no default num_inference_steps: give --steps"):
        generate_one(pipe, "a photo of a dog", ["dog"], guidance=1.0)
    with pytest.raises(ConfigError, match="no default guidance_scale: give --guidance \\(guidance= from Python\\)"):
        generate_one(pipe, "a photo of a dog", ["dog"], steps=1)
    assert generate_one(pipe, "a photo of a dog", ["dog"], steps=1, guidance=1.0).maps["dog"].max() > 0


@pytest.mark.parametrize("odd", [
    index(["my_module", "MyPipeline"], unet=UNET),  # diffusers' custom-code form
    index("StableDiffusionPipeline", unet=["diffusers"]),
    index("StableDiffusionPipeline", unet={}),
    index("StableDiffusionPipeline", unet=5),
    index("StableDiffusionPipeline", unet=["diffusers", None]),
    ["not", "an", "index"],
])
def test_odd_model_index_contents_are_left_to_the_loader(odd, tmp_path, capsys):
    """Never a traceback from the check: what it cannot read, loading reports (in one line)."""
    check_model_index(odd)
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(odd))
    assert main(["generate", "--model", str(folder), "--classes", "dog", "--out", str(tmp_path / "out"),
                 "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("diffumask: error: "), err


def test_a_compiled_unet_is_read_through_its_wrapper(sd1_pipe):
    from types import SimpleNamespace

    from diffumask.models import dtype_name
    from diffumask.supported import check_loaded, denoiser_of

    compiled = torch.compile(sd1_pipe.unet)  # compiles lazily: nothing runs here
    pipe = SimpleNamespace(unet=compiled, transformer=None)
    assert denoiser_of(pipe) is sd1_pipe.unet and dtype_name(pipe) == "float32"
    check_loaded(StableDiffusionWith(compiled, sd1_pipe))


def StableDiffusionWith(unet, base):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**base.components)
    object.__setattr__(pipe, "unet", unet)
    return pipe
