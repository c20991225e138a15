"""Toy denoisers, all under ddil's contract denoiser(x_t, t, cond, w) -> eps_hat.

AnalyticTeacher  the exact eps of every noisy marginal of a Gaussian mixture (classifier-free guidance
                 built in when a class is given), so the teacher is not a source of error.
MLPDenoiser      the students: a small MLP with sinusoidal time, class and guidance embeddings. It is
                 v-parameterised inside (eps = sigma x + alpha v), which is well conditioned at both ends
                 of the schedule; what it returns is eps, as a Stable Diffusion UNet does.
fit_to_teacher   regresses an MLPDenoiser onto the analytic teacher: the "network teacher" that every
                 student starts from, as SD students start from a copy of the teacher UNet.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

import ddil
from toy import mixtures


class AnalyticTeacher:
    """Exact eps(x_t, t) = -sigma_t grad log p_t(x_t) of the mixture's noisy marginal. With class labels
    `cond` (B,) and guidance w (B,): eps = eps_c + w (eps_c - eps_u); label -1 means unconditional.
    alpha_t and sigma_t come from tables indexed by t + 1 (entry 0 is clean, t = -1), so a call costs one pass
    of mixtures.exact_eps_guided and no schedule arithmetic. They hold the float32 values ddil.alpha_sigma gives
    float32 states: the teacher sees the alpha_t, sigma_t that made x_t."""

    def __init__(self, gmm: mixtures.GMM, alpha_bar: Tensor):
        self.gmm, self.alpha_bar = gmm, alpha_bar
        ab = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar.double().cpu()])  # (T + 1,) clean first
        self.table = torch.stack([ab.sqrt(), (1 - ab).sqrt()]).float().double()  # (2, T + 1): alpha_t, sigma_t
        self.alpha_table, self.sigma_table = self.table  # views, by name
        self.nfe = 0  # sample-evaluations so far (a batch of B counts B), for cost accounting

    def __call__(self, x_t: Tensor, t: Tensor, cond=None, w=None) -> Tensor:
        self.nfe += x_t.shape[0]
        table = self.table if x_t.device.type == "cpu" else self.table.to(x_t.device)
        alpha, sigma = table.index_select(1, t.to(x_t.device) + 1)  # (B,) each
        return mixtures.exact_eps_guided(self.gmm, x_t, alpha, sigma, cond, w)


def count_nfe(module: nn.Module) -> list:
    """Count a module's sample-evaluations (forward passes x batch size) in a one-element list."""
    counter = [0]
    module.register_forward_pre_hook(lambda m, args: counter.__setitem__(0, counter[0] + args[0].shape[0]))
    return counter


def fresh_copy(module: nn.Module) -> nn.Module:
    """A deep copy without the original's hooks, so copies (EMA target, fake score, PD's round teacher)
    are not counted as the student."""
    out = copy.deepcopy(module)
    out._forward_pre_hooks.clear()
    return out


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of the integer timestep (Vaswani et al. 2017; DDPM), (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    arg = t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


class MLPDenoiser(nn.Module):
    """Student network: h = W_x x + W_e [emb(t) + emb(class) + emb(w)], then an MLP -> v, returned as eps.
    Projecting x and the embeddings separately (rather than concatenating x with 32 embedding dims)
    matters: the concatenated version barely learns the sharp toy scores."""

    def __init__(self, alpha_bar: Tensor, dim: int = 2, width: int = 128, depth: int = 3,
                 num_classes: int = 0, w_embed: bool = False, emb: int = 32):
        super().__init__()
        self.register_buffer("alpha_bar", alpha_bar.float(), persistent=False)
        # per-timestep constants, looked up rather than recomputed each call; row t + 1 is timestep t (row 0: clean)
        ab = torch.cat([torch.ones(1), alpha_bar.float()])  # (T + 1,)
        self.register_buffer("alpha_table", ab.sqrt(), persistent=False)  # the values ddil.alpha_sigma gives
        self.register_buffer("sigma_table", (1 - ab).sqrt(), persistent=False)
        self.register_buffer("temb_table", timestep_embedding(torch.arange(-1, len(alpha_bar)), emb), persistent=False)
        self.emb, self.num_classes = emb, num_classes
        self.class_emb = nn.Embedding(num_classes + 1, emb) if num_classes else None  # last id = null class
        self.w_proj = nn.Linear(emb, emb) if w_embed else None
        if self.w_proj is not None:  # zero-init: the new w-condition starts as a no-op (as diffusers' LCM does)
            nn.init.zeros_(self.w_proj.weight), nn.init.zeros_(self.w_proj.bias)
        self.x_in, self.emb_in = nn.Linear(dim, width), nn.Linear(emb, width)
        layers = []
        for _ in range(depth - 1):
            layers += [nn.SiLU(), nn.Linear(width, width)]
        self.net = nn.Sequential(*layers, nn.SiLU(), nn.Linear(width, dim))

    def features(self, x_t: Tensor, t: Tensor, cond=None, w=None) -> Tensor:
        """The last hidden layer (B, width): what DMD2's discriminator head reads from the fake score."""
        return self.net[:-1](self._hidden_in(x_t, t, cond, w))

    def forward(self, x_t: Tensor, t: Tensor, cond=None, w=None) -> Tensor:
        v = self.net(self._hidden_in(x_t, t, cond, w))  # (B, dim)
        alpha, sigma = (ddil.append_dims(table[t + 1], x_t.ndim) for table in (self.alpha_table, self.sigma_table))
        return ddil.v_to_eps(x_t, v, alpha, sigma)

    def _hidden_in(self, x_t: Tensor, t: Tensor, cond, w) -> Tensor:
        e = self.temb_table[t + 1]  # (B, emb) timestep_embedding(t)
        if self.class_emb is not None:
            label = torch.full_like(t, self.num_classes) if cond is None else torch.where(cond >= 0, cond, self.num_classes)
            e = e + self.class_emb(label)
        if self.w_proj is not None and w is not None:
            e = e + self.w_proj(ddil.guidance_scale_embedding(w, self.emb))
        return self.x_in(x_t) + self.emb_in(e)  # (B, width)


def fit_to_teacher(model: MLPDenoiser, teacher: AnalyticTeacher, steps: int, batch: int, lr: float,
                   gen: torch.Generator, p_uncond: float = 0.1) -> MLPDenoiser:
    """Regress the network on the exact teacher's eps, ||eps_hat - eps*||^2 (the DDPM loss with the exact
    target), at x_t ~ q(x_t | x_0), t ~ U{0..T-1}. Conditional models see the null class with prob p_uncond."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    T = teacher.alpha_bar.shape[0]
    for _ in range(steps):
        cls = None
        if model.num_classes:
            x0, comp = mixtures.sample(teacher.gmm, batch, gen)
            cls = teacher.gmm.labels[comp]
            cls = torch.where(torch.rand(batch, generator=gen) < p_uncond, -1, cls)
        else:
            x0, _ = mixtures.sample(teacher.gmm, batch, gen)
        t = torch.randint(0, T, (batch,), generator=gen)
        x_t = ddil.q_sample(x0, t, torch.randn(x0.shape, generator=gen), teacher.alpha_bar)
        with torch.no_grad():
            eps = teacher(x_t, t, cls)
        loss = (model(x_t, t, cls) - eps).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model
