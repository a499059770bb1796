"""Small shared helpers: device choice, dtypes, seeding."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

log = logging.getLogger(__name__)

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MODES = ("off", "default", "max-autotune")


def pick_device(name: str = "auto") -> torch.device:
    """'auto' takes CUDA when present, else CPU; 'cuda:N' and 'cpu' are taken as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} was asked for but CUDA is not available: use device=auto or device=cpu")
    return device


def precision_problem(precision: str, device: torch.device) -> str | None:
    """Why ``precision`` cannot run on ``device`` (one line with the fix), or None when it can."""
    if precision not in PRECISIONS:
        return f"precision={precision!r} is not one of {', '.join(PRECISIONS)}: use precision=fp32, bf16 or fp16"
    if precision == "fp16" and device.type != "cuda":
        return (f"precision=fp16 needs CUDA (this run is on {device.type}; CPU half-precision kernels are slow"
                " and partly missing): use precision=bf16 or fp32")
    return None


def compile_problem(mode: str) -> str | None:
    """Why ``compile=mode`` is refused (one line with the fix), or None."""
    if str(mode) not in COMPILE_MODES:
        return f"compile={mode!r} is not one of {', '.join(COMPILE_MODES)}: use compile=off, default or max-autotune"
    return None


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """bf16/fp16 autocast on the device (bf16 on CUDA and CPU, fp16 on CUDA); fp32 is a no-op."""
    problem = precision_problem(precision, device)
    if problem is not None:
        raise ValueError(problem)
    dtype = PRECISIONS[precision]
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (any float dtype) to uint8 in [0, 255], on CPU."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """A launcher's own arguments and, after ``--``, the Hydra overrides it passes on (blank ones dropped)."""
    if "--" not in argv:
        return list(argv), []
    cut = argv.index("--")
    return argv[:cut], [a for a in argv[cut + 1:] if a.strip()]
