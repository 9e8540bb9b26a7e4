"""Classical (training-free) fusion methods reported beside SDP.

All three use the same degradation operators as SDP (`degrade.blur_down`: PSF, zero padding,
keep every `ratio`-th pixel from index 0), so LR pixel (i, j) sits on HR pixel (i*r, j*r).

  bicubic(y, ratio)              Keys cubic convolution (a = -0.5) of the LR-HSI alone, aligned
                                 to that sampling grid: interpolates Y exactly at (i*r, j*r).
  detail_injection(y, z, psf, r) high-pass detail injection with a regression gain (the
                                 GLP / "hypersharpening" family): X = up(Y) + (Z - up(Z_lr)) G,
                                 G the least-squares map from the degraded HR-MSI Z_lr to Y.
                                 Exact when X is a linear function of Z.
  subspace_ls(y, z, psf, srf, r) least squares in a p-dimensional spectral subspace E (top
                                 singular vectors of Y): X = A E^T with
                                 min ||blur_down(A) E^T - Y||^2 + ||A (RE)^T - Z||^2
                                     + tau ||A - A_up||^2 + smooth/2 ||grad A||^2
                                 (A_up = bicubic(Y) E), solved by conjugate gradients on the
                                 normal equations (HySure's model with a quadratic instead of
                                 a TV smoothness term). Exact on noise-free data in the
                                 subspace when p <= b and tau = smooth = 0.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hsijax import degrade
from hsijax import policy as policy_lib


def _keys_weights(s: np.ndarray, a: float = -0.5) -> np.ndarray:
  """Keys cubic convolution kernel at distances `s`."""
  s = np.abs(s)
  w1 = (a + 2) * s**3 - (a + 3) * s**2 + 1
  w2 = a * s**3 - 5 * a * s**2 + 8 * a * s - 4 * a
  return np.where(s <= 1, w1, np.where(s < 2, w2, 0.0))


def cubic_matrix(n_low: int, ratio: int, n_high: int | None = None) -> np.ndarray:
  """(n_high, n_low) interpolation matrix: HR sample x reads LR position x / ratio.

  Rows sum to 1 (constants are preserved); edges replicate the border sample.
  """
  n_high = n_low * ratio if n_high is None else n_high
  u = np.arange(n_high) / ratio
  base = np.floor(u).astype(np.int64)
  m = np.zeros((n_high, n_low))
  rows = np.arange(n_high)
  for tap in (-1, 0, 1, 2):  # four taps, vectorised over every HR sample
    idx = base + tap
    w = _keys_weights(u - idx)
    np.add.at(m, (rows, np.clip(idx, 0, n_low - 1)), w)
  return m


@policy_lib.float32_matmuls
def bicubic(y: jax.Array, ratio: int, out_hw: tuple[int, int] | None = None) -> jax.Array:
  """(h, w, B) -> (H, W, B) cubic upsampling aligned with `blur_down`'s sampling grid."""
  y = jnp.asarray(y, jnp.float32)
  h, w = y.shape[:2]
  H, W = out_hw if out_hw is not None else (h * ratio, w * ratio)
  mr = jnp.asarray(cubic_matrix(h, ratio, H), jnp.float32)
  mc = jnp.asarray(cubic_matrix(w, ratio, W), jnp.float32)
  return jnp.einsum("Hh,hwb,Ww->HWb", mr, y, mc)


def _check(y, z, ratio):
  if y.ndim != 3 or z.ndim != 3:
    raise ValueError(f"y must be (h, w, B) and z (H, W, b); got {y.shape} and {z.shape}")
  if z.shape[0] != y.shape[0] * ratio or z.shape[1] != y.shape[1] * ratio:
    raise ValueError(f"HR-MSI {z.shape[:2]} must be ratio={ratio} times the LR-HSI "
                     f"{y.shape[:2]}; crop the images or fix the ratio")


@policy_lib.float32_matmuls
def detail_injection(y: jax.Array, z: jax.Array, psf: jax.Array, ratio: int) -> jax.Array:
  """Regression-gain detail injection: (h, w, B), (H, W, b) -> (H, W, B).

  G (b, B) and an offset are fit by least squares from `blur_down(z)` to `y` on the LR grid;
  the HR detail `z - up(blur_down(z))` is then injected with that gain.
  """
  y = jnp.asarray(y, jnp.float32)
  z = jnp.asarray(z, jnp.float32)
  _check(y, z, ratio)
  z_lr = degrade.blur_down(z, jnp.asarray(psf, jnp.float32), ratio)  # (h, w, b)
  b = z.shape[-1]
  design = jnp.concatenate([z_lr.reshape(-1, b), jnp.ones((z_lr.shape[0] * z_lr.shape[1], 1))],
                           axis=1)
  gain, *_ = jnp.linalg.lstsq(design, y.reshape(-1, y.shape[-1]))
  hw = z.shape[:2]
  detail = z - bicubic(z_lr, ratio, hw)
  return bicubic(y, ratio, hw) + detail @ gain[:b]


def spectral_subspace(y: jax.Array, rank: int) -> jax.Array:
  """(B, p) orthonormal basis: top `rank` right singular vectors of Y's pixels (uncentred)."""
  pixels = jnp.asarray(y, jnp.float32).reshape(-1, y.shape[-1])
  _, _, vt = jnp.linalg.svd(pixels, full_matrices=False)
  return vt[:rank].T


def _smoothness(a: jax.Array) -> jax.Array:
  """0.5 * sum of squared differences between 4-neighbours (per channel)."""
  return 0.5 * (jnp.sum(jnp.diff(a, axis=0) ** 2) + jnp.sum(jnp.diff(a, axis=1) ** 2))


@policy_lib.float32_matmuls
@functools.partial(jax.jit, static_argnames=("ratio", "rank", "iters"))
def subspace_ls(y: jax.Array, z: jax.Array, psf: jax.Array, srf: jax.Array, ratio: int, *,
                rank: int = 8, tau: float = 1e-3, smooth: float = 0.0,
                iters: int = 300) -> jax.Array:
  """Subspace least-squares fusion (see module doc): (h, w, B), (H, W, b) -> (H, W, B).

  Args:
    psf: (k, k) point spread function; srf: (b, B) spectral response.
    rank: subspace dimension p (<= B).
    tau: weight pulling the coefficients towards those of the bicubic upsampled Y; it fixes
      the directions that neither Y (low resolution) nor Z (b < p bands) determines.
    smooth: weight of a quadratic smoothness term (1/2) ||grad A||^2 (4-neighbour
      differences), the quadratic cousin of HySure's TV; it stops an imperfect (e.g. blindly
      estimated) PSF from imprinting the LR sampling grid on the result.
    iters: conjugate-gradient iterations.
  """
  y = jnp.asarray(y, jnp.float32)
  z = jnp.asarray(z, jnp.float32)
  psf = jnp.asarray(psf, jnp.float32)
  srf = jnp.asarray(srf, jnp.float32)
  H, W = z.shape[:2]
  e = spectral_subspace(y, min(rank, y.shape[-1]))  # (B, p)
  re = srf @ e                                       # (b, p)
  p = e.shape[1]
  down = lambda a: degrade.blur_down(a, psf, ratio)
  down_t = jax.linear_transpose(down, jax.ShapeDtypeStruct((H, W, p), jnp.float32))
  a_up = bicubic(y, ratio, (H, W)) @ e

  smooth_grad = jax.grad(_smoothness)  # linear in a: the (Neumann) graph Laplacian

  def normal_op(a):
    return down_t(down(a))[0] + (a @ re.T) @ re + tau * a + smooth * smooth_grad(a)

  rhs = down_t(y @ e)[0] + z @ re + tau * a_up
  a, _ = jax.scipy.sparse.linalg.cg(normal_op, rhs, x0=a_up, maxiter=iters, tol=1e-7)
  return a @ e.T


METHODS = ("bicubic", "detail_injection", "subspace_ls")


def run_method(name: str, y, z, psf, srf, ratio: int) -> jax.Array:
  """One classical method by name -> (H, W, B) clipped to [0, 1]."""
  if name == "bicubic":
    x = bicubic(y, ratio, tuple(np.shape(z)[:2]))
  elif name == "detail_injection":
    x = detail_injection(y, z, psf, ratio)
  elif name == "subspace_ls":
    x = subspace_ls(y, z, psf, srf, ratio)
  else:
    raise ValueError(f"unknown classical method {name!r}; use one of {METHODS}")
  return jnp.clip(x, 0.0, 1.0)


def run_all(y, z, psf, srf, ratio: int) -> dict[str, jax.Array]:
  """Every classical method on one scene: name -> (H, W, B) clipped to [0, 1]."""
  return {name: run_method(name, y, z, psf, srf, ratio) for name in METHODS}
