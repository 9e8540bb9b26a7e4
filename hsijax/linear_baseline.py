"""Per-pixel linear RGB -> HSI baseline: `x = rgb @ W + b`, fit by least squares in closed form.

This is the floor any learned spectral super-resolution method has to beat: each output band is
an affine function of the pixel's three input channels, fit on training pixels. The fit centres
and scales the inputs first (RGB channels are strongly correlated, and raw DN values are in the
thousands) and solves the centred problem with an SVD-based `lstsq`, which keeps float32
accurate where the normal equations would square the condition number.

    lin = linear_baseline.fit(rgb_train, hsi_train)     # (..., 3), (..., B) with the same "..."
    x = linear_baseline.apply(lin, rgb_test)           # (..., 3) -> (..., B)
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from hsijax import policy as policy_lib


class LinearMap(NamedTuple):
  """Affine spectral map: `x = inputs @ weight + bias`."""
  weight: jax.Array  # (C, B)
  bias: jax.Array    # (B,)


def _pixels(a, name: str) -> jax.Array:
  a = jnp.asarray(a, dtype=jnp.float32)
  if a.ndim < 1:
    raise ValueError(f"{name} must have a trailing channel axis, e.g. (H, W, C) or (P, C); "
                     f"got a scalar")
  return a.reshape(-1, a.shape[-1])


@policy_lib.float32_matmuls
def fit(inputs, targets, ridge: float = 0.0) -> LinearMap:
  """Least-squares affine map from input channels to target bands over all pixels.

  Args:
    inputs: (..., C) e.g. RGB images (H, W, 3) or (M, H, W, 3), or pixels (P, 3).
    targets: (..., B) with the same leading shape (the co-registered HSI).
    ridge: optional Tikhonov weight on the (standardised) weights; 0 = plain least squares.

  Returns:
    LinearMap with weight (C, B) and bias (B,) minimising sum ||inputs W + b - targets||^2
    (+ ridge * ||W_std||^2 when ridge > 0).

  Raises:
    ValueError: leading shapes differ, or there are fewer pixels than C + 1 unknowns.
  """
  if jnp.shape(inputs)[:-1] != jnp.shape(targets)[:-1]:
    raise ValueError(f"inputs {jnp.shape(inputs)} and targets {jnp.shape(targets)} must share "
                     "every axis but the last (pass co-registered images of the same size)")
  a, y = _pixels(inputs, "inputs"), _pixels(targets, "targets")
  p, c = a.shape
  if p < c + 1:
    raise ValueError(f"need at least {c + 1} pixels to fit {c} weights and a bias per band, got "
                     f"{p}; pass more training pixels")
  if ridge < 0:
    raise ValueError(f"ridge must be >= 0, got {ridge}")
  return _fit(a, y, jnp.float32(ridge))


@jax.jit
def _fit(a: jax.Array, y: jax.Array, ridge: jax.Array) -> LinearMap:
  a_mean, y_mean = a.mean(0), y.mean(0)
  # Standardise the inputs so a constant channel (std 0) cannot blow up the solve.
  a_std = a.std(0)
  a_std = jnp.where(a_std > 0, a_std, 1.0)
  a_c = (a - a_mean) / a_std
  y_c = y - y_mean
  c = a.shape[1]
  # Ridge as extra rows sqrt(ridge) * I -> 0, so one lstsq covers both cases.
  a_aug = jnp.concatenate([a_c, jnp.sqrt(ridge) * jnp.eye(c, dtype=a.dtype)], 0)
  y_aug = jnp.concatenate([y_c, jnp.zeros((c, y.shape[1]), y.dtype)], 0)
  w_std, *_ = jnp.linalg.lstsq(a_aug, y_aug)
  weight = w_std / a_std[:, None]
  bias = y_mean - a_mean @ weight
  return LinearMap(weight=weight, bias=bias)


@policy_lib.float32_matmuls
def apply(lin: LinearMap, inputs) -> jax.Array:
  """Applies the map to (..., C) inputs -> (..., B)."""
  inputs = jnp.asarray(inputs, dtype=jnp.float32)
  if inputs.shape[-1] != lin.weight.shape[0]:
    raise ValueError(f"inputs have {inputs.shape[-1]} channels but the map was fit on "
                     f"{lin.weight.shape[0]}; pass the same kind of image it was fit on")
  return inputs @ lin.weight + lin.bias
