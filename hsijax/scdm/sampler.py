"""SCDM sampling: DDPM / DDIM with ICMG guidance and PDT truncation, one lax.scan per stage.

One reverse step at schedule position i (original timestep t = sched.timesteps[i]):

  p      = pdt_percentile(t, T, p_T)                   1 at t = 0 ... p_T at t = T - 1
  x_t    = pdt_clamp_x(x_t, p)                          only for pdt_target = "x" (code)
  eps_c, eps_0 = net(x_t | cond), net(x_t | 0)          ONE call, x_t's encoder shared
  eps    = eps_c + s (eps_c - eps_0)                    ICMG (s = 0: a single plain call)
  eps    = eps_from_v(x_t, eps)                         only for a v-prediction model
  eps    = pdt_clamp_eps(eps, p)                        only for pdt_target = "eps" (paper)
  x_{t-1} = DDPM ancestral step (sigma^2 = beta_t) or DDIM step (eta) on the schedule

PDT (per sample): tau = max(1, quantile(|v|, p)) over all pixels and bands of the sample,
v clamped to [-tau, tau]. The quantile is linear interpolation between order statistics
(jnp.quantile's default, torch.quantile's too). The two order statistics it needs are
found exactly by bisection on the float bits (`order_statistics`: 32 compare-and-count
passes, no sort): 1.9 ms for M = 200k values on this CPU vs 8.7 ms for lax.top_k of the
largest 12% and more for a full sort; `per_sample_quantile(..., method="sort")` sorts.

Before the scan a CondUNet's Winograd kernels (CPU, wide layers) are transformed once
(`kernels.cpu_conv.with_winograd_kernels`), not at every step.

Randomness: x_T = normal(k_init), the noise added at position i is normal(fold_in(k_noise,
i)) with (k_init, k_noise) = split(key): results do not depend on how the chain or the
batch is split over devices (threefry is partitionable), so a batch sharded over the mesh
`data` axis gives the single-device result. Every operation is per sample (the guided
batch interleaves cond / zero-cond rows per sample), so

    jax.jit(sample, in_shardings=(replicated, data_sharded, replicated),
            out_shardings=data_sharded)

needs no cross-device traffic besides the replicated parameters.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hsijax import diffusion, progress
from hsijax.scdm import cascade
from hsijax.kernels.cpu_conv import with_winograd_kernels
from hsijax.scdm.unet import CondUNet, deinterleave, interleave

PDT_TARGETS = (None, "eps", "x")


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """Per-stage sampling options.

  Attributes:
    method: "ddpm" (ancestral) or "ddim" (use a respaced schedule for fewer steps).
    guidance_scale: ICMG weight s (0 = plain conditional sampling, one network call).
    pdt_target: None or "none" (off), "eps" (paper: clamp the guided eps) or "x" (authors'
      code: clamp x_t before the network call).
    pdt_p_T: percentile at t = T - 1 (Houston 0.96 / 0.88, Pavia 0.97 / 0.90).
    eta: DDIM stochasticity (0 = deterministic).
    variance: DDPM sigma^2, "beta" (SCDM) or "posterior".
  """
  method: str = "ddpm"
  guidance_scale: float = 0.0
  pdt_target: str | None = None
  pdt_p_T: float = 1.0
  eta: float = 0.0
  variance: str = "beta"

  def __post_init__(self):
    if self.pdt_target in ("none", ""):  # config files spell "off" as a string
      object.__setattr__(self, "pdt_target", None)
    if self.method not in SAMPLERS:
      raise ValueError(f"unknown sampler {self.method!r}; choose one of {sorted(SAMPLERS)}")
    if self.pdt_target not in PDT_TARGETS:
      raise ValueError(f"unknown pdt_target {self.pdt_target!r}; use None, 'eps' or 'x'")
    if not 0.0 < float(self.pdt_p_T) <= 1.0:
      raise ValueError(f"pdt_p_T must be in (0, 1], got {self.pdt_p_T}")
    if self.variance not in ("beta", "posterior"):
      raise ValueError(f"unknown variance {self.variance!r}; use 'beta' or 'posterior'")


def as_settings(settings: Any) -> SamplerSettings:
  """SamplerSettings from a SamplerSettings, a dict or an ml_collections ConfigDict."""
  if isinstance(settings, SamplerSettings):
    return settings
  if settings is None:
    return SamplerSettings()
  if hasattr(settings, "to_dict"):
    settings = settings.to_dict()
  if not isinstance(settings, Mapping):
    raise ValueError(f"stage settings must be a dict or SamplerSettings, got "
                     f"{type(settings).__name__}")
  known = {f.name for f in dataclasses.fields(SamplerSettings)}
  unknown = set(settings) - known
  if unknown:
    raise ValueError(f"unknown sampler setting(s) {sorted(unknown)}; known: {sorted(known)}")
  return SamplerSettings(**settings)


# ----------------------------------------------------------------------------
# ICMG and PDT.


def icmg(eps_c: jax.Array, eps_0: jax.Array, scale: float | jax.Array) -> jax.Array:
  """Image Condition Mixture Guidance: eps_c + s (eps_c - eps_0)."""
  return eps_c + scale * (eps_c - eps_0)


def pdt_percentile(i: jax.Array | int, n: int, p_T: float) -> jax.Array:
  """p(i) linear in i: 1.0 at i = 0 and p_T at i = n - 1 (i, n: timestep and T)."""
  return 1.0 - (1.0 - p_T) * jnp.asarray(i, jnp.float32) / max(int(n) - 1, 1)


QUANTILE_METHODS = ("select", "sort")


def _sortable_bits(a: jax.Array) -> jax.Array:
  """float32 -> uint32 keys with the same order (negative floats flipped, sign bit set on rest)."""
  b = jax.lax.bitcast_convert_type(a.astype(jnp.float32), jnp.uint32)
  return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(0x80000000))


def _float_of_sortable(u: jax.Array) -> jax.Array:
  """Inverse of `_sortable_bits`."""
  b = jnp.where(u >> 31 == 1, u & jnp.uint32(0x7FFFFFFF), ~u)
  return jax.lax.bitcast_convert_type(b, jnp.float32)


def order_statistics(flat: jax.Array, ranks: jax.Array) -> jax.Array:
  """Exact order statistics per row, by bisection on the float bits (no sort).

  Value of ascending rank r (0-based) of row n is the smallest key u with
  #{keys <= u} >= r + 1; 32 halvings of the uint32 key range find it exactly. Each halving
  is one fused compare-and-count pass over the row, so the cost is 32 cheap passes, 4-7x
  faster on CPU than lax.top_k of the ~12% largest values (which it replaces) and
  independent of the rank.

  Args:
    flat: (N, M) float32 values.  ranks: (N, R) int32 ascending ranks in [0, M).

  Returns:
    (N, R) float32, row n's values at `ranks[n]` (what jnp.sort(flat)[n, ranks[n]] gives).
  """
  keys = _sortable_bits(flat)[:, None, :]                      # (N, 1, M)
  ranks = ranks.astype(jnp.int32)

  def halve(_, bounds):
    lo, hi = bounds                                            # answer in [lo, hi]
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(keys <= mid[..., None], axis=-1, dtype=jnp.int32) >= ranks + 1
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  start = (jnp.zeros(ranks.shape, jnp.uint32), jnp.full(ranks.shape, 0xFFFFFFFF, jnp.uint32))
  lo, _ = jax.lax.fori_loop(0, 32, halve, start)
  return _float_of_sortable(lo)


def per_sample_quantile(a: jax.Array, q: jax.Array | float,
                        method: str = "select") -> jax.Array:
  """Quantile q of each sample's values: (N, ...) -> (N,), linear interpolation.

  Same definition as jnp.quantile / torch.quantile (interpolation between the order
  statistics at floor(q (M - 1)) and the next). method "select": the two order statistics
  by `order_statistics` (exact, fast); "sort": a full sort of each sample (reference).
  """
  if method not in QUANTILE_METHODS:
    raise ValueError(f"unknown quantile method {method!r}; use one of {QUANTILE_METHODS}")
  flat = a.reshape(a.shape[0], -1)
  m = flat.shape[1]
  pos = jnp.asarray(q, jnp.float32) * (m - 1)
  lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, m - 1)
  hi = jnp.minimum(lo + 1, m - 1)
  frac = pos - lo.astype(jnp.float32)
  if method == "sort":
    s = jnp.sort(flat, axis=1)
    return s[:, lo] * (1.0 - frac) + s[:, hi] * frac
  ranks = jnp.broadcast_to(jnp.stack([lo, hi]), (flat.shape[0], 2))
  v = order_statistics(flat, ranks)
  return v[:, 0] * (1.0 - frac) + v[:, 1] * frac


def _pdt_clamp(v: jax.Array, p: jax.Array | float) -> jax.Array:
  tau = jnp.maximum(per_sample_quantile(jnp.abs(v), p), 1.0)
  tau = tau.reshape((-1,) + (1,) * (v.ndim - 1))
  return jnp.clip(v, -tau, tau)


def pdt_clamp_eps(eps: jax.Array, p: jax.Array | float) -> jax.Array:
  """Paper PDT: clamp each sample's eps (N, ...) to [-tau, tau], tau = max(1, q_p(|eps|))."""
  return _pdt_clamp(eps, p)


def pdt_clamp_x(x: jax.Array, p: jax.Array | float) -> jax.Array:
  """Authors'-code PDT: clamp each sample x_t (N, ...) by tau = max(1, q_p(|x_t|))."""
  return _pdt_clamp(x, p)


# ----------------------------------------------------------------------------
# One step.

# (params, x, cond, t, with_uncond=False) -> eps; with_uncond: (2N, ...) interleaved
# [eps(x | cond), eps(x | 0)] per sample (see CondUNet.__call__).
ApplyFn = Callable[..., jax.Array]


def apply_fn_of(model: Any) -> ApplyFn:
  """(params, x, cond, t, with_uncond=False) -> eps in eval mode for a CondUNet (or any
  object with .apply).

  `params` is the "params" collection (TrainState.params / ema_params). A model whose
  __call__ takes `with_uncond` (CondUNet: shares the noisy stream's encoder between the
  two predictions) gets it passed on; any other model is called once on the interleaved
  (2N, ...) batch (x, x), (cond, 0), (t, t).
  """
  shares = "with_uncond" in inspect.signature(type(model).__call__).parameters

  def apply_fn(params, x, cond, t, with_uncond=False):
    variables = {"params": params}
    if not with_uncond:
      return model.apply(variables, x, cond, t, train=False)
    if shares:
      return model.apply(variables, x, cond, t, train=False, with_uncond=True)
    return model.apply(variables, interleave(x, x), interleave(cond, jnp.zeros_like(cond)),
                       interleave(t, t), train=False)

  return apply_fn


def guided_eps(apply_fn: ApplyFn, params: Any, x: jax.Array, cond: jax.Array, t: jax.Array,
               scale: float) -> jax.Array:
  """eps for (N, H, W, C) x_t; with scale != 0 the ICMG mix from one with_uncond call."""
  if scale == 0.0:
    return apply_fn(params, x, cond, t)
  eps_c, eps_0 = deinterleave(apply_fn(params, x, cond, t, with_uncond=True))
  return icmg(eps_c, eps_0, scale)


def _ddpm(sched, x, i, eps, noise, settings):
  return diffusion.ddpm_step(sched, x, i, eps, noise, variance=settings.variance)


def _ddim(sched, x, i, eps, noise, settings):
  return diffusion.ddim_step(sched, x, i, eps, noise, eta=settings.eta)


# Reverse-step rules by name: (sched, x_t, i, eps, noise, settings) -> x_{prev}.
SAMPLERS: dict[str, Callable[..., jax.Array]] = {"ddpm": _ddpm, "ddim": _ddim}


def num_timesteps_of(schedule: diffusion.Schedule) -> int:
  """T of the original chain (a respaced schedule always keeps timestep T - 1)."""
  return int(np.asarray(schedule.timesteps)[-1]) + 1


def sampler_step(apply_fn: ApplyFn, params: Any, sched: diffusion.Schedule, x: jax.Array,
                 i: jax.Array, cond: jax.Array, noise: jax.Array, settings: SamplerSettings,
                 num_timesteps: int, prediction: str = "eps") -> jax.Array:
  """One reverse step x_t -> x_{prev} at schedule position i (see the module docstring).

  prediction: what the network outputs ("eps", or "v" converted to eps after guidance).
  """
  t = sched.timesteps[i]
  p = pdt_percentile(t, num_timesteps, settings.pdt_p_T)
  if settings.pdt_target == "x":
    x = pdt_clamp_x(x, p)
  eps = guided_eps(apply_fn, params, x, cond, jnp.full((x.shape[0],), t, jnp.int32),
                   settings.guidance_scale)
  eps = diffusion.eps_from_prediction(sched, x, i, eps, prediction)
  if settings.pdt_target == "eps":
    eps = pdt_clamp_eps(eps, p)
  return SAMPLERS[settings.method](sched, x, i, eps, noise, settings)


def _stage_sampler(model: Any, schedule: diffusion.Schedule, settings: SamplerSettings,
                   progress_offset: int, progress_every: int | None, prediction: str = "eps"):
  """Unjitted sample(params, cond, key) -> (N, H, W, model.out_channels) for one stage."""
  apply_fn = apply_fn_of(model)
  out_channels = int(model.out_channels)
  n = schedule.num_steps
  T = num_timesteps_of(schedule)
  if prediction not in diffusion.PREDICTIONS:
    raise ValueError(f"unknown prediction {prediction!r}; use one of {diffusion.PREDICTIONS}")

  def sample(params, cond, key):
    cond = jnp.asarray(cond, jnp.float32)
    if cond.ndim != 4:
      raise ValueError(f"cond must be (N, H, W, C), got shape {cond.shape}; add a batch "
                       "axis with cond[None]")
    k_init, k_noise = jax.random.split(key)
    x_T = jax.random.normal(k_init, cond.shape[:3] + (out_channels,), jnp.float32)
    if isinstance(model, CondUNet) and model.conv_impl == "cpu":  # once per chain, not per step
      params = with_winograd_kernels(model, params, x_T.shape, cond.shape)

    def body(x, i):
      noise = jax.random.normal(jax.random.fold_in(k_noise, i), x.shape, x.dtype)
      x = sampler_step(apply_fn, params, schedule, x, i, cond, noise, settings, T,
                       prediction)
      if progress_every:
        progress.tick(progress_offset + n - i, every=progress_every)
      return x, None

    x0, _ = jax.lax.scan(body, x_T, jnp.arange(n - 1, -1, -1))
    return x0

  return sample


def make_sampler(model: Any, schedule: diffusion.Schedule, *, method: str = "ddpm",
                 guidance_scale: float = 0.0, pdt_target: str | None = None,
                 pdt_p_T: float = 1.0, eta: float = 0.0, variance: str = "beta",
                 progress_every: int | None = 10, prediction: str = "eps", jit: bool = True):
  """Builds sample(params, cond (N, H, W, C_cond), key) -> (N, H, W, C_out).

  The reverse chain over all `schedule.num_steps` positions is one lax.scan. `params` is
  the model's "params" collection (e.g. TrainState.ema_params). With jit=True
  the function is jitted; wrap it again with jax.jit(..., in_shardings=...,
  out_shardings=...) to shard the batch (or tiles) over the mesh. Inside an open
  `progress.bar(schedule.num_steps)` it reports every `progress_every` steps.
  `prediction` is what the model was trained to output ("eps" or "v").
  """
  settings = SamplerSettings(method=method, guidance_scale=float(guidance_scale),
                             pdt_target=pdt_target, pdt_p_T=float(pdt_p_T), eta=float(eta),
                             variance=variance)
  fn = _stage_sampler(model, schedule, settings, 0, progress_every, prediction)
  return jax.jit(fn) if jit else fn


def make_cascade_sampler(stage_models: Sequence[Any],
                         stage_schedules: Sequence[diffusion.Schedule],
                         stage_settings: Sequence[Any], *,
                         include_rgb: bool = False, progress_every: int | None = 10,
                         return_stages: bool = False, prediction: Any = "eps",
                         jit: bool = True):
  """Builds sample_cascade(stage_params (list), rgb (N, H, W, 3), key) -> (N, H, W, N_bands).

  Stage k runs its own scan with key fold_in(key, k) and is conditioned on
  cascade.stage_condition(k, rgb, output of stage k - 1, include_rgb). All stages run in
  one jitted program; the result is the last stage's output (with return_stages=True, the
  list of every stage's output). Progress counts sum(schedule.num_steps) steps in total.
  `prediction`: what the models output, "eps" or "v" (one value, or one per stage).
  """
  if not (len(stage_models) == len(stage_schedules) == len(stage_settings)) or \
      not stage_models:
    raise ValueError(f"need one model, schedule and settings per stage, got "
                     f"{len(stage_models)}, {len(stage_schedules)}, {len(stage_settings)}")
  predictions = [prediction] * len(stage_models) if isinstance(prediction, str) else \
      list(prediction)
  if len(predictions) != len(stage_models):
    raise ValueError(f"got {len(predictions)} predictions for {len(stage_models)} stages")
  samplers, offset = [], 0
  for model, sched, settings, pred in zip(stage_models, stage_schedules, stage_settings,
                                          predictions):
    samplers.append(_stage_sampler(model, sched, as_settings(settings), offset,
                                   progress_every, pred))
    offset += sched.num_steps

  def sample_cascade(stage_params, rgb, key):
    if len(stage_params) != len(samplers):
      raise ValueError(f"got {len(stage_params)} parameter sets for {len(samplers)} stages")
    outputs, prev = [], None
    for k, (fn, params) in enumerate(zip(samplers, stage_params)):
      cond = cascade.stage_condition(k, jnp.asarray(rgb, jnp.float32), prev, include_rgb)
      prev = fn(params, cond, jax.random.fold_in(key, k))
      outputs.append(prev)
    return outputs if return_stages else prev

  return jax.jit(sample_cascade) if jit else sample_cascade


def cascade_num_steps(stage_schedules: Sequence[diffusion.Schedule]) -> int:
  """Total reverse steps of a cascade (the size of its progress bar)."""
  return int(sum(s.num_steps for s in stage_schedules))
