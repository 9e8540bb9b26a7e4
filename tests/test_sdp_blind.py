"""Blind PSF / SRF estimation: projections, objective by hand, recovery on a synthetic problem."""
import jax.numpy as jnp
import numpy as np
import pytest

from hsijax import degrade
from hsijax.sdp import blind

H = W = 24
B, b, R = 12, 3, 2


def _problem():
  rng = np.random.default_rng(0)
  # Four smooth endmembers mixed with random abundances: spectrally diverse pixels.
  grid = np.linspace(0, 1, B)
  ends = np.stack([0.2 + 0.6 * np.exp(-((grid - c) / 0.25) ** 2) for c in (0.1, 0.4, 0.7, 1.0)])
  ab = rng.dirichlet(np.ones(4) * 0.5, size=(H, W))
  x = jnp.asarray(np.clip(ab @ ends, 0, 1), jnp.float32)
  psf = jnp.asarray(degrade.gaussian_psf(R), jnp.float32)         # 3 x 3, FWHM = ratio
  srf = np.zeros((b, B), np.float32)
  for i, (lo, hi) in enumerate([(0, 4), (4, 8), (8, 12)]):
    srf[i, lo:hi] = np.array([1.0, 2.0, 2.0, 1.0])
  srf = jnp.asarray(srf / srf.sum(1, keepdims=True))
  y = degrade.blur_down(x, psf, R)
  z = degrade.spectral_response(x, srf)
  return y, z, psf, srf


def test_projections():
  rng = np.random.default_rng(1)
  psf = blind.project_psf(jnp.asarray(rng.normal(0.1, 0.5, (5, 5)), jnp.float32))
  srf = blind.project_srf(jnp.asarray(rng.normal(2.0, 6.0, (4, 9)), jnp.float32))
  assert float(psf.sum()) == pytest.approx(1.0, abs=1e-6)
  assert float(psf.min()) >= 0.0 and float(psf.max()) <= 1.0
  np.testing.assert_allclose(np.asarray(srf.sum(1)), 1.0, atol=1e-6)
  assert float(srf.min()) >= 0.0 and float(srf.max()) <= 10.0
  # Clip-then-normalise, by hand for one row.
  row = np.asarray(rng.normal(2.0, 6.0, (1, 9)), np.float32)
  want = np.clip(row, 0, 10) / np.clip(row, 0, 10).sum()
  np.testing.assert_allclose(np.asarray(blind.project_srf(jnp.asarray(row))), want, rtol=1e-6)


def test_objective_by_hand():
  y, z, psf, srf = _problem()
  srf_raw = srf * jnp.arange(1, b + 1)[:, None]              # rows not normalised
  got = float(blind.blind_objective(psf, srf_raw, y, z, R))
  y_low = np.clip(np.einsum("hwj,ij->hwi", np.asarray(y), np.asarray(srf)), 0, 1)
  z_low = np.clip(np.asarray(degrade.blur_down(z, psf, R)), 0, 1)
  assert got == pytest.approx(np.abs(y_low - z_low).sum(), rel=1e-4, abs=1e-5)
  assert got < 1e-3 * y_low.size            # the true operators explain the data (noiseless)


def test_estimation_recovers_srf_and_keeps_constraints():
  y, z, psf_true, srf_true = _problem()
  steps = 400
  psf, srf, losses = blind.estimate_psf_srf(y, z, R, num_steps=steps, lr=3e-4,
                                            return_losses=True)
  psf, srf, losses = map(np.asarray, (psf, srf, losses))
  assert psf.shape == (2 * R - 1, 2 * R - 1) and srf.shape == (b, B) and losses.shape == (steps,)
  # Constraints after the last projection.
  assert psf.sum() == pytest.approx(1.0, abs=1e-5) and psf.min() >= 0 and psf.max() <= 1
  np.testing.assert_allclose(srf.sum(1), 1.0, atol=1e-5)
  assert srf.min() >= 0 and srf.max() <= 10
  # The L1 objective goes down and the SRF moves towards the truth from its 1/B start.
  final = float(blind.blind_objective(psf, srf, y, z, R))
  assert final < 0.5 * losses[0]
  init_err = np.abs(np.full((b, B), 1.0 / B) - np.asarray(srf_true)).sum()
  assert np.abs(srf - np.asarray(srf_true)).sum() < 0.5 * init_err
  # The same call again gives the same answer (one deterministic jitted scan).
  psf2, srf2 = blind.estimate_psf_srf(y, z, R, num_steps=steps, lr=3e-4)
  np.testing.assert_array_equal(psf, np.asarray(psf2))
  np.testing.assert_array_equal(srf, np.asarray(srf2))


def test_bad_input_raises():
  y, z, _, _ = _problem()
  with pytest.raises(ValueError, match="ratio"):
    blind.estimate_psf_srf(y, z, 3)
  with pytest.raises(ValueError, match="odd"):
    blind.estimate_psf_srf(y, z, R, psf_size=4)


def _independent_bands_problem():
  # Every HSI band an independent random image: rownorm(R) Y determines R, so the split of
  # g_j R_j into a gain and a row of sum 1 is identifiable (with a few spectra mixed, as in
  # _problem, other rows of R reproduce the same R Y and only the product is determined).
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.uniform(0.1, 0.9, (H, W, B)), jnp.float32)
  _, _, psf, srf = _problem()
  return degrade.blur_down(x, psf, R), degrade.spectral_response(x, srf), psf, srf


def test_affine_radiometry_recovers_known_gains_and_offsets():
  # Another sensor's MSI: Z'_j = g_j (R_j X) + o_j. The authors' model (rows of R sum to 1,
  # no offset) cannot express it; the affine model must recover g and o, and mapping Z' back
  # (Z' - o) / g must give the MSI in the LR-HSI's units again.
  y, z, _, srf_true = _independent_bands_problem()
  gain, offset = np.array([0.7, 1.25, 1.4], np.float32), np.array([0.03, 0.05, 0.02], np.float32)
  z_cross = jnp.asarray(np.asarray(z) * gain + offset)
  psf, srf, cal, losses = blind.estimate_psf_srf(y, z_cross, R, num_steps=400, lr=1e-3,
                                                 radiometry="affine", return_losses=True)
  np.testing.assert_allclose(np.asarray(srf).sum(1), 1.0, atol=1e-5)  # R stays row-normalised
  np.testing.assert_allclose(np.asarray(cal["gain"]), gain, rtol=0.01)
  np.testing.assert_allclose(np.asarray(cal["offset"]), offset, atol=0.002)
  np.testing.assert_allclose(np.asarray(srf), np.asarray(srf_true), atol=0.01)
  assert np.asarray(cal["r2"]).min() > 0.99
  assert float(losses[-1]) < 0.5 * float(losses[0])
  back = blind.calibrate_msi(z_cross, cal["gain"], cal["offset"])
  assert np.abs(back - np.asarray(z)).mean() < 0.02 * np.asarray(z).mean()
  # Without the gain / offset the plain fit leaves a much larger LR-grid residual.
  psf0, srf0 = blind.estimate_psf_srf(y, z_cross, R, num_steps=400, lr=1e-3)
  ss0, _ = blind.lr_residuals(psf0, srf0, y, z_cross, R)
  ss1, _ = blind.lr_residuals(psf, srf, y, z_cross, R, cal["gain"], cal["offset"])
  assert float(ss0.sum()) > 10 * float(ss1.sum())


def test_none_radiometry_unchanged_and_auto_detects_cross_sensor():
  from hsijax.sdp import fusion
  y, z, _, _ = _independent_bands_problem()
  kw = dict(steps=400, lr=1e-3)
  psf0, srf0 = blind.estimate_psf_srf(y, z, R, num_steps=400, lr=1e-3)
  # radiometry="none" (the library default) is the authors' path, bit for bit.
  psf, srf, z_used, cal = fusion.estimate_calibrated(y, z, R, radiometry="none", **kw)
  assert cal["model"] == "none"
  np.testing.assert_array_equal(z_used, np.asarray(z))          # the authors' path, unchanged
  np.testing.assert_array_equal(psf, np.asarray(psf0))
  np.testing.assert_array_equal(srf, np.asarray(srf0))
  z_cross = np.asarray(z) * np.array([0.7, 1.25, 1.4], np.float32) + 0.03
  _, _, z_used, cal = fusion.estimate_calibrated(y, z_cross, R, radiometry="auto", **kw)
  assert cal["model"] == "affine" and cal["ss_ratio"] > fusion.AUTO_RADIOMETRY_RATIO
  assert np.abs(z_used - np.asarray(z)).mean() < 0.02 * np.asarray(z).mean()
  with pytest.raises(ValueError, match="radiometry"):
    blind.estimate_psf_srf(y, z, R, num_steps=1, radiometry="gamma")


def test_footprint_centre_follows_blur_down():
  # blur_down of a ramp x[h, w] = h (resp. w) is r i + c[0] (resp. r j + c[1]) away from the
  # zero-padded border, for any PSF: an independent check of the sign convention.
  rng = np.random.default_rng(3)
  r, k = 3, 7
  psf = np.zeros((k, k), np.float32)
  psf[1:5, 2:7] = rng.random((4, 5))
  psf /= psf.sum()
  h = w = 8 * r
  hh, ww = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32),
                       indexing="ij")
  out = np.asarray(degrade.blur_down(np.stack([hh, ww], -1), jnp.asarray(psf), r))
  c = blind.footprint_centre(psf)
  i = np.arange(2, 6)
  np.testing.assert_allclose(out[2:6, 3, 0], r * i + c[0], atol=1e-4)
  np.testing.assert_allclose(out[3, 2:6, 1], r * i + c[1], atol=1e-4)
  assert abs(c[0]) > 0.2 and abs(c[1]) > 0.2                    # an off-centre PSF was drawn
  # The two conventions the docstring names: a centred PSF gives 0, block averaging (images
  # sharing their outer corners) (r - 1) / 2.
  np.testing.assert_allclose(blind.footprint_centre(degrade.gaussian_psf(r)), 0.0, atol=1e-6)
  box = np.zeros((2 * r - 1, 2 * r - 1), np.float32)
  box[:r, :r] = 1.0 / r ** 2
  x = rng.random((h, w, 2)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(degrade.blur_down(x, jnp.asarray(box), r)),
                             x.reshape(h // r, r, w // r, r, 2).mean((1, 3)), atol=1e-5)
  np.testing.assert_allclose(blind.footprint_centre(box), (r - 1) / 2, atol=1e-6)
