"""Our solvers against diffusers' schedulers, and the heuristic schedules' invariants."""

from __future__ import annotations

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
    karras = heuristic_schedule("karras", 4, ab)
    assert karras[-1] == 0 and karras[0] < 999  # sigma_max capped at 80


def test_make_distinct_repairs_collisions() -> None:
    assert make_distinct([5, 5, 5], 1000) == [5, 4, 3]
    assert make_distinct([0, 0, 1], 1000) == [2, 1, 0]
    assert make_distinct([2000, 999], 1000) == [999, 998]
