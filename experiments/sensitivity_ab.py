"""A/B of stage 2's sensitivity prior: the same stage-2 search with and without search.stage2.sensitivity, at
equal search.budget (the map's image-steps are counted in it), per seed: best stage-2 and overall search FID.

    python experiments/sensitivity_ab.py --out-dir /tmp/ab [--seeds 0 1] [--arms false true] [-- overrides]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import optuna

BASE = ["+experiment=digits_deep", "search.stage2.enabled=true", "search.stage2.max_prun=0.3",
        "search.stage2.ramp_steps=1", "search.stage2.start_generation=3", "search.num_samples=500",
        "search.budget=60", "search.peers=[]", "final.enabled=false", "report.grid_size=0", "progress=false",
        "device=cpu"]


def best_by_stage(db: Path) -> dict[str, float | int | None]:
    url = f"sqlite:///{db}"
    study = optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    stage2 = [t.values[0] for t in done if t.system_attrs.get("autodiff:stage") == 2]
    return {"best": min(t.values[0] for t in done), "best_stage2": min(stage2) if stage2 else None,
            "stage2_trials": sum(t.system_attrs.get("autodiff:stage") == 2 for t in study.trials)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", default=["false", "true"], help="search.stage2.sensitivity values")
    parser.add_argument("extra", nargs="*")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for arm in args.arms:
            name = f"seed{seed}-sens{arm}"
            db = args.out_dir / f"{name}.db"
            cmd = [sys.executable, "-m", "autodiff_opt", *BASE, *args.extra, f"search.seed={seed}",
                   f"search.stage2.sensitivity={arm}", f"storage.url=sqlite:///{db}",
                   f"output_dir={args.out_dir / name}", f"hydra.run.dir={args.out_dir / name}"]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows.append({"seed": seed, "sensitivity": arm == "true", **best_by_stage(db)})
            print(json.dumps(rows[-1]), flush=True)
    (args.out_dir / "ab.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
