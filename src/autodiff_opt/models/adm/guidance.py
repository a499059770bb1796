"""Classifier guidance for eps-prediction solvers (Dhariwal & Nichol 2021, as ADM's DDIM applies it).

    eps_guided(x_t, t) = eps(x_t, t) - sqrt(1 - alpha_bar_t) * s * grad_x log p(y | x_t, t)

The wrapper keeps the solvers' signature ``eps_fn(x_t, t, step_index)``; the class labels of the
batch are bound when the wrapper is made, like the labels of a class-conditional eps_fn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from autodiff_opt.models.base import EpsFn

Classifier = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t[B]) -> logits [B, classes]


def grad_log_prob(classifier: Classifier, x_t: torch.Tensor, t: int, class_labels: torch.Tensor) -> torch.Tensor:
    """grad_x log p(y | x_t, t), summed over the batch's own labels; works under no_grad / inference_mode."""
    with torch.inference_mode(False), torch.enable_grad():
        x_in = x_t.detach().clone().requires_grad_(True)  # clone: inference tensors cannot enter autograd
        labels = class_labels.detach().clone().to(device=x_t.device, dtype=torch.long).reshape(-1, 1)
        t_batch = torch.full((x_t.shape[0],), int(t), device=x_t.device, dtype=torch.long)
        log_probs = F.log_softmax(classifier(x_in, t_batch).float(), dim=-1)
        selected = log_probs.gather(1, labels).sum()
        (grad,) = torch.autograd.grad(selected, x_in)
    return grad.detach()


@dataclass
class ClassifierGuidance:
    """Guidance settings shared by every batch: the classifier, alpha_bar (float64, length T) and scale s."""

    classifier: Classifier
    alphas_cumprod: torch.Tensor
    scale: float = 1.0

    def __post_init__(self) -> None:
        self.alphas_cumprod = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64).cpu()
        if isinstance(self.classifier, torch.nn.Module) and any(
                torch.is_inference(p) for p in self.classifier.parameters()):
            raise ValueError("the classifier's parameters were created under torch.inference_mode and cannot"
                             " enter autograd: load the classifier outside inference_mode (no_grad is fine)")

    def guided_eps(self, eps: torch.Tensor, x_t: torch.Tensor, t: int, class_labels: torch.Tensor) -> torch.Tensor:
        """eps - sqrt(1 - alpha_bar_t) * s * grad log p(y | x_t, t)."""
        if self.scale == 0:
            return eps
        sigma_t = float((1.0 - self.alphas_cumprod[int(t)]).sqrt())
        grad = grad_log_prob(self.classifier, x_t, t, class_labels)
        return eps - (sigma_t * self.scale) * grad.to(eps.dtype)

    def wrap(self, eps_fn: EpsFn, class_labels: torch.Tensor) -> EpsFn:
        """A guided eps_fn(x_t, t, step_index) for one sample batch with the given labels."""
        labels = class_labels.detach().clone().long()

        def guided(x_t: torch.Tensor, t: int, step_index: int) -> torch.Tensor:
            if labels.shape[0] != x_t.shape[0]:
                raise ValueError(f"{labels.shape[0]} class labels for a batch of {x_t.shape[0]} samples")
            return self.guided_eps(eps_fn(x_t, t, step_index), x_t, t, labels)

        return guided


def classifier_guidance(
    eps_fn: EpsFn,
    classifier: Classifier,
    alphas_cumprod: torch.Tensor,
    class_labels: torch.Tensor,
    scale: float = 1.0,
) -> EpsFn:
    """Wrap eps_fn with classifier guidance toward class_labels (one label per sample of the batch)."""
    return ClassifierGuidance(classifier, alphas_cumprod, scale).wrap(eps_fn, class_labels)
