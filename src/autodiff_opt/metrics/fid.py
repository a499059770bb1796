"""FID with torch-fidelity's feature extractors and formula, on uint8 tensors that never touch disk."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autodiff_opt.core.errors import MetricError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FIDStats:
    """mu and sigma of features (float64) and how many images they came from."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    def save(self, path: str | Path) -> None:
        np.savez(path, mu=self.mu, sigma=self.sigma, num_images=self.num_images)

    @classmethod
    def load(cls, path: str | Path) -> "FIDStats":
        with np.load(path) as data:
            if "mu" not in data or "sigma" not in data:
                raise MetricError(f"{path} holds no 'mu' and 'sigma' arrays: it is not a statistics file")
            n = int(data["num_images"]) if "num_images" in data else -1
            return cls(np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64), n)


def ensure_registered() -> None:
    """Register the project's own feature extractors with torch-fidelity (idempotent)."""
    try:
        from autodiff_opt.metrics.digits_cnn import register_digits_cnn
    except ImportError:  # the embedded extractor is optional for other data sets
        return
    register_digits_cnn()


def extractor_class(feature_extractor: str) -> type:
    """The torch-fidelity feature extractor registered under this name (the project's own included)."""
    import torch_fidelity.registry as registry

    ensure_registered()
    if feature_extractor not in registry.FEATURE_EXTRACTORS_REGISTRY:
        known = sorted(registry.FEATURE_EXTRACTORS_REGISTRY)
        raise MetricError(f"metric.feature_extractor={feature_extractor!r} is not registered: use one of {known}")
    return registry.FEATURE_EXTRACTORS_REGISTRY[feature_extractor]


def default_feature_layer(feature_extractor: str) -> str:
    """The layer the extractor uses for FID."""
    return str(extractor_class(feature_extractor).get_default_feature_layer_for_metric("fid"))


def _check_weights_file(path: str) -> None:
    """Refuse a weights file that is not a plain tensor state dict (torch-fidelity unpickles it unsafely)."""
    if not Path(path).is_file():
        raise MetricError(f"metric.weights_path={path!r}: no such file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            load_file(path)
            return
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise MetricError(f"metric.weights_path={path!r} is not a plain state dict loadable with weights_only=True: {err}") from err


@contextlib.contextmanager
def strict_fp32(device: torch.device) -> Iterator[None]:
    """Feature extraction as torch-fidelity validates it: float32 (its Inception's internal dtype), no
    autocast from the generation, and no TF32 on CUDA (cuDNN allows it for convolutions by default, which
    moves Inception features in the 4th digit). The previous TF32 settings are restored afterwards."""
    with torch.autocast(device_type=device.type, enabled=False):
        if device.type != "cuda":
            yield
            return
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class FIDScorer:
    """Builds the feature extractor once; turns uint8 images into features, statistics and FID."""

    def __init__(
        self,
        feature_extractor: str,
        feature_layer: str | None = None,
        weights_path: str | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 256,
        allow_download: bool = False,
    ) -> None:
        from torch_fidelity.utils import create_feature_extractor

        cls = extractor_class(feature_extractor)
        self.name = feature_extractor
        self.layer = feature_layer or cls.get_default_feature_layer_for_metric("fid")
        self.device = torch.device(device)
        self.batch_size = batch_size
        kwargs: dict[str, object] = {"verbose": False}
        if weights_path:
            _check_weights_file(weights_path)
            kwargs["feature_extractor_weights_path"] = weights_path
        elif feature_extractor.startswith("inception") and not allow_download:
            self._require_inception_cached()
        self.extractor = create_feature_extractor(feature_extractor, [self.layer], cuda=False, **kwargs)
        self.extractor.to(self.device)
        self._channels = 3 if feature_extractor.startswith(("inception", "clip", "dinov2", "vgg")) else None

    @staticmethod
    def _require_inception_cached() -> None:
        """torch-fidelity downloads Inception weights on first use; offline, say what to set instead."""
        from torch.hub import get_dir

        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        cached = Path(get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]
        if not cached.is_file():
            raise MetricError(
                f"Inception weights are not cached at {cached}: download {URL_INCEPTION_V3} and set"
                " metric.weights_path=/path/to/that/file (or metric.allow_download=true on a machine with network)"
            )

    def features(self, images: torch.Tensor) -> np.ndarray:
        """uint8 images (N, C, H, W) -> features (N, D) float64."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise MetricError(f"FID expects uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if self._channels == 3 and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        chunks = []
        with torch.no_grad(), strict_fp32(self.device):
            for start in range(0, images.shape[0], self.batch_size):
                batch = images[start : start + self.batch_size].to(self.device)
                feats = self.extractor(batch)
                chunks.append(self.extractor.convert_features_tuple_to_dict(feats)[self.layer].double().cpu())
        return torch.cat(chunks).numpy()

    def feature_dim(self, image_shape: tuple[int, int, int]) -> int:
        """Dimension of this extractor's features, from one blank image of the given (C, H, W)."""
        return int(self.features(torch.zeros((1, *image_shape), dtype=torch.uint8)).shape[1])

    def statistics(self, images: torch.Tensor) -> FIDStats:
        feats = self.features(images)
        return FIDStats(feats.mean(axis=0), np.cov(feats, rowvar=False), int(feats.shape[0]))

    def fid(self, images: torch.Tensor, reference: FIDStats) -> float:
        return self.fid_of_features(self.features(images), reference)

    def fid_of_features(self, feats: np.ndarray, reference: FIDStats) -> float:
        """FID of features (N, D) against the reference, with the reference's square root cached."""
        stats = FIDStats(feats.mean(axis=0), np.cov(feats, rowvar=False), int(feats.shape[0]))
        return fast_fid(stats, reference, self.device)


def fid_from_stats(a: FIDStats, b: FIDStats) -> float:
    """torch-fidelity's Frechet distance between two Gaussians."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    if a.dim != b.dim:
        raise MetricError(
            f"reference statistics have dimension {b.dim} but the feature extractor gives {a.dim}:"
            " rebuild them with the same metric.feature_extractor (python -m autodiff_opt.stats)"
        )
    out = fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma}, False)
    return float(out[KEY_METRIC_FID])



class _SqrtCache:
    """sqrt(sigma_ref) per reference (by identity), so each candidate costs one eigendecomposition."""

    def __init__(self) -> None:
        self._key: tuple[int, float, str] | None = None
        self._value: torch.Tensor | None = None

    def get(self, reference: FIDStats, device: torch.device) -> torch.Tensor:
        key = (id(reference.sigma), float(reference.sigma.sum()), str(device))
        if self._key != key or self._value is None:
            sigma = torch.as_tensor(reference.sigma, dtype=torch.float64, device=device)
            w, v = torch.linalg.eigh((sigma + sigma.T) / 2)
            self._value = (v * w.clamp(min=0).sqrt()) @ v.T
            self._key = key
        return self._value


_SQRT_REF = _SqrtCache()


def fast_fid(a: FIDStats, reference: FIDStats, device: torch.device | str = "cpu") -> float:
    """The Frechet distance with tr sqrt(S_a S_ref) = sum sqrt(eig(R S_a R)), R = sqrt(S_ref) computed once.

    R S_a R is symmetric positive semi-definite and has the eigenvalues of S_a S_ref, so one symmetric
    eigendecomposition (float64, on the scorer's device) replaces scipy's general matrix square root.
    """
    if a.dim != reference.dim:
        return fid_from_stats(a, reference)  # raises the dimension error
    device = torch.device(device)
    root = _SQRT_REF.get(reference, device)
    sigma = torch.as_tensor(a.sigma, dtype=torch.float64, device=device)
    inner = root @ sigma @ root
    eig = torch.linalg.eigvalsh((inner + inner.T) / 2)
    trace_sqrt = float(eig.clamp(min=0).sqrt().sum())
    diff = a.mu - reference.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(reference.sigma) - 2.0 * trace_sqrt)
