"""Trains the spectral diffusion prior ("SDM") of SDP on clean spectra.

    python -m launch.train_sdm --config=configs/sdp.py:crop \
        --config.data.path=../shared/data/cubes/pavia_centre_crop.npz --workdir=workdirs/sdm
    python -m launch.train_sdm --config=configs/sdp.py:real \
        --config.data.train_pixels=clean.npz:pixels --workdir=workdirs/sdm
    python -m launch.train_sdm --config=configs/sdp.py:demo --workdir=workdirs/sdm_demo
    # two processes (on one machine or two hosts; CPU devices use gloo collectives):
    python -m launch.train_sdm --config=configs/sdp.py:crop --config.data.path=CUBE.npz \
        --workdir=workdirs/sdm --coordinator_address=HOST:12345 --num_processes=2 \
        --process_id=0     # and --process_id=1 on the second process

Pixels: `data.train_pixels` (N, B) or (h, w, B) if given (normalised to [0, 1] when outside
it); otherwise the training half of `data.path` under the simulation protocol (the pixels
evaluate_sdp trains on); otherwise the demo's synthetic scene. Library calls:
hsijax.sdp.train_prior, hsijax.sdp.evaluate_fid; load the result with
hsijax.sdp.load_prior(DIR).

Writes DIR/checkpoints/ (Orbax, every train.checkpoint_every steps; a killed run resumes from
the latest one and ends with the same parameters as an uninterrupted run), DIR/prior.json
(what the checkpoints were trained on; another scene or setting in the same DIR is refused)
and DIR/metrics.json {"final_loss", "fid", "steps", "num_pixels", "num_bands", "seconds",
"loss_history"}.
"""
from __future__ import annotations

import time

import jax
import numpy as np

from configs import common as config_common
from configs import sdp as sdp_config
from hsijax import degrade, progress, sharding
from hsijax import sdp
from launch import common, runner, scdm_data, scenes


def tfds_pixels(cfg):
  """(a pixel sample (n, B) in [0, 1], batches(step) -> (batch, B), description) of a TFDS
  dataset read through grain; pixels are divided by the sample's maximum."""
  from hsijax import datasets  # pylint: disable=g-import-not-at-top
  source = scdm_data.tfds_source(cfg)
  sample = scdm_data.tfds_sample(source, 65536, int(cfg.seed))
  peak = float(sample.max()) if sample.size and sample.max() > 0 else 1.0
  raw = datasets.prior_pixel_batches(source, batch=int(cfg.train.batch), seed=int(cfg.seed),
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count())
  batches = lambda step: np.clip(np.asarray(raw(step), np.float32) / peak, 0.0, 1.0)
  return np.clip(sample / peak, 0, 1), batches, f"TFDS {cfg.data.tfds} (scaled by 1/{peak:g})"


def training_pixels(cfg) -> tuple[np.ndarray, str]:
  """(N, B) clean spectra in [0, 1] and a description of where they came from."""
  if cfg.data.train_pixels:
    a = common.load_input(cfg.data.train_pixels, "--config.data.train_pixels", (2, 3))
    a = a.reshape(-1, a.shape[-1])
    if a.max() > 1 or a.min() < 0:
      a = np.asarray(degrade.normalise_cube(a), np.float32)
    return a, f"{cfg.data.train_pixels} {a.shape}"
  scene = scenes.load_scene(cfg)
  cube = degrade.normalise_cube(scene.cube)
  pixels = np.asarray(cube[:cube.shape[0] // 2].reshape(-1, cube.shape[-1]), np.float32)
  return pixels, f"training half of {scene.description}: {pixels.shape}"


def run(config, workdir: str) -> dict:
  """Runs with a (possibly unresolved) SDP config; returns what metrics.json holds."""
  workdir = common.setup(workdir)
  cfg = sdp_config.resolve(config)
  t0 = time.perf_counter()
  batches = None
  if cfg.data.tfds:
    pixels, batches, source = tfds_pixels(cfg)
  else:
    pixels, source = training_pixels(cfg)
  common.log(f"training on {source}; {cfg.train.steps} steps")
  prior = sdp.train_prior(pixels, steps=cfg.train.steps, key=cfg.seed, workdir=workdir,
                          mesh=sharding.make_mesh(cfg.mesh), policy=config_common.policy(cfg),
                          batches=batches, **sdp_config.prior_settings(cfg))
  num = int(min(cfg.train.fid_samples, max(pixels.shape[0], 2 * pixels.shape[-1] + 2)))
  with progress.bar(prior.num_timesteps, desc="FID sampling"):
    fid = sdp.evaluate_fid(prior.model, prior.params, prior.schedule(), pixels,
                           jax.random.fold_in(jax.random.key(cfg.seed), 2), num=num)
  out = {
      "final_loss": prior.info["final_loss"], "fid": fid, "steps": prior.info["steps"],
      "num_pixels": int(pixels.shape[0]), "num_bands": int(pixels.shape[1]),
      "seconds": time.perf_counter() - t0, "loss_history": prior.info["history"],
  }
  common.write_json(workdir / "metrics.json", out)
  loss = out["final_loss"]
  common.log(f"final loss {'n/a' if loss is None else f'{loss:.4f}'}, spectral FID "
             f"{fid:.4g}; wrote {workdir / 'metrics.json'}")
  return out


if __name__ == "__main__":
  runner.run_main(run, "configs/sdp.py:demo", "workdirs/train_sdm", "SDP config")
