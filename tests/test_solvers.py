"""Our solvers against diffusers' schedulers, and the heuristic schedules' invariants."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from autodiff_opt.solvers import HEURISTICS, ddim_sample, dpmpp_2m_sample, heuristic_schedule
from autodiff_opt.solvers.schedules import make_distinct


def _alphas_cumprod(beta_schedule: str) -> torch.Tensor:
    return torch.cumprod(1 - DDPMScheduler(beta_schedule=beta_schedule).betas.double(), 0)


class ToyEps(torch.nn.Module):
    """A smooth, t-dependent noise predictor so every step matters."""

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return torch.tanh(0.7 * x + 0.001 * t) * 0.9 + 0.05 * x.roll(1, dims=-1)


def _reference_loop(scheduler, x: torch.Tensor, net: ToyEps, **step_kwargs) -> torch.Tensor:
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, int(t)), t, x, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("k", [1, 4, 10])
def test_ddim_matches_diffusers_on_uniform_steps(beta_schedule: str, k: int) -> None:
    scheduler = DDIMScheduler(beta_schedule=beta_schedule, clip_sample=True, set_alpha_to_one=True,
                              timestep_spacing="leading", steps_offset=0)
    scheduler.set_timesteps(k)
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    net = ToyEps()
    ours = ddim_sample(lambda x, t, i: net(x, t), x_T, scheduler.timesteps.tolist(), _alphas_cumprod(beta_schedule))
    theirs = _reference_loop(scheduler, x_T.clone(), net, eta=0.0, use_clipped_model_output=True)
    assert scheduler.timesteps.tolist() == heuristic_schedule("ddim_uniform", k, _alphas_cumprod(beta_schedule))
    torch.testing.assert_close(ours, theirs.float(), atol=2e-5, rtol=1e-4)


def test_ddim_without_clipping_differs_and_ends_at_x0() -> None:
    ab = _alphas_cumprod("linear")
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 3
    const_eps = lambda x, t, i: torch.zeros_like(x)  # noqa: E731
    out = ddim_sample(const_eps, x_T, [500], ab, clip_x0=False)
    torch.testing.assert_close(out, x_T / ab[500].sqrt().float())
    clipped = ddim_sample(const_eps, x_T, [500], ab, clip_x0=True)
    assert clipped.abs().max() <= 1.0 and not torch.allclose(out, clipped)


@pytest.mark.parametrize("timesteps", [[999, 749, 499, 249], [930, 641, 219, 17, 3], [600, 20]])
def test_dpmpp_2m_matches_diffusers_on_custom_steps(timesteps: list[int]) -> None:
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2,
                                            final_sigmas_type="zero", lower_order_final=True)
    scheduler.set_timesteps(timesteps=timesteps)
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    net = ToyEps()
    ours = dpmpp_2m_sample(lambda x, t, i: net(x, t), x_T, timesteps, _alphas_cumprod("linear"))
    theirs = _reference_loop(scheduler, x_T.clone(), net)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=1e-3)


def test_solvers_pass_step_index_and_original_t() -> None:
    seen: list[tuple[int, int]] = []

    def eps(x: torch.Tensor, t: int, i: int) -> torch.Tensor:
        seen.append((t, i))
        return torch.zeros_like(x)

    ab = _alphas_cumprod("linear")
    for solver in (ddim_sample, dpmpp_2m_sample):
        seen.clear()
        solver(eps, torch.zeros(1, 1, 2, 2), [900, 333, 7], ab)
        assert seen == [(900, 0), (333, 1), (7, 2)]


@pytest.mark.parametrize("name", sorted(HEURISTICS))
@pytest.mark.parametrize("k", [1, 2, 4, 10, 50])
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_heuristics_are_distinct_descending_in_range(name: str, k: int, beta_schedule: str) -> None:
    steps = heuristic_schedule(name, k, _alphas_cumprod(beta_schedule))
    assert len(steps) == k
    assert all(0 <= t < 1000 for t in steps)
    assert all(a > b for a, b in zip(steps, steps[1:]))


def test_known_heuristic_values() -> None:
    ab = _alphas_cumprod("linear")
    assert heuristic_schedule("ddim_uniform", 4, ab) == [750, 500, 250, 0]
    assert heuristic_schedule("trailing", 4, ab) == [999, 749, 499, 249]
    assert heuristic_schedule("quadratic", 4, ab) == [800, 356, 89, 0]


def _nearest_by_bisection(curve: list[float], target: float) -> int:
    """Index of the entry of an increasing curve closest to target (ties to the lower index)."""
    import bisect

    i = bisect.bisect_left(curve, target)
    if i == 0:
        return 0
    if i == len(curve):
        return len(curve) - 1
    return i if curve[i] - target < target - curve[i - 1] else i - 1


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("k", [2, 4, 10])
def test_karras_steps_follow_the_edm_formula(beta_schedule: str, k: int) -> None:
    """Karras et al. (2022) eq. 5: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, rho = 7,
    with smax = min(sigma(T-1), 80) and smin = sigma(0), each mapped to the training step of nearest sigma."""
    betas = DDPMScheduler(beta_schedule=beta_schedule).betas.double().tolist()
    alpha_bar, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        alpha_bar.append(prod)
    sigma = [math.sqrt((1 - a) / a) for a in alpha_bar]
    rho, smin, smax = 7.0, sigma[0], min(sigma[-1], 80.0)
    targets = [(smax ** (1 / rho) + i / (k - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho for i in range(k)]
    expected = [_nearest_by_bisection(sigma, s) for s in targets]
    assert heuristic_schedule("karras", k, _alphas_cumprod(beta_schedule)) == expected
    assert expected[-1] == 0 and expected[0] < 999  # sigma_max capped at 80 (the linear schedule reaches 157)


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("k", [2, 4, 10])
def test_logsnr_steps_are_uniform_in_log_snr(beta_schedule: str, k: int) -> None:
    """lambda = log(alpha_bar / (1 - alpha_bar)); K points lambda_min + i (lambda(0) - lambda_min) / K, i < K,
    lambda_min = max(lambda(T-1), -2 log 80), each at the step of nearest lambda."""
    betas = DDPMScheduler(beta_schedule=beta_schedule).betas.double().tolist()
    prod, neg_lam = 1.0, []
    for b in betas:
        prod *= 1.0 - b
        neg_lam.append(-math.log(prod / (1 - prod)))  # increasing in t
    lam_min, lam_max = max(-neg_lam[-1], -2 * math.log(80.0)), -neg_lam[0]
    grid = [lam_min + i * (lam_max - lam_min) / k for i in range(k)]
    expected = [_nearest_by_bisection(neg_lam, -g) for g in grid]
    assert heuristic_schedule("logsnr", k, _alphas_cumprod(beta_schedule)) == expected


def test_make_distinct_repairs_collisions() -> None:
    assert make_distinct([5, 5, 5], 1000) == [5, 4, 3]
    assert make_distinct([0, 0, 1], 1000) == [2, 1, 0]
    assert make_distinct([2000, 999], 1000) == [999, 998]
