"""Batched, seeded generation of images for a genome: the same noise and labels for every candidate."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from autodiff_opt.models.base import DiffusionModel, EpsFn, StepWrapper
from autodiff_opt.core.genome import Genome
from autodiff_opt.solvers.flow import check_solver
from autodiff_opt.solvers import get_solver, nfe
from autodiff_opt.utils import autocast, to_uint8

log = logging.getLogger(__name__)

class NonFiniteSamples(RuntimeError):
    """The solver produced NaN or inf: the candidate is broken, not the study."""


@dataclass(frozen=True)
class SampleSet:
    """Initial noise x_T and class labels for N samples, drawn once from one seed (common random numbers)."""

    noise: torch.Tensor
    class_labels: torch.Tensor | None
    seed: int

    def __len__(self) -> int:
        return int(self.noise.shape[0])

    def slice(self, start: int, stop: int) -> "SampleSet":
        """Samples start..stop-1 (a prefix for multi-fidelity scoring keeps the same noise and labels)."""
        labels = self.class_labels[start:stop] if self.class_labels is not None else None
        return SampleSet(self.noise[start:stop], labels, self.seed)

    @classmethod
    def draw(cls, num_samples: int, sample_shape: tuple[int, ...], num_classes: int | None, seed: int) -> "SampleSet":
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn((num_samples, *sample_shape), generator=gen)
        labels = torch.randint(0, num_classes, (num_samples,), generator=gen) if num_classes else None
        return cls(noise, labels, seed)


class ImageGenerator:
    """Runs a solver over a SampleSet in batches on one device and returns uint8 images."""

    def __init__(
        self,
        model: DiffusionModel,
        solver: str = "ddim",
        clip_x0: bool = True,
        batch_size: int = 500,
        precision: str = "fp32",
        step_wrapper: StepWrapper | None = None,
    ) -> None:
        self.model = model
        check_solver(solver, model)
        self.solver_name = solver
        self.solver = get_solver(solver)
        self.clip_x0 = clip_x0
        self.batch_size = batch_size
        self.precision = precision
        self.step_wrapper = step_wrapper

    @property
    def device(self) -> torch.device:
        return self.model.device

    def solver_of(self, genome: Genome) -> str:
        """The genome's solver gene, or the configured solver."""
        return genome.solver or self.solver_name

    def nfe(self, genome: Genome) -> int:
        """Network evaluations one sample of this genome costs."""
        return nfe(self.solver_of(genome), genome.num_steps)

    def eps_for(self, genome: Genome, labels: torch.Tensor | None) -> EpsFn:
        """The batch's eps function for this genome (labels bound; per-step skipping, guidance applied)."""
        eps_fn = self.model.eps_fn(class_labels=labels.to(self.device) if labels is not None else None)
        return self.step_wrapper(eps_fn, genome) if self.step_wrapper is not None else eps_fn

    def _batch(self, genome: Genome, noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        eps_fn = self.eps_for(genome, labels)
        with torch.no_grad(), autocast(self.device, self.precision):  # no_grad: guidance re-enables grad inside
            solver = get_solver(genome.solver) if genome.solver else self.solver
            x0 = solver(eps_fn, noise.to(self.device), genome.timesteps, self.model.alphas_cumprod,
                             clip_x0=self.clip_x0)
            x0 = self.model.to_images(x0)
        if not torch.isfinite(x0).all():
            bad = int((~torch.isfinite(x0)).flatten(1).any(1).sum())
            raise NonFiniteSamples(f"{bad} of {len(x0)} samples contain NaN/inf for time steps {list(genome.timesteps)}")
        return to_uint8(x0)

    def generate(self, genome: Genome, samples: SampleSet, progress: bool = False) -> torch.Tensor:
        """uint8 images (N, C, H, W) for the genome; halves the batch on CUDA out-of-memory and retries."""
        out: list[torch.Tensor] = []
        start, initial = 0, self.batch_size
        bar = tqdm(total=len(samples), desc="sampling", unit="img", disable=not progress, leave=False)
        while start < len(samples):
            stop = min(start + self.batch_size, len(samples))
            labels = samples.class_labels[start:stop] if samples.class_labels is not None else None
            try:
                out.append(self._batch(genome, samples.noise[start:stop], labels))
            except torch.cuda.OutOfMemoryError:
                if self.batch_size == 1:  # this candidate cannot run; the next one starts at the full batch
                    self.batch_size = initial
                    raise
                self.batch_size = max(1, self.batch_size // 2)
                log.warning("CUDA out of memory: batch size halved to %d", self.batch_size)
                torch.cuda.empty_cache()
                continue
            bar.update(stop - start)
            start = stop
        bar.close()
        return torch.cat(out)
