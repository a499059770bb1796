"""Tiny random DiT, SD3 and Flux pipeline folders, saved by diffusers' own save_pretrained (the published layouts).

Text encoders are tiny CLIPs (a letter-and-digit BPE vocab written here, tests/replicas.py) and a tiny T5
whose tokenizer is a Unigram vocabulary built in the test (no sentencepiece file needed).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from replicas import SPECIAL_TOKENS, write_clip_vocab

IMAGE_SIZE = 32  # pixels; the VAE halves three times: 4 x 4 latents
TEXT_LENGTH = 16


def _vae(latent_channels: int, **extra: float) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=IMAGE_SIZE, **extra)


def _clip(folder: Path, with_projection: bool, hidden: int = 16):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab, merges = write_clip_vocab(folder.parent / f"{folder.name}-vocab")
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=TEXT_LENGTH)
    bos, eos = (tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=TEXT_LENGTH, projection_dim=hidden,
                            bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config), tokenizer


def _t5(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in string.ascii_lowercase + string.digits] + [("\u2581" + c, -3.5) for c in string.ascii_lowercase]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)
    config = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(config), tokenizer


def make_tiny_dit_pipeline(folder: Path, seed: int = 0) -> Path:
    """facebook/DiT-XL-2-256 layout: transformer/ (learned sigma, 1000 classes + null), vae/, scheduler/."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=4, patch_size=2, num_embeds_ada_norm=1000)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                              set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    DiTPipeline(transformer=transformer, vae=_vae(4), scheduler=scheduler).save_pretrained(folder)
    return folder


def make_tiny_sd3_pipeline(folder: Path, seed: int = 0, shift: float = 3.0) -> Path:
    """stabilityai/stable-diffusion-3-medium-diffusers layout: transformer, vae, three text encoders and tokenizers."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    enc1, tok1 = _clip(folder, True)
    enc2, tok2 = _clip(folder, True)
    enc3, tok3 = _t5(32)
    transformer = SD3Transformer2DModel(sample_size=4, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                        pooled_projection_dim=32, out_channels=4)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                                    vae=_vae(4, shift_factor=0.1, scaling_factor=1.5), text_encoder=enc1, tokenizer=tok1,
                                    text_encoder_2=enc2, tokenizer_2=tok2, text_encoder_3=enc3, tokenizer_3=tok3)
    pipe.save_pretrained(folder)
    return folder


def make_tiny_flux_pipeline(folder: Path, seed: int = 0) -> Path:
    """black-forest-labs/FLUX.1-dev layout: transformer (guidance embedding), vae, CLIP + T5, dynamic shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    enc1, tok1 = _clip(folder, False)
    enc2, tok2 = _t5(32)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=_vae(4, shift_factor=0.1, scaling_factor=1.5),
                        text_encoder=enc1, tokenizer=tok1, text_encoder_2=enc2, tokenizer_2=tok2)
    pipe.save_pretrained(folder)
    return folder
