"""SpectralDenoiser: parameter count, equivalence to the concat (torch) form, time condition
computed once, init statistics, dropout, input validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hsijax import policy as policy_lib
from hsijax.sdp import denoiser
from hsijax.sdp.denoiser import SpectralDenoiser, count_params


def reference_forward(params, x, t, num_layers=5, time_dim=64):
  """Independent NumPy (float64) forward in the literal concat form of the SPEC.

  params: the flax "params" dict; x: (N, B); t: scalar or (N,).
  """
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)
  t = np.broadcast_to(np.asarray(t, np.float64), (x.shape[0],))
  half = time_dim // 2
  freqs = np.exp(-np.log(1e4) * np.arange(half) / half)
  emb = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=1)
  silu = lambda a: a / (1.0 + np.exp(-a))
  lin = lambda name, a: a @ p[name]["kernel"] + p[name]["bias"]
  c = lin("time_1", silu(lin("time_0", emb)))
  h = x
  for i in range(num_layers):
    inp = h if i == 0 else np.concatenate([h, x], axis=1)
    h = lin(f"layer_{i}", inp)
    if i == num_layers - 1:
      break
    s = lin(f"cond_{i}", silu(c))
    h = h * (1.0 + s) + s
    mu = h.mean(1, keepdims=True)
    var = ((h - mu) ** 2).mean(1, keepdims=True)
    h = (h - mu) / np.sqrt(var + 1e-5) * p[f"norm_{i}"]["scale"] + p[f"norm_{i}"]["bias"]
    h = silu(h)
  return h


def _small(B=6, hidden=16, dropout=0.0, seed=0):
  model = SpectralDenoiser(num_bands=B, hidden=hidden, dropout=dropout)
  params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, B)), 0)
  # Non-trivial biases / norm parameters so the reference check covers them too.
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]
  return model, jax.tree_util.tree_unflatten(tree, leaves)


def test_param_count_b103_by_hand():
  # B = 103, hidden 512, 5 layers, time_dim 64 (weights + biases):
  #   time_0  Linear(64, 103):            64*103 + 103   =     6,695
  #   time_1  Linear(103, 103):          103*103 + 103   =    10,712
  #   layer_0 Linear(103, 512):          103*512 + 512   =    53,248
  #   layer_1..3 Linear(615, 512):  3 * (615*512 + 512)  =   946,176
  #   layer_4 Linear(615, 103):          615*103 + 103   =    63,448
  #   cond_0..3 Linear(103, 512):   4 * (103*512 + 512)  =   212,992
  #   norm_0..3 LayerNorm(512):     4 * (512 + 512)      =     4,096
  #   total                                              = 1,297,367
  hand = 6695 + 10712 + 53248 + 946176 + 63448 + 212992 + 4096
  assert hand == 1_297_367
  model = SpectralDenoiser(num_bands=103)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 103)), 0))
  assert count_params(shapes) == hand
  p = shapes["params"]
  # Kernels keep the torch Linear(in, out) layout (transposed): concat(h, x) rows.
  assert p["layer_1"]["kernel"].shape == (615, 512)
  assert p["layer_4"]["kernel"].shape == (615, 103)
  assert p["time_0"]["kernel"].shape == (64, 103)


@pytest.mark.parametrize("per_pixel_t", [False, True])
def test_matches_concat_reference(per_pixel_t):
  model, params = _small()
  x = jax.random.uniform(jax.random.key(3), (9, 6))
  t = jnp.arange(9) * 97 if per_pixel_t else 417
  out = jax.jit(model.apply)(params, x, t)
  ref = reference_forward(params["params"], x, t)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision", ["default", "bfloat16"])
def test_concat_dot_gradients_equal_autodiff_of_the_concatenation(precision):
  rng = np.random.default_rng(4)
  h, x, k, w = (jnp.asarray(rng.normal(size=s), jnp.float32)
                for s in [(7, 5), (7, 3), (8, 4), (7, 4)])
  plain = lambda h, x, k: policy_lib.dot(jnp.concatenate([h, x], -1), k, precision)
  fast = lambda h, x, k: denoiser.concat_dot(h, x, k, precision)
  loss = lambda f: lambda h, x, k: jnp.sum(jnp.tanh(f(h, x, k)) * w)
  np.testing.assert_allclose(fast(h, x, k), plain(h, x, k), rtol=1e-6)
  tol = dict(rtol=1e-5, atol=1e-6) if precision == "default" else dict(rtol=2e-2, atol=2e-2)
  # Every subset of differentiated inputs (the backward forms only the requested ones).
  for argnums in [(0, 1, 2), (0, 2), (1,), (2,)]:
    got = jax.jit(jax.grad(loss(fast), argnums))(h, x, k)
    want = jax.grad(loss(plain), argnums)(h, x, k)
    for a, b in zip(got, want, strict=True):
      assert a.shape == b.shape
      np.testing.assert_allclose(a, b, **tol)


def test_scalar_t_equals_broadcast_t():
  model, params = _small()
  x = jax.random.uniform(jax.random.key(4), (11, 6))
  apply = jax.jit(model.apply)
  a = apply(params, x, 250)
  b = apply(params, x, jnp.full((11,), 250))
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _sub_jaxprs(value):
  """Jaxprs nested in an equation parameter (jit / scan bodies, cond branches)."""
  if hasattr(value, "eqns"):
    return [value]
  if hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    return [value.jaxpr]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def _pixel_dots(jaxpr, n):
  """(lhs shape, rhs shape) of every dot_general with an n-row operand (all sub-jaxprs)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      shapes = tuple(tuple(v.aval.shape) for v in eqn.invars)
      if any(s and s[0] == n for s in shapes):
        found.append(shapes)
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        found += _pixel_dots(sub, n)
  return found


def test_time_condition_computed_once_for_scalar_t():
  B, hidden, n, time_dim = 6, 16, 13, 64
  model, params = _small(B, hidden)
  x = jnp.ones((n, B))
  scalar = _pixel_dots(jax.make_jaxpr(lambda x: model.apply(params, x, 3))(x).jaxpr, n)
  vector = _pixel_dots(
      jax.make_jaxpr(lambda x: model.apply(params, x, jnp.full((n,), 3)))(x).jaxpr, n)
  # Scalar t: no per-pixel time-MLP matmul (nothing contracts the 64-d embedding or maps
  # SiLU(c) (B) -> hidden per pixel); only the 5 main layers touch the n pixels
  # (one fused x-projection + four h @ K_h).
  assert not any(time_dim in lhs for lhs, _ in scalar)
  assert len(scalar) == 5
  # Per-pixel t really does run the time MLP (2) and the 4 condition layers per pixel; the
  # main layers are then layer 0 on x plus one concat(h, x) dot per later layer (4).
  assert any(lhs == (n, time_dim) for lhs, _ in vector)
  # (n, B) @ (B, hidden): 4 condition layers + layer 0.
  assert sum(shapes == ((n, B), (B, hidden)) for shapes in vector) == 4 + 1
  assert sum(shapes[0] == (n, hidden + B) for shapes in vector) == 4
  assert len(vector) == 1 + 4 + 2 + 4


def test_init_xavier_normal_zero_bias():
  model = SpectralDenoiser(num_bands=103)
  p = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 103)), 0)["params"]
  w = np.asarray(p["layer_1"]["kernel"])
  std = np.sqrt(2.0 / (615 + 512))  # torch xavier_normal_: gain 1, fan_in + fan_out
  assert abs(w.std() / std - 1.0) < 0.02
  assert abs(w.mean()) < 3 * std / np.sqrt(w.size)
  # Untruncated normal: 315k draws reach beyond 4 sigma (a truncated init would stop at 2).
  assert np.abs(w).max() > 4.0 * std
  for name in ("time_0", "time_1", "layer_0", "layer_4", "cond_2"):
    assert not np.any(np.asarray(p[name]["bias"]))
  np.testing.assert_array_equal(np.asarray(p["norm_0"]["scale"]), 1.0)


def test_dropout_only_in_training():
  model = SpectralDenoiser(num_bands=6, hidden=16, dropout=0.5)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 6)), 0)
  x = jax.random.uniform(jax.random.key(1), (8, 6))
  apply = jax.jit(model.apply, static_argnames="train")
  eval_a = apply(params, x, 5)
  eval_b = apply(params, x, 5, train=False)
  np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
  tr1 = apply(params, x, 5, train=True, rngs={"dropout": jax.random.key(2)})
  tr2 = apply(params, x, 5, train=True, rngs={"dropout": jax.random.key(3)})
  assert not np.allclose(np.asarray(tr1), np.asarray(eval_a))
  assert not np.allclose(np.asarray(tr1), np.asarray(tr2))


def test_bad_input_raises():
  model, params = _small()
  with pytest.raises(ValueError, match="num_bands"):
    model.apply(params, jnp.ones((4, 5)), 0)
  with pytest.raises(ValueError, match="scalar"):
    model.apply(params, jnp.ones((4, 6)), jnp.zeros((3,), jnp.int32))


def test_hand_written_input_grad_matches_autodiff():
  from hsijax.sdp.denoiser import apply_with_input_grad, fold_time_condition
  model, params = _small()
  x = jax.random.uniform(jax.random.key(5), (10, 6))
  target = jax.random.normal(jax.random.key(6), (10, 6))
  cot = lambda out, tgt: 2.0 * (out - tgt)

  @jax.jit
  def both(params, x):
    out, vjp = jax.vjp(lambda x: model.apply(params, x, 321), x)
    folded = fold_time_condition(model, params, 321)
    whole = apply_with_input_grad(model, folded, x, cot, target, chunk=None)
    chunked = apply_with_input_grad(model, folded, x, cot, target, chunk=4)  # 10 = 4+4+2
    return out, vjp(cot(out, target))[0], whole, chunked

  out, dx, *mine = both(params, x)
  for out2, dx2 in mine:
    np.testing.assert_allclose(np.asarray(out2), np.asarray(out), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dx2), np.asarray(dx), rtol=1e-4, atol=1e-5)
  assert np.abs(np.asarray(dx)).max() > 1e-2   # a real, non-trivial gradient


def _random_sizes(fn, *args):
  """Sizes of the arrays drawn by every random-bits / threefry op in fn's jaxpr."""
  sizes = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if "threefry" in eqn.primitive.name or "random_bits" in eqn.primitive.name:
        sizes.extend(int(np.prod(v.aval.shape)) for v in eqn.outvars)
      for value in eqn.params.values():
        for sub in _sub_jaxprs(value):
          walk(sub)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return sizes


@pytest.mark.parametrize("shape,rate", [((4, 512, 512), 0.001), ((4, 512, 512), 0.005),
                                        ((4, 64, 32), 0.3)])
def test_dropout_keep_mask_is_bernoulli(shape, rate):
  from hsijax.sdp.denoiser import dropout_keep_mask
  m = int(np.prod(shape))
  draw = jax.jit(lambda k: dropout_keep_mask(k, shape, rate))
  masks = [np.asarray(draw(jax.random.key(s))) for s in range(3)]
  np.testing.assert_array_equal(masks[0], np.asarray(draw(jax.random.key(0))))  # same key
  assert masks[0].shape == shape and masks[0].dtype == bool
  assert not np.array_equal(masks[0], masks[1])
  mean, sd = m * rate, np.sqrt(m * rate * (1 - rate))
  for keep in masks:
    dropped = ~keep
    # Binomial(M, rate) count of dropped units (5 sigma: fails for a wrong rate).
    assert abs(dropped.sum() - mean) < 5 * sd
    # Spread: counts in 64 equal blocks are uniform (chi-square, 63 dof; 130 ~ p 1e-6).
    blocks = dropped.reshape(64, -1).sum(axis=1)
    expect = mean / 64
    assert np.sum((blocks - expect) ** 2 / expect) < 130
    # Independence of neighbours: adjacent dropped pairs ~ (M - 1) rate^2 (Poisson).
    flat = dropped.reshape(-1)
    pairs = np.sum(flat[1:] & flat[:-1])
    lam = (m - 1) * rate ** 2
    assert abs(pairs - lam) < 5 * np.sqrt(lam) + 2
  # Small rates use the cheap path: far fewer random numbers than mask units.
  drawn = sum(_random_sizes(lambda k: dropout_keep_mask(k, shape, rate), jax.random.key(0)))
  if rate < 0.01:
    assert drawn < m / 16
  else:
    assert drawn >= m


def test_dropout_keep_mask_edges():
  from hsijax.sdp.denoiser import dropout_keep_mask
  assert np.all(np.asarray(dropout_keep_mask(jax.random.key(0), (3, 5), 0.0)))
  with pytest.raises(ValueError, match="rate"):
    dropout_keep_mask(jax.random.key(0), (3, 5), 1.0)


def test_training_dropout_rate_in_module():
  # 2 layers: the gradient of sum(out) for ONE pixel w.r.t. layer_1's hidden rows is the
  # hidden activation after dropout, zero exactly where a unit was dropped (SiLU of a
  # LayerNorm output is never exactly 0 otherwise). Rate 0.3 over 8 keys x 256 units.
  model = SpectralDenoiser(num_bands=6, hidden=256, num_layers=2, dropout=0.3)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 6)), 0)
  x = jax.random.uniform(jax.random.key(1), (1, 6))
  grad = jax.jit(jax.grad(lambda p, k: model.apply(p, x, 5, train=True,
                                                   rngs={"dropout": k}).sum()))
  rows = [np.asarray(grad(params, jax.random.key(s))["params"]["layer_1"]["kernel"])[:256, 0]
          for s in range(8)]
  frac = float(np.mean([r == 0.0 for r in rows]))
  assert abs(frac - 0.3) < 5 * np.sqrt(0.3 * 0.7 / 2048)
  kept = np.concatenate([r[r != 0.0] for r in rows])
  # Kept units are scaled by 1 / (1 - rate) (inverted dropout): compare with eval mode.
  ev = np.asarray(jax.jit(jax.grad(lambda p: model.apply(p, x, 5).sum()))(params)
                  ["params"]["layer_1"]["kernel"])[:256, 0]
  np.testing.assert_allclose(rows[0][rows[0] != 0], ev[rows[0] != 0] / 0.7, rtol=1e-5)
  assert kept.size > 0
