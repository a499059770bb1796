"""One row per candidate, with its genome and provenance: the study as a pandas table."""

from __future__ import annotations

import optuna
import pandas as pd

from autodiff_opt.search.evolution import genome_of
from autodiff_opt.search.space import GENERATION_ATTR, fid_of, OPERATOR_ATTR, STAGE_ATTR


def trials_table(study: optuna.Study) -> pd.DataFrame:
    rows = []
    for t in study.get_trials(deepcopy=False):
        genome = genome_of(t)
        rows.append({
            "trial": t.number, "state": t.state.name, "generation": t.system_attrs.get(GENERATION_ATTR),
            "stage": t.system_attrs.get(STAGE_ATTR), "operator": t.system_attrs.get(OPERATOR_ATTR),
            "baseline": t.user_attrs.get("baseline"), "fid": fid_of(t),
            "cost_full_steps": t.values[1] if t.values and len(t.values) > 1 else None,
            "timesteps": list(genome.timesteps) if genome else None,
            "solver": genome.solver if genome else None,
            "nfe": t.user_attrs.get("nfe", genome.num_steps if genome else None),
            "skipped_layers": sum(len(s) for s in genome.skips) if genome else None,
            "flops": t.user_attrs.get("flops"), "gen_seconds": t.user_attrs.get("gen_seconds"),
            "fail_reason": t.user_attrs.get("fail_reason"),
        })
    return pd.DataFrame(rows)


def generation_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Best and median FID per generation of completed candidates."""
    done = table[table.state == "COMPLETE"]
    if done.empty:
        return pd.DataFrame(columns=["generation", "candidates", "best_fid", "median_fid"])
    grouped = done.groupby("generation")["fid"]
    return pd.DataFrame({"candidates": grouped.size(), "best_fid": grouped.min(),
                         "median_fid": grouped.median()}).reset_index()
