"""A small CNN classifier of 8x8 digits whose penultimate layer is the project's FID feature space.

``DigitsCNN`` is trained by ``experiments/train_digits.py`` on the training split of
:mod:`autodiff_opt.data.digits`; its weights ship in ``autodiff_opt/assets/digits-cnn/``.
``FeatureExtractorDigitsCNN`` exposes it to torch-fidelity under the name ``"digits-cnn"``:

    register_digits_cnn()
    torch_fidelity.calculate_metrics(input1=ds1, input2=ds2, fid=True, cuda=torch.cuda.is_available(),
                                     feature_extractor=DIGITS_CNN_NAME,
                                     feature_layer_fid=DIGITS_CNN_FEATURE_LAYER)

Inputs are uint8 ``(N, 1, 8, 8)`` images in 0..255 (three identical RGB channels are also
accepted and averaged; other sizes are area-resampled to 8x8).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

logger = logging.getLogger(__name__)

DIGITS_CNN_NAME = "digits-cnn"
DIGITS_CNN_FEATURE_LAYER = "digits-cnn-features"
DIGITS_CNN_LOGITS_LAYER = "digits-cnn-logits"
DIGITS_CNN_FEATURE_DIM = 64
WEIGHTS_FILENAME = "model.safetensors"
CONFIG_FILENAME = "config.json"
IMAGE_SIZE = 8


@dataclass(frozen=True)
class DigitsCNNConfig:
    """Architecture of :class:`DigitsCNN`; stored as ``config.json`` next to the weights."""

    width: int = 32
    feature_dim: int = DIGITS_CNN_FEATURE_DIM
    num_classes: int = 10
    dropout: float = 0.3


def default_assets_dir() -> Path:
    """The shipped ``digits-cnn`` asset folder inside the installed package."""
    return Path(str(resources.files("autodiff_opt") / "assets" / "digits-cnn"))


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class DigitsCNN(nn.Module):
    """Two conv stages (8x8 -> 4x4 -> 2x2), a ``feature_dim`` ReLU layer (the FID features), a linear head.

    ``forward`` takes uint8 images in 0..255 or float images in model space [-1, 1].
    """

    def __init__(self, config: DigitsCNNConfig | None = None) -> None:
        super().__init__()
        self.config = config or DigitsCNNConfig()
        w = self.config.width
        self.trunk = nn.Sequential(_conv_block(1, w), _conv_block(w, 2 * w), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(2 * w * 4, self.config.feature_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(self.config.dropout)
        self.head = nn.Linear(self.config.feature_dim, self.config.num_classes)

    @staticmethod
    def to_model_space(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 0..255 -> [-1, 1]; floats are taken to be in [-1, 1] already."""
        if x.dtype == torch.uint8:
            return x.to(dtype) / 127.5 - 1.0
        return x.to(dtype)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features, ``(N, feature_dim)``."""
        dtype = self.head.weight.dtype
        return self.embed(self.trunk(self.to_model_space(x, dtype)))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(x)
        return feats, self.head(self.dropout(feats))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]


def save_digits_cnn(model: DigitsCNN, out_dir: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILENAME).write_text(json.dumps(asdict(model.config), indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILENAME), metadata={"format": "pt", "model": DIGITS_CNN_NAME})
    return out


def _resolve_paths(path: str | Path | None) -> tuple[Path, Path]:
    """(config path, weights path) from a folder, a weights file, or None for the shipped assets."""
    p = default_assets_dir() if path is None else Path(path)
    if p.is_dir():
        return p / CONFIG_FILENAME, p / WEIGHTS_FILENAME
    return p.with_name(CONFIG_FILENAME), p


def _load_state_dict(weights_path: Path) -> dict[str, torch.Tensor]:
    if weights_path.suffix == ".safetensors":
        return load_file(str(weights_path), device="cpu")
    return torch.load(weights_path, map_location="cpu", weights_only=True)


def load_digits_cnn(path: str | Path | None = None, device: str | torch.device = "cpu") -> DigitsCNN:
    """Load a trained classifier (eval mode) from an asset folder, a ``.safetensors`` file, or a
    plain state-dict file (``torch.load(weights_only=True)``); the architecture comes from the
    ``config.json`` beside the weights, or the default config when there is none."""
    config_path, weights_path = _resolve_paths(path)
    if not weights_path.is_file():
        raise FileNotFoundError(f"digits-cnn weights not found: {weights_path}")
    config = DigitsCNNConfig()
    if config_path.is_file():
        config = DigitsCNNConfig(**json.loads(config_path.read_text()))
    model = DigitsCNN(config)
    model.load_state_dict(_load_state_dict(weights_path))
    logger.debug("loaded digits-cnn from %s", weights_path)
    return model.to(device).eval()


def _internal_dtype(name: str | None) -> torch.dtype:
    dtypes = {None: torch.float32, "float32": torch.float32, "float64": torch.float64}
    if name not in dtypes:
        raise ValueError(f"feature_extractor_internal_dtype must be one of {list(dtypes)}, got {name!r}")
    return dtypes[name]


class FeatureExtractorDigitsCNN(FeatureExtractorBase):
    """torch-fidelity feature extractor backed by :class:`DigitsCNN`.

    Provides ``digits-cnn-features`` (64-d penultimate ReLU layer, used for FID/KID/PRC) and
    ``digits-cnn-logits`` (10-d, used for the Inception Score). Loads the shipped weights unless
    ``feature_extractor_weights_path`` names an asset folder, a ``.safetensors`` file or a plain
    state-dict file saved with ``torch.save``.
    """

    def __init__(
        self,
        name: str,
        features_list: list[str] | tuple[str, ...],
        feature_extractor_weights_path: str | None = None,
        feature_extractor_internal_dtype: str | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(name, list(features_list))
        self.internal_dtype = _internal_dtype(feature_extractor_internal_dtype)
        self.model = load_digits_cnn(feature_extractor_weights_path)
        self.to(self.internal_dtype)
        self.requires_grad_(False)
        self.eval()

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_tensor(x) and x.dtype == torch.uint8):
            raise ValueError("Expecting images as a torch.Tensor with dtype=torch.uint8")
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"Expecting Bx1xHxW (or Bx3xHxW) images, got {tuple(x.shape)}")
        x = x.to(self.internal_dtype)
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
        return x / 127.5 - 1.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats, logits = self.model.features_and_logits(self._prepare(x))
        out = {DIGITS_CNN_FEATURE_LAYER: feats, DIGITS_CNN_LOGITS_LAYER: logits}
        return tuple(out[name].to(torch.float32) for name in self.features_list)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return DIGITS_CNN_FEATURE_LAYER, DIGITS_CNN_LOGITS_LAYER

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {
            "isc": DIGITS_CNN_LOGITS_LAYER,
            "fid": DIGITS_CNN_FEATURE_LAYER,
            "kid": DIGITS_CNN_FEATURE_LAYER,
            "prc": DIGITS_CNN_FEATURE_LAYER,
        }[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return True

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.randint(0, 256, (1, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)


def register_digits_cnn() -> None:
    """Register ``FeatureExtractorDigitsCNN`` with torch-fidelity as ``"digits-cnn"``; safe to call repeatedly."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    existing = FEATURE_EXTRACTORS_REGISTRY.get(DIGITS_CNN_NAME)
    if existing is None:
        register_feature_extractor(DIGITS_CNN_NAME, FeatureExtractorDigitsCNN)
        logger.debug("registered torch-fidelity feature extractor %s", DIGITS_CNN_NAME)
        return
    same = existing.__module__ == __name__ and existing.__qualname__ == FeatureExtractorDigitsCNN.__qualname__
    if not same:
        raise ValueError(f"torch-fidelity feature extractor {DIGITS_CNN_NAME!r} is already taken by {existing!r}")
    # A reloaded module defines a new class object; point the registry at the current one.
    FEATURE_EXTRACTORS_REGISTRY[DIGITS_CNN_NAME] = FeatureExtractorDigitsCNN
