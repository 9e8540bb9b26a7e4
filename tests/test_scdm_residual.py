"""Residual SCDM cascade (hsijax.scdm.residual), x0 prediction, odd sizes, capped MPSNR."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hsijax import diffusion, metrics, scdm
from hsijax.scdm import evaluate as scdm_eval
from hsijax.scdm import residual
from hsijax.scdm import training as train_lib

RGB = (1, 4, 8)
TINY_UNET = dict(base=16, channel_mults=(1, 1), num_res_down=1, num_res_up=2, attn_levels=(),
                 mid_attn=False, dropout=0.0, groups=4)


def _cube(h=16, w=16, n=12, seed=0):
  """Smooth positive spectra mixed by random abundances (+ a little noise): not affine in RGB."""
  rng = np.random.default_rng(seed)
  ends = 100 + 900 * rng.uniform(size=(4, n))
  ab = rng.dirichlet(np.ones(4), size=(h, w))
  return (ab @ ends + 30 * np.square(ab[..., :1] @ ends[:1] / 1000) * 10
          + rng.normal(0, 1, (h, w, n))).astype(np.float32)


def test_x0_prediction_closed_form():
  s = diffusion.make_schedule("linear", 1000)
  rng = np.random.default_rng(0)
  x0 = rng.normal(size=(3, 5)).astype(np.float32)
  eps = rng.normal(size=(3, 5)).astype(np.float32)
  i = jnp.array([10, 500, 999])
  x_t = diffusion.q_sample(s, x0, i, eps)
  ab = np.asarray(s.alphas_cumprod)[np.asarray(i)][:, None]
  got = diffusion.eps_from_prediction(s, x_t, i, x0, "x0")
  np.testing.assert_allclose(got, (np.asarray(x_t) - np.sqrt(ab) * x0) / np.sqrt(1 - ab),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got, eps, atol=2e-3)
  assert "x0" in diffusion.PREDICTIONS
  with pytest.raises(ValueError, match="unknown prediction"):
    diffusion.eps_from_prediction(s, x_t, i, x0, "x1")


def test_x0_loss_compares_the_output_with_x0():
  """prediction="x0": the L1 term is |out - x0| whatever t and eps are (a model that outputs
  a constant c gives mean |c - x0|)."""
  class Const:
    def apply(self, variables, x_t, cond, t, train=True, rngs=None):
      return jnp.full_like(x_t, 0.25)
  s = diffusion.make_schedule("linear", 1000)
  x0 = jnp.asarray(np.random.default_rng(1).normal(size=(4, 2, 2, 3)), jnp.float32)
  batch = {"x": x0, "cond": jnp.zeros((4, 2, 2, 3))}
  _, aux = train_lib.compute_loss({}, Const(), s, batch, jax.random.key(0), cond_drop=0.0,
                                  prediction="x0")
  np.testing.assert_allclose(aux["eps_loss"], np.mean(np.abs(0.25 - np.asarray(x0))),
                             rtol=1e-6)


def test_sam_term_in_data_units():
  """sam_scale / sam_offset / sam_base: the SAM term is 1 - cos of base + off + scale * x."""
  class Const:
    def apply(self, variables, x_t, cond, t, train=True, rngs=None):
      return jnp.zeros_like(x_t)
  s = diffusion.make_schedule("linear", 1000)
  rng = np.random.default_rng(2)
  x0 = rng.normal(size=(2, 2, 2, 3)).astype(np.float32)
  base = rng.uniform(1, 2, size=(2, 2, 2, 3)).astype(np.float32)
  scale, off = np.array([1.0, 2.0, 3.0], np.float32), np.array([5.0, 0.0, 1.0], np.float32)
  batch = {"x": x0, "cond": np.zeros((2, 2, 2, 3), np.float32), "sam_base": base}
  _, aux = train_lib.compute_loss({}, Const(), s, batch, jax.random.key(0), cond_drop=0.0,
                                  prediction="x0", sam_scale=scale, sam_offset=off)
  a, b = base + off + scale * x0, base + off  # reference, prediction (x0_pred = 0)
  cos = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  np.testing.assert_allclose(aux["sam_loss"], 1 - cos.mean(), rtol=1e-5)


def test_plan_and_fit_match_numpy_lstsq():
  bands = [[0, 4, 8, 11], list(range(12))]
  plan = residual.plan(bands, RGB)
  assert plan[0] == ((1, 4, 8), (4, 8), (0, 11))
  assert plan[1] == ((0, 1, 4, 8, 11), (0, 1, 4, 8, 11), (2, 3, 5, 6, 7, 9, 10))
  x = _cube().reshape(1, 16, 16, 12)
  x = (x - x.mean((0, 1, 2))) / x.std((0, 1, 2))
  stages = residual.fit(x, bands, RGB)
  pix = x.reshape(-1, 12)
  for st in stages:
    a = np.concatenate([pix[:, list(st.cond_bands)], np.ones((len(pix), 1))], 1)
    y = pix[:, list(st.new)]
    sol, *_ = np.linalg.lstsq(a.astype(np.float64), y.astype(np.float64), rcond=None)
    np.testing.assert_allclose(st.weight, sol[:-1], atol=2e-4)
    np.testing.assert_allclose(st.bias, sol[-1], atol=2e-4)
    np.testing.assert_allclose(st.res_std, (y - a @ sol).std(0), rtol=1e-3)
    r, cond, est = residual.training_pairs(x, st)
    np.testing.assert_allclose(r.reshape(-1, len(st.new)).std(0), 1.0, rtol=1e-3)
    np.testing.assert_allclose(est + st.res_std * r, x[..., list(st.new)], atol=1e-5)
    assert residual.from_json(residual.to_json(st))._asdict().keys() == st._asdict().keys()
    np.testing.assert_array_equal(residual.from_json(residual.to_json(st)).weight, st.weight)


def _residual_cascade(cube, **kw):
  n = scdm.Normaliser.fit(cube, per_band=True)
  return scdm.make_cascade(cube.shape[-1], rgb_bands=RGB, counts=(4, cube.shape[-1]),
                           norm_mean=n.mean, norm_std=n.std, unet=TINY_UNET, prediction="x0",
                           residual=True, **kw)


def test_estimate_only_cascade_is_the_affine_chain(tmp_path):
  """No networks: sampling is the stage-0 affine map, then the stage-1 map of its output
  (computed here with NumPy), any image size, input bands exactly, and load() gives it back."""
  cube = _cube(20, 20)
  casc = _residual_cascade(cube, estimate_only=(0, 1))
  trained = scdm.train(casc, cube, steps=1, key=0, workdir=tmp_path, crop=4, batch=8)
  assert trained.params == (None, None) and trained.network_stages == ()
  rgb = _cube(13, 11, seed=5)[..., list(RGB)]
  x = scdm.sample(trained, rgb, key=0, method="ddim", num_steps=2, tile=8,
                  show_progress=False)
  assert x.shape == (13, 11, 12)
  np.testing.assert_array_equal(x[..., list(RGB)], rgb)
  ref = np.zeros((13, 11, 12), np.float32)
  ref[..., list(RGB)] = trained.encode(rgb, RGB)
  for st in trained.estimates:
    ref[..., list(st.new)] = ref[..., list(st.cond_bands)] @ st.weight + st.bias
  ref = trained.decode(ref)
  ref[..., list(RGB)] = rgb
  np.testing.assert_allclose(x, ref, rtol=1e-4, atol=1e-2)
  loaded = scdm.load(tmp_path)
  assert loaded.residual and loaded.estimate_only == (0, 1)
  x2 = scdm.sample(loaded, rgb, key=0, method="ddim", num_steps=2, tile=8,
                   show_progress=False)
  np.testing.assert_array_equal(x, x2)


def test_residual_cascade_trains_samples_any_size_and_reloads(tmp_path):
  cube = _cube(16, 16)
  casc = _residual_cascade(cube, estimate_only=(1,))
  assert casc.band_sets[0] == (0, 3, 6, 9)
  assert casc.stage_channels(0) == (4, 3)  # from RGB
  assert casc.stage_channels(1) == (5, 7)  # bands 2, 5, 7, 10, 11 from 0, 1, 3, 4, 6, 8, 9
  trained = scdm.train(casc, cube, steps=3, key=0, workdir=tmp_path, crop=8, batch=8,
                       sam_space="data", log_every=1)
  assert set(trained.info) == {"stage0"} and trained.params[1] is None
  rgb = cube[:13, :11][..., list(RGB)]  # 13 x 11: not a multiple of the U-Net's factor 2
  kw = dict(key=3, method="ddim", num_steps=2, tile=8, overlap=4, show_progress=False)
  x = scdm.sample(trained, rgb, **kw)
  assert x.shape == (13, 11, 12) and np.all(np.isfinite(x))
  np.testing.assert_array_equal(x[..., list(RGB)], rgb)
  # The estimate-only last stage is exactly the affine map of stage 0's bands + RGB.
  st = trained.estimates[1]
  xn = trained.encode(x)
  np.testing.assert_allclose(xn[..., list(st.new)], xn[..., list(st.cond_bands)] @ st.weight
                             + st.bias, atol=2e-3)
  loaded = scdm.load(tmp_path)
  for a, b in zip(loaded.estimates, trained.estimates):
    np.testing.assert_array_equal(a.weight, b.weight)
    np.testing.assert_array_equal(a.res_std, b.res_std)
  np.testing.assert_array_equal(scdm.sample(loaded, rgb, **kw), x)


def test_residual_errors():
  cube = _cube()
  with pytest.raises(ValueError, match="need residual=True"):
    scdm.make_cascade(12, rgb_bands=RGB, estimate_only=(1,))
  with pytest.raises(ValueError, match="outside"):
    _residual_cascade(cube, estimate_only=(2,))
  with pytest.raises(ValueError, match="no fitted estimates"):
    _residual_cascade(cube).stage_pairs(np.zeros((1, 4, 4, 12)), 0)
  with pytest.raises(ValueError, match="sam_space"):
    scdm.StageTrainSettings(sam_space="pixels")
  with pytest.raises(ValueError, match="estimate-only"):
    scdm.train_stage(_residual_cascade(cube, estimate_only=(1,)).fit_estimates(cube),
                     cube[None], 1, steps=1, key=0)


def test_capped_mpsnr_is_finite_for_copied_bands():
  ref = _cube(8, 8)
  x = ref + np.random.default_rng(3).normal(0, 5, ref.shape).astype(np.float32)
  x[..., list(RGB)] = ref[..., list(RGB)]  # the input bands exactly, the others not
  per_band = np.asarray(metrics.psnr_per_band(ref, x))
  gen = [b for b in range(12) if b not in RGB]
  assert np.isinf(per_band[list(RGB)]).all() and np.isfinite(per_band[gen]).all()
  assert np.isinf(metrics.reconstruction_metrics(ref, x)["mpsnr"])
  got = scdm_eval.capped_mpsnr(ref, x)
  assert got == pytest.approx((per_band[gen].sum() + 3 * 100.0) / 12, rel=1e-6)
  all_bands, generated = scdm_eval.score(ref, {"x": x}, RGB)
  assert all_bands["x"]["mpsnr"] == pytest.approx(got)
  assert generated["x"]["mpsnr"] == pytest.approx(per_band[gen].mean(), rel=1e-5)


def test_tiny_preset_entry_points_residual(tmp_path):
  """launch.train_scdm / sample_scdm with the tiny preset (residual x0, stage 2 = affine
  estimate): X is the held-out bottom-right quadrant in original units, the input bands are
  the quadrant's own, the estimates are stored in cascade.json, stage 1 has no U-Net."""
  import json
  from configs import scdm as scdm_config
  from launch import sample_scdm, train_scdm
  cube = _cube(32, 32, n=12, seed=7)
  np.savez(tmp_path / "cube.npz", cube=cube)
  cfg = scdm_config.get_config("tiny")
  assert (cfg.model.residual, tuple(cfg.model.estimate_only), cfg.model.prediction,
          cfg.train.sam_space, cfg.sample.num_steps) == (True, (1,), "x0", "data", 3)
  cfg.data.path, cfg.data.num_bands, cfg.data.rgb_bands = f"{tmp_path / 'cube.npz'}:cube", 12, RGB
  cfg.data.split = "quadrant"
  cfg.model.base, cfg.model.channel_mults, cfg.model.groups = 8, (1, 2), 4
  cfg.train.steps, cfg.train.checkpoint_every, cfg.train.log_every = 2, 1, 1
  cfg.sample.tiles_per_call = 8
  wd = tmp_path / "run"
  metrics = train_scdm.run(cfg, wd)
  assert set(metrics) == {"stage0"} and metrics["stage0"]["steps"] == 2
  assert not (wd / "stage1").exists()
  record = json.loads((wd / "cascade.json").read_text())
  assert record["model"]["residual"] and len(record["estimates"]) == 2
  out = sample_scdm.run(cfg, wd)
  with np.load(wd / "samples.npz") as f:
    x = f["X"]
  held_out = cube[16:, 16:]
  assert x.shape == held_out.shape and np.all(np.isfinite(x))
  np.testing.assert_array_equal(x[..., list(RGB)], held_out[..., list(RGB)])
  assert np.isfinite(out["mpsnr"]) and "generated_bands" in out
  np.testing.assert_allclose(out["rmse"], np.sqrt(np.mean((held_out - x) ** 2.0)), rtol=1e-5)


def test_residual_training_from_host_batches():
  """batches(step) -> {"cube": crops in original units} (the TFDS path): the stage's residual
  pairs and, with sam_space="data", its per-pixel sam_base are built from each batch."""
  cube = _cube(16, 16)
  casc = _residual_cascade(cube, estimate_only=(1,))
  seen = []

  def batches(step):
    seen.append(step)
    rng = np.random.default_rng(step)
    r, c = rng.integers(0, 9, 2)
    return {"cube": np.stack([cube[r:r + 8, c:c + 8]] * 8)}

  trained = scdm.train(casc, cube, steps=2, key=0, crop=8, batch=8, sam_space="data",
                       batches=batches, log_every=1)
  assert seen and trained.params[0] is not None and trained.params[1] is None
  assert np.isfinite(trained.info["stage0"]["final_loss"])
  x = scdm.sample(trained, cube[..., list(RGB)], key=0, method="ddim", num_steps=2, tile=8,
                  show_progress=False)
  assert x.shape == cube.shape and np.all(np.isfinite(x))
