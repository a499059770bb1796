"""Reference statistics of real data: built once per (source, extractor, layer, count), cached as .npz.

Sources: 'builtin:digits-train' / 'builtin:digits-heldout' (the embedded data), a folder of images,
an .npz of uint8 images (key 'arr_0' or 'images', NHWC or NCHW), or an .npz that already holds
'mu' and 'sigma' (ADM's reference batches such as VIRTUAL_imagenet64_labeled.npz).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch

from autodiff_opt.metrics.fid import FIDScorer, FIDStats, MetricError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def _builtin_images(name: str) -> torch.Tensor:
    from autodiff_opt.data.digits import load_digits_images

    split = {"digits-train": "train", "digits-heldout": "heldout", "digits-all": "all"}.get(name)
    if split is None:
        raise MetricError(f"unknown builtin reference {name!r}: use builtin:digits-train or builtin:digits-heldout")
    images, _ = load_digits_images(split)  # type: ignore[arg-type]
    return images


def _npz_images(path: Path) -> torch.Tensor:
    with np.load(path) as data:
        key = next((k for k in ("arr_0", "images", "x") if k in data), None)
        if key is None:
            raise MetricError(f"{path} has neither images ('arr_0'/'images') nor 'mu'/'sigma': nothing to compute from")
        arr = np.asarray(data[key])
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise MetricError(f"{path}:{key} must be uint8 images of 4 dims, got {arr.dtype} {arr.shape}")
    if arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _folder_images(path: Path, limit: int | None) -> torch.Tensor:
    from PIL import Image

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MetricError(f"{path} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    files = files[:limit] if limit else files
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise MetricError(f"images in {path} have different sizes {sorted(shapes)[:3]}...: resize them to one size first")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def load_reference_images(source: str, limit: int | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) images of a reference source, the first `limit` of them when given."""
    if source.startswith("builtin:"):
        images = _builtin_images(source.split(":", 1)[1])
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise MetricError(f"reference source {source!r}: no such file or directory")
        images = _folder_images(path, limit) if path.is_dir() else _npz_images(path)
    return images[:limit] if limit else images


def _source_fingerprint(source: str) -> str:
    if source.startswith("builtin:"):
        return source
    path = Path(source).expanduser().resolve()
    stat = path.stat()
    return f"{path}:{stat.st_size}:{int(stat.st_mtime)}"


def _stored_stats(source: str) -> FIDStats | None:
    if source.startswith("builtin:") or Path(source).suffix != ".npz":
        return None
    with np.load(Path(source).expanduser()) as data:
        has_stats = "mu" in data and "sigma" in data
    return FIDStats.load(Path(source).expanduser()) if has_stats else None


def reference_statistics(
    source: str, scorer: FIDScorer, cache_dir: str | Path, limit: int | None = None
) -> FIDStats:
    """Stats of the reference for this scorer: stored ones, the cache, or computed now and cached."""
    stored = _stored_stats(source)
    if stored is not None:
        return stored
    key = hashlib.sha256(f"{_source_fingerprint(source)}|{scorer.name}|{scorer.layer}|{limit}".encode()).hexdigest()[:16]
    cache = Path(cache_dir).expanduser() / f"ref-{scorer.name}-{key}.npz"
    if cache.is_file():
        return FIDStats.load(cache)
    images = load_reference_images(source, limit)
    log.info("computing reference statistics of %s (%d images, %s/%s)", source, len(images), scorer.name, scorer.layer)
    stats = scorer.statistics(images)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")  # one per process: workers may compute it together
    stats.save(tmp)
    tmp.replace(cache)
    return stats


def check_reference(stats: FIDStats, scorer: FIDScorer, image_shape: tuple[int, int, int], where: str) -> None:
    """Fail before any search work when the statistics do not fit the feature extractor."""
    dim = scorer.feature_dim(image_shape)
    if stats.dim != dim:
        raise MetricError(
            f"reference statistics from {where} have dimension {stats.dim}, but {scorer.name}/{scorer.layer} gives {dim}:"
            " use statistics built with the same feature extractor (python -m autodiff_opt.stats)"
        )
