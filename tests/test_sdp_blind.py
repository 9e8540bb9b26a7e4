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
