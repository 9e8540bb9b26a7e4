"""PyTorch eager reference of SDP: spectral denoiser, one training step, solver timesteps.

Mirrors hsijax/sdp/denoiser.py (same parameters, same function) but computed the way the
authors' code does: `Linear(concat(h, x))` with the concatenation materialised, per-op
eager execution, a Python loop over timesteps and over the K inner Adam steps.
The solver's image X lives as a (1, B, H, W) tensor (torch's NCHW), so the degradation is one
grouped strided convolution `F.conv2d(X, psf, stride=ratio, groups=B)`, and the network sees
the (H W, B) view of it.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.torch_ref import timestep_embedding

TORCH_LAYERNORM_EPS = 1e-5


class SpectralDenoiser(nn.Module):
  """eps_theta(x_t, t): (N, B) spectra -> (N, B), same layout as the flax module.

  Submodule names equal the flax parameter names (time_0, time_1, layer_i, cond_i, norm_i).
  """

  def __init__(self, num_bands: int, hidden: int = 512, num_layers: int = 5,
               time_dim: int = 64, dropout: float = 0.001):
    super().__init__()
    if num_layers < 2:
      raise ValueError(f"num_layers must be >= 2, got {num_layers}")
    B, H, L = num_bands, hidden, num_layers
    self.num_bands, self.hidden, self.num_layers, self.time_dim = B, H, L, time_dim
    self.time_0 = nn.Linear(time_dim, B)
    self.time_1 = nn.Linear(B, B)
    for i in range(L):
      fan_in = B if i == 0 else H + B
      setattr(self, f"layer_{i}", nn.Linear(fan_in, H if i < L - 1 else B))
    for i in range(L - 1):
      setattr(self, f"cond_{i}", nn.Linear(B, H))
      setattr(self, f"norm_{i}", nn.LayerNorm(H, eps=TORCH_LAYERNORM_EPS))
    self.drop = nn.Dropout(dropout)
    for m in self.modules():  # Xavier-normal weights, zero biases (as the flax init)
      if isinstance(m, nn.Linear):
        nn.init.xavier_normal_(m.weight)
        nn.init.zeros_(m.bias)

  def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x: (N, B); t: scalar tensor (shared timestep, condition computed once) or (N,)."""
    c = self.time_1(F.silu(self.time_0(timestep_embedding(t, self.time_dim))))
    act_c = F.silu(c)
    h = x
    for i in range(self.num_layers):
      layer = getattr(self, f"layer_{i}")
      h = layer(h) if i == 0 else layer(torch.cat([h, x], dim=-1))
      if i == self.num_layers - 1:
        break
      s = getattr(self, f"cond_{i}")(act_c)
      h = h * (1.0 + s) + s
      h = getattr(self, f"norm_{i}")(h)
      h = self.drop(F.silu(h))
    return h


def _coef(schedule: Any, name: str) -> torch.Tensor:
  return torch.from_numpy(np.asarray(getattr(schedule, name), dtype=np.float32).copy())


def lr_lambda(step: int) -> float:
  """Authors' learning-rate multiplier: 0.001 * max(1000 - step / 10, 1)."""
  return 0.001 * max(1000.0 - step / 10.0, 1.0)


class SDMTrainer:
  """Spectral diffusion model training (authors' loop body): one `step()` per batch.

  Random batch of clean pixels, t ~ U[0, T), MSE(eps, eps_theta), torch Adam with L2
  weight decay, LambdaLR decay, EMA of the weights with torch._foreach ops.
  """

  def __init__(self, model: SpectralDenoiser, schedule: Any, pixels: np.ndarray, *,
               batch: int = 512, lr: float = 1e-2, weight_decay: float = 1e-6,
               ema_decay: float = 0.999, seed: int = 0):
    self.model = model.train()
    self.pixels = torch.from_numpy(np.asarray(pixels, dtype=np.float32))
    self.batch = batch
    self.sqrt_ab = _coef(schedule, "sqrt_alphas_cumprod")
    self.sqrt_1mab = _coef(schedule, "sqrt_one_minus_alphas_cumprod")
    self.timesteps = torch.from_numpy(np.asarray(schedule.timesteps, dtype=np.int64))
    self.opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda)
    self.ema = copy.deepcopy(model).eval().requires_grad_(False)
    self.ema_decay = ema_decay
    self.gen = torch.Generator().manual_seed(seed)

  def step(self) -> float:
    n = self.pixels.shape[0]
    idx = torch.randint(n, (self.batch,), generator=self.gen)
    x0 = self.pixels[idx]
    i = torch.randint(self.sqrt_ab.shape[0], (self.batch,), generator=self.gen)
    eps = torch.randn(x0.shape, generator=self.gen)
    x_t = self.sqrt_ab[i, None] * x0 + self.sqrt_1mab[i, None] * eps
    loss = F.mse_loss(self.model(x_t, self.timesteps[i]), eps)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    self.sched.step()
    with torch.no_grad():
      ema = list(self.ema.parameters())
      torch._foreach_lerp_(ema, list(self.model.parameters()), 1.0 - self.ema_decay)
    return float(loss.detach())


def blur_down(x: torch.Tensor, psf_weight: torch.Tensor, ratio: int) -> torch.Tensor:
  """(1, B, H, W) -> (1, B, H/r, W/r): per-band strided correlation with psf_weight
  (B, 1, k, k), zero padding (k-1)/2 (pass the flipped PSF for a true convolution)."""
  k = psf_weight.shape[-1]
  return F.conv2d(x, psf_weight, stride=ratio, padding=(k - 1) // 2, groups=x.shape[1])


class SDPSolver:
  """Algorithm 1 of SDP in eager PyTorch (Python loops over timesteps and inner steps).

  X is a (1, B, H, W) leaf tensor optimised by torch Adam (L2 weight decay); each inner step
  draws eps, forms x_t = sqrt(abar) X + sqrt(1 - abar) eps, evaluates
  lam ||blur_down(X) - Y||^2 + ||R X - Z||^2 + gam ||eps_theta(x_t, t) - eps||^2 (sums),
  back-propagates into X only (network frozen), steps Adam and clamps X to [0, 1]; the EMA of
  X (decay `ema_decay`) is updated after every inner step.

  Args:
    model: frozen SpectralDenoiser (moved to eval mode, requires_grad False).
    schedule: object with (n,) arrays sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
      timesteps (e.g. an hsijax.diffusion.Schedule).
    y: (h, w, B) LR-HSI; z: (H, W, b) HR-MSI; psf: (k, k); srf: (b, B).
  """

  def __init__(self, model: SpectralDenoiser, schedule: Any, y: np.ndarray, z: np.ndarray,
               psf: np.ndarray, srf: np.ndarray, *, ratio: int, lam: float = 0.1,
               gam: float = 1e-3, lr: float = 1e-3, K: int = 3, weight_decay: float = 1e-6,
               ema_decay: float = 0.9, x_init: np.ndarray | None = None, seed: int = 0):
    self.model = model.eval().requires_grad_(False)
    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    self.y = f32(y).permute(2, 0, 1)[None].contiguous()          # (1, B, h, w)
    self.z = f32(z).permute(2, 0, 1).contiguous()                # (b, H, W)
    B = self.y.shape[1]
    H, W = z.shape[:2]
    # hsijax.degrade.blur_down is a true convolution; F.conv2d correlates: flip the kernel.
    self.psf_weight = torch.flip(f32(psf), (0, 1))[None, None].repeat(B, 1, 1, 1)  # (B,1,k,k)
    self.srf = f32(srf)                                          # (b, B)
    self.ratio, self.lam, self.gam, self.K = ratio, lam, gam, K
    self.ema_decay = ema_decay
    self.sqrt_ab = _coef(schedule, "sqrt_alphas_cumprod")
    self.sqrt_1mab = _coef(schedule, "sqrt_one_minus_alphas_cumprod")
    self.timesteps = torch.from_numpy(np.asarray(schedule.timesteps, dtype=np.int64))
    x0 = torch.ones(1, B, H, W) if x_init is None else \
        f32(x_init).permute(2, 0, 1)[None].contiguous()
    self.X = x0.clone().requires_grad_(True)
    self.X_ema = x0.clone()
    self.opt = torch.optim.Adam([self.X], lr=lr, weight_decay=weight_decay)
    self.gen = torch.Generator().manual_seed(seed)

  def loss(self, X: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
    """Fusion loss (sums) for schedule position i; X, eps (1, B, H, W)."""
    B = X.shape[1]
    x_t = self.sqrt_ab[i] * X + self.sqrt_1mab[i] * eps
    pred = self.model(x_t.reshape(B, -1).t(), self.timesteps[i])   # (H W, B)
    data_y = ((blur_down(X, self.psf_weight, self.ratio) - self.y) ** 2).sum()
    data_z = ((torch.einsum("cb,bhw->chw", self.srf, X[0]) - self.z) ** 2).sum()
    prior = ((pred - eps.reshape(B, -1).t()) ** 2).sum()
    return self.lam * data_y + data_z + self.gam * prior

  def inner_step(self, i: int, eps: torch.Tensor | None = None) -> float:
    """One Adam step on X at schedule position i (eps drawn when not given)."""
    if eps is None:
      eps = torch.randn(self.X.shape, generator=self.gen)
    loss = self.loss(self.X, eps, i)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    with torch.no_grad():
      self.X.clamp_(0.0, 1.0)
      self.X_ema.lerp_(self.X, 1.0 - self.ema_decay)
    return float(loss.detach())

  def timestep(self, i: int) -> None:
    """One outer solver timestep: K inner Adam steps."""
    for _ in range(self.K):
      self.inner_step(i)

  def run(self, positions: list[int] | None = None) -> np.ndarray:
    """Runs the given schedule positions (default n-1 .. 0); returns the EMA as (H, W, B)."""
    if positions is None:
      positions = list(range(self.sqrt_ab.shape[0] - 1, -1, -1))
    for i in positions:
      self.timestep(i)
    return self.X_ema[0].permute(1, 2, 0).numpy()
