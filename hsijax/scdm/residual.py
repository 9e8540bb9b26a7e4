"""Residual spectral cascade (an option of `Cascade`, beyond the SCDM paper).

Each stage's U-Net diffuses the residual of a deterministic affine estimate instead of the
bands themselves. Stage k makes the target bands T_k (T_last = all N) from the bands known
before it, A_k (A_0 = the RGB bands; A_k = T_{k-1} plus the RGB bands):

  given_k = T_k & A_k      copied from the condition exactly (never generated)
  new_k   = T_k - A_k      generated:
  est_k   = x[A_k] @ W_k + b_k        per-pixel affine least squares fitted on the training
                                      pixels (stage 0: the linear RGB -> HSI map of
                                      hsijax.linear_baseline, restricted to new_0)
  r_k     = (x[new_k] - est_k) / s_k  s_k: the residual's per-band std on the training pixels
  x[new_k] = est_k + s_k * r_k        what sampling returns, r_k sampled by the U-Net (or
                                      r_k = 0 for an `estimate_only` stage: no network)

Everything is in the cascade's normalised units (x - mean) / std. A network that learned
nothing (r = 0) gives back the affine map, so the diffusion model only has to add what a
per-pixel affine map cannot explain (near infrared detail, texture). The estimates are fitted
once on the training data (`fit`) and stored with the cascade (cascade.json), so loading a
workdir reproduces them.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hsijax import linear_baseline


class ResidualStage(NamedTuple):
  """One stage's affine estimate: which bands it reads, copies and generates, and the map."""
  cond_bands: tuple[int, ...]   # A_k (sorted): the condition channels, in this order
  given: tuple[int, ...]        # T_k & A_k
  new: tuple[int, ...]          # T_k - A_k: the bands the stage generates
  weight: np.ndarray            # (len(cond_bands), len(new)), normalised units
  bias: np.ndarray              # (len(new),)
  res_std: np.ndarray           # (len(new),) residual std per band on the training pixels


def plan(band_sets: Sequence[Sequence[int]], rgb_bands: Sequence[int]
         ) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
  """[(cond_bands, given, new)] per stage of a residual cascade (see the module docstring)."""
  rgb = {int(b) for b in rgb_bands}
  avail = sorted(rgb)
  out = []
  for targets in band_sets:
    t = sorted({int(b) for b in targets})
    out.append((tuple(avail), tuple(b for b in t if b in avail),
                tuple(b for b in t if b not in avail)))
    avail = sorted(set(t) | rgb)
  return out


def fit_affine(inputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(W (C, B), b (B,)) minimising ||inputs W + b - targets||^2 over the pixels (..., C)."""
  lin = linear_baseline.fit(inputs, targets)
  return np.asarray(lin.weight, np.float32), np.asarray(lin.bias, np.float32)


def fit(images_norm: np.ndarray, band_sets: Sequence[Sequence[int]],
        rgb_bands: Sequence[int]) -> tuple[ResidualStage, ...]:
  """Fits every stage's affine estimate and residual std on normalised cubes (..., N)."""
  pix = np.asarray(images_norm, np.float32).reshape(-1, np.shape(images_norm)[-1])
  stages = []
  for cond_bands, given, new in plan(band_sets, rgb_bands):
    a, y = pix[:, list(cond_bands)], pix[:, list(new)]
    if new:
      w, b = fit_affine(a, y)
      s = np.maximum((y - (a @ w + b)).std(0), 1e-6).astype(np.float32)
    else:
      w, b, s = (np.zeros((len(cond_bands), 0), np.float32), np.zeros(0, np.float32),
                 np.zeros(0, np.float32))
    stages.append(ResidualStage(cond_bands, given, new, w, b, s))
  return tuple(stages)


def estimate(stage: ResidualStage, cond: Any) -> Any:
  """(..., len(cond_bands)) normalised condition -> (..., len(new)) affine estimate
  (NumPy in, NumPy out; JAX arrays stay JAX)."""
  if isinstance(cond, jax.Array):
    return cond @ jnp.asarray(stage.weight) + jnp.asarray(stage.bias)
  return np.asarray(cond, np.float32) @ stage.weight + stage.bias


def training_pairs(images_norm: np.ndarray, stage: ResidualStage
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(x = normalised residual (..., n_new), cond (..., n_cond), estimate (..., n_new))."""
  cond = np.asarray(images_norm, np.float32)[..., list(stage.cond_bands)]
  est = estimate(stage, cond)
  x = (np.asarray(images_norm, np.float32)[..., list(stage.new)] - est) / stage.res_std
  return x.astype(np.float32), cond, est.astype(np.float32)


def arrays(stage: ResidualStage) -> dict[str, np.ndarray]:
  """The stage's estimate as a pytree of arrays (passed into jitted samplers as data)."""
  return {"weight": np.asarray(stage.weight, np.float32),
          "bias": np.asarray(stage.bias, np.float32),
          "res_std": np.asarray(stage.res_std, np.float32)}


def make_sampler(stage_samplers: Sequence[Any], plans: Sequence[tuple], num_bands: int,
                 rgb_bands: Sequence[int]):
  """sample(stage_params, rgb (n, H, W, 3) normalised, key) -> (n, H, W, N) normalised.

  stage_samplers[k]: an unjitted sample(params, cond, key) of stage k's U-Net (sampler.py),
  or None for an estimate-only stage. plans[k] = (cond_bands, given, new) of `plan`.
  stage_params[k] = (network params or None, `arrays(stage)`). Stage k reads its condition
  from the bands known so far (the RGB input, then every earlier stage's bands), samples
  the normalised residual with key fold_in(key, k), and writes est + res_std * residual into
  its new bands; given bands are never touched. Pure and per tile, so it jits and shards
  over tiles like `make_cascade_sampler`.
  """
  rgb_bands = [int(b) for b in rgb_bands]

  def sample(stage_params, rgb, key):
    rgb = jnp.asarray(rgb, jnp.float32)
    x = jnp.zeros(rgb.shape[:3] + (int(num_bands),), jnp.float32)
    x = x.at[..., jnp.asarray(rgb_bands)].set(rgb)
    for k, (fn, (cond_bands, _, new), (params, est)) in enumerate(
        zip(stage_samplers, plans, stage_params)):
      if not new:
        continue
      cond = x[..., jnp.asarray(cond_bands)]
      out = cond @ est["weight"] + est["bias"]
      if fn is not None:
        out = out + est["res_std"] * fn(params, cond, jax.random.fold_in(key, k))
      x = x.at[..., jnp.asarray(new)].set(out)
    return x

  return sample


def to_json(stage: ResidualStage) -> dict[str, Any]:
  """JSON-friendly dict of a stage (stored in cascade.json)."""
  return {"cond_bands": [int(b) for b in stage.cond_bands],
          "given": [int(b) for b in stage.given], "new": [int(b) for b in stage.new],
          "weight": np.asarray(stage.weight, np.float64).tolist(),
          "bias": np.asarray(stage.bias, np.float64).tolist(),
          "res_std": np.asarray(stage.res_std, np.float64).tolist()}


def from_json(d: dict[str, Any]) -> ResidualStage:
  n_cond, n_new = len(d["cond_bands"]), len(d["new"])
  return ResidualStage(tuple(int(b) for b in d["cond_bands"]),
                       tuple(int(b) for b in d["given"]), tuple(int(b) for b in d["new"]),
                       np.asarray(d["weight"], np.float32).reshape(n_cond, n_new),
                       np.asarray(d["bias"], np.float32).reshape(n_new),
                       np.asarray(d["res_std"], np.float32).reshape(n_new))
