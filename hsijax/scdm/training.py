"""SCDM training of one cascade stage (the SCDM paper, Sec. III).

Per step, for a batch {"x": (N, H, W, C) clean target bands, "cond": (N, H, W, C_cond)}:

  t ~ U{0..n-1}, eps ~ N(0, I), cond <- 0 per sample with probability cond_drop
  x_t      = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
  eps_pred = U-Net(x_t | cond, t)           (dropout active)
  x0_pred  = (x_t - sqrt(1 - abar_t) eps_pred) / sqrt(abar_t)
  loss     = L1 or MSE(eps, eps_pred) + sam_weight (1 - mean_pixels cos(x0_pred, x0))

With prediction="v" the network outputs v_pred for v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0,
the first term compares v_pred with v and x0_pred = sqrt(abar_t) x_t - sqrt(1 - abar_t) v_pred;
with prediction="x0" the network outputs x0_pred itself and the first term compares it with x0.
(Why: an eps-model's x0 is (x_t - sqrt(1 - abar) eps_pred) / sqrt(abar), which multiplies eps
errors by up to 156 at t = T; short training runs cannot fit eps that precisely, while a
v-model's x0 error stays bounded. The paper uses eps.)

SAM in the data's units (sam_scale given): the SAM term compares base + offset + scale * x0
with the same map of x0_pred (per band offset / scale, base an optional per-pixel image, the
"sam_base" entry of the batch: the affine estimate of a residual stage). In per-band
normalised units the angle is one between mean-removed spectra, ill-defined for average
pixels; the metric measures it in the data's units.

then Adam (lr 1e-4) and the EMA of the weights: ema = params while step < ema_start, then
ema <- decay ema + (1 - decay) params (the authors' code: copy before 2k steps, 0.9999 after).

Keys: the step key is split into (t, eps, condition drop, dropout) in that order.
"""
from __future__ import annotations

import pathlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hsijax import diffusion, sharding, trainloop
from hsijax import policy as policy_lib
from hsijax import settings as settings_lib
from hsijax.checkpoint import Checkpointer
from hsijax.scdm.unet import CondUNet, init_params

LOSS_TYPES = ("l1", "mse")


TrainState = trainloop.TrainState  # shared with every model (hsijax.trainloop)


def make_optimizer(learning_rate: float = 1e-4, decay_steps: int = 0,
                   final_fraction: float = 0.01) -> optax.GradientTransformation:
  """Adam; constant learning rate (the paper's 1e-4) unless `decay_steps` > 0.

  With decay_steps > 0 the rate follows a cosine from `learning_rate` down to
  `final_fraction * learning_rate` at step decay_steps (short CPU runs end far more precise
  with it).
  """
  if decay_steps < 0 or not 0.0 <= final_fraction <= 1.0:
    raise ValueError(f"need decay_steps >= 0 and final_fraction in [0, 1], got "
                     f"{decay_steps}, {final_fraction}")
  if decay_steps:
    return optax.adam(optax.cosine_decay_schedule(learning_rate, int(decay_steps),
                                                  alpha=final_fraction))
  return optax.adam(learning_rate)


def init_train_state(model: CondUNet, optimizer: optax.GradientTransformation,
                     key: jax.Array, x_shape: Sequence[int],
                     cond_shape: Sequence[int], param_init: str = "flax") -> TrainState:
  """Step 0: fresh parameters (unet.init_params with `param_init`), EMA = parameters,
  optimiser state."""
  params = init_params(model, key, x_shape, cond_shape, param_init)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree_util.tree_map(jnp.copy, params),
                    opt_state=optimizer.init(params))


# ----------------------------------------------------------------------------
# Loss.


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
  """cos along the last (band) axis: (..., B) -> (...).

  Zero vectors give 0 (not NaN), with finite gradients: the norm product is bounded
  below by eps inside the square root, like torch's cosine_similarity.
  """
  dot = jnp.sum(a * b, axis=-1)
  norms = jnp.sqrt(jnp.maximum(jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1), eps ** 2))
  return dot / norms


def loss_terms(eps: jax.Array, eps_pred: jax.Array, x0: jax.Array, x0_pred: jax.Array,
               loss_type: str = "l1") -> dict[str, jax.Array]:
  """{"eps": L1 or MSE(eps, eps_pred), "sam": 1 - mean cosine(x0_pred, x0) over pixels}."""
  if loss_type == "l1":
    l_eps = jnp.mean(jnp.abs(eps - eps_pred))
  elif loss_type == "mse":
    l_eps = jnp.mean(jnp.square(eps - eps_pred))
  else:
    raise ValueError(f"unknown loss_type {loss_type!r}; use 'l1' (authors' code) or 'mse' "
                     "(paper text)")
  return {"eps": l_eps, "sam": 1.0 - jnp.mean(cosine_similarity(x0_pred, x0))}


def scdm_loss(eps: jax.Array, eps_pred: jax.Array, x0: jax.Array, x0_pred: jax.Array,
              loss_type: str = "l1", sam_weight: float = 1.0) -> jax.Array:
  """Scalar SCDM loss: L1 / MSE on the noise + sam_weight * spectral-angle term."""
  terms = loss_terms(eps, eps_pred, x0, x0_pred, loss_type)
  return terms["eps"] + sam_weight * terms["sam"]


def drop_condition(key: jax.Array, cond: jax.Array, rate: float) -> jax.Array:
  """Replaces whole samples of cond (N, ...) by zeros with probability `rate` each."""
  keep = jax.random.bernoulli(key, 1.0 - rate, (cond.shape[0],))
  return cond * keep.reshape((-1,) + (1,) * (cond.ndim - 1)).astype(cond.dtype)


def compute_loss(params: Any, model: CondUNet, schedule: diffusion.Schedule,
                 batch: Mapping[str, jax.Array], key: jax.Array, *, loss_type: str = "l1",
                 sam_weight: float = 1.0, cond_drop: float = 0.1, train: bool = True,
                 prediction: str = "eps", sam_scale: Any = None,
                 sam_offset: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, aux) for one batch; aux holds the loss terms and the drawn t / eps / condition.

  prediction: what the network outputs, "eps" (the paper), "v" (sqrt(abar) eps -
  sqrt(1 - abar) x0) or "x0". The L1 / MSE term compares the output with that target; the
  SAM term always uses the implied x0 (in the data's units when sam_scale is given: see the
  module docstring).
  """
  x0 = jnp.asarray(batch["x"], jnp.float32)
  cond = jnp.asarray(batch["cond"], jnp.float32)
  k_t, k_eps, k_drop, k_dropout = jax.random.split(key, 4)
  i = jax.random.randint(k_t, (x0.shape[0],), 0, schedule.num_steps)
  eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
  cond = drop_condition(k_drop, cond, cond_drop)
  x_t = diffusion.q_sample(schedule, x0, i, eps)
  out = model.apply({"params": params}, x_t, cond, schedule.timesteps[i], train=train,
                    rngs={"dropout": k_dropout})
  if prediction == "eps":
    target, x0_pred = eps, diffusion.x0_from_eps(schedule, x_t, i, out)
  elif prediction == "v":
    target, x0_pred = (diffusion.v_target(schedule, x0, i, eps),
                       diffusion.x0_from_v(schedule, x_t, i, out))
  elif prediction == "x0":
    target, x0_pred = x0, out
  else:
    raise ValueError(f"unknown prediction {prediction!r}; use one of {diffusion.PREDICTIONS}")
  if sam_scale is not None:
    base = jnp.asarray(batch["sam_base"], jnp.float32) if "sam_base" in batch else 0.0
    off = 0.0 if sam_offset is None else jnp.asarray(sam_offset, jnp.float32)
    sc = jnp.asarray(sam_scale, jnp.float32)
    terms = loss_terms(target, out, base + off + sc * x0, base + off + sc * x0_pred,
                       loss_type)
  else:
    terms = loss_terms(target, out, x0, x0_pred, loss_type)
  loss = terms["eps"] + sam_weight * terms["sam"]
  return loss, {"eps_loss": terms["eps"], "sam_loss": terms["sam"], "i": i, "eps": eps,
                "cond": cond}


def ema_update(ema: Any, params: Any, step: jax.Array, decay: float,
               start: int) -> Any:
  """EMA after update number `step` (1-based): a copy while step < start, then decay."""
  w = jnp.where(step < start, 0.0, decay).astype(jnp.float32)
  return jax.tree_util.tree_map(lambda e, p: w * e + (1.0 - w) * p, ema, params)


def make_train_step(model: CondUNet, schedule: diffusion.Schedule,
                    optimizer: optax.GradientTransformation, *, loss_type: str = "l1",
                    sam_weight: float = 1.0, cond_drop: float = 0.1,
                    ema_decay: float = 0.9999, ema_start: int = 2000,
                    prediction: str = "eps", jit: bool = True, sam_scale: Any = None,
                    sam_offset: Any = None):
  """Builds train_step(state, batch {"x", "cond"}, key) -> (state, metrics).

  Pure; metrics = {"loss", "eps_loss", "sam_loss"} of the parameters before the update.
  With jit=True it is jitted (wrap it again with in/out shardings and donate_argnums=0 to
  shard the batch over `data`, as `fit` does).
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"unknown loss_type {loss_type!r}; use one of {LOSS_TYPES}")
  if not 0.0 <= cond_drop <= 1.0:
    raise ValueError(f"cond_drop must be a probability in [0, 1], got {cond_drop}")
  if prediction not in diffusion.PREDICTIONS:
    raise ValueError(f"unknown prediction {prediction!r}; use one of {diffusion.PREDICTIONS}")

  def loss_fn(params, batch, key):
    return compute_loss(params, model, schedule, batch, key, loss_type=loss_type,
                        sam_weight=sam_weight, cond_drop=cond_drop, train=True,
                        prediction=prediction, sam_scale=sam_scale, sam_offset=sam_offset)

  def train_step(state: TrainState, batch, key):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    ema = ema_update(state.ema_params, params, step, ema_decay, ema_start)
    new = TrainState(step=step, params=params, ema_params=ema, opt_state=opt_state)
    return new, {"loss": loss, "eps_loss": aux["eps_loss"], "sam_loss": aux["sam_loss"]}

  return jax.jit(train_step) if jit else train_step


# ----------------------------------------------------------------------------
# Data.


def _crop_rng(key_or_step: Any, seed: int) -> np.random.Generator:
  if isinstance(key_or_step, (int, np.integer)):
    return np.random.default_rng([int(seed), int(key_or_step)])
  key = key_or_step
  if jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return np.random.default_rng(np.asarray(key, np.uint32).ravel().tolist())


def random_crops(images: Any, size: int, batch: int, key_or_step: Any, *,
                 seed: int = 0) -> Any:
  """Random size x size crops from host images (NumPy, no device work).

  Args:
    images: (M, H, W, C) array, or a dict / tuple of arrays sharing (M, H, W) (e.g. target
      bands and condition): every array is cropped at the same windows.
    size: crop side.
    batch: number of crops.
    key_or_step: a JAX key, or an int step (then the crops depend on (seed, step)).
    seed: base seed for int steps.

  Returns:
    The same structure with (batch, size, size, C) arrays.
  """
  leaves, treedef = jax.tree_util.tree_flatten(images)
  if not leaves:
    raise ValueError("random_crops got no images")
  shapes = {np.shape(a)[:3] for a in leaves}
  if any(np.ndim(a) != 4 for a in leaves) or len(shapes) != 1:
    raise ValueError(f"images must be (M, H, W, C) arrays sharing (M, H, W), got shapes "
                     f"{[np.shape(a) for a in leaves]}")
  m, h, w = shapes.pop()
  if not 1 <= size <= min(h, w):
    raise ValueError(f"crop size {size} does not fit images of {h} x {w}; use a crop size "
                     f"<= {min(h, w)}")
  rng = _crop_rng(key_or_step, seed)
  idx = rng.integers(0, m, batch)
  rows = rng.integers(0, h - size + 1, batch)[:, None] + np.arange(size)
  cols = rng.integers(0, w - size + 1, batch)[:, None] + np.arange(size)
  crops = [np.asarray(a)[idx[:, None, None], rows[:, :, None], cols[:, None, :]]
           for a in leaves]
  return jax.tree_util.tree_unflatten(treedef, crops)


def device_crops(images: dict[str, jax.Array], size: int, batch: int, key: jax.Array
                 ) -> dict[str, jax.Array]:
  """`batch` random size x size crops of device-resident images, drawn on the device.

  images: {"x": (M, H, W, C), "cond": (M, H, W, C_cond)} cropped at the same windows; the
  image, row and column of crop n come from three keys split from `key`.
  """
  m, h, w = images["x"].shape[:3]
  k_i, k_r, k_c = jax.random.split(key, 3)
  idx = jax.random.randint(k_i, (batch,), 0, m)
  rows = jax.random.randint(k_r, (batch,), 0, h - size + 1)
  cols = jax.random.randint(k_c, (batch,), 0, w - size + 1)

  def crop(a):
    one = lambda i, r, c: jax.lax.dynamic_slice(a[i], (r, c, 0), (size, size, a.shape[-1]))
    return jax.vmap(one)(idx, rows, cols)

  return {k: crop(v) for k, v in images.items()}


# ----------------------------------------------------------------------------
# The loop.


def fit(model: CondUNet, x_images: np.ndarray, cond_images: np.ndarray, *,
        schedule: diffusion.Schedule, num_steps: int, batch_size: int = 4,
        crop_size: int = 256, loss_type: str = "l1", sam_weight: float = 1.0,
        cond_drop: float = 0.1, learning_rate: float = 1e-4, ema_decay: float = 0.9999,
        ema_start: int = 2000, key: Any = 0, workdir: str | pathlib.Path | None = None,
        checkpoint_every: int = 1000, max_to_keep: int = 3, mesh: Any = None,
        log_every: int = 100, desc: str = "SCDM stage",
        prediction: str = "eps", lr_decay_steps: int = 0,
        policy: policy_lib.Policy | None = None,
        batches: Callable[[int], dict] | None = None, sam_scale: Any = None,
        sam_offset: Any = None, sam_base: np.ndarray | None = None,
        param_init: str = "flax") -> tuple[TrainState, dict]:
  """Trains one stage with hsijax.trainloop.run; resumes from workdir/checkpoints.

  The images live on the devices (replicated) and every step crops its batch there
  (`device_crops`); `policy.steps_per_call` steps run per dispatch, with the same result as
  one step per dispatch.

  Args:
    model: the stage's U-Net (out_channels = x_images' channels).
    x_images: (M, H, W, C) normalised target bands of the training images (host).
    cond_images: (M, H, W, C_cond) their conditions (RGB or the previous stage's true
      bands), normalised the same way.
    schedule: the training noise schedule (full T steps).
    num_steps: total steps of the run (a resumed run continues up to it).
    batch_size: global batch, split over the mesh `data` axis (a multiple of its size).
    crop_size: random crop side (a multiple of 2 ** (levels - 1)).
    key: PRNG key or int seed, split into (init, step, crop) keys; the crops of step s
      come from fold_in(crop_key, s) and its noise from fold_in(step_key, s), so a
      resumed run sees the same batches.
    workdir: checkpoints go to workdir/checkpoints every `checkpoint_every` steps and at
      the end; None = no checkpoints.
    mesh: device mesh (default: all devices on `data`); parameters are replicated.
    prediction: network target, "eps" (paper) or "v".
    lr_decay_steps: > 0 decays the learning rate (cosine, to 1%) over that many steps.
    policy: platform choices (steps per dispatch, donation); None = the backend's.
    batches: instead of cropping x_images / cond_images on the device, batches(step) ->
      {"x": (n, crop, crop, C), "cond": (n, crop, crop, C_cond)}, this process's part of
      the step's batch from a host pipeline (e.g. `hsijax.datasets.scdm_crop_batches` over
      a TFDS dataset); a pure function of the step, so a resumed run reads the same
      batches. x_images / cond_images then only give the channel counts.
    sam_scale, sam_offset, sam_base: the SAM term in the data's units (see the module
      docstring): per-band (C,) scale and offset, and (M, H, W, C) per-pixel base images
      cropped with x (with `batches`, their "sam_base" entry instead).
    param_init: "flax" or "torch" (PyTorch's layer defaults, as the authors' code;
      `unet.init_params`).

  Returns:
    (final TrainState, history {"step": [...], "loss": [...]}).
  """
  x_images, cond_images = np.asarray(x_images, np.float32), np.asarray(cond_images, np.float32)
  if x_images.shape[-1] != model.out_channels:
    raise ValueError(f"x_images have {x_images.shape[-1]} bands but the model makes "
                     f"{model.out_channels}; build CondUNet(out_channels="
                     f"{x_images.shape[-1]})")
  if batches is None and not 1 <= crop_size <= min(x_images.shape[1:3]):
    raise ValueError(f"crop size {crop_size} does not fit images of "
                     f"{x_images.shape[1]} x {x_images.shape[2]}")
  policy = policy_lib.resolve(policy)
  mesh = sharding.make_mesh(None) if mesh is None else mesh
  optimizer = make_optimizer(learning_rate, lr_decay_steps)
  init_key, step_key, crop_key = jax.random.split(settings_lib.as_key(key), 3)
  state = init_train_state(model, optimizer, init_key,
                           (1, crop_size, crop_size, x_images.shape[-1]),
                           (1, crop_size, crop_size, cond_images.shape[-1]), param_init)
  state = sharding.replicate(state, mesh)
  step = make_train_step(model, schedule, optimizer, loss_type=loss_type,
                         sam_weight=sam_weight, cond_drop=cond_drop, ema_decay=ema_decay,
                         ema_start=ema_start, prediction=prediction, jit=False,
                         sam_scale=sam_scale, sam_offset=sam_offset)
  rep, data = sharding.replicated(mesh), sharding.data_sharded(mesh)

  def run(state, count, images, step_key, crop_key):
    def one(state):
      crops = device_crops(images, crop_size, batch_size,
                           jax.random.fold_in(crop_key, state.step))
      crops = jax.lax.with_sharding_constraint(crops, data)
      state, metrics = step(state, crops, jax.random.fold_in(step_key, state.step))
      return state, metrics["loss"]
    return trainloop.multi_step(one)(state, count)

  keys = sharding.replicate([step_key, crop_key], mesh)
  if batches is None:
    run = jax.jit(run, in_shardings=(rep,) * 5, out_shardings=(rep, rep),
                  donate_argnums=(0,) if policy.donate else ())
    images = {"x": sharding.put_global(x_images, rep),
              "cond": sharding.put_global(cond_images, rep)}
    if sam_base is not None:
      images["sam_base"] = sharding.put_global(np.asarray(sam_base, np.float32), rep)
    step_fn = lambda st, count: run(st, count, images, *keys)
  else:
    def one_host(state, b):
      state, metrics = step(state, b, jax.random.fold_in(keys[0], state.step))
      return state, metrics["loss"]
    host = jax.jit(trainloop.host_multi_step(one_host), out_shardings=(rep, rep),
                   donate_argnums=(0,) if policy.donate else ())
    step_fn = lambda st, count: host(st, trainloop.host_batches(
        batches, mesh, int(count), int(jax.device_get(st.step))))

  ckpt = None
  if workdir is not None:
    ckpt = Checkpointer(pathlib.Path(workdir) / "checkpoints", max_to_keep=max_to_keep,
                        save_interval_steps=checkpoint_every)
  try:
    return trainloop.run(step_fn, state, num_steps=num_steps, checkpointer=ckpt, log_every=log_every,
                         steps_per_call=int(policy.steps_per_call), desc=desc)
  finally:
    if ckpt is not None:
      ckpt.close()
