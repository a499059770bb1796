"""Which UNet layers can skip, what they cost, and applying per-step skip masks (the operators that choose
the masks are the search's: search/operators.py)."""

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
from autodiff_opt.arch.skip import LayerSkipper, per_step_skipping, with_step_masks

__all__ = [
    "Budget", "Layer", "LayerCosts", "LayerSkipper", "check_additivity", "discover_layers", "example_inputs",
    "genome_from_named", "genome_to_named", "ids_from_names", "measure_layer_costs", "names_from_ids",
    "per_step_skipping", "with_step_masks",
]
