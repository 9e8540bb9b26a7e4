"""CPU kernels of the SCDM U-Net, chosen by `Policy.conv_impl == "cpu"` (hsijax.policy).

Each computes exactly what the plain layer does (`lax.conv_general_dilated`, flax
`nn.GroupNorm`), only faster on XLA:CPU; the U-Net (`hsijax.scdm.unet`) reads as the paper's
and calls these only through the policy. On GPU / TPU the vendor convolutions already pick
fast algorithms, so the policy there keeps native convolutions.

  GroupNorm              statistics by a two-step reduction (per channel, then per group)
  im2col_conv            small maps: one matmul over the gathered taps
  upsample_conv          conv(nearest_upsample_x2(h)) by four 2x2 phase kernels
  winograd_conv          Winograd F(2x2, 3x3) for wide layers (`use_winograd`)
  with_winograd_kernels  the transformed kernels computed once per sampling chain
  conv3x3                the dispatch between them
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

TORCH_GROUPNORM_EPS = 1e-5


class GroupNorm(nn.Module):
  """GroupNorm of (N, ..., C) over all non-batch axes per group, with nn.GroupNorm's params.

  Parameters "scale" and "bias" (C,), so it is interchangeable with nn.GroupNorm. Same
  statistics (one pass, var = E[x^2] - E[x]^2 in float32, clipped at 0), reduced in two
  steps: per-channel sums over the spatial axes (a contiguous reduction that keeps the
  channel axis, ~1.5-2x faster on XLA:CPU than reducing over the (H, W, C / G) group
  directly), then per-group sums of those; the normalisation is one fused x * a + b.
  """
  num_groups: int
  epsilon: float = TORCH_GROUPNORM_EPS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, c = x.shape[0], x.shape[-1]
    g = self.num_groups
    scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
    axes = tuple(range(1, x.ndim - 1))
    count = float(np.prod(x.shape[1:-1])) * (c // g)
    mean = jnp.sum(x, axes).reshape(n, g, c // g).sum(-1) / count                # (N, G)
    mean_sq = jnp.sum(jnp.square(x), axes).reshape(n, g, c // g).sum(-1) / count
    inv = jax.lax.rsqrt(jnp.maximum(mean_sq - jnp.square(mean), 0.0) + self.epsilon)
    a = jnp.repeat(inv, c // g, axis=1) * scale                                 # (N, C)
    b = bias - jnp.repeat(mean, c // g, axis=1) * a
    shape = (n,) + (1,) * (x.ndim - 2) + (c,)
    return x * a.reshape(shape) + b.reshape(shape)



# Largest H * W of a map whose 3x3 convolutions run as im2col + one matmul (XLA:CPU takes a
# slow path for small-map convolutions; docs/benchmarks.md "SCDM U-Net conv").
SMALL_MAP_MAX_PIXELS = 64


def _conv_taps(size: int, out_size: int, stride: int, pad: int, k: int) -> tuple[int, int]:
  """[first, last) kernel taps along one axis that touch at least one real input pixel."""
  used = [i for i in range(k)
          if any(0 <= o * stride + i - pad < size for o in range(out_size))]
  return used[0], used[-1] + 1


def im2col_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int = 1,
                pad: int = 1) -> jax.Array:
  """Convolution as one matmul over gathered taps; equals lax.conv with padding `pad`.

  (N, H, W, C_in), kernel (k, k, C_in, C_out), bias (C_out,) -> (N, H', W', C_out) with
  H' = (H + 2 pad - k) // stride + 1. Taps that only ever see padding are dropped (on a
  1 x 1 map only the centre tap is left), so the matmul is (N H' W', taps C_in) x
  (taps C_in, C_out).
  """
  n, h, w, cin = x.shape
  k = kernel.shape[0]
  ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
  i0, i1 = _conv_taps(h, ho, stride, pad, k)
  j0, j1 = _conv_taps(w, wo, stride, pad, k)
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  cols = [xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
          for i in range(i0, i1) for j in range(j0, j1)]
  cols = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
  taps = kernel[i0:i1, j0:j1].reshape(-1, kernel.shape[-1])
  return (cols.reshape(n * ho * wo, -1) @ taps).reshape(n, ho, wo, -1) + bias


def _upsample_taps(kernel: jax.Array) -> jax.Array:
  """3x3 kernel -> the four 2x2 kernels of a nearest-x2-upsample-then-conv, (2, 2, C_in, 4 C_out).

  Along one axis, output pixel 2i + a of conv(upsample(h)) reads h[i - 1], h[i], h[i] for
  a = 0 and h[i], h[i], h[i + 1] for a = 1: taps (k0, k1 + k2) at offsets (-1, 0), or
  (k0 + k1, k2) at offsets (0, +1). Output channels are ordered (a, b, C_out).
  """
  def phases(k, axis):  # the two 2-tap combinations of a 3-tap axis
    k0, k1, k2 = (jnp.take(k, i, axis=axis) for i in range(3))
    return (jnp.stack([k0, k1 + k2], axis=axis), jnp.stack([k0 + k1, k2], axis=axis))
  per_phase = [kb for ka in phases(kernel, 0) for kb in phases(ka, 1)]
  cin, cout = kernel.shape[2:]
  return jnp.stack(per_phase, axis=3).reshape(2, 2, cin, 4 * cout)


def upsample_conv(h: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """conv3x3(nearest_upsample_x2(h)), padding 1, without building the upsampled map.

  (N, H, W, C_in) -> (N, 2H, 2W, C_out). Each of the four output phases (a, b) is a 2x2
  convolution of h (4 instead of 9 taps, ~2.2x fewer FLOPs): one 2x2 convolution with
  4 C_out channels at the (H + 1) x (W + 1) corner positions of the padded h, then pixel
  (2i + a, 2j + b) takes phase (a, b) at corner (i + a, j + b).
  """
  n, height, width, _ = h.shape
  cout = kernel.shape[-1]
  z = jax.lax.conv_general_dilated(h, _upsample_taps(kernel), (1, 1), ((1, 1), (1, 1)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  z = z.reshape(n, height + 1, width + 1, 2, 2, cout)
  rows = [jnp.stack([z[:, a:a + height, b:b + width, a, b] for b in range(2)], axis=3)
          for a in range(2)]  # each (N, H, W, 2 (b), C_out)
  return jnp.stack(rows, axis=2).reshape(n, 2 * height, 2 * width, cout) + bias


# Winograd F(2x2, 3x3): Y = A^T [(G k G^T) * (B^T d B)] A per 4 x 4 input tile d and 2 x 2
# output tile (Lavin & Gray 2016): 16 instead of 36 multiplications per output tile.
def _wino_g(k0, k1, k2):
  """The four rows of G k for k = (k0, k1, k2) along one axis."""
  return k0, 0.5 * (k0 + k1 + k2), 0.5 * (k0 - k1 + k2), k2


def winograd_kernel(kernel: jax.Array) -> jax.Array:
  """(3, 3, C_in, C_out) -> the 16 transformed kernels G k G^T, (16, C_in, C_out).

  Written as adds of kernel slices (one elementwise pass): as an einsum XLA makes it a
  (9 C_in C_out / 3, 3) x (3, 4) matmul plus transposes, ~10x slower.
  """
  rows = _wino_g(*(kernel[a] for a in range(3)))                   # each (3, C_in, C_out)
  return jnp.stack([c for r in rows for c in _wino_g(*(r[b] for b in range(3)))])


def _wino_bt(d0, d1, d2, d3):
  """The four rows of B^T d for d = (d0, d1, d2, d3) along one axis."""
  return d0 - d2, d1 + d2, d2 - d1, d1 - d3


def winograd_conv(x: jax.Array, u: jax.Array, bias: jax.Array) -> jax.Array:
  """3x3 convolution, stride 1, padding 1, by Winograd F(2x2, 3x3); equals lax.conv.

  (N, H, W, C_in) with even H, W, u = winograd_kernel(kernel) (16, C_in, C_out), bias
  (C_out,) -> (N, H, W, C_out). The input is cut into (H/2)(W/2) overlapping 4 x 4 tiles, each
  transformed to 16 components (adds only), multiplied by the 16 transformed kernels as 16
  (N H W / 4, C_in) x (C_in, C_out) matmuls, and transformed back to 2 x 2 outputs: 2.25x
  fewer multiplications than the direct convolution, for 4x the input's size in
  transformed tiles. Float32 error ~1e-6 relative (the transforms have entries 0, +-1/2, +-1).
  """
  n, h, w, cin = x.shape
  if h % 2 or w % 2:
    raise ValueError(f"winograd_conv needs even H and W, got {(h, w)}")
  # Materialised once: fused into the 16 slices below, the producer (GroupNorm + SiLU)
  # would be recomputed for every tile component.
  xp = jax.lax.optimization_barrier(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))))
  rows = _wino_bt(*(xp[:, a:a + h:2] for a in range(4)))            # (N, H/2, W+2, C_in)
  parts = [c for r in rows for c in _wino_bt(*(r[:, :, b:b + w:2] for b in range(4)))]
  v = jnp.stack(parts).reshape(16, -1, cin)                         # (16, N H W / 4, C_in)
  m = jnp.einsum("ktc,kcd->ktd", v, u).reshape(4, 4, n, h // 2, w // 2, -1)
  # A^T m A with A^T = [[1, 1, 1, 0], [0, 1, -1, -1]], first along the tile rows.
  p = (m[0] + m[1] + m[2], m[1] - m[2] - m[3])
  y = jnp.stack([jnp.stack([q[0] + q[1] + q[2], q[1] - q[2] - q[3]], axis=3) for q in p],
                axis=2)                                             # (N, H/2, 2, W/2, 2, C)
  return y.reshape(n, h, w, -1) + bias


def use_winograd(shape: Sequence[int], features: int) -> bool:
  """Whether a stride-1 3x3 convolution of an (N, H, W, C_in) input with `features`
  outputs runs by `winograd_conv`: 256+ output channels on maps larger than the im2col ones
  and up to 128 x 128, where it measured faster than XLA:CPU's convolution; not for 128
  channels or 256 x 256 maps (the transformed tiles leave the caches). Timings:
  docs/benchmarks.md, session 4.
  """
  _, h, w, _ = shape
  return (features >= 256 and h % 2 == 0 and w % 2 == 0 and
          SMALL_MAP_MAX_PIXELS < h * w <= 128 * 128)


def conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array, *, strides: int = 1,
            upsample: bool = False, winograd: Callable[[], jax.Array] | None = None
            ) -> jax.Array:
  """conv3x3 (padding 1, optionally of the nearest x2 upsample of x) the fast way on CPU.

  Same function as `lax.conv_general_dilated` on the (upsampled) input: maps with
  H * W <= SMALL_MAP_MAX_PIXELS (after upsampling) by `im2col_conv`, larger upsampling
  convolutions by `upsample_conv`, wide stride-1 layers (`use_winograd`) by `winograd_conv`
  with the transformed kernel from `winograd()` (the caller may cache it), the rest by
  lax.conv.
  """
  scale = 2 if upsample else 1
  small = x.shape[1] * x.shape[2] * scale ** 2 <= SMALL_MAP_MAX_PIXELS
  if upsample and not small:
    return upsample_conv(x, kernel, bias)
  if upsample:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  if small:
    return im2col_conv(x, kernel, bias, strides)
  if strides == 1 and use_winograd(x.shape, kernel.shape[-1]):
    return winograd_conv(x, winograd() if winograd else winograd_kernel(kernel), bias)
  y = jax.lax.conv_general_dilated(x, kernel, (strides,) * 2, ((1, 1), (1, 1)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + bias



def with_winograd_kernels(model: CondUNet, params: Any, x_shape: Sequence[int],
                          cond_shape: Sequence[int]) -> dict:
  """`params` plus, next to each "kernel" that runs by Winograd at these input shapes, its
  transformed "winograd_kernel" (16, C_in, C_out).

  For loops that call the model many times with the same parameters (the sampler): the
  transform then runs once instead of at every call (XLA does not hoist it out of a scan,
  its output is 16/9 the kernel's size). The result is only for `model.apply`; save the
  original params. Which convolutions use Winograd is found by an abstract forward
  (`jax.eval_shape`), so only the kernel transforms are traced. Same outputs as `params`.
  """
  probe = lambda shape: jnp.zeros(tuple(shape), jnp.float32)  # model: a CondUNet
  _, state = jax.eval_shape(
      lambda p: model.apply({"params": p}, probe(x_shape), probe(cond_shape),
                            jnp.zeros((x_shape[0],), jnp.int32), mutable=["winograd"]),
      params)

  def add(p, marks):
    out = dict(p)
    for k, v in marks.items():
      out[k] = winograd_kernel(p["kernel"]) if k == "winograd_kernel" else add(p[k], v)
    return out
  return add(params, state.get("winograd", {}))
