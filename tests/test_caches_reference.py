"""diffusers' caches through our generator against an independent reference on the embedded digits DiT.

diffusers' DiTPipeline cannot be the reference (it opens no cache_context, hard-codes the null class 1000
and needs a VAE), so the reference is written here the way diffusers' cache-aware pipelines (FluxPipeline)
drive a cache: the transformer loaded again as a diffusers class with ``CacheMixin`` (as Flux's is),
``enable_cache(CacheBaseline.config())``, diffusers' own ``DDIMScheduler`` (the folder's config: eta 0,
clip_sample to [-1, 1] with eps re-derived from the clipped x0, our ddim solver's clip_x0, alpha 1 after the last step), each call inside
``cache_context("cond")`` and the hooks' state reset between trajectories (``maybe_free_model_hooks``).
Float32 on CPU: outputs equal within 1e-5 relative. FLOPs: the final table's count (``count_step_flops`` on
our trajectory) equals FlopCounterMode over the reference loop, and a count from forward hooks on the
leaf modules (calls that really ran x each module's FLOPs from one uncached forward). And skipping a block of
the trained DiT equals the model with that block replaced by an identity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from autodiff_opt.arch.caches import CACHES, CacheBaseline
from autodiff_opt.arch.flops import count_step_flops
from autodiff_opt.core.genome import Genome
from autodiff_opt.generate import ImageGenerator
from autodiff_opt.models.sources import resolve_pretrained
from autodiff_opt.models.pipelines import load_transformer_pipeline

K, BATCH = 10, 4


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    from diffusers import DDIMScheduler, DiTTransformer2DModel
    from diffusers.models.cache_utils import CacheMixin

    folder = Path(resolve_pretrained("builtin:digits-dit"))
    model = load_transformer_pipeline(str(folder), None, guidance_scale=1.0, decode_batch_size=BATCH, device="cpu",
                                      dtype=torch.float32)
    cached_class = type("CachedDiT", (DiTTransformer2DModel, CacheMixin), {})
    reference = cached_class.from_pretrained(folder / "transformer").eval().requires_grad_(False)
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    scheduler.set_timesteps(K)
    steps = [int(t) for t in scheduler.timesteps]
    noise = torch.randn((BATCH, *model.sample_shape), generator=torch.Generator().manual_seed(7))
    labels = torch.tensor([0, 3, 7, 9])
    return {"model": model, "reference": reference, "scheduler": scheduler, "genome": Genome(tuple(steps)),
            "noise": noise, "labels": labels}


def reference_loop(s: dict[str, Any], cache: CacheBaseline | None, noise: torch.Tensor, labels: torch.Tensor
                   ) -> torch.Tensor:
    """A cache-aware pipeline's denoising loop (FluxPipeline's shape) with diffusers' DDIMScheduler."""
    transformer, scheduler = s["reference"], s["scheduler"]
    channels = noise.shape[1]
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            if cache is not None:
                cache.timestep = float(t)  # the pipeline's current timestep, read by PAB / FasterCache
            with transformer.cache_context("cond"):
                out = transformer(x, timestep=t.expand(x.shape[0]), class_labels=labels).sample[:, :channels]
            x = scheduler.step(out, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    transformer._reset_stateful_cache()  # what maybe_free_model_hooks does at the end of a pipeline call
    return x


def ours(s: dict[str, Any], cache: CacheBaseline, noise: torch.Tensor, labels: torch.Tensor,
         measure: Callable[[Callable[[], torch.Tensor]], Any] | None = None) -> Any:
    """Our generator with the cache as its step wrapper: calibrated first for MagCache, as final.py does."""
    generator = ImageGenerator(s["model"], "ddim", clip_x0=True, batch_size=BATCH, step_wrapper=cache.wrap)

    def run() -> torch.Tensor:
        return generator.denoise(s["genome"], noise, labels)

    cache.calibrate(run)
    with cache.applied():
        run()  # a first trajectory: the state must be reset by the next one's step 0
        return run() if measure is None else measure(run)


def _reference_cache(s: dict[str, Any], name: str, mag_ratios: list[float] | None) -> CacheBaseline:
    cache = CacheBaseline(s["model"], name, K)
    cache.mag_ratios = mag_ratios
    return cache


def _sdpa(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None, **kw: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """torch's counter, told that CPU's fused attention op costs what torch's sdpa formula says."""
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return FlopCounterMode(display=False, custom_mapping={cpu_sdpa: _sdpa} if cpu_sdpa is not None else {})


def _calls(s: dict[str, Any], names: list[str], run: Callable[[], Any]) -> dict[str, int]:
    """How often each named module's forward ran during ``run()``."""
    modules = dict(s["model"].denoiser.named_modules())
    calls = dict.fromkeys(names, 0)
    handles = [modules[n].register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls[n] + 1)) for n in names]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return calls


def _per_call_flops(s: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """FLOPs per call (the whole batch, from one uncached forward) of every leaf module, and of every attention's own
    product (its total minus its leaves', attributed to its query projection's calls)."""
    unet = s["model"].denoiser
    counter = flop_counter()
    names = [n for n, m in unet.named_modules() if n and not list(m.children())]
    attention = [n for n, m in unet.named_modules() if hasattr(m, "to_q")]

    def forward() -> None:
        with torch.no_grad(), counter:
            unet(s["noise"], timestep=torch.full((BATCH,), 500), class_labels=s["labels"])

    calls = _calls(s, names, forward)
    per = {k.split(".", 1)[1]: int(sum(v.values())) for k, v in counter.get_flop_counts().items() if "." in k}
    leaves = {n: per.get(n, 0) / calls[n] for n in names if calls[n]}
    cores = {a: (per.get(a, 0) - sum(per.get(n, 0) for n in names if n.startswith(a + "."))) / calls[f"{a}.to_q"]
             for a in attention}
    total = sum(f * calls[n] for n, f in leaves.items()) + sum(f * calls[f"{a}.to_q"] for a, f in cores.items())
    assert total == int(counter.get_total_flops()) and all(f > 0 for f in cores.values())  # a partition
    return leaves, cores


def _both_counts(s: dict[str, Any], run: Callable[[], Any], leaves: dict[str, float], cores: dict[str, float]
                 ) -> tuple[int, int]:
    """FLOPs of one ``run()`` as the final table counts them (``count_step_flops``), and from the modules that
    really ran (forward hooks; a cached attention returns before its projections)."""
    counted: list[int] = []
    calls = _calls(s, [*leaves, *[f"{a}.to_q" for a in cores if f"{a}.to_q" not in leaves]],
                   lambda: counted.append(count_step_flops(run)[0]))
    hooked = sum(calls[n] * f for n, f in leaves.items()) + sum(calls[f"{a}.to_q"] * f for a, f in cores.items())
    return counted[0], int(round(hooked))


@pytest.mark.slow
def test_each_cache_equals_the_reference_loop_at_the_flops_counted_three_ways(setup: dict[str, Any]) -> None:
    """Per cache, one trajectory of ours (after a first one: the state must be reset at step 0) against the
    reference loop's (after a first one too): the same outputs, and the same FLOPs counted three ways (the
    final table's count_step_flops, forward hooks on the modules that ran, FlopCounterMode on the reference)."""
    s = setup
    noise, labels = s["noise"], s["labels"]
    plain = reference_loop(s, None, noise, labels)
    with torch.no_grad():
        uncached = ImageGenerator(s["model"], "ddim", clip_x0=True, batch_size=BATCH).denoise(s["genome"], noise, labels)
    torch.testing.assert_close(uncached, plain, rtol=1e-5, atol=1e-5)  # the two loops agree without a cache
    leaves, cores = _per_call_flops(s)
    full = sum(leaves.values()) + sum(cores.values())  # one uncached step of the batch
    changed, costs = {}, {}
    for name in CACHES:
        cache = CacheBaseline(s["model"], name, K)
        outputs: list[torch.Tensor] = []
        with torch.no_grad():
            counted, hooked = ours(s, cache, noise, labels,
                                   measure=lambda run: _both_counts(s, lambda: outputs.append(run()), leaves, cores))
        ref_cache = _reference_cache(s, name, cache.mag_ratios)
        s["reference"].enable_cache(ref_cache.config())
        try:
            reference_loop(s, ref_cache, noise, labels)  # a first trajectory, as ours had
            counter = flop_counter()
            with counter:
                expected = reference_loop(s, ref_cache, noise, labels)
        finally:
            s["reference"].disable_cache()
        torch.testing.assert_close(outputs[0], expected, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        assert counted == hooked == int(counter.get_total_flops()), (name, counted, hooked, counter.get_total_flops())
        changed[name] = not torch.allclose(outputs[0], plain, rtol=1e-5, atol=1e-5)
        costs[name] = counted
    assert changed["taylorseer"] and changed["pab"] and changed["faster"], changed  # step-count rules: always reuse
    assert all(c < K * full for n, c in costs.items() if n in ("taylorseer", "pab", "faster")), (costs, K * full)


class _Identity(torch.nn.Module):
    """A DiT block whose residual branches add nothing, written out: what a skipped block must equal."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


def test_skipping_a_block_of_the_digits_dit_equals_an_identity_block(setup: dict[str, Any]) -> None:
    import copy

    from autodiff_opt.arch import LayerSkipper
    from autodiff_opt.arch.skip import per_step_skipping

    model = load_transformer_pipeline(str(resolve_pretrained("builtin:digits-dit")), None, guidance_scale=1.0,
                                      decode_batch_size=BATCH, device="cpu", dtype=torch.float32)
    reference = copy.deepcopy(model)
    j = len(model.denoiser.transformer_blocks) // 2
    reference.denoiser.transformer_blocks[j] = _Identity()
    x, labels = setup["noise"], setup["labels"]
    genome = Genome((500, 100), (frozenset({j}), frozenset()))
    with torch.no_grad():
        plain = model.eps_fn(class_labels=labels)(x, 500, 0)
        expected = reference.eps_fn(class_labels=labels)(x, 500, 0)
        fn = per_step_skipping(model.denoiser, LayerSkipper(model.denoiser))(model.eps_fn(class_labels=labels), genome)
        torch.testing.assert_close(fn(x, 500, 0), expected, atol=1e-6, rtol=1e-6)
        assert torch.equal(fn(x, 100, 1), model.eps_fn(class_labels=labels)(x, 100, 1))  # the next step: no skip
    assert not torch.allclose(expected, plain, atol=1e-4)  # the block matters: the check can fail
