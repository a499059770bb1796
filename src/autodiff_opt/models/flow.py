"""Velocity-predicting rectified-flow models (x_t = (1 - t) x0 + t noise, v = noise - x0).

A folder is a flow model when its scheduler config is a ``FlowMatchEulerDiscreteScheduler`` (the
scheduler SD3, Flux and the embedded ``digits-flow`` ship). The toolkit's integer genome indexes a
grid of N = 1000 times, t_i = (i + 1) / N (see ``autodiff_opt.solvers.flow``); the network sees
``t * num_train_timesteps`` (diffusers' convention for SD3 and for UNets trained like digits-flow;
``time_scale`` says otherwise for Flux, which takes t itself).

The model's shift s (``shift_time(t) = s t / (1 + (s - 1) t)``) is read from the scheduler config,
or from its dynamic-shifting settings for the image size (Flux: s = e^mu, mu linear in the number of
latent patches). It is used by the ``flow_default`` and ``flow_shifted`` baselines only: the searched
times are the times the solver runs, and ``scheduler_for_times`` builds a scheduler that runs them
exactly (no second shift).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from autodiff_opt.models.base import DiffusionModel, EpsFn, Network, sample_of

FLOW_PREDICTION = "flow"
GRID_SIZE = 1000  # genome index i is the time t = (i + 1) / GRID_SIZE


def grid_time(index: int, num_grid: int) -> float:
    """The time t of grid index i: (i + 1) / N."""
    return (int(index) + 1) / num_grid


def grid_index(t: float, num_grid: int) -> int:
    """The nearest grid index of time t in (0, 1]."""
    return min(max(int(round(float(t) * num_grid)) - 1, 0), num_grid - 1)


def vp_alphas_cumprod(num_grid: int = GRID_SIZE) -> torch.Tensor:
    """alpha_bar(t) = (1 - t)^2 / ((1 - t)^2 + t^2) at the grid times, float64 (1 at t = 0, 0 at t = 1)."""
    t = torch.arange(1, num_grid + 1, dtype=torch.float64) / num_grid
    return (1.0 - t) ** 2 / ((1.0 - t) ** 2 + t**2)




def is_flow_scheduler(config: dict[str, Any]) -> bool:
    """A FlowMatch* scheduler config (SD3, Flux, digits-flow)."""
    return str(config.get("_class_name", "")).startswith("FlowMatch")


def model_shift(config: dict[str, Any], image_seq_len: int | None = None) -> tuple[float, bool]:
    """(shift s, dynamic) of a FlowMatch scheduler config; dynamic shifting needs the image's patch count."""
    if not config.get("use_dynamic_shifting"):
        return float(config.get("shift", 1.0)), False
    if image_seq_len is None:
        raise ValueError("this scheduler shifts by image size (use_dynamic_shifting): give image_seq_len")
    base_len, max_len = float(config.get("base_image_seq_len", 256)), float(config.get("max_image_seq_len", 4096))
    base, top = float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15))
    mu = base + (top - base) * (image_seq_len - base_len) / (max_len - base_len)
    return (math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu), True


@dataclass
class FlowModel(DiffusionModel):
    """A rectified-flow model: ``eps_fn`` returns the velocity v(x_t, t) at the grid index's time."""

    shift: float = 1.0
    dynamic_shift: bool = False
    time_scale: float = 1000.0

    def time(self, index: int) -> float:
        return grid_time(index, self.num_train_timesteps)

    def eps_fn(self, class_labels: torch.Tensor | None = None, network: Network | None = None,
               **unet_kwargs: Any) -> EpsFn:
        """The velocity v(x_t, i, step) for one batch (the name is the solver interface's; flow solvers expect v)."""
        net = self.denoiser if network is None else network

        def velocity(x_t: torch.Tensor, index: int, step_index: int) -> torch.Tensor:
            t = torch.full((x_t.shape[0],), self.time(index) * self.time_scale, device=x_t.device)
            kwargs = dict(unet_kwargs)
            if class_labels is not None:
                kwargs["class_labels"] = class_labels
            return sample_of(net(x_t, t, **kwargs)).float()

        return velocity


def flow_model_from(unet: torch.nn.Module, scheduler_config: dict[str, Any], name: str,
                    sample_shape: tuple[int, int, int], num_classes: int | None) -> FlowModel:
    """A FlowModel for a pixel-space network and its FlowMatch scheduler config (static shift)."""
    shift, dynamic = model_shift(scheduler_config, image_seq_len=sample_shape[1] * sample_shape[2])
    train_steps = int(scheduler_config.get("num_train_timesteps", GRID_SIZE))
    return FlowModel(name=name, denoiser=unet, alphas_cumprod=vp_alphas_cumprod(GRID_SIZE), prediction_type=FLOW_PREDICTION,
                     sample_shape=sample_shape, num_classes=num_classes, shift=shift, dynamic_shift=dynamic,
                     time_scale=float(train_steps))


def scheduler_for_times(scheduler_config: dict[str, Any]) -> Any:
    """A FlowMatchEulerDiscreteScheduler that runs ``set_timesteps(sigmas=times)`` exactly as given.

    diffusers shifts custom sigmas again (static ``shift`` or, with dynamic shifting, by ``mu``), and may
    stretch them to ``shift_terminal`` or convert them to Karras / exponential / beta sigmas: all of
    that is switched off here, so the searched times are applied once, as searched.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    config.update(shift=1.0, use_dynamic_shifting=False, shift_terminal=None, use_karras_sigmas=False,
                  use_exponential_sigmas=False, use_beta_sigmas=False, invert_sigmas=False, stochastic_sampling=False)
    return FlowMatchEulerDiscreteScheduler.from_config(config)

