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

Cross-sensor radiometry (`radiometry="affine"`, beyond the authors' code). Two sensors
rarely share units: the HR-MSI of another instrument is modelled per band j as

  Z_j = g_j (R_j X) + o_j,        R_j = rownorm(R)_j (rows sum to 1),

a gain g_j > 0 and an offset o_j on top of the authors' model (g = 1, o = 0). Row sums of 1
cannot absorb g_j, so the plain fit bends the PSF and SRF to explain it. On the LR grid
(blur_down is linear with a PSF of sum 1, and maps a constant o to o m with
m = blur_down(1): 1 inside, less at the zero-padded border) the model reads

  t_j := blur_down(Z, PSF)_j = g_j a_j + o_j m,      a_j := (rownorm(R) Y)_j.

For fixed PSF and R, (g_j, o_j) is a two-unknown linear least-squares problem per band with
a closed form (`affine_fit`). Each Adam step first solves it at the current PSF / R (held
constant for the gradient: block-coordinate descent) and then takes the step on
sum |clip01(g a + o m) - clip01(t)|, i.e. the authors' objective with the LR-HSI side mapped
into the MSI's units. `calibrate_msi` then maps the HR-MSI back to the LR-HSI's units,
Z'_j = (Z_j - o_j) / g_j, so that Z' = rownorm(R) X holds for every method downstream. The
coefficient of determination of the final fit (`r2`, per band) says how well ANY affine map of
rownorm(R) Y explains the MSI: well below 1 means the MSI is not a linear image of the scene
the HSI sees (another date, nonlinear processing, misregistration).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hsijax import degrade


RADIOMETRY = ("none", "affine")
MIN_GAIN = 1e-3  # g_j is kept >= this: a non-positive gain has no physical meaning


def _rownorm(srf: jax.Array) -> jax.Array:
  return srf / jnp.sum(srf, axis=1, keepdims=True)


def blind_objective(psf: jax.Array, srf: jax.Array, y: jax.Array, z: jax.Array,
                    ratio: int) -> jax.Array:
  """sum |clip01(rownorm(srf) y) - clip01(blur_down(z, psf, ratio))| (scalar)."""
  y_low = jnp.clip(degrade.spectral_response(y, _rownorm(srf)), 0.0, 1.0)
  z_low = jnp.clip(degrade.blur_down(z, psf, ratio), 0.0, 1.0)
  return jnp.sum(jnp.abs(y_low - z_low))


def affine_fit(a: jax.Array, t: jax.Array, m: jax.Array):
  """Per band j, least squares of t_j ~ g_j a_j + o_j m over the pixels.

  Args: a, t (h, w, b); m (h, w, 1) or (h, w, b) (the offset's footprint, m = blur_down(1)).
  Returns: gain (b,) clipped to >= MIN_GAIN, offset (b,), r2 (b,): 1 - SS_res / SS_tot of t
    (SS_tot about t's mean), with the clipped gain's offset refitted.
  Closed form: the 2 x 2 normal equations [[aa, am], [am, mm]] [g, o] = [at, mt].
  """
  m = jnp.broadcast_to(m, a.shape)
  s = lambda u, v: jnp.sum(u * v, axis=(0, 1))
  aa, am, mm, at, mt = s(a, a), s(a, m), s(m, m), s(a, t), s(m, t)
  det = aa * mm - am * am
  gain = jnp.where(det > 1e-12 * aa * mm, (at * mm - am * mt) / jnp.maximum(det, 1e-30), 1.0)
  gain = jnp.maximum(gain, MIN_GAIN)
  offset = (mt - gain * am) / mm
  res = t - gain * a - offset * m
  centred = t - jnp.mean(t, axis=(0, 1))
  r2 = 1.0 - s(res, res) / jnp.maximum(s(centred, centred), 1e-30)
  return gain, offset, r2


def affine_objective(psf: jax.Array, srf: jax.Array, y: jax.Array, z: jax.Array,
                     ratio: int) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
  """sum |clip01(g a + o m) - clip01(t)| with (g, o) = affine_fit(a, t, m) held constant
  (module doc); returns (objective, (gain, offset, r2))."""
  a = degrade.spectral_response(y, _rownorm(srf))
  t = degrade.blur_down(z, psf, ratio)
  m = degrade.blur_down(jnp.ones(z.shape[:2] + (1,), z.dtype), psf, ratio)
  gain, offset, r2 = jax.lax.stop_gradient(affine_fit(a, t, m))
  fit = jnp.clip(gain * a + offset * m, 0.0, 1.0)
  return jnp.sum(jnp.abs(fit - jnp.clip(t, 0.0, 1.0))), (gain, offset, r2)


def lr_residuals(psf, srf, y, z, ratio: int, gain=None, offset=None):
  """Per-band sum of squares of t - (g a + o m) on the LR grid (module doc), for the given
  operators and gain / offset (None: the authors' model, g = 1, o = 0). Returns (ss_res (b,),
  ss_tot (b,)), ss_tot about t's mean, both in the MSI's units."""
  psf, srf = jnp.asarray(psf, jnp.float32), jnp.asarray(srf, jnp.float32)
  y, z = jnp.asarray(y, jnp.float32), jnp.asarray(z, jnp.float32)
  a = degrade.spectral_response(y, _rownorm(srf))
  t = degrade.blur_down(z, psf, ratio)
  m = degrade.blur_down(jnp.ones(z.shape[:2] + (1,), z.dtype), psf, ratio)
  g = 1.0 if gain is None else jnp.asarray(gain, jnp.float32)
  o = 0.0 if offset is None else jnp.asarray(offset, jnp.float32)
  res = t - g * a - o * m
  centred = t - jnp.mean(t, axis=(0, 1))
  return jnp.sum(res ** 2, axis=(0, 1)), jnp.sum(centred ** 2, axis=(0, 1))


def calibrate_msi(z, gain, offset):
  """Z'_j = max((Z_j - o_j) / g_j, 0): the HR-MSI in the LR-HSI's units (Z' = rownorm(R) X;
  R X >= 0 for X >= 0, R >= 0, so negative values are noise and are clipped)."""
  z = np.asarray(z, np.float32)
  return np.maximum((z - np.asarray(offset, np.float32)) / np.asarray(gain, np.float32),
                    0.0).astype(np.float32)


def footprint_centre(psf) -> np.ndarray:
  """Where a LR-HSI pixel sits on the HR grid under `psf`: (2,) offsets (rows, cols).

  `degrade.blur_down` makes LR pixel (i, j) from the HR pixels around (r i, r j); a PSF whose
  centre of mass lies m pixels from the kernel's centre moves that footprint to
  (r i, r j) - m. Returns -m, so LR pixel (i, j) is centred on HR position
  (r i + c[0], r j + c[1]). Images that share their outer corners (each LR pixel covering an
  r x r block of HR pixels) give (r - 1) / 2 on both axes; a simulation that keeps every r-th
  pixel of the blurred image (`degrade.blur_down`) gives 0. A blind PSF centred elsewhere
  than the two images' geometry implies suggests a misregistration of the MSI, which the PSF
  absorbs (the fused image is then on the MSI's grid); the blind fit does not always find
  shifts near the edge of its support, so this is a hint, not a registration.
  """
  psf = np.asarray(psf, np.float64)
  rows = np.arange(psf.shape[0]) - (psf.shape[0] - 1) / 2
  cols = np.arange(psf.shape[1]) - (psf.shape[1] - 1) / 2
  return -np.array([psf.sum(axis=1) @ rows, psf.sum(axis=0) @ cols]) / max(psf.sum(), 1e-30)


def project_psf(psf: jax.Array) -> jax.Array:
  """Clip to [0, 1], then scale to sum 1."""
  psf = jnp.clip(psf, 0.0, 1.0)
  return psf / jnp.sum(psf)


def project_srf(srf: jax.Array) -> jax.Array:
  """Clip to [0, 10], then scale each row (one MSI band) to sum 1."""
  return _rownorm(jnp.clip(srf, 0.0, 10.0))


def estimate_psf_srf(y: jax.Array, z: jax.Array, ratio: int, *, psf_size: int | None = None,
                     num_steps: int = 5000, lr: float = 1e-5, return_losses: bool = False,
                     radiometry: str = "none"):
  """Estimates the PSF and SRF (and, with radiometry="affine", the MSI's gain / offset).

  Args:
    y: (h, w, B) LR-HSI.  z: (h * ratio, w * ratio, b) HR-MSI.
    ratio: spatial ratio.
    psf_size: k (odd); default 2 * ratio - 1.
    num_steps: Adam steps (5000 in the paper's code).
    lr: Adam learning rate (1e-5).
    return_losses: also return the (num_steps,) objective before each step.
    radiometry: "none" (the authors' model, Z = rownorm(R) X) or "affine" (Z_j = g_j
      rownorm(R)_j X + o_j, module doc).

  Returns:
    (psf (k, k), srf (b, B)) [, losses] for "none"; for "affine"
    (psf, srf, {"gain": (b,), "offset": (b,), "r2": (b,)}) [, losses], the MSI's gain and
    offset in its own units (apply with `calibrate_msi`).
  """
  if radiometry not in RADIOMETRY:
    raise ValueError(f"unknown radiometry {radiometry!r}; use one of {RADIOMETRY}")
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
  if radiometry == "affine":
    psf, srf, losses, (gain, offset, r2) = _estimate_affine(
        y, z, ratio=ratio, k=k, num_steps=int(num_steps), lr=float(lr))
    cal = {"gain": gain, "offset": offset, "r2": r2}
    return (psf, srf, cal, losses) if return_losses else (psf, srf, cal)
  psf, srf, losses = _estimate(y, z, ratio=ratio, k=k, num_steps=int(num_steps), lr=float(lr))
  return (psf, srf, losses) if return_losses else (psf, srf)


def _projected_adam(objective, b: int, B: int, k: int, num_steps: int, lr: float):
  """(psf, srf, losses): Adam on objective(psf, srf) from the uniform PSF and SRF, the PSF
  and SRF projected after every step (`project_psf`, `project_srf`); one lax.scan."""
  params = (jnp.full((k, k), 1.0 / (k * k), jnp.float32),
            jnp.full((b, B), 1.0 / B, jnp.float32))
  opt = optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)  # torch Adam, no weight decay
  value_and_grad = jax.value_and_grad(lambda p: objective(p[0], p[1]))

  def step(carry, _):
    p, state = carry
    loss, g = value_and_grad(p)
    updates, state = opt.update(g, state, p)
    psf, srf = optax.apply_updates(p, updates)
    return ((project_psf(psf), project_srf(srf)), state), loss

  (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=num_steps)
  return params[0], params[1], losses


@functools.partial(jax.jit, static_argnames=("ratio", "k", "num_steps", "lr"))
def _estimate(y, z, *, ratio, k, num_steps, lr):
  return _projected_adam(lambda psf, srf: blind_objective(psf, srf, y, z, ratio),
                         z.shape[-1], y.shape[-1], k, num_steps, lr)


@functools.partial(jax.jit, static_argnames=("ratio", "k", "num_steps", "lr"))
def _estimate_affine(y, z, *, ratio, k, num_steps, lr):
  """As `_estimate` with the per-band gain / offset solved in closed form at every step."""
  psf, srf, losses = _projected_adam(
      lambda p, r: affine_objective(p, r, y, z, ratio)[0], z.shape[-1], y.shape[-1], k,
      num_steps, lr)
  _, cal = affine_objective(psf, srf, y, z, ratio)
  return psf, srf, losses, cal
