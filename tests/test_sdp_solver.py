"""SDP solver (Algorithm 1): steps vs an independent loss + hand-written Adam, gradient vs
finite differences, clamp / EMA, Baseline ignores the network, vmap == separate solves."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hsijax import degrade, diffusion
from hsijax.sdp import solver
from hsijax.sdp.denoiser import SpectralDenoiser

H = W = 8
B, b, R = 6, 3, 2
T = 50


@functools.lru_cache(maxsize=None)
def _problem(seed=0):
  rng = np.random.default_rng(seed)
  x = np.clip(np.linspace(0.2, 0.7, B)[None, None] * rng.uniform(0.6, 1.3, (H, W, 1))
              + 0.05 * rng.normal(size=(H, W, B)), 0, 1).astype(np.float32)
  psf = jnp.asarray(degrade.gaussian_psf(R), jnp.float32)          # (3, 3)
  srf = rng.uniform(0.1, 1.0, (b, B)).astype(np.float32)
  srf = jnp.asarray(srf / srf.sum(1, keepdims=True))
  y = degrade.blur_down(jnp.asarray(x), psf, R) + 0.01 * rng.normal(size=(H // R, W // R, B))
  z = degrade.spectral_response(jnp.asarray(x), srf) + 0.01 * rng.normal(size=(H, W, b))
  return jnp.asarray(x), y.astype(jnp.float32), z.astype(jnp.float32), psf, srf


@functools.lru_cache(maxsize=None)
def _model(seed=0):
  model = SpectralDenoiser(num_bands=B, hidden=16, dropout=0.001)
  params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, B)), 0)
  return model, params


def _net_concat(params, x, t):
  """Independent jnp network in the literal concat form (differentiable)."""
  p = params["params"]
  half = 32
  freqs = jnp.exp(-jnp.log(1e4) * jnp.arange(half) / half)
  emb = jnp.concatenate([jnp.cos(t * freqs), jnp.sin(t * freqs)])
  lin = lambda n, a: a @ p[n]["kernel"] + p[n]["bias"]
  c = lin("time_1", jax.nn.silu(lin("time_0", emb)))
  h = x
  for i in range(5):
    h = lin(f"layer_{i}", h if i == 0 else jnp.concatenate([h, x], axis=1))
    if i == 4:
      return h
    s = lin(f"cond_{i}", jax.nn.silu(c))
    h = h * (1 + s) + s
    mu, var = h.mean(1, keepdims=True), h.var(1, keepdims=True)
    h = (h - mu) / jnp.sqrt(var + 1e-5) * p[f"norm_{i}"]["scale"] + p[f"norm_{i}"]["bias"]
    h = jax.nn.silu(h)


def _blur_down_loops(x, psf, r):
  """Literal zero-padded convolution sampled at 0, r, 2r, ... (sum over kernel taps)."""
  k = psf.shape[0]
  p = (k - 1) // 2
  xp = jnp.pad(x, ((p, p), (p, p), (0, 0)))
  out = 0.0
  for u in range(k):
    for v in range(k):
      out = out + psf[u, v] * xp[k - 1 - u:k - 1 - u + x.shape[0]:r,
                                 k - 1 - v:k - 1 - v + x.shape[1]:r]
  return out


def _ref_loss(X, params, y, z, psf, srf, eps, abar, t, lam, gam):
  fid = lam * jnp.sum((_blur_down_loops(X, psf, R) - y) ** 2) + \
      jnp.sum((jnp.einsum("hwj,ij->hwi", X, srf) - z) ** 2)
  x_t = jnp.sqrt(abar) * X + jnp.sqrt(1 - abar) * eps
  pred = _net_concat(params, x_t.reshape(-1, B), t)
  return fid + gam * jnp.sum((pred - eps.reshape(-1, B)) ** 2)


def test_steps_match_independent_loss_and_hand_adam():
  _, y, z, psf, srf = _problem()
  model, params = _model()
  ts = [17, 38]                                      # two outer positions, visited 38 then 17
  sched = diffusion.respace(diffusion.linear_betas(T), ts)
  lam, gam, lr, K, wd = 0.1, 0.05, 0.6, 2, 1e-3  # big lr: X hits the clamp at 0
  key = jax.random.key(11)
  solve = solver.make_solver(model, sched, lam=lam, gam=gam, lr=lr, K=K, weight_decay=wd,
                             ema_decay=0.9, ratio=R, lr_scale=1.0)
  out = np.asarray(solve(params, y, z, psf, srf, key))

  abar_all = np.cumprod(1.0 - diffusion.linear_betas(T))
  grad = jax.jit(jax.grad(_ref_loss), static_argnums=(9, 10))
  x = np.ones((H, W, B))
  ema, m, v, count = x.copy(), np.zeros_like(x), np.zeros_like(x), 0
  clamped = 0
  for i in (1, 0):                                   # positions n-1 .. 0
    for k in range(K):
      eps = jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), k), (H, W, B))
      g = np.asarray(grad(jnp.asarray(x, jnp.float32), params, y, z, psf, srf, eps,
                          float(abar_all[ts[i]]), float(ts[i]), lam, gam), np.float64)
      g = g + wd * x                                 # torch L2 in the gradient
      count += 1                                     # one Adam state over all inner steps
      m = 0.9 * m + 0.1 * g
      v = 0.999 * v + 0.001 * g * g
      step = lr / (1 - 0.9 ** count) * m / (np.sqrt(v) / np.sqrt(1 - 0.999 ** count) + 1e-8)
      x_new = x - step
      clamped += np.sum((x_new > 1) | (x_new < 0))
      x = np.clip(x_new, 0.0, 1.0)
      ema = 0.9 * ema + 0.1 * x
  assert clamped > 0                                 # the clamp was exercised
  np.testing.assert_allclose(out, ema, rtol=1e-4, atol=2e-5)
  assert out.min() >= 0.0 and out.max() <= 1.0


def test_loss_gradient_matches_finite_differences():
  _, y, z, psf, srf = _problem()
  model, params = _model()
  sched = diffusion.make_schedule("linear", T)
  with jax.enable_x64(True):
    f64 = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), t)
    p64, y64, z64, psf64, srf64 = f64((params, y, z, psf, srf))
    X = jnp.asarray(np.random.default_rng(1).uniform(0.1, 0.9, (H, W, B)))
    eps = jax.random.normal(jax.random.key(2), (H, W, B), jnp.float64)
    loss = jax.jit(lambda X: solver.fusion_loss(X, p64, y64, z64, psf64, srf64, eps,
                                                jnp.int32(20), model=model, schedule=sched,
                                                lam=0.7, gam=0.3, ratio=R))
    g = np.asarray(jax.grad(loss)(X))
    h = 1e-5
    for idx in [(0, 0, 0), (3, 5, 2), (7, 7, 5), (4, 1, 3)]:
      e = np.zeros((H, W, B))
      e[idx] = h
      fd = (float(loss(X + e)) - float(loss(X - e))) / (2 * h)
      assert fd == pytest.approx(g[idx], rel=1e-3, abs=1e-4)
    # The prior term contributes (a loss without it has a different gradient).
    g0 = np.asarray(jax.grad(lambda X: solver.fusion_loss(
        X, p64, y64, z64, psf64, srf64, eps, jnp.int32(20), model=model, schedule=sched,
        lam=0.7, gam=0.0, ratio=R))(X))
    assert not np.allclose(g, g0)


def test_fast_gradient_equals_autodiff_of_the_loss():
  _, y, z, psf, srf = _problem()
  model, params = _model()
  sched = diffusion.make_schedule("linear", T)
  X = jnp.asarray(np.random.default_rng(3).uniform(0.1, 0.9, (H, W, B)), jnp.float32)
  eps = jax.random.normal(jax.random.key(4), (H, W, B))
  kw = dict(model=model, schedule=sched, lam=0.3, gam=0.2, ratio=R)

  @jax.jit
  def grads(X, i):
    return (jax.grad(solver.fusion_loss)(X, params, y, z, psf, srf, eps, i, **kw),
            solver.fusion_grad(X, params, y, z, psf, srf, eps, i, **kw))

  for i in (3, 41):
    auto, fast = map(np.asarray, grads(X, jnp.int32(i)))
    np.testing.assert_allclose(fast, auto, rtol=1e-4, atol=1e-4 * np.abs(auto).max())


def test_baseline_ignores_network_and_reduces_data_misfit():
  x_true, y, z, psf, srf = _problem()
  model, params = _model(0)
  _, other = _model(1)
  sched = diffusion.make_respaced_schedule("linear", T, 10)
  solve = solver.make_solver(model, sched, lam=1.0, gam=0.0, lr=0.05, ratio=R)
  a = solve(params, y, z, psf, srf, jax.random.key(0))
  c = solve(other, y, z, psf, srf, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
  misfit = lambda X: float(jnp.sum((degrade.spectral_response(X, srf) - z) ** 2))
  assert misfit(a) < 0.5 * misfit(jnp.ones_like(a))
  # With the prior on, the network does matter.
  solve_p = solver.make_solver(model, sched, lam=1.0, gam=1.0, lr=0.05, ratio=R)
  assert not np.allclose(np.asarray(solve_p(params, y, z, psf, srf, jax.random.key(0))),
                         np.asarray(solve_p(other, y, z, psf, srf, jax.random.key(0))))


def test_vmap_over_scenes_equals_separate_solves():
  _, y1, z1, psf, srf = _problem(0)
  _, y2, z2, _, _ = _problem(1)
  model, params = _model()
  sched = diffusion.make_respaced_schedule("linear", T, 4)
  kw = dict(lam=0.1, gam=1e-2, lr=0.02, K=2, init="upsample", ratio=R)
  keys = jax.random.split(jax.random.key(5), 2)
  single = solver.make_solver(model, sched, **kw)
  batched = solver.make_batched_solver(model, sched, **kw)
  both = batched(params, jnp.stack([y1, y2]), jnp.stack([z1, z2]), psf, srf, keys)
  assert both.shape == (2, H, W, B)
  for s, (y, z) in enumerate([(y1, z1), (y2, z2)]):
    np.testing.assert_allclose(np.asarray(both[s]),
                               np.asarray(single(params, y, z, psf, srf, keys[s])),
                               rtol=1e-5, atol=1e-6)


def test_respaced_lr_scale():
  assert solver.respaced_lr_scale(diffusion.make_schedule("linear", 1000)) == 1.0
  assert solver.respaced_lr_scale(diffusion.make_respaced_schedule("linear", 1000, 100)) == 10.0
  assert solver.respaced_lr_scale(
      diffusion.make_respaced_schedule("linear", 1000, 40, "quadratic")) == 25.0


def test_bad_arguments_raise():
  _, y, z, psf, srf = _problem()
  model, params = _model()
  sched = diffusion.make_schedule("linear", T)
  with pytest.raises(ValueError, match="init"):
    solver.make_solver(model, sched, lam=0.1, gam=0.0, lr=1e-3, init="zeros", ratio=R)
  solve = solver.make_solver(model, sched, lam=0.1, gam=0.0, lr=1e-3, ratio=4)
  with pytest.raises(ValueError, match="ratio"):
    solve(params, y, z, psf, srf, jax.random.key(0))
  solve = solver.make_solver(model, sched, lam=0.1, gam=0.0, lr=1e-3, ratio=R)
  with pytest.raises(ValueError, match="srf"):
    solve(params, y, z, psf, srf[:, :4], jax.random.key(0))


def test_warm_start_visits_only_the_last_positions_from_the_classical_mean():
  """start=0.2 of 10 positions == a full run over a schedule cut to its first 2 positions
  (the smallest t), with the prior on; lr=0 returns the classical starting point."""
  from hsijax import classical  # pylint: disable=import-outside-toplevel
  _, y, z, psf, srf = _problem()
  model, params = _model()
  sched = diffusion.make_respaced_schedule("linear", T, 10)
  cut = jax.tree.map(lambda a: a[:2], sched)
  kw = dict(lam=0.1, gam=1e-2, lr=0.02, K=2, init="classical", ratio=R, lr_scale=3.0)
  key = jax.random.key(3)
  warm = solver.make_solver(model, sched, start=0.2, **kw)(params, y, z, psf, srf, key)
  full_cut = solver.make_solver(model, cut, **kw)(params, y, z, psf, srf, key)
  np.testing.assert_allclose(np.asarray(warm), np.asarray(full_cut), rtol=1e-6, atol=1e-7)
  assert solver.run_positions(10, 0.2) == 2 and solver.run_positions(10, 0.01) == 1
  assert solver.run_positions(100, 1.0) == 100
  # The starting point: the mean of the two classical fusions (lr 0 leaves X there).
  still = solver.make_solver(model, sched, start=0.2, **dict(kw, lr=0.0, gam=0.0))
  expect = 0.5 * (classical.run_method("subspace_ls", y, z, psf, srf, R)
                  + classical.run_method("detail_injection", y, z, psf, srf, R))
  np.testing.assert_allclose(np.asarray(still(params, y, z, psf, srf, key)),
                             np.asarray(expect), rtol=1e-5, atol=1e-6)
  # ... which is much closer to the truth than the paper's start from ones.
  x_true = _problem()[0]
  assert float(jnp.mean((expect - x_true) ** 2)) < 0.1 * float(jnp.mean((1.0 - x_true) ** 2))
  with pytest.raises(ValueError, match="start"):
    solver.make_solver(model, sched, start=0.0, **kw)
