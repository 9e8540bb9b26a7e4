"""PyTorch eager reference of the SCDM conditional U-Net and its sampler step.

Mirrors hsijax/scdm/unet.py (same parameters and function; submodule names equal the flax
names so `benchmarks.torch_ref.load_flax_params` copies weights 1:1), written in the authors'
(DDPM PyTorch) style: NCHW tensors, 1x1 convolutions for attention, eager ops, the sampler a
Python loop of `torch.no_grad()` steps. Both encoder streams (noisy input and condition) go
through the shared encoder in one batched call, and ICMG evaluates the conditional and
unconditional predictions as one 2N batch.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.torch_ref import timestep_embedding

TORCH_GROUPNORM_EPS = 1e-5


def group_count(channels: int, groups: int) -> int:
  """Largest number of groups <= `groups` dividing `channels` (as the flax U-Net)."""
  g = max(1, min(int(groups), int(channels)))
  while channels % g:
    g -= 1
  return g


def _norm(c: int, groups: int) -> nn.GroupNorm:
  return nn.GroupNorm(group_count(c, groups), c, eps=TORCH_GROUPNORM_EPS)


class Attention(nn.Module):
  """GroupNorm, qkv 1x1 conv, softmax(q^T k / sqrt(C)) over pixels, out 1x1 conv, residual."""

  def __init__(self, c: int, groups: int):
    super().__init__()
    self.norm = _norm(c, groups)
    self.qkv = nn.Conv2d(c, 3 * c, 1)
    self.out = nn.Conv2d(c, c, 1)

  def forward(self, h: torch.Tensor) -> torch.Tensor:
    n, c, hh, ww = h.shape
    q, k, v = self.qkv(self.norm(h)).reshape(n, 3 * c, hh * ww).chunk(3, dim=1)
    w = torch.bmm(q.transpose(1, 2), k) * (c ** -0.5)               # (n, q, k)
    w = torch.softmax(w, dim=-1)
    out = torch.bmm(v, w.transpose(1, 2)).reshape(n, c, hh, ww)
    return h + self.out(out)


class ResBlock(nn.Module):
  """GN, SiLU, conv, + time bias, GN, SiLU, dropout, conv, + skip [, attention]."""

  def __init__(self, c_in: int, c_out: int, temb_dim: int, groups: int, dropout: float,
               attention: bool):
    super().__init__()
    self.norm1 = _norm(c_in, groups)
    self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
    self.time = nn.Linear(temb_dim, c_out)
    self.norm2 = _norm(c_out, groups)
    self.drop = nn.Dropout(dropout)
    self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
    if c_in != c_out:
      self.skip = nn.Conv2d(c_in, c_out, 1)
    if attention:
      self.attn = Attention(c_out, groups)

  def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    x = self.conv1(F.silu(self.norm1(h)))
    x = x + self.time(F.silu(temb))[:, :, None, None]
    x = self.conv2(self.drop(F.silu(self.norm2(x))))
    x = x + (self.skip(h) if hasattr(self, "skip") else h)
    return self.attn(x) if hasattr(self, "attn") else x


class Downsample(nn.Module):

  def __init__(self, c: int):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

  def forward(self, h: torch.Tensor) -> torch.Tensor:
    return self.conv(h)


class Upsample(nn.Module):

  def __init__(self, c: int):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, padding=1)

  def forward(self, h: torch.Tensor) -> torch.Tensor:
    return self.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))


class _TimeEmbed(nn.Module):

  def __init__(self, dim: int):
    super().__init__()
    self.dim = dim
    self.dense0 = nn.Linear(dim, 4 * dim)
    self.dense1 = nn.Linear(4 * dim, 4 * dim)

  def forward(self, t: torch.Tensor) -> torch.Tensor:
    return self.dense1(F.silu(self.dense0(timestep_embedding(t, self.dim))))


class CondUNet(nn.Module):
  """Conditional U-Net, NCHW: x (N, C_out, H, W), cond (N, C_cond, H, W), t (N,)."""

  def __init__(self, out_channels: int, cond_channels: int, base: int = 128,
               channel_mults: Sequence[int] = (1, 2, 2, 2, 2, 2, 2), num_res_down: int = 2,
               num_res_up: int = 3, attn_levels: Sequence[int] = (3,), mid_attn: bool = True,
               dropout: float = 0.1, groups: int = 32):
    super().__init__()
    if num_res_up != num_res_down + 1:
      raise ValueError(f"num_res_up ({num_res_up}) must equal num_res_down + 1")
    self.num_res_down, self.num_res_up = num_res_down, num_res_up
    self.mults = tuple(channel_mults)
    E = 4 * base
    self.time_embed = _TimeEmbed(base)
    self.conv_in = nn.Conv2d(out_channels, base, 3, padding=1)
    self.cond_in = nn.Conv2d(cond_channels, base, 3, padding=1)
    last = len(self.mults) - 1

    self.encoder = nn.ModuleDict()
    chans = [base]
    c = base
    for level, mult in enumerate(self.mults):
      for j in range(num_res_down):
        self.encoder[f"level{level}_res{j}"] = ResBlock(c, base * mult, E, groups, dropout,
                                                        level in attn_levels)
        c = base * mult
        chans.append(c)
      if level != last:
        self.encoder[f"level{level}_down"] = Downsample(c)
        chans.append(c)

    self.middle = nn.ModuleDict({
        "res0": ResBlock(c, c, E, groups, dropout, mid_attn),
        "res1": ResBlock(c, c, E, groups, dropout, False)})

    self.decoder = nn.ModuleDict()
    for level in reversed(range(len(self.mults))):
      for j in range(num_res_up):
        skip = chans.pop()
        self.decoder[f"level{level}_res{j}"] = ResBlock(c + 2 * skip, base * self.mults[level],
                                                        E, groups, dropout,
                                                        level in attn_levels)
        c = base * self.mults[level]
      if level != 0:
        self.decoder[f"level{level}_up"] = Upsample(c)
    self.norm_out = _norm(c, groups)
    self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

  def forward(self, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    temb = self.time_embed(t.expand(n) if t.ndim == 0 else t)
    # Shared encoder: both streams in one call on a (2N, ...) batch.
    h = torch.cat([self.conv_in(x), self.cond_in(cond)], dim=0)
    temb2 = torch.cat([temb, temb], dim=0)
    skips = [h]
    last = len(self.mults) - 1
    for level in range(len(self.mults)):
      for j in range(self.num_res_down):
        h = self.encoder[f"level{level}_res{j}"](h, temb2)
        skips.append(h)
      if level != last:
        h = self.encoder[f"level{level}_down"](h)
        skips.append(h)
    h = self.middle["res1"](self.middle["res0"](h[:n], temb), temb)
    for level in reversed(range(len(self.mults))):
      for j in range(self.num_res_up):
        s = skips.pop()
        h = torch.cat([h, s[:n], s[n:]], dim=1)
        h = self.decoder[f"level{level}_res{j}"](h, temb)
      if level != 0:
        h = self.decoder[f"level{level}_up"](h)
    return self.conv_out(F.silu(self.norm_out(h)))


def _coef(schedule: Any, name: str) -> torch.Tensor:
  return torch.from_numpy(np.asarray(getattr(schedule, name), dtype=np.float32).copy())


def pdt_clamp(a: torch.Tensor, p: float) -> torch.Tensor:
  """Per-sample clamp to [-tau, tau], tau = max(1, quantile(|a|, p)) (PDT)."""
  q = torch.quantile(a.abs().reshape(a.shape[0], -1), p, dim=1)
  tau = torch.clamp(q, min=1.0)[:, None, None, None]
  return torch.maximum(torch.minimum(a, tau), -tau)


class Sampler:
  """DDPM / DDIM sampling with optional ICMG guidance and PDT, one eager step at a time.

  Args:
    model: CondUNet (set to eval mode).
    schedule: object with (n,) arrays timesteps, betas, alphas_cumprod, alphas_cumprod_prev,
      sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, posterior_mean_coef1/2.
    guidance_scale: ICMG s (0 = no guidance, one batch; > 0: cond and zero-cond as 2N).
    pdt_target: None, "eps" or "x"; pdt_p_T: percentile at the first (noisiest) step.
  """

  def __init__(self, model: CondUNet, schedule: Any, *, method: str = "ddpm",
               guidance_scale: float = 0.0, pdt_target: str | None = None,
               pdt_p_T: float = 1.0, eta: float = 0.0, seed: int = 0):
    if method not in ("ddpm", "ddim"):
      raise ValueError(f"unknown method {method!r}; use 'ddpm' or 'ddim'")
    self.model = model.eval()
    self.method, self.scale, self.eta = method, guidance_scale, eta
    self.pdt_target, self.pdt_p_T = pdt_target, pdt_p_T
    names = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
             "sqrt_one_minus_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2")
    self.c = {k: _coef(schedule, k) for k in names}
    self.timesteps = torch.from_numpy(np.asarray(schedule.timesteps, dtype=np.int64))
    self.n = len(self.timesteps)
    self.num_timesteps = int(self.timesteps[-1]) + 1  # a respaced chain keeps T - 1
    self.gen = torch.Generator().manual_seed(seed)

  def percentile(self, i: int) -> float:
    """p linear in the original timestep t of position i: p_T at t = T - 1, 1.0 at t = 0."""
    t = float(self.timesteps[i])
    return 1.0 - (1.0 - self.pdt_p_T) * t / max(self.num_timesteps - 1, 1)

  def eps(self, x: torch.Tensor, cond: torch.Tensor, i: int) -> torch.Tensor:
    t = self.timesteps[i].expand(x.shape[0])
    if self.scale:
      out = self.model(torch.cat([x, x]), torch.cat([cond, torch.zeros_like(cond)]),
                       torch.cat([t, t]))
      eps_c, eps_0 = out.chunk(2)
      return eps_c + self.scale * (eps_c - eps_0)
    return self.model(x, cond, t)

  @torch.no_grad()
  def step(self, x: torch.Tensor, cond: torch.Tensor, i: int,
           noise: torch.Tensor | None = None) -> torch.Tensor:
    """x_t -> x_{t-1} at schedule position i (NCHW tensors; noise drawn when not given)."""
    c = self.c
    p = self.percentile(i)
    if self.pdt_target == "x":
      x = pdt_clamp(x, p)
    eps = self.eps(x, cond, i)
    if self.pdt_target == "eps":
      eps = pdt_clamp(eps, p)
    x0 = (x - c["sqrt_one_minus_alphas_cumprod"][i] * eps) / c["sqrt_alphas_cumprod"][i]
    if noise is None:
      noise = torch.randn(x.shape, generator=self.gen)
    if self.method == "ddpm":
      mean = c["posterior_mean_coef1"][i] * x0 + c["posterior_mean_coef2"][i] * x
      return mean + (torch.sqrt(c["betas"][i]) if i > 0 else 0.0) * noise
    abar, abar_prev = c["alphas_cumprod"][i], c["alphas_cumprod_prev"][i]
    sigma = self.eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * \
        torch.sqrt(1 - abar / abar_prev)
    return torch.sqrt(abar_prev) * x0 + \
        torch.sqrt(torch.clamp(1 - abar_prev - sigma ** 2, min=0.0)) * eps + sigma * noise

  @torch.no_grad()
  def sample(self, cond: torch.Tensor, out_channels: int,
             positions: Sequence[int] | None = None) -> torch.Tensor:
    """Runs the reverse chain (default positions n-1 .. 0) from Gaussian noise."""
    n, _, hh, ww = cond.shape
    x = torch.randn((n, out_channels, hh, ww), generator=self.gen)
    for i in (range(self.n - 1, -1, -1) if positions is None else positions):
      x = self.step(x, cond, i)
    return x
