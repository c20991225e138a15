"""Stable Diffusion UNets under ddil's denoiser contract, denoiser(x_t, t, cond, w) -> eps_hat.

x_t are VAE latents (B, 4, h, w) times vae.config.scaling_factor; t (B,) long; cond (B,) long PROMPT IDS into an
EmbeddingCache (so ddil.ReplayBuffer stores ids, not (77, 768) embeddings); w (B,) guidance scale or None.
Each adapter is a small class that overrides one method, in the manner of k-diffusion's external.py.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn

import ddil

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]  # diffusers' LCM-LoRA


class EmbeddingCache:
    """CLIP text embeddings of P prompts (P, 77, D) and of the empty prompt (1, 77, D), computed once."""

    def __init__(self, embeds: Tensor, uncond: Tensor):
        self.embeds, self.uncond_embed = embeds, uncond

    @classmethod
    @torch.no_grad()
    def from_prompts(cls, prompts: list[str], tokenizer, text_encoder, batch: int = 64) -> "EmbeddingCache":
        def encode(texts):
            ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(text_encoder.device)
            return text_encoder(ids)[0]  # (n, 77, D): last hidden state, as SD pipelines use it
        embeds = torch.cat([encode(prompts[i : i + batch]) for i in range(0, len(prompts), batch)])
        return cls(embeds, encode([""]))

    def __call__(self, ids: Tensor) -> Tensor:
        return self.embeds[ids.to(self.embeds.device)]  # (B, 77, D)

    def uncond(self, n: int) -> Tensor:
        return self.uncond_embed.expand(n, -1, -1)  # (B, 77, D)


class Teacher(nn.Module):
    """A frozen SD UNet with classifier-free guidance, cond and uncond in ONE batched call:
    eps = eps_c + w (eps_c - eps_u) (ddil's convention; a pipeline's guidance_scale is w + 1). w None: cond only."""

    def __init__(self, unet, cache: EmbeddingCache):
        super().__init__()
        self.unet, self.cache = unet.eval().requires_grad_(False), cache

    def forward(self, x: Tensor, t: Tensor, cond: Tensor, w: Optional[Tensor]) -> Tensor:
        dt = self.unet.dtype
        if w is None:
            return self.unet(x.to(dt), t, encoder_hidden_states=self.cache(cond).to(dt)).sample.to(x.dtype)
        ctx = torch.cat([self.cache(cond), self.cache.uncond(len(x))]).to(dt)  # (2B, 77, D)
        eps = self.unet(torch.cat([x, x]).to(dt), torch.cat([t, t]), encoder_hidden_states=ctx).sample.to(x.dtype)
        eps_c, eps_u = eps.chunk(2)  # (B, ...) each; guidance in the states' precision
        return eps_c + ddil.append_dims(w.to(x), x.ndim) * (eps_c - eps_u)


class Student(nn.Module):
    """A trainable SD UNet. If its config has time_cond_proj_dim (LCM), w enters as LCM's w-embedding
    ddil.guidance_scale_embedding(w) through `timestep_cond`, as diffusers' LCM pipelines feed it; else w is ignored."""

    def __init__(self, unet, cache: EmbeddingCache):
        super().__init__()
        self.unet, self.cache = unet, cache

    def forward(self, x: Tensor, t: Tensor, cond: Tensor, w: Optional[Tensor]) -> Tensor:
        dim = self.unet.config.time_cond_proj_dim
        emb = ddil.guidance_scale_embedding(w, dim).to(x) if dim is not None and w is not None else None
        return self.unet(x, t, encoder_hidden_states=self.cache(cond).to(x), timestep_cond=emb).sample.to(x.dtype)


class VStudent(Student):
    """A Student whose UNet predicts v = alpha eps - sigma x0 (Salimans & Ho 2022, Appendix D; diffusers'
    prediction_type 'v_prediction'), returned as ddil's eps = sigma x_t + alpha v."""

    def __init__(self, unet, cache: EmbeddingCache, alpha_bar: Tensor):
        super().__init__(unet, cache)
        self.alpha_bar = alpha_bar  # (T,) float64, the schedule v is defined on

    def forward(self, x: Tensor, t: Tensor, cond: Tensor, w: Optional[Tensor]) -> Tensor:
        return ddil.v_to_eps(x, super().forward(x, t, cond, w), *ddil.alpha_sigma(self.alpha_bar, t, x))


class FakeScore(Student):
    """DMD2's fake score (a Student UNet, w ignored) with the optional GAN classifier on its mid-block features:
    disc(x_t, t, cond) -> logits (B,). The head sits in this module, so DDP syncs its gradients with the UNet's."""

    def __init__(self, unet, cache: EmbeddingCache, gan: bool):
        super().__init__(unet, cache)
        c = unet.config.block_out_channels[-1]
        self.head = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(32 if c % 32 == 0 else 1, c), nn.SiLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 1)) if gan else None
        self._features: Optional[Tensor] = None
        unet.mid_block.register_forward_hook(lambda m, args, out: setattr(self, "_features", out))

    def disc(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        self(x, t, cond, None)  # fills self._features (B, C, h, w) through the hook
        return self.head(self._features.float())[:, 0]


# ----------------------------------------------------------------------------------------------------
# Building the networks


def student_unet(teacher_unet, w_embed: bool, w_dim: int = 256):
    """A trainable fp32 copy of the teacher UNet. w_embed: add LCM's w-condition (time_cond_proj_dim), whose new
    projection starts at random and the rest at the teacher's weights (as diffusers' LCM distillation)."""
    from diffusers import UNet2DConditionModel
    extra = dict(time_cond_proj_dim=w_dim) if w_embed and teacher_unet.config.time_cond_proj_dim is None else {}
    unet = UNet2DConditionModel.from_config(teacher_unet.config, **extra)
    unet.load_state_dict(teacher_unet.state_dict(), strict=not extra)
    return unet.float().train()


def add_lora(unet, rank: int):
    """Freeze the UNet and add LoRA adapters of the given rank (diffusers' LCM-LoRA targets, alpha = rank)."""
    from peft import LoraConfig
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights="gaussian"))
    return unet


def plain_unet(unet):
    """A stock UNet2DConditionModel to save: the UNet itself, or for LoRA a copy with the adapters merged in."""
    if not getattr(unet, "peft_config", None):
        return unet
    out = copy.deepcopy(unet)
    out.fuse_lora()
    out.unload_lora()
    return out


def frozen_copy(unet):
    """LCM's EMA target network theta^-: a copy with gradients off."""
    return copy.deepcopy(unet).requires_grad_(False)


def alpha_bar_of(scheduler_config: dict) -> Tensor:
    """alpha_bar from a pipeline's scheduler config (DDPMScheduler computes it), float64 for ddil."""
    from diffusers import DDPMScheduler
    return DDPMScheduler.from_config(scheduler_config).alphas_cumprod.double()
