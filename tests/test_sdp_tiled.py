"""Tiled SDP solve: equals the untiled solve away from window edges, seams bounded, sharded
over 8 devices == 1 device, position-keyed noise is a slice of one scene-wide field."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sdp as sdp_config
from hsijax import degrade, diffusion, sharding, synthetic, tiling
from hsijax.sdp import solver, tiled
from hsijax.sdp.denoiser import SpectralDenoiser

B, b, R = 12, 4, 4
KW = dict(lam=1.0, gam=0.1, lr=2e-3, K=3, ratio=R)  # the real-data weights (strongest coupling)


@functools.lru_cache(maxsize=None)
def _scene(size):
  sc = synthetic.make_scene(0, size, size, B, num_endmembers=4, source="generated",
                            wavelengths_nm=(450, 850))
  rng = np.random.default_rng(0)
  psf = jnp.asarray(degrade.gaussian_psf(R), jnp.float32)                 # 7 x 7
  srf = rng.uniform(0.1, 1.0, (b, B)).astype(np.float32)
  srf /= srf.sum(1, keepdims=True)
  x = jnp.asarray(sc.cube)
  y = np.asarray(degrade.blur_down(x, psf, R)) + 0.01 * rng.normal(size=(size // R, size // R, B))
  z = np.asarray(degrade.spectral_response(x, srf)) + 0.01 * rng.normal(size=(size, size, b))
  return y.astype(np.float32), z.astype(np.float32), psf, jnp.asarray(srf)


@functools.lru_cache(maxsize=None)
def _model():
  model = SpectralDenoiser(num_bands=B, hidden=32)
  return model, model.init(jax.random.key(0), jnp.zeros((1, B)), 0)


def _sched():
  return diffusion.make_respaced_schedule("linear", 100, 4)   # 4 outer x K 3 = 12 Adam steps


def test_position_noise_is_a_slice_of_the_scene_field():
  key = jax.random.key(3)
  noise = jax.jit(solver.position_noise, static_argnums=2)
  full = noise(key, jnp.zeros(2, jnp.int32), (40, 24, 5))
  win = noise(key, jnp.array([12, 8]), (16, 16, 5))
  np.testing.assert_array_equal(np.asarray(win), np.asarray(full[12:28, 8:24]))
  f = np.asarray(full)
  assert abs(f.mean()) < 0.05 and abs(f.std() - 1) < 0.05
  # Different pixels and different keys draw different values.
  assert not np.allclose(f[0, 0], f[0, 1]) and not np.allclose(f[0, 0], f[1, 0])
  other = noise(jax.random.key(4), jnp.zeros(2, jnp.int32), (40, 24, 5))
  assert not np.allclose(f, np.asarray(other))


def test_tiled_equals_untiled_away_from_window_edges_and_seams_are_small():
  y, z, psf, srf = _scene(256)
  model, params = _model()
  sched, key = _sched(), jax.random.key(1)
  full = np.asarray(solver.make_solver(model, sched, noise="position", **KW)(
      params, y, z, psf, srf, key))
  out = tiled.fuse_tiled(model, sched, params, y, z, psf, srf, key, tile=64, overlap=16,
                         tiles_per_call=16, **KW)
  assert out.shape == full.shape == (256, 256, B) and out.dtype == np.float32
  grid = tiling.make_grid(256, 256, 64, 16, multiple=R)
  dist = tiling.border_distance(grid, halo=16 // 4)
  err = np.abs(out - full).max(-1)
  # The run moved X far from its start (so equality is not trivially ones == ones).
  assert np.abs(full - 1).mean() > 0.1
  far = dist >= 16
  assert far.mean() > 0.5
  np.testing.assert_allclose(out[far], full[far], rtol=0, atol=1e-6)
  # Near inner window edges (the blend region) the difference stays small and decays.
  near = dist < 16
  assert err[near].max() < 2e-2
  assert err[dist >= 8].max() <= err[dist < 8].max()
  # Seamless: neighbour differences across the blend band match the untiled ones closely,
  # and are no larger at seams than the image's own gradients elsewhere.
  g_out, g_full = np.diff(out, axis=1), np.diff(full, axis=1)
  band = (dist[:, 1:] < 16) | (dist[:, :-1] < 16)
  assert np.abs(g_out - g_full)[band].max() < 2e-2
  assert np.abs(g_out)[band].max() <= np.abs(g_full).max() + 1e-6


def test_sharded_over_8_devices_equals_one_device():
  assert jax.device_count() == 8
  y, z, psf, srf = _scene(256)
  y, z = y[:32, :32], z[:128, :128]
  model, params = _model()
  sched, key = diffusion.make_respaced_schedule("linear", 100, 2), jax.random.key(2)
  kw = dict(tile=32, overlap=8, tiles_per_call=8, **KW)   # 25 windows: 4 calls, last padded
  eight = tiled.fuse_tiled(model, sched, params, y, z, psf, srf, key,
                           mesh=sharding.make_mesh(), **kw)
  one = tiled.fuse_tiled(model, sched, params, y, z, psf, srf, key,
                         mesh=sharding.make_mesh(devices=jax.devices()[:1]), **kw)
  np.testing.assert_allclose(eight, one, rtol=0, atol=1e-6)


@pytest.mark.slow  # two more solver compiles (~10 s) for a two-line code path
def test_tile_covering_the_scene_is_the_untiled_solve():
  y, z, psf, srf = _scene(256)
  y, z = y[:4, :4], z[:16, :16]
  model, params = _model()
  sched, key = diffusion.make_respaced_schedule("linear", 100, 2), jax.random.key(2)
  single = tiled.fuse_tiled(model, sched, params, y, z, psf, srf, key, tile=64, overlap=8,
                            **KW)
  ref = solver.make_solver(model, sched, noise="position", **KW)(params, y, z, psf, srf, key)
  np.testing.assert_allclose(single, np.asarray(ref), rtol=0, atol=1e-6)


def test_bad_tiling_raises_with_the_fix():
  model, _ = _model()
  sched = _sched()
  with pytest.raises(ValueError, match="tile \\(30\\) must be a multiple of the ratio 4"):
    tiled.make_tiled_solver(model, sched, tile=30, overlap=8, **KW)
  with pytest.raises(ValueError, match="overlap \\(6\\) must be a multiple"):
    tiled.make_tiled_solver(model, sched, tile=32, overlap=6, **KW)
  with pytest.raises(ValueError, match="overlap"):
    tiled.make_tiled_solver(model, sched, tile=32, overlap=32, **KW)
  with pytest.raises(ValueError, match="tiles_per_call"):
    tiled.make_tiled_solver(model, sched, tile=32, overlap=8, tiles_per_call=0, **KW)
  with pytest.raises(ValueError, match="halo"):
    tiled.make_tiled_solver(model, sched, tile=32, overlap=8, halo=5, **KW)
  with pytest.raises(ValueError, match="noise"):
    tiled.make_tiled_solver(model, sched, tile=32, overlap=8, noise="scene", **KW)
  with pytest.raises(ValueError, match="noise"):
    solver.make_solver(model, sched, noise="tile", **KW)
  solve = tiled.make_tiled_solver(model, sched, tile=32, overlap=8, **KW)
  y, z, psf, srf = _scene(256)
  with pytest.raises(ValueError, match="ratio times"):
    solve(None, y[:8, :8], z[:40, :32], psf, srf, jax.random.key(0))
  with pytest.raises(ValueError, match="no larger than the smaller side"):
    solve(None, y[:4, :16], z[:16, :64], psf, srf, jax.random.key(0))
  # Config: checked at resolve time (before any training), naming the flags.
  cfg = sdp_config.get_config("crop")
  cfg.solver.tile = 30
  with pytest.raises(ValueError, match="--config.solver.tile=30"):
    sdp_config.resolve(cfg)
  cfg.solver.tile = 64
  assert sdp_config.resolve(cfg).solver.tile == 64


def test_config_tiling_reaches_the_tiled_solver(monkeypatch):
  from hsijax import sdp
  from hsijax.sdp import fusion
  seen = {}

  def fake(model, schedule, **kwargs):
    seen.update(kwargs, num_steps=schedule.num_steps)
    return lambda params, y, z, psf, srf, key, out=None: np.zeros(z.shape[:2] + y.shape[-1:],
                                                        np.float32)

  monkeypatch.setattr(fusion.tiled, "make_tiled_solver", fake)
  fusion._cached_solver.cache_clear()
  cfg = sdp_config.get_config("crop,fast")
  cfg.solver.tile, cfg.solver.tile_overlap, cfg.solver.tiles_per_call = 64, 8, 4
  cfg = sdp_config.resolve(cfg)
  model, params = _model()
  prior = sdp.Prior(model, params, num_timesteps=1000)
  y, z, psf, srf = _scene(64)
  kw = dict(prior=prior, key=0, psf=psf, srf=srf, steps=2)
  try:
    sdp.fuse(y, z, **kw, **sdp_config.fusion_settings(cfg))
    assert (seen["tile"], seen["overlap"], seen["tiles_per_call"], seen["ratio"]) == (64, 8, 4,
                                                                                      4)
    assert seen["gam"] == cfg.solver.gam and seen["lam"] == cfg.solver.lam
    assert seen["K"] == cfg.solver.K and seen["num_steps"] == 2
    assert seen["mesh"].shape["data"] == jax.device_count()
    # tile = 0 (the default) keeps the whole-scene solver.
    cfg.solver.tile = 0
    seen.clear()
    sdp.fuse(y, z, **kw, **sdp_config.fusion_settings(cfg))
    assert not seen
  finally:
    fusion._cached_solver.cache_clear()
