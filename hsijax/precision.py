"""Matmul precision policies (config field `precision`), one name for every platform.

  "default"        the backend's default: full float32 on CPU, TF32 on recent NVIDIA GPUs,
                   one bfloat16 pass on TPU. The library default (unchanged behaviour).
  "float32"        full float32 matmuls everywhere (`lax.Precision.HIGHEST`): the reference.
  "tensorfloat32"  TF32 / 3-pass bfloat16 where the hardware has it (`Precision.HIGH`); no
                   effect on CPU.
  "bfloat16"       matmul operands rounded to bfloat16, products accumulated in float32
                   (`preferred_element_type=float32`); everything else (LayerNorm, SiLU,
                   losses, optimiser state, parameters) stays float32. Same numerics on every
                   platform (it is what a TPU does by default), and on CPUs with AVX512-BF16
                   the dots can run on the bfloat16 units.

Models written in this repository call `dot(a, b, precision)` for their matmuls (the SDP
denoiser does); for third-party modules, `scope(precision)` sets
`jax.default_matmul_precision` while tracing (it cannot change operand dtypes, so there
"bfloat16" only has an effect on accelerators).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import jax
import jax.numpy as jnp

PRECISIONS = ("default", "float32", "tensorfloat32", "bfloat16")

# Name -> lax.Precision for jnp.matmul (None = backend default). "bfloat16" casts operands.
_LAX = {"default": None, "float32": jax.lax.Precision.HIGHEST,
        "tensorfloat32": jax.lax.Precision.HIGH, "bfloat16": None}
# Name -> jax.default_matmul_precision value for `scope` (None = leave the default alone).
_SCOPE = {"default": None, "float32": "float32", "tensorfloat32": "tensorfloat32",
          "bfloat16": "bfloat16"}


def check(precision: str) -> str:
  """Returns `precision` if it is a known policy, else raises ValueError naming the choices."""
  if precision not in PRECISIONS:
    raise ValueError(f"unknown precision {precision!r}; use one of {PRECISIONS} "
                     "(e.g. --config.precision=bfloat16)")
  return precision


def operand_dtype(precision: str) -> jnp.dtype:
  """dtype the matmul operands are rounded to under `precision` (float32 or bfloat16)."""
  return jnp.dtype(jnp.bfloat16 if check(precision) == "bfloat16" else jnp.float32)


def dot(a: jax.Array, b: jax.Array, precision: str = "default") -> jax.Array:
  """a @ b (matmul semantics) under a precision policy; the result is float32.

  Args:
    a: (..., k) array.  b: (k, m) or (k,) array.  precision: a name in PRECISIONS.
  """
  if check(precision) == "bfloat16":
    return jnp.matmul(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                      preferred_element_type=jnp.float32)
  return jnp.matmul(a, b, precision=_LAX[precision])


@contextlib.contextmanager
def scope(precision: str) -> Iterator[None]:
  """`jax.default_matmul_precision` for the policy while tracing (no-op for "default")."""
  value = _SCOPE[check(precision)]
  if value is None:
    yield
  else:
    with jax.default_matmul_precision(value):
      yield


def from_config(config) -> str:
  """config.precision (top level) if present, else "default"; validated."""
  value = config.get("precision", None) if hasattr(config, "get") else None
  return check(value or "default")


def float32_matmuls(fn):
  """Decorator: `fn` traces and runs with float32 (HIGHEST) matmuls on every backend.

  For reference numerics (classical methods, the linear baseline): TF32 on a GPU or one bf16
  pass on a TPU would otherwise change their published numbers.
  """
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.default_matmul_precision("float32"):
      return fn(*args, **kwargs)
  return wrapped
