"""The cascade's verbs: train its stages, load them back, sample a cube from an RGB image.

    casc = hsijax.scdm.make_cascade(48, rgb_bands=(4, 11, 22), norm_mean=m, norm_std=s,
                                    unet=dict(base=96, channel_mults=(1, 1, 1)))
    casc = hsijax.scdm.train(casc, cube, steps=3000, key=0, workdir="runs/scdm", crop=8)
    casc = hsijax.scdm.load("runs/scdm")                   # EMA weights only
    x = hsijax.scdm.sample(casc, rgb, key=1, method="ddim", num_steps=50)   # (H, W, N)

A workdir holds `cascade.json` (the Cascade description and what it was trained on) and
`stage{k}/checkpoints` (Orbax, resumed after a kill). Stage k is trained from the TRUE bands
of stage k - 1, so stages train independently, in any order, on any host. Sampling runs the
whole cascade in one jitted program per chunk of tiles, sharded over the devices, and
returns the cube in the data's original units; any image size works (padded inside).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import pathlib
import time
from typing import Any, Callable, ClassVar, Sequence

import jax
import numpy as np

from hsijax import diffusion, fileio, progress, sharding, tiling
from hsijax import policy as policy_lib
from hsijax import settings as settings_lib
from hsijax.checkpoint import Checkpointer
from hsijax.scdm import residual as residual_lib
from hsijax.scdm import sampler as sampler_lib
from hsijax.scdm import training as train_lib
from hsijax.scdm import unet as unet_lib
from hsijax.scdm.cascade import Cascade
from hsijax.sdp.prior import pixels_digest

CASCADE_FILE = "cascade.json"
LEGACY_FILE = "scdm_meta.json"  # what earlier versions wrote
TRAIN_COMMAND = "hsijax.scdm.train(cascade, cube, ..., workdir=...) or python -m launch.train_scdm"


@dataclasses.dataclass(frozen=True)
class StageTrainSettings(settings_lib.Settings):
  """How each stage trains (the paper's values are the defaults).

  batch (crops per step, split over the devices), crop (side, a multiple of the U-Net's
  factor), lr, lr_schedule ("constant" | "cosine": decays to 1% over the run's steps),
  ema_decay, ema_start (EMA = weights before this step), loss_type ("l1" the authors' code |
  "mse" the paper's text), sam_weight, cond_drop (probability of a zero condition, for
  ICMG), sam_space ("normalised": the SAM term on the network's normalised bands, the
  authors' code | "data": in the data's own units, what the SAM metric measures),
  param_init ("flax" | "torch": PyTorch's layer initialisation, the authors' code; see
  `unet.init_params`), checkpoint_every, max_to_keep, log_every.
  """
  WHAT: ClassVar[str] = "SCDM training"
  batch: int = 4
  crop: int = 256
  lr: float = 1e-4
  lr_schedule: str = "constant"
  ema_decay: float = 0.9999
  ema_start: int = 2000
  loss_type: str = "l1"
  sam_weight: float = 1.0
  cond_drop: float = 0.1
  sam_space: str = "normalised"
  param_init: str = "flax"
  checkpoint_every: int = 5000
  max_to_keep: int = 2
  log_every: int = 100

  def __post_init__(self):
    if self.lr_schedule not in ("constant", "cosine"):
      raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
    if self.sam_space not in ("normalised", "data"):
      raise ValueError(f"sam_space must be 'normalised' or 'data', got {self.sam_space!r}")
    if self.param_init not in unet_lib.PARAM_INITS:
      raise ValueError(f"param_init must be one of {unet_lib.PARAM_INITS}, got "
                       f"{self.param_init!r}")
    if self.loss_type not in train_lib.LOSS_TYPES:
      raise ValueError(f"loss_type must be one of {train_lib.LOSS_TYPES}, got "
                       f"{self.loss_type!r}")
    self.require_positive("batch", "crop", "checkpoint_every", "max_to_keep", "log_every")


@dataclasses.dataclass(frozen=True)
class SampleSettings(settings_lib.Settings):
  """How the cascade samples.

  method ("ddpm" ancestral | "ddim"), num_steps (None = all T; fewer are respaced), respacing
  ("uniform" | "quadratic"), eta (DDIM noise), tile (side of the tiles the image is cut
  into; GroupNorm sees per-tile statistics, so sample at the training crop size), overlap
  (pixels shared by neighbouring tiles, -1 = a quarter tile), tiles_per_call (tiles sampled
  together, sharded over the devices).
  """
  WHAT: ClassVar[str] = "SCDM sampling"
  method: str = "ddpm"
  num_steps: int | None = None
  respacing: str = "uniform"
  eta: float = 0.0
  tile: int = 256
  overlap: int = -1
  tiles_per_call: int = 8

  def __post_init__(self):
    if self.method not in sampler_lib.SAMPLERS:
      raise ValueError(f"unknown sampler {self.method!r}; use one of "
                       f"{sorted(sampler_lib.SAMPLERS)}")
    self.require_positive("tile", "tiles_per_call")


# ----------------------------------------------------------------------------- workdir


def stage_dir(workdir: str | pathlib.Path, k: int) -> pathlib.Path:
  """Where stage k's checkpoints live."""
  return pathlib.Path(workdir) / f"stage{k}" / "checkpoints"


def read_cascade(workdir: str | pathlib.Path) -> tuple[Cascade, dict[str, Any]] | None:
  """(Cascade, the record's "training" section) from workdir, or None when there is none."""
  for name in (CASCADE_FILE, LEGACY_FILE):
    path = pathlib.Path(workdir) / name
    if path.is_file():
      try:
        record = json.loads(path.read_text())
        return Cascade.from_json(record), record.get("training", {})
      except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is damaged or not an SCDM cascade ({e}); use a new "
                         "workdir or delete it") from e
  return None


def _compatible(old: Cascade, new: Cascade) -> list[str]:
  diffs = []
  a, b = old.to_json(), new.to_json()
  for k in ("num_bands", "band_sets", "rgb_bands", "model", "diffusion"):
    if a[k] != b[k]:
      diffs.append(f"{k} {a[k]} -> {b[k]}")
  for k in ("norm_mean", "norm_std"):
    if np.shape(a[k]) != np.shape(b[k]) or not np.allclose(a[k], b[k], rtol=1e-4):
      diffs.append(f"{k} {a[k]} -> {b[k]}")
  return diffs


def _write_or_check(workdir: pathlib.Path, cascade: Cascade, training: dict[str, Any]) -> None:
  """Records the cascade and its training inputs, or refuses a workdir trained otherwise."""
  found = read_cascade(workdir)
  if found is not None:
    old, old_training = found
    diffs = _compatible(old, cascade)
    for k, v in training.items():
      if k in old_training and old_training[k] != v:
        diffs.append(f"training {k} differs" if k != "settings" else
                     "training settings " + ", ".join(
                         f"{n} {old_training[k].get(n)!r} -> {v[n]!r}" for n in v
                         if old_training[k].get(n) != v[n]))
    if diffs:
      raise ValueError(f"{workdir} already holds stages trained with other inputs ("
                       + "; ".join(diffs) + "); mixing them would make a wrong cascade: use "
                       "a new workdir (--fresh starts one in a sub-folder), or the old "
                       "settings")
    training = old_training | training
  fileio.write_json(pathlib.Path(workdir) / CASCADE_FILE,
                    cascade.to_json() | {"training": training})


# ----------------------------------------------------------------------------- training


def _check_images(cascade: Cascade, images: Any, crop: int | None) -> np.ndarray:
  images = np.asarray(images, np.float32)
  if images.ndim == 3:
    images = images[None]
  if images.ndim != 4 or images.shape[-1] != cascade.num_bands:
    raise ValueError(f"images must be (M, H, W, {cascade.num_bands}) or (H, W, "
                     f"{cascade.num_bands}) cubes, got shape {images.shape}")
  if not np.all(np.isfinite(images)):
    raise ValueError("the training cube has NaN/inf values; fill or drop them first")
  factor = cascade.unet.factor
  h, w = images.shape[1:3]
  if crop is None:  # crops come from a host pipeline; the images are a sample
    return images
  if crop % factor:
    raise ValueError(f"crop = {crop} is not a multiple of {factor}, the U-Net's downsampling "
                     f"factor (2 ** (levels - 1)); use e.g. crop={max(factor, crop // factor * factor)}")
  if crop > min(h, w):
    raise ValueError(f"crop = {crop} is larger than the training images ({h} x {w}); use "
                     f"crop={max(min(h, w) // factor * factor, factor)} or more data")
  return images


def train_stage(cascade: Cascade, images_norm: np.ndarray, k: int, *, steps: int, key: Any,
                settings: StageTrainSettings = StageTrainSettings(),
                workdir: str | pathlib.Path | None = None,
                mesh: jax.sharding.Mesh | None = None, policy: Any = None,
                batches: Callable[[int], dict] | None = None) -> tuple[Any, dict[str, Any]]:
  """Trains (or resumes) stage k on normalised cubes (M, H, W, N) up to `steps`, or on
  `batches(step)` -> {"cube": (n, crop, crop, N)} crops in original units from a host
  pipeline (then images_norm only gives the band count).

  Returns (EMA params, info {"final_loss", "steps", "seconds", "num_bands", "num_params",
  "history"}).
  """
  if k in cascade.estimate_only:
    raise ValueError(f"stage {k} is estimate-only (its affine estimate alone, no U-Net to "
                     "train); train the other stages")
  t0 = time.perf_counter()
  s = settings
  mesh = sharding.make_mesh() if mesh is None else mesh
  n_data = mesh.shape[sharding.DATA_AXIS]
  if s.batch % n_data:
    raise ValueError(f"batch = {s.batch} does not split over the {n_data} devices of the "
                     f"'data' mesh axis; use batch={-(-s.batch // n_data) * n_data} (a "
                     "multiple of the device count)")
  out, _ = cascade.stage_channels(k)
  x, cond = cascade.stage_pairs(images_norm, k)
  sam = {}
  if s.sam_space == "data":
    sam = cascade.sam_units(images_norm if batches is None else None, k)
  stage_batches = None
  if batches is not None:
    def stage_batches(step):
      cube_norm = cascade.encode(batches(step)["cube"])
      x_b, c_b = cascade.stage_pairs(cube_norm, k)
      b = {"x": x_b, "cond": c_b}
      if s.sam_space == "data" and cascade.residual:
        b["sam_base"] = cascade.sam_units(cube_norm, k)["sam_base"]
      return b
  state, history = train_lib.fit(
      cascade.stage_model(k, policy), x, cond,
      schedule=diffusion.make_schedule(cascade.schedule, cascade.num_timesteps),
      num_steps=int(steps), batch_size=int(s.batch), crop_size=int(s.crop),
      loss_type=s.loss_type, sam_weight=float(s.sam_weight), cond_drop=float(s.cond_drop),
      learning_rate=float(s.lr), ema_decay=float(s.ema_decay), ema_start=int(s.ema_start),
      key=key, workdir=None if workdir is None else stage_dir(workdir, k).parent,
      checkpoint_every=int(s.checkpoint_every), max_to_keep=int(s.max_to_keep), mesh=mesh,
      log_every=int(s.log_every), desc=f"stage {k} ({out} bands)",
      prediction=cascade.prediction,
      lr_decay_steps=int(steps) if s.lr_schedule == "cosine" else 0, policy=policy,
      batches=stage_batches, param_init=s.param_init, **sam)
  info = {"final_loss": history["loss"][-1] if history["loss"] else None,
          "steps": int(np.asarray(state.step)), "seconds": time.perf_counter() - t0,
          "num_bands": out, "num_params": int(sum(np.size(p) for p in
                                                   jax.tree_util.tree_leaves(state.params))),
          "history": history}
  return jax.device_get(state.ema_params), info


def train(cascade: Cascade, images: Any, *, steps: int, key: Any,
          workdir: str | pathlib.Path | None = None, stages: Sequence[int] | None = None,
          mesh: jax.sharding.Mesh | None = None, policy: Any = None,
          batches: Callable[[int], dict] | None = None, **settings: Any) -> Cascade:
  """Trains the cascade's stages on cubes in original units.

  Args:
    cascade: the description (`make_cascade`), with its normaliser.
    images: (M, H, W, N) or (H, W, N) training cubes in the data's original units.
    steps: training steps per stage (a resumed stage continues up to it).
    key: PRNG key or int seed; stage k trains with fold_in(key, k).
    workdir: folder for cascade.json and stage{k}/checkpoints; None = in memory only.
    stages: which stages to train (default all); others are loaded from workdir if there.
      Estimate-only stages of a residual cascade have nothing to train and are skipped; a
      residual cascade's affine estimates are fitted on `images` first (unless given).
    mesh: devices (default all); batches are sharded over "data".
    policy: platform choices (hsijax.policy; None = the running backend's).
    batches: instead of cropping `images`, batches(step) -> {"cube": (n, crop, crop, N)}
      crops in original units from a host pipeline (`hsijax.datasets.scdm_crop_batches`
      over a TFDS dataset larger than memory); `images` (a sample of the data) then only
      gives the band count and the data digest.
    **settings: `StageTrainSettings` fields (batch, crop, lr, lr_schedule, ema_decay, ...).

  Returns:
    The cascade with every stage's EMA parameters when all stages exist (else params None),
    and `info` {"stage<k>": {...}} of the stages trained now.
  """
  s = StageTrainSettings.from_kwargs(**settings)
  images = _check_images(cascade, images, None if batches is not None else int(s.crop))
  if batches is not None and s.crop % cascade.unet.factor:
    raise ValueError(f"crop = {s.crop} is not a multiple of {cascade.unet.factor}, the U-Net's "
                     "downsampling factor")
  stages = list(range(cascade.num_stages)) if stages is None else [int(k) for k in stages]
  bad = [k for k in stages if not 0 <= k < cascade.num_stages]
  if bad:
    raise ValueError(f"stage(s) {bad} do not exist; the cascade has stages 0.."
                     f"{cascade.num_stages - 1}")
  stages = [k for k in stages if k not in cascade.estimate_only]
  if cascade.residual and cascade.estimates is None:
    cascade = cascade.fit_estimates(images)
  key = settings_lib.as_key(key)
  if workdir is not None:
    workdir = pathlib.Path(workdir)
    _write_or_check(workdir, cascade, {
        "data": pixels_digest(images.reshape(-1, images.shape[-1])),
        "key": settings_lib.key_fingerprint(key),
        "settings": {k: v for k, v in settings_lib.as_dict(s).items()
                     if k not in ("checkpoint_every", "max_to_keep", "log_every")}})
  images_norm = cascade.encode(images)
  params: dict[int, Any] = {}
  info: dict[str, Any] = {}
  for k in stages:
    params[k], info[f"stage{k}"] = train_stage(cascade, images_norm, k, steps=steps,
                                               key=jax.random.fold_in(key, k), settings=s,
                                               workdir=workdir, mesh=mesh, policy=policy,
                                               batches=batches)
  params.update({k: None for k in cascade.estimate_only})
  missing = [k for k in range(cascade.num_stages) if k not in params]
  if missing and workdir is not None and all(_has_checkpoint(workdir, k) for k in missing):
    loaded = load(workdir)
    params.update({k: loaded.params[k] for k in missing})
  result = dataclasses.replace(cascade, info=info)
  if len(params) < cascade.num_stages:
    return result
  return result.with_params([params[k] for k in range(cascade.num_stages)])


def _has_checkpoint(workdir: pathlib.Path, k: int) -> bool:
  d = stage_dir(workdir, k)
  return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


# ----------------------------------------------------------------------------- loading


def load(workdir: str | pathlib.Path, *, use_ema: bool = True) -> Cascade:
  """The cascade trained in `workdir`, with each stage's newest (EMA) parameters.

  Only the parameters are read (no optimiser state), so the optimiser settings of whoever
  samples do not matter.
  """
  workdir = pathlib.Path(workdir)
  found = read_cascade(workdir)
  if found is None:
    raise FileNotFoundError(f"{workdir} holds no trained SCDM ({CASCADE_FILE} is missing); "
                            f"train the stages first: {TRAIN_COMMAND}")
  cascade = found[0]
  if cascade.residual and cascade.estimates is None:
    raise ValueError(f"{workdir / CASCADE_FILE} describes a residual cascade without its "
                     "fitted estimates; train it again in a new workdir")
  params, steps = [], []
  for k in range(cascade.num_stages):
    if k in cascade.estimate_only:
      params.append(None)  # the affine estimate alone: nothing to restore
      steps.append(0)
      continue
    if not _has_checkpoint(workdir, k):
      raise FileNotFoundError(
          f"stage {k} of the cascade has no checkpoint in {stage_dir(workdir, k)}; train it "
          f"first ({TRAIN_COMMAND} --config.stage={k})")
    out, cond = cascade.stage_channels(k)
    f = cascade.unet.factor
    abstract = jax.eval_shape(lambda key, k=k: unet_lib.init_params(
        cascade.stage_model(k), key, (1, f, f, out), (1, f, f, cond)), jax.random.key(0))
    name = "ema_params" if use_ema else "params"
    with Checkpointer(stage_dir(workdir, k)) as ckpt:
      step, part = ckpt.restore_part({name: abstract})  # newest intact step
      params.append(part[name])
      steps.append(int(step))
  return cascade.with_params(params, steps)


# ----------------------------------------------------------------------------- sampling


@functools.lru_cache(maxsize=16)
def _runner(cascade: Cascade, stage_settings: tuple[sampler_lib.SamplerSettings, ...],
            num_steps: int | None, respacing: str, mesh: jax.sharding.Mesh, policy: Any):
  """jit(sample_cascade) with tiles sharded over "data" (built once per setting)."""
  sched = diffusion.make_respaced_schedule(cascade.schedule, cascade.num_timesteps, num_steps,
                                           respacing)
  models = [cascade.stage_model(k, policy) for k in range(cascade.num_stages)]
  if cascade.residual:
    every = policy_lib.resolve(policy).progress_every
    fns, offset = [], 0
    for k, (model, st) in enumerate(zip(models, stage_settings)):
      if k in cascade.estimate_only:
        fns.append(None)
        continue
      fns.append(sampler_lib._stage_sampler(model, sched, sampler_lib.as_settings(st), offset,
                                            every, cascade.prediction))
      offset += sched.num_steps
    fn = residual_lib.make_sampler(fns, cascade.residual_plan(), cascade.num_bands,
                                   cascade.rgb_bands)
    rep, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
    return jax.jit(fn, in_shardings=(rep, data, rep), out_shardings=data), offset
  fn = sampler_lib.make_cascade_sampler(models, [sched] * len(models), list(stage_settings),
                                        include_rgb=cascade.cond_rgb,
                                        prediction=cascade.prediction, jit=False,
                                        progress_every=policy_lib.resolve(policy).progress_every)
  rep, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
  run = jax.jit(fn, in_shardings=(rep, data, rep), out_shardings=data)
  return run, len(models) * sched.num_steps


def stage_settings(stages: Sequence[Any] | None, num_stages: int, method: str, eta: float
                   ) -> tuple[sampler_lib.SamplerSettings, ...]:
  """Per-stage SamplerSettings from dicts with guidance_scale / pdt_target / pdt_p_T."""
  if stages is None:
    stages = [{}] * num_stages
  if len(stages) != num_stages:
    raise ValueError(f"got sampling settings for {len(stages)} stages but the cascade has "
                     f"{num_stages}")
  out = []
  for st in stages:
    st = dict(st.to_dict() if hasattr(st, "to_dict") else st)
    target = st.get("pdt_target", None)
    p_T = float(st.get("pdt_p_T", 1.0))
    if target in (None, "", "none") or p_T >= 1.0:
      target = None
    out.append(sampler_lib.SamplerSettings(
        method=method, guidance_scale=float(st.get("guidance_scale", 0.0)),
        pdt_target=target, pdt_p_T=p_T, eta=float(eta)))
  return tuple(out)


def sample(cascade: Cascade, rgb: Any, *, key: Any, stages: Sequence[Any] | None = None,
           mesh: jax.sharding.Mesh | None = None, show_progress: bool = True,
           policy: Any = None, **settings: Any) -> np.ndarray:
  """Samples the hyperspectral cube of an RGB image.

  Args:
    cascade: a trained cascade (`train` or `load`).
    rgb: (H, W, 3) image in the data's original units (the cube's `rgb_bands`), any size.
    key: PRNG key or int seed (same key, same cube; tile chunk c uses fold_in(key, c)).
    stages: per-stage guidance / truncation, e.g. [{"pdt_target": "x", "pdt_p_T": 0.96},
      {"guidance_scale": 1.0, "pdt_target": "x", "pdt_p_T": 0.88}]; None = plain sampling.
    mesh: devices (default all); tiles are sharded over "data".
    show_progress: False hides the progress output.
    policy: platform choices (hsijax.policy; None = the running backend's).
    **settings: `SampleSettings` fields (method, num_steps, respacing, eta, tile, overlap,
      tiles_per_call).

  Returns:
    (H, W, N) float32 cube in the data's original units. A residual cascade returns the RGB
    input bands exactly (the input values are copied into `rgb_bands`).
  """
  if cascade.params is None:
    raise ValueError("the cascade has no parameters; train it (hsijax.scdm.train) or load "
                     "a trained one (hsijax.scdm.load(workdir))")
  s = SampleSettings.from_kwargs(**settings)
  rgb = np.asarray(rgb, np.float32)
  if rgb.ndim != 3 or rgb.shape[-1] != 3:
    raise ValueError(f"the RGB input must be (H, W, 3), got shape {rgb.shape}; pass a "
                     "3-channel image (channels last)")
  if not np.all(np.isfinite(rgb)):
    raise ValueError("the RGB input has NaN/inf values; fill them first")
  h, w = rgb.shape[:2]
  factor = cascade.unet.factor
  # Any size: pad (mirrored) to multiples of the U-Net's factor, crop the result.
  hp, wp = -(-h // factor) * factor, -(-w // factor) * factor
  rgb_norm = np.pad(cascade.encode(rgb, cascade.rgb_bands), ((0, hp - h), (0, wp - w), (0, 0)),
                    mode="symmetric")
  tile = min(int(s.tile), hp, wp) // factor * factor
  if tile < factor:
    raise ValueError(f"tile must be at least {factor} (the U-Net's downsampling factor), got "
                     f"{s.tile}")
  if tile >= max(hp, wp):
    overlap = 0
  elif s.overlap < 0:
    overlap = max(factor, (tile // 4) // factor * factor)
  else:
    overlap = min(int(s.overlap) // factor * factor, tile - factor)
  mesh = sharding.make_mesh() if mesh is None else mesh
  settings_k = stage_settings(stages, cascade.num_stages, s.method, s.eta)
  run, total = _runner(cascade, settings_k, s.num_steps, s.respacing, mesh, policy)
  params = list(cascade.params)
  if cascade.residual:
    params = [(p, residual_lib.arrays(e)) for p, e in zip(params, cascade.estimates)]
  params = sharding.replicate(params, mesh)
  key = settings_lib.as_key(key)
  grid = tiling.make_grid(hp, wp, tile, overlap, multiple=factor)
  with contextlib.nullcontext() if show_progress else progress.silenced():
    x = tiling.map_tiles(lambda c, _, tiles: run(params, tiles, jax.random.fold_in(key, c)),
                         grid, [(rgb_norm, 1)], tiles_per_call=int(s.tiles_per_call),
                         mesh=mesh, desc="SCDM tiles", steps_per_call=total)
  x = cascade.decode(x[:h, :w])
  if cascade.residual:  # the input bands exactly, not through encode / decode rounding
    x[..., list(cascade.rgb_bands)] = rgb
  return x

