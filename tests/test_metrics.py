"""Tests for hsijax.metrics (JAX) against hand-computed values and tests/oracles/metrics_np.py.

Hand-computed values are checked against BOTH modules; then the two are checked against each
other (1e-5 relative) on random data, and against brute-force per-window loops written here.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hsijax import metrics as mj
from oracles import metrics_np as mn


@pytest.fixture(params=["jax", "numpy"])
def m(request):
  return mj if request.param == "jax" else mn


def _f(v):
  return float(v)


def _nn_up(a, r):
  """Nearest-neighbour upsample of (h, w, B) by r."""
  return np.repeat(np.repeat(a, r, axis=0), r, axis=1)


# ------------------------------------------------------------------------------------ SAM


def test_sam_known_angle(m):
  x_ref = np.array([[[1.0, 0.0]]])
  x = np.array([[[1.0, 1.0]]])
  assert _f(m.sam(x_ref, x)) == pytest.approx(45.0, rel=1e-6)
  assert _f(m.sam(x_ref, x, degrees=False)) == pytest.approx(math.pi / 4, rel=1e-6)


def test_sam_zero_pixel_and_opposite(m):
  # Pixels: 45 deg, zero reference (-> 0 by convention), zero estimate (-> 0), opposite (180).
  x_ref = np.array([[[1.0, 0.0], [0.0, 0.0], [3.0, 4.0], [1.0, 2.0]]])
  x = np.array([[[1.0, 1.0], [5.0, 1.0], [0.0, 0.0], [-2.0, -4.0]]])
  val = _f(m.sam(x_ref, x))
  assert np.isfinite(val)
  assert val == pytest.approx((45.0 + 0 + 0 + 180.0) / 4, rel=1e-6)
  zeros = np.zeros((2, 2, 3))
  assert _f(m.sam(zeros, zeros)) == 0.0


def test_sam_small_angle_accurate(m):
  # Angle 1e-3 rad between [1, 0] and [cos a, sin a]; arccos in float32 would lose it.
  a = 1e-3
  x_ref = np.array([[[1.0, 0.0]]], np.float32)
  x = np.array([[[math.cos(a), math.sin(a)]]], np.float32)
  assert _f(m.sam(x_ref, x, degrees=False)) == pytest.approx(a, rel=1e-3)


# ---------------------------------------------------------------------------- PSNR / RMSE


def test_psnr_known_mse_and_peak(m):
  rng = np.random.default_rng(0)
  b0 = rng.uniform(0, 2, (4, 4)); b0[0, 0] = 2.0       # peak 2
  b1 = rng.uniform(0, 1, (4, 4)); b1[1, 2] = 1.0       # peak 1
  x_ref = np.stack([b0, b1], -1)
  sign = np.where(np.indices((4, 4)).sum(0) % 2 == 0, 1.0, -1.0)
  x = np.stack([b0 + 0.1, b1 + 0.5 * sign], -1)        # MSE 0.01 and 0.25
  # Band 0: 10 log10(4 / 0.01) = 26.0206 dB; band 1: 10 log10(1 / 0.25) = 6.0206 dB.
  want = np.array([10 * math.log10(400.0), 10 * math.log10(4.0)])
  np.testing.assert_allclose(np.asarray(m.psnr_per_band(x_ref, x)), want, rtol=1e-5)
  assert _f(m.psnr(x_ref, x)) == pytest.approx(want.mean(), rel=1e-5)
  # RMSE over both bands: sqrt((0.01 + 0.25) / 2).
  assert _f(m.rmse(x_ref, x)) == pytest.approx(math.sqrt(0.13), rel=1e-5)


def test_psnr_identical_is_inf(m):
  x = np.random.default_rng(1).uniform(size=(5, 5, 3))
  assert _f(m.psnr(x, x)) == math.inf
  assert _f(m.rmse(x, x)) == 0.0


# ----------------------------------------------------------------------------------- ERGAS


def test_ergas_two_band_hand(m):
  # Band 0: reference mean 2, error +0.2 everywhere -> RMSE^2 / mean^2 = 0.04 / 4 = 0.01.
  # Band 1: reference mean 1, error +-0.3          -> RMSE^2 / mean^2 = 0.09 / 1 = 0.09.
  # ERGAS = (100 / 4) * sqrt((0.01 + 0.09) / 2) = 25 * sqrt(0.05) = 5.5901699...
  b0 = np.array([[1.0, 3.0], [2.0, 2.0]])
  b1 = np.array([[0.5, 1.5], [1.0, 1.0]])
  x_ref = np.stack([b0, b1], -1)
  x = np.stack([b0 + 0.2, b1 + 0.3 * np.array([[1, -1], [-1, 1]])], -1)
  assert _f(m.ergas(x_ref, x, 4)) == pytest.approx(25 * math.sqrt(0.05), rel=1e-5)
  assert _f(m.ergas(x_ref, x_ref, 4)) == 0.0


def test_ergas_bad_ratio(m):
  x = np.ones((2, 2, 1))
  with pytest.raises(ValueError, match="ratio"):
    m.ergas(x, x, 0)


# ------------------------------------------------------------------------------------ UIQI


def _brute_uiqi(x_ref, x, window):
  """Per-window loop with the documented convention (Q = L * CS, 0/0 factors -> 1)."""
  h, w, bands = x_ref.shape
  wh, ww = min(window, h), min(window, w)
  qs = []
  for b in range(bands):
    for i in range(h - wh + 1):
      for j in range(w - ww + 1):
        p = x_ref[i:i + wh, j:j + ww, b].ravel()
        q = x[i:i + wh, j:j + ww, b].ravel()
        mx, my = p.mean(), q.mean()
        vx, vy = p.var(), q.var()
        cxy = ((p - mx) * (q - my)).mean()
        if np.ptp(p) == 0:
          vx, cxy = 0.0, 0.0
        if np.ptp(q) == 0:
          vy, cxy = 0.0, 0.0
        lum = 2 * mx * my / (mx**2 + my**2) if mx**2 + my**2 > 0 else 1.0
        cs = 2 * cxy / (vx + vy) if vx + vy > 0 else 1.0
        qs.append(lum * cs)
  return float(np.mean(qs))


def test_uiqi_identical_is_one(m):
  x = np.random.default_rng(2).uniform(0.1, 1, (40, 36, 3))
  assert _f(m.uiqi(x, x)) == pytest.approx(1.0, abs=1e-6)


def test_uiqi_constant_offset_closed_form(m):
  # Checkerboard of 0.2 / 0.6: every 32 x 32 window has mean mu = 0.4 and is not constant, so
  # with x = x_ref + c: s_xy = s_x^2 = s_y^2 (CS = 1) and Q = 2 mu (mu + c) / (mu^2 + (mu + c)^2)
  # = 2 * 0.4 * 0.5 / (0.16 + 0.25) = 0.4 / 0.41 for c = 0.1, in every window.
  checker = 0.4 + 0.2 * np.where(np.indices((40, 40)).sum(0) % 2 == 0, 1.0, -1.0)
  x_ref = np.stack([checker, checker.T], -1)
  assert _f(m.uiqi(x_ref, x_ref + 0.1)) == pytest.approx(0.4 / 0.41, rel=1e-5)


def test_uiqi_small_image_is_one_window(m):
  # 10 x 12 < 32: the whole band is the window; Q = 2 mu (mu + c) / (mu^2 + (mu + c)^2).
  rng = np.random.default_rng(3)
  x_ref = rng.uniform(0.1, 1, (10, 12, 2))
  c = 0.3
  mu = x_ref.mean((0, 1))
  want = np.mean(2 * mu * (mu + c) / (mu**2 + (mu + c) ** 2))
  assert _f(m.uiqi(x_ref, x_ref + c)) == pytest.approx(want, rel=1e-5)


def test_uiqi_constant_bands(m):
  rng = np.random.default_rng(4)
  tex = rng.uniform(0.1, 1, (8, 8))
  half, zero = np.full((8, 8), 0.5), np.zeros((8, 8))
  cases = [
      (half, half, 1.0),                            # both constant and equal
      (half, np.full((8, 8), 0.3), 0.3 / 0.34),     # 2ab / (a^2 + b^2) = 0.3 / 0.34
      (half, tex, 0.0),                             # one constant -> CS = 0
      (tex, half, 0.0),
      (zero, zero, 1.0),                            # both all zero
  ]
  for a, b, want in cases:
    got = _f(m.uiqi(a[..., None], b[..., None], window=4))
    assert np.isfinite(got)
    assert got == pytest.approx(want, abs=1e-6), (a[0, 0], b[0, 0], want)


def test_uiqi_matches_brute_force_with_constant_regions(m):
  rng = np.random.default_rng(5)
  x_ref = rng.uniform(0.1, 1, (20, 18, 2))
  x_ref[:, :9, 0] = 0.7                     # windows fully inside this region are constant
  x = x_ref + 0.05 * rng.standard_normal(x_ref.shape)
  x[:, :9, 0] = 0.65                        # ... and constant (different value) in x too
  x[:12, :, 1] = 0.2                        # constant in x only
  for window in (8, 32):
    want = _brute_uiqi(x_ref, x, window)
    assert _f(m.uiqi(x_ref, x, window=window)) == pytest.approx(want, rel=2e-5)


# ------------------------------------------------------------------------------------ SSIM


def _brute_ssim(x_ref, x, data_range):
  g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
  win = np.outer(g, g) / np.outer(g, g).sum()
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  h, w, bands = x_ref.shape
  out = []
  for b in range(bands):
    vals = []
    for i in range(h - 10):
      for j in range(w - 10):
        p, q = x_ref[i:i + 11, j:j + 11, b], x[i:i + 11, j:j + 11, b]
        mx, my = (win * p).sum(), (win * q).sum()
        vx, vy = (win * (p - mx) ** 2).sum(), (win * (q - my) ** 2).sum()
        cxy = (win * (p - mx) * (q - my)).sum()
        vals.append((2 * mx * my + c1) * (2 * cxy + c2)
                    / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    out.append(np.mean(vals))
  return float(np.mean(out))


def test_ssim_identical_is_one(m):
  x = np.random.default_rng(6).uniform(size=(16, 16, 3))
  assert _f(m.ssim(x, x)) == pytest.approx(1.0, abs=1e-5)


def test_ssim_matches_brute_force(m):
  rng = np.random.default_rng(7)
  x_ref = rng.uniform(size=(15, 14, 2))
  x = x_ref + 0.1 * rng.standard_normal(x_ref.shape)
  assert _f(m.ssim(x_ref, x, data_range=1.0)) == pytest.approx(
      _brute_ssim(x_ref, x, 1.0), rel=1e-5)
  # Default data range: max - min of each reference band.
  rng_b = x_ref.max((0, 1)) - x_ref.min((0, 1))
  want = np.mean([_brute_ssim(x_ref[..., b:b + 1], x[..., b:b + 1], rng_b[b]) for b in range(2)])
  assert _f(m.ssim(x_ref, x)) == pytest.approx(want, rel=1e-5)


def test_ssim_constant_images_closed_form(m):
  # Constant a vs constant b, L = 1: all variances 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
  a, b = 0.6, 0.4
  c1 = 0.01**2
  got = _f(m.ssim(np.full((12, 12, 1), a), np.full((12, 12, 1), b), data_range=1.0))
  assert got == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)


# --------------------------------------------------------------------- D_lambda, D_s, QNR


def test_no_reference_zero_when_consistent(m):
  rng = np.random.default_rng(8)
  y = rng.uniform(0.1, 1, (8, 8, 5))
  fused = _nn_up(y, 4)                                 # same statistics as y
  srf = rng.uniform(size=(5, 3))
  z = fused @ srf                                      # MSI consistent with the fused image
  assert _f(m.d_lambda(fused, y)) == pytest.approx(0.0, abs=1e-5)
  assert _f(m.d_s(fused, z, y, 4)) == pytest.approx(0.0, abs=1e-5)
  assert _f(m.qnr(fused, z, y, 4)) == pytest.approx(1.0, abs=1e-5)
  # A random fused image is neither spectrally nor spatially consistent.
  noisy = rng.uniform(0.1, 1, fused.shape)
  assert _f(m.d_lambda(noisy, y)) > 0.01
  assert _f(m.d_s(noisy, z, y, 4)) > 0.01


def test_no_reference_hand_example(m):
  # LR bands y1 = [[1, 2], [3, 4]] (mean 2.5, variance 1.25) and y2 = 2 y1; ratio 2.
  y1 = np.array([[1.0, 2.0], [3.0, 4.0]])
  y = np.stack([y1, 2 * y1], -1)
  f = _nn_up(y, 2)                                     # D_lambda = 0
  # One MSI band Z = up(y1) + P, P = +-0.5 checker, zero mean in every 2 x 2 block: Zlr = y1,
  # var(Z) = 1.25 + 0.25 = 1.5, cov(F1, Z) = 1.25, cov(F2, Z) = 2.5, var(F2) = 5.
  p = 0.5 * np.where(np.indices((4, 4)).sum(0) % 2 == 0, 1.0, -1.0)
  z = (f[..., 0] + p)[..., None]
  # l=1: Q(F1, Z) = 1 * 2.5 / 2.75 = 10/11, Q(y1, y1) = 1                 -> |diff| = 1/11
  # l=2: L = 2*5*2.5 / (25 + 6.25) = 0.8 both; CS = 5 / 6.5 = 10/13 (HR), 5 / 6.25 = 0.8 (LR)
  #      -> |0.8 * 10/13 - 0.8 * 0.8| = 0.32 / 13
  want_ds = (1 / 11 + 0.32 / 13) / 2
  assert _f(m.d_lambda(f, y)) == pytest.approx(0.0, abs=1e-6)
  assert _f(m.d_s(f, z, y, 2)) == pytest.approx(want_ds, rel=1e-5)
  assert _f(m.qnr(f, z, y, 2)) == pytest.approx(1 - want_ds, rel=1e-5)
  # D_lambda: fused band 2 = F1 + 2.5 instead of 2 F1. Q(F1, F1 + 2.5) = 2*2.5*5 / (6.25 + 25)
  # = 0.8, LR Q(y1, 2 y1) = 0.8 * 0.8 = 0.64 -> D_lambda = |0.8 - 0.64| = 0.16 (both orders).
  f_bad = np.stack([f[..., 0], f[..., 0] + 2.5], -1)
  assert _f(m.d_lambda(f_bad, y)) == pytest.approx(0.16, rel=1e-5)
  nr = m.no_reference_metrics(f, z, y, 2)
  assert set(nr) == {"d_lambda", "d_s", "qnr"}
  assert nr["d_s"] == pytest.approx(want_ds, rel=1e-5)


def test_no_reference_zero_when_consistent_over_several_blocks(m):
  rng = np.random.default_rng(9)
  y = rng.uniform(0.1, 1, (16, 12, 4))
  fused = _nn_up(y, 4)                                 # 64 x 48: 2 x 1 blocks of 32
  z = fused @ rng.uniform(size=(4, 2))
  for block in (32, 16, 8, None):
    assert _f(m.d_lambda(fused, y, block=block)) == pytest.approx(0.0, abs=1e-5)
    assert _f(m.d_s(fused, z, y, 4, block=block)) == pytest.approx(0.0, abs=1e-5)


def test_no_reference_q_is_the_mean_over_blocks(m):
  # With identical LR bands Q(Y_l, Y_r) = 1 in every block, so D_lambda = mean over pairs of
  # (1 - mean over blocks of Q_b(F_l, F_r)): the mean over blocks of the single-block
  # D_lambda of each block (block=None on the block itself). Blocks: 6 x 6 HR, 3 x 3 LR.
  rng = np.random.default_rng(10)
  y = np.repeat(rng.uniform(0.2, 1, (6, 9, 1)), 3, axis=-1)
  f = _nn_up(y, 2) + 0.2 * rng.uniform(size=(12, 18, 3))
  per_block = [_f(m.d_lambda(f[i:i + 6, j:j + 6], y[i // 2:i // 2 + 3, j // 2:j // 2 + 3],
                             block=None))
               for i in (0, 6) for j in (0, 6, 12)]
  got = _f(m.d_lambda(f, y, block=6))
  assert got == pytest.approx(float(np.mean(per_block)), rel=1e-5)
  assert abs(got - _f(m.d_lambda(f, y, block=None))) > 1e-3  # blocks change the value


def test_no_reference_bad_shapes(m):
  f, y, z = np.ones((8, 8, 3)), np.ones((2, 2, 3)), np.ones((8, 8, 2))
  with pytest.raises(ValueError, match="ratio"):
    m.d_s(f, z, y, 3)
  with pytest.raises(ValueError, match="y_lr"):
    m.d_s(f, z, np.ones((4, 4, 3)), 4)
  with pytest.raises(ValueError, match="band"):
    m.d_lambda(f, np.ones((2, 2, 4)))
  # Block-averaged Q needs an integer HR / LR ratio; the global Q does not.
  with pytest.raises(ValueError, match="integer"):
    m.d_lambda(np.random.default_rng(0).uniform(size=(10, 10, 3)), f[:3, :3])
  assert np.isfinite(_f(m.d_lambda(np.random.default_rng(0).uniform(size=(10, 10, 3)),
                                   np.random.default_rng(1).uniform(size=(3, 3, 3)),
                                   block=None)))


# ------------------------------------------------------------------------------------- FID


def _whitened(rng, n, bands):
  """n samples whose sample mean is 0 and unbiased sample covariance is exactly I."""
  a = rng.standard_normal((n, bands))
  a -= a.mean(0)
  chol = np.linalg.cholesky(np.cov(a, rowvar=False))
  return a @ np.linalg.inv(chol).T


def test_fid_identical_is_zero(m):
  s = np.random.default_rng(9).uniform(size=(300, 6))
  assert _f(m.spectral_fid(s, s)) == pytest.approx(0.0, abs=1e-4)


def test_fid_diagonal_gaussians_closed_form(m):
  # Sample means mu1, mu2 and covariances diag(d1), diag(d2) exactly, so
  # FID = |mu1 - mu2|^2 + sum_b (sqrt(d1_b) - sqrt(d2_b))^2.
  rng = np.random.default_rng(10)
  bands = 5
  mu1, mu2 = rng.uniform(size=bands), rng.uniform(size=bands)
  d1, d2 = rng.uniform(0.5, 2, bands), rng.uniform(0.5, 2, bands)
  real = _whitened(rng, 400, bands) * np.sqrt(d1) + mu1
  gen = _whitened(rng, 300, bands) * np.sqrt(d2) + mu2
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
  assert _f(m.spectral_fid(real, gen)) == pytest.approx(want, rel=1e-4)


def test_fid_bad_input(m):
  with pytest.raises(ValueError, match="band count"):
    m.spectral_fid(np.ones((4, 3)), np.ones((4, 2)))
  with pytest.raises(ValueError, match="N >= 2"):
    m.spectral_fid(np.ones((1, 3)), np.ones((4, 3)))


# ------------------------------------------------------------------------ JAX == NumPy


def _random_case():
  rng = np.random.default_rng(11)
  x_ref = rng.uniform(0.1, 1, (40, 36, 6)).astype(np.float32)
  x = (x_ref + 0.05 * rng.standard_normal(x_ref.shape)).astype(np.float32)
  x_ref[:, :20, 2], x[:, :20, 2] = 0.5, 0.6     # constant windows in one band
  y = x_ref.reshape(10, 4, 9, 4, 6).mean((1, 3))
  z = (x_ref @ rng.uniform(size=(6, 3))).astype(np.float32)
  real = rng.standard_normal((500, 8)).astype(np.float32)
  gen = (0.3 * rng.standard_normal((400, 8)) @ rng.standard_normal((8, 8)) + 0.2).astype(
      np.float32)
  return x_ref, x, y, z, real, gen


@pytest.mark.parametrize("name", [
    "psnr", "psnr_per_band", "sam", "sam_rad", "rmse", "ergas", "uiqi", "uiqi8", "ssim",
    "d_lambda", "d_s", "qnr", "d_lambda_b8", "d_s_b8", "qnr_global", "spectral_fid"])
def test_jax_matches_numpy(name):
  x_ref, x, y, z, real, gen = _random_case()
  calls = {
      "psnr": lambda mod: mod.psnr(x_ref, x),
      "psnr_per_band": lambda mod: mod.psnr_per_band(x_ref, x),
      "sam": lambda mod: mod.sam(x_ref, x),
      "sam_rad": lambda mod: mod.sam(x_ref, x, degrees=False),
      "rmse": lambda mod: mod.rmse(x_ref, x),
      "ergas": lambda mod: mod.ergas(x_ref, x, 4),
      "uiqi": lambda mod: mod.uiqi(x_ref, x),
      "uiqi8": lambda mod: mod.uiqi(x_ref, x, window=8),
      "ssim": lambda mod: mod.ssim(x_ref, x),
      "d_lambda": lambda mod: mod.d_lambda(x, y),
      "d_s": lambda mod: mod.d_s(x, z, y, 4),
      "qnr": lambda mod: mod.qnr(x, z, y, 4),
      # 8 HR / 2 LR pixel blocks: 20 blocks, the last LR row / column cropped.
      "d_lambda_b8": lambda mod: mod.d_lambda(x, y, block=8),
      "d_s_b8": lambda mod: mod.d_s(x, z, y, 4, block=8),
      "qnr_global": lambda mod: mod.qnr(x, z, y, 4, block=None),
      "spectral_fid": lambda mod: mod.spectral_fid(real, gen),
  }
  got, want = np.asarray(calls[name](mj)), np.asarray(calls[name](mn))
  assert np.all(np.isfinite(want)) and np.any(want != 0)
  # The FID is a difference of traces of similar size: float32 keeps ~1e-5 of it (1.6e-5
  # measured on one Xeon), so it gets 5e-5; everything else 1e-5.
  np.testing.assert_allclose(got, want, rtol=5e-5 if name == "spectral_fid" else 1e-5)


def test_all_metrics_dicts_agree():
  x_ref, x, *_ = _random_case()
  a, b = mj.all_metrics(x_ref, x, 4), mn.all_metrics(x_ref, x, 4)
  assert list(a) == list(b) == ["psnr", "sam", "rmse", "ergas", "uiqi", "ssim"]
  for k in a:
    assert isinstance(a[k], float) and isinstance(b[k], float)
    assert a[k] == pytest.approx(b[k], rel=1e-5), k


def test_jax_metrics_compose_under_jit_and_vmap():
  x_ref, x, y, z, *_ = _random_case()

  @jax.jit
  def score(a, b):
    return jnp.stack([mj.psnr(a, b), mj.sam(a, b), mj.ergas(a, b, 4), mj.uiqi(a, b, 8),
                      mj.ssim(a, b), mj.qnr(b, z, y, 4)])

  vals = np.asarray(score(x_ref, x))
  want = [mn.psnr(x_ref, x), mn.sam(x_ref, x), mn.ergas(x_ref, x, 4), mn.uiqi(x_ref, x, 8),
          mn.ssim(x_ref, x), mn.qnr(x, z, y, 4)]
  np.testing.assert_allclose(vals, want, rtol=1e-5)
  # vmap over a batch of estimates: each entry equals the single-image value.
  batch = np.stack([x, x_ref + 0.01])
  got = np.asarray(jax.vmap(lambda b: mj.rmse(x_ref, b))(batch))
  np.testing.assert_allclose(got, [mn.rmse(x_ref, x), 0.01], rtol=1e-4)


# ----------------------------------------------------------------------------- no-data masks


def _masked_problem():
  rng = np.random.default_rng(5)
  ref = rng.uniform(0.1, 1.0, (40, 44, 5)).astype(np.float32)
  x = (ref + 0.05 * rng.normal(size=ref.shape)).astype(np.float32)
  valid = np.ones((40, 44), bool)
  valid[3:5, 30:33] = False  # a no-data patch
  return ref, x, valid


def test_masked_metrics_are_the_metrics_of_the_valid_pixels_and_windows():
  ref, x, valid = _masked_problem()
  got = mj.masked_metrics(ref, x, 4, valid)
  # Pixel metrics: the oracle on the valid pixels alone, as an (N, 1, B) image.
  r_px, x_px = ref[valid][:, None], x[valid][:, None]
  assert got["psnr"] == pytest.approx(mn.psnr(r_px, x_px), rel=1e-5)
  assert got["sam"] == pytest.approx(mn.sam(r_px, x_px), rel=1e-4)
  assert got["rmse"] == pytest.approx(mn.rmse(r_px, x_px), rel=1e-5)
  assert got["ergas"] == pytest.approx(mn.ergas(r_px, x_px, 4), rel=1e-5)
  # UIQI: the mean of the oracle's Q over every 32 x 32 window without a no-data pixel.
  qs = [mn.uiqi(ref[i:i + 32, j:j + 32], x[i:i + 32, j:j + 32])
        for i in range(40 - 31) for j in range(44 - 31) if valid[i:i + 32, j:j + 32].all()]
  assert 0 < len(qs) < 9 * 13 and got["uiqi"] == pytest.approx(np.mean(qs), rel=1e-4)
  # Garbage under the mask changes nothing; without the mask it does.
  x_bad = x.copy()
  x_bad[~valid] = 50.0
  assert mj.masked_metrics(ref, x_bad, 4, valid) == pytest.approx(got, rel=1e-5)
  assert mj.all_metrics(ref, x_bad, 4)["psnr"] < got["psnr"] - 3
  assert mj.masked_metrics(ref, x, 4, np.ones_like(valid)) == mj.all_metrics(ref, x, 4)


def test_masked_no_reference_metrics_skip_blocks_with_no_data():
  ref, x, valid = _masked_problem()
  y = ref[:40, :44].reshape(10, 4, 11, 4, 5).mean((1, 3))
  f = np.asarray(x[:40, :44])
  z = ref[:40, :44, :3]
  v = valid[:40, :44]
  got = mj.no_reference_metrics(f, z, y, 4, block=8, valid=v)
  f_bad = f.copy()
  f_bad[~v] = 9.0
  assert mj.no_reference_metrics(f_bad, z, y, 4, block=8, valid=v) == pytest.approx(got,
                                                                                      rel=1e-5)
  assert mj.no_reference_metrics(f_bad, z, y, 4, block=8)["d_lambda"] > got["d_lambda"]
  # By strips of rows == whole image, mask included.
  by_rows = mj.no_reference_metrics_by_rows(lambda a, b: f[a:b], z, y, 4, block=8,
                                                 rows=16, valid=v)
  assert by_rows == pytest.approx(got, rel=1e-4)
  # An all-valid mask is no mask.
  assert mj.no_reference_metrics(f, z, y, 4, block=8, valid=np.ones_like(v)) == \
      pytest.approx(mj.no_reference_metrics(f, z, y, 4, block=8), rel=1e-6)
