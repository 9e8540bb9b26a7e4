"""SCDM training: the loss against NumPy, condition dropout, EMA start, crops, fit/resume."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hsijax import diffusion
from hsijax.scdm import training as train
from hsijax.scdm.unet import CondUNet

# A single-level U-Net keeps compiles short; the training code does not care about depth.
SMALL = dict(base=8, channel_mults=(1,), num_res_down=1, num_res_up=2, attn_levels=(),
             mid_attn=False, groups=4, dropout=0.0)
SCHED = diffusion.make_schedule("linear", 1000)


def _batch(seed=0, n=4, hw=8):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, hw, hw, 4)).astype(np.float32)
  x[0, 0, 0] = 0.0  # one zero spectrum: its cosine must be 0, not NaN
  cond = rng.normal(size=(n, hw, hw, 3)).astype(np.float32) + 1.0
  return {"x": jnp.asarray(x), "cond": jnp.asarray(cond)}


def np_loss(x0, eps, eps_pred, abar, loss_type, sam_weight):
  """Independent NumPy SCDM loss (float64)."""
  x0, eps, eps_pred = (np.asarray(a, np.float64) for a in (x0, eps, eps_pred))
  a = abar[:, None, None, None]
  x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
  x0_pred = (x_t - np.sqrt(1 - a) * eps_pred) / np.sqrt(a)
  l_eps = np.mean(np.abs(eps - eps_pred)) if loss_type == "l1" else \
      np.mean((eps - eps_pred) ** 2)
  na, nb = np.linalg.norm(x0_pred, axis=-1), np.linalg.norm(x0, axis=-1)
  cos = np.sum(x0_pred * x0, -1) / np.maximum(na * nb, 1e-8)
  return l_eps + sam_weight * (1.0 - cos.mean())


@pytest.fixture(scope="module")
def setup():
  model = CondUNet(out_channels=4, **SMALL)
  opt = train.make_optimizer(1e-2)
  state = train.init_train_state(model, opt, jax.random.key(0), (1, 8, 8, 4), (1, 8, 8, 3))
  step = train.make_train_step(model, SCHED, opt, loss_type="l1", sam_weight=0.7,
                               cond_drop=0.5, ema_decay=0.5, ema_start=3)
  return model, state, step


@pytest.mark.parametrize("loss_type", ["l1", "mse"])
def test_loss_matches_numpy(setup, loss_type):
  model, state, _ = setup
  batch, key = _batch(), jax.random.key(3)
  loss, aux = jax.jit(lambda p, b, k: train.compute_loss(
      p, model, SCHED, b, k, loss_type=loss_type, sam_weight=0.7, cond_drop=0.5))(
          state.params, batch, key)
  i, eps, cond = (np.asarray(aux[k]) for k in ("i", "eps", "cond"))
  abar = np.cumprod(1 - diffusion.linear_betas(1000))[i]
  x_t = np.sqrt(abar)[:, None, None, None] * np.asarray(batch["x"]) + \
      np.sqrt(1 - abar)[:, None, None, None] * eps
  eps_pred = model.apply({"params": state.params}, jnp.float32(x_t), jnp.asarray(cond),
                         jnp.asarray(i))
  want = np_loss(batch["x"], eps, eps_pred, abar, loss_type, 0.7)
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)
  assert np.isfinite(float(loss))
  # Each condition is either kept whole or zeroed whole.
  for n in range(4):
    assert np.array_equal(cond[n], batch["cond"][n]) or not np.any(cond[n])


def test_v_prediction_loss_matches_numpy(setup):
  model, state, _ = setup
  batch, key = _batch(1), jax.random.key(4)
  loss, aux = jax.jit(lambda p, b, k: train.compute_loss(
      p, model, SCHED, b, k, loss_type="mse", sam_weight=0.7, cond_drop=0.0,
      prediction="v"))(state.params, batch, key)
  i, eps = np.asarray(aux["i"]), np.asarray(aux["eps"], np.float64)
  a = np.cumprod(1 - diffusion.linear_betas(1000))[i][:, None, None, None]
  x0 = np.asarray(batch["x"], np.float64)
  x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
  v_pred = np.asarray(model.apply({"params": state.params}, jnp.float32(x_t),
                                  batch["cond"], jnp.asarray(i)), np.float64)
  v = np.sqrt(a) * eps - np.sqrt(1 - a) * x0
  x0_pred = np.sqrt(a) * x_t - np.sqrt(1 - a) * v_pred
  na, nb = np.linalg.norm(x0_pred, axis=-1), np.linalg.norm(x0, axis=-1)
  cos = np.sum(x0_pred * x0, -1) / np.maximum(na * nb, 1e-8)
  want = np.mean((v - v_pred) ** 2) + 0.7 * (1.0 - cos.mean())
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)
  # Not the eps loss by accident.
  eps_loss = np_loss(batch["x"], eps, v_pred, a[:, 0, 0, 0], "mse", 0.7)
  assert abs(eps_loss - want) > 1e-3
  with pytest.raises(ValueError, match="prediction"):
    train.make_train_step(model, SCHED, train.make_optimizer(), prediction="x1")


def test_train_step_reports_loss_and_ema_starts_after_ema_start(setup):
  model, state, step = setup
  batch = _batch(1)
  key = jax.random.key(11)
  expected_loss, _ = train.compute_loss(state.params, model, SCHED, batch, key,
                                        sam_weight=0.7, cond_drop=0.5)
  s1, m1 = step(state, batch, key)
  np.testing.assert_allclose(float(m1["loss"]), float(expected_loss), rtol=1e-5)
  s2, _ = step(s1, batch, jax.random.key(12))
  s3, _ = step(s2, batch, jax.random.key(13))
  assert [int(s.step) for s in (s1, s2, s3)] == [1, 2, 3]
  leaves = lambda t: jax.tree_util.tree_leaves(t)
  # Updates 1 and 2 (< ema_start = 3): the EMA is an exact copy of the parameters.
  for s in (s1, s2):
    for e, p in zip(leaves(s.ema_params), leaves(s.params)):
      np.testing.assert_array_equal(e, p)
  # Update 3: ema = 0.5 ema_2 + 0.5 params_3, which differs from params_3.
  for e3, e2, p3 in zip(leaves(s3.ema_params), leaves(s2.ema_params), leaves(s3.params)):
    np.testing.assert_allclose(e3, 0.5 * e2 + 0.5 * p3, rtol=1e-6, atol=1e-7)
  assert any(not np.allclose(e, p) for e, p in zip(leaves(s3.ema_params), leaves(s3.params)))
  # The parameters moved and stay finite.
  assert not np.allclose(leaves(s1.params)[0], leaves(state.params)[0])
  assert all(np.all(np.isfinite(p)) for p in leaves(s3.params))


def test_condition_dropout_rate():
  cond = jnp.ones((20000, 2, 2, 3))
  out = np.asarray(train.drop_condition(jax.random.key(0), cond, 0.1))
  per_sample = out.reshape(20000, -1)
  # Whole samples are dropped: every row is all zeros or all ones.
  assert np.all((per_sample == 0).all(1) | (per_sample == 1).all(1))
  rate = float((per_sample == 0).all(1).mean())
  assert abs(rate - 0.1) < 0.012  # binomial std 0.0021: a 5.6-sigma band
  np.testing.assert_array_equal(train.drop_condition(jax.random.key(1), cond[:5], 0.0),
                                cond[:5])
  assert not np.any(train.drop_condition(jax.random.key(1), cond[:5], 1.0))


def test_cosine_zero_vectors_are_safe():
  a = jnp.zeros((3, 4))
  b = jnp.ones((3, 4))
  np.testing.assert_array_equal(train.cosine_similarity(a, b), 0.0)
  g = jax.grad(lambda a: train.scdm_loss(a, a, b, a, "mse", 1.0))(a)
  assert np.all(np.isfinite(g))
  # Parallel and antiparallel vectors: +1 and -1.
  np.testing.assert_allclose(train.cosine_similarity(b, 2 * b), 1.0, rtol=1e-6)
  np.testing.assert_allclose(train.cosine_similarity(b, -b), -1.0, rtol=1e-6)


def test_random_crops_pair_windows_and_determinism():
  m, h, w = 3, 10, 12
  base = np.arange(m * h * w, dtype=np.float32).reshape(m, h, w, 1)
  images = {"x": np.concatenate([base, -base], -1), "cond": base * 2}
  a = train.random_crops(images, 4, 6, 5, seed=1)
  b = train.random_crops(images, 4, 6, 5, seed=1)
  c = train.random_crops(images, 4, 6, 6, seed=1)
  assert a["x"].shape == (6, 4, 4, 2) and a["cond"].shape == (6, 4, 4, 1)
  np.testing.assert_array_equal(a["x"], b["x"])
  assert not np.array_equal(a["x"], c["x"])
  # Same window in both arrays, contiguous in rows (+w) and columns (+1).
  np.testing.assert_array_equal(a["cond"][..., 0], 2 * a["x"][..., 0])
  np.testing.assert_array_equal(np.diff(a["x"][..., 0], axis=2), 1.0)
  np.testing.assert_array_equal(np.diff(a["x"][..., 0], axis=1), float(w))
  k = train.random_crops(base, 4, 2, jax.random.key(0))
  assert k.shape == (2, 4, 4, 1)
  with pytest.raises(ValueError, match="crop size"):
    train.random_crops(base, 11, 2, 0)


@pytest.mark.slow
def test_fit_resumes_to_the_uninterrupted_result(tmp_path):
  model = CondUNet(out_channels=4, **SMALL)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 12, 12, 4)).astype(np.float32)
  cond = rng.normal(size=(2, 12, 12, 3)).astype(np.float32)
  kw = dict(schedule=SCHED, batch_size=8, crop_size=8, learning_rate=1e-3, ema_start=2,
            ema_decay=0.9, log_every=1, checkpoint_every=2, key=jax.random.key(3))
  full, hist = train.fit(model, x, cond, num_steps=4, workdir=tmp_path / "a", **kw)
  train.fit(model, x, cond, num_steps=2, workdir=tmp_path / "b", **kw)
  resumed, hist_b = train.fit(model, x, cond, num_steps=4, workdir=tmp_path / "b", **kw)
  assert int(full.step) == int(resumed.step) == 4
  assert hist["step"] == hist_b["step"] == [1, 2, 3, 4]  # whole run, first part from disk
  np.testing.assert_allclose(hist_b["loss"], hist["loss"], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(full.ema_params),
                  jax.tree_util.tree_leaves(resumed.ema_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_optimizer_cosine_decay_closed_form():
  """With a constant gradient Adam's update is -lr_t: the cosine schedule is visible."""
  opt = train.make_optimizer(2.0, decay_steps=10, final_fraction=0.01)
  params = {"w": jnp.zeros(3)}
  state = opt.init(params)
  got = []
  for _ in range(12):
    upd, state = opt.update({"w": jnp.ones(3)}, state, params)
    got.append(float(upd["w"][0]))
  t = np.minimum(np.arange(12), 10)
  want = -2.0 * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * t / 10)))
  np.testing.assert_allclose(got, want, rtol=5e-5)  # Adam eps = 1e-8
  const = train.make_optimizer(2.0)
  upd, _ = const.update({"w": jnp.ones(3)}, const.init(params), params)
  np.testing.assert_allclose(upd["w"], -2.0, rtol=5e-5)
  with pytest.raises(ValueError, match="decay_steps"):
    train.make_optimizer(1.0, decay_steps=-1)
