"""hsijax.policy matmul precision: policy names, dot() numerics against NumPy, scope(), config field, and the
SDP denoiser under "bfloat16" (same parameters, close to float32, not identical)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hsijax import policy as precision


def _bf16_round(a):
  """Round-to-nearest-even float32 -> bfloat16 -> float64, independently of JAX."""
  bits = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
  bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
  return bits.astype(np.uint32).view(np.float32).astype(np.float64)


def test_check_and_from_config():
  for name in precision.PRECISIONS:
    assert precision.check_precision(name) == name
  with pytest.raises(ValueError, match="bfloat16"):
    precision.check_precision("half")
  c = ml_collections.ConfigDict({"seed": 0})
  assert precision.precision_from_config(c) == "default"       # absent field: unchanged behaviour
  c.precision = "bfloat16"
  assert precision.precision_from_config(c) == "bfloat16"
  c.precision = "fp8"
  with pytest.raises(ValueError, match="unknown precision"):
    precision.precision_from_config(c)
  assert precision.operand_dtype("bfloat16") == jnp.bfloat16
  assert precision.operand_dtype("default") == jnp.float32


def test_dot_numerics():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(7, 33)).astype(np.float32)
  b = rng.normal(size=(33, 5)).astype(np.float32)
  exact = a.astype(np.float64) @ b.astype(np.float64)
  np.testing.assert_array_equal(np.asarray(precision.dot(a, b)), np.asarray(jnp.asarray(a) @ b))
  np.testing.assert_allclose(np.asarray(precision.dot(a, b, "float32")), exact, rtol=1e-5,
                             atol=1e-5)
  bf = np.asarray(precision.dot(a, b, "bfloat16"))
  assert bf.dtype == np.float32
  # bf16-rounded operands, products summed in (at least) float32.
  np.testing.assert_allclose(bf, _bf16_round(a) @ _bf16_round(b), rtol=1e-5, atol=1e-5)
  err = np.abs(bf - exact).max()
  assert 1e-4 < err < 0.1   # really rounded (8-bit mantissa), but still the product
  with pytest.raises(ValueError, match="precision"):
    precision.dot(a, b, "int8")


def test_scope_sets_and_restores_matmul_precision():
  before = jax.config.jax_default_matmul_precision
  with precision.precision_scope("float32"):
    assert jax.config.jax_default_matmul_precision == "float32"
  with precision.precision_scope("default"):
    assert jax.config.jax_default_matmul_precision == before
  assert jax.config.jax_default_matmul_precision == before


def test_denoiser_bfloat16_close_to_float32():
  from hsijax.sdp.denoiser import SpectralDenoiser, apply_with_input_grad, fold_time_condition
  B, H = 12, 64
  m32 = SpectralDenoiser(num_bands=B, hidden=H, precision="float32")
  m16 = SpectralDenoiser(num_bands=B, hidden=H, precision="bfloat16")
  params = jax.jit(m32.init)(jax.random.key(0), jnp.zeros((1, B)), 0)
  shapes16 = jax.eval_shape(m16.init, jax.random.key(0), jnp.zeros((1, B)), 0)
  # Same parameter tree (checkpoints are shared between precisions), float32 storage.
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(shapes16)
  assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(shapes16))
  x = jax.random.uniform(jax.random.key(1), (40, B))
  for t in (7, jnp.arange(40) * 20):
    a = np.asarray(jax.jit(m32.apply)(params, x, t))
    b = np.asarray(jax.jit(m16.apply)(params, x, t))
    rel = np.abs(a - b).max() / np.abs(a).max()
    assert 1e-5 < rel < 5e-2, rel
  # The solver's hand-written input gradient follows the policy too: it matches autodiff of
  # the bf16 module closely, and differs from float32 by bf16 rounding.
  cot = lambda out, e: 2.0 * out

  def grads(model):
    _, vjp = jax.vjp(lambda x: model.apply(params, x, 300), x)
    auto = vjp(2.0 * model.apply(params, x, 300))[0]
    _, mine = apply_with_input_grad(model, fold_time_condition(model, params, 300), x, cot,
                                    chunk=None)
    return auto, mine

  auto16, mine16 = map(np.asarray, jax.jit(lambda: grads(m16))())
  auto32, mine32 = map(np.asarray, jax.jit(lambda: grads(m32))())
  scale = np.abs(auto32).max()
  np.testing.assert_allclose(mine32, auto32, rtol=1e-4, atol=1e-5 * scale)
  assert np.abs(mine16 - auto16).max() < 3e-2 * scale
  assert 1e-5 * scale < np.abs(mine16 - mine32).max() < 5e-2 * scale
  with pytest.raises(ValueError, match="precision"):
    SpectralDenoiser(num_bands=B, hidden=H, precision="half").apply(params, x, 3)
