"""Training the spectral diffusion model ("SDM" in the SDP paper) and sampling spectra from it.

Recipe (the authors' code): clean pixels (N, B), batches of 512 random pixels, t uniform in
[0, T), loss = mean((eps - eps_theta(x_t, t))^2), Adam lr 1e-2 with torch-style L2 weight decay
1e-6 (added to the gradient before the Adam moments, unlike AdamW), learning rate multiplied
by 0.001 * max(1000 - step / 10, 1) (1e-2 -> 1e-5 over the first 10k steps, then flat), EMA of
the weights with decay 0.999 (the EMA weights are the ones used for inference).

Determinism: the batch indices of step s come from fold_in(data_key, s) and the step's noise /
timesteps / dropout from fold_in(train_key, s), so a run that is interrupted and resumed from
a checkpoint ends with bit-identical parameters to an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import pathlib
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hsijax import diffusion, progress, sharding, trainloop
from hsijax import policy as policy_lib
from hsijax import settings as settings_lib
from hsijax.checkpoint import Checkpointer
from hsijax.sdp.denoiser import SpectralDenoiser


TrainState = trainloop.TrainState  # shared with every model (hsijax.trainloop)


def lr_factor(step: jax.Array, decay_steps_scale: float = 1.0) -> jax.Array:
  """0.001 * max(1000 - step / (10 * decay_steps_scale), 1): 1 at step 0, 0.001 from
  step 10000 * decay_steps_scale on (decay_steps_scale < 1 shortens the decay for short runs).
  """
  step = jnp.asarray(step, jnp.float32)
  return 0.001 * jnp.maximum(1000.0 - step / (10.0 * decay_steps_scale), 1.0)


def make_optimizer(lr: float = 1e-2, weight_decay: float = 1e-6,
                   decay_steps_scale: float = 1.0) -> optax.GradientTransformation:
  """torch.optim.Adam(lr, weight_decay) + LambdaLR(0.001 * max(1000 - step / 10, 1)).

  torch's Adam adds weight_decay * param to the gradient *before* the moment estimates
  (L2 regularisation, not AdamW's decoupled decay); optax.add_decayed_weights placed first
  in the chain does exactly that. The update at optimiser step s (0-based) uses
  lr * lr_factor(s), as LambdaLR stepped once after every optimiser step.
  """
  if decay_steps_scale <= 0:
    raise ValueError(f"decay_steps_scale must be > 0, got {decay_steps_scale}")
  schedule = lambda count: lr * lr_factor(count, decay_steps_scale)
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
      optax.scale_by_learning_rate(schedule),
  )


def init_train_state(model: SpectralDenoiser, key: jax.Array,
                     optimizer: optax.GradientTransformation) -> TrainState:
  """Xavier-normal weights / zero biases from `key`; EMA starts at the initial weights."""
  params = _init_params(model, key)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree_util.tree_map(jnp.copy, params),
                    opt_state=optimizer.init(params))


@functools.partial(jax.jit, static_argnums=0)
def _init_params(model: SpectralDenoiser, key: jax.Array) -> Any:
  """model.init as one cached program (eager init would dispatch hundreds of tiny ops)."""
  return model.init(key, jnp.zeros((1, model.num_bands), jnp.float32), 0)


def diffusion_loss(model: nn.Module, params: Any, schedule: diffusion.Schedule,
                   batch: jax.Array, key: jax.Array, train: bool = True) -> jax.Array:
  """mean((eps - eps_theta(x_t, t))^2) with t ~ U{0..n-1} and eps ~ N(0, I) from `key`.

  Per-pixel draws use the key directly (no dependence on the batch's device layout, so the
  sharded and unsharded steps see the same t and eps).
  """
  k_t, k_eps, k_drop = jax.random.split(key, 3)
  n = batch.shape[0]
  i = jax.random.randint(k_t, (n,), 0, schedule.num_steps)
  eps = jax.random.normal(k_eps, batch.shape, batch.dtype)
  x_t = diffusion.q_sample(schedule, batch, i, eps)
  pred = model.apply(params, x_t, schedule.timesteps[i], train=train, rngs={"dropout": k_drop})
  return jnp.mean((eps - pred) ** 2)


def make_train_step(model: SpectralDenoiser, schedule: diffusion.Schedule,
                    optimizer: optax.GradientTransformation, ema_decay: float = 0.999
                    ) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict]]:
  """Pure train_step(state, batch (N, B), key) -> (state, {"loss": scalar}).

  The step's randomness is fold_in(key, state.step). Not jitted: wrap it in jax.jit (fit does,
  with shardings and several steps per dispatch, as `fit` does).
  """
  def train_step(state: TrainState, batch: jax.Array, key: jax.Array):
    key = jax.random.fold_in(key, state.step)
    loss, grads = jax.value_and_grad(
        lambda p: diffusion_loss(model, p, schedule, batch, key))(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree_util.tree_map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                                 state.ema_params, params)
    return TrainState(step=state.step + 1, params=params, ema_params=ema,
                      opt_state=opt_state), {"loss": loss}

  return train_step


@functools.lru_cache(maxsize=8)
def _multi_step(model: SpectralDenoiser, schedule_name: str, num_timesteps: int,
                opt_args: tuple[float, float, float], ema_decay: float, batch: int,
                mesh: jax.sharding.Mesh, donate: bool):
  """jit((state, count, pixels, data_key, train_key) -> (state, last loss)): `count` steps in
  one dispatch, each drawing its batch on the device (pixels resident, replicated) and
  sharding it over "data"; the state replicated (and donated when the policy says so).

  Step s uses the pixels randint(fold_in(data_key, s)) and the key fold_in(train_key, s).
  Cached on its (hashable) ingredients so repeated / resumed fits in one process compile once.
  """
  schedule = diffusion.make_schedule(schedule_name, num_timesteps)
  step = make_train_step(model, schedule, make_optimizer(*opt_args), ema_decay)
  rep, dat = sharding.replicated(mesh), sharding.data_sharded(mesh)

  def run(state, count, pixels, data_key, train_key):
    def one(state):
      idx = jax.random.randint(jax.random.fold_in(data_key, state.step), (batch,), 0,
                               pixels.shape[0])
      b = jax.lax.with_sharding_constraint(pixels[idx], dat)
      state, metrics = step(state, b, jax.random.fold_in(train_key, state.step))
      return state, metrics["loss"]
    return trainloop.multi_step(one)(state, count)

  return jax.jit(run, in_shardings=(rep, rep, rep, rep, rep), out_shardings=(rep, rep),
                 donate_argnums=(0,) if donate else ())


@functools.lru_cache(maxsize=8)
def _host_multi_step(model: SpectralDenoiser, schedule_name: str, num_timesteps: int,
                     opt_args: tuple[float, float, float], ema_decay: float,
                     mesh: jax.sharding.Mesh, donate: bool):
  """jit((state, batches (k, batch, B), train_key) -> (state, last loss)): k steps on
  batches from a host pipeline (a TFDS dataset through grain), one scan per dispatch."""
  schedule = diffusion.make_schedule(schedule_name, num_timesteps)
  step = make_train_step(model, schedule, make_optimizer(*opt_args), ema_decay)
  rep = sharding.replicated(mesh)

  def run(state, batches, train_key):
    def one(state, b):
      state, metrics = step(state, b, jax.random.fold_in(train_key, state.step))
      return state, metrics["loss"]
    return trainloop.host_multi_step(one)(state, batches)

  return jax.jit(run, out_shardings=(rep, rep), donate_argnums=(0,) if donate else ())


@dataclasses.dataclass(frozen=True)
class PriorSettings(settings_lib.Settings):
  """Everything that defines a spectral prior besides its data, steps and key.

  Model: hidden, num_layers, time_dim, dropout (SpectralDenoiser), precision (matmul policy,
  hsijax.policy). Diffusion: schedule ("linear" | "cosine"), num_timesteps T. Training:
  batch (pixels per step), lr, weight_decay (torch-style L2), ema (decay of the weights'
  EMA), decay_steps (the lr decays linearly to lr / 1000 over this many steps, then stays;
  the paper's 10000), checkpoint_every, log_every (loss history / log line interval).
  """
  WHAT: ClassVar[str] = "prior"
  hidden: int = 512
  num_layers: int = 5
  time_dim: int = 64
  dropout: float = 0.001
  precision: str = "default"
  schedule: str = "linear"
  num_timesteps: int = 1000
  batch: int = 512
  lr: float = 1e-2
  weight_decay: float = 1e-6
  ema: float = 0.999
  decay_steps: int = 10_000
  checkpoint_every: int = 1000
  log_every: int = 100

  def __post_init__(self):
    policy_lib.check_precision(self.precision)
    self.require_positive("hidden", "num_layers", "time_dim", "num_timesteps", "batch",
                          "decay_steps", "checkpoint_every", "log_every")
    if self.num_layers < 2:
      raise ValueError(f"num_layers must be >= 2, got {self.num_layers}")
    if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.ema < 1.0:
      raise ValueError(f"dropout and ema must be in [0, 1), got {self.dropout}, {self.ema}")
    if self.schedule not in diffusion.BETA_SCHEDULES:
      raise ValueError(f"unknown schedule {self.schedule!r}; use one of "
                       f"{sorted(diffusion.BETA_SCHEDULES)}")

  def model(self, num_bands: int) -> SpectralDenoiser:
    return SpectralDenoiser(num_bands=int(num_bands), hidden=self.hidden,
                            num_layers=self.num_layers, time_dim=self.time_dim,
                            dropout=self.dropout, precision=self.precision)

  def training_schedule(self) -> diffusion.Schedule:
    return diffusion.make_schedule(self.schedule, self.num_timesteps)


def fit(pixels: np.ndarray, *, steps: int, key: Any, settings: PriorSettings = PriorSettings(),
        workdir: str | pathlib.Path | None = None, mesh: jax.sharding.Mesh | None = None,
        show_progress: bool = True, policy: policy_lib.Policy | None = None,
        batches: Callable[[int], np.ndarray] | None = None
        ) -> tuple[TrainState, dict[str, list[float]]]:
  """Trains the spectral denoiser on clean pixels (resumable, data-parallel).

  The pixels live on the devices (replicated); each step draws its batch there, and
  `policy.steps_per_call` steps run per dispatch (`trainloop`), with the same result as
  one step per dispatch.

  Args:
    pixels: (N, B) clean spectra in [0, 1] (float32).
    steps: total training steps of the run (a resumed run continues up to it).
    key: PRNG key (or int seed); split into (init, data, train) keys.
    settings: model, diffusion and optimiser settings.
    workdir: checkpoints go to workdir/checkpoints (every settings.checkpoint_every steps
      and at the end) and training resumes from the latest one there; None = no checkpoints.
    mesh: device mesh with a "data" axis (default: all devices); batches are sharded along
      it, parameters and optimiser state replicated.
    show_progress: False silences the progress output of `trainloop.run`.
    policy: platform choices (steps per dispatch, donation); None = the backend's.
    batches: instead of drawing from `pixels` on the device, batches(step) -> this
      process's (batch / processes, B) pixels of that step from a host pipeline (e.g.
      `hsijax.datasets.prior_pixel_batches` over a TFDS dataset larger than memory; it must
      be a pure function of the step so a resumed run reads the same batches). `pixels`
      then only gives the band count (one spectrum is enough).

  Returns:
    (final TrainState, history {"step": [...], "loss": [...]}).
  """
  pixels = np.asarray(pixels, np.float32)
  if pixels.ndim != 2 or pixels.shape[0] < 1:
    raise ValueError(f"pixels must be (N, B) spectra, got shape {pixels.shape}; reshape a "
                     "cube with cube.reshape(-1, cube.shape[-1])")
  if int(steps) != steps or steps < 0:
    raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
  s = settings
  policy = policy_lib.resolve(policy)
  mesh = mesh if mesh is not None else sharding.make_mesh(None)
  n_data = mesh.shape[sharding.DATA_AXIS]
  if s.batch % n_data:
    raise ValueError(f"batch={s.batch} does not split over {n_data} devices on the "
                     f"'data' axis; choose a multiple of {n_data}")

  model = s.model(pixels.shape[1])
  opt_args = (float(s.lr), float(s.weight_decay), float(s.decay_steps) / 10_000)
  optimizer = make_optimizer(*opt_args)
  init_key, data_key, train_key = jax.random.split(settings_lib.as_key(key), 3)
  rep = sharding.replicated(mesh)
  state = sharding.replicate(init_train_state(model, init_key, optimizer), mesh)
  run = _multi_step(model, s.schedule, int(s.num_timesteps), opt_args, float(s.ema),
                    int(s.batch), mesh, bool(policy.donate))
  keys = sharding.replicate([data_key, train_key], mesh)
  if batches is None:
    on_device = sharding.put_global(pixels, rep)
    step_fn = lambda st, count: run(st, count, on_device, *keys)
  else:
    host = _host_multi_step(model, s.schedule, int(s.num_timesteps), opt_args, float(s.ema),
                            mesh, bool(policy.donate))
    step_fn = lambda st, count: host(st, trainloop.host_batches(
        lambda i: np.asarray(batches(i), np.float32), mesh, int(count),
        int(jax.device_get(st.step))), keys[1])

  ckpt = None
  if workdir is not None:
    ckpt = Checkpointer(pathlib.Path(workdir) / "checkpoints", max_to_keep=3,
                        save_interval_steps=max(int(s.checkpoint_every), 1))
  try:
    with contextlib.nullcontext() if show_progress else progress.silenced():
      state, history = trainloop.run(
          step_fn, state, num_steps=int(steps),
          checkpointer=ckpt, log_every=int(s.log_every),
          steps_per_call=int(policy.steps_per_call), desc="SDM train")
  finally:
    if ckpt is not None:
      ckpt.close()
  return state, history


def sample_spectra(model: SpectralDenoiser, params: Any, schedule: diffusion.Schedule,
                   key: jax.Array, num: int, *, method: str = "ddpm",
                   variance: str = "posterior") -> jax.Array:
  """Generates (num, B) spectra by the reverse chain (one lax.scan, jitted).

  variance="posterior" (beta~_t) matches the authors' sampler; "beta" is DDPM's other choice.
  """
  return _sample(params, schedule, key, model=model, num=int(num), method=method,
                 variance=variance)


@functools.partial(jax.jit, static_argnames=("model", "num", "method", "variance"))
def _sample(params, schedule, key, *, model, num, method, variance):
  k_T, k_chain = jax.random.split(key)
  x_T = jax.random.normal(k_T, (num, model.num_bands), jnp.float32)
  eps_fn = lambda x, i: model.apply(params, x, schedule.timesteps[i])
  return diffusion.sample(schedule, eps_fn, x_T, k_chain, method=method, variance=variance)


def evaluate_fid(model: SpectralDenoiser, params: Any, schedule: diffusion.Schedule,
                 pixels: np.ndarray, key: jax.Array, num: int = 2048) -> float:
  """Spectral FID between (up to `num`) real pixels and `num` generated spectra."""
  from hsijax import metrics  # local import: metrics is heavier and optional here
  pixels = np.asarray(pixels, np.float32)
  k_pick, k_gen = jax.random.split(key)
  if pixels.shape[0] > num:
    pick = np.asarray(jax.random.choice(k_pick, pixels.shape[0], (num,), replace=False))
    pixels = pixels[pick]
  gen = sample_spectra(model, params, schedule, k_gen, num)
  return float(metrics.spectral_fid(pixels, gen))
