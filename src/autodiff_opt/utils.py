"""Small shared helpers: device choice, dtypes, seeding."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

log = logging.getLogger(__name__)

_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """'auto' takes CUDA when present, else CPU; 'cuda:N' and 'cpu' are taken as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} was asked for but CUDA is not available: use device=auto or device=cpu")
    return device


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Optional bf16/fp16 autocast on CUDA; on CPU (or fp32) a no-op."""
    if precision not in _AUTOCAST_DTYPES:
        raise ValueError(f"precision={precision!r} is not one of {sorted(_AUTOCAST_DTYPES)}")
    dtype = _AUTOCAST_DTYPES[precision]
    if dtype is None or device.type != "cuda":
        yield
        return
    with torch.autocast(device_type="cuda", dtype=dtype):
        yield


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (any float dtype) to uint8 in [0, 255], on CPU."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
