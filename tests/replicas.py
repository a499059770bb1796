"""Tiny random replicas of the paper's models and data, saved in the exact formats users have.

- a Stable Diffusion v1.x pipeline folder (``StableDiffusionPipeline.save_pretrained``: tiny
  UNet2DConditionModel, AutoencoderKL, CLIPTextModel and a CLIPTokenizer built from a tiny vocab),
- a diffusers ``DDPMPipeline`` folder (google/ddpm-cifar10-32, google/ddpm-church-256 layout),
- a COCO captions JSON (``captions_val2014.json`` layout), image folders and .npz image archives.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import torch

SD_IMAGE_SIZE = 32  # pixels; latents are 4 x 4 x 4 (the VAE halves the size three times)
SD_TEXT_LENGTH = 16  # tokens (77 in CLIP ViT-L/14)
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def write_clip_vocab(folder: Path) -> tuple[Path, Path]:
    """A CLIP BPE vocabulary of single lowercase letters and digits (with and without </w>), no merges."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits)
    tokens = symbols + [s + "</w>" for s in symbols] + list(SPECIAL_TOKENS)
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    vocab.write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    merges.write_text("#version: 0.2\n")
    return vocab, merges


def make_tiny_sd_pipeline(folder: Path, seed: int = 0, hub_tokenizer_layout: bool = False) -> Path:
    """Save a tiny random Stable Diffusion v1 pipeline folder (the layout of CompVis/stable-diffusion-v1-4)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = write_clip_vocab(folder.parent / f"{folder.name}-vocab")
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=SD_TEXT_LENGTH)
    bos, eos = (tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=SD_TEXT_LENGTH, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos))
    unet = UNet2DConditionModel(
        sample_size=SD_IMAGE_SIZE // 8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=SD_IMAGE_SIZE)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    if hub_tokenizer_layout:  # the hub's v1-4 tokenizer/ holds vocab.json + merges.txt, no tokenizer.json
        tok_dir = folder / "tokenizer"
        (tok_dir / "tokenizer.json").unlink(missing_ok=True)
        (tok_dir / "vocab.json").write_text(vocab.read_text())
        (tok_dir / "merges.txt").write_text(merges.read_text())
    return folder


def write_coco_captions(path: Path, num_images: int = 12, per_image: int = 5, seed: int = 0) -> Path:
    """A captions_val2014.json-shaped file: info, images, licenses, annotations {image_id, id, caption}."""
    rng = np.random.default_rng(seed)
    words = ["a", "cat", "dog", "on", "the", "red", "bus", "sitting", "near", "table", "with", "two", "people"]
    images = [{"id": 100 + i, "file_name": f"COCO_val2014_{100 + i:012d}.jpg", "height": 480, "width": 640}
              for i in range(num_images)]
    annotations = []
    for i, image in enumerate(images):
        for j in range(per_image):
            caption = " ".join(rng.choice(words, size=int(rng.integers(3, 9)))).capitalize() + "."
            annotations.append({"image_id": image["id"], "id": 1000 + i * per_image + j, "caption": caption})
    rng.shuffle(annotations)  # the real file is not sorted by id either
    data = {"info": {"description": "tiny COCO replica"}, "images": images, "licenses": [], "annotations": annotations}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def make_tiny_ddpm_pipeline(folder: Path, image_size: int = 8, seed: int = 0) -> Path:
    """Save ``DDPMPipeline(unet, scheduler)`` the way google/ddpm-cifar10-32 and google/ddpm-church-256 are published."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=image_size, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder


def blob_images(num: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 NHWC RGB images of smooth coloured blobs: a stand-in for real photographs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    cy, cx = rng.uniform(0.2, 0.8, (2, num))
    radius = rng.uniform(0.05, 0.2, num)
    blob = np.exp(-((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2) / radius[:, None, None])
    colour = rng.uniform(0, 1, (num, 1, 1, 3))
    return (255 * blob[..., None] * colour).astype(np.uint8)


def write_png_folder(folder: Path, images: np.ndarray) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    return folder


def write_image_npz(path: Path, images: np.ndarray) -> Path:
    """An .npz of uint8 NHWC images under 'arr_0' (the layout of ADM's sample and reference batches)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, arr_0=images)
    return path
