"""Samples a trained SCDM cascade: RGB (H, W, 3) -> hyperspectral cube (H, W, N).

    # the held-out quadrant of the training cube (its RGB bands in, the cube as reference):
    python -m launch.sample_scdm --config=configs/scdm.py:tiny \
        --config.data.path=../shared/data/cubes/houston2018_crop.npz:cube \
        --config.data.split=quadrant --workdir=workdirs/scdm_tiny
    # a user's own RGB image (optionally with a reference cube for metrics):
    python -m launch.sample_scdm --config=configs/scdm.py:paper_houston \
        --config.data.rgb=scene.npz:rgb [--config.data.reference=scene.npz:cube] \
        --workdir=workdirs/scdm_houston

Reads the stages trained by `launch.train_scdm` in the same DIR (DIR/scdm_meta.json and
DIR/stage{k}/checkpoints, EMA weights by default) and runs the whole cascade in one jit per
batch of tiles: images larger than `sample.tile` are cut into overlapping tiles (sharded over
the mesh's `data` axis, `sample.tiles_per_call` at a time) and blended back. Per-stage
guidance / truncation come from `config.stages[k]`.

Writes DIR/samples.npz (array `X`, (H, W, N) in the data's original units, and `rgb`), and
with a reference DIR/metrics.json {"mpsnr", "sam_deg", "sam_rad", "mssim", "rmse", ...} (RMSE
in original units) and DIR/samples.png (false colour and per-pixel error).
"""
from __future__ import annotations

import pathlib
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hsijax import diffusion, metrics_np, progress, sharding, tiling
from hsijax.scdm import sampler
from hsijax.checkpoint import Checkpointer
from launch import common
from launch import train_scdm



# ----------------------------------------------------------------------------------- inputs


def train_command(cfg, workdir, stage: str = "all") -> str:
  preset = getattr(cfg, "preset", "tiny")
  cmd = f"python -m launch.train_scdm --config=configs/scdm.py:{preset}"
  if cfg.data.path:
    cmd += f" --config.data.path={cfg.data.path}"
  if stage != "all":
    cmd += f" --config.stage={stage}"
  return cmd + f" --workdir={workdir}"


def require_meta(cfg, workdir: pathlib.Path) -> dict[str, Any]:
  meta = train_scdm.read_meta(workdir)
  if meta is None:
    raise FileNotFoundError(
        f"{workdir} holds no trained SCDM ({train_scdm.META_FILE} is missing); train the "
        f"stages first: {train_command(cfg, workdir)}")
  if len(cfg.stages) != meta["num_stages"]:
    raise ValueError(f"{workdir} holds a {meta['num_stages']}-stage cascade but the config "
                     f"has {len(cfg.stages)} stage settings; use the preset modifier "
                     f"',stages={meta['num_stages']}'")
  return meta


def load_inputs(cfg, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None, str]:
  """(rgb (H, W, 3), reference (H, W, N) or None, description), original units."""
  reference = None
  if cfg.data.reference:
    reference = train_scdm.load_array(cfg.data.reference, None, "data.reference")
    if reference.ndim != 3 or reference.shape[-1] != meta["num_bands"]:
      raise ValueError(f"data.reference must be an (H, W, {meta['num_bands']}) cube, got "
                       f"{reference.shape}; pass the hyperspectral reference of the RGB input")
  if cfg.data.rgb:
    rgb = train_scdm.load_array(cfg.data.rgb, None, "data.rgb")
    source = cfg.data.rgb
  else:
    if reference is None:
      if not cfg.data.path:
        raise ValueError("nothing to sample: pass --config.data.rgb=FILE[:KEY] (an RGB "
                         "image) or --config.data.path=FILE[:KEY] (a cube whose RGB bands "
                         "are used, with --config.data.split=quadrant for the held-out "
                         "quadrant)")
      cube = train_scdm.load_cube(cfg)
      _, held_out = train_scdm.split_cube(cube, str(cfg.data.split),
                                          int(cfg.data.test_quadrant))
      reference = cube if held_out is None else held_out
      source = cfg.data.path + ("" if held_out is None else
                                f" ({train_scdm.QUADRANT_NAMES[cfg.data.test_quadrant]} "
                                "quadrant)")
    else:
      source = cfg.data.reference
    rgb = reference[..., meta["rgb_bands"]]
  check_rgb(rgb, meta)
  if reference is not None and reference.shape[:2] != rgb.shape[:2]:
    raise ValueError(f"data.reference {reference.shape[:2]} and the RGB input "
                     f"{rgb.shape[:2]} differ in size; pass co-registered images")
  return np.asarray(rgb, np.float32), reference, source


def model_factor(meta: dict[str, Any]) -> int:
  """The U-Net's downsampling factor 2 ** (levels - 1): H and W must be multiples of it."""
  return 2 ** (len(meta["model"]["channel_mults"]) - 1)


def check_rgb(rgb: np.ndarray, meta: dict[str, Any]) -> None:
  """RGB must be (H, W, 3) with H, W multiples of the U-Net's downsampling factor."""
  if rgb.ndim != 3 or rgb.shape[-1] != 3:
    raise ValueError(f"the RGB input must be (H, W, 3), got shape {rgb.shape}; pass a "
                     "3-channel image (channels last) with --config.data.rgb=FILE[:KEY]")
  factor = model_factor(meta)
  h, w = rgb.shape[:2]
  if h % factor or w % factor:
    lo = (h // factor * factor, w // factor * factor)
    hi = (-(-h // factor) * factor, -(-w // factor) * factor)
    raise ValueError(f"the RGB input is {h} x {w}, but the U-Net halves the size "
                     f"{len(meta['model']['channel_mults']) - 1} times, so H and W must be "
                     f"multiples of {factor}; crop it to {lo[0]} x {lo[1]} or pad it to "
                     f"{hi[0]} x {hi[1]}")


# ----------------------------------------------------------------------------- the cascade


def load_stage_params(cfg, meta: dict[str, Any], workdir: pathlib.Path,
                      use_ema: bool = True) -> tuple[list[Any], list[int]]:
  """Restores every stage's (EMA) parameters; returns (params per stage, step per stage)."""
  params, steps = [], []
  for k in range(meta["num_stages"]):
    directory = train_scdm.stage_dir(workdir, k)
    ckpt = Checkpointer(directory) if directory.is_dir() else None
    try:
      if ckpt is None or ckpt.latest_step() is None:
        raise FileNotFoundError(
            f"stage {k} of the cascade has no checkpoint in {directory}; train it first: "
            f"{train_command(cfg, workdir, str(k))}")
      out, _ = train_scdm.stage_channels(meta, k)
      model = train_scdm.build_model(meta["model"], out)
      target = jax.eval_shape(
          lambda key, k=k, model=model: train_scdm.init_state(model, cfg, meta, k, key),
          jax.random.key(0))
      state = ckpt.restore(target=target)
      steps.append(int(ckpt.latest_step()))
    finally:
      if ckpt is not None:
        ckpt.close()
    params.append(state.ema_params if use_ema else state.params)
  return params, steps


def stage_settings(cfg_stages: Sequence[Any], method: str, eta: float) -> list[dict[str, Any]]:
  """Per-stage sampler keyword arguments from config.stages."""
  out = []
  for s in cfg_stages:
    s = dict(s.to_dict() if hasattr(s, "to_dict") else s)
    target = s.get("pdt_target", "eps")
    target = None if target in (None, "", "none") or float(s.get("pdt_p_T", 1.0)) >= 1.0 \
        else target
    out.append({"method": method, "guidance_scale": float(s.get("guidance_scale", 0.0)),
                "pdt_target": target, "pdt_p_T": float(s.get("pdt_p_T", 1.0)),
                "eta": float(eta)})
  return out


def make_cascade(cfg, meta: dict[str, Any], settings: list[dict[str, Any]]):
  """(sample_cascade(stage_params, rgb_norm (n, h, w, 3), key) -> (n, h, w, N) normalised,
  total reverse steps per call)."""
  models = [train_scdm.build_model(meta["model"], train_scdm.stage_channels(meta, k)[0])
            for k in range(meta["num_stages"])]
  d = meta["diffusion"]
  sched = diffusion.make_respaced_schedule(
      str(d["schedule"]), int(d["num_timesteps"]), cfg.sample.num_steps,
      str(cfg.sample.respacing))
  return sampler.make_cascade_sampler(models, [sched] * len(models), settings,
                                   include_rgb=bool(meta["model"].get("cond_rgb", False)),
                                   prediction=train_scdm.prediction_of(meta),
                                   jit=False), len(models) * sched.num_steps


def sample_image(sample_cascade, stage_params, rgb_norm: np.ndarray, key: jax.Array, mesh,
                 tile: int, tiles_per_call: int, factor: int, total_steps: int = 0,
                 overlap: int = -1) -> np.ndarray:
  """Tiled, sharded cascade sampling of one normalised (H, W, 3) image -> (H, W, N).

  Tiles are `tile` x `tile` (at most the image; a multiple of `factor`), overlapping by
  `overlap` pixels (-1: a quarter tile) and blended linearly. GroupNorm statistics are per
  tile, so sampling at the training crop size keeps them as in training.
  """
  h, w = rgb_norm.shape[:2]
  tile = min(int(tile), h, w) // factor * factor
  if tile < factor:
    raise ValueError(f"sample.tile must be at least {factor} (the U-Net's downsampling "
                     f"factor), got {tile}")
  if tile >= max(h, w):
    overlap = 0
  elif overlap < 0:
    overlap = max(factor, (tile // 4) // factor * factor)
  else:
    overlap = int(overlap) // factor * factor
  grid = tiling.make_grid(h, w, tile, overlap, multiple=factor)
  windows = np.asarray(tiling.extract(jnp.asarray(rgb_norm), grid))
  weights = tiling.blend_weights(grid)
  rep = sharding.replicated(mesh)
  run = jax.jit(sample_cascade, in_shardings=(rep, sharding.data_sharded(mesh), rep),
                out_shardings=sharding.data_sharded(mesh))
  stage_params = sharding.replicate(stage_params, mesh)
  calls = list(tiling.chunks(len(windows), int(tiles_per_call),
                             mesh.shape[sharding.DATA_AXIS]))
  acc, norm = None, np.zeros((h, w, 1), np.float32)
  for c, (idx, n_real) in enumerate(calls):
    with progress.bar(total=total_steps, desc=f"SCDM tiles {c + 1}/{len(calls)}"):
      x = run(stage_params, sharding.shard_batch(windows[idx], mesh),
              jax.random.fold_in(key, c))
      x = np.asarray(x)[:n_real]
    if acc is None:
      acc = np.zeros((h, w, x.shape[-1]), np.float32)
    tiling.accumulate(acc, norm, x, grid.starts[idx[:n_real]], weights[idx[:n_real]])
  return acc / norm


def scores(reference: np.ndarray, x: np.ndarray) -> dict[str, float]:
  """SCDM table metrics (SPEC 5): MPSNR, SAM (degrees and radians), MSSIM, RMSE."""
  return {
      "mpsnr": metrics_np.psnr(reference, x),
      "sam_deg": metrics_np.sam(reference, x, degrees=True),
      "sam_rad": metrics_np.sam(reference, x, degrees=False),
      "mssim": metrics_np.ssim(reference, x),
      "rmse": metrics_np.rmse(reference, x),
  }


# --------------------------------------------------------------------------------- figures


def display_bands(meta: dict[str, Any]) -> list[int]:
  """Red, green, blue bands for false colour: the RGB bands, longest wavelength first."""
  return sorted(meta["rgb_bands"], reverse=True)


def figure(results: dict[str, np.ndarray], bands: Sequence[int],
           reference: np.ndarray | None = None, title: str | None = None):
  """False colour of each result (and the reference), with per-pixel RMSE maps below."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = ({"reference": reference} if reference is not None else {}) | dict(results)
  base = reference if reference is not None else next(iter(results.values()))
  sel = np.asarray(base, np.float32)[..., list(bands)].reshape(-1, 3)
  lo, hi = np.percentile(sel, 1, 0), np.percentile(sel, 99, 0)
  rows = 2 if reference is not None else 1
  fig, axes = plt.subplots(rows, len(panels), figsize=(2.6 * len(panels), 2.8 * rows),
                           squeeze=False)
  err = {n: np.sqrt(np.mean((np.asarray(x, np.float32) - reference) ** 2, -1))
         for n, x in results.items()} if reference is not None else {}
  vmax = max([float(np.percentile(e, 99)) for e in err.values()] + [1e-6])
  for j, (name, x) in enumerate(panels.items()):
    rgb = np.clip((np.asarray(x, np.float32)[..., list(bands)] - lo) / np.maximum(hi - lo, 1e-12),
                  0, 1)
    axes[0, j].imshow(rgb)
    axes[0, j].set_title(name, fontsize=9)
    if rows == 2:
      if name in err:
        im = axes[1, j].imshow(err[name], cmap="magma", vmin=0, vmax=vmax)
        axes[1, j].set_title(f"RMSE map (mean {err[name].mean():.1f})", fontsize=8)
        fig.colorbar(im, ax=axes[1, j], fraction=0.046, pad=0.02)
      else:
        axes[1, j].axis("off")
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  if title:
    fig.suptitle(title, fontsize=10)
  return fig


# ------------------------------------------------------------------------------------ main


def run(cfg, workdir) -> dict[str, Any]:
  """Samples the cascade on the configured input; returns the metrics dict (may be empty)."""
  workdir = common.setup(workdir)
  meta = require_meta(cfg, workdir)
  rgb, reference, source = load_inputs(cfg, meta)
  params, steps = load_stage_params(cfg, meta, workdir, bool(cfg.sample.use_ema))
  settings = stage_settings(cfg.stages, str(cfg.sample.method), float(cfg.sample.eta))
  common.log(f"sampling {source} {rgb.shape[:2]} with a {meta['num_stages']}-stage cascade "
             f"(checkpoint steps {steps}), {cfg.sample.method} "
             f"{cfg.sample.num_steps or meta['diffusion']['num_timesteps']} steps")
  mesh = sharding.make_mesh(cfg.mesh)
  t0 = time.perf_counter()
  cascade, total_steps = make_cascade(cfg, meta, settings)
  key = jax.random.fold_in(jax.random.key(int(cfg.seed)), 1_000_003)
  rgb_norm = train_scdm.encode(meta, rgb, meta["rgb_bands"])
  x_norm = sample_image(cascade, params, rgb_norm, key, mesh, cfg.sample.tile,
                        cfg.sample.tiles_per_call, model_factor(meta),
                        total_steps, int(cfg.sample.overlap))
  x = train_scdm.decode(meta, x_norm)
  seconds = time.perf_counter() - t0
  common.save_npz(workdir / "samples.npz", X=x, rgb=rgb)
  out: dict[str, Any] = {}
  if reference is not None:
    out = scores(reference, x) | {"seconds": seconds, "checkpoint_steps": steps,
                                  "stages": settings}
    common.write_json(workdir / "metrics.json", train_metrics(workdir) | out)
    common.log("  ".join(f"{k} {v:.4f}" for k, v in scores(reference, x).items()))
  common.save_figure(figure({"SCDM": x}, display_bands(meta), reference,
                            title=f"SCDM on {pathlib.Path(str(source)).name}"),
                     workdir / "samples.png")
  common.log(f"wrote {workdir / 'samples.npz'} (X {x.shape}) in {seconds:.1f} s")
  return out


def train_metrics(workdir: pathlib.Path) -> dict[str, Any]:
  """Keeps the per-stage training entries train_scdm wrote into the same metrics.json."""
  path = pathlib.Path(workdir) / "metrics.json"
  if not path.is_file():
    return {}
  import json  # pylint: disable=g-import-not-at-top
  old = json.loads(path.read_text())
  return {k: v for k, v in old.items() if k.startswith("stage")}


if __name__ == "__main__":
  common.run_main(run, "configs/scdm.py:tiny", "workdirs/scdm", "SCDM config")
