"""Trains the spectral diffusion model ("SDM") of SDP on clean spectra.

    python -m launch.train_sdm --config=configs/sdp.py:crop \
        --config.data.path=../shared/data/cubes/pavia_centre_crop.npz --workdir=workdirs/sdm
    python -m launch.train_sdm --config=configs/sdp.py:real \
        --config.data.train_pixels=clean.npz:pixels --workdir=workdirs/sdm
    python -m launch.train_sdm --config=configs/sdp.py:demo --workdir=workdirs/sdm_demo

Pixels: `data.train_pixels` (N, B) or (h, w, B) if given (normalised to [0, 1] when its
max exceeds 1); otherwise the training half of `data.path` under the Wald protocol (the
pixels evaluate_sdp trains on); otherwise the demo's synthetic scene.

Writes DIR/checkpoints/ (Orbax, every train.checkpoint_every steps; a killed run resumes from
the latest one and ends with the same parameters as an uninterrupted run) and
DIR/metrics.json {"final_loss", "fid", "steps", "num_pixels", "num_bands", "seconds",
"loss_history"}.
"""
from __future__ import annotations

import time

import numpy as np

from configs import sdp as sdp_config
from hsijax import data, degrade
from launch import common, sdp_pipeline


def training_pixels(cfg) -> tuple[np.ndarray, str]:
  """(N, B) clean spectra in [0, 1] and a description of where they came from."""
  if cfg.data.train_pixels:
    a = sdp_pipeline.check_finite(data.load_array(cfg.data.train_pixels),
                                  cfg.data.train_pixels, "--config.data.train_pixels")
    if a.ndim not in (2, 3):
      raise ValueError(f"train_pixels must be (N, B) spectra or an (h, w, B) image, got "
                       f"{a.shape}; fix --config.data.train_pixels")
    a = a.reshape(-1, a.shape[-1])
    if a.max() > 1 or a.min() < 0:
      a = np.asarray(degrade.normalise_cube(a), np.float32)
    return a, f"{cfg.data.train_pixels} {a.shape}"
  scene = sdp_pipeline.load_scene(cfg)
  wd = sdp_pipeline.wald(scene, cfg)
  pixels = np.asarray(wd.train_pixels, np.float32)
  return pixels, f"training half of {scene.description}: {pixels.shape}"


def run(config, workdir: str) -> dict:
  """Runs with a (possibly unresolved) SDP config; returns what metrics.json holds."""
  workdir = common.setup(workdir)
  cfg = sdp_config.resolve(config)
  t0 = time.perf_counter()
  pixels, source = training_pixels(cfg)
  common.log(f"training on {source}; {cfg.train.steps} steps")
  model, params, info = sdp_pipeline.train_prior(pixels, cfg, workdir)
  fid = sdp_pipeline.spectral_fid(model, params, cfg, pixels)
  out = {
      "final_loss": info["final_loss"],
      "fid": fid,
      "steps": info["steps"],
      "num_pixels": int(pixels.shape[0]),
      "num_bands": int(pixels.shape[1]),
      "seconds": time.perf_counter() - t0,
      "loss_history": info["history"],
  }
  common.write_json(workdir / "metrics.json", out)
  common.log(f"final loss {out['final_loss']:.4f}, spectral FID {fid:.4g}; wrote "
             f"{workdir / 'metrics.json'}")
  return out


if __name__ == "__main__":
  common.run_main(run, "configs/sdp.py:demo", "workdirs/train_sdm", "SDP config")
