"""Stable Diffusion pipelines built from configs, without a download: a TINY one for tests and CPU smoke runs,
and the full SD v1.5 architecture with random weights (`python -m sd.train --init random`).

    python -m sd.tiny results/sd-tiny-model     # writes a StableDiffusionPipeline folder (about 5 MB)

The tokenizer is a byte-level CLIP BPE with no merges, written locally: every byte is a token. It runs the same
CLIPTokenizer code as SD's own, so prompts of up to 75 bytes survive; longer ones are truncated.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

# ----------------------------------------------------------------------------------------------------
# Configs. SD15_* are the values of stable-diffusion-v1-5/stable-diffusion-v1-5 (unet, vae, text_encoder, scheduler).

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0)
SD15_VAE = dict(
    sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)

TINY_UNET = dict(  # 16x16 images -> 8x8 latents (the tiny VAE downsamples by 2)
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
TINY_VAE = dict(
    sample_size=16, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
    block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TINY_TEXT = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, projection_dim=32)
TINY_RESOLUTION = 16  # the image size the tiny pipeline makes


# ----------------------------------------------------------------------------------------------------
# Tokenizer and pipeline


def byte_vocab() -> dict[str, int]:
    """CLIP's byte-level alphabet (GPT-2's bytes_to_unicode), each byte alone and as a word end '</w>'."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = [chr(b) for b in bs] + [chr(256 + i) for i in range(256 - len(bs))]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars + [c + "</w>" for c in chars]:
        vocab[c] = len(vocab)
    return vocab  # 514 tokens


def byte_tokenizer():
    """A CLIPTokenizer over byte_vocab with no merges, padded to 77 tokens like SD's."""
    from transformers import CLIPTokenizer
    return CLIPTokenizer(vocab=byte_vocab(), merges=[], model_max_length=77)


def build_pipeline(unet: dict, vae: dict, text: dict, seed: int = 0):
    """A StableDiffusionPipeline with random weights (seeded) from the given configs. Same seed, same weights."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    tok = byte_tokenizer()
    torch.manual_seed(seed)
    text_cfg = CLIPTextConfig(**text, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**vae), text_encoder=CLIPTextModel(text_cfg), tokenizer=tok, unet=UNet2DConditionModel(**unet),
        scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_tiny(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline to `path` with save_pretrained, so it loads through from_pretrained like SD."""
    build_pipeline(TINY_UNET, TINY_VAE, TINY_TEXT, seed).save_pretrained(path)
    return Path(path)


def main(argv=None) -> int:
    from sd.config import InputError, Parser, check_output
    p = Parser(prog="python -m sd.tiny",
               description="Save a tiny random-weight StableDiffusionPipeline (built from config, no download) to "
                           "OUT_DIR. Its images are noise: it checks that the code runs, not image quality.")
    p.add_argument("out_dir", type=Path, help="folder to save_pretrained the pipeline into")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights, >= 0")
    a = p.parse_args(argv)  # --help exits 0; a bad flag exits 2 with one line
    try:
        if a.seed < 0:
            raise InputError(f"--seed {a.seed}: must be >= 0")
        check_output("OUT_DIR", str(a.out_dir), folder=True)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(save_tiny(a.out_dir, a.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
