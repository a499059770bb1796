"""Stage 2's sensitivity map: entries equal directly computed FIDs, cost in the budget, kept on resume."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest

from autodiff_opt.core.keys import SENSITIVITY_COST_ATTR
from autodiff_opt.search.objective import evaluate
from autodiff_opt.search.operators import JointSpace, RandomGenome
from autodiff_opt.search.sensitivity import single_skip, stored_map
from autodiff_opt.search.skip_prior import SensitivityMap, SkipPrior
from autodiff_opt.core.genome import Genome
from autodiff_opt.arch.budget import Budget
from cli_helpers import compose_cfg, load_study, run_cli, tiny_overrides

EXTRA = {"search.stage2.enabled": "true", "search.stage2.sensitivity": "true", "search.stage2.start_generation": 1,
         "search.stage2.max_prun": 0.5, "search.stage2.ramp_steps": 1, "search.generations": 2,
         "search.stage2.sensitivity_fraction": 0.5, "final.enabled": "false", "report.grid_size": 0}


@pytest.mark.slow
def test_sensitivity_map_equals_direct_fids_and_is_kept_on_resume(tiny_model_dir: Path, tiny_reference: Path,
                                                                   tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "s.db"
    overrides = tiny_overrides(tiny_model_dir, tiny_reference, db, **EXTRA)
    first = run_cli(overrides, tmp_path, tmp_path / "run")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "sensitivity map:" in first.stderr + first.stdout
    study = load_study(db)
    smap = stored_map(study)
    assert smap is not None and smap.num_samples == 24  # half of the 48 search samples
    K, L = len(smap.timesteps), smap.num_layers
    attrs = study._storage.get_study_system_attrs(study._study_id)
    assert attrs[SENSITIVITY_COST_ATTR] == (1 + K * L) * 24 * K  # counted in the budget
    assert "Sensitivity: FID change" in (tmp_path / "run" / "report.html").read_text()

    from autodiff_opt.runner import build_experiment

    exp = build_experiment(compose_cfg(overrides, tmp_path / "direct"))
    prefix, plain = exp.samples.slice(0, 24), Genome(smap.timesteps)
    base = evaluate(exp.generator, exp.scorer, exp.reference, prefix, plain)["fid"]
    assert base == pytest.approx(smap.base_fid, rel=1e-6)
    for i, j in [(0, L - 1), (K - 1, 0)]:
        fid = evaluate(exp.generator, exp.scorer, exp.reference, prefix, single_skip(plain, i, j))["fid"]
        assert smap.delta[i][j] == pytest.approx(fid - base, rel=1e-5, abs=1e-9), (i, j)
    assert len({round(v, 9) for row in smap.delta for v in row}) > 1  # the layers differ: a real map

    # resumed (a new process's sampler on the same study): the stored map is read, never recomputed
    from autodiff_opt.runner import make_sampler

    sampler = make_sampler(exp)
    with caplog.at_level(logging.INFO, logger="autodiff_opt.search.sensitivity"):
        sampler._ensure_sensitivity(load_study(db))
    assert "sensitivity map:" not in caplog.text
    assert stored_map(load_study(db)) == smap and sampler.sensitivity.prior(load_study(db)) is not None


def test_prior_draws_masks_from_low_sensitivity_pairs() -> None:
    L = 10
    delta = [[0.0 if j == 3 else 1.0 for j in range(L)], [1.0 if j == 3 else 0.0 for j in range(L)]]
    smap = SensitivityMap((800, 200), tuple(tuple(r) for r in delta), 1.0, 10, 100)
    prior = SkipPrior.from_map(smap)
    assert np.allclose(prior.row(900), prior.weights[0]) and np.allclose(prior.row(100), prior.weights[1])
    budget = Budget.from_flops(100, tuple([5] * L), full_steps=4.5)
    rng = np.random.default_rng(0)
    counts = {"with": np.zeros(L), "without": np.zeros(L)}
    for name, p in (("with", prior), ("without", None)):
        space = JointSpace(1000, budget, 0.3, 1, 5, prior=p)
        for _ in range(200):
            g = RandomGenome(space, num_steps=5)(rng)
            for t, mask in zip(g.timesteps, g.skips):
                if t >= 500:
                    counts[name][list(mask)] += 1
    share = {k: v[3] / max(v.sum(), 1) for k, v in counts.items()}
    assert share["with"] > 2 * share["without"] and math.isfinite(share["with"])  # layer 3 is harmless early on


def test_a_sensitivity_fraction_outside_0_1_is_one_clear_line() -> None:
    from autodiff_opt.config import Stage2Config
    from autodiff_opt.core.errors import ConfigError
    from autodiff_opt.preflight import check_stage2

    with pytest.raises(ConfigError, match=r"search.stage2.sensitivity_fraction=1.5: use a fraction"):
        check_stage2(Stage2Config(units="blocks", caches=[], sensitivity_fraction=1.5))
    check_stage2(Stage2Config(units="blocks", caches=[], sensitivity_fraction=0.1))
