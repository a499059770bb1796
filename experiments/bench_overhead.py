"""Per-candidate overhead of the search machinery: sampler + storage + callbacks, as the CLI wires them.

Each trial records the seconds it spent generating and scoring images; everything else in the wall
time of ``study.optimize`` is overhead: the sampler's decision, the study lock, storage reads and
writes (the objective's attribute writes included), heartbeats and the progress/budget callbacks. Reported per candidate and as a share of the objective.

    python experiments/bench_overhead.py [--candidates 60] [--samplers autodiffusion,autodiffusion_paper]
        [--storages sqlite,memory] [-- OVERRIDES...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import torch


def _compose(overrides: list[str], out: Path) -> Any:
    from autodiff_opt.cli import compose_config

    return compose_config([*overrides, f"output_dir={out}", "progress=false"])


def measure(exp: Any, sampler_name: str, storage: str, candidates: int, tmp: Path) -> dict[str, float]:
    from omegaconf import OmegaConf

    from autodiff_opt.preflight import open_storage
    from autodiff_opt import runner
    from autodiff_opt.search.fidelity import make_pruner
    from autodiff_opt.search.progress import Progress
    from autodiff_opt.search.sampler_choice import resolve
    from autodiff_opt.search.study import open_study
    from autodiff_opt.config import as_tree, to_config

    cfg = as_tree(exp.cfg)  # a DictConfig copy of the typed config, to update
    OmegaConf.update(cfg, "search.sampler", sampler_name)
    OmegaConf.update(cfg, "search.budget", candidates)
    OmegaConf.update(cfg, "storage.url", f"sqlite:///{tmp / (sampler_name + '.db')}" if storage == "sqlite" else "sqlite:///:memory:")
    exp.cfg, exp.setup = to_config(cfg), resolve(cfg.search)
    store = open_storage(exp.cfg.storage) if storage == "sqlite" else optuna.storages.InMemoryStorage()
    study = open_study(store, f"bench-{sampler_name}", runner.study_signature(cfg, exp.space), runner.make_sampler(exp),
                       pruner=make_pruner(exp.setup.prune, exp.setup.evolution.num_parents))
    exp.peers = {}
    runner.seed_study(study, exp)
    objective = runner.make_objective(exp)
    budget = runner._stop_rule(study, exp)
    progress = Progress(budget, 0.0, 10, False)
    statements = _count_statements(store)
    t0 = time.perf_counter()
    study.optimize(objective, callbacks=[progress], catch=(Exception,), gc_after_trial=False)
    wall = time.perf_counter() - t0
    trials = study.get_trials(deepcopy=False)
    work = sum(t.user_attrs.get("gen_seconds", 0.0) + t.user_attrs.get("fid_seconds", 0.0) for t in trials)
    return {"trials": len(trials), "objective_s": work / len(trials), "overhead_s": (wall - work) / len(trials),
            "share": (wall - work) / work, "statements": statements[0] / len(trials), "commits": statements[1] / len(trials)}


def _count_statements(storage: Any) -> list[int]:
    """[SQL statements, commits] executed on an RDB storage from now on (stays [0, 0] in memory)."""
    import sqlalchemy

    from autodiff_opt.search.storage_compat import unwrap_storage

    counts = [0, 0]
    engine = getattr(unwrap_storage(storage), "engine", None)
    if engine is not None:
        sqlalchemy.event.listen(engine, "before_cursor_execute", lambda *_a: counts.__setitem__(0, counts[0] + 1))
        sqlalchemy.event.listen(engine, "commit", lambda *_a: counts.__setitem__(1, counts[1] + 1))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=float, default=60)
    parser.add_argument("--samplers", default="autodiffusion,autodiffusion_paper,tpe")
    parser.add_argument("--storages", default="sqlite,memory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    from autodiff_opt.runner import build_experiment

    with tempfile.TemporaryDirectory() as tmp:
        exp = build_experiment(_compose(args.overrides, Path(tmp)))
        print(f"{'sampler':22} {'storage':8} {'trials':>6} {'objective s':>12} {'overhead s':>11} {'share':>7}"
              f" {'SQL/trial':>9} {'commits':>7}")
        for name in args.samplers.split(","):
            for storage in args.storages.split(","):
                r = measure(exp, name, storage, int(args.candidates), Path(tmp))
                print(f"{name:22} {storage:8} {r['trials']:>6} {r['objective_s']:>12.3f} {r['overhead_s']:>11.4f}"
                      f" {r['share']:>7.1%} {r['statements']:>9.1f} {r['commits']:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
