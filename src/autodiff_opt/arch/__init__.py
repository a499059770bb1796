"""Which UNet layers can skip, what they cost, applying per-step skip masks, stage-2 operators."""

from autodiff_opt.arch.budget import Budget
from autodiff_opt.arch.flops import LayerCosts, check_additivity, example_inputs, measure_layer_costs
from autodiff_opt.arch.layers import (
    Layer,
    discover_layers,
    genome_from_named,
    genome_to_named,
    ids_from_names,
    names_from_ids,
)
from autodiff_opt.arch.operators import (
    JointSpace,
    crossover,
    mutate,
    mutate_skips,
    ramp_max_skip_frac,
    random_genome,
    repair,
    skip_cap,
)
from autodiff_opt.arch.skip import LayerSkipper, per_step_skipping, with_step_masks

__all__ = [
    "Budget", "JointSpace", "Layer", "LayerCosts", "LayerSkipper", "check_additivity", "crossover",
    "discover_layers", "example_inputs", "genome_from_named", "genome_to_named", "ids_from_names",
    "measure_layer_costs", "mutate", "mutate_skips", "names_from_ids", "per_step_skipping", "ramp_max_skip_frac",
    "random_genome", "repair", "skip_cap", "with_step_masks",
]
