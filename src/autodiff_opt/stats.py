"""Reference statistics (mu, sigma of features) for FID, for any feature extractor registered with torch-fidelity.

    python -m autodiff_opt.stats --source SOURCE --feature-extractor inception-v3-compat \\
        [--weights-path weights-inception-2015-12-05-6726825d.pth] [--max-images N] [--image-size N] --out stats.npz

SOURCE is a folder of images (searched recursively), an .npz of uint8 images (``arr_0`` or ``images``,
NHWC or NCHW), ``builtin:digits-train``-style embedded data, or an ADM reference batch
(``VIRTUAL_imagenet64_labeled.npz`` ...). ADM's evaluator stores Inception pool_3 statistics in such a
batch as ``mu``/``sigma`` (and spatial ``mixed_6/conv`` ones as ``mu_s``/``sigma_s``, plus the images as
``arr_0``); torch-fidelity's ``inception-v3-compat`` uses the same 2015-12-05 Inception weights, so for
it (layer 2048) the stored ``mu``/``sigma`` are copied as they are. For any other extractor or layer the
statistics are computed from ``arr_0``. ``--image-size N`` centre-crops each image to a square and
resizes it to N x N (COCO's photographs have many sizes). This is a thin command over the pipeline runs
use (``autodiff_opt.metrics.reference``: streamed float64 sums, one file format with the provenance,
one reuse check): rerunning with the same settings on an unchanged source reuses the output, and a
run's cached statistics of the same images are the same file. Point ``dataset.reference`` at it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path
from typing import Sequence

from autodiff_opt.metrics.fid import FIDScorer, FIDStats, MetricError, default_feature_layer
from autodiff_opt.metrics.reference import ADM_POOL, Request, build

log = logging.getLogger("autodiff_opt.stats")

CONFIG_TO_FLAGS = (("metric.weights_path=", "--weights-path "), ("metric.allow_download=true", "--allow-download"),
                   ("metric.feature_extractor=", "--feature-extractor "), ("metric.feature_layer=", "--feature-layer "))


class ScorerFactory:
    """Builds the scorer of the command line's extractor only when features are needed."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def __call__(self) -> FIDScorer:
        from autodiff_opt.utils import pick_device

        a = self.args
        return FIDScorer(a.feature_extractor, a.feature_layer, a.weights_path, device=pick_device(a.device),
                         batch_size=a.batch_size, allow_download=a.allow_download)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m autodiff_opt.stats", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="image folder, .npz of images, ADM reference batch, or builtin:NAME")
    p.add_argument("--out", required=True, type=Path, help="output .npz (mu, sigma, num_images, provenance)")
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
            raise MetricError(f"--import {name}: {err}") from err
    for flag, value in (("--max-images", args.max_images), ("--image-size", args.image_size), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise MetricError(f"{flag} {value}: must be at least 1")
    if not args.source.startswith("builtin:") and not Path(args.source).expanduser().exists():
        raise MetricError(f"--source {args.source}: no such file or directory")
    try:
        args.feature_layer = args.feature_layer or default_feature_layer(args.feature_extractor)
    except MetricError as err:
        raise MetricError(f"{err} (or --import the module that registers yours)") from err
    request = Request(args.source, args.feature_extractor, str(args.feature_layer), args.max_images, args.image_size,
                      args.from_images)
    stats = build(request, ScorerFactory(args), args.out, force=args.force)
    log.info("%s: %d images, %d-d features (%s/%s)", args.out, stats.num_images, stats.dim, args.feature_extractor,
             args.feature_layer)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        run(args)
    except MetricError as err:
        message = str(err)
        for config, flag in CONFIG_TO_FLAGS:
            message = message.replace(config, flag)
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
