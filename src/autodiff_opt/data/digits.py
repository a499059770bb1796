"""scikit-learn's handwritten digits (1,797 real 8x8 grayscale images) with a fixed split.

The split is fixed and documented in ``docs/digits.md``: 20% of the images are held out,
stratified by label, with ``sklearn.model_selection.train_test_split(random_state=0)``.
That gives 1,437 training and 360 held-out images.

Images are returned as ``uint8`` tensors of shape ``(N, 1, 8, 8)``; scikit-learn's 0..16 ink
values are mapped to 0..255 with ``round(v * 255 / 16)``. Model space is ``[-1, 1]``.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Literal

import numpy as np
import torch

logger = logging.getLogger(__name__)

Split = Literal["train", "heldout", "all"]

HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0
IMAGE_SIZE = 8
NUM_CLASSES = 10
SKLEARN_MAX_VALUE = 16.0


@lru_cache(maxsize=1)
def _load_all_numpy() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / SKLEARN_MAX_VALUE)).clip(0, 255).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    return images, labels


@lru_cache(maxsize=1)
def _split_indices() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    _, labels = _load_all_numpy()
    train_idx, heldout_idx = train_test_split(
        np.arange(len(labels)),
        test_size=HELDOUT_FRACTION,
        stratify=labels,
        random_state=SPLIT_SEED,
    )
    return np.sort(train_idx), np.sort(heldout_idx)


def load_digits_images(split: Split = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)``: uint8 ``(N, 1, 8, 8)`` in 0..255 and int64 ``(N,)`` labels."""
    images, labels = _load_all_numpy()
    if split == "all":
        idx = np.arange(len(labels))
    elif split == "train":
        idx = _split_indices()[0]
    elif split == "heldout":
        idx = _split_indices()[1]
    else:
        raise ValueError(f"unknown split {split!r}; expected 'train', 'heldout' or 'all'")
    x = torch.from_numpy(images[idx].copy()).unsqueeze(1)
    y = torch.from_numpy(labels[idx].copy())
    logger.debug("digits split %s: %d images", split, len(y))
    return x, y


def uint8_to_model(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 images in 0..255 to float32 model space [-1, 1]."""
    return images.to(torch.float32) / 127.5 - 1.0


def model_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Map model-space images (nominally [-1, 1]) to uint8 0..255, clipping out-of-range values."""
    return ((x.detach().to(torch.float32).clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


class UInt8ImageDataset(torch.utils.data.Dataset):
    """A ``Dataset`` of uint8 ``(C, H, W)`` tensors, the input torch-fidelity expects."""

    def __init__(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
        self.images = images.cpu()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]
