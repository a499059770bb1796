"""autodiff-opt: training-free search of diffusion sampling time steps and per-step architectures."""

__version__ = "0.1.0"
