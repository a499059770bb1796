"""Layer discovery, layer skipping and the FLOPs cost model on tiny diffusers UNets built here."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from autodiff_opt.arch import flops as flops_mod
from autodiff_opt.arch.flops import check_additivity, example_inputs, measure_layer_costs
from autodiff_opt.arch.layers import discover_layers, genome_from_named, genome_to_named, ids_from_names
from autodiff_opt.arch.skip import LayerSkipper, with_step_masks
from autodiff_opt.core.genome import Genome

# An ADM-shaped UNet2DModel, small: resnet down/up-sampling, scale-shift norm, classes, attention at 2 levels.
ADM_LIKE = dict(
    sample_size=16, in_channels=3, out_channels=6, block_out_channels=(16, 32, 48), layers_per_block=2,
    down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"),
    downsample_type="resnet", upsample_type="resnet", resnet_time_scale_shift="scale_shift",
    num_class_embeds=10, norm_num_groups=8, attention_head_dim=8,
)
COND = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24, norm_num_groups=8, attention_head_dim=8,
)


def expected_counts(cfg: dict) -> tuple[int, int]:
    """(resnets, attentions) of a UNet2DModel with resnet resamplers, from its config alone."""
    n, per = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    resnets = n * per + (n - 1) + 2 + n * (per + 1) + (n - 1)  # down, down resamplers, mid, up, up resamplers
    attn_down = sum(per for b in cfg["down_block_types"] if b.startswith("Attn"))
    attn_up = sum(per + 1 for b in cfg["up_block_types"] if b.startswith("Attn"))
    return resnets, attn_down + 1 + attn_up


@pytest.fixture(scope="module")
def adm() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(**ADM_LIKE).eval()


@pytest.fixture(scope="module")
def cond() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**COND).eval()


def _forward(unet: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    inputs = example_inputs(unet, batch_size=batch, encoder_seq_len=5)
    if "class_labels" in inputs:
        inputs["class_labels"] = torch.arange(batch) % 10
    with torch.inference_mode():
        return unet(**inputs).sample


# --- discovery ---------------------------------------------------------------------------------

def test_discovery_counts_and_names_follow_the_config(adm: UNet2DModel) -> None:
    layers = discover_layers(adm)
    resnets, attentions = expected_counts(ADM_LIKE)
    assert [l.id for l in layers] == list(range(resnets + attentions))
    assert sum(l.kind == "resnet" for l in layers) == resnets == 21
    assert sum(l.kind == "attention" for l in layers) == attentions == 11
    names = {l.name for l in layers}
    assert len(names) == len(layers)
    assert {"down.0.resnets.0", "down.0.downsamplers.0", "down.1.attentions.1", "mid.resnets.1",
            "mid.attentions.0", "up.0.upsamplers.0", "up.1.attentions.2", "up.2.resnets.2"} <= names
    for layer in layers:
        module = adm.get_submodule(layer.path)
        assert isinstance(module, ResnetBlock2D if layer.kind == "resnet" else Attention)
    assert not any(part in l.path for l in layers for part in ("conv_in", "conv_out", "time_embedding", "class_embedding"))


def test_adm64_has_the_papers_58_layers() -> None:
    with torch.device("meta"):
        unet = UNet2DModel(
            sample_size=64, out_channels=6, block_out_channels=(192, 384, 576, 768), layers_per_block=3,
            down_block_types=("ResnetDownsampleBlock2D",) + ("AttnDownBlock2D",) * 3,
            up_block_types=("AttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
            downsample_type="resnet", upsample_type="resnet", resnet_time_scale_shift="scale_shift",
            num_class_embeds=1000, attention_head_dim=64)
    assert len(discover_layers(unet)) == 58


def test_plain_resamplers_are_not_layers() -> None:
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8)
    names = [l.name for l in discover_layers(unet)]
    assert not any("samplers" in n for n in names)  # Downsample2D / Upsample2D convs always run
    assert len(names) == 3 + 3 + 6  # down 1 + (1 + 1 attn); mid 2 + 1 attn; up (2 + 2 attn) + 2
    assert names.count("down.1.attentions.0") == 1 and "up.0.attentions.1" in names


def test_ids_follow_the_forward_order(adm: UNet2DModel) -> None:
    layers = discover_layers(adm)
    seen: list[int] = []
    handles = [adm.get_submodule(l.path).register_forward_pre_hook(lambda m, a, i=l.id: seen.append(i)) for l in layers]
    try:
        _forward(adm, batch=1)
    finally:
        for h in handles:
            h.remove()
    assert seen == [l.id for l in layers]


def test_discovery_on_conditional_unet(cond: UNet2DConditionModel) -> None:
    layers = discover_layers(cond)
    kinds = [(l.name, l.kind) for l in layers]
    assert len(layers) == 3 + 3 + 6
    assert ("mid.attentions.0", "attention") in kinds and ("up.1.attentions.1", "attention") in kinds
    assert all(isinstance(cond.get_submodule(l.path), Transformer2DModel) for l in layers if l.kind == "attention")


# --- skipping ----------------------------------------------------------------------------------

def test_empty_mask_is_bit_identical_and_leaves_no_hook(adm: UNet2DModel) -> None:
    plain = _forward(adm)
    skipper = LayerSkipper(adm)
    skipper.set_skipped([])
    assert torch.equal(_forward(adm), plain)
    with skipper.skipping([0, 4, 9, 20]):
        assert not torch.equal(_forward(adm), plain)
    assert skipper.skipped == frozenset()
    assert torch.equal(_forward(adm), plain)
    for layer in skipper.layers:
        module = adm.get_submodule(layer.path)
        assert "forward" not in module.__dict__
        assert not getattr(module, "_diffusers_hook", None) or not module._diffusers_hook.hooks


@pytest.mark.parametrize("kwargs", [
    dict(in_channels=16, out_channels=16),
    dict(in_channels=16, out_channels=32),  # conv_shortcut
    dict(in_channels=16, out_channels=16, down=True),
    dict(in_channels=16, out_channels=32, up=True),
    dict(in_channels=16, out_channels=32, down=True, output_scale_factor=2.0),
])
def test_skipped_resnet_equals_its_shortcut(kwargs: dict) -> None:
    torch.manual_seed(1)
    block = ResnetBlock2D(temb_channels=8, groups=8, **kwargs).eval()
    x, temb = torch.randn(2, 16, 8, 8), torch.randn(2, 8)
    manual = x
    if kwargs.get("down"):
        manual = F.avg_pool2d(manual, 2)
    if kwargs.get("up"):
        manual = F.interpolate(manual, scale_factor=2.0, mode="nearest")
    if kwargs["in_channels"] != kwargs["out_channels"]:
        manual = F.conv2d(manual, block.conv_shortcut.weight, block.conv_shortcut.bias)
    manual = manual / kwargs.get("output_scale_factor", 1.0)
    full = block(x, temb)
    skipper = LayerSkipper(block, layers=_single_layer("resnet"))
    with torch.no_grad(), skipper.skipping([0]):
        skipped = block(x, temb)
    assert torch.equal(skipped, manual)
    assert not torch.equal(skipped, full)
    with torch.no_grad():  # the same as the block's own output with its residual branch zeroed
        block.conv2.weight.zero_()
        block.conv2.bias.zero_()
        assert torch.equal(block(x, temb), skipped)


def _single_layer(kind: str):
    from autodiff_opt.arch.layers import Layer
    return (Layer(0, "block", kind, ""),)  # path "" is the module itself


@pytest.mark.parametrize("rescale", [1.0, 2.0])
def test_skipped_attention_is_identity(rescale: float) -> None:
    torch.manual_seed(2)
    attn = Attention(16, heads=2, dim_head=8, norm_num_groups=8, residual_connection=True, bias=True,
                     rescale_output_factor=rescale, _from_deprecated_attn_block=True).eval()
    x = torch.randn(2, 16, 4, 4)
    skipper = LayerSkipper(attn, layers=_single_layer("attention"))
    with torch.no_grad(), skipper.skipping([0]):
        out = attn(x)
    assert out is not x and torch.equal(out, x / rescale)
    with torch.no_grad():  # the module's own output with its attention branch zeroed
        attn.to_out[0].weight.zero_()
        attn.to_out[0].bias.zero_()
        assert torch.equal(attn(x), out)


@pytest.mark.filterwarnings("ignore:.*Transformer2DModelOutput.*:FutureWarning")  # diffusers' own forward
def test_skipped_transformer_returns_its_input_in_the_callers_type() -> None:
    torch.manual_seed(3)
    model = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=8,
                               cross_attention_dim=24).eval()
    x, ctx = torch.randn(2, 16, 4, 4), torch.randn(2, 5, 24)
    skipper = LayerSkipper(model, layers=_single_layer("attention"))
    with torch.no_grad(), skipper.skipping([0]):
        as_tuple = model(x, encoder_hidden_states=ctx, return_dict=False)
        as_output = model(x, ctx)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1 and torch.equal(as_tuple[0], x)
    assert isinstance(as_output, Transformer2DModelOutput) and torch.equal(as_output.sample, x)
    with torch.no_grad():
        model.proj_out.weight.zero_()
        model.proj_out.bias.zero_()
        assert torch.equal(model(x, ctx).sample, x)


def test_skipped_downsampling_resnet_inside_the_unet_returns_its_shortcut(adm: UNet2DModel) -> None:
    skipper = LayerSkipper(adm)
    (layer_id,) = ids_from_names(skipper.layers, ["down.1.downsamplers.0"])
    block = adm.get_submodule(skipper.layers[layer_id].path)
    seen: dict[str, torch.Tensor] = {}
    handle = block.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    try:
        with skipper.skipping([layer_id]):
            _forward(adm, batch=1)
    finally:
        handle.remove()
    assert block.conv_shortcut is None and seen["out"].shape[-1] == seen["x"].shape[-1] // 2
    assert torch.equal(seen["out"], F.avg_pool2d(seen["x"], 2))


def test_conditional_unet_skips_and_restores(cond: UNet2DConditionModel) -> None:
    plain = _forward(cond)
    skipper = LayerSkipper(cond)
    with skipper.skipping(range(skipper.num_layers)):
        all_skipped = _forward(cond)
    with skipper.skipping([4]):  # mid transformer
        one = _forward(cond)
    assert all_skipped.shape == plain.shape and torch.isfinite(all_skipped).all()
    assert not torch.equal(one, plain)
    assert torch.equal(_forward(cond), plain)


def test_unknown_layer_ids_are_rejected(adm: UNet2DModel) -> None:
    skipper = LayerSkipper(adm)
    with pytest.raises(ValueError, match="unknown layer ids"):
        skipper.set_skipped([0, 999])
    assert skipper.skipped == frozenset()


def test_step_masks_follow_the_step_not_its_rank(adm: UNet2DModel) -> None:
    skipper = LayerSkipper(adm)
    genome = Genome((900, 500, 100), (frozenset({3}), frozenset(), frozenset({0, 7})))
    seen: list[frozenset[int]] = []

    def eps(x: torch.Tensor, t: int, step_index: int) -> torch.Tensor:
        seen.append(skipper.skipped)
        return x

    masked = with_step_masks(eps, skipper, genome)
    for i, t in enumerate(genome.timesteps):
        masked(torch.zeros(1), t, i)
    masked(torch.zeros(1), t=100, step_index=2)
    assert seen == list(genome.skips) + [genome.skips[2]]
    assert skipper.skipped == frozenset()
    with pytest.raises(ValueError, match="pairs it with"):
        masked(torch.zeros(1), 100, 0)
    with pytest.raises(IndexError):
        masked(torch.zeros(1), 100, 3)


def test_named_export_round_trips(adm: UNet2DModel) -> None:
    layers = discover_layers(adm)
    genome = Genome((700, 300), (frozenset({0, 31}), frozenset({2})))
    data = json.loads(json.dumps(genome_to_named(genome, layers)))
    assert data["skipped_layers"][0] == ["down.0.resnets.0", "up.2.resnets.2"]
    assert genome_from_named(data, layers) == genome


# --- FLOPs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["adm", "cond"])
def test_masked_flops_are_full_minus_skipped(model: str, request: pytest.FixtureRequest) -> None:
    unet = request.getfixturevalue(model)
    skipper = LayerSkipper(unet)
    inputs = example_inputs(unet, encoder_seq_len=5)
    costs = measure_layer_costs(unet, skipper, inputs)
    assert all(s > 0 for s in costs.savings) and sum(costs.savings) < costs.full_step
    assert check_additivity(unet, skipper, costs, set(), inputs) == (costs.full_step, costs.full_step)
    gen = torch.Generator().manual_seed(0)
    for fraction in (0.1, 0.5, 1.0):
        k = max(1, int(fraction * skipper.num_layers))
        mask = set(torch.randperm(skipper.num_layers, generator=gen)[:k].tolist())
        predicted, measured = check_additivity(unet, skipper, costs, mask, inputs)
        assert predicted == measured < costs.full_step


def test_resnet_with_shortcut_still_costs_its_shortcut_when_skipped(adm: UNet2DModel) -> None:
    costs = measure_layer_costs(adm)
    layers = discover_layers(adm)
    for layer, kept in zip(layers, costs.skipped_flops):
        has_shortcut = layer.kind == "resnet" and adm.get_submodule(layer.path).conv_shortcut is not None
        assert (kept > 0) == has_shortcut, layer.name


def test_attention_flops_include_the_attention_products(adm: UNet2DModel) -> None:
    costs = measure_layer_costs(adm)
    i = costs.names.index("mid.attentions.0")
    channels, tokens = 48, 4 * 4
    projections = 4 * 2 * tokens * channels * channels  # q, k, v, out
    products = 2 * 2 * tokens * tokens * channels  # q k^T and attn v
    assert costs.layer_flops[i] == projections + products


def test_cost_cache_is_reused(adm: UNet2DModel, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "costs.json"
    first = measure_layer_costs(adm, cache_path=path)
    monkeypatch.setattr(flops_mod, "count_step_flops", lambda *a, **k: pytest.fail("counted again"))
    forwards: list[int] = []
    hook = adm.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        assert measure_layer_costs(adm, cache_path=path) == first
    finally:
        hook.remove()
    assert forwards == []  # the cached costs are read, the model never runs
    assert first.key in json.loads(path.read_text())
    genome = Genome((900, 10), (frozenset({0}), frozenset()))
    assert first.genome_flops(genome) == 2 * first.full_step - first.savings[0]
    assert first.budget(10.0).limit == 10 * first.full_step


def test_per_step_skipping_wraps_only_genomes_with_skips(adm: UNet2DModel) -> None:
    from autodiff_opt.arch.skip import per_step_skipping
    from autodiff_opt.solvers.ddim import ddim_sample

    wrap = per_step_skipping(adm)
    labels = torch.tensor([3])

    def eps(x: torch.Tensor, t: int, step_index: int) -> torch.Tensor:
        with torch.inference_mode():
            return adm(x, torch.tensor([t]), class_labels=labels).sample[:, :3]

    plain = Genome((800, 400, 50))
    assert wrap(eps, plain) is eps
    alphas = torch.linspace(0.9999, 0.01, 1000, dtype=torch.float64)
    x_T = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    full = ddim_sample(wrap(eps, plain), x_T, plain.timesteps, alphas)
    masked_genome = Genome((800, 400, 50), (frozenset(), frozenset({2, 7}), frozenset()))
    masked = ddim_sample(wrap(eps, masked_genome), x_T, masked_genome.timesteps, alphas)
    assert not torch.equal(full, masked)
    assert torch.equal(ddim_sample(wrap(eps, plain), x_T, plain.timesteps, alphas), full)
