"""SDM training: loss vs an independent computation, lr schedule, torch-style L2 + Adam, EMA,
data-parallel == single-device, resume == uninterrupted, sampling / FID plumbing."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hsijax import diffusion, sharding
from hsijax.policy import Policy
from hsijax.sdp import train
from hsijax.sdp.denoiser import SpectralDenoiser
from test_sdp_denoiser import reference_forward

B, HID = 8, 32


@functools.lru_cache(maxsize=None)
def _setup(dropout=0.0, T=50):
  model = SpectralDenoiser(num_bands=B, hidden=HID, dropout=dropout)
  sched = diffusion.make_schedule("linear", T)
  opt = train.make_optimizer()
  state = train.init_train_state(model, jax.random.key(0), opt)
  return model, sched, opt, state


def _pixels(n=256, seed=0):
  rng = np.random.default_rng(seed)
  base = np.linspace(0.2, 0.8, B)[None]
  return np.clip(base * rng.uniform(0.5, 1.2, (n, 1)) + 0.05 * rng.normal(size=(n, B)), 0,
                 1).astype(np.float32)


def test_loss_equals_independent_computation():
  model, sched, opt, state = _setup()
  batch = jnp.asarray(_pixels(16))
  key = jax.random.key(7)
  step = jax.jit(train.make_train_step(model, sched, opt, ema_decay=0.999))
  new, metrics = step(state, batch, key)
  # Independent: the documented draws (fold_in(key, step), split into t / eps / dropout keys),
  # the NumPy concat-form network, and the MSE by hand.
  k_t, k_eps, _ = jax.random.split(jax.random.fold_in(key, 0), 3)
  i = np.asarray(jax.random.randint(k_t, (16,), 0, sched.num_steps))
  eps = np.asarray(jax.random.normal(k_eps, (16, B)), np.float64)
  abar = np.cumprod(1.0 - diffusion.linear_betas(50))[i][:, None]
  x_t = np.sqrt(abar) * np.asarray(batch, np.float64) + np.sqrt(1.0 - abar) * eps
  pred = reference_forward(state.params["params"], x_t, i)
  want = np.mean((eps - pred) ** 2)
  np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-4)
  # Step counter, every weight moved, EMA = 0.999 * old EMA + 0.001 * new params.
  assert int(new.step) == 1
  for e0, p0, p1, e1 in zip(*(jax.tree_util.tree_leaves(t) for t in (
      state.ema_params, state.params, new.params, new.ema_params))):
    assert not np.allclose(np.asarray(p0), np.asarray(p1))
    np.testing.assert_allclose(np.asarray(e1), 0.999 * np.asarray(e0) + 0.001 * np.asarray(p1),
                               rtol=1e-6, atol=1e-7)


def test_lr_schedule_values():
  f = lambda s, scale=1.0: float(train.lr_factor(s, scale))
  assert f(0) == pytest.approx(1.0)
  assert f(1000) == pytest.approx(0.9)        # 0.001 * (1000 - 100)
  assert f(5000) == pytest.approx(0.5)
  assert f(9980) == pytest.approx(0.002)       # 0.001 * (1000 - 998)
  assert f(10_000) == pytest.approx(0.001)    # floor max(., 1)
  assert f(30_000) == pytest.approx(0.001)
  assert f(500, scale=0.1) == pytest.approx(0.5)


def test_optimizer_is_torch_adam_with_l2():
  wd, lr = 0.1, 1e-2
  opt = train.make_optimizer(lr=lr, weight_decay=wd)
  p = jnp.array([0.5, -1.0, 2.0])
  grads = [jnp.array([0.1, 0.2, -0.3]), jnp.array([-0.2, 0.05, 0.4]),
           jnp.array([0.3, -0.1, 0.0])]
  state = opt.init(p)
  # Hand-written torch.optim.Adam(weight_decay=wd) step with LambdaLR factor per step.
  pn, m, v = np.array(p, np.float64), np.zeros(3), np.zeros(3)
  for s, g in enumerate(grads):
    upd, state = opt.update(g, state, p)
    p = p + upd
    gn = np.asarray(g, np.float64) + wd * pn         # L2 enters the gradient first
    m = 0.9 * m + 0.1 * gn
    v = 0.999 * v + 0.001 * gn ** 2
    lr_s = lr * 0.001 * max(1000 - s / 10, 1)
    pn = pn - lr_s / (1 - 0.9 ** (s + 1)) * m / (np.sqrt(v) / np.sqrt(1 - 0.999 ** (s + 1))
                                                  + 1e-8)
    np.testing.assert_allclose(np.asarray(p), pn, rtol=1e-5, atol=1e-7)
  # The decayed weight went through the Adam normalisation: with a zero gradient the update
  # is lr * sign(p) (torch L2), not lr * wd * p (decoupled AdamW).
  upd, _ = opt.update(jnp.zeros(3), opt.init(p), p)
  np.testing.assert_allclose(np.asarray(upd), -lr * np.sign(np.asarray(p)), rtol=1e-4)


# 0.1: one random word per unit; 0.01: geometric gaps (dropout_keep_mask's cheap path).
@pytest.mark.parametrize("dropout", [0.1, 0.01])
def test_data_parallel_step_matches_single_device(dropout):
  assert len(jax.devices()) == 8, "conftest forces 8 CPU devices"
  model, sched, opt, state = _setup(dropout=dropout)
  batch = jnp.asarray(_pixels(64))
  key = jax.random.key(3)
  fn = train.make_train_step(model, sched, opt)
  mesh = sharding.make_mesh(None)
  rep, dat = sharding.replicated(mesh), sharding.data_sharded(mesh)
  sharded = jax.jit(fn, in_shardings=(rep, dat, rep), out_shardings=(rep, rep))
  single = jax.jit(fn)
  s1, s8 = state, sharding.replicate(state, mesh)
  for _ in range(2):
    s1, m1 = single(s1, batch, key)
    s8, m8 = sharded(s8, sharding.shard_batch(batch, mesh), key)
  np.testing.assert_allclose(float(m1["loss"]), float(m8["loss"]), rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s8.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


SMALL = dict(hidden=HID, num_timesteps=50, batch=16, checkpoint_every=3, log_every=1)


def test_fit_resume_equals_uninterrupted(tmp_path):
  pixels = _pixels(200)
  settings = train.PriorSettings(**SMALL)
  fit = lambda steps, d: train.fit(pixels, steps=steps, key=5, settings=settings,
                                   workdir=tmp_path / d, show_progress=False)
  full, hist = fit(6, "a")
  assert hist["step"] == [1, 2, 3, 4, 5, 6] and np.all(np.isfinite(hist["loss"]))
  fit(3, "b")                                   # "killed"
  resumed, hist_b = fit(6, "b")
  # The history covers the whole run (the first process's part is read back from disk).
  assert hist_b["step"] == [1, 2, 3, 4, 5, 6]
  np.testing.assert_array_equal(hist_b["loss"], hist["loss"])
  assert int(resumed.step) == int(full.step) == 6
  for a, b in zip(jax.tree_util.tree_leaves((full.params, full.ema_params)),
                  jax.tree_util.tree_leaves((resumed.params, resumed.ema_params))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fit_and_settings_reject_bad_input():
  with pytest.raises(ValueError, match="reshape"):
    train.fit(np.zeros((4, 4, 8), np.float32), steps=1, key=0)
  with pytest.raises(ValueError, match="steps"):
    train.fit(_pixels(20), steps=-5, key=0)
  with pytest.raises(TypeError, match="valid names.*hidden"):
    train.PriorSettings.from_kwargs(hiden=3)
  with pytest.raises(ValueError, match="precision"):
    train.PriorSettings(precision="half")
  with pytest.raises(ValueError, match="schedule"):
    train.PriorSettings(schedule="quadratic")


def test_sample_spectra_and_fid():
  model, sched, _, state = _setup()
  a = train.sample_spectra(model, state.ema_params, sched, jax.random.key(2), 64)
  b = train.sample_spectra(model, state.ema_params, sched, jax.random.key(2), 64)
  assert a.shape == (64, B) and np.all(np.isfinite(np.asarray(a)))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same key, same spectra
  fid = train.evaluate_fid(model, state.ema_params, sched, _pixels(300), jax.random.key(4),
                           num=64)
  assert np.isfinite(fid) and fid > 0.0


def test_settings_build_the_model_and_donation_rule():
  model = train.PriorSettings(hidden=HID).model(B)
  assert (model.num_bands, model.hidden, model.precision) == (B, HID, "default")
  assert train.PriorSettings(precision="bfloat16").model(B).precision == "bfloat16"
  # CPU: the train step is not donated (measured faster); accelerators donate.
  assert not Policy.for_backend("cpu").donate and Policy.for_backend("gpu").donate


def test_bfloat16_train_step_close_to_float32():
  model, sched, opt, state = _setup()
  m16 = SpectralDenoiser(num_bands=B, hidden=HID, dropout=0.0, precision="bfloat16")
  batch = jnp.asarray(_pixels(64))
  key = jax.random.key(11)
  _, l32 = jax.jit(train.make_train_step(model, sched, opt))(state, batch, key)
  _, l16 = jax.jit(train.make_train_step(m16, sched, opt))(state, batch, key)
  a, b = float(l32["loss"]), float(l16["loss"])
  assert a != b and abs(a - b) < 2e-2 * a


def test_k_steps_per_dispatch_match_step_by_step_training(monkeypatch):
  # Acceptance of the accelerator-first training: N steps in N / k dispatches (batches drawn
  # on the device) end with the parameters of one step per dispatch, bit for bit.
  from hsijax import trainloop
  calls = []
  real_run = trainloop.run

  def counting_run(fn, state, **kw):
    return real_run(lambda s, n: (calls.append(int(n)), fn(s, n))[1], state, **kw)

  monkeypatch.setattr(trainloop, "run", counting_run)
  pixels = _pixels(200)
  settings = train.PriorSettings(**(SMALL | {"log_every": 10, "checkpoint_every": 100}))
  fit = lambda k: train.fit(pixels, steps=20, key=3, settings=settings, show_progress=False,
                            policy=Policy.for_backend("cpu").replace(steps_per_call=k))
  a, hist_a = fit(5)
  assert calls == [5, 5, 5, 5]
  calls.clear()
  b, hist_b = fit(1)
  assert len(calls) == 20
  for x, y in zip(jax.tree_util.tree_leaves((a.params, a.ema_params, a.opt_state)),
                  jax.tree_util.tree_leaves((b.params, b.ema_params, b.opt_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert hist_a == hist_b and hist_a["step"] == [10, 20]
