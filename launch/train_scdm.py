"""Trains the stages of an SCDM cascade (RGB -> HSI), one conditional U-Net per stage.

    python -m launch.train_scdm --config=configs/scdm.py:tiny \
        --config.data.path=../shared/data/cubes/houston2018_crop.npz:cube \
        --config.data.split=quadrant --workdir=workdirs/scdm_tiny
    python -m launch.train_scdm --config=configs/scdm.py:paper_houston --config.stage=1 \
        --config.data.path=/data/houston_train.npz:cube --workdir=workdirs/scdm_houston

Stage k learns the bands `band_sets[k]` from its condition (stage 0: the RGB bands
`data.rgb_bands` of the cube; stage k > 0: the TRUE bands of stage k - 1, as in the paper, so
stages train independently and in any order). `--config.stage=all` trains every stage in turn,
`--config.stage=k` only stage k.

Writes:
  DIR/scdm_meta.json        what sampling needs to rebuild the cascade (band sets, normaliser,
                            RGB bands, model and diffusion settings); a later run with
                            incompatible settings stops with an error instead of mixing stages.
  DIR/stage{k}/checkpoints  Orbax TrainState every train.checkpoint_every steps and at the end;
                            a killed run resumes from the latest one and ends with the same
                            parameters as an uninterrupted run (batches and keys are functions
                            of the step).
  DIR/metrics.json          {"stage0": {"final_loss", "steps", "seconds", "num_bands",
                            "num_params"}, ...} (merged over runs).
"""
from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hsijax import data, diffusion, sharding
from hsijax.scdm import cascade, unet
from hsijax.scdm import train as scdm_train
from launch import common


META_FILE = "scdm_meta.json"
QUADRANT_NAMES = ("top-left", "top-right", "bottom-left", "bottom-right")


# ------------------------------------------------------------------------------------ data


def load_array(spec: str, default_key: str | None = None, what: str = "data.path",
               ndim: int | None = None) -> np.ndarray:
  """Loads FILE[:KEY] as float32 via hsijax.data (.npz/.npy/.mat/.h5/.tif/ENVI)."""
  if not spec:
    raise ValueError(f"--config.{what} is empty; pass --config.{what}=FILE[:KEY]")
  path, key = data.parse_path_key(spec)
  try:
    return data.load_array(path, key or default_key, ndim=ndim)
  except (FileNotFoundError, KeyError, ValueError) as e:
    raise type(e)(f"--config.{what}={spec}: {e}") from e


def load_cube(cfg) -> np.ndarray:
  """The training cube (H, W, N) from `data.path`, checked against `data.num_bands`."""
  cube = load_array(cfg.data.path, cfg.data.key or None, "data.path", ndim=3)
  if cube.ndim != 3:
    raise ValueError(f"data.path must hold an (H, W, N) cube, got shape {cube.shape}; pass "
                     "the hyperspectral cube, not an RGB image or a list of spectra")
  if cfg.data.num_bands and cube.shape[-1] != cfg.data.num_bands:
    raise ValueError(f"the cube has {cube.shape[-1]} bands but data.num_bands = "
                     f"{cfg.data.num_bands}; pass --config.data.num_bands={cube.shape[-1]} "
                     "or the right file")
  rgb_bands = tuple(cfg.data.rgb_bands)
  if len(rgb_bands) != 3 or max(rgb_bands) >= cube.shape[-1] or min(rgb_bands) < 0:
    raise ValueError(f"data.rgb_bands {rgb_bands} must be 3 band indices in [0, "
                     f"{cube.shape[-1]}); fix --config.data.rgb_bands")
  return cube


def quadrants(cube: np.ndarray) -> list[np.ndarray]:
  """Four equal (H//2, W//2, N) quadrants: top-left, top-right, bottom-left, bottom-right."""
  h, w = cube.shape[0] // 2, cube.shape[1] // 2
  return [cube[:h, :w], cube[:h, w:2 * w], cube[h:2 * h, :w], cube[h:2 * h, w:2 * w]]


def split_cube(cube: np.ndarray, split: str, test_quadrant: int
               ) -> tuple[np.ndarray, np.ndarray | None]:
  """(training images (M, h, w, N), held-out image (h, w, N) or None)."""
  if split == "none":
    return cube[None], None
  if split == "quadrant":
    if not 0 <= int(test_quadrant) < 4:
      raise ValueError(f"data.test_quadrant must be 0..3 (0 TL, 1 TR, 2 BL, 3 BR), got "
                       f"{test_quadrant}")
    q = quadrants(cube)
    train = np.stack([q[i] for i in range(4) if i != int(test_quadrant)])
    return train, q[int(test_quadrant)]
  raise ValueError(f"data.split must be 'none' or 'quadrant', got {split!r}")


def check_crop(cfg, images: np.ndarray) -> None:
  h, w = images.shape[1:3]
  crop = int(cfg.train.crop)
  factor = downsampling_factor(cfg)
  if crop % factor:
    raise ValueError(f"train.crop = {crop} is not a multiple of {factor}, the U-Net's "
                     f"downsampling factor (2 ** (levels - 1)); use e.g. "
                     f"--config.train.crop={max(factor, crop // factor * factor)}")
  if crop > min(h, w):
    raise ValueError(f"train.crop = {crop} is larger than the training images ({h} x {w}); "
                     f"use --config.train.crop={min(h, w) // factor * factor} or more data")


# ------------------------------------------------------------------------------- metadata


def downsampling_factor(cfg) -> int:
  return 2 ** (len(tuple(cfg.model.channel_mults)) - 1)


def resolve_normaliser(cfg, train_images: np.ndarray) -> tuple[Any, Any]:
  """(mean, std): the config's values, or the training cube's statistics.

  Scalars by default; per-band (N,) lists when `data.norm_per_band` (then a missing
  mean / std is measured per band, so faint bands are not drowned by bright ones).
  """
  per_band = bool(cfg.data.get("norm_per_band", False))
  axes = tuple(range(train_images.ndim - 1)) if per_band else None
  mean, std = cfg.data.norm_mean, cfg.data.norm_std
  if mean is None:
    mean = np.mean(train_images, axis=axes, dtype=np.float64)
  if std is None:
    std = np.std(train_images, axis=axes, dtype=np.float64)
  if not np.all(np.asarray(std) > 0):
    raise ValueError(f"normalisation std must be > 0, got {std}; the training cube (or a "
                     "band of it) is constant, or --config.data.norm_std is wrong")
  as_json = lambda v: float(v) if np.ndim(v) == 0 else np.asarray(v, np.float64).tolist()
  return as_json(mean), as_json(std)


def encode(meta: dict[str, Any], x: np.ndarray, bands: Any = None) -> np.ndarray:
  """(x - mean) / std for data whose last axis holds `bands` of the cube (default all)."""
  mean, std = _norm_arrays(meta, bands)
  return ((np.asarray(x, np.float32) - mean) / std).astype(np.float32)


def decode(meta: dict[str, Any], x: np.ndarray, bands: Any = None) -> np.ndarray:
  """Inverse of `encode`: back to the data's original units."""
  mean, std = _norm_arrays(meta, bands)
  return (np.asarray(x, np.float32) * std + mean).astype(np.float32)


def _norm_arrays(meta: dict[str, Any], bands: Any) -> tuple[np.ndarray, np.ndarray]:
  pick = lambda v: v[list(bands)] if bands is not None and v.ndim else v
  return (pick(np.asarray(meta["norm_mean"], np.float32)),
          pick(np.asarray(meta["norm_std"], np.float32)))


def make_meta(cfg, num_bands: int, mean: float, std: float,
              num_stages: int | None = None) -> dict[str, Any]:
  """Everything sampling needs to rebuild the cascade (JSON-friendly)."""
  num_stages = len(cfg.stages) if num_stages is None else int(num_stages)
  if num_stages not in (1, 2, 3):
    raise ValueError(f"SCDM supports 1, 2 or 3 stages, the config has {num_stages}; use the "
                     "preset modifier ',stages=K'")
  counts = tuple(int(c) for c in (cfg.get("stage_counts") or ()))
  if num_stages == 1:
    counts = ()  # a single stage makes all N bands
  if counts and len(counts) != num_stages:
    raise ValueError(f"stage_counts {counts} must give one band count per stage "
                     f"({num_stages}); pass e.g. --config.stage_counts=\"("
                     f"{','.join(str(c) for c in cascade.stage_counts(num_bands, num_stages))})\""
                     " or leave it empty for the default split")
  band_sets = cascade.stage_band_indices(num_bands, num_stages, counts or None)
  return {
      "num_bands": int(num_bands),
      "num_stages": num_stages,
      "band_sets": [np.asarray(b).tolist() for b in band_sets],
      "rgb_bands": list(cfg.data.rgb_bands),
      "norm_mean": mean,
      "norm_std": std,
      "model": common.config_to_dict(cfg.model),
      "diffusion": common.config_to_dict(cfg.diffusion),
  }


def read_meta(workdir: pathlib.Path) -> dict[str, Any] | None:
  path = pathlib.Path(workdir) / META_FILE
  if not path.is_file():
    return None
  return json.loads(path.read_text())


def write_or_check_meta(workdir: pathlib.Path, meta: dict[str, Any]) -> dict[str, Any]:
  """Writes the metadata, or checks it matches what earlier runs in `workdir` used."""
  old = read_meta(workdir)
  if old is None:
    common.write_json(pathlib.Path(workdir) / META_FILE, meta)
    return meta
  # Data-derived normalisers may differ in the last bits; everything else must match.
  for k in ("num_bands", "num_stages", "band_sets", "rgb_bands", "model", "diffusion"):
    if json.dumps(old[k], sort_keys=True) != json.dumps(common.to_builtin(meta[k]),
                                                        sort_keys=True):
      raise ValueError(f"{workdir} already holds stages trained with a different {k} "
                       f"({old[k]} vs now {meta[k]}); use a new --workdir or the old settings")
  for k in ("norm_mean", "norm_std"):
    if np.shape(old[k]) != np.shape(meta[k]) or not np.allclose(old[k], meta[k], rtol=1e-4):
      raise ValueError(f"{workdir} was trained with {k} = {old[k]}, now {meta[k]}; train on "
                       "the same data, or set --config.data.norm_mean/norm_std to the old "
                       "values, or use a new --workdir")
  return old


# ---------------------------------------------------------------------------------- model


def build_model(cfg_model, out_channels: int) -> unet.CondUNet:
  m = cfg_model
  return unet.CondUNet(
      out_channels=int(out_channels), base=int(m["base"]),
      channel_mults=tuple(m["channel_mults"]), num_res_down=int(m["num_res_down"]),
      num_res_up=int(m["num_res_up"]), attn_levels=tuple(m["attn_levels"]),
      mid_attn=bool(m["mid_attn"]), dropout=float(m["dropout"]), groups=int(m["groups"]))


def prediction_of(meta: dict[str, Any]) -> str:
  """What the stages' networks output: "eps" (the paper; also runs from before the option)
  or "v"."""
  return str(meta["model"].get("prediction", "eps"))


def stage_channels(meta: dict[str, Any], k: int) -> tuple[int, int]:
  """(output bands, condition channels) of stage k."""
  out = len(meta["band_sets"][k])
  if k == 0:
    return out, 3
  cond = len(meta["band_sets"][k - 1]) + (3 if meta["model"].get("cond_rgb") else 0)
  return out, cond


def stage_pairs(images_norm: np.ndarray, meta: dict[str, Any], k: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """Stage k's training pairs from normalised cubes (M, H, W, N): (x (M,H,W,n_k), cond)."""
  x = images_norm[..., meta["band_sets"][k]]
  rgb = images_norm[..., meta["rgb_bands"]]
  if k == 0:
    return x, rgb
  prev = images_norm[..., meta["band_sets"][k - 1]]
  cond = np.concatenate([prev, rgb], -1) if meta["model"].get("cond_rgb") else prev
  return x, cond


def init_state(model, cfg, meta: dict[str, Any], k: int, key: jax.Array):
  """Fresh TrainState of stage k (as scdm.train.fit builds it; also the restore target)."""
  out, cond = stage_channels(meta, k)
  f = 2 ** (len(meta["model"]["channel_mults"]) - 1)
  return scdm_train.init_train_state(model, make_optimizer(cfg),
                                     key, (1, f, f, out), (1, f, f, cond))


def lr_decay_steps(cfg) -> int:
  """train.lr_schedule "constant" (paper) -> 0, "cosine" -> train.steps."""
  kind = str(cfg.train.get("lr_schedule", "constant"))
  if kind not in ("constant", "cosine"):
    raise ValueError(f"train.lr_schedule must be 'constant' or 'cosine', got {kind!r}")
  return int(cfg.train.steps) if kind == "cosine" else 0


def make_optimizer(cfg):
  """The stage optimiser of the config (also the structure checkpoints are restored into)."""
  return scdm_train.make_optimizer(float(cfg.train.lr), lr_decay_steps(cfg))


def make_schedule(d) -> diffusion.Schedule:
  """The full training schedule from the meta's / config's diffusion settings."""
  return diffusion.make_schedule(str(d["schedule"]), int(d["num_timesteps"]))


def stage_dir(workdir: pathlib.Path, k: int) -> pathlib.Path:
  return pathlib.Path(workdir) / f"stage{k}" / "checkpoints"


# -------------------------------------------------------------------------------- training


def train_stage(cfg, meta: dict[str, Any], images_norm: np.ndarray, k: int,
                workdir: pathlib.Path, mesh) -> dict[str, Any]:
  """Trains (or resumes) stage k to `train.steps`; returns its metrics entry."""
  t0 = time.perf_counter()
  out, _ = stage_channels(meta, k)
  model = build_model(meta["model"], out)
  x, cond = stage_pairs(images_norm, meta, k)
  batch = int(cfg.train.batch)
  n_data = mesh.shape[sharding.DATA_AXIS]
  if batch % n_data:
    raise ValueError(f"train.batch = {batch} does not split over the {n_data} devices of the "
                     f"'data' mesh axis; use --config.train.batch={-(-batch // n_data) * n_data}"
                     " (a multiple of the device count)")
  state, history = scdm_train.fit(
      model, x, cond, schedule=make_schedule(meta["diffusion"]),
      num_steps=int(cfg.train.steps), batch_size=batch, crop_size=int(cfg.train.crop),
      loss_type=str(cfg.train.loss_type), sam_weight=float(cfg.train.sam_weight),
      cond_drop=float(cfg.train.cond_drop), learning_rate=float(cfg.train.lr),
      ema_decay=float(cfg.train.ema_decay), ema_start=int(cfg.train.ema_start),
      seed=int(cfg.seed) * 1000 + k, workdir=stage_dir(workdir, k).parent,
      checkpoint_every=int(cfg.train.checkpoint_every),
      max_to_keep=int(cfg.train.max_to_keep), mesh=mesh, log_every=int(cfg.train.log_every),
      desc=f"stage {k} ({out} bands)", prediction=prediction_of(meta),
      lr_decay_steps=lr_decay_steps(cfg))
  final_loss = history["loss"][-1] if history["loss"] else None
  return {"final_loss": final_loss, "steps": int(np.asarray(state.step)),
          "seconds": time.perf_counter() - t0, "num_bands": out,
          "num_params": unet.count_params(state.params),
          "loss_history": history}


def stages_to_train(cfg) -> list[int]:
  n = len(cfg.stages)
  sel = str(cfg.stage).strip().lower()
  if sel == "all":
    return list(range(n))
  if sel.isdigit() and int(sel) < n:
    return [int(sel)]
  raise ValueError(f"--config.stage must be 'all' or a stage index in 0..{n - 1}, got "
                   f"{cfg.stage!r}")


def prepare(cfg, workdir: pathlib.Path) -> tuple[dict[str, Any], np.ndarray]:
  """Loads the data, fixes the metadata; returns (meta, normalised training images)."""
  cube = load_cube(cfg)
  train, _ = split_cube(cube, str(cfg.data.split), int(cfg.data.test_quadrant))
  check_crop(cfg, train)
  mean, std = resolve_normaliser(cfg, train)
  meta = write_or_check_meta(workdir, make_meta(cfg, cube.shape[-1], mean, std))
  images_norm = encode(meta, train)
  return meta, images_norm


def run(cfg, workdir) -> dict[str, Any]:
  """Trains the selected stages; returns (and writes) DIR/metrics.json's content."""
  workdir = common.setup(workdir)
  stages = stages_to_train(cfg)
  meta, images_norm = prepare(cfg, workdir)
  mesh = sharding.make_mesh(cfg.mesh)
  metrics_path = workdir / "metrics.json"
  metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
  # Keep other stages' entries; sampling scores of older weights no longer apply.
  metrics = {k: v for k, v in metrics.items() if k.startswith("stage")}
  common.log(f"SCDM: {meta['num_stages']} stage(s), bands per stage "
             f"{[len(b) for b in meta['band_sets']]}; training stage(s) {stages} on "
             f"{images_norm.shape[0]} image(s) of {images_norm.shape[1:3]} for "
             f"{cfg.train.steps} steps")
  for k in stages:
    entry = train_stage(cfg, meta, images_norm, k, workdir, mesh)
    entry.pop("loss_history")
    if entry["final_loss"] is None and f"stage{k}" in metrics:
      continue  # Already trained to train.steps: keep the recorded loss.
    metrics[f"stage{k}"] = entry
    common.write_json(metrics_path, metrics)
    common.log(f"stage {k}: final loss {entry['final_loss']} after {entry['steps']} steps "
               f"({entry['seconds']:.1f} s)")
  return metrics


if __name__ == "__main__":
  common.run_main(run, "configs/scdm.py:tiny", "workdirs/scdm", "SCDM config")
