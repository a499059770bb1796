"""autodiff-opt: training-free search of diffusion sampling time steps and per-step architectures."""

__version__ = "0.1.0"

import os as _os
from pathlib import Path as _Path

# The shipped Hydra configs (in the wheel); AUTODIFF_OPT_CONF points elsewhere. Here, below the entry points
# (cli, workers, cluster) that all compose from it, so none of them imports another for it.
CONFIG_DIR = _os.environ.get("AUTODIFF_OPT_CONF", str(_Path(__file__).resolve().parent / "conf"))
