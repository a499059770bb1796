"""DiT, SD3 and Flux on tiny random replicas saved by diffusers: our sampling loop gives the diffusers
pipeline's output on the same noise and schedule (CFG, guidance embedding, the shift applied once), and a
folder without weights stops naming the files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from autodiff_opt.models.base import ModelLoadError
from autodiff_opt.models.flow import scheduler_for_times
from autodiff_opt.models.pipelines import ClassGuidedModel, PromptFlowModel, load_transformer_pipeline
from autodiff_opt.solvers import ddim_sample, flow_heuristic_schedule
from autodiff_opt.solvers.flow import flow_euler_sample, grid_time
from transformer_replicas import IMAGE_SIZE, make_tiny_dit_pipeline, make_tiny_flux_pipeline, make_tiny_sd3_pipeline

PROMPTS = ["a red bus", "two cats on a table", "a dog"]


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dit_pipeline(tmp_path_factory.mktemp("dit") / "DiT-XL-2-256")


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "stable-diffusion-3-medium-diffusers")


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_flux_pipeline(tmp_path_factory.mktemp("flux") / "FLUX.1-dev")


def _load(folder: Path, guidance: float, prompts: list[str] | None = None):  # type: ignore[no-untyped-def]
    return load_transformer_pipeline(str(folder), prompts, guidance_scale=guidance, decode_batch_size=2, device="cpu",
                                     dtype=torch.float32, image_size=IMAGE_SIZE)


def test_dit_ddim_with_cfg_matches_dit_pipeline(dit_dir: Path) -> None:
    from diffusers import DiTPipeline

    model = _load(dit_dir, guidance=4.0)
    assert isinstance(model, ClassGuidedModel) and model.learned_sigma and model.num_classes == 1000
    labels = [3, 917]
    steps = [750, 500, 250, 0]  # DDIMScheduler "leading" spacing at 4 steps, what the pipeline runs
    noise = torch.randn((2, *model.sample_shape), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        x0 = ddim_sample(model.eps_fn(class_labels=torch.tensor(labels)), noise, steps, model.alphas_cumprod,
                         clip_x0=False)
        ours = (model.to_images(x0) + 1) / 2
    pipe = DiTPipeline.from_pretrained(dit_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(class_labels=labels, guidance_scale=4.0, num_inference_steps=4,
                  generator=torch.Generator().manual_seed(5), output_type="pt").images
    torch.testing.assert_close(ours, torch.as_tensor(theirs).float(), atol=2e-5, rtol=1e-4)


def test_dit_guidance_changes_the_output_and_is_one_batched_pass(dit_dir: Path) -> None:
    model = _load(dit_dir, guidance=4.0)
    calls: list[int] = []
    hook = model.denoiser.register_forward_pre_hook(lambda m, args, kw: calls.append(args[0].shape[0]), with_kwargs=True)
    x = torch.randn(3, *model.sample_shape)
    with torch.no_grad():
        guided = model.eps_fn(class_labels=torch.tensor([1, 2, 3]))(x, 500, 0)
        model.guidance_scale = 1.0
        plain = model.eps_fn(class_labels=torch.tensor([1, 2, 3]))(x, 500, 0)
    hook.remove()
    assert calls == [6, 3]  # the CFG pair is one call on 2B latents: 2 network evaluations a step
    assert not torch.allclose(guided, plain)


def _sd3_pipe(folder: Path, exact: bool):  # type: ignore[no-untyped-def]
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True)
    if exact:
        pipe.scheduler = scheduler_for_times(dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sd3_flow_euler_with_cfg_matches_the_pipeline_and_shifts_once(sd3_dir: Path) -> None:
    model = _load(sd3_dir, guidance=5.0, prompts=PROMPTS)
    assert isinstance(model, PromptFlowModel) and model.shift == 3.0 and model.sample_shape == (4, 4, 4)
    steps = flow_heuristic_schedule("flow_default", 4, shift=model.shift)  # SD3's own schedule, on the grid
    times = [grid_time(i, 1000) for i in steps]
    noise = torch.randn((2, *model.sample_shape), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = flow_euler_sample(model.eps_fn(class_labels=torch.tensor([1, 2])), noise, steps, model.alphas_cumprod)
        kwargs = dict(prompt=PROMPTS[1:], height=IMAGE_SIZE, width=IMAGE_SIZE, sigmas=times, guidance_scale=5.0,
                      latents=noise.clone(), output_type="latent", max_sequence_length=256)
        theirs = _sd3_pipe(sd3_dir, exact=True)(**kwargs).images
        shifted_twice = _sd3_pipe(sd3_dir, exact=False)(**kwargs).images
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    assert (ours - shifted_twice).abs().max() > 1e-3  # the stock scheduler would shift the searched times again
    images = model.to_images(ours)
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and images.abs().max() <= 1.0


def test_flux_guidance_embedding_matches_the_pipeline(flux_dir: Path) -> None:
    from diffusers import FluxPipeline

    model = _load(flux_dir, guidance=3.5, prompts=PROMPTS)
    assert isinstance(model, PromptFlowModel) and model.dynamic_shift
    # 4 latent patches: mu = 0.5 + 0.65 (4 - 256) / (4096 - 256)
    assert model.shift == pytest.approx(np.exp(0.5 + 0.65 * (4 - 256) / (4096 - 256)))
    steps = [999, 800, 420, 90]
    noise = torch.randn((2, *model.sample_shape), generator=torch.Generator().manual_seed(4))
    pipe = FluxPipeline.from_pretrained(flux_dir, local_files_only=True)
    pipe.scheduler = scheduler_for_times(dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ours = flow_euler_sample(model.eps_fn(class_labels=torch.tensor([0, 2])), noise, steps, model.alphas_cumprod)
        packed = pipe._pack_latents(noise.clone(), 2, 4, 4, 4)
        out = pipe(prompt=[PROMPTS[0], PROMPTS[2]], height=IMAGE_SIZE, width=IMAGE_SIZE,
                   sigmas=[grid_time(i, 1000) for i in steps], guidance_scale=3.5, latents=packed,
                   output_type="latent").images
    theirs = pipe._unpack_latents(out, IMAGE_SIZE, IMAGE_SIZE, pipe.vae_scale_factor)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def test_folder_without_weights_names_the_files(sd3_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "sd3"
    shutil.copytree(sd3_dir, broken)
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(broken / "tokenizer_3")
    with pytest.raises(ModelLoadError) as err:
        load_transformer_pipeline(str(broken), PROMPTS, guidance_scale=5.0, decode_batch_size=2, device="cpu",
                                  dtype=torch.float32, source_hint="published on the hub as X")
    message = str(err.value)
    assert "transformer/diffusion_pytorch_model.safetensors" in message and "tokenizer_3/" in message
    assert "published on the hub as X" in message and "set model.pretrained=" in message


def _tiny_cli_run(name: str, model: Path, tmp: Path, **extra: object):  # type: ignore[no-untyped-def]
    from cli_helpers import DEFAULT_SAMPLER, run_cli, tiny_overrides
    from replicas import blob_images, write_image_npz

    reference = write_image_npz(tmp / "reference.npz", blob_images(64, IMAGE_SIZE))
    overrides = tiny_overrides(model, reference, tmp / "s.db", **{
        "search.num_samples": 8, "search.batch_size": 8, "search.population": 3, "search.generations": 1,
        "search.num_parents": 2, "search.num_mutants": 1, "search.num_crossovers": 1, "search.init_random": 1,
        "final.num_samples": 8, "final.repeats": 2, "metric.weights_path": "null", "metric.feature_layer": "null",
        "model.dtype": "float32", "model.image_size": IMAGE_SIZE, **DEFAULT_SAMPLER, **extra})
    return run_cli([f"+experiment={name}", *overrides], tmp, tmp / "run", timeout=400)


@pytest.mark.slow
def test_sd3_coco_through_the_cli_on_a_replica(sd3_dir: Path, tmp_path: Path) -> None:
    import json

    from replicas import write_coco_captions

    captions = write_coco_captions(tmp_path / "annotations" / "captions_val2014.json")
    proc = _tiny_cli_run("sd3_coco", sd3_dir, tmp_path, **{"model.prompts": captions,
                                                           "search.baselines": "[flow_default,flow_uniform]"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "run" / "best_schedule.json").read_text())
    rows = {row["schedule"]: row for row in doc["final"]}
    assert {"searched", "flow_default", "flow_uniform"} <= set(rows)
    assert rows["flow_default"]["timesteps"] == flow_heuristic_schedule("flow_default", 4, shift=3.0)
    assert f"height={IMAGE_SIZE}, width={IMAGE_SIZE}," in doc["diffusers_snippet"]  # the searched model.image_size


@pytest.mark.slow
def test_dit_imagenet256_through_the_cli_on_a_replica(dit_dir: Path, tmp_path: Path) -> None:
    proc = _tiny_cli_run("dit_imagenet256", dit_dir, tmp_path, **{"search.baselines": "[ddim_uniform,trailing]"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1000 classes, CFG 1.50" in proc.stderr + proc.stdout


class _PassThrough(torch.nn.Module):
    """A block whose residual branch is zero, written out: what a skipped block must equal."""

    def __init__(self, joint: bool, pre_only: bool = False) -> None:
        super().__init__()
        self.joint, self.pre_only = joint, pre_only

    def forward(self, hidden_states, encoder_hidden_states=None, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not self.joint:
            return hidden_states
        return (None if self.pre_only else encoder_hidden_states), hidden_states


@pytest.mark.parametrize("which", ["dit", "sd3"])
def test_transformer_blocks_skip_per_step_with_the_residual_passing(which: str, dit_dir: Path, sd3_dir: Path) -> None:
    import copy

    from autodiff_opt.arch import LayerSkipper
    from autodiff_opt.core.genome import Genome

    model = _load(dit_dir, 3.0) if which == "dit" else _load(sd3_dir, 3.0, PROMPTS)
    skipper = LayerSkipper(model.denoiser)
    assert [layer.name for layer in skipper.layers] == ["blocks.0", "blocks.1"]
    x = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2])
    step = 500 if which == "dit" else 700
    with torch.no_grad():
        plain = model.eps_fn(class_labels=labels)(x, step, 0)
        with skipper.skipping([]):
            empty = model.eps_fn(class_labels=labels)(x, step, 0)
        with skipper.skipping([1]):
            skipped = model.eps_fn(class_labels=labels)(x, step, 0)
        reference = copy.deepcopy(model)
        block = reference.denoiser.transformer_blocks[1]
        reference.denoiser.transformer_blocks[1] = _PassThrough(which == "sd3", getattr(block, "context_pre_only", False))
        expected = reference.eps_fn(class_labels=labels)(x, step, 0)
    assert torch.equal(plain, empty)
    torch.testing.assert_close(skipped, expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(skipped, plain)
    from autodiff_opt.arch.skip import per_step_skipping

    wrap = per_step_skipping(model.denoiser, skipper)
    genome = Genome((step, 100), (frozenset({1}), frozenset()))
    with torch.no_grad():
        fn = wrap(model.eps_fn(class_labels=labels), genome)
        torch.testing.assert_close(fn(x, step, 0), expected, atol=1e-6, rtol=1e-6)
        assert torch.equal(fn(x, 100, 1), model.eps_fn(class_labels=labels)(x, 100, 1))  # the second step: no skips


class _FluxSinglePassThrough(torch.nn.Module):
    """Flux's single block with its residual branch zero, written out: the block runs on the concatenated
    [text; image] stream, which passes unchanged and is split back at the text length."""

    def forward(self, hidden_states, encoder_hidden_states, *args, **kwargs):  # type: ignore[no-untyped-def]
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        text_len = encoder_hidden_states.shape[1]
        return joint[:, :text_len], joint[:, text_len:]


@pytest.mark.parametrize("skipped", [["blocks.0"], ["single.0"], ["blocks.0", "single.0"]])
def test_flux_blocks_skip_as_a_hand_written_pass_through(skipped: list[str], flux_dir: Path) -> None:
    """Skipping Flux's double block (both streams pass) and single block (the joint stream passes) through
    our skipper equals the transformer with those blocks replaced by pass-throughs, and changes the output."""
    import copy

    from autodiff_opt.arch.runtime import RuntimeSettings, build_runtime

    model = _load(flux_dir, guidance=3.5, prompts=PROMPTS)
    skipper = build_runtime(model, RuntimeSettings(units="blocks")).skipper
    ids = [next(layer.id for layer in skipper.layers if layer.name == name) for name in skipped]
    x = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(1))
    labels, step = torch.tensor([0, 2]), 600
    reference = copy.deepcopy(model)
    if "blocks.0" in skipped:
        reference.denoiser.transformer_blocks[0] = _PassThrough(joint=True)
    if "single.0" in skipped:
        reference.denoiser.single_transformer_blocks[0] = _FluxSinglePassThrough()
    with torch.no_grad():
        plain = model.eps_fn(class_labels=labels)(x, step, 0)
        with skipper.skipping(ids):
            skipped_out = model.eps_fn(class_labels=labels)(x, step, 0)
        expected = reference.eps_fn(class_labels=labels)(x, step, 0)
        after = model.eps_fn(class_labels=labels)(x, step, 0)
    torch.testing.assert_close(skipped_out, expected, atol=1e-6, rtol=1e-6)
    assert (skipped_out - plain).abs().max() > 1e-3 and torch.equal(after, plain)


class _ZeroBranch(torch.nn.Module):
    """An attention or feed-forward branch that adds nothing, written out: what a skipped branch must equal."""

    def forward(self, hidden_states, encoder_hidden_states=None, *args, **kwargs):  # type: ignore[no-untyped-def]
        if encoder_hidden_states is None:
            return torch.zeros_like(hidden_states)
        return torch.zeros_like(hidden_states), torch.zeros_like(encoder_hidden_states)


@pytest.mark.parametrize("which", ["dit", "sd3", "flux"])
@pytest.mark.parametrize("units", ["blocks", "sub_blocks"])
def test_transformer_costs_are_measured_and_additive(which: str, units: str, dit_dir: Path, sd3_dir: Path,
                                                     flux_dir: Path) -> None:
    """Stage 2 on transformers: every unit has FLOPs, a skipped unit costs nothing, and the FLOPs of any mask
    predicted from the per-unit savings equal a counted forward with that mask."""
    from autodiff_opt.arch.flops import count_step_flops, measure_model_costs, model_step
    from autodiff_opt.arch.runtime import RuntimeSettings, build_runtime

    folder = {"dit": dit_dir, "sd3": sd3_dir, "flux": flux_dir}[which]
    model = _load(folder, 3.0, None if which == "dit" else PROMPTS)
    skipper = build_runtime(model, RuntimeSettings(units=units)).skipper  # type: ignore[arg-type]
    costs = measure_model_costs(model, skipper)
    expected = {("dit", "blocks"): ["blocks.0", "blocks.1"], ("sd3", "blocks"): ["blocks.0", "blocks.1"],
                ("flux", "blocks"): ["blocks.0", "single.0"],
                ("dit", "sub_blocks"): ["blocks.0.attn1", "blocks.0.ff", "blocks.1.attn1", "blocks.1.ff"],
                ("sd3", "sub_blocks"): ["blocks.0.attn", "blocks.0.ff", "blocks.0.ff_context", "blocks.1.attn", "blocks.1.ff"],
                ("flux", "sub_blocks"): ["blocks.0.attn", "blocks.0.ff", "blocks.0.ff_context", "single.0.attn"]}
    assert list(costs.names) == expected[(which, units)]
    assert all(s > 0 for s in costs.savings) and not any(costs.skipped_flops)
    assert sum(costs.savings) < costs.full_step
    step = model_step(model)
    for mask in ({0}, {len(costs.names) - 1}, set(range(0, len(costs.names), 2))):
        with skipper.skipping(mask):
            measured, _ = count_step_flops(step)
        assert costs.step_flops(mask) == measured
    if which == "dit":  # the CFG pair: one step of one image runs two rows through the network
        unguided = _load(folder, 1.0)
        assert measure_model_costs(unguided, build_runtime(unguided, RuntimeSettings(units=units)).skipper).full_step * 2 == costs.full_step  # type: ignore[arg-type]


@pytest.mark.parametrize("which", ["dit", "sd3"])
def test_skipped_branches_leave_the_residual_stream(which: str, dit_dir: Path, sd3_dir: Path) -> None:
    import copy

    from autodiff_opt.arch.runtime import RuntimeSettings, build_runtime

    model = _load(dit_dir, 3.0) if which == "dit" else _load(sd3_dir, 3.0, PROMPTS)
    skipper = build_runtime(model, RuntimeSettings(units="sub_blocks")).skipper
    x = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    labels, step = torch.tensor([1, 2]), 500
    ids = [0, 2] if which == "dit" else [0, 1]  # DiT: both attentions; SD3: block 0's joint attention and its ff
    with torch.no_grad():
        plain = model.eps_fn(class_labels=labels)(x, step, 0)
        with skipper.skipping(ids):
            skipped = model.eps_fn(class_labels=labels)(x, step, 0)
        reference = copy.deepcopy(model)
        for i in ids:
            path = skipper.layers[i].path.rsplit(".", 1)
            setattr(reference.denoiser.get_submodule(path[0]), path[1], _ZeroBranch())
        expected = reference.eps_fn(class_labels=labels)(x, step, 0)
        with skipper.skipping([]):
            empty = model.eps_fn(class_labels=labels)(x, step, 0)
    assert torch.equal(plain, empty)
    torch.testing.assert_close(skipped, expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(skipped, plain)


def test_a_conflicting_runtime_request_raises(dit_dir: Path) -> None:
    """A denoiser's runtime (its skipper and compiled forward) is built once: asking for other units or another
    compile later raises (the skipper used to hand back the first units' layers silently), even after the
    first caller dropped it; asking again with the same settings returns the same one. The model itself
    carries neither."""
    import gc
    from dataclasses import fields

    from autodiff_opt.arch.runtime import RuntimeConflictError, RuntimeSettings, build_runtime
    from autodiff_opt.models.base import DiffusionModel

    model = _load(dit_dir, 1.0)
    runtime = build_runtime(model, RuntimeSettings(units="blocks"))
    assert build_runtime(model) is runtime and build_runtime(model, RuntimeSettings(units="blocks")) is runtime
    with pytest.raises(RuntimeConflictError, match="units='sub_blocks' \\(it runs with 'blocks'\\)"):
        build_runtime(model, RuntimeSettings(units="sub_blocks"))
    with pytest.raises(RuntimeConflictError, match="compile='default'"):
        build_runtime(model, RuntimeSettings(compile="default", backend="aot_eager"))
    fresh = _load(dit_dir, 1.0)
    layers = build_runtime(fresh, RuntimeSettings(units="sub_blocks")).layers  # the runtime itself is dropped
    gc.collect()
    assert [layer.kind for layer in layers][:2] == ["block_attention", "block_ff"]
    with pytest.raises(RuntimeConflictError):
        build_runtime(fresh, RuntimeSettings(units="blocks"))
    assert not {"skipper", "compiled", "compiled_forward"} & {f.name for f in fields(DiffusionModel)}


@pytest.mark.slow
def test_dit_stage2_through_the_cli_skips_branches_within_the_budget(dit_dir: Path, tmp_path: Path) -> None:
    import json

    proc = _tiny_cli_run("dit_imagenet256", dit_dir, tmp_path, **{
        "search.baselines": "[ddim_uniform]", "search.generations": 3, "search.stage2.enabled": "true",
        "search.stage2.start_generation": 1, "search.stage2.units": "sub_blocks", "search.stage2.max_prun": 0.5,
        "search.stage2.ramp_steps": 1, "search.stage2.budget_flops": 3.0})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage 2: 4 layers" in proc.stderr + proc.stdout
    doc = json.loads((tmp_path / "run" / "best_schedule.json").read_text())
    names = {n for step in doc["skipped_layer_names"] for n in step}
    assert names <= {"blocks.0.attn1", "blocks.0.ff", "blocks.1.attn1", "blocks.1.ff"}
    assert doc["model_config"]["skip_units"] == "sub_blocks"
    assert doc["diffusers_snippet"].startswith("# Apply the searched schedule in diffusers' own DiTPipeline")
    from autodiff_opt.apply import generate_from_schedule  # the schedule file alone brings the pipeline back

    images = generate_from_schedule(tmp_path / "run" / "best_schedule.json", num_images=3, device="cpu")
    assert images.dtype == torch.uint8 and images.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.slow
def test_sd3_stage2_scores_diffusers_caches_at_their_measured_flops(sd3_dir: Path, tmp_path: Path) -> None:
    """Stage 2 on a flow transformer with diffusers' caches as baselines: each cache row has a FID and the
    FLOPs its trajectory ran (less than its steps at full cost when it reused anything); one that diffusers'
    hooks cannot run on this block layout (First Block Cache on SD3's last, context-free block) fails its row."""
    import json

    from replicas import write_coco_captions

    captions = write_coco_captions(tmp_path / "annotations" / "captions_val2014.json")
    proc = _tiny_cli_run("sd3_coco", sd3_dir, tmp_path, **{
        "model.prompts": captions, "search.baselines": "[flow_default]", "search.generations": 2,
        "search.stage2.enabled": "true", "search.stage2.start_generation": 1, "search.stage2.max_extra_steps": 3,
        "search.stage2.caches": "[taylorseer,pab,mag,first_block]"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {row["schedule"]: row for row in json.loads((tmp_path / "run" / "best_schedule.json").read_text())["final"]}
    for name in ("taylorseer", "pab", "mag"):
        row = rows[f"flow_default+{name}"]
        assert row["kind"] == "cache" and len(row["timesteps"]) == 7 and np.isfinite(row["fid_final"])
        assert 0 < row["cost_full_steps"] <= 7.0
    assert rows["flow_default+taylorseer"]["cost_full_steps"] < 6.0  # it reused cached outputs at some steps
    assert rows["flow_default+first_block"]["fid_final"] is None  # NaN, written as null
    assert "cache baseline flow_default+first_block failed" in proc.stderr + proc.stdout


def test_caches_need_a_transformer_and_known_names(tmp_path: Path) -> None:
    from cli_helpers import run_cli

    proc = run_cli(["search.stage2.enabled=true", "search.stage2.caches=[pab]", "search.generations=1",
                    f"storage.url=sqlite:///{tmp_path / 's.db'}", "progress=false"], tmp_path, tmp_path / "run")
    assert proc.returncode == 2
    assert "search.stage2.caches=['pab']: diffusers' caches hook transformer blocks" in proc.stderr
    from autodiff_opt.config import Stage2Config
    from autodiff_opt.preflight import ConfigError, check_stage2

    with pytest.raises(ConfigError, match=r"search.stage2.caches: \['teacache'\] unknown"):
        check_stage2(Stage2Config(units="blocks", caches=["teacache"]))
    with pytest.raises(ConfigError, match="search.stage2.units=layers: use blocks or sub_blocks"):
        check_stage2(Stage2Config(units="layers", caches=[]))


def _schedule_doc(steps: list[int], skipped: list[list[str]], units: str = "blocks") -> dict[str, object]:
    return {"timesteps": steps, "skipped_layer_names": skipped, "model_config": {"skip_units": units}}


def test_sd3_pipeline_with_skip_blocks_reproduces_our_masked_sampler(sd3_dir: Path) -> None:
    """The export in the real pipeline: sigmas= on a scheduler that does not shift them, and the searched
    blocks skipped per step by autodiff_opt.apply.skip_blocks, give our sampler's output on the same noise."""
    from autodiff_opt.apply import skip_blocks
    from autodiff_opt.arch.runtime import RuntimeSettings, build_runtime
    from autodiff_opt.core.genome import Genome

    model = _load(sd3_dir, guidance=5.0, prompts=PROMPTS)
    steps, names = [999, 700, 400, 100], [["blocks.1"], [], ["blocks.0", "blocks.1"], []]
    layers = build_runtime(model).skipper.layers
    genome = Genome.from_steps(steps, [[next(l.id for l in layers if l.name == n) for n in step] for step in names])
    noise = torch.randn((2, *model.sample_shape), generator=torch.Generator().manual_seed(3))
    pipe = _sd3_pipe(sd3_dir, exact=True)
    kwargs = dict(prompt=PROMPTS[1:], height=IMAGE_SIZE, width=IMAGE_SIZE, sigmas=[grid_time(i, 1000) for i in steps],
                  guidance_scale=5.0, latents=noise.clone(), output_type="latent", max_sequence_length=256)
    with torch.no_grad():
        eps = build_runtime(model).masked(model.eps_fn(class_labels=torch.tensor([1, 2])), genome)
        ours = flow_euler_sample(eps, noise, steps, model.alphas_cumprod)
        plain = pipe(**kwargs).images
        skips = skip_blocks(pipe.transformer, _schedule_doc(steps, names))
        theirs = pipe(**kwargs).images
        skips.remove()
        again = pipe(**kwargs).images
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    assert (theirs - plain).abs().max() > 1e-3 and torch.equal(again, plain)  # removed: the plain pipeline again
    assert skips.calls == 4  # one transformer call a step, the CFG pair batched


def test_dit_pipeline_pinned_to_the_searched_steps_with_skipped_branches(dit_dir: Path) -> None:
    from diffusers import DiTPipeline, DPMSolverMultistepScheduler

    from autodiff_opt.apply import skip_blocks
    from autodiff_opt.arch.runtime import RuntimeSettings, build_runtime
    from autodiff_opt.core.genome import Genome

    model = _load(dit_dir, guidance=4.0)
    steps, names = [950, 610, 300, 40], [[], ["blocks.0.ff"], ["blocks.1.attn1"], []]
    layers = build_runtime(model, RuntimeSettings(units="sub_blocks")).skipper.layers
    genome = Genome.from_steps(steps, [[next(l.id for l in layers if l.name == n) for n in step] for step in names])
    labels = [3, 917]
    noise = torch.randn((2, *model.sample_shape), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        eps = build_runtime(model, RuntimeSettings(units="sub_blocks")).masked(
            model.eps_fn(class_labels=torch.tensor(labels)), genome)
        ours = (model.to_images(ddim_sample(eps, noise, steps, model.alphas_cumprod, clip_x0=False)) + 1) / 2
    pipe = DiTPipeline.from_pretrained(dit_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                             solver_order=1, final_sigmas_type="zero",
                                                             lower_order_final=False)
    pinned = pipe.scheduler.set_timesteps
    pipe.scheduler.set_timesteps = lambda num_inference_steps=None, device=None: pinned(timesteps=steps, device=device)
    skip_blocks(pipe.transformer, _schedule_doc(steps, names, "sub_blocks"))
    theirs = pipe(class_labels=labels, guidance_scale=4.0, num_inference_steps=4,
                  generator=torch.Generator().manual_seed(5), output_type="pt").images
    torch.testing.assert_close(ours, torch.as_tensor(theirs).float(), atol=2e-5, rtol=1e-4)


SNIPPET_PROMPT = "a photo of a cat"  # the prompt the SD3 / Flux snippets run
DIT_SNIPPET_LABELS = [207, 360, 387, 974]  # the classes the DiT snippet runs


def _run_snippet(code: str, folder: Path, genome, units: str, layers, tmp_path: Path,  # type: ignore[no-untyped-def]
                 monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """The snippet run as written next to its best_schedule.json (export_schedule's file): uint8 (N, 3, H, W)."""
    from autodiff_opt.report.export import export_schedule

    export_schedule(tmp_path / "best_schedule.json", genome, {"model_config": {"skip_units": units}},
                    layer_names=[layer.name for layer in layers])
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    offline = code.replace('from_pretrained("%s")' % folder, 'from_pretrained("%s", local_files_only=True)' % folder)
    exec(compile(offline, "snippet", "exec"), scope)  # noqa: S102 - our own generated code
    return torch.stack([torch.as_tensor(np.array(image)).permute(2, 0, 1) for image in scope["images"]])  # type: ignore[attr-defined]


def _our_images(model, solver: str, genome, labels: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Our sampler (generate.ImageGenerator with the per-step skipper) on the pipeline's draw of the noise
    (torch.Generator().manual_seed(0), latents unpacked)."""
    from autodiff_opt.generate import ImageGenerator, SampleSet

    noise = torch.randn((len(labels), *model.sample_shape), generator=torch.Generator().manual_seed(0))
    generator = ImageGenerator(model, solver, clip_x0=False, batch_size=len(labels))  # applies the genome's masks
    return generator.generate(genome, SampleSet(noise, torch.tensor(labels), 0))


def _assert_snippet_gives_ours(theirs: torch.Tensor, ours: torch.Tensor, plain: torch.Tensor) -> None:
    """Tolerance: 1 grey level (uint8 rounding of the pipeline's PIL images against ours of the same floats);
    the plain schedule (no skips) must differ by more, or the comparison could not see a dropped skip."""
    assert theirs.shape == ours.shape and float(theirs.float().std()) > 10  # not a blank image
    off, off_plain = int((ours.int() - theirs.int()).abs().max()), int((plain.int() - theirs.int()).abs().max())
    assert off <= 1, f"the snippet's images are {off} grey levels off ours"
    assert off_plain > 8, f"the snippet's images are within {off_plain} grey levels of the unskipped schedule's"


def test_dit_snippet_runs_and_gives_our_sampler(dit_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The DiT export of a stage-2 result (DPM-Solver++(2M) on uneven steps, blocks skipped at some steps), run
    as written: DiTPipeline's images equal our sampler's on the same noise and classes."""
    from autodiff_opt.arch.runtime import RuntimeSettings, build_runtime
    from autodiff_opt.core.genome import Genome
    from autodiff_opt.report.export import pipeline_snippet

    model = _load(dit_dir, guidance=4.0)
    layers = build_runtime(model, RuntimeSettings(units="blocks")).skipper.layers
    steps = [950, 610, 300, 40]
    genome = Genome.from_steps(steps, [[layers[1].id], [], [layers[0].id, layers[1].id], []])
    code = pipeline_snippet("dit", genome, str(dit_dir), "dpmpp_2m", 4.0, clip_x0=False)
    assert "DiTPipeline" in code.splitlines()[0] and "skip_blocks(pipe.transformer" in code and "solver_order=2" in code
    theirs = _run_snippet(code, dit_dir, genome, "blocks", layers, tmp_path, monkeypatch)
    _assert_snippet_gives_ours(theirs, _our_images(model, "dpmpp_2m", genome, DIT_SNIPPET_LABELS),
                               _our_images(model, "dpmpp_2m", Genome.from_steps(steps), DIT_SNIPPET_LABELS))


def test_flux_snippet_runs_and_gives_our_sampler(flux_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Flux export (flow Euler on uneven times, the double and the single block skipped at some steps, at
    the searched image size), run as written: FluxPipeline's image equals our sampler's on the same noise."""
    from autodiff_opt.arch.runtime import RuntimeSettings, build_runtime
    from autodiff_opt.core.genome import Genome
    from autodiff_opt.report.export import pipeline_snippet

    model = _load(flux_dir, guidance=3.5, prompts=[SNIPPET_PROMPT])
    layers = build_runtime(model, RuntimeSettings(units="blocks")).skipper.layers
    assert [layer.name for layer in layers] == ["blocks.0", "single.0"]
    steps = [999, 700, 380, 90]
    genome = Genome.from_steps(steps, [[layers[0].id], [], [layers[0].id, layers[1].id], [layers[1].id]])
    code = pipeline_snippet("flux", genome, str(flux_dir), "flow_euler", 3.5, clip_x0=False, image_size=IMAGE_SIZE)
    assert "FluxPipeline" in code.splitlines()[0] and f"height={IMAGE_SIZE}, width={IMAGE_SIZE}" in code
    theirs = _run_snippet(code, flux_dir, genome, "blocks", layers, tmp_path, monkeypatch)
    _assert_snippet_gives_ours(theirs, _our_images(model, "flow_euler", genome, [0]),
                               _our_images(model, "flow_euler", Genome.from_steps(steps), [0]))


def test_sd3_snippet_runs_and_gives_our_sampler(sd3_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from autodiff_opt.arch.runtime import RuntimeSettings, build_runtime
    from autodiff_opt.core.genome import Genome
    from autodiff_opt.report.export import pipeline_snippet

    model = _load(sd3_dir, guidance=5.0, prompts=[SNIPPET_PROMPT])
    layers = build_runtime(model, RuntimeSettings(units="blocks")).skipper.layers
    steps = [999, 600, 200]
    genome = Genome.from_steps(steps, [[layers[0].id], [], [layers[1].id]])
    code = pipeline_snippet("sd3", genome, str(sd3_dir), "flow_euler", 5.0, clip_x0=False)
    assert "StableDiffusion3Pipeline" in code.splitlines()[0] and "skip_blocks(pipe.transformer" in code
    assert "sigmas=[1.0, 0.601, 0.201]" in code and "guidance_scale=5.0" in code
    theirs = _run_snippet(code, sd3_dir, genome, "blocks", layers, tmp_path, monkeypatch)
    _assert_snippet_gives_ours(theirs, _our_images(model, "flow_euler", genome, [0]),
                               _our_images(model, "flow_euler", Genome.from_steps(steps), [0]))
    plain = pipeline_snippet("sd3", Genome.from_steps(steps), str(sd3_dir), "flow_euler", 5.0, False)
    assert "skip_blocks" not in plain and "height=" not in plain  # no image size: the pipeline's default
    other = pipeline_snippet("sd3", genome, str(sd3_dir), "flow_heun", 5.0, False)
    assert "autodiff_opt.apply" in other.splitlines()[0] and "runs no flow_heun" in other.splitlines()[0]


def test_pixel_space_dit_exports_the_apply_snippet(dit_dir: Path) -> None:
    """The embedded digits DiT has no VAE, so DiTPipeline.from_pretrained refuses its folder: its export samples
    with autodiff_opt.apply; a latent DiT (the replica) keeps the DiTPipeline snippet."""
    from autodiff_opt.config import ModelConfig, SolverConfig
    from autodiff_opt.core.genome import Genome
    from autodiff_opt.models.sources import resolve_pretrained
    from autodiff_opt.report.write import snippet_for

    genome = Genome((999, 600, 300, 50))
    snippets = {}
    for name, folder in (("pixels", resolve_pretrained("builtin:digits-dit")), ("latents", str(dit_dir))):
        settings = ModelConfig(pretrained=folder, guidance_scale=1.0)  # the run's model settings and model
        snippets[name] = snippet_for(_load(Path(folder), guidance=1.0), settings, SolverConfig(name="ddim", clip_x0=False),
                                     genome, "ddim")
    assert "generate_from_schedule" in snippets["pixels"] and "DiTPipeline" not in snippets["pixels"].split("\n", 1)[1]
    assert "DiTPipeline needs a VAE" in snippets["pixels"].splitlines()[0]
    assert "DiTPipeline.from_pretrained" in snippets["latents"]


@pytest.mark.parametrize("which", ["dit", "flux"])
def test_transformers_run_the_network_compiled_whole(which: str, dit_dir: Path, flux_dir: Path) -> None:
    """compile_scope="unet" on a transformer: the eps function calls the runtime's compiled network (dynamo
    compiles a graph; DiT and Flux used to call the plain module), and its images are the eager ones
    (Flux's output is a tuple: the compiled network's unwrapping must keep the whole batch)."""
    from torch._dynamo.utils import counters

    from autodiff_opt.core.genome import Genome
    from autodiff_opt.generate import ImageGenerator, SampleSet

    folder, prompts = (dit_dir, None) if which == "dit" else (flux_dir, PROMPTS)
    models = [_load(folder, 3.0, prompts) for _ in range(2)]
    samples = SampleSet.draw(2, models[0].sample_shape, models[0].num_classes, 0)
    genome = Genome((900, 500, 100)) if which == "dit" else Genome((800, 400, 0))
    solver = "ddim" if which == "dit" else "flow_euler"
    eager = ImageGenerator(models[0], solver, clip_x0=False, batch_size=2).generate(genome, samples)
    torch._dynamo.reset()
    counters.clear()
    compiled = ImageGenerator(models[1], solver, clip_x0=False, batch_size=2, compile="default",
                              compile_backend="aot_eager", compile_scope="unet")
    assert compiled.runtime.network is not models[1].denoiser
    images = compiled.generate(genome, samples)
    assert int(counters["stats"]["unique_graphs"]) >= 1, "the compiled network was never called"
    assert images.shape == eager.shape and (images.int() - eager.int()).abs().max() <= 1
