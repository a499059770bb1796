"""Checks that used to raise plain ValueError/RuntimeError outside preflight raise the taxonomy's errors
(core/errors.py: the CLI prints one line and exits 2): the final comparison's seeds (search/final.py), the
evolution's sizes and the study's direction (search/evolution.py), the precision (generate.py), a study
without genomes (search/final.py)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from autodiff_opt.core.errors import USER_ERRORS, ConfigError, StudyError


def _one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(err.value)
    assert isinstance(err.value, USER_ERRORS) and "\n" not in message
    return message


@pytest.mark.parametrize("final_seed,repeats,which", [(7, 1, "final.seed = 7"), (7 - 7919 * 2, 3, "repeat 2")])
def test_final_seeds_that_meet_the_search_seed(final_seed: int, repeats: int, which: str) -> None:
    from autodiff_opt.config import FinalConfig
    from autodiff_opt.search.final import FinalInputs, final_evaluation, final_seeds

    with pytest.raises(ConfigError, match="set final.seed to another value") as err:
        final_seeds(final_seed, repeats, search_seed=7)
    assert which in _one_line(err)
    assert final_seeds(8, 3, search_seed=7) == [8, 8 + 7919, 8 + 2 * 7919]
    # final_evaluation refuses them first, before it reads the study (this one has no trials) or any model
    inputs = FinalInputs(None, None, None, None, FinalConfig(seed=final_seed, repeats=repeats, num_samples=8),  # type: ignore[arg-type]
                         search_seed=7, search_samples=8)
    with pytest.raises(ConfigError, match="is search.seed"):
        final_evaluation(optuna.create_study(), inputs)


def test_a_study_without_genomes_is_a_study_error() -> None:
    from autodiff_opt.search.final import best_genome

    study = optuna.create_study()
    study.tell(study.ask(), 1.0)
    with pytest.raises(StudyError, match="no genome attribute") as err:
        best_genome(study)
    _one_line(err)


@pytest.mark.parametrize("sizes,message", [
    ({"population": 0}, "search.population and search.num_parents must be >= 1"),
    ({"population": 6, "num_mutants": 5, "num_crossovers": 3}, "exceeds search.population = 6"),
    ({"population": 6, "num_mutants": 2, "num_crossovers": 1, "init_random": 9}, "search.init_random=9"),
])
def test_evolution_sizes_are_config_errors(sizes: dict[str, int], message: str) -> None:
    """Raised where an EvolutionConfig is built (a sampler made in code too); preflight's resolve() adds the fix."""
    from autodiff_opt.search.evolution import EvolutionConfig

    with pytest.raises(ConfigError, match=message) as err:
        EvolutionConfig(**sizes)
    _one_line(err)


def test_a_maximising_study_is_refused_by_the_sampler() -> None:
    from autodiff_opt.search.evolution import AutoDiffusionPaperSampler, EvolutionConfig
    from autodiff_opt.search.space import SearchSpace

    sampler = AutoDiffusionPaperSampler(SearchSpace(4, 1000), EvolutionConfig(6, 3, 2, 0.25, 1, 2), seed=0)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    with pytest.raises(ConfigError, match="direction='minimize'") as err:
        study.ask()
    _one_line(err)


def test_a_precision_the_device_cannot_run_is_a_config_error(tiny_model_dir: Path) -> None:
    from autodiff_opt.generate import ImageGenerator
    from autodiff_opt.models.loading import load_model

    with pytest.raises(ConfigError, match="precision=fp16 needs CUDA") as err:
        ImageGenerator(load_model(str(tiny_model_dir)), precision="fp16")
    _one_line(err)


def test_the_settings_errors_of_solvers_samplers_and_stops_are_config_errors() -> None:
    """The solver, sampler and stop records' own errors are the core's ConfigError (one line, exit 2 on the
    CLI), also where a library caller meets them without preflight."""
    from autodiff_opt.config import SearchConfig
    from autodiff_opt.search.sampler_choice import resolve
    from autodiff_opt.search.stopping import check_stop
    from autodiff_opt.specs.solvers import solver_spec

    with pytest.raises(ConfigError, match="solver.name='ddpm_fast' is unknown") as err:
        solver_spec("ddpm_fast")
    _one_line(err)
    with pytest.raises(ConfigError, match="search.sampler='annealing' is unknown") as err:
        resolve(SearchConfig(sampler="annealing"))
    _one_line(err)
    with pytest.raises(ConfigError, match="search.stop='never' is unknown") as err:
        check_stop("never", 30, None)
    _one_line(err)
