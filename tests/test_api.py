"""The public API as a researcher calls it: `import hsijax`, the SDP verbs, their checks."""
import functools
import subprocess
import sys

import jax
import numpy as np
import pytest

import hsijax
from hsijax import degrade, sdp, synthetic

SMALL = dict(hidden=16, num_timesteps=40, batch=16, checkpoint_every=2, log_every=1)


@functools.lru_cache(maxsize=None)
def _problem():
  sc = synthetic.make_scene(2, height=32, width=16, num_bands=10, num_endmembers=3,
                            source="generated", wavelengths_nm=(450, 850))
  w = degrade.wald_protocol(sc.cube, ratio=2, key=jax.random.key(0),
                            srf=degrade.ikonos_srf(sc.wavelengths_nm))
  return tuple(np.asarray(a, np.float32) for a in (w.y, w.z, w.x, w.train_pixels, w.psf,
                                                   w.srf))


def test_import_exposes_the_packages_lazily_and_never_torch():
  code = ("import sys, hsijax; assert 'hsijax.sdp' not in sys.modules; "
          "names = ['sdp', 'scdm', 'metrics', 'degrade', 'data', 'diffusion']; "
          "mods = [getattr(hsijax, n) for n in names]; "
          "assert all(m.__name__ == 'hsijax.' + n for m, n in zip(mods, names)); "
          "assert 'torch' not in sys.modules and 'benchmarks' not in sys.modules; "
          "assert {'train_prior', 'load_prior', 'fuse', 'make_solver'} <= set(hsijax.sdp.__all__); "
          "assert {'make_cascade', 'train', 'load', 'sample', 'CondUNet', 'make_sampler'} "
          "<= set(hsijax.scdm.__all__)")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    hsijax.nope  # pylint: disable=pointless-statement


def test_train_prior_load_prior_round_trip_and_refused_reuse(tmp_path):
  *_, pixels, _, _ = _problem()
  prior = sdp.train_prior(pixels, steps=4, key=0, workdir=tmp_path, **SMALL)
  assert prior.info["steps"] == 4 and np.isfinite(prior.info["final_loss"])
  loaded = sdp.load_prior(tmp_path)
  assert loaded.model == prior.model and loaded.num_timesteps == 40
  for a, b in zip(jax.tree_util.tree_leaves(prior.params),
                  jax.tree_util.tree_leaves(loaded.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Resuming with more steps is fine; other data, settings or seeds are refused by name.
  assert sdp.train_prior(pixels, steps=6, key=0, workdir=tmp_path, **SMALL).info["steps"] == 6
  with pytest.raises(ValueError, match="training pixels"):
    sdp.train_prior(pixels[:50], steps=6, key=0, workdir=tmp_path, **SMALL)
  with pytest.raises(ValueError, match=r"hidden 16 -> 32"):
    sdp.train_prior(pixels, steps=6, key=0, workdir=tmp_path, **(SMALL | {"hidden": 32}))
  with pytest.raises(ValueError, match="key / seed"):
    sdp.train_prior(pixels, steps=6, key=1, workdir=tmp_path, **SMALL)
  with pytest.raises(TypeError, match="valid names"):
    sdp.train_prior(pixels, steps=6, key=0, hiden=3)
  with pytest.raises(FileNotFoundError, match="train_prior"):
    sdp.load_prior(tmp_path / "nothing")


def test_low_rank_pixels_is_the_svd_projection_and_removes_noise():
  rng = np.random.default_rng(0)
  clean = rng.uniform(0, 1, (700, 3)) @ rng.uniform(0, 1, (3, 40)) + 0.2  # rank 3 + offset
  noisy = (clean + rng.normal(0, 0.05, clean.shape)).astype(np.float32)
  # Independent derivation: mean + the leading right singular vectors of the centred pixels.
  mu = noisy.astype(np.float64).mean(0)
  vt = np.linalg.svd(noisy - mu, full_matrices=False)[2][:3]
  want = np.maximum((noisy - mu) @ vt.T @ vt + mu, 0)
  got = sdp.low_rank_pixels(noisy, 3, strip=128)  # strips that do not divide N
  assert got.dtype == np.float32 and got.shape == noisy.shape
  np.testing.assert_allclose(got, want, atol=2e-5)
  # Most of the noise is gone: 37 of 40 noise dimensions are projected out.
  assert np.abs(got - clean).std() < 0.4 * np.abs(noisy - clean).std()
  np.testing.assert_array_equal(sdp.low_rank_pixels(noisy, 0), noisy)  # 0 = off
  np.testing.assert_array_equal(sdp.low_rank_pixels(noisy, 40), noisy)  # nothing to drop
  with pytest.raises(ValueError, match="rank must be >= 0"):
    sdp.low_rank_pixels(noisy, -1)


def test_subspace_snr_db_recovers_the_noise_level_of_low_rank_spectra():
  rng = np.random.default_rng(1)
  clean = rng.uniform(0, 1, (2000, 4)) @ rng.uniform(0, 1, (4, 60))  # rank 4, 60 bands
  power = np.mean(clean ** 2)
  for snr in (20.0, 30.0, 40.0):
    noisy = clean + rng.normal(0, np.sqrt(power / 10 ** (snr / 10)), clean.shape)
    assert abs(sdp.subspace_snr_db(noisy, 10) - snr) < 0.3, snr
  assert sdp.subspace_snr_db(clean, 10) > 60  # nothing outside the subspace but rounding
  # Detail beyond the subspace counts as noise: a lower bound, never above the truth.
  rich = rng.uniform(0, 1, (2000, 30)) @ rng.uniform(0, 1, (30, 60))
  noisy = rich + rng.normal(0, np.sqrt(np.mean(rich ** 2) / 1e4), rich.shape)  # 40 dB
  assert sdp.subspace_snr_db(noisy, 10) < 40
  with pytest.raises(ValueError, match=r"rank must be in 1..B-1 = 1..59"):
    sdp.subspace_snr_db(clean, 60)


def test_fuse_reuses_the_compiled_solver_and_matches_run_methods():
  y, z, x, pixels, _, _ = _problem()
  prior = sdp.train_prior(pixels, steps=3, key=0, show_progress=False, **SMALL)
  sdp.fusion._cached_solver.cache_clear()
  kw = dict(prior=prior, key=jax.random.key(1), steps=4, blind_steps=5, show_progress=False)
  a = sdp.fuse(y, z, **kw)
  b = sdp.fuse(y, z, **kw)
  info = sdp.fusion._cached_solver.cache_info()
  assert (info.misses, info.hits) == (1, 1)   # built once ...
  jitted, n = sdp.fusion.solver_for(prior, ratio=2, steps=4, settings=sdp.FusionSettings(),
                                    lr_rows=y.shape[0])
  assert n == 4 and jitted._cache_size() == 1   # ... and compiled once
  np.testing.assert_array_equal(a.x, b.x)       # same key, same result
  assert a.x.shape == x.shape and a.psf.shape == (3, 3) and a.srf.shape == (4, 10) and a.blind
  out = sdp.run_methods(y, z, prior=prior, key=jax.random.key(1), methods="sdp,baseline",
                        steps=4, blind_steps=5, show_progress=False)
  np.testing.assert_array_equal(out.results["sdp"], a.x)
  assert set(out.results) == {"sdp", "baseline"}
  warm = sdp.fuse(y, z, **dict(kw, steps=10), init="classical", start=0.2)
  assert warm.steps == 2 and warm.x.shape == x.shape  # the last fifth of the 10 steps
  with pytest.raises(ValueError, match="unknown method"):
    sdp.run_methods(y, z, prior=prior, key=0, methods="sdp,magic")
  with pytest.raises(ValueError, match="needs a trained prior"):
    sdp.run_methods(y, z, prior=None, key=0, methods="sdp")


def test_fuse_in_raw_units_warns_scales_and_returns_those_units():
  y, z, x, *_ = _problem()
  psf, srf = _problem()[4], _problem()[5]
  m = float(max(y.max(), z.max()))
  ref = sdp.fuse(y / m, z / m, key=0, steps=3, psf=psf, srf=srf, show_progress=False)
  with pytest.warns(UserWarning, match="divided by"):
    raw = sdp.fuse(y * 1000, z * 1000, key=0, steps=3, psf=psf, srf=srf, show_progress=False)
  # The same problem in other units: the same solution, returned in those units.
  np.testing.assert_allclose(raw.x / (1000 * m), ref.x, rtol=1e-4, atol=1e-5)
  scale = 1000 * m
  ys, zs, s = sdp.scale_pair(y * 1000, z * 1000)
  assert s["hsi"] == s["msi"] and s["hsi"] == pytest.approx(scale, rel=1e-6)
  assert max(ys.max(), zs.max()) == 1  # one common factor: the larger image reaches 1


@pytest.mark.parametrize("case,match", [
    ("swapped", "swapped"),
    ("one_band", "at least 3"),
    ("constant", "constant"),
    ("zeros", "no positive value"),
    ("psf_zero_sum", "positive sum"),
    ("psf_too_big", "larger than the HR image"),
    ("srf_transposed", "transposed"),
    ("nan", "NaN"),
    ("ratio", "ratio does not divide"),
])
def test_check_pair_refuses_bad_problems_up_front(case, match):
  y, z, *_ = _problem()
  kw = {}
  if case == "swapped":
    y, z = z, y
  elif case == "one_band":
    y = y[..., :2]
    z = z[..., :1]
  elif case == "constant":
    y = np.full_like(y, 0.3)
  elif case == "zeros":
    z = np.zeros_like(z)
  elif case == "psf_zero_sum":
    kw["psf"] = np.zeros((3, 3))
  elif case == "psf_too_big":
    kw["psf"] = np.ones((33, 33))
  elif case == "srf_transposed":
    kw["srf"] = np.ones((y.shape[-1], z.shape[-1]))
  elif case == "nan":
    y = y.copy()
    y[0, 0, 0] = np.nan
  elif case == "ratio":
    z = z[:-1]
  with pytest.raises(ValueError, match=match):
    sdp.check_pair(y, z, **kw)
  with pytest.raises(ValueError, match=match):
    sdp.fuse(y, z, key=0, steps=1, **kw)


def test_fusion_settings_are_checked():
  with pytest.raises(TypeError, match="valid names.*lam"):
    sdp.FusionSettings.from_kwargs(lamb=1.0)
  with pytest.raises(ValueError, match="init"):
    sdp.FusionSettings(init="zeros")
  with pytest.raises(ValueError, match="lam"):
    sdp.FusionSettings(lam=-1.0)
  with pytest.raises(ValueError, match=r"start .* must be in \(0, 1\]"):
    sdp.FusionSettings(start=1.5)
  y, z, *_ = _problem()
  with pytest.raises(ValueError, match=r"steps=2000 must be in \[1, 1000\]"):
    sdp.fuse(y, z, key=0, steps=2000, blind_steps=1)
