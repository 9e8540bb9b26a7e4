"""Per-pixel spectral denoiser eps_theta(x_t, t) of SDP (the SDP paper, Sec. III).

Architecture (the authors' code, 5 linear layers; the paper's table says L = 4):

  c   = Linear(B, B)(SiLU(Linear(64, B)(emb(t))))            emb: 64-d sinusoidal (cos | sin)
  h   = x
  for i in 0 .. L-2:                                          (layers 0-3 for L = 5)
    h = Linear_i(h)            if i == 0 else Linear_i(concat(h, x))
    s = Cond_i(SiLU(c))                                       (hidden,)
    h = dropout(SiLU(LayerNorm(h * (1 + s) + s)))
  out = Linear_{L-1}(concat(h, x))                            (N, B), nothing after

Speed-relevant choices (same function, same parameters as the concat form):
* For a scalar `t` (the solver: one timestep for all pixels) `c` and every `s_i` are
  vectors computed once and broadcast over the N pixels, never a per-pixel time MLP; the
  solver's hand-written forward + input gradient (`apply_with_input_grad`) goes further and
  folds the modulation and the LayerNorm centring into the kernels (`fold_time_condition`).
* `Linear(concat(h, x))` is computed as `h @ K[:hidden] + x @ K[hidden:]`, and the x parts
  of every skip layer (plus layer 0, whose only input is x) are one matmul
  `x @ [K_0 | K_1x | ... | K_{L-1}x]`, so the concatenation is never materialised and the
  backward pass w.r.t. x is also a single matmul (scalar t). Kernels are stored exactly as the
  torch `Linear(hidden + B, out)` weights (transposed), so checkpoints port 1:1.
* With per-pixel t (training) each layer is one dot of concat(h, x) with its whole kernel
  instead (`concat_dot`): there the backward of the fused form's slices cost more than
  fusing saved, and whole-kernel dots give whole-kernel gradients (measured, see __call__).
* Dropout (training) draws every layer's mask at once with `dropout_keep_mask`: for the tiny
  rate of the recipe (0.001) it samples the gaps between dropped units (geometric) instead of
  one random word per unit, ~1000x fewer random numbers for the same Bernoulli masks.
* `precision` (hsijax.policy) sets how every matmul runs ("bfloat16": bf16 operands,
  float32 accumulation; LayerNorm, SiLU and the parameters stay float32).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hsijax import diffusion
from hsijax import policy as policy_lib

# torch.nn.init.xavier_normal_: N(0, 2 / (fan_in + fan_out)), not truncated.
xavier_normal = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")
TORCH_LAYERNORM_EPS = 1e-5
# Pixels per block in `apply_with_input_grad` (activations of a block fit in L2 cache).
CHUNK_PIXELS = 512
# `dropout_keep_mask` samples gaps (geometric) when their count is below this fraction of the
# mask size (cheaper than one random word per unit), else one uint32 per unit.
_GAP_FRACTION = 1 / 16


def dropout_keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
  """Boolean keep-mask with i.i.d. Bernoulli(1 - rate) entries (dropout), one draw per call.

  Small rates: the positions of the dropped units in the flattened mask are the partial sums
  of i.i.d. Geometric(rate) gaps (exactly the Bernoulli process), so only
  G = M rate + 10 sqrt(M rate) + 10 uniforms are drawn for M units (P(G gaps do not reach
  the end) < 1e-20); gaps beyond the end are dropped by the scatter. Larger rates: one
  uint32 per unit, keep = bits >= round(rate 2^32). Which of the two is used depends only
  on (shape, rate), so the same key always gives the same mask.

  Args:
    key: PRNG key.  shape: mask shape, e.g. (layers, N, hidden).  rate: in [0, 1).

  Returns:
    bool array `shape`, True = keep.
  """
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
  m = int(np.prod(shape))
  if rate == 0.0 or m == 0:
    return jnp.ones(shape, bool)
  if m >= 2**30:
    raise ValueError(f"dropout mask of {m} units is too large (>= 2^30); use smaller batches")
  mean = m * rate
  g = int(np.ceil(mean + 10.0 * np.sqrt(mean) + 10.0))
  if g > m * _GAP_FRACTION:
    bits = jax.random.bits(key, shape, jnp.uint32)
    return bits >= jnp.uint32(min(round(rate * 2.0**32), 2**32 - 1))
  # Inverse CDF of the geometric law on {1, 2, ...}: 1 + floor(log(u) / log(1 - rate)).
  u = jax.random.uniform(key, (g,), jnp.float32, minval=jnp.finfo(jnp.float32).tiny,
                         maxval=1.0)
  gaps = jnp.minimum(jnp.floor(jnp.log(u) / np.log1p(-rate)), m).astype(jnp.int32) + 1
  # Saturating prefix sum (min(a + b, m) is associative for a, b >= 0): no int32 overflow.
  ends = jax.lax.associative_scan(lambda a, b: jnp.minimum(a + b, m), gaps)
  dropped = jnp.zeros((m,), bool).at[ends - 1].set(True, mode="drop")
  return ~dropped.reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def concat_dot(h: jax.Array, x: jax.Array, kernel: jax.Array,
               precision: str = "default") -> jax.Array:
  """concat(h, x) @ kernel for (N, H), (N, B), (H + B, out) -> (N, out).

  Same value and gradients as the plain expression, but the backward forms only the input
  gradients that are asked for, as dots with the kernel's two row blocks: autodiff of the
  concatenation computes one (N, H + B) input gradient and slices it, and in training
  nothing differentiates x (it is data), so B / (H + B) of that dot would be wasted. The
  kernel gradient stays one dot with the concatenated input.
  """
  return policy_lib.dot(jnp.concatenate([h, x], axis=-1), kernel, precision)


def _concat_dot_fwd(h, x, kernel, precision):
  # symbolic_zeros=True: the primals arrive as CustomVJPPrimal(value, perturbed). Whether x
  # needs a gradient is passed to the backward in the residuals' structure (None or ()).
  out = concat_dot(h.value, x.value, kernel.value, precision)
  flags = tuple(None if not a.perturbed else () for a in (h, x, kernel))
  return out, (h.value, x.value, kernel.value, flags)


def _concat_dot_bwd(precision, res, g):
  h, x, kernel, (want_h, want_x, want_k) = res
  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    return None, None, None
  n_h = h.shape[-1]
  d_h = None if want_h is None else policy_lib.dot(g, kernel[:n_h].T, precision)
  d_x = None if want_x is None else policy_lib.dot(g, kernel[n_h:].T, precision)
  d_kernel = None
  if want_k is not None:
    hx = jnp.concatenate([h, x], axis=-1)  # XLA CSEs it with the forward's
    d_kernel = policy_lib.dot(hx.reshape(-1, hx.shape[-1]).T,
                                 g.reshape(-1, g.shape[-1]), precision)
  return d_h, d_x, d_kernel


concat_dot.defvjp(_concat_dot_fwd, _concat_dot_bwd, symbolic_zeros=True)


class _Linear(nn.Module):
  """Holds one (in, out) kernel and (out,) bias; returns them (the caller does the matmul)."""
  features_in: int
  features_out: int

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", xavier_normal, (self.features_in, self.features_out))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features_out,))
    return kernel, bias


class SpectralDenoiser(nn.Module):
  """eps_theta for spectra: (N, B) noisy spectra and timesteps -> (N, B) predicted noise.

  Attributes:
    num_bands: B, spectral bands of input and output.
    hidden: width of the hidden layers (512).
    num_layers: number of main linear layers L (5 in the authors' code), >= 2.
    time_dim: sinusoidal embedding size (64).
    dropout: dropout rate after each hidden layer, active only with train=True.
    precision: matmul precision policy, a name in hsijax.policy.PRECISIONS ("default":
      the backend's default, float32 on CPU; "bfloat16": bf16 operands, f32 accumulation).
  """
  num_bands: int
  hidden: int = 512
  num_layers: int = 5
  time_dim: int = 64
  dropout: float = 0.001
  precision: str = "default"

  @nn.compact
  def __call__(self, x: jax.Array, t: Any, train: bool = False) -> jax.Array:
    """Predicts the noise.

    Args:
      x: (N, B) noisy spectra x_t.
      t: original timestep(s) in [0, T): an int scalar (shared by all pixels; the time
        condition is then computed once) or an (N,) array (one per pixel, training).
      train: enables dropout (needs the "dropout" rng).

    Returns:
      (N, B) predicted eps.
    """
    B, H, L = self.num_bands, self.hidden, self.num_layers
    if L < 2:
      raise ValueError(f"num_layers must be >= 2 (input and output layer), got {L}")
    if x.ndim != 2 or x.shape[-1] != B:
      raise ValueError(f"x must be (N, {B}) spectra, got shape {x.shape}; flatten images "
                       "with x.reshape(-1, num_bands)")
    t = jnp.asarray(t)
    if t.ndim not in (0, 1) or (t.ndim == 1 and t.shape[0] != x.shape[0]):
      raise ValueError(f"t must be a scalar or shaped ({x.shape[0]},), got {t.shape}")

    mm = lambda a, w: policy_lib.dot(a, w, self.precision)

    # Time condition: (B,) for scalar t, (N, B) for per-pixel t.
    emb = diffusion.timestep_embedding(t, self.time_dim)
    k, b = _Linear(self.time_dim, B, name="time_0")()
    c = nn.silu(mm(emb, k) + b)
    k, b = _Linear(B, B, name="time_1")()
    c = mm(c, k) + b
    act_c = nn.silu(c)

    # Main kernels, torch layout (in, out): layer 0 (B, H), skip layers (H + B, out).
    outs = [H] * (L - 1) + [B]
    layers = [_Linear(B if i == 0 else H + B, outs[i], name=f"layer_{i}")() for i in range(L)]
    conds = [_Linear(B, H, name=f"cond_{i}")() for i in range(L - 1)]

    if t.ndim == 0:
      # Shared timestep (solver, sampling): all x-facing parts in one matmul,
      # (N, B) @ (B, H + (L - 2) H + B), sliced per layer; s_i are (H,) vectors.
      x_kernel = jnp.concatenate([layers[0][0]] + [k[H:] for k, _ in layers[1:]], axis=1)
      x_proj = mm(x, x_kernel)
      offsets = np.concatenate([[0], np.cumsum(outs)])
      x_parts = [x_proj[:, offsets[i]:offsets[i + 1]] for i in range(L)]
    else:
      # Per-pixel timesteps (training): each layer is one dot of concat(h, x) with its
      # whole kernel, so the backward gives each kernel's gradient as one dot too (no
      # kernel slices, no pad + add of their cotangents): 3-6% faster per SDM train step
      # than split h / x dots (A/B, batch 512); `concat_dot` skips the unused x part of
      # the input gradient (-4% FLOPs, ~-2% time). Fusing the x parts of all layers into
      # one matmul instead was ~12% slower (the backward of its output slices dominates).
      x_parts = None

    rate = float(self.dropout)
    keep = None
    if train and rate > 0.0:  # every layer's mask from one draw
      keep = dropout_keep_mask(self.make_rng("dropout"), (L - 1, x.shape[0], H), rate)

    h = None
    for i in range(L):
      kernel, bias = layers[i]
      if x_parts is None:
        h = (mm(x, kernel) if i == 0 else concat_dot(h, x, kernel, self.precision)) + bias
      else:
        h = x_parts[i] + bias if i == 0 else mm(h, kernel[:H]) + x_parts[i] + bias
      if i == L - 1:
        break
      ck, cb = conds[i]
      s = mm(act_c, ck) + cb       # (H,) once for scalar t, else (N, H)
      h = h * (1.0 + s) + s
      h = nn.LayerNorm(epsilon=TORCH_LAYERNORM_EPS, name=f"norm_{i}")(h)
      h = nn.silu(h)
      if keep is not None:  # inverted dropout, as nn.Dropout / torch
        h = jnp.where(keep[i], h / (1.0 - rate), 0.0)
    return h


def time_condition(model: SpectralDenoiser, params: Any, t: Any) -> list[jax.Array]:
  """The (L - 1) modulation vectors s_i = Cond_i(SiLU(c(t))), each (hidden,), for scalar t."""
  p = params["params"]
  lin = lambda name, a: policy_lib.dot(a, p[name]["kernel"], model.precision) + p[name]["bias"]
  emb = diffusion.timestep_embedding(jnp.asarray(t), model.time_dim)
  act_c = nn.silu(lin("time_1", nn.silu(lin("time_0", emb))))
  return [lin(f"cond_{i}", act_c) for i in range(model.num_layers - 1)]


def fold_time_condition(model: SpectralDenoiser, params: Any, t: Any) -> dict[str, Any]:
  """The frozen network at one shared timestep t, with the time condition folded in.

  For a scalar t the hidden layer i computes LayerNorm(z (1 + s_i) + s_i) with
  z = h K_h + x K_x + b and (H,) vectors s_i. Both the modulation and the LayerNorm's mean
  subtraction are linear in z, so they fold into the kernels' columns: with
  M = diag(1 + s_i) and the centring projector P = I - 1 1^T / H,

    v = (z (1 + s_i) + s_i) P = h (K_h M P) + x (K_x M P) + (b M + s_i) P

  is the centred input of the LayerNorm, which is then only v / sqrt(mean(v^2) + eps) times
  its scale plus its bias. This saves the per-pixel passes of the modulation, the mean and
  the centring in the forward, and the mean(dnhat) term of the LayerNorm backward (the
  transposed kernel K M P applies P and M to the gradient). Computed once per timestep.

  Returns:
    {"x_kernel": (B, (L - 1) H + B) all layers' x-facing kernels side by side,
     "h_kernels": [(H, H)] * (L - 2) + [(H, B)], "biases": [(H,)] * (L - 1) + [(B,)],
     "norm_scale", "norm_bias": [(H,)] * (L - 1)}; the hidden layers folded as above.
  """
  p = params["params"]
  H, L = model.hidden, model.num_layers
  s = time_condition(model, params, t)
  x_kernels, h_kernels, biases = [], [], []
  for i in range(L):
    kernel, bias = p[f"layer_{i}"]["kernel"], p[f"layer_{i}"]["bias"]
    if i < L - 1:
      kernel = kernel * (1.0 + s[i])
      kernel = kernel - jnp.mean(kernel, axis=1, keepdims=True)
      bias = bias * (1.0 + s[i]) + s[i]
      bias = bias - jnp.mean(bias)
    x_kernels.append(kernel if i == 0 else kernel[H:])
    if i > 0:
      h_kernels.append(kernel[:H])
    biases.append(bias)
  return {"x_kernel": jnp.concatenate(x_kernels, axis=1), "h_kernels": h_kernels,
          "biases": biases,
          "norm_scale": [p[f"norm_{i}"]["scale"] for i in range(L - 1)],
          "norm_bias": [p[f"norm_{i}"]["bias"] for i in range(L - 1)]}


def apply_with_input_grad(model: SpectralDenoiser, folded: dict[str, Any], x: jax.Array,
                          cotangent_fn: Callable[[jax.Array, Any], jax.Array],
                          extra: jax.Array | None = None, *,
                          chunk: int | None = CHUNK_PIXELS) -> tuple[jax.Array, jax.Array]:
  """Forward pass and the gradient w.r.t. the INPUT only, written out by hand (eval mode).

  Equivalent to `out, vjp = jax.vjp(lambda x: model.apply(params, x, t), x);
  dx = vjp(cotangent_fn(out, extra))` for a scalar t, with
  `folded = fold_time_condition(model, params, t)`,
  but never forms weight gradients and keeps the backward to the minimum number of passes
  over the (N, hidden) activations: per hidden layer the forward keeps the normalised
  activations, 1 / std per pixel and SiLU'(.) times the LayerNorm scale; the backward is one
  reduction, one fused pass and one matmul, and the x-facing parts of all layers share one
  matmul (as in the forward). Used by the SDP solver, where the network is frozen.

  The pixels are processed in chunks of `chunk` rows by a sequential lax.map: the whole
  forward + backward of a chunk then stays in the CPU caches, which measured ~3x faster at
  4096 x 103 than one pass over all pixels in isolation, ~10% inside the solver (results are
  identical up to float rounding).

  Args:
    model: the module (for its sizes and precision).
    folded: `fold_time_condition(model, params, t)` for the shared timestep.
    x: (N, B) inputs.
    cotangent_fn: (out (n, B), extra (n, ...)) -> d loss / d out (n, B), applied per chunk
      (`extra` holds per-pixel data the cotangent needs, e.g. the target noise; it is
      chunked with x; with extra=None the function gets None).
    extra: optional (N, ...) array passed to cotangent_fn chunk by chunk.
    chunk: pixels per chunk (None or >= N: a single pass). N is padded (edge rows) to a
      multiple of it and the padding dropped.

  Returns:
    (out (N, B), d loss / d x (N, B)).
  """
  n = x.shape[0]
  if chunk is None or n <= chunk:
    return _apply_with_input_grad(model, folded, x, lambda out: cotangent_fn(out, extra))
  pad = -n % chunk
  padded = lambda a: jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1), mode="edge")
  xs = padded(x).reshape((-1, chunk) + x.shape[1:])
  es = None if extra is None else padded(extra).reshape((-1, chunk) + extra.shape[1:])

  def one(args):
    xc, ec = args
    return _apply_with_input_grad(model, folded, xc, lambda out: cotangent_fn(out, ec))

  out, dx = jax.lax.map(one, (xs, es))
  return out.reshape(-1, out.shape[-1])[:n], dx.reshape(-1, dx.shape[-1])[:n]


def _apply_with_input_grad(model, folded, x, cotangent_fn):
  """apply_with_input_grad on one block of pixels (no chunking)."""
  B, H, L = model.num_bands, model.hidden, model.num_layers
  mm = lambda a, w: policy_lib.dot(a, w, model.precision)
  x_proj = mm(x, folded["x_kernel"])
  offsets = np.concatenate([[0], np.cumsum([H] * (L - 1) + [B])])
  saved = []
  h = None
  for i in range(L):
    v = x_proj[:, offsets[i]:offsets[i + 1]] + folded["biases"][i]
    if i > 0:
      v = mm(h, folded["h_kernels"][i - 1]) + v
    if i == L - 1:
      out = v
      break
    # v is already centred (fold_time_condition): LayerNorm is v / rms(v) * scale + bias.
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(v), axis=-1, keepdims=True)
                         + TORCH_LAYERNORM_EPS)
    nhat = v * rstd
    scale = folded["norm_scale"][i]
    n = nhat * scale + folded["norm_bias"][i]
    sig = jax.nn.sigmoid(n)
    h = n * sig
    saved.append((nhat, rstd, sig * (1.0 + n * (1.0 - sig)) * scale))  # SiLU'(n) * scale
  dv = cotangent_fn(out)
  dvs = [dv]
  for i in range(L - 2, -1, -1):
    nhat, rstd, dsilu_scale = saved[i]
    dnh = mm(dv, folded["h_kernels"][i].T) * dsilu_scale
    # The centring's mean(dnh) term is applied by the transposed (centred) kernel.
    dv = rstd * (dnh - nhat * jnp.mean(dnh * nhat, axis=-1, keepdims=True))
    dvs.append(dv)
  dx = mm(jnp.concatenate(dvs[::-1], axis=1), folded["x_kernel"].T)
  return out, dx


def count_params(params: Any) -> int:
  """Total number of scalars in a parameter pytree."""
  return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))
