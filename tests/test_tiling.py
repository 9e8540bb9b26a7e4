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
  batched = jax.vmap(box)
  # 9 windows in calls of 3 (rounded up to the 8 test devices, last call padded).
  run = lambda halo: tiling.map_tiles(lambda c, starts, w: batched(w), g, [(x, 1)],
                                      tiles_per_call=3, halo=halo)
  tiled = run(0)
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
  halo = run(2)
  np.testing.assert_allclose(halo, full, atol=1e-6)


def test_map_tiles_passes_starts_and_scaled_windows_and_call_index():
  # Two inputs at different scales (as SDP's y and z): fn sees matching windows, their
  # corners and the call index; a pixelwise fn is reproduced exactly by the blend.
  rng = np.random.default_rng(3)
  z = rng.normal(size=(40, 24, 2)).astype(np.float32)
  y = z[::4, ::4] * 10.0
  g = tiling.make_grid(40, 24, tile=16, overlap=8, multiple=4)
  seen = []

  def fn(c, starts, y_w, z_w):
    seen.append((c, np.asarray(starts)))
    assert y_w.shape[1:3] == (4, 4) and z_w.shape[1:3] == (16, 16)
    return z_w + jnp.repeat(jnp.repeat(y_w, 4, 1), 4, 2) * 0.0

  out = tiling.map_tiles(fn, g, [(y, 4), (z, 1)], tiles_per_call=8)
  np.testing.assert_allclose(out, z, rtol=1e-6, atol=1e-6)  # weights sum to 1, rounded
  assert [c for c, _ in seen] == list(range(len(seen)))
  got = np.concatenate([s for _, s in seen])[:len(g.starts)]
  np.testing.assert_array_equal(got, g.starts)


def test_bad_arguments():
  with pytest.raises(ValueError, match="multiples of 4"):
    tiling.make_grid(64, 64, tile=30, overlap=8, multiple=4)
  with pytest.raises(ValueError, match="overlap"):
    tiling.make_grid(64, 64, tile=16, overlap=16)


def test_accumulate_by_chunks_equals_merge():
  rng = np.random.default_rng(2)
  g = tiling.make_grid(40, 56, tile=16, overlap=8, multiple=4)
  tiles = rng.normal(size=(len(g.starts), 16, 16, 3)).astype(np.float32)
  w = tiling.blend_weights(g, halo=2)
  acc, norm = np.zeros((40, 56, 3), np.float32), np.zeros((40, 56, 1), np.float32)
  for a in range(0, len(g.starts), 5):               # chunks of 5 windows, last one short
    tiling.accumulate(acc, norm, tiles[a:a + 5], g.starts[a:a + 5], w[a:a + 5])
  np.testing.assert_allclose(acc / norm, tiling.merge(jnp.asarray(tiles), g, halo=2),
                             rtol=1e-5, atol=1e-6)


def test_border_distance():
  # Two windows side by side: 0..15 and 8..23 (overlap 8), one row of windows.
  g = tiling.make_grid(16, 24, tile=16, overlap=8)
  assert g.starts.tolist() == [[0, 0], [0, 8]]
  d = tiling.border_distance(g, halo=0)
  # Columns 0..7: only window 0 (inner edge at column 15): distance 15 - col.
  np.testing.assert_array_equal(d[0, :8], 15 - np.arange(8))
  # Overlap 8..15: both windows feed (ramps > 0): min(15 - col, col - 8).
  np.testing.assert_array_equal(d[3, 8:16], np.minimum(15 - np.arange(8, 16),
                                                       np.arange(8, 16) - 8))
  # Columns 16..23: only window 1 (inner edge at column 8).
  np.testing.assert_array_equal(d[5, 16:], np.arange(16, 24) - 8)
  # Rows never matter (image-border sides), and a halo removes the zero-weight pixels.
  assert (d == d[:1]).all()
  dh = tiling.border_distance(g, halo=2)
  assert dh.min() == 2 and d.min() == 0
  # A single window has no inner edge.
  assert (tiling.border_distance(tiling.make_grid(16, 16, 16, 0)) == 16).all()


def test_chunks_cover_every_window_in_equal_padded_calls():
  calls = list(tiling.chunks(10, 3, 2))  # per call 3 -> 4 (multiple of 2 devices)
  assert [len(i) for i, _ in calls] == [4, 4, 4]
  assert [n for _, n in calls] == [4, 4, 2]
  np.testing.assert_array_equal(calls[-1][0], [8, 9, 9, 9])  # padded with the last window
  real = np.concatenate([i[:n] for i, n in calls])
  np.testing.assert_array_equal(real, np.arange(10))
  # Never larger than needed: 3 windows on 2 devices -> one call of 4.
  assert [(len(i), n) for i, n in tiling.chunks(3, 100, 2)] == [(4, 3)]
  with pytest.raises(ValueError, match="per_call"):
    list(tiling.chunks(3, 0, 1))
