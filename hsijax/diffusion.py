"""Gaussian diffusion core: schedules as pytrees, forward process, DDPM / DDIM reverse steps.

Everything here is a pure function of explicit arrays. A `Schedule` is built once (on the host,
in float64, then stored as float32) and passed to jitted code as an ordinary pytree argument, so
nothing is global and respaced schedules are just other `Schedule` values.

Indexing convention: `i` is a position in the (possibly respaced) schedule, 0 <= i < len(sched),
with i = 0 the least noisy step. `sched.timesteps[i]` is the original timestep in [0, T) that
position `i` corresponds to; networks are conditioned on that original timestep.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class Schedule(NamedTuple):
  """Noise schedule coefficients, each shaped (n,) for n (respaced) steps."""
  timesteps: jax.Array            # int32, original timestep of each position
  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array  # abar at the previous position (1 at i = 0)
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  posterior_variance: jax.Array   # beta~_i = beta_i (1 - abar_{i-1}) / (1 - abar_i)
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array  # multiplies x0
  posterior_mean_coef2: jax.Array  # multiplies x_t

  @property
  def num_steps(self) -> int:
    return int(self.betas.shape[0])


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
  """DDPM linear betas from 1e-4 to 2e-2, scaled by 1000 / T so any T spans the same noise."""
  if num_timesteps <= 20:
    raise ValueError(f"the linear schedule needs more than 20 timesteps (its last beta is "
                     f"0.02 * 1000 / T < 1), got num_timesteps={num_timesteps}; use more "
                     "timesteps (the paper: 1000) or the cosine schedule")
  scale = 1000.0 / num_timesteps
  return np.linspace(scale * 1e-4, scale * 2e-2, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008,
                 max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal cosine schedule, betas clipped at `max_beta`."""
  steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  f = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
  return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


BETA_SCHEDULES: dict[str, Callable[[int], np.ndarray]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
}


def schedule_from_betas(betas: np.ndarray,
                        timesteps: np.ndarray | None = None) -> Schedule:
  """Builds every coefficient from (n,) betas (computed in float64, stored float32)."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.size == 0:
    raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
  if np.any(betas <= 0) or np.any(betas >= 1):
    raise ValueError("betas must lie in (0, 1); check the schedule name and number of steps")
  if timesteps is None:
    timesteps = np.arange(betas.size)
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
  # post_var[0] is 0; the log uses the next value, as in DDPM, so it stays finite.
  post_logvar = np.log(np.concatenate([post_var[1:2], post_var[1:]])) if betas.size > 1 \
      else np.log(betas)
  f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
  return Schedule(
      timesteps=jnp.asarray(timesteps, dtype=jnp.int32),
      betas=f32(betas),
      alphas_cumprod=f32(abar),
      alphas_cumprod_prev=f32(abar_prev),
      sqrt_alphas_cumprod=f32(np.sqrt(abar)),
      sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - abar)),
      posterior_variance=f32(post_var),
      posterior_log_variance_clipped=f32(post_logvar),
      posterior_mean_coef1=f32(betas * np.sqrt(abar_prev) / (1.0 - abar)),
      posterior_mean_coef2=f32((1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)),
  )


def make_schedule(name: str = "linear", num_timesteps: int = 1000) -> Schedule:
  """A full schedule by name ("linear" or "cosine") with `num_timesteps` steps."""
  if name not in BETA_SCHEDULES:
    raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(BETA_SCHEDULES)}")
  if num_timesteps < 1:
    raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
  return schedule_from_betas(BETA_SCHEDULES[name](num_timesteps))


def respaced_timesteps(num_timesteps: int, num_steps: int, kind: str = "uniform") -> np.ndarray:
  """Sorted subset of `num_steps` original timesteps in [0, T), always containing 0 and T-1.

  "uniform" spaces them evenly; "quadratic" spaces them densely near t = 0 (DDIM's choice).
  """
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
  if kind == "uniform":
    ts = np.linspace(0, num_timesteps - 1, num_steps)
  elif kind == "quadratic":
    ts = np.linspace(0, np.sqrt(num_timesteps - 1), num_steps) ** 2
  else:
    raise ValueError(f"unknown respacing {kind!r}; use 'uniform' or 'quadratic'")
  ts = np.unique(np.round(ts).astype(np.int64))
  if ts.size < num_steps:  # rounding collided (quadratic near 0): fill with unused steps
    missing = np.setdiff1d(np.arange(num_timesteps), ts)[: num_steps - ts.size]
    ts = np.sort(np.concatenate([ts, missing]))
  return ts


def respace(base_betas: np.ndarray, timesteps: Sequence[int]) -> Schedule:
  """Schedule that visits only `timesteps` of the base schedule with the same abar there.

  New betas are 1 - abar[s_i] / abar[s_{i-1}], so q(x_t | x_0) is unchanged at kept steps.
  """
  base_betas = np.asarray(base_betas, dtype=np.float64)
  ts = np.asarray(sorted(set(int(t) for t in timesteps)))
  if ts.size == 0 or ts[0] < 0 or ts[-1] >= base_betas.size:
    raise ValueError(f"timesteps must be a non-empty subset of [0, {base_betas.size})")
  abar = np.cumprod(1.0 - base_betas)[ts]
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  return schedule_from_betas(1.0 - abar / abar_prev, timesteps=ts)


def make_respaced_schedule(name: str, num_timesteps: int, num_steps: int | None,
                           kind: str = "uniform") -> Schedule:
  """`make_schedule` followed by respacing to `num_steps` (None or T keeps every step)."""
  if num_steps is None or num_steps == num_timesteps:
    return make_schedule(name, num_timesteps)
  if name not in BETA_SCHEDULES:
    raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(BETA_SCHEDULES)}")
  betas = BETA_SCHEDULES[name](num_timesteps)
  return respace(betas, respaced_timesteps(num_timesteps, num_steps, kind))


def _at(a: jax.Array, i: jax.Array, x: jax.Array) -> jax.Array:
  """a[i] shaped to broadcast against x: i is () or (N,) matching x's leading axis."""
  v = a[i]
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def q_sample(sched: Schedule, x0: jax.Array, i: jax.Array, eps: jax.Array) -> jax.Array:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
  return _at(sched.sqrt_alphas_cumprod, i, x0) * x0 + \
      _at(sched.sqrt_one_minus_alphas_cumprod, i, x0) * eps


def x0_from_eps(sched: Schedule, x_t: jax.Array, i: jax.Array, eps: jax.Array) -> jax.Array:
  """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
  return (x_t - _at(sched.sqrt_one_minus_alphas_cumprod, i, x_t) * eps) / \
      _at(sched.sqrt_alphas_cumprod, i, x_t)


def eps_from_x0(sched: Schedule, x_t: jax.Array, i: jax.Array, x0: jax.Array) -> jax.Array:
  """Inverse of `x0_from_eps`."""
  return (x_t - _at(sched.sqrt_alphas_cumprod, i, x_t) * x0) / \
      _at(sched.sqrt_one_minus_alphas_cumprod, i, x_t)


PREDICTIONS = ("eps", "v", "x0")


def v_target(sched: Schedule, x0: jax.Array, i: jax.Array, eps: jax.Array) -> jax.Array:
  """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho's velocity target)."""
  return _at(sched.sqrt_alphas_cumprod, i, x0) * eps - \
      _at(sched.sqrt_one_minus_alphas_cumprod, i, x0) * x0


def eps_from_v(sched: Schedule, x_t: jax.Array, i: jax.Array, v: jax.Array) -> jax.Array:
  """eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t (exact inverse of `v_target` given x_t)."""
  return _at(sched.sqrt_alphas_cumprod, i, x_t) * v + \
      _at(sched.sqrt_one_minus_alphas_cumprod, i, x_t) * x_t


def x0_from_v(sched: Schedule, x_t: jax.Array, i: jax.Array, v: jax.Array) -> jax.Array:
  """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v (no division: bounded at t = T)."""
  return _at(sched.sqrt_alphas_cumprod, i, x_t) * x_t - \
      _at(sched.sqrt_one_minus_alphas_cumprod, i, x_t) * v


def eps_from_prediction(sched: Schedule, x_t: jax.Array, i: jax.Array, out: jax.Array,
                        prediction: str = "eps") -> jax.Array:
  """The noise implied by a network output that predicts `prediction` ("eps", "v" or "x0").

  Every sampler works on eps; a v- or x0-model's output is converted here (x0:
  eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t), `eps_from_x0`). The map is affine in
  `out` for fixed x_t, so guidance mixes (ICMG) give the same result before or after it.
  """
  if prediction == "eps":
    return out
  if prediction == "v":
    return eps_from_v(sched, x_t, i, out)
  if prediction == "x0":
    return eps_from_x0(sched, x_t, i, out)
  raise ValueError(f"unknown prediction {prediction!r}; use one of {PREDICTIONS}")


def q_posterior_mean(sched: Schedule, x0: jax.Array, x_t: jax.Array,
                     i: jax.Array) -> jax.Array:
  """Mean of q(x_{t-1} | x_t, x0)."""
  return _at(sched.posterior_mean_coef1, i, x_t) * x0 + \
      _at(sched.posterior_mean_coef2, i, x_t) * x_t


def ddpm_step(sched: Schedule, x_t: jax.Array, i: jax.Array, eps: jax.Array,
              noise: jax.Array, variance: str = "beta",
              clip_x0: float | None = None) -> jax.Array:
  """Ancestral step x_t -> x_{t-1} for an eps-prediction model.

  variance: "beta" (sigma^2 = beta_t, the DDPM / SCDM choice) or "posterior" (beta~_t).
  No noise is added at i = 0. With clip_x0=None the mean equals
  (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t).
  """
  x0 = x0_from_eps(sched, x_t, i, eps)
  if clip_x0 is not None:
    x0 = jnp.clip(x0, -clip_x0, clip_x0)
  mean = q_posterior_mean(sched, x0, x_t, i)
  if variance == "beta":
    var = sched.betas
  elif variance == "posterior":
    var = sched.posterior_variance
  else:
    raise ValueError(f"unknown variance {variance!r}; use 'beta' or 'posterior'")
  sigma = _at(jnp.sqrt(var), i, x_t) * _at(jnp.arange(var.shape[0]) > 0, i, x_t)
  return mean + sigma * noise


def ddim_step(sched: Schedule, x_t: jax.Array, i: jax.Array, eps: jax.Array,
              noise: jax.Array, eta: float = 0.0) -> jax.Array:
  """DDIM step x_t -> x_{prev} on the (respaced) schedule; eta = 0 is deterministic."""
  abar = _at(sched.alphas_cumprod, i, x_t)
  abar_prev = _at(sched.alphas_cumprod_prev, i, x_t)
  x0 = x0_from_eps(sched, x_t, i, eps)
  sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar)) * jnp.sqrt(1 - abar / abar_prev)
  return jnp.sqrt(abar_prev) * x0 + jnp.sqrt(jnp.maximum(1 - abar_prev - sigma**2, 0.0)) * eps \
      + sigma * noise


def reverse_step(method: str, sched: Schedule, x_t: jax.Array, i: jax.Array, eps: jax.Array,
                 noise: jax.Array, *, eta: float = 0.0, variance: str = "beta") -> jax.Array:
  """Dispatch to the named reverse step ("ddpm" or "ddim")."""
  if method == "ddpm":
    return ddpm_step(sched, x_t, i, eps, noise, variance=variance)
  if method == "ddim":
    return ddim_step(sched, x_t, i, eps, noise, eta=eta)
  raise ValueError(f"unknown sampler {method!r}; choose one of {sorted(SAMPLERS)}")


SAMPLERS = ("ddpm", "ddim")


def sample(sched: Schedule, eps_fn: Callable[[jax.Array, jax.Array], jax.Array],
           x_T: jax.Array, key: jax.Array, *, method: str = "ddpm", eta: float = 0.0,
           variance: str = "beta") -> jax.Array:
  """Runs the whole reverse chain as one `lax.scan` from position n-1 down to 0.

  eps_fn(x_t, i) -> predicted eps (i is the schedule position; the original timestep is
  sched.timesteps[i]). Noise for step i comes from fold_in(key, i), so results do not depend
  on how the chain is chunked.
  """
  def body(x, i):
    eps = eps_fn(x, i)
    noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    return reverse_step(method, sched, x, i, eps, noise, eta=eta, variance=variance), None

  positions = jnp.arange(sched.num_steps - 1, -1, -1)
  x0, _ = jax.lax.scan(body, x_T, positions)
  return x0


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 1e4) -> jax.Array:
  """Sinusoidal embedding (..., dim): first half cos, second half sin (guided-diffusion form)."""
  half = dim // 2
  freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[..., None] * freqs
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[..., :1])], axis=-1)
  return emb
