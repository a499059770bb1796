"""Batched, seeded generation of images for a genome: the same noise and labels for every candidate."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from autodiff_opt.core.errors import ConfigError
from autodiff_opt.core.genome import Genome
from autodiff_opt.arch.layers import SkipUnits
from autodiff_opt.arch.runtime import DenoiserRuntime, RuntimeSettings, build_runtime
from autodiff_opt.models.base import DiffusionModel, EpsFn, StepWrapper
from autodiff_opt.solvers.flow import check_solver
from autodiff_opt.solvers import get_solver, nfe
from autodiff_opt.utils import autocast, precision_problem, to_uint8

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


CPU_AUTO_BATCH = 256  # batch_size="auto" off CUDA
AUTO_MAX_BATCH = 1024  # batch_size="auto" never goes above this
AUTO_MEMORY_FRACTION = 0.7  # of the free CUDA memory; compile, CUDA graphs and the features need the rest
AUTO_PROBES = (8, 32)  # batch sizes of the two probing network evaluations


def pad_batch(noise: torch.Tensor, labels: torch.Tensor | None, size: int
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows appended to reach ``size``, copies of the first row: the UNet treats every sample on its own
    (group norm, per-sample attention), so the padding changes no real row; callers drop it."""
    missing = size - int(noise.shape[0])
    if missing <= 0:
        return noise, labels
    noise = torch.cat([noise, noise[:1].expand(missing, *noise.shape[1:])])
    if labels is not None:
        labels = torch.cat([labels, labels[:1].expand(missing)])
    return noise, labels


class ImageGenerator:
    """Runs a solver over a SampleSet in batches on one device and returns uint8 images.

    ``batch_size="auto"`` sizes the batch from free CUDA memory (``auto_batch_size``), CPU_AUTO_BATCH off
    CUDA. The generator builds the model's ``DenoiserRuntime`` (``runtime``, arch/runtime.py): the layer
    skipper of ``units`` that applies a genome's per-step masks, and ``compile`` (off | default |
    max-autotune) once (arch/compiled.py: ``compile_scope`` "layers", each skippable layer, masks switch
    without recompiling; "unet", the whole network, for studies without masks); then every batch has the
    same shape: the last one is padded (``pad``, default: on when compiled) and the padding dropped, so
    nothing compiles again for it. ``step_wrapper`` wraps each batch's eps function once more (a cache
    baseline's, ``wrapped``), outside the masks.
    """

    def __init__(
        self,
        model: DiffusionModel,
        solver: str = "ddim",
        clip_x0: bool = True,
        batch_size: int | str = 500,
        precision: str = "fp32",
        step_wrapper: StepWrapper | None = None,
        compile: str = "off",
        cuda_graphs: bool = True,
        pad: bool | None = None,
        compile_backend: str = "inductor",
        compile_scope: str = "layers",
        units: SkipUnits = "blocks",
    ) -> None:
        problem = precision_problem(precision, model.device)
        if problem is not None:
            raise ConfigError(problem)
        self.model = model
        check_solver(solver, model)
        self.solver_name = solver
        self.solver = get_solver(solver)
        self.clip_x0 = clip_x0
        self.precision = precision
        self.step_wrapper = step_wrapper
        self.batch_size = auto_batch_size(self) if batch_size == "auto" else int(batch_size)  # probed eagerly
        self.runtime: DenoiserRuntime = build_runtime(model, RuntimeSettings(
            units=units, compile=compile, cuda_graphs=cuda_graphs, backend=compile_backend, scope=compile_scope))
        self.pad = self.runtime.compiled.mode is not None if pad is None else bool(pad)

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
        """The batch's eps function for this genome (labels bound; the genome's per-step masks, guidance and
        the step wrapper applied)."""
        eps_fn = self.runtime.masked(self.runtime.eps_fn(labels.to(self.device) if labels is not None else None),
                                     genome)
        return self.step_wrapper(eps_fn, genome) if self.step_wrapper is not None else eps_fn

    def padded(self, noise: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch padded to ``batch_size`` when this generator pads (static shapes), else as given."""
        return pad_batch(noise, labels, self.batch_size) if self.pad else (noise, labels)

    def denoise(self, genome: Genome, noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The solver's final samples (pixels or latents, not decoded) for one batch."""
        eps_fn = self.eps_for(genome, labels)
        with torch.no_grad(), autocast(self.device, self.precision):  # no_grad: guidance re-enables grad inside
            solver = get_solver(genome.solver) if genome.solver else self.solver
            return solver(eps_fn, noise.to(self.device), genome.timesteps, self.model.alphas_cumprod,
                          clip_x0=self.clip_x0)

    @contextmanager
    def wrapped(self, step_wrapper: StepWrapper) -> Iterator["ImageGenerator"]:
        """Another step wrapper (a cache baseline's) inside the block."""
        previous, self.step_wrapper = self.step_wrapper, step_wrapper
        try:
            yield self
        finally:
            self.step_wrapper = previous

    def _batch(self, genome: Genome, noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        n = int(noise.shape[0])
        noise, labels = self.padded(noise, labels)
        x0 = self.denoise(genome, noise, labels)
        with torch.no_grad(), autocast(self.device, self.precision):
            x0 = self.model.to_images(x0[:n])
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
                log.warning("CUDA out of memory: batch size halved to %d%s", self.batch_size,
                            " (a new static shape: the layers compile once more)" if self.pad else "")
                torch.cuda.empty_cache()
                continue
            bar.update(stop - start)
            start = stop
        bar.close()
        return torch.cat(out)


def _probe_peak(generator: ImageGenerator, batch: int) -> int:
    """Peak CUDA bytes above the current allocation of one eager network evaluation at ``batch``."""
    model, device = generator.model, generator.device
    num_classes = model.num_classes
    labels = torch.zeros(batch, dtype=torch.long) if num_classes else None
    x = torch.randn((batch, *model.sample_shape), device=device)
    t = model.num_train_timesteps // 2
    eps_fn = model.eps_fn(labels.to(device) if labels is not None else None)  # the plain network: nothing compiles
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.no_grad(), autocast(device, generator.precision):
        eps_fn(x, t, 0)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def auto_batch_size(generator: ImageGenerator) -> int:
    """The batch that fills AUTO_MEMORY_FRACTION of the free CUDA memory, from two probing evaluations
    (peak = fixed + per_sample x batch), rounded down to a multiple of 8, in [1, AUTO_MAX_BATCH];
    CPU_AUTO_BATCH off CUDA. The OOM fallback of ``generate`` still halves it if the estimate is off."""
    device = generator.device
    if device.type != "cuda":
        return CPU_AUTO_BATCH
    small, large = AUTO_PROBES
    peak_small, peak_large = _probe_peak(generator, small), _probe_peak(generator, large)
    per_sample = max(1.0, (peak_large - peak_small) / (large - small))
    fixed = max(0.0, peak_small - small * per_sample)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    batch = int((AUTO_MEMORY_FRACTION * free - fixed) / per_sample)
    batch = max(1, min(AUTO_MAX_BATCH, batch - batch % 8 if batch >= 8 else batch))
    log.info("batch_size=auto: %d (%.1f MiB per sample, %.0f MiB free on %s)", batch, per_sample / 2**20,
             free / 2**20, device)
    return batch
