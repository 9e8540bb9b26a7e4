"""Conditional DDPM U-Net of SCDM (the SCDM paper, Sec. III): eps_theta(x_t, cond, t).

Layout (sizes are fields; the paper / authors' code values are the defaults):

  temb  = Dense(4b)(SiLU(Dense(4b)(sinusoidal_b(t))))                      (N, 4b)
  h_x   = Conv3x3(b)(x_t)        h_c = Conv3x3(b)(cond)     (separate first convs)
  encoder (ONE set of weights, run on both streams):
    level l = 0..L-1, channels b * mults[l]:
      num_res_down x ResBlock (+ self-attention when l in attn_levels)
      Conv3x3 stride 2 (not after the last level)
    skips: the first-conv output, every ResBlock output and every downsample output
  middle (noisy stream only): ResBlock, [attention], ResBlock
  decoder, level l = L-1..0: num_res_up x ResBlock(concat(h, skip_x, skip_c))
    (+ attention at attn_levels), then nearest-upsample x2 + Conv3x3 (not at level 0)
  out   = Conv3x3(C_out)(SiLU(GroupNorm(h)))

ResBlock(h) = attn?( Conv2(Dropout(SiLU(GN2(Conv1(SiLU(GN1(h))) + Dense(SiLU(temb))))))
                     + skip(h) ),  skip = 1x1 conv when the channel count changes.

The decoder pops one skip pair per ResBlock, so num_res_up must be num_res_down + 1
(as in DDPM and the authors' code: 2 down, 3 up).

Both encoder streams go through the encoder in ONE call on a (2N, ...) batch built by
interleaving (sample n's streams sit at rows 2n and 2n + 1). The encoder is per-sample
(GroupNorm, convolutions, attention within one image), so this equals two separate calls
with the same weights, uses larger matmuls, and keeps each sample's rows together so a batch
sharded over the mesh `data` axis stays local (no resharding, unlike concatenating the
two streams end to end).

ICMG needs eps(x_t | cond) and eps(x_t | 0). `with_uncond=True` computes both in one call:
the encoder runs on three streams per sample (x_t, cond, zeros) instead of four, the middle
blocks (noisy stream only) once, and only the decoder, which sees the condition skips, on
the (cond, zeros) pair. Same result as two calls; 9% fewer FLOPs for the paper U-Net's
guided step (124 -> 112 GFLOP at 64 x 64).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hsijax import diffusion
from hsijax import policy as policy_lib
from hsijax.kernels import cpu_conv
from hsijax.kernels.cpu_conv import TORCH_GROUPNORM_EPS, with_winograd_kernels  # noqa: F401


def group_count(channels: int, groups: int) -> int:
  """Largest number of groups <= `groups` that divides `channels` (so tiny configs work)."""
  g = max(1, min(int(groups), int(channels)))
  while channels % g:
    g -= 1
  return g


def _group_norm(channels: int, groups: int, name: str, impl: str) -> nn.Module:
  """GroupNorm with torch's epsilon: flax's, or the CPU kernel's (same params)."""
  g = group_count(channels, groups)
  if impl == "cpu":
    return cpu_conv.GroupNorm(g, name=name)
  return nn.GroupNorm(num_groups=g, epsilon=TORCH_GROUPNORM_EPS, name=name)


def interleave(*arrays: jax.Array) -> jax.Array:
  """k arrays (N, ...) -> (k N, ...), sample-major: arrays[j][n] at row k n + j."""
  k = len(arrays)
  return jnp.stack(arrays, axis=1).reshape((k * arrays[0].shape[0],) + arrays[0].shape[1:])


def deinterleave(ab: jax.Array, k: int = 2) -> tuple[jax.Array, ...]:
  """Inverse of `interleave` of k arrays: (k N, ...) -> k arrays (N, ...)."""
  rows = ab.reshape((ab.shape[0] // k, k) + ab.shape[1:])
  return tuple(rows[:, j] for j in range(k))


class Conv3x3(nn.Module):
  """3x3 convolution, padding 1 (SAME for stride 1), with nn.Conv's parameters.

  (N, H, W, C_in) -> (N, H / stride, W / stride, features), or with upsample=True
  conv(nearest_upsample_x2(x)) -> (N, 2H, 2W, features). Parameters "kernel" (3, 3, C_in,
  features) and "bias" (features,), initialised like nn.Conv. impl "xla": the native
  convolution; "cpu": the same function by `hsijax.kernels.cpu_conv.conv3x3`, which takes
  Winograd kernels from the params when `with_winograd_kernels` cached them there.
  """
  features: int
  strides: int = 1
  impl: str = "xla"
  upsample: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.impl not in policy_lib.CONV_IMPLS:
      raise ValueError(f"unknown conv impl {self.impl!r}; use one of {policy_lib.CONV_IMPLS}")
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (3, 3, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    if self.impl == "cpu":
      return cpu_conv.conv3x3(x, kernel, bias, strides=self.strides, upsample=self.upsample,
                              winograd=lambda: self._winograd_kernel(kernel))
    if self.upsample:
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    y = jax.lax.conv_general_dilated(x, kernel, (self.strides,) * 2, ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias

  def _winograd_kernel(self, kernel: jax.Array) -> jax.Array:
    """The transformed kernel from the params if cached there (the sampler), else now."""
    if self.has_variable("params", "winograd_kernel"):
      return self.get_variable("params", "winograd_kernel")
    u = cpu_conv.winograd_kernel(kernel)
    if self.is_mutable_collection("winograd") and not self.is_initializing():
      self.put_variable("winograd", "winograd_kernel", u)
    return u


class Conv1x1(nn.Module):
  """1x1 convolution with nn.Conv's parameters ("kernel" (1, 1, C_in, features), "bias");
  impl "cpu" computes it as one (N H W, C_in) x (C_in, features) matmul (2-2.5x faster on
  XLA:CPU than the 1x1 lax.conv)."""
  features: int
  impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (1, 1, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    if self.impl == "cpu":
      return cpu_conv.im2col_conv(x, kernel, bias, stride=1, pad=0)  # one tap: a matmul
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


class Attention(nn.Module):
  """Single-head self-attention over all pixels with a residual connection.

  (N, H, W, C) -> (N, H, W, C): GroupNorm, q/k/v by one 1x1 projection, softmax(q k^T /
  sqrt(C)) v, output 1x1 projection, plus the input.
  """
  groups: int = 32
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    n, height, width, c = h.shape
    x = _group_norm(c, self.groups, "norm", self.conv_impl)(h)
    qkv = nn.Dense(3 * c, name="qkv")(x).reshape(n, height * width, 3, c)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("nqc,nkc->nqk", q, k) * (c ** -0.5)
    out = jnp.einsum("nqk,nkc->nqc", jax.nn.softmax(logits, axis=-1), v)
    return h + nn.Dense(c, name="out")(out.reshape(n, height, width, c))


class ResBlock(nn.Module):
  """DDPM residual block; the time embedding is a per-channel bias after the first conv.

  (N, H, W, C_in), temb (N, E) -> (N, H, W, out_channels).
  """
  out_channels: int
  groups: int = 32
  dropout: float = 0.1
  attention: bool = False
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, h: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    c_in = h.shape[-1]
    x = nn.silu(_group_norm(c_in, self.groups, "norm1", self.conv_impl)(h))
    x = Conv3x3(self.out_channels, impl=self.conv_impl, name="conv1")(x)
    x = x + nn.Dense(self.out_channels, name="time")(nn.silu(temb))[:, None, None, :]
    x = nn.silu(_group_norm(self.out_channels, self.groups, "norm2", self.conv_impl)(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = Conv3x3(self.out_channels, impl=self.conv_impl, name="conv2")(x)
    skip = h if c_in == self.out_channels else \
        Conv1x1(self.out_channels, self.conv_impl, name="skip")(h)
    x = x + skip
    if self.attention:
      x = Attention(self.groups, self.conv_impl, name="attn")(x)
    return x


class Downsample(nn.Module):
  """3x3 convolution with stride 2 and padding 1 (torch's placement): (N, H, W, C) -> H/2."""
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    return Conv3x3(h.shape[-1], strides=2, impl=self.conv_impl, name="conv")(h)


class Upsample(nn.Module):
  """Nearest-neighbour x2 then a 3x3 convolution: (N, H, W, C) -> (N, 2H, 2W, C)."""
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    return Conv3x3(h.shape[-1], impl=self.conv_impl, upsample=True, name="conv")(h)


class Encoder(nn.Module):
  """The shared down path. (M, H, W, base), temb (M, E) -> list of skips (first = input)."""
  base: int
  channel_mults: Sequence[int]
  num_res_down: int
  attn_levels: Sequence[int]
  dropout: float
  groups: int
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, h: jax.Array, temb: jax.Array, train: bool) -> list[jax.Array]:
    skips = [h]
    last = len(self.channel_mults) - 1
    for level, mult in enumerate(self.channel_mults):
      for j in range(self.num_res_down):
        h = ResBlock(self.base * mult, self.groups, self.dropout, level in self.attn_levels,
                     self.conv_impl, name=f"level{level}_res{j}")(h, temb, train)
        skips.append(h)
      if level != last:
        h = Downsample(self.conv_impl, name=f"level{level}_down")(h)
        skips.append(h)
    return skips


class Middle(nn.Module):
  """ResBlock, optional attention, ResBlock at the lowest resolution (noisy stream only)."""
  groups: int
  dropout: float
  attention: bool
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, h: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    c = h.shape[-1]
    h = ResBlock(c, self.groups, self.dropout, self.attention, self.conv_impl,
                 name="res0")(h, temb, train)
    return ResBlock(c, self.groups, self.dropout, False, self.conv_impl,
                    name="res1")(h, temb, train)


class Decoder(nn.Module):
  """Up path: each ResBlock sees concat(h, noisy skip, condition skip), skips popped LIFO."""
  base: int
  channel_mults: Sequence[int]
  num_res_up: int
  attn_levels: Sequence[int]
  dropout: float
  groups: int
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, h: jax.Array, skips_x: list[jax.Array], skips_c: list[jax.Array],
               temb: jax.Array, train: bool) -> jax.Array:
    skips_x, skips_c = list(skips_x), list(skips_c)
    for level in reversed(range(len(self.channel_mults))):
      for j in range(self.num_res_up):
        h = jnp.concatenate([h, skips_x.pop(), skips_c.pop()], axis=-1)
        h = ResBlock(self.base * self.channel_mults[level], self.groups, self.dropout,
                     level in self.attn_levels, self.conv_impl,
                     name=f"level{level}_res{j}")(h, temb, train)
      if level != 0:
        h = Upsample(self.conv_impl, name=f"level{level}_up")(h)
    return h


class TimeEmbedding(nn.Module):
  """sinusoidal(dim) -> Dense(4 dim) -> SiLU -> Dense(4 dim): (N,) -> (N, 4 dim)."""
  dim: int

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    e = diffusion.timestep_embedding(t, self.dim)
    e = nn.Dense(4 * self.dim, name="dense0")(e)
    return nn.Dense(4 * self.dim, name="dense1")(nn.silu(e))


class CondUNet(nn.Module):
  """eps_theta(x_t | cond, t) with a condition branch sharing the encoder weights.

  Attributes:
    out_channels: C_out, bands generated by this stage (= channels of x_t and of eps).
    base: channels after the first conv (128); the time embedding has 4 * base.
    channel_mults: channel multiplier per resolution level; len = number of levels L.
    num_res_down: ResBlocks per level going down (2).
    num_res_up: ResBlocks per level going up (3); must be num_res_down + 1.
    attn_levels: level indices with self-attention after each ResBlock ((3,) as in the
      authors' code: 32 x 32 features for 256 x 256 crops; the paper text says 16 x 16).
    mid_attn: self-attention between the two middle ResBlocks.
    dropout: rate inside every ResBlock, used only with train=True (rng "dropout").
    groups: GroupNorm groups, lowered per layer to the largest divisor of its channels.
    policy: the platform policy (hsijax.policy; None = the running backend's). Its
      conv_impl picks native convolutions ("xla") or the CPU kernels of
      `hsijax.kernels.cpu_conv` ("cpu"); same parameters and function either way, outputs
      equal to float32 rounding.
  """
  out_channels: int
  base: int = 128
  channel_mults: Sequence[int] = (1, 2, 2, 2, 2, 2, 2)
  num_res_down: int = 2
  num_res_up: int = 3
  attn_levels: Sequence[int] = (3,)
  mid_attn: bool = True
  dropout: float = 0.1
  groups: int = 32
  policy: policy_lib.Policy | None = None

  @property
  def conv_impl(self) -> str:
    return policy_lib.resolve(self.policy).conv_impl

  def _check(self, x: jax.Array, cond: jax.Array, t: jax.Array) -> None:
    if self.num_res_up != self.num_res_down + 1:
      raise ValueError(
          f"num_res_up ({self.num_res_up}) must equal num_res_down + 1 "
          f"({self.num_res_down + 1}): each up ResBlock consumes one skip and each level "
          "leaves num_res_down + 1 of them. Set num_res_up = num_res_down + 1.")
    if not self.channel_mults:
      raise ValueError("channel_mults is empty; give at least one level, e.g. (1, 2).")
    if x.ndim != 4 or cond.ndim != 4:
      raise ValueError(f"x and cond must be NHWC (N, H, W, C), got shapes {x.shape} and "
                       f"{cond.shape}; add a batch axis with x[None].")
    if x.shape[:3] != cond.shape[:3]:
      raise ValueError(f"x {x.shape} and cond {cond.shape} must share (N, H, W); resize or "
                       "crop the condition to the target's spatial size.")
    if x.shape[-1] != self.out_channels:
      raise ValueError(f"x has {x.shape[-1]} channels but out_channels = "
                       f"{self.out_channels}; pass x_t with exactly the stage's bands.")
    factor = 2 ** (len(self.channel_mults) - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(
          f"H and W ({x.shape[1]}, {x.shape[2]}) must be divisible by {factor} "
          f"(2 ** (levels - 1) for {len(self.channel_mults)} levels); crop or pad the "
          "images, or use fewer channel_mults.")
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
      raise ValueError(f"t must be a scalar or shaped (N,) = ({x.shape[0]},), got "
                       f"{t.shape}.")

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array, t: Any, train: bool = False,
               with_uncond: bool = False) -> jax.Array:
    """Predicts the noise.

    Args:
      x: (N, H, W, out_channels) noisy sample x_t.
      cond: (N, H, W, C_cond) condition (RGB or the previous stage's bands; zeros for the
        unconditional prediction).
      t: (N,) or scalar integer timesteps (original timesteps in [0, T)).
      train: enables dropout (needs rngs={"dropout": key}).
      with_uncond: also predict eps(x_t | zeros) for ICMG. Returns (2N, H, W, out_channels),
        interleaved per sample (rows 2n, 2n + 1 = eps(x_t | cond), eps(x_t | 0)): the same
        as calling on (interleave(x, x), interleave(cond, 0), interleave(t, t)), but the
        noisy stream's encoder and the middle blocks, which do not see the condition, run
        once for both (3 encoder streams instead of 4).

    Returns:
      (N, H, W, out_channels) predicted eps ((2N, ...) with with_uncond).
    """
    t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],)) if jnp.ndim(t) == 0 else \
        jnp.asarray(t)
    self._check(x, cond, t)
    if with_uncond and train:
      raise ValueError("with_uncond=True is for sampling (train=False); for training with "
                       "condition dropout pass the zeroed conditions in the batch instead.")
    temb = TimeEmbedding(self.base, name="time_embed")(t)
    cond_in = Conv3x3(self.base, impl=self.conv_impl, name="cond_in")
    conds = [cond_in(cond)] + ([cond_in(jnp.zeros_like(cond))] if with_uncond else [])
    streams = [Conv3x3(self.base, impl=self.conv_impl, name="conv_in")(x)] + conds
    k = len(streams)
    encoder = Encoder(self.base, tuple(self.channel_mults), self.num_res_down,
                      tuple(self.attn_levels), self.dropout, self.groups, self.conv_impl,
                      name="encoder")
    skips = [deinterleave(s, k) for s in encoder(interleave(*streams), interleave(*[temb] * k),
                                                 train)]
    skips_x = [s[0] for s in skips]
    h = Middle(self.groups, self.dropout, self.mid_attn, self.conv_impl, name="middle")(
        skips_x[-1], temb, train)
    if with_uncond:  # the decoder sees the condition: run it on (cond, zeros) pairs
      h, temb = interleave(h, h), interleave(temb, temb)
      skips_x = [interleave(s, s) for s in skips_x]
      skips_c = [interleave(s[1], s[2]) for s in skips]
    else:
      skips_c = [s[1] for s in skips]
    h = Decoder(self.base, tuple(self.channel_mults), self.num_res_up,
                tuple(self.attn_levels), self.dropout, self.groups, self.conv_impl,
                name="decoder")(
                    h, skips_x, skips_c, temb, train)
    h = nn.silu(_group_norm(h.shape[-1], self.groups, "norm_out", self.conv_impl)(h))
    return Conv3x3(self.out_channels, impl=self.conv_impl, name="conv_out")(h)


_TRUNC_STD = 0.87962566103423978  # std of N(0, 1) truncated to [-2, 2] (flax's correction)


PARAM_INITS = ("flax", "torch")


def init_params(model: CondUNet, key: jax.Array, x_shape: Sequence[int],
                cond_shape: Sequence[int], scheme: str = "flax") -> dict:
  """The "params" collection with flax's (or PyTorch's) default initialisers, in ONE draw.

  Same structure and distributions as `model.init` (kernels lecun-normal truncated at 2
  std, biases 0, GroupNorm scales 1), but all kernels come from one uniform draw
  transformed to a truncated normal, instead of one threefry call per parameter. On CPU
  XLA compiles every threefry call separately (seconds each), so `model.init` of a U-Net
  takes minutes to compile while this takes one compile of a few ops.

  Args:
    model: the U-Net.
    key: PRNG key.
    x_shape: (N, H, W, out_channels) of an example input (any valid N, H, W gives the
      same parameters).
    cond_shape: (N, H, W, C_cond).
    scheme: "flax" (lecun-normal kernels, zero biases) or "torch" (PyTorch's nn.Linear /
      nn.Conv2d defaults, the authors' layers: kernels and biases uniform in
      +-1 / sqrt(fan_in), fan_in of the layer's kernel; kernels sqrt(3) smaller in std than
      flax's). GroupNorm scales are 1 and its biases 0 in both.

  Returns:
    params such that model.apply({"params": params}, x, cond, t) works (what
    TrainState.params holds and what the samplers take).
  """
  if scheme not in PARAM_INITS:
    raise ValueError(f"unknown parameter init {scheme!r}; use one of {PARAM_INITS}")
  abstract = jax.eval_shape(
      model.init, jax.random.key(0), jax.ShapeDtypeStruct(tuple(x_shape), jnp.float32),
      jax.ShapeDtypeStruct(tuple(cond_shape), jnp.float32),
      jax.ShapeDtypeStruct((x_shape[0],), jnp.int32))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  names = [str(getattr(path[-1], "key", path[-1])) for path, _ in leaves]
  unknown = sorted(set(names) - {"kernel", "bias", "scale"})
  if unknown:
    raise ValueError(f"init_params knows kernel/bias/scale leaves only, found {unknown}; "
                     "use model.init for this module")
  # A bias's fan_in is its layer's kernel's (the sibling leaf); GroupNorm biases have none.
  kernel_fan_in = {tuple(path[:-1]): int(np.prod(leaf.shape[:-1]))
                   for name, (path, leaf) in zip(names, leaves) if name == "kernel"}
  bias_fan_in = [kernel_fan_in.get(tuple(path[:-1])) if name == "bias" else None
                 for name, (path, _) in zip(names, leaves)]
  drawn = [name == "kernel" or (scheme == "torch" and fan is not None)
           for name, fan in zip(names, bias_fan_in)]
  sizes = [int(np.prod(leaf.shape)) if d else 0 for d, (_, leaf) in zip(drawn, leaves)]

  @jax.jit
  def build(key):
    if scheme == "torch":
      u = jax.random.uniform(key, (max(sum(sizes), 1),), jnp.float32, -1.0, 1.0)
      out, offset = [], 0
      for name, size, fan, (_, leaf) in zip(names, sizes, bias_fan_in, leaves):
        if size:
          fan_in = int(np.prod(leaf.shape[:-1])) if name == "kernel" else fan
          out.append(u[offset:offset + size].reshape(leaf.shape) / np.sqrt(fan_in))
          offset += size
        else:
          out.append((jnp.ones if name == "scale" else jnp.zeros)(leaf.shape, leaf.dtype))
      return out
    lo, hi = jax.scipy.special.erf(-2 / np.sqrt(2)), jax.scipy.special.erf(2 / np.sqrt(2))
    u = jax.random.uniform(key, (max(sum(sizes), 1),), jnp.float32, lo, hi)
    z = np.sqrt(2) * jax.scipy.special.erfinv(u)
    out, offset = [], 0
    for name, size, (_, leaf) in zip(names, sizes, leaves):
      if name == "kernel":
        fan_in = int(np.prod(leaf.shape[:-1]))
        std = 1.0 / np.sqrt(fan_in) / _TRUNC_STD
        out.append(z[offset:offset + size].reshape(leaf.shape) * std)
        offset += size
      elif name == "scale":
        out.append(jnp.ones(leaf.shape, leaf.dtype))
      else:
        out.append(jnp.zeros(leaf.shape, leaf.dtype))
    return out

  return jax.tree_util.tree_unflatten(treedef, build(key))["params"]


def count_params(params: Any) -> int:
  """Number of scalars in a parameter pytree."""
  return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))
