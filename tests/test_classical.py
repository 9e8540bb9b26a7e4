"""Classical fusion methods: interpolation identities and exactness on noise-free data."""
import jax.numpy as jnp
import numpy as np
import pytest

from hsijax import classical, degrade


def _gaussian_psf(size, sigma):
  r = np.arange(size) - (size - 1) / 2
  g = np.exp(-0.5 * (r / sigma) ** 2)
  k = np.outer(g, g)
  return (k / k.sum()).astype(np.float32)


def _smooth_field(rng, shape, sigma=2.0):
  from scipy import ndimage
  return ndimage.gaussian_filter(rng.standard_normal(shape), (sigma, sigma, 0))


def test_cubic_matrix_properties():
  m = classical.cubic_matrix(7, 4)
  assert m.shape == (28, 7)
  np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)
  # Interpolating: HR sample i*r reads exactly LR sample i.
  np.testing.assert_allclose(m[::4], np.eye(7), atol=1e-12)
  # Keys' kernel reproduces quadratics where all four taps are inside the signal.
  x = np.arange(7.0)
  q = 0.3 * x**2 - x + 2
  u = np.arange(28) / 4
  inside = (u >= 1) & (u <= 5)
  np.testing.assert_allclose((m @ q)[inside], (0.3 * u**2 - u + 2)[inside], atol=1e-10)
  # Hand-computed midpoint weights: (-1/16, 9/16, 9/16, -1/16) at u = 2.5 (a = -0.5).
  np.testing.assert_allclose(classical.cubic_matrix(7, 2)[5, 1:5], [-1 / 16, 9 / 16, 9 / 16,
                                                                    -1 / 16], atol=1e-12)


def test_bicubic_interpolates_lr_grid():
  y = np.random.default_rng(0).random((5, 6, 3)).astype(np.float32)
  x = np.asarray(classical.bicubic(y, 3))
  assert x.shape == (15, 18, 3)
  np.testing.assert_allclose(x[::3, ::3], y, atol=1e-6)


def test_detail_injection_exact_when_x_is_linear_in_z():
  rng = np.random.default_rng(1)
  ratio, b, B = 4, 4, 12
  z = np.clip(0.5 + _smooth_field(rng, (32, 32, b), 1.0), 0, 1).astype(np.float32)
  gain = rng.uniform(0, 0.5, (b, B)).astype(np.float32)
  x = z @ gain
  psf = _gaussian_psf(7, 1.7)
  y = np.asarray(degrade.blur_down(jnp.asarray(x), jnp.asarray(psf), ratio))
  xh = np.asarray(classical.detail_injection(y, z, psf, ratio))
  np.testing.assert_allclose(xh, x, atol=2e-4)
  # Bicubic alone is clearly worse on the same data (the test could fail).
  assert np.abs(np.asarray(classical.bicubic(y, ratio)) - x).max() > 50 * np.abs(xh - x).max()


def test_subspace_ls_exact_in_subspace_without_noise():
  rng = np.random.default_rng(2)
  ratio, p, B = 4, 4, 20
  e0, _ = np.linalg.qr(rng.standard_normal((B, p)))
  a = _smooth_field(rng, (32, 32, p), 1.5)
  x = (a @ e0.T).astype(np.float32)
  srf = rng.uniform(0, 1, (p, B)).astype(np.float32)
  srf /= srf.sum(1, keepdims=True)
  psf = _gaussian_psf(7, 1.7)
  y = np.asarray(degrade.blur_down(jnp.asarray(x), jnp.asarray(psf), ratio))
  z = x @ srf.T
  xh = np.asarray(classical.subspace_ls(y, z, psf, srf, ratio, rank=p, tau=0.0, smooth=0.0, iters=500))
  np.testing.assert_allclose(xh, x, atol=2e-3 * np.abs(x).max())


def test_subspace_ls_satisfies_the_data_better_than_bicubic():
  rng = np.random.default_rng(3)
  ratio, B = 4, 16
  e0 = rng.uniform(0.1, 0.9, (6, B))
  logits = _smooth_field(rng, (32, 32, 6), 2.0) * 4
  ab = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  x = (ab @ e0).astype(np.float32)
  srf = rng.uniform(0, 1, (4, B)).astype(np.float32)
  srf /= srf.sum(1, keepdims=True)
  psf = _gaussian_psf(7, 1.7)
  y = np.asarray(degrade.blur_down(jnp.asarray(x), jnp.asarray(psf), ratio))
  z = x @ srf.T
  out = classical.run_all(y, z, psf, srf, ratio)
  assert set(out) == set(classical.METHODS)
  err = {k: float(np.sqrt(np.mean((np.asarray(v) - x) ** 2))) for k, v in out.items()}
  for v in out.values():
    assert v.shape == x.shape and float(v.min()) >= 0 and float(v.max()) <= 1
  assert err["subspace_ls"] < 0.5 * err["bicubic"]
  assert err["detail_injection"] < err["bicubic"]


def test_shape_mismatch_message():
  with pytest.raises(ValueError, match="ratio=4"):
    classical.detail_injection(np.zeros((4, 4, 5)), np.zeros((15, 16, 3)),
                               _gaussian_psf(7, 1.7), 4)


def test_subspace_ls_smoothing_keeps_constant_images_exact():
  # A spatially constant image has zero gradient energy, so the smoothness term cannot pull
  # the solution away from the truth (tau = 0); a non-constant one is smoothed.
  rng = np.random.default_rng(4)
  B, ratio = 10, 2
  e0, _ = np.linalg.qr(rng.standard_normal((B, 3)))
  x = np.broadcast_to((np.abs(e0) @ rng.uniform(0.2, 1, 3)), (8, 8, B)).astype(np.float32)
  srf = rng.uniform(0, 1, (3, B)).astype(np.float32)
  srf /= srf.sum(1, keepdims=True)
  psf = _gaussian_psf(3, 0.85)
  y = np.asarray(degrade.blur_down(jnp.asarray(x), jnp.asarray(psf), ratio))
  xh = classical.subspace_ls(y, x @ srf.T, psf, srf, ratio, rank=3, tau=0.0, smooth=1.0,
                             iters=300)
  # Zero padding darkens Y's border pixels; the Z term and smoothing must still recover x.
  np.testing.assert_allclose(np.asarray(xh), x, atol=5e-3)
