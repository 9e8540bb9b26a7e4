"""Tests for hsijax.degrade: PSF, strided blur-down, SRF, noise, Wald protocol."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.signal import convolve2d

from hsijax import degrade


def _numpy_blur_down(x, psf, ratio):
  """Independent reference: full 'same' convolution per band, then subsample."""
  x = np.asarray(x, np.float64)
  psf = np.asarray(psf, np.float64)
  full = np.stack([convolve2d(x[..., b], psf, mode="same", boundary="fill")
                   for b in range(x.shape[-1])], axis=-1)
  return full[::ratio, ::ratio]


# ----------------------------------------------------------------------------
# blur_down
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["matmul", "conv"])
@pytest.mark.parametrize("shape,k,ratio", [
    ((12, 16, 3), 3, 2),
    ((16, 24, 4), 7, 4),
    ((32, 48, 3), 15, 8),
    ((16, 16, 2), 3, 8),     # kernel smaller than the ratio
    ((16, 16, 2), 21, 4),    # kernel wider than 2 * ratio
    ((10, 10, 2), 5, 1),     # plain convolution
])
def test_blur_down_matches_numpy(shape, k, ratio, method):
  rng = np.random.default_rng(k * 100 + ratio)
  x = rng.random(shape).astype(np.float32)
  # A random, asymmetric PSF also checks the kernel orientation (true convolution).
  psf = rng.random((k, k)).astype(np.float32)
  psf /= psf.sum()
  out = degrade.blur_down(jnp.asarray(x), jnp.asarray(psf), ratio, method=method)
  assert out.shape == (shape[0] // ratio, shape[1] // ratio, shape[2])
  np.testing.assert_allclose(np.asarray(out), _numpy_blur_down(x, psf, ratio),
                             rtol=1e-5, atol=1e-6)


def test_blur_down_hand_computed_impulse():
  # out[i, j] = sum_{u,v} psf[u, v] x[r i + p - u, r j + p - v] (true convolution, p = 1).
  psf = np.arange(1, 10, dtype=np.float32).reshape(3, 3)
  for (pos, expected_value) in [((4, 4), psf[1, 1]), ((5, 5), psf[0, 0]), ((3, 5), psf[2, 0])]:
    x = np.zeros((8, 8, 1), np.float32)
    x[pos + (0,)] = 1.0
    out = np.asarray(degrade.blur_down(x, psf, 4))[..., 0]
    expected = np.zeros((2, 2), np.float32)
    expected[1, 1] = expected_value  # only kept pixel (4, 4) is within reach of the impulse
    np.testing.assert_array_equal(out, expected)


def test_blur_down_jit_and_vmap():
  rng = np.random.default_rng(0)
  xs = jnp.asarray(rng.random((3, 16, 16, 5)), jnp.float32)
  psf = jnp.asarray(degrade.gaussian_psf(4))
  f = jax.jit(jax.vmap(degrade.blur_down, in_axes=(0, None, None)), static_argnums=2)
  batched = f(xs, psf, 4)
  for i in range(3):
    np.testing.assert_allclose(batched[i], degrade.blur_down(xs[i], psf, 4), rtol=1e-6, atol=1e-7)
  # Per-scene PSFs are vmappable too.
  psfs = jnp.stack([psf, psf[::-1], psf * 2])
  per = jax.vmap(functools.partial(degrade.blur_down, ratio=4))(xs, psfs)
  np.testing.assert_allclose(per[2], 2 * batched[2], rtol=1e-5)


def _iter_eqns(jaxpr):
  """All equations of a jaxpr, recursing into sub-jaxprs (pjit, custom_jvp, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _iter_eqns(inner)


_DATA_MOVEMENT = {"pad", "reshape", "transpose", "rev", "slice", "squeeze", "broadcast_in_dim",
                  "convert_element_type", "copy", "copy_p", "pjit", "jit", "concatenate",
                  "expand_dims"}


def _largest_compute_output(fn, x, psf):
  jaxpr = jax.make_jaxpr(fn)(x, psf).jaxpr
  sizes = [int(np.prod(v.aval.shape)) for e in _iter_eqns(jaxpr)
           if e.primitive.name not in _DATA_MOVEMENT for v in e.outvars]
  return max(sizes)


@pytest.mark.parametrize("method", ["matmul", "conv"])
def test_blur_down_never_computes_full_resolution(method):
  h_full, w_full, n_bands, ratio = 64, 64, 103, 8
  x = jnp.zeros((h_full, w_full, n_bands), jnp.float32)
  psf = jnp.asarray(degrade.gaussian_psf(ratio))
  full = h_full * w_full * n_bands
  fn = functools.partial(degrade.blur_down, ratio=ratio, method=method)
  # Every arithmetic result (conv, dot, add, ...) is low resolution; only pads,
  # reshapes and transposes of the input itself are full size.
  assert _largest_compute_output(fn, x, psf) < full / 4

  # The check is able to fail: convolving at full resolution then slicing.
  def naive(x, psf):
    k = psf.shape[0]
    w = jnp.broadcast_to(psf[:, :, None, None], (k, k, 1, n_bands))
    y = jax.lax.conv_general_dilated(x[None], w, (1, 1), ((7, 7), (7, 7)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=n_bands)
    return y[0, ::ratio, ::ratio]
  assert _largest_compute_output(naive, x, psf) >= full


def test_blur_down_grad_psf_matches_finite_differences():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.random((16, 16, 3)), jnp.float32)
  target = jnp.asarray(rng.random((4, 4, 3)), jnp.float32)
  psf = jnp.asarray(rng.random((7, 7)) / 49, jnp.float32)

  def loss(p):
    return jnp.sum((degrade.blur_down(x, p, 4) - target) ** 2)

  grad = np.asarray(jax.grad(loss)(psf))
  eps = 1e-2  # the loss is quadratic in psf: central differences are exact up to rounding
  for (u, v) in [(0, 0), (3, 3), (1, 5), (6, 2)]:
    e = jnp.zeros_like(psf).at[u, v].set(eps)
    fd = (float(loss(psf + e)) - float(loss(psf - e))) / (2 * eps)
    np.testing.assert_allclose(grad[u, v], fd, rtol=2e-3)


@pytest.mark.parametrize("method", ["matmul", "conv"])
def test_blur_down_grad_x_is_the_adjoint(method):
  # blur_down is linear in x, so grad of <A x, g> is A^T g with <A x, g> = <x, A^T g>.
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.random((32, 32, 3)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((4, 4, 3)), jnp.float32)
  psf = jnp.asarray(degrade.gaussian_psf(8))
  op = functools.partial(degrade.blur_down, psf=psf, ratio=8, method=method)
  adj = jax.grad(lambda x: jnp.sum(op(x) * g))(x)
  np.testing.assert_allclose(float(jnp.sum(op(x) * g)), float(jnp.sum(x * adj)), rtol=1e-5)
  # Explicit adjoint: scatter g onto the kept pixels, correlate with the PSF.
  up = np.zeros((32, 32, 3))
  up[::8, ::8] = np.asarray(g)
  expected = np.stack([convolve2d(up[..., b], np.asarray(psf)[::-1, ::-1], mode="same")
                       for b in range(3)], -1)
  np.testing.assert_allclose(np.asarray(adj), expected, rtol=1e-4, atol=1e-6)


def test_blur_down_errors():
  x = jnp.zeros((20, 24, 3))
  psf = jnp.asarray(degrade.gaussian_psf(8))
  with pytest.raises(ValueError, match=r"ratio 8 does not divide the image height H = 20.*crop"):
    degrade.blur_down(x, psf, 8)
  with pytest.raises(ValueError, match=r"width W = 24"):
    degrade.blur_down(jnp.zeros((16, 24, 3)), psf, 16)
  with pytest.raises(ValueError, match=r"square 2-D kernel with odd side"):
    degrade.blur_down(jnp.zeros((16, 16, 3)), jnp.ones((4, 4)), 4)
  with pytest.raises(ValueError, match=r"square"):
    degrade.blur_down(jnp.zeros((16, 16, 3)), jnp.ones((3, 5)), 4)
  with pytest.raises(ValueError, match=r"\(H, W, B\).*vmap"):
    degrade.blur_down(jnp.zeros((16, 16)), jnp.ones((3, 3)), 4)
  with pytest.raises(ValueError, match=r"static Python int"):
    degrade.blur_down(jnp.zeros((16, 16, 1)), jnp.ones((3, 3)), 4.0)
  # Validation only looks at static shapes: it also fires at trace time under jit.
  with pytest.raises(ValueError, match=r"does not divide"):
    jax.jit(degrade.blur_down, static_argnums=2)(x, psf, 8)


# ----------------------------------------------------------------------------
# PSF
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [2, 4, 8])
def test_gaussian_psf(ratio):
  psf = degrade.gaussian_psf(ratio)
  k = 2 * ratio - 1
  assert psf.shape == (k, k) and psf.dtype == np.float32
  np.testing.assert_allclose(psf.sum(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(psf, psf.T, rtol=1e-6)
  np.testing.assert_allclose(psf, psf[::-1, ::-1], rtol=1e-6)
  c = k // 2
  assert np.unravel_index(np.argmax(psf), psf.shape) == (c, c)
  # Neighbour ratio of a sampled Gaussian: psf[c, c+1] / psf[c, c] = exp(-1 / (2 sigma^2)).
  sigma = np.sqrt(-0.5 / np.log(psf[c, c + 1] / psf[c, c]))
  np.testing.assert_allclose(2.3548 * sigma, ratio, rtol=1e-4)  # FWHM = ratio


def test_gaussian_psf_paper_values_and_errors():
  psf = degrade.gaussian_psf(8)
  c = 7
  sigma = np.sqrt(-0.5 / np.log(psf[c, c + 1] / psf[c, c]))
  assert abs(sigma - 3.40) < 0.005  # SPEC: ratio 8 -> 15 x 15, sigma 3.40
  assert degrade.gaussian_psf(4, size=9).shape == (9, 9)
  with pytest.raises(ValueError, match="odd"):
    degrade.gaussian_psf(4, size=8)


# ----------------------------------------------------------------------------
# Spectral response
# ----------------------------------------------------------------------------


def test_spectral_response_matches_numpy():
  rng = np.random.default_rng(3)
  x = rng.random((5, 6, 10)).astype(np.float32)
  srf = rng.random((4, 10)).astype(np.float32)
  out = degrade.spectral_response(jnp.asarray(x), jnp.asarray(srf))
  expected = np.tensordot(x.astype(np.float64), srf.astype(np.float64).T, axes=1)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5)
  with pytest.raises(ValueError, match=r"x has 9 bands.*SRF has 10 columns"):
    degrade.spectral_response(jnp.zeros((5, 6, 9)), jnp.asarray(srf))


def test_srf_from_curves_hand_computed():
  wl = np.array([400.0, 500.0, 600.0])
  curves = np.array([[0.0, 1.0, 0.0],      # triangle peaking at 500
                     [0.0, 0.0, 2.0]])     # ramp up to 600
  bands = np.array([450.0, 500.0, 550.0, 650.0])  # 650 is outside the curves -> 0
  srf = degrade.srf_from_curves(wl, curves, bands)
  np.testing.assert_allclose(srf[0], [0.25, 0.5, 0.25, 0.0], rtol=1e-6)
  np.testing.assert_allclose(srf[1], [0.0, 0.0, 1.0, 0.0], rtol=1e-6)  # only 550 nm (value 1) is > 0
  np.testing.assert_allclose(srf.sum(axis=1), 1.0, rtol=1e-6)


def test_srf_from_curves_no_overlap_names_the_band():
  wl = np.array([700.0, 800.0, 900.0])
  with pytest.raises(ValueError, match=r"'nir'.*no overlap.*400-500 nm"):
    degrade.srf_from_curves(wl, [[0.0, 1.0, 0.0]], [400.0, 450.0, 500.0], names=["nir"])


@pytest.mark.parametrize("source", ["gaussian", "file"])
def test_ikonos_srf_rows(source, request):
  wl = degrade.nominal_wavelengths(103, 430, 860)
  assert wl.shape == (103,) and wl[0] == 430 and wl[-1] == 860
  np.testing.assert_allclose(np.diff(wl), (860 - 430) / 102)
  path = None
  if source == "file":
    path = request.getfixturevalue("shared_data") / "srf" / "ikonos.npz"
  srf = degrade.ikonos_srf(wl, path=path)
  assert srf.shape == (4, 103) and srf.dtype == np.float32
  np.testing.assert_allclose(srf.sum(axis=1), 1.0, rtol=1e-5)
  assert (srf >= 0).all()
  # Each row peaks inside its band's half-maximum range (from the real curves).
  for row, (lo, hi) in zip(srf, [(440, 520), (505, 600), (630, 700), (755, 855)]):
    assert lo <= wl[np.argmax(row)] <= hi
  # Row centroids are ordered blue < green < red < NIR.
  centroids = srf @ wl
  assert np.all(np.diff(centroids) > 30)


def test_ikonos_gaussian_close_to_real_curve(shared_data):
  wl = degrade.nominal_wavelengths(48, 380, 1050)
  real = degrade.ikonos_srf(wl, path=shared_data / "srf" / "ikonos.npz")
  approx = degrade.ikonos_srf(wl)
  np.testing.assert_allclose(approx @ wl, real @ wl, atol=20.0)  # centroids within 20 nm


# ----------------------------------------------------------------------------
# Noise and normalisation
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("snr_db", [20.0, 30.0])
def test_add_noise_snr(snr_db):
  rng = np.random.default_rng(4)
  # Bands with very different power: the noise must follow each band's power.
  x = jnp.asarray(rng.random((64, 64, 3)) * np.array([1.0, 0.1, 5.0]), jnp.float32)
  noisy = degrade.add_noise(jax.random.key(0), x, snr_db)
  noise = np.asarray(noisy - x, np.float64)
  xs = np.asarray(x, np.float64)
  measured = 10 * np.log10((xs ** 2).mean(axis=(0, 1)) / (noise ** 2).mean(axis=(0, 1)))
  np.testing.assert_allclose(measured, snr_db, atol=0.5)
  assert abs(noise.mean()) < 0.1 * noise.std()


def test_add_noise_keys():
  x = jnp.ones((8, 8, 2))
  a = degrade.add_noise(jax.random.key(1), x, 20.0)
  b = degrade.add_noise(jax.random.key(1), x, 20.0)
  c = degrade.add_noise(jax.random.key(2), x, 20.0)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  np.testing.assert_array_equal(degrade.add_noise(jax.random.key(1), x, None), x)
  np.testing.assert_array_equal(degrade.add_noise(jax.random.key(1), x, jnp.inf), x)


def test_normalise_cube():
  cube = np.array([[[-1.0, 2.0], [4.0, 0.5]]])
  out = degrade.normalise_cube(cube)
  np.testing.assert_allclose(out, [[[0.0, 0.5], [1.0, 0.125]]])
  assert out.dtype == np.float32
  with pytest.raises(ValueError, match=r"1 NaN/inf.*nan_to_num"):
    degrade.normalise_cube(np.array([[[np.nan, 1.0]]]))
  with pytest.raises(ValueError, match="no positive values"):
    degrade.normalise_cube(-np.ones((2, 2, 2)))


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_upsample_is_aligned_with_blur_down_grid(method):
  rng = np.random.default_rng(5)
  y = jnp.asarray(rng.random((5, 6, 3)), jnp.float32)
  up = degrade.upsample(y, 4, method=method)
  assert up.shape == (20, 24, 3)
  # LR pixel (i, j) sits on HR pixel (4 i, 4 j), the pixel blur_down keeps.
  np.testing.assert_allclose(up[::4, ::4], y, atol=1e-5)
  # Bilinear reproduces a linear ramp between samples.
  ramp = jnp.arange(5.0)[:, None, None] * jnp.ones((1, 6, 1))
  up_ramp = degrade.upsample(ramp, 4, method="bilinear")
  np.testing.assert_allclose(up_ramp[:17, 3, 0], np.arange(17) / 4, atol=1e-5)
  np.testing.assert_allclose(up_ramp[17:, 3, 0], 4.0, atol=1e-5)  # edge replicated


# ----------------------------------------------------------------------------
# Wald protocol
# ----------------------------------------------------------------------------


def test_wald_protocol_on_real_crop(shared_data):
  cube = np.load(shared_data / "cubes" / "pavia_centre_crop.npz")["cube"]  # (100, 100, 102)
  wl = degrade.nominal_wavelengths(cube.shape[-1], 430, 860)
  srf = degrade.ikonos_srf(wl, path=shared_data / "srf" / "ikonos.npz")
  data = degrade.wald_protocol(cube, ratio=4, key=jax.random.key(0), srf=srf)
  assert data.x.shape == (48, 100, 102)          # bottom 50 rows cropped to a multiple of 4
  assert data.y.shape == (12, 25, 102)
  assert data.z.shape == (48, 100, 4)
  assert data.train_pixels.shape == (50 * 100, 102)
  assert data.psf.shape == (7, 7) and data.ratio == 4 and data.srf.shape == (4, 102)
  norm = degrade.normalise_cube(cube)
  np.testing.assert_array_equal(data.x, norm[50:98, :100])
  np.testing.assert_array_equal(data.train_pixels, norm[:50].reshape(-1, 102))
  # Noise levels as requested (20 dB on Y, 30 dB on Z), measured over all bands.
  clean_y = degrade.blur_down(data.x, data.psf, 4)
  clean_z = degrade.spectral_response(data.x, data.srf)
  for clean, noisy, snr in [(clean_y, data.y, 20.0), (clean_z, data.z, 30.0)]:
    clean, noisy = np.asarray(clean, np.float64), np.asarray(noisy, np.float64)
    measured = 10 * np.log10((clean ** 2).mean() / ((noisy - clean) ** 2).mean())
    assert abs(measured - snr) < 0.5
  same = degrade.wald_protocol(cube, ratio=4, key=jax.random.key(0), srf=srf)
  other = degrade.wald_protocol(cube, ratio=4, key=jax.random.key(1), srf=srf)
  np.testing.assert_array_equal(same.y, data.y)
  np.testing.assert_array_equal(same.z, data.z)
  assert not np.allclose(other.y, data.y) and not np.allclose(other.z, data.z)


def test_wald_protocol_split_none_and_errors():
  rng = np.random.default_rng(6)
  cube = rng.random((18, 13, 5)).astype(np.float32) * 7
  srf = np.full((2, 5), 0.2, np.float32)
  data = degrade.wald_protocol(cube, ratio=4, key=jax.random.key(0), srf=srf, split=None,
                               snr_y_db=None, snr_z_db=None)
  assert data.x.shape == (16, 12, 5)
  np.testing.assert_array_equal(data.train_pixels, np.asarray(data.x).reshape(-1, 5))
  np.testing.assert_allclose(data.y, degrade.blur_down(data.x, data.psf, 4), rtol=1e-6)
  np.testing.assert_allclose(data.z, np.asarray(data.x) @ srf.T, rtol=1e-5)
  with pytest.raises(ValueError, match=r"srf shape \(2, 4\).*5 bands"):
    degrade.wald_protocol(cube, ratio=4, key=jax.random.key(0), srf=srf[:, :4])
  with pytest.raises(ValueError, match="smaller than the ratio"):
    degrade.wald_protocol(cube, ratio=16, key=jax.random.key(0), srf=srf)
  with pytest.raises(ValueError, match="split must be"):
    degrade.wald_protocol(cube, ratio=4, key=jax.random.key(0), srf=srf, split="cols")
