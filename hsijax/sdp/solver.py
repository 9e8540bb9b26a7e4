"""SDP fusion solver: Algorithm 1 of the paper as one jitted program.

X (H, W, B) is the optimisation variable. For every schedule position i = n-1, ..., 0 and
K inner steps:

  eps ~ N(0, I) per pixel                            (from fold_in(fold_in(key, i), k))
  x_t  = sqrt(abar_i) X + sqrt(1 - abar_i) eps
  loss = lam * sum((blur_down(X) - Y)^2) + sum((R X - Z)^2)
         + gam * sum((eps_theta(x_t, t_i) - eps)^2)
  g    = d loss / d X + weight_decay * X             (torch Adam's L2 term)
  X    = clip(Adam(X, g), 0, 1);   X_ema = ema_decay * X_ema + (1 - ema_decay) X

The gradient reaches X through the data terms and through x_t; the network is frozen (the
loss is differentiated w.r.t. X only, so no weight gradients are ever computed). For speed the
prior's input gradient uses the hand-written backward `denoiser.apply_with_input_grad`
(`fusion_grad`; equal to jax.grad(fusion_loss), which the tests check) and the time condition
is folded into the network's kernels once per timestep and shared by the K inner steps. One Adam
state persists over the whole loop, so its bias-correction count runs over all n * K steps.
The output is X_ema. gam = 0 is the paper's "Baseline" (the network is never evaluated).

Outer loop: lax.scan over positions (with a progress tick); inner: lax.scan over K. The whole
solve is one jax.jit; batches of scenes / tiles are `jax.vmap(solve, in_axes=(None, 0, 0,
None, None, 0))` (or `make_batched_solver`).

Noise (`noise=`): "scene" (default) draws eps for the whole (H, W, B) X at once from
fold_in(fold_in(key, i), k). "position" keys every pixel by its global position instead:
eps[r, c] = normal(fold_in(fold_in(step_key, row0 + r), col0 + c), (B,)), where (row0, col0)
is the `offset` of X inside a larger scene. A window's noise is then exactly the slice of the
scene's noise field, which is what lets tiled solves (`hsijax.sdp.tiled`) reproduce the
untiled one. It costs two extra threefry hashes per pixel (about 13% of a draw; slicing
one scene-wide draw instead would hold the whole scene's noise in memory; docs/scaling.md). Every other part of a step is per pixel (Adam, clamp, EMA, weight
decay) or a sum over pixels (the loss; no means, so a window's per-pixel gradient equals the
scene's wherever the PSF footprint lies inside the window).

Respaced runs (n < T outer steps, `diffusion.make_respaced_schedule`): by default the Adam
learning rate is multiplied by T / n (`lr_scale=None`), which keeps the total distance X can
travel (~ n K lr) equal to the full run's, and X still starts at ones: unscaled respacing from
ones never reaches the data. Keep n >= 50 (or raise K instead of lr); the measurements behind
the rule are in docs/sdp_results.md ("Respaced solver steps").

Warm start (beyond the paper; `init="classical"`, `start` < 1): X starts from the mean of the
two classical fusions (subspace least squares and detail injection, `hsijax.classical`), which
already honour both images, and the loop visits only the last `start` fraction of the
positions (the smallest t), where the prior corrects spectra instead of building the image
from ones. On every shared real crop this beat both the paper's cold start at the same budget
and every classical method, in a fifth of the solver steps (docs/sdp_results.md).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from hsijax import classical, degrade, diffusion, progress, sharding
from hsijax import policy as policy_lib
from hsijax.sdp import denoiser
from hsijax.sdp.denoiser import SpectralDenoiser

INITS = ("ones", "upsample", "classical")
NOISES = ("scene", "position")


def fusion_loss(X: jax.Array, params: Any, y: jax.Array, z: jax.Array, psf: jax.Array,
                srf: jax.Array, eps: jax.Array, i: jax.Array, *, model: SpectralDenoiser,
                schedule: diffusion.Schedule, lam: float, gam: float, ratio: int,
                blur_method: str = "matmul") -> jax.Array:
  """The SDP objective at schedule position `i` (sums, not means).

  Args:
    X: (H, W, B) current estimate.
    params: frozen denoiser variables.
    y: (H / ratio, W / ratio, B) LR-HSI.  z: (H, W, b) HR-MSI.
    psf: (k, k).  srf: (b, B).
    eps: (H, W, B) the noise of this inner step.
    i: scalar schedule position (the network sees schedule.timesteps[i]).

  Returns:
    Scalar loss.
  """
  B = X.shape[-1]
  loss = _data_terms(X, y, z, psf, srf, lam, ratio, blur_method)
  if _is_zero(gam):
    return loss  # Baseline: the prior term (and the network) drops out entirely.
  x_t = diffusion.q_sample(schedule, X, i, eps)
  pred = model.apply(params, x_t.reshape(-1, B), schedule.timesteps[i])
  return loss + gam * jnp.sum((pred - eps.reshape(-1, B)) ** 2)


def _is_zero(gam: Any) -> bool:
  """True for a concrete zero weight (Python or NumPy scalar); False for tracers."""
  if isinstance(gam, jax.core.Tracer):
    return False
  return np.ndim(gam) == 0 and float(gam) == 0.0


def _data_terms(X, y, z, psf, srf, lam, ratio, blur_method="matmul"):
  return lam * jnp.sum((degrade.blur_down(X, psf, ratio, method=blur_method) - y) ** 2) + \
      jnp.sum((degrade.spectral_response(X, srf) - z) ** 2)


def fusion_grad(X: jax.Array, params: Any, y: jax.Array, z: jax.Array, psf: jax.Array,
                srf: jax.Array, eps: jax.Array, i: jax.Array, *, model: SpectralDenoiser,
                schedule: diffusion.Schedule, lam: float, gam: float, ratio: int,
                folded: dict[str, Any] | None = None, blur_method: str = "matmul",
                chunk: int | None = denoiser.CHUNK_PIXELS) -> jax.Array:
  """d fusion_loss / d X (same arguments), computed the fast way.

  The data terms go through jax.grad (cheap). The prior term's gradient is
  gam * sqrt(abar_i) * J^T 2 (eps_theta(x_t) - eps), with J^T applied by the hand-written
  input-only backward of `denoiser.apply_with_input_grad` (no weight gradients, fewest passes
  over the activations). `folded` (`denoiser.fold_time_condition` of position i) may be passed
  in when it is shared by several inner steps; `chunk` pixels per block of the input gradient
  (None: all at once). Models other than SpectralDenoiser fall back to jax.grad(fusion_loss).
  """
  if not isinstance(model, SpectralDenoiser):
    return jax.grad(fusion_loss)(X, params, y, z, psf, srf, eps, i, model=model,
                                 schedule=schedule, lam=lam, gam=gam, ratio=ratio,
                                 blur_method=blur_method)
  g = jax.grad(_data_terms)(X, y, z, psf, srf, lam, ratio, blur_method)
  if _is_zero(gam):
    return g
  B = X.shape[-1]
  if folded is None:
    folded = denoiser.fold_time_condition(model, params, schedule.timesteps[i])
  x_t = diffusion.q_sample(schedule, X, i, eps)
  _, d_xt = denoiser.apply_with_input_grad(model, folded, x_t.reshape(-1, B),
                                           lambda out, e: (2.0 * gam) * (out - e),
                                           eps.reshape(-1, B), chunk=chunk)
  return g + schedule.sqrt_alphas_cumprod[i] * d_xt.reshape(X.shape)


def initial_x(y: jax.Array, shape: tuple[int, int, int], init: str, ratio: int,
              z: jax.Array | None = None, psf: jax.Array | None = None,
              srf: jax.Array | None = None) -> jax.Array:
  """X at the start, (H, W, B) in [0, 1].

  "ones": the paper. "upsample": the LR-HSI upsampled. "classical": the mean of the two
  classical fusions `hsijax.classical.subspace_ls` and `detail_injection` (needs z, psf,
  srf); the prior then refines an estimate that already honours both images, instead of
  building it from ones (see the module docstring, "Warm start").
  """
  if init == "ones":
    return jnp.ones(shape, jnp.float32)
  if init == "upsample":
    return jnp.clip(degrade.upsample(y, ratio), 0.0, 1.0).astype(jnp.float32)
  if init == "classical":
    if z is None or psf is None or srf is None:
      raise ValueError('init="classical" needs z, psf and srf')
    sls = classical.run_method("subspace_ls", y, z, psf, srf, ratio)
    di = classical.run_method("detail_injection", y, z, psf, srf, ratio)
    return (0.5 * (sls + di)).astype(jnp.float32)
  raise ValueError(f"unknown init {init!r}; use one of {INITS}")


def position_noise(key: jax.Array, offset: jax.Array, shape: tuple[int, int, int]
                   ) -> jax.Array:
  """(h, w, B) standard normals keyed by global pixel position.

  Pixel (r, c) of the window whose top-left corner is `offset` = (row0, col0) in the scene
  gets normal(fold_in(fold_in(key, row0 + r), col0 + c), (B,)): the same values whichever
  window (or the whole scene, offset (0, 0)) it is drawn in.
  """
  h, w, B = shape
  offset = jnp.asarray(offset, jnp.int32)
  rows = offset[0] + jnp.arange(h, dtype=jnp.int32)
  cols = offset[1] + jnp.arange(w, dtype=jnp.int32)
  row_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(rows)                    # (h,)
  pix_keys = jax.vmap(lambda k: jax.vmap(lambda c: jax.random.fold_in(k, c))(cols))(row_keys)
  return jax.vmap(jax.vmap(lambda k: jax.random.normal(k, (B,), jnp.float32)))(pix_keys)


def _check_shapes(y, z, psf, srf, ratio: int, num_bands: int | None) -> None:
  if y.ndim != 3 or z.ndim != 3:
    raise ValueError(f"y must be (h, w, B) and z (H, W, b); got {y.shape} and {z.shape}")
  h, w, B = y.shape
  H, W, b = z.shape
  if (H, W) != (h * ratio, w * ratio):
    raise ValueError(f"z is {H} x {W} but y is {h} x {w} with ratio {ratio}; the HR-MSI must "
                     f"be exactly ratio times the LR-HSI ({h * ratio} x {w * ratio})")
  if srf.shape != (b, B):
    raise ValueError(f"srf must be (b, B) = ({b}, {B}), got {srf.shape}")
  if psf.ndim != 2 or psf.shape[0] != psf.shape[1] or psf.shape[0] % 2 == 0:
    raise ValueError(f"psf must be a square (k, k) kernel with odd k, got {psf.shape}")
  if num_bands is not None and num_bands != B:
    raise ValueError(f"the denoiser was built for {num_bands} bands but y has {B}; train "
                     "the spectral model on pixels of this sensor")


def respaced_lr_scale(schedule: diffusion.Schedule) -> float:
  """T / n for a schedule of n positions respaced from T original steps (1.0 if not respaced).

  T is read as timesteps[-1] + 1 (respaced subsets always keep T - 1).
  """
  ts = np.asarray(schedule.timesteps)
  return float(int(ts[-1]) + 1) / float(ts.shape[0])


def run_positions(num_steps: int, start: float = 1.0) -> int:
  """How many of a schedule's `num_steps` positions a solve with `start` visits."""
  return max(1, min(int(num_steps), int(round(float(start) * int(num_steps)))))


def make_solver(model: SpectralDenoiser, schedule: diffusion.Schedule, *, lam: float,
                gam: float, lr: float, K: int = 3, weight_decay: float = 1e-6,
                ema_decay: float = 0.9, init: str = "ones", ratio: int,
                lr_scale: float | None = None, betas: tuple[float, float] = (0.9, 0.999),
                adam_eps: float = 1e-8, noise: str = "scene", start: float = 1.0,
                policy: policy_lib.Policy | None = None,
                mesh: jax.sharding.Mesh | None = None) -> Callable[..., jax.Array]:
  """Builds the jitted SDP solve.

  Args:
    model: the spectral denoiser (its params are an argument of `solve`).
    schedule: full or respaced schedule; the outer loop visits positions n-1 .. 0.
    lam, gam: weights of the LR-HSI fidelity and of the diffusion prior (gam = 0: Baseline).
    lr: Adam learning rate on X for the full T-step schedule (paper: 1e-3 PaviaU / KSC,
      2.5e-3 DC, 8e-3 real data); the rate used is lr * lr_scale.
    K: Adam steps per timestep.
    weight_decay: torch-style L2 added to the gradient.
    ema_decay: EMA of X (the output).
    init: "ones" (the paper), "upsample" or "classical" (warm start, see `initial_x`).
    ratio: spatial ratio between z and y.
    lr_scale: multiplier of lr; None = `respaced_lr_scale(schedule)` (T / n: 1 for the full
      schedule, the measured best choice for respaced ones, see the module docstring).
    betas, adam_eps: Adam constants (torch defaults).
    noise: "scene" (one draw for the whole X per inner step) or "position" (each pixel's
      noise keyed by its global position `offset + (r, c)`, so windows of a scene see the
      slices of one scene-wide noise field; see the module docstring).
    start: fraction of the n positions visited: the last max(1, round(start n)) of them,
      the smallest t (1.0 = all, the paper). Below 1 pairs with a warm start
      (init="classical"): the prior refines the estimate at low noise levels only.
    policy: platform choices (hsijax.policy; None = the running backend's): the blur
      method of the data terms, pixels per block of the prior gradient (`pixel_chunk`, or
      all pixels unless a memory estimate says otherwise), the progress interval, and
      whether the rows of X are sharded over the devices (`shard_pixels`, with `mesh`).
    mesh: with policy.shard_pixels, the rows of y, z and X are split over its `data` axis
      (every per-pixel step runs on its devices' rows; the blur's borders and the sums are
      exchanged by XLA). The image heights must then be multiples of the axis size.

  Returns:
    solve(params, y (h, w, B), z (H, W, b), psf (k, k), srf (b, B), key, offset=None)
    -> X (H, W, B), a jitted function (one XLA program for the whole loop); it visits
    `run_positions(n, start)` positions. `offset` (2,)
    int, the window's top-left HR pixel in the scene, is used by noise="position" only
    (None = (0, 0)).
  """
  if init not in INITS:
    raise ValueError(f"unknown init {init!r}; use one of {INITS}")
  if noise not in NOISES:
    raise ValueError(f"unknown noise {noise!r}; use one of {NOISES}")
  if K < 1:
    raise ValueError(f"K must be >= 1, got {K}")
  if not 0.0 < float(start) <= 1.0:
    raise ValueError(f"start must be in (0, 1] (the fraction of the schedule visited), got "
                     f"{start}")
  if int(ratio) != ratio or ratio < 1:
    raise ValueError(f"ratio must be a positive integer, got {ratio}")
  ratio = int(ratio)
  n = run_positions(schedule.num_steps, start)
  lr = float(lr) * (respaced_lr_scale(schedule) if lr_scale is None else float(lr_scale))
  b1, b2 = betas
  policy = policy_lib.resolve(policy)
  progress_every = int(policy.progress_every)
  grad_fn = functools.partial(fusion_grad, model=model, schedule=schedule, lam=lam, gam=gam,
                              ratio=ratio, blur_method=policy.blur_method)
  use_folded = isinstance(model, SpectralDenoiser) and not _is_zero(gam)

  def solve(params, y, z, psf, srf, key, offset=None):
    y, z = jnp.asarray(y, jnp.float32), jnp.asarray(z, jnp.float32)
    psf, srf = jnp.asarray(psf, jnp.float32), jnp.asarray(srf, jnp.float32)
    _check_shapes(y, z, psf, srf, ratio, getattr(model, "num_bands", None))
    shape = z.shape[:2] + y.shape[-1:]
    x0 = initial_x(y, shape, init, ratio, z, psf, srf)
    chunk = (None if not use_folded else policy_lib.solver_chunk(
        policy, shape[0] * shape[1], model.hidden, model.num_layers, shape[-1]))

    def inner(carry, k, i, step0, folded):
      x, m, v, x_ema = carry
      step_key = jax.random.fold_in(jax.random.fold_in(key, i), k)
      if noise == "position":
        eps = position_noise(step_key, jnp.zeros(2, jnp.int32) if offset is None else offset,
                             shape)
      else:
        eps = jax.random.normal(step_key, shape, jnp.float32)
      g = grad_fn(x, params, y, z, psf, srf, eps, i, folded=folded, chunk=chunk) + \
          weight_decay * x
      count = (step0 + k + 1).astype(jnp.float32)
      m = b1 * m + (1.0 - b1) * g
      v = b2 * v + (1.0 - b2) * g * g
      # torch: p -= lr / (1 - b1^c) * m / (sqrt(v) / sqrt(1 - b2^c) + eps)
      denom = jnp.sqrt(v) / jnp.sqrt(1.0 - b2 ** count) + adam_eps
      x = jnp.clip(x - (lr / (1.0 - b1 ** count)) * m / denom, 0.0, 1.0)
      x_ema = ema_decay * x_ema + (1.0 - ema_decay) * x
      return (x, m, v, x_ema), None

    def outer(carry, j):
      i = n - 1 - j
      # The time condition depends on t only: folded into the kernels once per outer step,
      # shared by the K steps.
      folded = denoiser.fold_time_condition(model, params, schedule.timesteps[i]) \
          if use_folded else None
      carry, _ = jax.lax.scan(
          lambda c, k: inner(c, k, i, j * K, folded), carry, jnp.arange(K))
      progress.tick(j + 1, every=progress_every)
      return carry, None

    zeros = jnp.zeros(shape, jnp.float32)
    carry = (x0, zeros, zeros, x0)
    (_, _, _, x_ema), _ = jax.lax.scan(outer, carry, jnp.arange(n))
    return x_ema

  if mesh is None or not policy.shard_pixels or mesh.shape[sharding.DATA_AXIS] == 1:
    return jax.jit(solve)
  rep, rows = sharding.replicated(mesh), sharding.data_sharded(mesh)
  return jax.jit(solve, in_shardings=(rep, rows, rows, rep, rep, rep), out_shardings=rows)


def make_batched_solver(*args, **kwargs) -> Callable[..., jax.Array]:
  """Like make_solver, but solve(params, y (S, h, w, B), z (S, H, W, b), psf, srf,
  keys (S,)) solves S scenes / tiles at once (vmap inside one jit; shared psf / srf).
  For windows of one scene use `hsijax.sdp.tiled` (one shared key, noise="position")."""
  solve = make_solver(*args, **kwargs)
  return jax.jit(jax.vmap(solve, in_axes=(None, 0, 0, None, None, 0)))
