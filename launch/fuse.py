"""SDP on a user's own LR-HSI and HR-MSI (SPEC section 7).

    python -m launch.fuse --config=configs/sdp.py:real \
        --config.data.hsi=lr_hsi.npz:Y --config.data.msi=hr_msi.npz:Z \
        [--config.data.reference=ref.npz:X] [--config.data.train_pixels=clean.npz:pixels] \
        [--config.data.psf=psf.npz:psf] [--config.data.srf=srf.npz:srf] \
        [--config.budget=fast] --workdir=workdirs/fuse

Inputs are FILE[:KEY] (.npz / .mat / .h5 / .tif / .npy): the LR-HSI (h, w, B) and the HR-MSI
(H, W, b) with H = r h, W = r w for any integer ratio r (inferred from the shapes). The PSF
(k, k) and SRF (b, B) are estimated blindly unless given; the spectral model is trained on the
LR-HSI's pixels unless clean `train_pixels` (N, B) or (n, m, B) are given. Negative values are
clipped and the data scaled to [0, 1] (`data.scale`: joint | separate | none); the output is
returned in the LR-HSI's original units.

Writes DIR/fused.npz (X: the SDP result (H, W, B); also X_baseline, psf, srf, scale),
DIR/metrics.json {"sdp": {d_lambda, d_s, qnr[, psnr, sam, rmse, ergas, uiqi]}, "baseline":
{...}, "<classical method>": {...}, "seconds": {...}} (full-reference metrics only with a
reference), DIR/run.json, DIR/checkpoints/, and with a reference DIR/fusion.png and
DIR/band_psnr.png.

Large scenes: `--config.solver.tile=64 --config.solver.tile_overlap=16
--config.solver.tiles_per_call=8` solves overlapping windows (multiples of the ratio) sharded
over the devices, in bounded memory (hsijax.sdp.tiled; docs/scaling.md).
"""
from __future__ import annotations

import time

import ml_collections
import numpy as np

from configs import sdp as sdp_config
from hsijax import data
from launch import common, sdp_pipeline


def _load(spec: str, flag: str, ndim: tuple[int, ...]) -> np.ndarray:
  try:
    a = np.asarray(data.load_array(spec), np.float32)
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise type(e)(f"{flag}={spec}: {e}") from e
  if a.ndim not in ndim:
    raise ValueError(f"{flag}={spec} is {a.shape}; expected {' or '.join(f'{n}-D' for n in ndim)}"
                     f" (images are rows x columns x bands); pick the right FILE:KEY")
  return sdp_pipeline.check_finite(a, spec, flag)


def load_inputs(cfg) -> dict:
  """Loads, checks and scales every input; returns a dict of arrays and the scales."""
  if not cfg.data.hsi or not cfg.data.msi:
    raise ValueError("fuse needs both images: pass --config.data.hsi=FILE[:KEY] (LR-HSI, "
                     "h x w x B) and --config.data.msi=FILE[:KEY] (HR-MSI, H x W x b)")
  y = _load(cfg.data.hsi, "--config.data.hsi", (3,))
  z = _load(cfg.data.msi, "--config.data.msi", (3,))
  ratio = sdp_pipeline.infer_ratio(y.shape, z.shape)
  if z.shape[-1] >= y.shape[-1]:
    raise ValueError(f"the HR-MSI has {z.shape[-1]} bands and the LR-HSI {y.shape[-1]}; the "
                     f"hyperspectral image must have more bands (did you swap "
                     f"--config.data.hsi and --config.data.msi?)")
  psf = _load(cfg.data.psf, "--config.data.psf", (2,)) if cfg.data.psf else None
  srf = _load(cfg.data.srf, "--config.data.srf", (2,)) if cfg.data.srf else None
  sdp_pipeline.check_operators(psf, srf, y.shape[-1], z.shape[-1])
  if psf is not None:
    psf = psf / psf.sum()
  ref = None
  if cfg.data.reference:
    ref = _load(cfg.data.reference, "--config.data.reference", (3,))
    want = z.shape[:2] + y.shape[-1:]
    if ref.shape != want:
      raise ValueError(f"reference is {ref.shape} but must be (H, W, B) = {want} (HR-MSI "
                       f"size, LR-HSI bands); fix --config.data.reference")
  pixels = None
  if cfg.data.train_pixels:
    pixels = _load(cfg.data.train_pixels, "--config.data.train_pixels", (2, 3))
    pixels = pixels.reshape(-1, pixels.shape[-1])
    if pixels.shape[-1] != y.shape[-1]:
      raise ValueError(f"train_pixels have {pixels.shape[-1]} bands but the LR-HSI has "
                       f"{y.shape[-1]}; give clean spectra of the same sensor")

  y, z = np.maximum(y, 0), np.maximum(z, 0)
  if cfg.data.scale == "joint":
    s_y = s_z = float(max(y.max(), z.max()))
  elif cfg.data.scale == "separate":
    s_y, s_z = float(y.max()), float(z.max())
  elif cfg.data.scale == "none":
    s_y = s_z = 1.0
  else:
    raise ValueError(f"unknown data.scale {cfg.data.scale!r}; use joint, separate or none")
  if not (s_y > 0 and s_z > 0):
    raise ValueError("an input image is all zeros (or negative); check --config.data.hsi / msi")
  return {
      "y": y / s_y, "z": z / s_z, "ratio": ratio, "psf": psf, "srf": srf,
      "reference": None if ref is None else np.maximum(ref, 0) / s_y,
      "train_pixels": (y / s_y).reshape(-1, y.shape[-1]) if pixels is None
                      else np.clip(np.maximum(pixels, 0) / s_y, 0, 1),
      "pixel_source": "LR-HSI" if pixels is None else cfg.data.train_pixels,
      "scale": {"hsi": s_y, "msi": s_z},
  }


def run(config, workdir: str) -> dict:
  """Runs with a (possibly unresolved) SDP config; returns what metrics.json holds."""
  workdir = common.setup(workdir)
  t_start = time.perf_counter()
  inp = load_inputs(config)
  y, z, ratio = inp["y"], inp["z"], inp["ratio"]
  raw = ml_collections.ConfigDict(config.to_dict())
  raw.data.ratio = ratio  # the ratio comes from the shapes (and sets the blind PSF size)
  cfg = sdp_config.resolve(raw)
  common.log(f"LR-HSI {y.shape}, HR-MSI {z.shape}, ratio {ratio}; spectral model on "
             f"{inp['train_pixels'].shape[0]} pixels of {inp['pixel_source']}")
  model, params, info = sdp_pipeline.train_prior(inp["train_pixels"], cfg, workdir)
  fusion = sdp_pipeline.fuse_all(y, z, cfg, model=model, params=params, psf=inp["psf"],
                                 srf=inp["srf"])
  table = sdp_pipeline.no_reference_table(fusion.results, y, z, ratio)
  if inp["reference"] is not None:
    full = sdp_pipeline.reference_table(inp["reference"], fusion.results, ratio)
    table = {k: {**full[k], **v} for k, v in table.items()}
  seconds = {"train": info["seconds"], **fusion.seconds, "total": time.perf_counter() - t_start}
  s_y = inp["scale"]["hsi"]
  common.save_npz(workdir / "fused.npz", X=fusion.results["sdp"] * s_y,
                  X_baseline=fusion.results["baseline"] * s_y, psf=fusion.psf, srf=fusion.srf,
                  scale=np.float32(s_y))
  result = {**table, "seconds": seconds}
  common.write_json(workdir / "metrics.json", result)
  common.write_json(workdir / "run.json", {
      "ratio": ratio, "blind": fusion.blind, "scale": inp["scale"],
      "train": {"final_loss": info["final_loss"], "steps": info["steps"]},
      "config": common.config_to_dict(cfg)})
  if inp["reference"] is not None:
    sdp_pipeline.save_figures(workdir, inp["reference"],
                              {sdp_pipeline.LABELS.get(k, k): v
                               for k, v in fusion.results.items()}, y=y)
    sdp_pipeline.print_table(table)
  else:
    common.log(common.format_table(table, ["d_lambda", "d_s", "qnr"]))
  common.log(f"wrote {workdir / 'fused.npz'} and {workdir / 'metrics.json'}")
  return result


if __name__ == "__main__":
  common.run_main(run, "configs/sdp.py:real", "workdirs/fuse", "SDP config")
