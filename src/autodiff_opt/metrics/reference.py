"""Reference statistics of real data: one streaming pipeline for runs (cached) and for ``python -m autodiff_opt.stats``.

Sources: ``builtin:digits-train`` / ``builtin:digits-heldout`` (the embedded data), a folder of images
(searched recursively), an .npz of uint8 images (``arr_0``, ``images`` or ``x``; NHWC or NCHW), or an .npz
that already holds ``mu`` and ``sigma``: ADM's reference batches such as VIRTUAL_imagenet64_labeled.npz
(Inception pool_3 statistics beside the images in ``arr_0``) or a file this module wrote.

Features are accumulated batch by batch as running float64 sums of x and x x^T (shifted by the first
batch's mean, which keeps the covariance exact to float64 rounding), so no more than one batch of
images or features is in memory. Every file written (a run's cache ``ref-EXTRACTOR-KEY.npz``, the
CLI's ``--out``) has one format: ``mu``, ``sigma``, ``num_images`` and the provenance: source,
fingerprint (path, size or image count, mtime), feature extractor, layer, image count and size,
whether stored statistics were recomputed. A file is reused only when its provenance equals the
request's; anything else (an edited source, other settings, a cache of an older version, which has no
provenance) is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from autodiff_opt.metrics.fid import FIDScorer, FIDStats, MetricError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
IMAGE_KEYS = ("arr_0", "images", "x")
ADM_POOL, ADM_POOL_LAYER = "inception-v3-compat", "2048"  # what ADM's reference batches store as mu/sigma

ScorerFactory = Callable[[], FIDScorer]


# --- what the statistics are computed from ----------------------------------------------------------

def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def fingerprint(source: str) -> str:
    """What identifies a source's content cheaply: path, size (a folder: its image count) and latest mtime."""
    if source.startswith("builtin:"):
        return source
    path = Path(source).expanduser().resolve()
    if path.is_dir():
        files = _image_files(path)
        return f"{path}:{len(files)}:{int(max((f.stat().st_mtime for f in files), default=0))}"
    stat = path.stat()
    return f"{path}:{stat.st_size}:{int(stat.st_mtime)}"


@dataclass(frozen=True)
class Request:
    """Statistics of ``source`` in ``feature_extractor``/``feature_layer`` features: the first ``max_images``
    images, each centre-cropped and resized to ``image_size``; ``from_images`` recomputes stored ones."""

    source: str
    feature_extractor: str
    feature_layer: str
    max_images: int | None = None
    image_size: int | None = None
    from_images: bool = False

    @cached_property
    def _provenance(self) -> dict[str, object]:  # the fingerprint is taken once, before any work
        return {"source": self.source, "fingerprint": fingerprint(self.source), "feature_extractor": self.feature_extractor,
                "feature_layer": self.feature_layer, "max_images": self.max_images or 0, "image_size": self.image_size or 0,
                "from_images": self.from_images}

    def provenance(self) -> dict[str, object]:
        return dict(self._provenance)

    def cache_name(self) -> str:
        key = hashlib.sha256(json.dumps(self.provenance(), sort_keys=True).encode()).hexdigest()[:16]
        return f"ref-{self.feature_extractor}-{key}.npz"


def save(stats: FIDStats, request: Request, out: Path) -> None:
    """Write atomically (a temporary name per process: workers may compute the same statistics together)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.stem}.{os.getpid()}.partial.npz")
    np.savez(tmp, mu=stats.mu, sigma=stats.sigma, num_images=stats.num_images,
             **{k: np.asarray(v) for k, v in request.provenance().items()})
    tmp.replace(out)


def reusable(path: Path, request: Request) -> bool:
    """``path`` exists and was made from the same, unchanged source with the same settings."""
    if not path.is_file():
        return False
    try:
        with np.load(path) as data:
            return all(k in data.files and data[k].item() == v for k, v in request.provenance().items())
    except (OSError, ValueError, zipfile.BadZipFile):
        return False


# --- images, batch by batch ---------------------------------------------------------------------------

def _builtin_images(name: str) -> torch.Tensor:
    from autodiff_opt.data.digits import load_digits_images

    split = {"digits-train": "train", "digits-heldout": "heldout", "digits-all": "all"}.get(name)
    if split is None:
        raise MetricError(f"unknown builtin reference {name!r}: use builtin:digits-train or builtin:digits-heldout")
    images, _ = load_digits_images(split)  # type: ignore[arg-type]
    return images


def _npz_images(path: Path) -> torch.Tensor:
    with np.load(path) as data:
        key = next((k for k in IMAGE_KEYS if k in data), None)
        if key is None:
            raise MetricError(f"{path} has neither images ('arr_0'/'images') nor 'mu'/'sigma': nothing to compute from")
        arr = np.asarray(data[key])
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise MetricError(f"{path}:{key} must be uint8 images of 4 dims, got {arr.dtype} {arr.shape}")
    if arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _check_exists(source: str) -> Path:
    path = Path(source).expanduser()
    if not source.startswith("builtin:") and not path.exists():
        raise MetricError(f"reference source {source!r}: no such file or directory")
    return path


def load_reference_images(source: str, limit: int | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) images of a reference source, the first ``limit`` of them when given."""
    return torch.cat(list(image_batches(source, limit, None, 1 << 30)))


def _center_crop_resize(image: "PIL.Image.Image", size: int) -> np.ndarray:  # type: ignore[name-defined]  # noqa: F821
    from PIL import Image

    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((size, size), Image.Resampling.BICUBIC))


def _folder_batches(folder: Path, limit: int | None, size: int | None, batch: int) -> Iterator[torch.Tensor]:
    from PIL import Image

    files = _image_files(folder)
    if not files:
        raise MetricError(f"{folder} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    files = files[:limit] if limit else files
    first_shape: tuple[int, ...] | None = None
    for start in range(0, len(files), batch):
        arrays = []
        for file in files[start : start + batch]:
            with Image.open(file) as opened:
                rgb = opened.convert("RGB")
            array = _center_crop_resize(rgb, size) if size else np.asarray(rgb)
            first_shape = first_shape or array.shape
            if array.shape != first_shape:
                raise MetricError(f"{file} is {array.shape[1]}x{array.shape[0]} but earlier images are"
                                  f" {first_shape[1]}x{first_shape[0]}: resize them to one size first"
                                  " (python -m autodiff_opt.stats --image-size N centre-crops and resizes all)")
            arrays.append(array)
        yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _resized(images: torch.Tensor, size: int | None) -> torch.Tensor:
    if not size or images.shape[-1] == images.shape[-2] == size:
        return images
    from PIL import Image

    arrays = [_center_crop_resize(Image.fromarray(img.permute(1, 2, 0).squeeze(-1).numpy()), size) for img in images]
    out = torch.from_numpy(np.stack(arrays))
    return (out.unsqueeze(1) if out.dim() == 3 else out.permute(0, 3, 1, 2)).contiguous()


def image_batches(source: str, limit: int | None, size: int | None, batch: int) -> Iterator[torch.Tensor]:
    """uint8 (B, C, H, W) batches of a source's images, in a fixed order (a folder's: sorted paths)."""
    path = _check_exists(source)
    if not source.startswith("builtin:") and path.is_dir():
        yield from _folder_batches(path, limit, size, batch)
        return
    images = _builtin_images(source.split(":", 1)[1]) if source.startswith("builtin:") else _npz_images(path)
    images = images[:limit] if limit else images
    for start in range(0, images.shape[0], batch):
        yield _resized(images[start : start + batch], size)


def accumulate(scorer: FIDScorer, batches: Iterator[torch.Tensor]) -> FIDStats:
    """mu and the unbiased covariance from running float64 sums of the features and their outer products
    (about the first batch's mean: the shift keeps the covariance free of cancellation)."""
    shift: np.ndarray | None = None
    total, outer, n = 0.0, 0.0, 0
    for images in batches:
        feats = scorer.features(images)
        shift = feats.mean(0) if shift is None else shift
        centred = feats - shift
        total, outer = total + centred.sum(0), outer + centred.T @ centred
        n += feats.shape[0]
        log.info("features of %d images", n)
    if shift is None or n < 2:
        raise MetricError(f"only {n} reference image(s): FID statistics need at least 2 (use thousands)")
    mean = np.asarray(total) / n
    sigma = (np.asarray(outer) - n * np.outer(mean, mean)) / (n - 1)
    return FIDStats(shift + mean, (sigma + sigma.T) / 2, n)


# --- statistics stored in the source ------------------------------------------------------------------

def npz_array_shape(path: Path, key: str) -> tuple[int, ...]:
    """Shape of one array of an .npz without loading it (ADM's LSUN batches are gigabytes)."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, _ = reader(f)
    return tuple(int(s) for s in shape)


def stored_statistics(path: Path) -> FIDStats:
    """The ``mu``/``sigma`` an .npz holds, checked for shape and finiteness."""
    with np.load(path) as data:
        mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
        stored_n = int(data["num_images"]) if "num_images" in data.files else -1
        spatial = "mu_s" in data.files
        key = next((k for k in IMAGE_KEYS if k in data.files), None)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise MetricError(f"{path}: 'mu' {mu.shape} and 'sigma' {sigma.shape} are not a mean vector and its covariance")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise MetricError(f"{path}: stored 'mu'/'sigma' contain NaN or inf")
    n = npz_array_shape(path, key)[0] if key and stored_n < 0 else stored_n
    if spatial:
        log.info("%s also holds spatial statistics (mu_s, sigma_s, for sFID): not used, no registered extractor"
                 " gives ADM's mixed_6/conv features", path.name)
    return FIDStats(mu, sigma, n)


def _recorded_with(data: np.lib.npyio.NpzFile) -> tuple[str, str] | None:
    if "feature_extractor" in data.files and "feature_layer" in data.files:
        return str(data["feature_extractor"].item()), str(data["feature_layer"].item())
    return None


def fitting_stored_statistics(request: Request, accept_unrecorded: bool) -> FIDStats | None:
    """The source's stored statistics when they are what the request asks for; None to compute from images.

    The provenance check: statistics that record their extractor and layer (this module's files) fit
    when those are the request's; ones that record none are taken for ADM's Inception pool_3
    (``inception-v3-compat``, layer 2048). Otherwise a source with images is computed from them (as
    with ``from_images``). Statistics that record nothing and come without images (a user's own
    mu/sigma) are used as they are only with ``accept_unrecorded`` (a run, which then checks their
    dimension against its images: ``check_reference``); otherwise the request cannot be met.
    """
    path = Path(request.source).expanduser()
    if request.source.startswith("builtin:") or path.suffix != ".npz" or not path.is_file():
        return None
    with np.load(path) as data:
        if "mu" not in data.files or "sigma" not in data.files:
            return None
        recorded, has_images = _recorded_with(data), any(k in data.files for k in IMAGE_KEYS)
    made_with = recorded or (ADM_POOL, ADM_POOL_LAYER)
    wanted = (request.feature_extractor, request.feature_layer)
    if made_with == wanted and not request.from_images:
        log.info("%s holds stored %s/%s statistics: used as they are", path.name, *made_with)
        if request.max_images or request.image_size:
            log.warning("an image count or size does not apply to stored statistics: they are used as they are")
        return stored_statistics(path)
    if has_images:
        log.info("computing %s/%s from the images in %s (its stored mu/sigma are %s/%s)", *wanted, path.name, *made_with)
        return None
    if recorded is None and accept_unrecorded:
        log.warning("%s records no feature extractor: used as %s/%s statistics if the dimension fits", path.name, *wanted)
        return stored_statistics(path)
    raise MetricError(
        f"{path} holds only stored statistics of {made_with[0]}, layer {made_with[1]}, and no images: they cannot give"
        f" {wanted[0]}/{wanted[1]} features; use metric.feature_extractor={made_with[0]}"
        f" metric.feature_layer={made_with[1]} or a source with images"
    )


# --- the two entry points -------------------------------------------------------------------------------

def build(request: Request, scorer: ScorerFactory, out: Path, force: bool = False, keep_stored: bool = False) -> FIDStats:
    """The statistics of ``request``: ``out`` when it already holds them (unless ``force``), else the
    source's fitting stored ones (returned as they are with ``keep_stored``, a run's reference; else
    written to ``out``), else streamed from the source's images and written to ``out``."""
    if not force and reusable(out, request):
        log.info("%s already holds these statistics: reused", out)
        return FIDStats.load(out)
    stats = fitting_stored_statistics(request, accept_unrecorded=keep_stored)
    if stats is not None and keep_stored:
        return stats
    if stats is None:
        older = [p.name for p in out.parent.glob(f"ref-{request.feature_extractor}-*.npz") if not _has_provenance(p)]
        if older:
            log.info("reference cache %s in %s: an older version's format (no provenance), not used; recomputing",
                     ", ".join(sorted(older)), out.parent)
        made = scorer()
        log.info("computing reference statistics of %s (%s/%s) into %s", request.source, made.name, made.layer, out)
        stats = accumulate(made, image_batches(request.source, request.max_images, request.image_size, made.batch_size))
    save(stats, request, out)
    return stats


def _has_provenance(path: Path) -> bool:
    try:
        with np.load(path) as data:
            return "fingerprint" in data.files
    except (OSError, ValueError, zipfile.BadZipFile):
        return False


def reference_statistics(source: str, scorer: FIDScorer, cache_dir: str | Path, limit: int | None = None) -> FIDStats:
    """A run's reference: the source's stored statistics where they fit the scorer, else the cached
    ones of the same provenance, else computed now and cached in ``cache_dir``."""
    _check_exists(source)
    request = Request(source, scorer.name, str(scorer.layer), limit)
    out = Path(cache_dir).expanduser() / request.cache_name()
    return build(request, lambda: scorer, out, keep_stored=True)


def check_reference(stats: FIDStats, scorer: FIDScorer, image_shape: tuple[int, int, int], where: str) -> None:
    """Fail before any search work when the statistics do not fit the feature extractor."""
    dim = scorer.feature_dim(image_shape)
    if stats.dim != dim:
        raise MetricError(
            f"reference statistics from {where} have dimension {stats.dim}, but {scorer.name}/{scorer.layer} gives {dim}:"
            " use statistics built with the same feature extractor (python -m autodiff_opt.stats)"
        )
