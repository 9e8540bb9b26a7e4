"""Samples hyperspectral cubes from RGB with a trained SCDM cascade.

    python -m launch.sample_scdm --config=configs/scdm.py:tiny \
        --config.data.path=../shared/data/cubes/houston2018_crop.npz:cube \
        --config.data.split=quadrant --workdir=workdirs/scdm_tiny
    # the user's own RGB image (and optionally its reference cube for metrics):
    python -m launch.sample_scdm --config=configs/scdm.py:paper_houston \
        --config.data.rgb=scene.npz:rgb [--config.data.reference=scene.npz:cube] \
        --workdir=workdirs/scdm_houston
    # two processes (on one machine or two hosts): the same command with
    #   --coordinator_address=HOST:12345 --num_processes=2 --process_id=0   (and =1)

Reads the cascade `launch.train_scdm` trained in the same DIR (hsijax.scdm.load: EMA weights
of every stage) and samples it (hsijax.scdm.sample): images of any size are cut into
overlapping `sample.tile` tiles, sharded over the devices `sample.tiles_per_call` at a time,
and blended back. Per-stage guidance / truncation come from `config.stages[k]`.

Writes DIR/samples.npz (array `X`, (H, W, N) in the data's original units, and `rgb`; with
--config.data.split=quadrant X is the held-out quadrant), DIR/samples.png, and with a
reference DIR/metrics.json {"mpsnr", "sam_deg", "sam_rad", "mssim", "rmse", "generated_bands"
(the same scores without the RGB input bands), ..., "conventions"} (RMSE in original units;
the all-band MPSNR caps every band's PSNR at 100 dB, hsijax.scdm.evaluate.capped_mpsnr,
since a residual cascade returns the input bands exactly).
"""
from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import jax

from configs import common as config_common
from configs import scdm as scdm_config
from hsijax import metrics, plots, scdm, sharding
from hsijax.scdm import evaluate as scdm_eval
from launch import common, runner, scdm_data


def run(cfg, workdir) -> dict[str, Any]:
  """Samples the cascade on the configured input; returns the metrics dict (may be empty)."""
  scdm_config.validate(cfg)
  workdir = common.setup(workdir)
  cascade = scdm.load(workdir, use_ema=bool(cfg.sample.use_ema))
  if len(cfg.stages) != cascade.num_stages:
    raise ValueError(f"{workdir} holds a {cascade.num_stages}-stage cascade but the config "
                     f"has {len(cfg.stages)} stage settings; use the preset modifier "
                     f"',stages={cascade.num_stages}'")
  rgb, reference, source = scdm_data.sampling_inputs(cfg, cascade.num_bands,
                                                     cascade.rgb_bands)
  stages = scdm_config.split_stage_list(cfg)
  settings = scdm_config.sample_settings(cfg)
  common.log(f"sampling {source} {rgb.shape[:2]} with a {cascade.num_stages}-stage cascade "
             f"(checkpoint steps {list(cascade.steps)}), {settings['method']} "
             f"{settings['num_steps'] or cascade.num_timesteps} steps")
  t0 = time.perf_counter()
  key = jax.random.fold_in(jax.random.key(int(cfg.seed)), 1_000_003)
  x = scdm.sample(cascade, rgb, key=key, stages=stages, mesh=sharding.make_mesh(cfg.mesh),
                  policy=config_common.policy(cfg), **settings)
  seconds = time.perf_counter() - t0
  common.save_npz(workdir / "samples.npz", X=x, rgb=rgb)
  out: dict[str, Any] = {}
  if reference is not None:
    all_bands, generated = scdm_eval.score(reference, {"x": x}, cascade.rgb_bands)
    scores = all_bands["x"]
    out = scores | {"generated_bands": generated["x"], "seconds": seconds, "checkpoint_steps": list(cascade.steps),
                    "stages": stages, "conventions": metrics.CONVENTIONS}
    common.write_json(workdir / "metrics.json", train_metrics(workdir) | out)
    common.log("all bands (MPSNR capped per band at 100 dB): " + "  ".join(
        f"{k} {v:.4f}" for k, v in scores.items()))
    common.log(f"the {reference.shape[-1] - 3} non-input bands: " + "  ".join(
        f"{k} {v:.4f}" for k, v in generated["x"].items()))
  bands = sorted(cascade.rgb_bands, reverse=True)  # longest wavelength as red
  common.save_figure(plots.fusion_figure(
      reference, {"SCDM": x}, bands=bands, title=f"SCDM on {pathlib.Path(str(source)).name}",
      scores={"SCDM": out} if out else None), workdir / "samples.png")
  common.log(f"wrote {workdir / 'samples.npz'} (X {x.shape}) in {seconds:.1f} s")
  return out


def train_metrics(workdir: pathlib.Path) -> dict[str, Any]:
  """Keeps the per-stage training entries train_scdm wrote into the same metrics.json."""
  path = pathlib.Path(workdir) / "metrics.json"
  if not path.is_file():
    return {}
  return {k: v for k, v in json.loads(path.read_text()).items() if k.startswith("stage")}


if __name__ == "__main__":
  runner.run_main(run, "configs/scdm.py:tiny", "workdirs/scdm", "SCDM config")
