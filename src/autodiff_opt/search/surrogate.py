"""A small Gaussian-process surrogate of log FID over genomes, and expected improvement to rank offspring.

Genomes are embedded as fixed-length vectors: the steps as t / (T - 1) in sampling order, in stage 2
the skipped fraction of each step's layers, and with the solver gene a one-hot code of the solver. A genome with fewer than k_max steps is padded with steps
at t = 0 that skip everything, which is what a missing step is. The GP (Matern 5/2, isotropic length
scale and noise picked from a small grid by marginal likelihood, so the fit is a pure function of the
data) models the standardised log of the objective; it is refitted for every decision, so a resumed
study decides what an uninterrupted one would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.linalg import cho_solve, solve_triangular
from scipy.special import ndtr

from autodiff_opt.core.genome import Genome

LENGTH_SCALES = (0.04, 0.08, 0.16, 0.32, 0.64)
NOISES = (1e-4, 1e-2, 1e-1)


def solver_code(solver: str | None, solvers: Sequence[str]) -> np.ndarray:
    """The solver gene as a one-hot over the solvers the study searches (search.solvers, part of the stored
    search space), not over the solver registry: registering a solver leaves a study's decisions alone.
    Empty without the gene."""
    if solver is None:
        return np.zeros(0)
    return np.array([float(name == solver) for name in sorted(solvers)])


def embed(genome: Genome, num_train_timesteps: int, k_max: int, num_layers: int | None = None,
          solvers: Sequence[str] = ()) -> np.ndarray:
    """One genome -> a vector in [0, 1]^k_max (stage 1) or [0, 1]^(2 k_max) (with skip fractions), followed
    by the solver's one-hot code over `solvers` (the searched ones) when the solver is a gene."""
    steps = np.zeros(k_max)
    steps[: genome.num_steps] = np.asarray(genome.timesteps[:k_max], dtype=float) / max(num_train_timesteps - 1, 1)
    if num_layers is None:
        return np.concatenate([steps, solver_code(genome.solver, solvers)])
    skipped = np.ones(k_max)
    skipped[: genome.num_steps] = [len(s) / num_layers for s in genome.skips[:k_max]]
    return np.concatenate([steps, skipped])


def _matern52(a: np.ndarray, b: np.ndarray, length: float) -> np.ndarray:
    d2 = np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T, 0.0)
    r = np.sqrt(5.0 * d2) / length
    return (1.0 + r + r * r / 3.0) * np.exp(-r)


def transform(values: Sequence[float]) -> np.ndarray:
    """log of positive objectives (FID spans orders of magnitude), the values as they are otherwise."""
    y = np.asarray(values, dtype=float)
    return np.log(y) if np.all(y > 0) else y


@dataclass
class GaussianProcess:
    x: np.ndarray
    alpha: np.ndarray
    chol: np.ndarray
    length: float
    mean: float
    scale: float
    best: float  # the best observed standardised value
    kernel: tuple[float, float] = (0.16, 1e-2)  # (length scale, noise) it was fitted with

    @classmethod
    def fit(cls, x: np.ndarray, values: Sequence[float], kernel: tuple[float, float] | None = None) -> "GaussianProcess":
        """Fit with the given (length scale, noise), or with the grid's most likely one."""
        y = transform(values)
        mean, scale = float(y.mean()), float(y.std()) or 1.0
        z = (y - mean) / scale
        best: tuple[float, float, np.ndarray, np.ndarray] | None = None
        for length, noise in [kernel] if kernel else [(a, b) for a in LENGTH_SCALES for b in NOISES]:
            try:
                chol = np.linalg.cholesky(_matern52(x, x, length) + noise * np.eye(len(z)))
            except np.linalg.LinAlgError:
                continue
            alpha = cho_solve((chol, True), z)
            nll = 0.5 * z @ alpha + np.log(np.diag(chol)).sum()
            if best is None or nll < best[0]:
                best = (float(nll), length, chol, alpha)
                chosen = (length, noise)
        if best is None:
            if kernel is not None:  # the cached setting no longer fits: pick again
                return cls.fit(x, values)
            raise np.linalg.LinAlgError("no kernel setting gave a positive-definite covariance")
        _, length, chol, alpha = best
        return cls(x, alpha, chol, length, mean, scale, float(z.min()), chosen)

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and standard deviation of the standardised objective."""
        ks = _matern52(x, self.x, self.length)
        mu = ks @ self.alpha
        v = solve_triangular(self.chol, ks.T, lower=True)
        var = np.maximum(1.0 - (v * v).sum(0), 1e-12)
        return mu, np.sqrt(var)

    def expected_improvement(self, x: np.ndarray) -> np.ndarray:
        mu, sd = self.predict(x)
        gap = self.best - mu
        u = gap / sd
        cdf = ndtr(u)
        pdf = np.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)
        return gap * cdf + sd * pdf
