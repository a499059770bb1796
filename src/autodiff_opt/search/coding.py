"""How Optuna's built-in samplers see a schedule: K fractions in [0, 1] that always decode to K distinct steps.

Stick-breaking on the "stars and bars" lattice. With y_i = t_i - (K - 1 - i), a strictly descending
K-subset t of {0..T-1} is the same thing as a non-increasing y in {0..T-K}. The fractions u_i give
z_0 = u_0, z_i = z_{i-1} u_i (so 1 >= z_0 >= z_1 >= ... >= 0) and y_i = round(z_i (T - K)).

Why this and not independent t_i with a repair: every point of [0, 1]^K is a valid schedule (no
trial is spent on a duplicate or an out-of-order step), every schedule is reachable, and the map has no
K!-fold symmetry (sorting independent steps would make K! corners of the box mean the same schedule,
which a density model such as TPE or a GP cannot know). u_i reads as "step i+1 sits at this fraction
of step i", so a good schedule is a smooth region of the box.
"""

from __future__ import annotations

import optuna

from autodiff_opt.core.genome import Genome


def fraction_param(i: int) -> str:
    return f"u{i}"


def decode(fractions: list[float], num_train_timesteps: int) -> Genome:
    """K fractions in [0, 1] -> the K distinct descending steps they stand for."""
    k, span = len(fractions), num_train_timesteps - len(fractions)
    z, steps = 1.0, []
    for i, u in enumerate(fractions):
        z *= min(max(float(u), 0.0), 1.0)
        steps.append(int(round(z * span)) + (k - 1 - i))
    return Genome(tuple(steps))


def encode(genome: Genome, num_train_timesteps: int) -> list[float]:
    """The fractions of a genome's steps (decode(encode(g)) == g for stage-1 genomes)."""
    k, span = genome.num_steps, num_train_timesteps - genome.num_steps
    ys = [t - (k - 1 - i) for i, t in enumerate(genome.timesteps)]
    out, prev = [], float(span)
    for y in ys:
        out.append(float(y) / prev if prev > 0 else 0.0)
        prev = float(y)
    return out


def suggest(trial: optuna.Trial, num_steps: int, num_train_timesteps: int) -> Genome:
    """Ask a built-in sampler for the K fractions and decode them."""
    fractions = [trial.suggest_float(fraction_param(i), 0.0, 1.0) for i in range(num_steps)]
    return decode(fractions, num_train_timesteps).validate(num_train_timesteps)


def params_of(genome: Genome, num_train_timesteps: int) -> dict[str, float]:
    """The params to enqueue a genome (a heuristic baseline) for a built-in sampler."""
    return {fraction_param(i): u for i, u in enumerate(encode(genome, num_train_timesteps))}
