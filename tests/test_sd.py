"""Stable Diffusion v1.x on a tiny random pipeline folder: loading, prompts, classifier-free guidance, decoding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from autodiff_opt.generate import ImageGenerator, SampleSet
from autodiff_opt.models.base import ModelLoadError
from autodiff_opt.models.latent import TextToImageModel, load_prompts, load_text_to_image
from autodiff_opt.core.genome import Genome
from autodiff_opt.solvers import ddim_sample
from replicas import SD_IMAGE_SIZE, make_tiny_sd_pipeline, write_coco_captions

STEPS = (750, 500, 250, 0)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "stable-diffusion-tiny")


@pytest.fixture(scope="module")
def captions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_coco_captions(tmp_path_factory.mktemp("coco") / "annotations" / "captions_val2014.json")


@pytest.fixture(scope="module")
def model(sd_dir: Path, captions: Path) -> TextToImageModel:
    return load_text_to_image(str(sd_dir), captions)


def test_pipeline_folder_loads_as_a_latent_text_model(model: TextToImageModel, captions: Path) -> None:
    assert model.sample_shape == (4, SD_IMAGE_SIZE // 8, SD_IMAGE_SIZE // 8)
    assert model.num_classes == 60 == len(load_prompts(captions))
    assert model.guidance_scale == 7.5 and model.prediction_type == "epsilon"
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
    assert torch.allclose(model.alphas_cumprod, torch.cumprod(1 - betas, 0))
    images = model.to_images(torch.randn(3, *model.sample_shape))
    assert images.shape == (3, 3, SD_IMAGE_SIZE, SD_IMAGE_SIZE) and images.abs().max() <= 1.0


def test_hub_tokenizer_layout_loads_the_same_tokens(tmp_path: Path, model: TextToImageModel, captions: Path) -> None:
    hub_like = load_text_to_image(str(make_tiny_sd_pipeline(tmp_path / "sd-hub", hub_tokenizer_layout=True)), captions)
    assert not (tmp_path / "sd-hub" / "tokenizer" / "tokenizer.json").exists()
    text = "a red bus near two people"
    assert hub_like.prompt_encoder.tokenizer(text).input_ids == model.prompt_encoder.tokenizer(text).input_ids


def test_coco_captions_are_ordered_by_annotation_id(captions: Path) -> None:
    data = json.loads(captions.read_text())
    by_id = [" ".join(a["caption"].split()) for a in sorted(data["annotations"], key=lambda a: a["id"])]
    assert load_prompts(captions) == by_id
    txt = captions.with_suffix(".txt")
    txt.write_text("a cat\n\na dog\n")
    assert load_prompts(txt) == ["a cat", "a dog"]


def test_prompt_subset_is_fixed_by_the_study_seed(model: TextToImageModel) -> None:
    a = SampleSet.draw(20, model.sample_shape, model.num_classes, seed=3)
    b = SampleSet.draw(20, model.sample_shape, model.num_classes, seed=3)
    c = SampleSet.draw(20, model.sample_shape, model.num_classes, seed=4)
    assert a.class_labels is not None and torch.equal(a.class_labels, b.class_labels)  # type: ignore[arg-type]
    assert torch.equal(a.noise, b.noise) and not torch.equal(a.class_labels, c.class_labels)  # type: ignore[arg-type]
    assert int(a.class_labels.max()) < model.num_classes


def test_guidance_is_one_batched_pass_and_the_cfg_formula(model: TextToImageModel) -> None:
    calls: list[int] = []
    hook = model.denoiser.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(args[0].shape[0]), with_kwargs=True)
    labels, x = torch.tensor([3, 7]), torch.randn(2, *model.sample_shape)
    try:
        eps = model.eps_fn(class_labels=labels)(x, 500, 0)
    finally:
        hook.remove()
    assert calls == [4]  # [unconditional; conditional] in one UNet call
    encoder = model.prompt_encoder
    t = torch.full((2,), 500)
    with torch.no_grad():
        e_u = model.denoiser(x, t, encoder_hidden_states=encoder.unconditional().expand(2, -1, -1)).sample
        e_c = model.denoiser(x, t, encoder_hidden_states=encoder(labels)).sample
    assert torch.allclose(eps, e_u + 7.5 * (e_c - e_u), atol=1e-5)
    model.guidance_scale = 1.0
    try:
        assert torch.allclose(model.eps_fn(class_labels=labels)(x, 500, 0), e_c, atol=1e-5)
    finally:
        model.guidance_scale = 7.5
    assert not torch.allclose(model.eps_fn(class_labels=torch.tensor([5, 9]))(x, 500, 0), eps)


def test_each_prompt_is_encoded_once(sd_dir: Path, captions: Path) -> None:
    fresh = load_text_to_image(str(sd_dir), captions)
    seen: list[int] = []
    fresh.prompt_encoder.text_encoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    fresh.prompt_encoder(torch.tensor([1, 2, 2, 5]))
    fresh.prompt_encoder(torch.tensor([5, 1, 8]))
    assert seen == [3, 1]


def test_same_images_as_diffusers_stable_diffusion_pipeline(sd_dir: Path, model: TextToImageModel) -> None:
    """DDIM at 'leading' steps 750..0 with alpha_bar_prev = 1 at the end is exactly our DDIM: CFG, latents, VAE agree."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True, steps_offset=0,
                                               clip_sample=False, timestep_spacing="leading")
    pipe.set_progress_bar_config(disable=True)
    labels = torch.tensor([0, 11])
    noise = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = pipe([model.prompt_encoder.prompts[i] for i in labels], num_inference_steps=4, guidance_scale=7.5,
                      latents=noise, height=SD_IMAGE_SIZE, width=SD_IMAGE_SIZE, output_type="pt").images
        ours = model.to_images(ddim_sample(model.eps_fn(class_labels=labels), noise, STEPS, model.alphas_cumprod,
                                           clip_x0=False))
    assert [int(t) for t in pipe.scheduler.timesteps] == list(STEPS)
    assert torch.allclose(ours / 2 + 0.5, theirs, atol=1e-4)


def test_generation_with_per_step_layer_skipping(model: TextToImageModel) -> None:
    from autodiff_opt.arch import discover_layers

    layers = discover_layers(model.denoiser)
    assert {layer.kind for layer in layers} == {"resnet", "attention"}  # cross-attention transformers are layers
    attention = frozenset(layer.id for layer in layers if layer.kind == "attention")
    samples = SampleSet.draw(4, model.sample_shape, model.num_classes, seed=0)
    generator = ImageGenerator(model, "dpmpp_2m", clip_x0=False, batch_size=4)  # it applies a genome's masks
    full = generator.generate(Genome(STEPS), samples)
    skipped = generator.generate(Genome(STEPS, (attention, frozenset(), attention, frozenset())), samples)
    assert full.shape == skipped.shape == (4, 3, SD_IMAGE_SIZE, SD_IMAGE_SIZE) and full.dtype == torch.uint8
    assert not torch.equal(full, skipped)
    assert torch.equal(full, generator.generate(Genome(STEPS), samples))  # the masks apply to their genome only


def test_pipeline_without_prompts_names_the_option(sd_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="model.prompts"):
        load_text_to_image(str(sd_dir), None)


def test_bad_inputs_give_clear_errors(tmp_path: Path, sd_dir: Path, captions: Path) -> None:
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ModelLoadError, match="COCO captions format"):
        load_prompts(tmp_path / "bad.json")
    with pytest.raises(ModelLoadError, match="no such file"):
        load_prompts(tmp_path / "captions_val2014.json")
    with pytest.raises(ModelLoadError, match="not a text-to-image pipeline folder.*text_encoder"):
        unet_only = tmp_path / "unet-only"
        (unet_only / "unet").mkdir(parents=True)
        (unet_only / "model_index.json").write_text("{}")
        load_text_to_image(str(unet_only), captions)
    with pytest.raises(ModelLoadError, match="huggingface-cli download CompVis/stable-diffusion-v1-4"):
        load_text_to_image("CompVis/stable-diffusion-v1-4", captions)  # offline in tests (HF_HUB_OFFLINE=1)


def test_sd_snippet_with_skips_runs_and_gives_our_masked_sampler(sd_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The export of a stage-2 result on SD v1: the snippet, run as written next to its best_schedule.json,
    gives the images of our masked DPM-Solver++(2M) on the same noise and prompt (and not the plain ones)."""
    from autodiff_opt.arch.runtime import RuntimeSettings, build_runtime
    from autodiff_opt.report.export import export_schedule, sd_snippet
    from autodiff_opt.solvers import dpmpp_2m_sample
    from autodiff_opt.utils import to_uint8

    model = load_text_to_image(str(sd_dir), ["a photo of a cat"])
    layers = build_runtime(model).skipper.layers
    attention = frozenset(layer.id for layer in layers if layer.kind == "attention")
    genome = Genome(STEPS, (attention, frozenset({layers[0].id}), attention, frozenset()))
    code = sd_snippet(genome, str(sd_dir), "dpmpp_2m", 7.5)
    assert "skip_blocks(pipe.unet" in code and sd_snippet(Genome(STEPS), str(sd_dir), "dpmpp_2m", 7.5).count("skip") == 0
    export_schedule(tmp_path / "best_schedule.json", genome, {"model_config": {"skip_units": "blocks"}},
                    layer_names=[layer.name for layer in layers])
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(code.replace('from_pretrained("%s")' % sd_dir, 'from_pretrained("%s", safety_checker=None)' % sd_dir),
                 "snippet", "exec"), scope)  # noqa: S102 - our own generated code
    theirs = torch.as_tensor(np.array(scope["image"])).permute(2, 0, 1)
    noise = torch.randn(1, *model.sample_shape, generator=torch.Generator().manual_seed(0))  # the pipeline's draw
    labels = torch.tensor([0])
    with torch.no_grad():
        masked = build_runtime(model).masked(model.eps_fn(class_labels=labels), genome)
        ours = to_uint8(model.to_images(dpmpp_2m_sample(masked, noise, STEPS, model.alphas_cumprod, clip_x0=False)))[0]
        plain = to_uint8(model.to_images(dpmpp_2m_sample(model.eps_fn(class_labels=labels), noise, STEPS,
                                                         model.alphas_cumprod, clip_x0=False)))[0]
    assert (ours.int() - theirs.int()).abs().max() <= 1  # uint8 rounding of the PIL image
    assert (plain.int() - theirs.int()).abs().max() > 1  # the skipped layers are what makes them agree
