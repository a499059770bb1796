"""Independent references for the newest parts (issue 25): the GP surrogate against scikit-learn's
GaussianProcessRegressor and expected improvement against its closed form with scipy.stats.norm; the rung
prefixes' FIDs against scorer.fid of those first n images and the final FID against evaluate() without
rungs; observations() (pruned FIDs moved to full-sample scale) on hand-built trials."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState, create_trial
from scipy.stats import norm
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import Matern

from autodiff_opt.core.genome import Genome
from autodiff_opt.core.keys import GENOME_ATTR
from autodiff_opt.search.surrogate import GaussianProcess
from autodiff_opt.search.surrogate_sampler import observations


@pytest.mark.parametrize("length,noise", [(0.3, 1e-8), (0.16, 1e-2), (0.64, 1e-1)])
def test_gp_posterior_and_expected_improvement_match_scikit_learn(length: float, noise: float) -> None:
    rng = np.random.default_rng(7)
    x, queries = rng.uniform(0, 1, (25, 4)), rng.uniform(0, 1, (40, 4))
    fids = np.exp(rng.normal(3.0, 0.6, 25))  # positive objectives: the GP models their standardised log
    gp = GaussianProcess.fit(x, fids, kernel=(length, noise))
    assert gp.kernel == (length, noise)
    z = (np.log(fids) - np.log(fids).mean()) / np.log(fids).std()
    reference = GaussianProcessRegressor(Matern(length_scale=length, length_scale_bounds="fixed", nu=2.5), alpha=noise,
                                         optimizer=None, normalize_y=False).fit(x, z)
    mean, std = reference.predict(queries, return_std=True)
    ours_mean, ours_std = gp.predict(queries)
    np.testing.assert_allclose(ours_mean, mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours_std, std, rtol=1e-5, atol=1e-6)
    best = z.min()
    u = (best - mean) / std
    np.testing.assert_allclose(gp.expected_improvement(queries), (best - mean) * norm.cdf(u) + std * norm.pdf(u),
                               rtol=1e-5, atol=1e-8)


def _trial(number: int, state: TrialState, genome: Genome | None, value: float | None = None,
           steps: dict[int, float] | None = None) -> optuna.trial.FrozenTrial:
    trial = create_trial(state=state, value=value, intermediate_values=steps or {},
                         system_attrs={GENOME_ATTR: genome.key()} if genome is not None else {})
    trial.number = number
    return trial


def test_observations_move_pruned_fids_to_full_sample_scale() -> None:
    """A pruned FID at prefix n is multiplied by the median over completed trials of FID_full / FID_n."""
    g = [Genome((900 - 10 * i, 500, 100, 5)) for i in range(8)]
    trials = [
        _trial(0, TrialState.COMPLETE, g[0], 10.0, {12: 20.0, 24: 12.5}),
        _trial(1, TrialState.COMPLETE, g[1], 30.0, {12: 40.0, 24: 36.0}),
        _trial(2, TrialState.PRUNED, g[2], None, {12: 50.0}),  # stopped at 12
        _trial(3, TrialState.PRUNED, g[3], None, {12: 33.0, 24: 27.0}),  # stopped at 24: its last value counts
        _trial(4, TrialState.FAIL, g[4]),
        _trial(5, TrialState.COMPLETE, None, 5.0),  # no genome: not a candidate
        _trial(6, TrialState.COMPLETE, g[6], float("inf")),
        _trial(7, TrialState.COMPLETE, g[7], 20.0),  # no prefixes: no ratio, its own value
    ]
    at_12 = math.sqrt((10 / 20) * (30 / 40))  # the median of two log ratios is their mean
    at_24 = math.sqrt((10 / 12.5) * (30 / 36))
    got = observations(list(reversed(trials)))  # in trial order whatever the input order
    assert [genome for genome, _ in got] == [g[0], g[1], g[2], g[3], g[7]]
    np.testing.assert_allclose([v for _, v in got], [10.0, 30.0, 50.0 * at_12, 27.0 * at_24, 20.0], rtol=1e-12)


def test_rung_prefix_fids_are_the_fids_of_the_first_n_images(tiny_model_dir: Path, tiny_reference: Path) -> None:
    from autodiff_opt.generate import ImageGenerator, SampleSet
    from autodiff_opt.metrics.fid import FIDScorer
    from autodiff_opt.metrics.reference import load_reference_images
    from autodiff_opt.models.loading import load_model
    from autodiff_opt.search.objective import evaluate, evaluate_on_rungs

    model = load_model(str(tiny_model_dir), device="cpu")
    generator, scorer = ImageGenerator(model, "ddim", True, batch_size=48), FIDScorer("test-randconv")
    reference = scorer.statistics(load_reference_images(str(tiny_reference)))
    samples, genome = SampleSet.draw(48, model.sample_shape, None, 3), Genome((980, 700, 400, 90))
    reported: list[tuple[int, float]] = []
    result = evaluate_on_rungs(generator, scorer, reference, samples, genome, [12, 24],
                               lambda fid, n: reported.append((n, fid)) is not None)  # never stops
    images = generator.generate(genome, samples)
    assert [n for n, _ in reported] == [12, 24] and result["num_samples"] == 48
    for n, fid in reported:
        assert fid == pytest.approx(scorer.fid(images[:n], reference), rel=1e-6)
    assert result["fid"] == pytest.approx(scorer.fid(images, reference), rel=1e-6)
    assert result["fid"] == pytest.approx(evaluate(generator, scorer, reference, samples, genome)["fid"], rel=1e-9)
    stopped = evaluate_on_rungs(generator, scorer, reference, samples, genome, [12, 24], lambda fid, n: n == 24)
    assert stopped["num_samples"] == 24 and stopped["fid"] == pytest.approx(reported[1][1], rel=1e-9)
