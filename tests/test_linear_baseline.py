"""Tests for hsijax.linear_baseline (closed-form affine RGB -> HSI map)."""
import numpy as np
import pytest

from hsijax import linear_baseline


def _linear_data(seed=0, shape=(2, 20, 20), c=3, b=48, scale=1e4):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(c, b))
  bias = rng.normal(size=(b,)) * 100
  rgb = rng.uniform(0, scale, size=shape + (c,))
  return rgb, rgb @ w + bias, w, bias


def test_exact_on_noise_free_linear_data():
  rgb, hsi, w, bias = _linear_data()
  lin = linear_baseline.fit(rgb, hsi)
  np.testing.assert_allclose(np.asarray(lin.weight), w, rtol=0, atol=2e-4)
  np.testing.assert_allclose(np.asarray(lin.bias), bias, rtol=0, atol=0.5)
  # Applied to new pixels it reproduces the generating map (relative to the signal size).
  rgb_new = np.random.default_rng(1).uniform(0, 1e4, size=(7, 5, 3))
  pred = np.asarray(linear_baseline.apply(lin, rgb_new))
  assert pred.shape == (7, 5, 48)
  np.testing.assert_allclose(pred, rgb_new @ w + bias, rtol=0, atol=1e-5 * np.abs(hsi).max())


def test_matches_float64_lstsq_on_noisy_data():
  rng = np.random.default_rng(3)
  rgb = rng.uniform(0, 1, size=(500, 3))
  hsi = rgb @ rng.normal(size=(3, 10)) + rng.normal(size=(500, 10)) * 0.1 + 2.0
  a = np.concatenate([rgb, np.ones((500, 1))], 1)
  sol, *_ = np.linalg.lstsq(a, hsi, rcond=None)
  lin = linear_baseline.fit(rgb, hsi)
  np.testing.assert_allclose(np.asarray(lin.weight), sol[:3], atol=1e-4)
  np.testing.assert_allclose(np.asarray(lin.bias), sol[3], atol=1e-4)


def test_ridge_shrinks_weights_and_constant_channel_is_safe():
  rgb, hsi, *_ = _linear_data(shape=(300,), scale=1.0)
  w0 = np.abs(np.asarray(linear_baseline.fit(rgb, hsi).weight)).sum()
  w1 = np.abs(np.asarray(linear_baseline.fit(rgb, hsi, ridge=1e3).weight)).sum()
  assert w1 < 0.5 * w0
  rgb[:, 1] = 5.0  # a constant channel carries no information: finite, zero weight
  lin = linear_baseline.fit(rgb, hsi)
  assert np.all(np.isfinite(np.asarray(lin.weight)))
  np.testing.assert_allclose(np.asarray(lin.weight)[1], 0.0, atol=1e-6)


def test_errors_name_the_fix():
  with pytest.raises(ValueError, match="share every axis"):
    linear_baseline.fit(np.zeros((4, 4, 3)), np.zeros((4, 5, 8)))
  with pytest.raises(ValueError, match="at least 4 pixels"):
    linear_baseline.fit(np.zeros((3, 3)), np.zeros((3, 8)))
  lin = linear_baseline.fit(np.random.rand(10, 3), np.random.rand(10, 8))
  with pytest.raises(ValueError, match="3"):
    linear_baseline.apply(lin, np.zeros((2, 4)))
