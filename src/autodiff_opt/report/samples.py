"""Sample grids: every schedule of the final comparison from the same noise (and class labels), as PNGs."""

from __future__ import annotations

import io
import logging
import torch
from PIL import Image, ImageDraw, ImageFont

from autodiff_opt.generate import ImageGenerator, NonFiniteSamples, SampleSet
from autodiff_opt.core.genome import Genome

log = logging.getLogger(__name__)

SMALL_CELL = 40  # images up to this size are enlarged by an integer factor, nearest neighbour (8x8 digits: x5)
LARGE_CELL = 96  # larger images are reduced to this size
PAD = 2


def cell_size(height: int) -> int:
    return height * max(1, SMALL_CELL // height) if height <= SMALL_CELL else LARGE_CELL


def grid_image(images: torch.Tensor, nrow: int) -> Image.Image:
    """uint8 images (N, C, H, W), C in {1, 3}, as one grid of nrow columns on white, PAD pixels apart."""
    n, channels, height, width = images.shape
    cell = cell_size(height)
    cell_w = round(width * cell / height)
    rows = -(-n // nrow)
    grid = Image.new("RGB", (nrow * (cell_w + PAD) + PAD, rows * (cell + PAD) + PAD), "white")
    resample = Image.Resampling.NEAREST if height <= SMALL_CELL else Image.Resampling.LANCZOS
    for i, img in enumerate(images):
        array = img.permute(1, 2, 0).numpy()
        tile = Image.fromarray(array[..., 0] if channels == 1 else array).convert("RGB").resize((cell_w, cell), resample)
        grid.paste(tile, (PAD + (i % nrow) * (cell_w + PAD), PAD + (i // nrow) * (cell + PAD)))
    return grid


def grid_samples(generator: ImageGenerator, grid_size: int, seed: int) -> SampleSet:
    model = generator.model
    return SampleSet.draw(grid_size * grid_size, model.sample_shape, model.num_classes, seed)


def sample_grids(generator: ImageGenerator, schedules: dict[str, Genome], grid_size: int, seed: int) -> dict[str, Image.Image]:
    """One grid per schedule, all from the same noise and labels (seed); a schedule whose samples are not
    finite gets no grid (a warning says which)."""
    samples = grid_samples(generator, grid_size, seed)
    out: dict[str, Image.Image] = {}
    for name, genome in schedules.items():
        try:
            out[name] = grid_image(generator.generate(genome, samples), grid_size)
        except NonFiniteSamples as err:
            log.warning("sample grid of %s skipped: %s", name, err)
    return out


def labelled_strip(grids: dict[str, Image.Image], captions: dict[str, str], per_row: int = 4) -> Image.Image:
    """The grids side by side (per_row a line), each under its caption: one picture to compare them."""
    font = ImageFont.load_default(size=14)
    width = max(g.width for g in grids.values())
    height = max(g.height for g in grids.values())
    caption_h = 40
    cols = min(per_row, len(grids))
    rows = -(-len(grids) // cols)
    sheet = Image.new("RGB", (cols * (width + 16) + 16, rows * (height + caption_h + 16) + 16), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (name, grid) in enumerate(grids.items()):
        x, y = 16 + (i % cols) * (width + 16), 16 + (i // cols) * (height + caption_h + 16)
        draw.multiline_text((x, y), captions.get(name, name), fill="black", font=font, spacing=2)
        sheet.paste(grid, (x, y + caption_h))
    return sheet


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()

