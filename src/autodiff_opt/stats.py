"""Reference statistics (mu, sigma of features) for FID, for any feature extractor registered with torch-fidelity.

    python -m autodiff_opt.stats --source SOURCE --feature-extractor inception-v3-compat \\
        [--weights-path weights-inception-2015-12-05-6726825d.pth] [--max-images N] [--image-size N] --out stats.npz

SOURCE is a folder of images (searched recursively), an .npz of uint8 images (``arr_0`` or ``images``,
NHWC or NCHW), ``builtin:digits-train``-style embedded data, or an ADM reference batch
(``VIRTUAL_imagenet64_labeled.npz`` ...). ADM's evaluator stores Inception pool_3 statistics in such a
batch as ``mu``/``sigma`` (and spatial ``mixed_6/conv`` ones as ``mu_s``/``sigma_s``, plus the images as
``arr_0``); torch-fidelity's ``inception-v3-compat`` uses the same 2015-12-05 Inception weights, so for
it (layer 2048) the stored ``mu``/``sigma`` are copied as they are. For any other extractor or layer the
statistics are computed from ``arr_0``. Features are accumulated in float64 batch by batch, so large
folders never sit in memory. ``--image-size N`` centre-crops each image to a square and resizes it to
N x N (COCO's photographs have many sizes). The output .npz holds ``mu``, ``sigma``, ``num_images`` and
how it was made; rerunning with the same settings on an unchanged source reuses it. Point
``dataset.reference`` at it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from autodiff_opt.metrics.fid import FIDScorer, FIDStats, MetricError, ensure_registered
from autodiff_opt.metrics.reference import IMAGE_SUFFIXES, load_reference_images

log = logging.getLogger("autodiff_opt.stats")

ADM_POOL = "inception-v3-compat"
ADM_POOL_LAYER = "2048"
IMAGE_KEYS = ("arr_0", "images", "x")


class StatsError(RuntimeError):
    """The statistics cannot be built as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Request:
    source: str
    feature_extractor: str
    feature_layer: str
    max_images: int | None
    image_size: int | None
    from_images: bool

    def metadata(self) -> dict[str, object]:
        return {"source": self.source, "fingerprint": fingerprint(self.source), "feature_extractor": self.feature_extractor,
                "feature_layer": self.feature_layer, "max_images": self.max_images or 0, "image_size": self.image_size or 0,
                "from_images": self.from_images}


def fingerprint(source: str) -> str:
    """What identifies a source's content cheaply: path, size (files added to a folder count) and mtime."""
    if source.startswith("builtin:"):
        return source
    path = Path(source).expanduser().resolve()
    if path.is_dir():
        files = _image_files(path)
        return f"{path}:{len(files)}:{int(max((f.stat().st_mtime for f in files), default=0))}"
    stat = path.stat()
    return f"{path}:{stat.st_size}:{int(stat.st_mtime)}"


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def npz_keys(path: Path) -> set[str]:
    with np.load(path) as data:
        return set(data.files)


def npz_array_shape(path: Path, key: str) -> tuple[int, ...]:
    """Shape of one array of an .npz without loading it (ADM's LSUN batches are gigabytes)."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, _ = reader(f)
    return tuple(int(s) for s in shape)


def default_layer(feature_extractor: str) -> str:
    import torch_fidelity.registry as registry

    ensure_registered()
    cls = registry.FEATURE_EXTRACTORS_REGISTRY.get(feature_extractor)
    if cls is None:
        known = sorted(registry.FEATURE_EXTRACTORS_REGISTRY)
        raise StatsError(f"--feature-extractor {feature_extractor!r} is not registered: use one of {known}"
                         " (or --import the module that registers yours)")
    return str(cls.get_default_feature_layer_for_metric("fid"))


def stored_statistics(path: Path) -> FIDStats:
    """ADM's pool_3 ``mu``/``sigma`` as they are stored, checked for shape and finiteness."""
    with np.load(path) as data:
        mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
        stored_n = int(data["num_images"]) if "num_images" in data.files else -1
        spatial = "mu_s" in data.files
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise StatsError(f"{path}: 'mu' {mu.shape} and 'sigma' {sigma.shape} are not a mean vector and its covariance")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise StatsError(f"{path}: stored 'mu'/'sigma' contain NaN or inf")
    key = next((k for k in IMAGE_KEYS if k in npz_keys(path)), None)
    n = npz_array_shape(path, key)[0] if key and stored_n < 0 else stored_n
    if spatial:
        log.info("%s also holds spatial statistics (mu_s, sigma_s, for sFID): not used, no registered extractor"
                 " gives ADM's mixed_6/conv features", path.name)
    return FIDStats(mu, sigma, n)


def _made_with(path: Path) -> tuple[str, str]:
    """(extractor, layer) of stored statistics: ours record it; ADM's reference batches are Inception pool_3."""
    with np.load(path) as data:
        if "feature_extractor" in data.files and "feature_layer" in data.files:
            return str(data["feature_extractor"].item()), str(data["feature_layer"].item())
    return ADM_POOL, ADM_POOL_LAYER


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
        raise StatsError(f"{folder} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
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
                raise StatsError(f"{file} is {array.shape[1]}x{array.shape[0]} but earlier images are"
                                 f" {first_shape[1]}x{first_shape[0]}: pass --image-size N to centre-crop and resize all")
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
    """uint8 (B, C, H, W) batches of a source's images, in a fixed order."""
    path = Path(source).expanduser()
    if not source.startswith("builtin:") and path.is_dir():
        yield from _folder_batches(path, limit, size, batch)
        return
    try:
        images = load_reference_images(source, limit)
    except MetricError as err:
        raise StatsError(str(err)) from err
    for start in range(0, images.shape[0], batch):
        yield _resized(images[start : start + batch], size)


def accumulate(scorer: FIDScorer, batches: Iterator[torch.Tensor]) -> FIDStats:
    """mu and the unbiased covariance from running float64 sums of features and their outer products."""
    total, outer, n = None, None, 0
    for images in batches:
        feats = scorer.features(images)
        total = feats.sum(0) if total is None else total + feats.sum(0)
        outer = feats.T @ feats if outer is None else outer + feats.T @ feats
        n += feats.shape[0]
        log.info("features of %d images", n)
    if total is None or outer is None or n < 2:
        raise StatsError(f"only {n} image(s): FID statistics need at least 2 (use thousands)")
    mu = total / n
    sigma = (outer - n * np.outer(mu, mu)) / (n - 1)
    return FIDStats(mu, (sigma + sigma.T) / 2, n)


def build(request: Request, scorer_factory: "ScorerFactory") -> FIDStats:
    """Stored ADM statistics when they fit the extractor, else features of the source's images."""
    path = Path(request.source).expanduser()
    if not request.source.startswith("builtin:") and not path.exists():
        raise StatsError(f"--source {request.source}: no such file or directory")
    if path.suffix == ".npz" and path.is_file() and {"mu", "sigma"} <= npz_keys(path):
        has_images = any(k in npz_keys(path) for k in IMAGE_KEYS)
        made_with = _made_with(path)
        same = (request.feature_extractor, request.feature_layer) == made_with
        if same and not request.from_images:
            log.info("%s holds stored %s/%s statistics: copied", path.name, *made_with)
            if request.max_images or request.image_size:
                log.warning("--max-images/--image-size do not apply to stored statistics (--from-images recomputes)")
            return stored_statistics(path)
        if not has_images:
            raise StatsError(
                f"{path} holds only stored statistics of {made_with[0]}, layer {made_with[1]}, and no images: they"
                f" cannot give {request.feature_extractor}/{request.feature_layer} features; use --feature-extractor"
                f" {made_with[0]} --feature-layer {made_with[1]} or a source with images"
            )
        log.info("computing %s/%s from the images in %s (its stored mu/sigma are %s/%s)",
                 request.feature_extractor, request.feature_layer, path.name, *made_with)
    scorer = scorer_factory()
    return accumulate(scorer, image_batches(request.source, request.max_images, request.image_size, scorer.batch_size))


class ScorerFactory:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def __call__(self) -> FIDScorer:
        from autodiff_opt.utils import pick_device

        a = self.args
        return FIDScorer(a.feature_extractor, a.feature_layer, a.weights_path, device=pick_device(a.device),
                         batch_size=a.batch_size, allow_download=a.allow_download)


def save(stats: FIDStats, request: Request, out: Path) -> None:
    """Write atomically: mu, sigma, num_images and how they were made."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".partial.npz")
    np.savez(tmp, mu=stats.mu, sigma=stats.sigma, num_images=stats.num_images,
             **{k: np.asarray(v) for k, v in request.metadata().items()})
    tmp.replace(out)


def reusable(out: Path, request: Request) -> bool:
    """The output exists and was made from the same, unchanged source with the same settings."""
    if not out.is_file():
        return False
    try:
        with np.load(out) as data:
            return all(k in data.files and data[k].item() == v for k, v in request.metadata().items())
    except (OSError, ValueError):
        return False


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m autodiff_opt.stats", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="image folder, .npz of images, ADM reference batch, or builtin:NAME")
    p.add_argument("--out", required=True, type=Path, help="output .npz (mu, sigma, num_images, metadata)")
    p.add_argument("--feature-extractor", default=ADM_POOL, help="a torch-fidelity feature extractor (default %(default)s)")
    p.add_argument("--feature-layer", default=None, help="its layer (default: the one it uses for FID)")
    p.add_argument("--weights-path", default=None, help="offline weights file, e.g. weights-inception-2015-12-05-6726825d.pth")
    p.add_argument("--allow-download", action="store_true", help="let torch-fidelity download missing Inception weights")
    p.add_argument("--max-images", type=int, default=None, help="the first N images of the source (sorted order)")
    p.add_argument("--image-size", type=int, default=None, help="centre-crop each image to a square and resize to N x N")
    p.add_argument("--from-images", action="store_true", help="recompute from arr_0 even where stored mu/sigma fit")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--device", default="auto")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import this module first (it may register a feature extractor); repeatable")
    p.add_argument("--force", action="store_true", help="rebuild even if --out was made with the same settings")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> FIDStats:
    for name in args.imports:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise StatsError(f"--import {name}: {err}") from err
    for flag, value in (("--max-images", args.max_images), ("--image-size", args.image_size), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise StatsError(f"{flag} {value}: must be at least 1")
    if not args.source.startswith("builtin:") and not Path(args.source).expanduser().exists():
        raise StatsError(f"--source {args.source}: no such file or directory")
    layer = args.feature_layer or default_layer(args.feature_extractor)
    request = Request(args.source, args.feature_extractor, str(layer), args.max_images, args.image_size, args.from_images)
    if not args.force and reusable(args.out, request):
        log.info("%s already holds these statistics: reused (--force rebuilds)", args.out)
        return FIDStats.load(args.out)
    stats = build(request, ScorerFactory(args))
    save(stats, request, args.out)
    log.info("wrote %s: %d images, %d-d features (%s/%s)", args.out, stats.num_images, stats.dim,
             args.feature_extractor, layer)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        run(args)
    except (StatsError, MetricError) as err:
        message = str(err).replace("metric.weights_path=", "--weights-path ").replace("metric.allow_download=true",
                                                                                       "--allow-download")
        print(f"error: {message.replace('metric.feature_extractor=', '--feature-extractor ')}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
