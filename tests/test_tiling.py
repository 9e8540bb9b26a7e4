"""Tiled processing: exact cover, seamless blending, locality."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hsijax import tiling


def test_grid_covers_image_and_respects_multiple():
  g = tiling.make_grid(100, 60, tile=32, overlap=8, multiple=4)
  assert np.all(g.starts % 4 == 0)
  cover = np.zeros((100, 60), int)
  for r, c in g.starts:
    cover[r:r + 32, c:c + 32] += 1
  assert cover.min() >= 1
  assert g.starts[:, 0].max() == 100 - 32 and g.starts[:, 1].max() == 60 - 32


def test_identity_roundtrip_is_exact():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 48, 3)).astype(np.float32))
  g = tiling.make_grid(64, 48, tile=24, overlap=8)
  np.testing.assert_allclose(tiling.merge(tiling.extract(x, g), g), x, rtol=1e-6, atol=1e-6)


def test_local_filter_equals_untiled_away_from_borders():
  # A 3x3 box filter with zero padding is exact inside each window except its outer pixel;
  # with overlap >= 2 the blended result equals the untiled filter everywhere but the image
  # border band of 1 pixel (the same zero padding untiled).
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(64, 64, 2)).astype(np.float32))
  k = jnp.ones((3, 3, 1, 2), jnp.float32) / 9.0

  def box(img):
    out = jax.lax.conv_general_dilated(img[None], k, (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=2)
    return out[0]

  g = tiling.make_grid(64, 64, tile=32, overlap=8)
  tiled = tiling.map_tiles(box, g, x, 1)
  full = box(x)
  err = np.abs(np.asarray(tiled) - np.asarray(full))
  # A window's output is exact except within 1 pixel of its edges that lie inside the image;
  # pixels where every covering window is exact must match the untiled result exactly.
  exact = np.ones((64, 64), bool)
  for r, c in g.starts:
    ok = np.zeros((32, 32), bool)
    ok[1 if r else 0:31 if r + 32 < 64 else 32, 1 if c else 0:31 if c + 32 < 64 else 32] = True
    exact[r:r + 32, c:c + 32] &= ok
  assert exact.mean() > 0.8
  assert err[exact].max() < 1e-6
  assert err.max() < 0.05
  # With a halo covering the filter radius the blend is exact everywhere (seamless).
  halo = tiling.map_tiles(box, g, x, 1, halo=2)
  np.testing.assert_allclose(halo, full, atol=1e-6)


def test_bad_arguments():
  with pytest.raises(ValueError, match="multiples of 4"):
    tiling.make_grid(64, 64, tile=30, overlap=8, multiple=4)
  with pytest.raises(ValueError, match="overlap"):
    tiling.make_grid(64, 64, tile=16, overlap=16)
