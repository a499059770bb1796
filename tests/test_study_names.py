"""Default study names (issue 25): derived from what the study signature protects, so README's examples run
one after another on one storage instead of being refused as a resume of the first run. An explicit
storage.study_name still resumes and is still refused on a changed objective (test_cli.py's
test_incompatible_study_is_refused, test_search_efficiency.py's SIGKILL test)."""

from __future__ import annotations

import copy
import html
import json
import re
from pathlib import Path

import optuna
import pytest
import yaml
from omegaconf import DictConfig, OmegaConf

from autodiff_opt.runner import study_name_of
from cli_helpers import compose_cfg, run_cli, tiny_overrides


def _with(base: DictConfig, override: str) -> DictConfig:
    """The base config with one `key=value` override (as Hydra parses the value), without composing again."""
    key, value = override.split("=", 1)
    cfg = copy.deepcopy(base)
    OmegaConf.update(cfg, key, yaml.safe_load(value), merge=False)
    return cfg


def test_default_name_is_readable_and_changes_with_the_signature_only(tmp_path: Path) -> None:
    base = compose_cfg([], tmp_path)
    name = study_name_of(base)
    assert re.fullmatch(r"digits-ddim-k4-autodiffusion-[0-9a-f]{6}", name), name
    assert study_name_of(compose_cfg(["progress=false"], tmp_path)) == name  # the same settings resume their study
    for override in ("search.generations=30", "search.budget=400", "search.batch_size=100", "search.peers=[]",
                     "device=cpu"):  # settings a resume may change keep the name
        assert study_name_of(_with(base, override)) == name, override
    changes = ("search.sampler=tpe", "search.solvers=[ddim,unipc]", "search.num_samples=500", "search.seed=1",
               "search.stage2.enabled=true", "search.rungs=[0.5]", "solver.clip_x0=false", "precision=bf16")
    names = [study_name_of(_with(base, o)) for o in changes]
    assert len({name, *names}) == 1 + len(changes), names  # no two of them meet in one study
    assert names[0].startswith("digits-ddim-k4-tpe-") and names[1].startswith("digits-ddim+unipc-k4-autodiffusion-")
    assert names[4].startswith("digits-ddim-k4-autodiffusion-stage2-")
    assert study_name_of(_with(_with(base, "search.sampler=tpe"), "storage.study_name=mine")) == "mine"


@pytest.mark.slow
def test_readme_examples_run_one_after_another_on_one_storage(tiny_model_dir: Path, tiny_reference: Path,
                                                              tmp_path: Path) -> None:
    """`python -m autodiff_opt`, then `search.sampler=tpe`, then `'search.solvers=[ddim,unipc]'` on one storage:
    three studies, none refused; the solver-gene report's title names the solver it searched."""
    db = tmp_path / "s.db"
    tiny = [o for o in tiny_overrides(tiny_model_dir, tiny_reference, db, **{
        "search.generations": 1, "final.enabled": "false", "report.grid_size": 0, "report.dashboard": "false"})
        if not o.startswith("search.sampler=")]  # the default sampler, as the README runs it
    for i, example in enumerate(([], ["search.sampler=tpe"], ["search.solvers=[ddim,unipc]"])):
        proc = run_cli([*tiny, *example], tmp_path, tmp_path / f"run{i}")
        assert proc.returncode == 0, (example, proc.stderr[-3000:])
    names = optuna.get_all_study_names(f"sqlite:///{db}")
    assert len(names) == 3 and {n.rsplit("-", 1)[0] for n in names} == {
        "digits-ddim-k4-autodiffusion", "digits-ddim-k4-tpe", "digits-ddim+unipc-k4-autodiffusion"}, names
    best = json.loads((tmp_path / "run2" / "best_schedule.json").read_text())
    assert best["solver"] in ("ddim", "unipc") and best["study"] in names
    title = html.unescape(re.search(r"<title>(.*?)</title>", (tmp_path / "run2" / "report.html").read_text()).group(1))
    assert f"(digits, {best['solver']} chosen from ddim/unipc, K={len(best['timesteps'])})" in title, title
