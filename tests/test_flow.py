"""Rectified flows: the time grid, flow solvers against diffusers and against exact ODE solutions, the
flow heuristics against diffusers' FlowMatchEulerDiscreteScheduler, the shift applied exactly once, the
export snippet, the kind checks and the digits_flow experiment through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from cli_helpers import run_cli
from conftest import make_tiny_unet
from autodiff_opt.models.flow import FlowModel, model_shift, scheduler_for_times
from autodiff_opt.models.loading import load_model
from autodiff_opt.report.export import flow_snippet
from autodiff_opt.core.genome import Genome
from autodiff_opt.solvers import SOLVERS, nfe
from autodiff_opt.solvers.flow import (FLOW_HEURISTICS, flow_ab2_sample, flow_euler_sample, flow_heun_sample,
                                       flow_heuristic_schedule, flow_times, grid_index, grid_time, shift_time,
                                       vp_alphas_cumprod)

N = 1000
AB = vp_alphas_cumprod(N)


def save_tiny_flow_model(folder: Path, shift: float = 3.0) -> Path:
    make_tiny_unet(seed=3).save_pretrained(folder)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_flow_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_flow_model(tmp_path_factory.mktemp("tiny-flow"))


def test_grid_maps_indices_to_times_in_0_1() -> None:
    assert grid_time(999, N) == 1.0 and grid_time(0, N) == 0.001
    assert all(grid_index(grid_time(i, N), N) == i for i in range(N))
    # the VP-equivalent alpha_bar: x_t / sqrt((1-t)^2 + t^2) = sqrt(ab) x0 + sqrt(1 - ab) noise
    t = np.arange(1, N + 1) / N
    scale = np.sqrt((1 - t) ** 2 + t**2)
    np.testing.assert_allclose(np.sqrt(AB.numpy()), (1 - t) / scale, atol=1e-12)
    np.testing.assert_allclose(np.sqrt(1 - AB.numpy()), t / scale, atol=1e-12)


def test_flow_euler_matches_diffusers_flow_match_euler(tiny_flow_dir: Path) -> None:
    model = load_model(str(tiny_flow_dir))
    assert isinstance(model, FlowModel) and model.prediction_type == "flow" and model.shift == 3.0
    steps = (999, 700, 312, 41)
    x_T = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = flow_euler_sample(model.eps_fn(), x_T, steps, model.alphas_cumprod)
        scheduler = scheduler_for_times(dict(FlowMatchEulerDiscreteScheduler.load_config(tiny_flow_dir)))
        scheduler.set_timesteps(sigmas=[grid_time(i, N) for i in steps])
        x = x_T.clone()
        for t in scheduler.timesteps:
            x = scheduler.step(model.denoiser(x, t.expand(len(x))).sample, t, x).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [{"shift": 3.0}, {"use_dynamic_shifting": True, "shift": 1.0}])
def test_searched_times_are_shifted_exactly_once(config: dict) -> None:
    times = [1.0, 0.8, 0.35, 0.02]
    stock = FlowMatchEulerDiscreteScheduler(**config)
    mu = math.log(2.0) if config.get("use_dynamic_shifting") else None
    stock.set_timesteps(sigmas=times, mu=mu)
    shift = 2.0 if mu is not None else 3.0
    # diffusers' own scheduler shifts custom sigmas again: the trap this guards against
    np.testing.assert_allclose(stock.sigmas[:-1].numpy(), shift_time(np.array(times), shift), rtol=1e-6)
    exact = scheduler_for_times(dict(stock.config))
    exact.set_timesteps(sigmas=times, mu=mu)
    np.testing.assert_allclose(exact.sigmas.numpy(), [*times, 0.0], rtol=1e-7)
    np.testing.assert_allclose(exact.timesteps.numpy(), np.array(times) * 1000, rtol=1e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("k", [4, 10])
def test_flow_default_is_diffusers_default_schedule(shift: float, k: int) -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(k)
    np.testing.assert_allclose(flow_times("flow_default", k, N, shift), scheduler.sigmas[:-1].numpy(), rtol=1e-5)
    for option, name in (("use_karras_sigmas", "flow_karras"), ("use_beta_sigmas", "flow_beta")):
        other = FlowMatchEulerDiscreteScheduler(shift=shift, **{option: True})
        other.set_timesteps(k)
        np.testing.assert_allclose(flow_times(name, k, N, shift), other.sigmas[:-1].numpy(), rtol=1e-5)


def test_flow_default_with_dynamic_shift_matches_diffusers() -> None:
    config = {"use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096,
              "base_shift": 0.5, "max_shift": 1.15}
    shift, dynamic = model_shift(config, image_seq_len=1024)
    mu = 0.5 + 0.65 * (1024 - 256) / (4096 - 256)  # Flux's calculate_shift by hand
    assert dynamic and shift == pytest.approx(math.exp(mu))
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    scheduler.set_timesteps(6, mu=mu)
    np.testing.assert_allclose(flow_times("flow_default", 6, N, shift, dynamic_shift=True),
                               scheduler.sigmas[:-1].numpy(), rtol=1e-5)


def test_heuristics_by_hand() -> None:
    assert flow_heuristic_schedule("flow_uniform", 4) == [999, 749, 499, 249]
    # shift 3: 3t / (1 + 2t) at t = 1, 0.75, 0.5, 0.25 -> 1, 0.9, 0.75, 0.5
    assert flow_heuristic_schedule("flow_shifted", 4, shift=3.0) == [999, 899, 749, 499]
    # linear-quadratic, K = 4: two steps of 1/1000, then a quadratic reaching t = 0 at step 4
    lq = flow_times("flow_lq", 4)
    assert lq[:3] == pytest.approx([1.0, 0.999, 0.998])
    slope, curve = 0.001, (1 - 0.002 - 0.002) / 4
    assert lq[3] == pytest.approx(1 - (0.002 + slope + curve))
    for name in FLOW_HEURISTICS:
        for k in (1, 2, 4, 10, 50):
            steps = flow_heuristic_schedule(name, k, shift=3.0)
            assert len(steps) == k and steps == sorted(set(steps), reverse=True) and 0 <= steps[-1] and steps[0] <= 999


def _ode_error(solver, k: int) -> float:
    """dx/dt = t x from t = 1 to 0: x(0) = x(1) exp(-1/2); uniform times."""
    steps = flow_heuristic_schedule("flow_uniform", k) if 1000 % k == 0 else None
    assert steps is not None
    x1 = torch.ones(1, 1, 1, 1)
    out = solver(lambda x, i, step: grid_time(i, N) * x, x1, steps, AB)
    return abs(float(out) - math.exp(-0.5))


@pytest.mark.parametrize("solver,order", [(flow_euler_sample, 1), (flow_heun_sample, 2), (flow_ab2_sample, 2)])
def test_solver_order_on_an_exact_ode(solver, order: int) -> None:
    errors = [_ode_error(solver, k) for k in (10, 20, 40)]
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(r - order) < 0.35 for r in rates), (errors, rates)


def test_heun_counts_evaluations_and_masks_follow_the_step() -> None:
    seen: list[tuple[int, int]] = []

    def v(x: torch.Tensor, i: int, step: int) -> torch.Tensor:
        seen.append((i, step))
        return x

    flow_heun_sample(v, torch.zeros(1, 1, 2, 2), (999, 500, 100), AB)
    assert seen == [(999, 0), (500, 1), (500, 1), (100, 2), (100, 2)]
    assert nfe("flow_heun", 3) == 5 and nfe("flow_euler", 3) == 3 and nfe("flow_ab2", 3) == 3
    assert {"flow_euler", "flow_heun", "flow_ab2"} <= set(SOLVERS)


def test_clipped_euler_is_ddim_on_the_clipped_data_estimate() -> None:
    """With clipping: x_s = (1 - s) clamp(x0) + s noise_hat, noise_hat from x_t and the clipped x0."""
    x = 3 * torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    v_const = torch.randn_like(x)
    out = flow_euler_sample(lambda x_t, i, s: v_const, x, (799,), AB, clip_x0=True)
    t = 0.8
    x0 = (x - t * v_const).clamp(-1, 1)
    assert torch.allclose(out, x0, atol=1e-6)  # one step to t = 0 lands on the clipped estimate
    out2 = flow_euler_sample(lambda x_t, i, s: v_const, x, (799, 399), AB, clip_x0=True)
    noise_hat = (x - (1 - t) * x0) / t
    mid = 0.6 * x0 + 0.4 * noise_hat  # DDIM to s = 0.4 from the clipped x0
    assert torch.allclose(out2, (mid - 0.4 * v_const).clamp(-1, 1), atol=1e-5)


def test_flow_snippet_reproduces_flow_euler(tiny_flow_dir: Path) -> None:
    genome = Genome((999, 640, 233, 12))
    code = flow_snippet(genome, str(tiny_flow_dir), "flow_euler", (1, 8, 8), None, clip_x0=False)
    assert "shift=1.0" in code and "use_dynamic_shifting=False" in code
    scope: dict[str, object] = {}
    exec(compile(code, "snippet", "exec"), scope)  # noqa: S102 - our own generated code
    model = load_model(str(tiny_flow_dir))
    x_T = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = flow_euler_sample(model.eps_fn(), x_T, genome.timesteps, model.alphas_cumprod)
    torch.testing.assert_close(ours, scope["x"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_dir,solver,says", [
    ("flow", "ddim", "is a rectified flow"), ("vp", "flow_euler", "predicts noise")])
def test_solver_of_the_wrong_kind_stops_at_once(model_dir: str, solver: str, says: str, tiny_flow_dir: Path,
                                                tiny_model_dir: Path, tiny_reference: Path, tmp_path: Path) -> None:
    from cli_helpers import tiny_overrides

    folder = tiny_flow_dir if model_dir == "flow" else tiny_model_dir
    overrides = tiny_overrides(folder, tiny_reference, tmp_path / "db.sqlite", **{"solver": solver})
    proc = run_cli(overrides, tmp_path, tmp_path / "run")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert says in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "db.sqlite").exists()  # stopped before the storage was opened


def test_digits_flow_experiment_end_to_end(tmp_path: Path) -> None:
    """+experiment=digits_flow on the shipped model, tiny budget: flow baselines in the final table."""
    db = tmp_path / "db.sqlite"
    overrides = ["+experiment=digits_flow", "search.num_samples=48", "search.batch_size=48",
                 "search.sampler=autodiffusion_paper", "search.population=4", "search.generations=2",
                 "search.num_parents=2", "search.num_mutants=2", "search.num_crossovers=1", "search.init_random=1",
                 "final.num_samples=48", "final.repeats=2", f"storage.url=sqlite:///{db}", "progress=false",
                 "device=cpu", "search.baselines=[flow_uniform,flow_default,flow_beta]", "solver=flow_heun",
                 "solver.clip_x0=true"]
    proc = run_cli(overrides, tmp_path, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "run" / "best_schedule.json").read_text())
    assert doc["solver"] == "flow_heun" and "FlowMatchEulerDiscreteScheduler" in doc["diffusers_snippet"]
    names = {row["schedule"] for row in doc["final"]}
    assert {"searched", "flow_uniform", "flow_default", "flow_beta"} <= names
    rows = {row["schedule"]: row for row in doc["final"]}
    assert rows["flow_uniform"]["timesteps"] == [999, 749, 499, 249]
    assert all(math.isfinite(row["fid_final"]) for row in doc["final"])


def test_trajectory_dp_teacher_is_flow_euler_on_a_flow(tiny_flow_dir: Path) -> None:
    from autodiff_opt.generate import ImageGenerator, SampleSet
    from autodiff_opt.search.peers import _teacher, trajectory_dp

    model = load_model(str(tiny_flow_dir))
    generator = ImageGenerator(model, "flow_euler", clip_x0=True, batch_size=8)
    grid = [999, 899, 599, 299, 99]
    samples = SampleSet.draw(8, model.sample_shape, None, seed=3)
    states, _, _ = _teacher(generator, samples, grid, clip_x0=True)
    with torch.no_grad():
        expected = flow_euler_sample(model.eps_fn(), samples.noise, grid, model.alphas_cumprod, clip_x0=True)
    torch.testing.assert_close(states[-1], expected, atol=1e-5, rtol=1e-5)
    peer = trajectory_dp(generator, 3, num_samples=8, grid_size=10, seed=1)
    steps = list(peer.genome.timesteps)
    assert len(steps) == 3 and steps == sorted(set(steps), reverse=True) and peer.image_steps == 80


def test_ays_peer_is_refused_for_a_flow(tiny_flow_dir: Path, tiny_model_dir: Path) -> None:
    from autodiff_opt.preflight import check_solver_fits_model
    from autodiff_opt.core.errors import ConfigError

    with pytest.raises(ConfigError, match="ays publishes time steps of VP"):
        check_solver_fits_model("flow_euler", str(tiny_flow_dir), None, ["gits_dp", "ays"])
    check_solver_fits_model("flow_euler", str(tiny_flow_dir), None, ["gits_dp"])
    check_solver_fits_model("ddim", str(tiny_model_dir), None, ["gits_dp", "ays"])
    with pytest.raises(ConfigError, match="integrates rectified flows"):
        check_solver_fits_model("flow_heun", "builtin:digits-ddpm")


def test_shipped_digits_flow_asset(tmp_path: Path) -> None:
    """builtin:digits-flow: the digits DDPM's UNet predicting velocity, < 1 MB, and more steps give a lower FID."""
    from autodiff_opt.generate import ImageGenerator, SampleSet
    from autodiff_opt.metrics.fid import FIDScorer
    from autodiff_opt.metrics.reference import reference_statistics
    from autodiff_opt.models.sources import ASSETS_DIR
    from autodiff_opt.search.objective import evaluate

    folder = ASSETS_DIR / "digits-flow"
    assert sum(p.stat().st_size for p in folder.iterdir()) < 1_000_000
    ddpm = json.loads((ASSETS_DIR / "digits-ddpm" / "config.json").read_text())
    flow = json.loads((folder / "config.json").read_text())
    assert {k: v for k, v in flow.items() if not k.startswith("_")} == {k: v for k, v in ddpm.items() if not k.startswith("_")}
    model = load_model("builtin:digits-flow")
    assert isinstance(model, FlowModel) and model.shift == 1.0 and model.sample_shape == (1, 8, 8)
    scorer = FIDScorer("digits-cnn", None, None, device=torch.device("cpu"), batch_size=400)
    reference = reference_statistics("builtin:digits-train", scorer, tmp_path, None)
    generator = ImageGenerator(model, "flow_euler", True, 400)
    samples = SampleSet.draw(400, model.sample_shape, None, seed=11)
    fids = [evaluate(generator, scorer, reference, samples, Genome(tuple(flow_heuristic_schedule("flow_uniform", k))))["fid"]
            for k in (2, 10)]
    assert fids[1] < fids[0]


@pytest.mark.slow
def test_train_digits_flow_smoke_writes_a_loadable_flow(tmp_path: Path) -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "experiments" / "train_digits_flow.py"), "--smoke", "--shift", "2.5",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = load_model(str(tmp_path / "digits-flow"))
    assert isinstance(model, FlowModel) and model.shift == 2.5
    with torch.no_grad():
        out = flow_euler_sample(model.eps_fn(), torch.randn(2, 1, 8, 8), (999, 499), model.alphas_cumprod)
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
