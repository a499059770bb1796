"""What a user reads last: the final table on fresh seeds, the report files, the exported schedule, apply.

One tiny experiment (a random 8x8 UNet, the random-conv extractor, stage 2 on) is built once; the
studies are made by hand with known FIDs and genomes, so which candidate wins, which rows the final
table must hold and what every file must say are known without running a search.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from optuna.distributions import IntDistribution
from optuna.trial import TrialState, create_trial
from PIL import Image

from autodiff_opt.arch.layers import discover_layers
from autodiff_opt.core.genome import Genome
from autodiff_opt.core.keys import FINAL_ATTR, GENERATION_ATTR, GENOME_ATTR, SLOT_ATTR
from autodiff_opt.generate import SampleSet
from autodiff_opt.report.export import export_schedule
from autodiff_opt.report.write import to_markdown, write_report
from autodiff_opt.search.final import final_candidates, final_evaluation
from cli_helpers import compose_cfg, tiny_overrides

optuna.logging.set_verbosity(optuna.logging.WARNING)

FINAL_SAMPLES, REPEATS = 32, 2


@pytest.fixture(scope="module")
def exp(tiny_model_dir: Path, tiny_reference: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from autodiff_opt.runner import build_experiment

    tmp = tmp_path_factory.mktemp("final-exp")
    overrides = tiny_overrides(tiny_model_dir, tiny_reference, tmp / "unused.db", **{
        "search.num_samples": 32, "search.batch_size": 32, "final.num_samples": FINAL_SAMPLES,
        "final.repeats": REPEATS, "search.stage2.enabled": "true", "cache_dir": str(tmp / "cache")})
    return build_experiment(compose_cfg(overrides, tmp))


def candidate(genome: Genome, fid: float, generation: int, slot: int, cost: float | None = None,
              **user_attrs: object) -> optuna.trial.FrozenTrial:
    values = [fid] if cost is None else [fid, cost]
    return create_trial(state=TrialState.COMPLETE, values=values, params={"t0": genome.timesteps[0]},
                        distributions={"t0": IntDistribution(0, 999)}, user_attrs=user_attrs,
                        system_attrs={GENOME_ATTR: genome.key(), GENERATION_ATTR: generation, SLOT_ATTR: slot})


STAGE1_BEST = Genome((800, 550, 300, 40))
SKIPPING_BEST = Genome.from_steps([850, 600, 350, 120, 10], [[0], [1, 2], [], [0], [2]])
OTHERS = [Genome((999, 700, 400, 100)), Genome((700, 500, 250, 5)), Genome.from_steps([900, 450, 60, 20], [[1], [], [], []])]


def hand_study(best_has_skips: bool = True) -> optuna.Study:
    """Generation 0: a baseline and two stage-1 candidates; generation 1: stage 2 (skips) and one more."""
    study = optuna.create_study()
    study.add_trial(candidate(Genome((750, 500, 250, 0)), 9.0, 0, 0, baseline="ddim_uniform"))
    study.add_trial(candidate(STAGE1_BEST, 4.0, 0, 1))
    study.add_trial(candidate(OTHERS[0], 7.5, 0, 2))
    study.add_trial(candidate(SKIPPING_BEST, 3.0 if best_has_skips else 5.0, 1, 0))
    study.add_trial(candidate(OTHERS[1], 6.0, 1, 1))
    study.add_trial(candidate(OTHERS[2], 8.0, 1, 2))
    return study


def fids_by_hand(exp, genome: Genome) -> list[float]:  # type: ignore[no-untyped-def]
    """FID of the genome on each fresh sample set (final.seed + 7919 r), from the generator and scorer."""
    out = []
    for r in range(REPEATS):
        samples = SampleSet.draw(FINAL_SAMPLES, exp.model.sample_shape, exp.model.num_classes,
                                 int(exp.cfg.final.seed) + 7919 * r)
        out.append(exp.scorer.fid(exp.generator.generate(genome, samples), exp.reference))
    return out


@pytest.fixture(scope="module")
def evaluated(exp):  # type: ignore[no-untyped-def]
    study = hand_study()
    return study, final_evaluation(study, exp.final_inputs())


# --- the final table ------------------------------------------------------------------------------
def test_final_rows_are_the_winner_the_best_stage1_candidate_and_the_baselines(exp, evaluated) -> None:  # type: ignore[no-untyped-def]
    _, table = evaluated
    rows = table.set_index("schedule")
    assert list(table.schedule) == ["searched", "searched_stage1", "ddim_uniform", "trailing"]
    assert rows.loc["searched", "timesteps"] == list(SKIPPING_BEST.timesteps)
    assert rows.loc["searched_stage1", "timesteps"] == list(STAGE1_BEST.timesteps)
    assert rows.loc["trailing", "timesteps"] == [999, 749, 499, 249]
    assert list(rows.kind) == ["searched", "searched", "heuristic", "heuristic"]
    assert rows.loc["searched", "fid_search"] == 3.0 and rows.loc["searched_stage1", "fid_search"] == 4.0
    assert rows.loc["ddim_uniform", "fid_search"] == 9.0 and math.isnan(rows.loc["trailing", "fid_search"])
    assert rows.loc["searched", "skipped_layers"] == 5 and rows.loc["searched", "nfe"] == 5
    assert (rows.loc[["searched_stage1", "ddim_uniform", "trailing"], "skipped_layers"] == 0).all()


def test_final_cost_in_full_steps_from_the_layer_costs(exp, evaluated) -> None:  # type: ignore[no-untyped-def]
    rows = evaluated[1].set_index("schedule")
    costs = exp.layer_costs
    saved = [f - s for f, s in zip(costs.layer_flops, costs.skipped_flops)]
    by_hand = sum(costs.full_step - sum(saved[j] for j in mask) for mask in SKIPPING_BEST.skips) / costs.full_step
    assert rows.loc["searched", "cost_full_steps"] == pytest.approx(by_hand, abs=1e-3)
    assert 4.0 < by_hand < 5.0  # five steps, some layers skipped
    assert rows.loc["searched_stage1", "cost_full_steps"] == 4.0


def test_final_fids_mean_and_std_over_repeats_equal_numpy(exp, evaluated) -> None:  # type: ignore[no-untyped-def]
    rows = evaluated[1].set_index("schedule")
    for name, genome in (("searched", SKIPPING_BEST), ("trailing", Genome((999, 749, 499, 249)))):
        fids = fids_by_hand(exp, genome)
        assert len(set(fids)) == REPEATS, "the repeats used the same samples"
        assert rows.loc[name, "fid_final"] == pytest.approx(np.mean(fids), rel=1e-6)
        assert rows.loc[name, "fid_final_std"] == pytest.approx(np.std(fids, ddof=1), rel=1e-6)


def test_final_ratios_by_hand(evaluated) -> None:  # type: ignore[no-untyped-def]
    rows = evaluated[1].set_index("schedule")
    fid = rows.fid_final.to_dict()
    best_baseline = min(fid["ddim_uniform"], fid["trailing"])
    for name in rows.index:
        assert rows.loc[name, "ratio_to_best_baseline"] == pytest.approx(fid[name] / best_baseline)
        assert rows.loc[name, "ratio_to_best_heuristic"] == pytest.approx(fid[name] / best_baseline)
        assert math.isnan(rows.loc[name, "ratio_to_best_peer"])  # no peers in this study
    assert min(rows.loc[["ddim_uniform", "trailing"], "ratio_to_best_baseline"]) == pytest.approx(1.0)


def test_with_skips_row_when_the_winner_skips_nothing(exp) -> None:  # type: ignore[no-untyped-def]
    candidates = final_candidates(hand_study(best_has_skips=False), exp.final_inputs())
    assert candidates["searched"] == STAGE1_BEST and candidates["searched_with_skips"] == SKIPPING_BEST
    assert "searched_stage1" not in candidates


def test_final_result_is_reused_and_recomputed_when_its_setting_changes(exp, evaluated) -> None:  # type: ignore[no-untyped-def]
    evaluated_study, table = evaluated
    study = optuna.create_study()  # a copy of the evaluated study, final result included
    for t in evaluated_study.trials:
        study.add_trial(t)
    study.set_user_attr(FINAL_ATTR, evaluated_study.user_attrs[FINAL_ATTR])
    stored = study.user_attrs[FINAL_ATTR]
    assert stored["setting"] == {"num_samples": FINAL_SAMPLES, "seed": int(exp.cfg.final.seed), "repeats": REPEATS,
                                 "best_trial": 3, "trials": 6}
    planted = [{**row, "fid_final": 123.0} for row in stored["rows"]]  # what only a reuse can return
    study.set_user_attr(FINAL_ATTR, {"setting": stored["setting"], "rows": planted})
    assert (final_evaluation(study, exp.final_inputs()).fid_final == 123.0).all()
    study.add_trial(candidate(Genome((600, 400, 200, 1)), 8.5, 1, 3))  # a new candidate: the table is stale
    again = final_evaluation(study, exp.final_inputs())
    assert (again.fid_final != 123.0).all()
    pd.testing.assert_series_equal(again.fid_final, table.fid_final)  # same candidates, same fresh seeds
    assert study.user_attrs[FINAL_ATTR]["setting"]["trials"] == 7


def test_pareto_picks_six_points_spread_over_the_cost_axis(exp) -> None:  # type: ignore[no-untyped-def]
    study = optuna.create_study(directions=["minimize", "minimize"])
    front = [(10.0 - i, 1.0 + 0.5 * i) for i in range(11)]  # FID falls as cost grows: all 11 non-dominated
    for i, (fid, cost) in enumerate(front):
        study.add_trial(candidate(Genome((900 - i, 500, 250, 10 + i)), fid, 0, i, cost=cost))
    study.add_trial(candidate(Genome((990, 500, 250, 3)), 9.9, 0, 11, cost=3.3))  # dominated by (7.0, 2.5)
    names = [n for n in final_candidates(study, exp.final_inputs()) if n.startswith("searched")]
    # front sorted by cost, indices round(i * 10 / 5) = 0, 2, 4, 6, 8, 10; the last (FID 0) is also the winner
    assert names == ["searched"] + [f"searched_pareto_{1.0 + 0.5 * i:.2f}" for i in (0, 2, 4, 6, 8)]


# --- the report's tables and exports ----------------------------------------------------------------
def test_to_markdown_formats_floats_nan_none_and_lists() -> None:
    table = pd.DataFrame({"schedule": ["a", "b"], "fid": [1.23456, float("nan")], "nfe": [4, 5],
                          "note": [None, "x"], "steps": [[3, 2], [9]]})
    assert to_markdown(table) == ("| schedule | fid | nfe | note | steps |\n|---|---|---|---|---|\n"
                                  "| a | 1.235 | 4 |  | [3, 2] |\n| b |  | 5 | x | [9] |\n")
    assert to_markdown(table[["fid"]].head(1), floatfmt=".1e") == "| fid |\n|---|\n| 1.2e+00 |\n"


@pytest.fixture(scope="module")
def report(exp, evaluated, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    study, table = evaluated
    out = tmp_path_factory.mktemp("report")
    return study, table, write_report(study, exp.report_inputs(), table, out)


def test_trials_and_generations_csv_read_back_equal_the_study(report) -> None:  # type: ignore[no-untyped-def]
    study, _, paths = report
    trials = pd.read_csv(paths["trials"])
    assert list(trials.trial) == [t.number for t in study.trials]
    assert list(trials.fid) == [t.values[0] for t in study.trials]
    assert list(trials.nfe) == [len(json.loads(t.system_attrs[GENOME_ATTR])["timesteps"]) for t in study.trials]
    generations = pd.read_csv(paths["generations"]).set_index("generation")
    for g in (0, 1):
        fids = [t.values[0] for t in study.trials if t.system_attrs[GENERATION_ATTR] == g]
        assert generations.loc[g, "candidates"] == len(fids)
        assert generations.loc[g, "best_fid"] == min(fids)
        assert generations.loc[g, "median_fid"] == pytest.approx(float(np.median(fids)))
    assert list(generations.index) == [0, 1]


def test_final_csv_and_markdown_read_back(report) -> None:  # type: ignore[no-untyped-def]
    _, table, paths = report
    csv = pd.read_csv(paths["final_csv"])
    np.testing.assert_allclose(csv.fid_final, table.fid_final)
    assert list(csv.schedule) == list(table.schedule)
    lines = paths["final_md"].read_text().splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == list(table.columns) and len(lines) == 2 + len(table)
    for line, (_, row) in zip(lines[2:], table.iterrows()):
        cells = dict(zip(head, (c.strip() for c in line.strip("|").split("|"))))
        assert cells["schedule"] == row.schedule and cells["fid_final"] == f"{row.fid_final:.3f}"
        assert cells["fid_search"] == ("" if math.isnan(row.fid_search) else f"{row.fid_search:.3f}")


def test_best_schedule_json_every_field(exp, report) -> None:  # type: ignore[no-untyped-def]
    study, table, paths = report
    doc = json.loads(paths["schedule"].read_text())
    names = [layer.name for layer in discover_layers(exp.model.denoiser)]
    assert doc["timesteps"] == list(SKIPPING_BEST.timesteps)
    assert doc["skipped_layers"] == [[0], [1, 2], [], [0], [2]]
    assert doc["skipped_layer_names"] == [[names[0]], [names[1], names[2]], [], [names[0]], [names[2]]]
    assert doc["model"] == exp.cfg.model.pretrained and doc["subfolder"] is None
    assert (doc["solver"], doc["clip_x0"]) == (exp.cfg.solver.name, exp.cfg.solver.clip_x0)
    assert doc["nfe"] == 5 and doc["fid_search"] == 3.0 and doc["trial"] == 3
    assert doc["study"] == study.study_name and doc["storage"] == exp.cfg.storage.url  # no password to hide
    # the best genome skips layers, which no diffusers scheduler does: the snippet runs it with autodiff_opt.apply
    assert "skips layers" in doc["diffusers_snippet"].splitlines()[0] and "generate_from_schedule" in doc["diffusers_snippet"]
    assert doc["diffusers_scheduler"] is None
    assert [r["schedule"] for r in doc["final"]] == list(table.schedule)
    np.testing.assert_allclose([r["fid_final"] for r in doc["final"]], table.fid_final)
    expected_keys = {"timesteps", "skipped_layers", "skipped_layer_names", "model", "subfolder", "solver", "clip_x0",
                     "nfe", "fid_search", "study", "storage", "trial", "diffusers_scheduler", "diffusers_snippet", "final",
                     "model_config"}
    assert set(doc) == expected_keys
    assert doc["model_config"]["pretrained"] == exp.cfg.model.pretrained  # what apply rebuilds the model from
    assert doc["model_config"]["skip_units"] == "blocks"


def test_export_schedule_writes_what_it_returns(tmp_path: Path) -> None:
    genome = Genome.from_steps([10, 900, 500], [[4, 1], [], [2]])  # given out of order: sampling order is kept
    layer_names = ["in.0", "in.1", "mid", "out.0", "out.1"]
    doc = export_schedule(tmp_path / "s.json", genome, {"nfe": 3, "note": "x"}, layer_names)
    assert json.loads((tmp_path / "s.json").read_text()) == doc
    assert doc == {"timesteps": [900, 500, 10], "skipped_layers": [[], [2], [1, 4]], "nfe": 3, "note": "x",
                   "skipped_layer_names": [[], ["mid"], ["in.1", "out.1"]]}
    plain = export_schedule(tmp_path / "p.json", genome, {})
    assert "skipped_layer_names" not in plain and plain["skipped_layers"] == [[], [2], [1, 4]]


# --- apply: the exported schedule back on its model ---------------------------------------------------
def test_schedule_genome_maps_layer_names_to_this_models_ids(exp) -> None:  # type: ignore[no-untyped-def]
    from autodiff_opt.apply import schedule_genome

    names = [layer.name for layer in discover_layers(exp.model.denoiser)]
    doc = {"timesteps": [900, 500, 10], "skipped_layers": [[0], [], [1]],  # stale ids: the names win
           "skipped_layer_names": [[names[3]], [], [names[1], names[4]]]}
    assert schedule_genome(doc, exp.model.denoiser) == Genome.from_steps([900, 500, 10], [[3], [], [1, 4]])
    assert schedule_genome(doc) == Genome.from_steps([900, 500, 10], [[0], [], [1]])  # no model: the ids
    with pytest.raises(KeyError, match="no.such.layer"):
        schedule_genome({**doc, "skipped_layer_names": [["no.such.layer"], [], []]}, exp.model.denoiser)


def test_save_grid_lays_out_upscaled_images(tmp_path: Path) -> None:
    from autodiff_opt.apply import save_grid

    images = torch.arange(4 * 8 * 8, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(4, 1, 8, 8)
    save_grid(images, tmp_path / "g.png", scale=4)
    grid = np.asarray(Image.open(tmp_path / "g.png").convert("L"))
    assert grid.shape == (2 + 2 * (32 + 2), 2 + 2 * (32 + 2))  # 2 x 2 tiles of 32 px, 2 px padding
    for i in range(4):
        top, left = 2 + (i // 2) * 34, 2 + (i % 2) * 34
        tile = images[i, 0].numpy().repeat(4, axis=0).repeat(4, axis=1)
        np.testing.assert_array_equal(grid[top : top + 32, left : left + 32], tile)


def test_apply_main_writes_the_schedules_samples(exp, report, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from autodiff_opt.apply import main

    doc = json.loads(report[2]["schedule"].read_text())
    main([str(report[2]["schedule"]), "--num-images", "4", "--seed", "3", "--device", "cpu",
          "--out", str(tmp_path / "a.png")])
    grid = np.asarray(Image.open(tmp_path / "a.png").convert("L"))
    genome = Genome.from_steps(doc["timesteps"], doc["skipped_layers"])
    expected = exp.generator.generate(genome, SampleSet.draw(4, exp.model.sample_shape, exp.model.num_classes, 3))
    for i in range(4):
        top, left = 2 + (i // 2) * 34, 2 + (i % 2) * 34
        tile = expected[i, 0].numpy().repeat(4, axis=0).repeat(4, axis=1)
        np.testing.assert_array_equal(grid[top : top + 32, left : left + 32], tile)
