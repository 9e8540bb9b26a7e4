"""Blind estimation of the PSF and SRF from the LR-HSI / HR-MSI pair (as in the SDP authors' code).

When B (blur) and R (spectral response) are unknown, both observations are brought to the
same low-resolution multispectral grid, where they should agree:

  rownorm(R) Y            (h, w, b): LR-HSI mapped to the MSI bands
  blur_down(Z, PSF)       (h, w, b): HR-MSI blurred with the PSF and decimated by `ratio`

and minimise sum |clip01(rownorm(R) Y) - clip01(blur_down(Z, PSF))| (L1) with Adam
(lr 1e-5, 5000 steps, no weight decay). After every step the PSF is clipped to [0, 1] and
renormalised to sum 1, and the SRF is clipped to [0, 10] with each row renormalised to sum 1
(as the authors' code). PSF size k = 2 ratio - 1, initialised uniform; SRF initialised 1/B.
The whole loop is one lax.scan inside one jax.jit.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from hsijax import degrade


def _rownorm(srf: jax.Array) -> jax.Array:
  return srf / jnp.sum(srf, axis=1, keepdims=True)


def blind_objective(psf: jax.Array, srf: jax.Array, y: jax.Array, z: jax.Array,
                    ratio: int) -> jax.Array:
  """sum |clip01(rownorm(srf) y) - clip01(blur_down(z, psf, ratio))| (scalar)."""
  y_low = jnp.clip(degrade.spectral_response(y, _rownorm(srf)), 0.0, 1.0)
  z_low = jnp.clip(degrade.blur_down(z, psf, ratio), 0.0, 1.0)
  return jnp.sum(jnp.abs(y_low - z_low))


def project_psf(psf: jax.Array) -> jax.Array:
  """Clip to [0, 1], then scale to sum 1."""
  psf = jnp.clip(psf, 0.0, 1.0)
  return psf / jnp.sum(psf)


def project_srf(srf: jax.Array) -> jax.Array:
  """Clip to [0, 10], then scale each row (one MSI band) to sum 1."""
  return _rownorm(jnp.clip(srf, 0.0, 10.0))


def estimate_psf_srf(y: jax.Array, z: jax.Array, ratio: int, *, psf_size: int | None = None,
                     num_steps: int = 5000, lr: float = 1e-5, return_losses: bool = False):
  """Estimates the PSF and SRF.

  Args:
    y: (h, w, B) LR-HSI.  z: (h * ratio, w * ratio, b) HR-MSI.
    ratio: spatial ratio.
    psf_size: k (odd); default 2 * ratio - 1.
    num_steps: Adam steps (5000 in the paper's code).
    lr: Adam learning rate (1e-5).
    return_losses: also return the (num_steps,) objective before each step.

  Returns:
    (psf (k, k), srf (b, B)) [, losses].
  """
  y, z = jnp.asarray(y, jnp.float32), jnp.asarray(z, jnp.float32)
  if y.ndim != 3 or z.ndim != 3:
    raise ValueError(f"y must be (h, w, B) and z (H, W, b); got {y.shape} and {z.shape}")
  if int(ratio) != ratio or ratio < 1:
    raise ValueError(f"ratio must be a positive integer, got {ratio}")
  ratio = int(ratio)
  if z.shape[:2] != (y.shape[0] * ratio, y.shape[1] * ratio):
    raise ValueError(f"z is {z.shape[:2]} but y is {y.shape[:2]} with ratio {ratio}; the "
                     "HR-MSI must be exactly ratio times the LR-HSI")
  k = 2 * ratio - 1 if psf_size is None else int(psf_size)
  if k < 1 or k % 2 == 0:
    raise ValueError(f"psf_size must be a positive odd integer, got {psf_size}")
  if num_steps < 0:
    raise ValueError(f"num_steps must be >= 0, got {num_steps}")
  psf, srf, losses = _estimate(y, z, ratio=ratio, k=k, num_steps=int(num_steps), lr=float(lr))
  return (psf, srf, losses) if return_losses else (psf, srf)


@functools.partial(jax.jit, static_argnames=("ratio", "k", "num_steps", "lr"))
def _estimate(y, z, *, ratio, k, num_steps, lr):
  b, B = z.shape[-1], y.shape[-1]
  params = (jnp.full((k, k), 1.0 / (k * k), jnp.float32),
            jnp.full((b, B), 1.0 / B, jnp.float32))
  opt = optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)  # torch Adam, no weight decay
  value_and_grad = jax.value_and_grad(lambda p: blind_objective(p[0], p[1], y, z, ratio))

  def step(carry, _):
    p, state = carry
    loss, g = value_and_grad(p)
    updates, state = opt.update(g, state, p)
    psf, srf = optax.apply_updates(p, updates)
    return ((project_psf(psf), project_srf(srf)), state), loss

  (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=num_steps)
  return params[0], params[1], losses
