"""SDP on a user's own LR-HSI and HR-MSI.

    python -m launch.fuse --config=configs/sdp.py:real \
        --config.data.hsi=lr_hsi.npz:Y --config.data.msi=hr_msi.npz:Z \
        [--config.data.reference=ref.npz:X] [--config.data.train_pixels=clean.npz:pixels] \
        [--config.data.psf=psf.npz:psf] [--config.data.srf=srf.npz:srf] \
        [--config.methods=sdp,baseline] [--config.budget=fast] --workdir=workdirs/fuse

Inputs are FILE[:KEY] (.npz / .mat / .h5 / .tif / .npy / ENVI): the LR-HSI (h, w, B) and the
HR-MSI (H, W, b), H = r h, W = r w for any integer ratio r (from the shapes). PSF (k, k) and
SRF (b, B) are estimated blindly unless given; the prior is trained on the LR-HSI's pixels
(projected onto `data.train_rank` principal directions) unless clean `train_pixels` are given.
Both images are scaled to [0, 1] (`data.scale`), the output is in the LR-HSI's units. The
inputs are opened lazily: when the scene does not fit the memory budget (`memory_gb`) they
are only read window by window, the prior trains on at most `data.max_train_pixels` LR-HSI
pixels spread over the scene, and the blind fit uses the central `blind.crop`^2 LR pixels.
Library calls: hsijax.sdp.scale_pair, check_pair, low_rank_pixels, train_prior, run_methods.

Writes DIR/fused.npz (X: SDP (H, W, B); X_baseline; psf, srf, scale), DIR/metrics.json
({method: {d_lambda, d_s, qnr[, psnr, sam, rmse, ergas, uiqi]}, "seconds", "conventions"}),
DIR/run.json, DIR/checkpoints/ and DIR/prior.json, and with a reference DIR/fusion.png and
DIR/band_psnr.png. No-data pixels of the inputs (ENVI data ignore value, TIFF nodata, NaN)
are filled for the solve, left out of the prior's training and of the metrics (pixel
metrics over the pixels with data, window / block metrics over the windows without no-data)
and NaN in X (`valid` in fused.npz).
"""
from __future__ import annotations

import time

import jax
import numpy as np

from configs import common as config_common
from configs import sdp as sdp_config
from hsijax import metrics, sharding, windowed
from hsijax import sdp
from launch import common, runner, report


def load_inputs(cfg) -> dict:
  """Loads, checks and scales every input; returns a dict of arrays and the scales."""
  if not cfg.data.hsi or not cfg.data.msi:
    raise ValueError("fuse needs both images: pass --config.data.hsi=FILE[:KEY] (LR-HSI, "
                     "h x w x B) and --config.data.msi=FILE[:KEY] (HR-MSI, H x W x b)")
  # Opened, not read: a windowed solve reads them window by window (hsijax.windowed).
  y, y_valid, wavelengths = common.open_image(cfg.data.hsi, "--config.data.hsi")
  z, z_valid, _ = common.open_image(cfg.data.msi, "--config.data.msi")
  opt = lambda spec, flag, nd: common.load_input(spec, flag, nd) if spec else None
  psf = opt(cfg.data.psf, "--config.data.psf", (2,))
  srf = opt(cfg.data.srf, "--config.data.srf", (2,))
  ratio = sdp.check_pair(y, z, psf=psf, srf=srf, psf_size=cfg.blind.psf_size,
                         names=("--config.data.hsi", "--config.data.msi"),
                         same_units=cfg.data.scale == "joint")
  y, z, scale = sdp.scale_pair(y, z, cfg.data.scale)
  common.log(f"scaled the LR-HSI by 1/{scale['hsi']:.6g} and the HR-MSI by "
             f"1/{scale['msi']:.6g} ({cfg.data.scale}); negative values clipped to 0: "
             f"{scale['clipped']['hsi']} in the LR-HSI, {scale['clipped']['msi']} in the HR-MSI")
  ref = opt(cfg.data.reference, "--config.data.reference", (3,))
  if ref is not None and ref.shape != z.shape[:2] + y.shape[-1:]:
    raise ValueError(f"reference is {ref.shape} but must be (H, W, B) = {z.shape[:2] + y.shape[-1:]}"
                     " (HR-MSI size, LR-HSI bands); fix --config.data.reference")
  pixels = opt(cfg.data.train_pixels, "--config.data.train_pixels", (2, 3))
  if pixels is not None:
    pixels = pixels.reshape(-1, pixels.shape[-1])
    if pixels.shape[-1] != y.shape[-1]:
      raise ValueError(f"train_pixels have {pixels.shape[-1]} bands but the LR-HSI has "
                       f"{y.shape[-1]}; give clean spectra of the same sensor")
  # Every valid LR-HSI pixel (or a sample over a large scene): noise estimate, prior's pixels.
  lr_pixels = windowed.sample_pixels(y, cfg.data.max_train_pixels, seed=cfg.seed, valid=y_valid)
  return {
      "y": y, "z": z, "ratio": ratio, "psf": psf, "srf": srf, "scale": scale,
      "valid": sdp.fused_valid(y_valid, z_valid, ratio), "wavelengths": wavelengths,
      "reference": None if ref is None else np.maximum(ref, 0) / scale["hsi"],
      "train_pixels": sdp.low_rank_pixels(lr_pixels, cfg.data.train_rank) if pixels is None
                      else np.clip(np.maximum(pixels, 0) / scale["hsi"], 0, 1),
      "snr_db": report.lr_snr_db(lr_pixels),
      "pixel_source": cfg.data.train_pixels if pixels is not None else "LR-HSI" + (
          f" (rank {cfg.data.train_rank} projection)" if cfg.data.train_rank else ""),
  }


def run(config, workdir: str) -> dict:
  """Runs with a (possibly unresolved) SDP config; returns what metrics.json holds."""
  workdir = common.setup(workdir)
  t_start = time.perf_counter()
  cfg = sdp_config.resolve(config)
  methods = sdp_config.methods(cfg)
  inp = load_inputs(cfg)
  y, z, ratio = inp["y"], inp["z"], inp["ratio"]
  settings = sdp.FusionSettings.from_kwargs(**sdp_config.fusion_settings(cfg))
  mesh, policy = sharding.make_mesh(cfg.mesh), config_common.policy(cfg)
  windows = sdp.plan_windows(z.shape[:2] + y.shape[-1:], z.shape[-1], ratio, settings,
                             hidden=cfg.model.hidden, devices=mesh.shape["data"],
                             methods=len(methods.split(",")))
  if windows[0]:
    sdp.tiled.check_tiling(windows[0], windows[1], ratio, windows[2])
  else:  # the whole scene fits the budget: read it once
    y, z = inp["y"], inp["z"] = windowed.load(y), windowed.load(z)
  prior = None
  if "sdp" in sdp.evaluate.check_methods(methods):
    common.log(f"LR-HSI {y.shape}, HR-MSI {z.shape}, ratio {ratio}; spectral prior on "
               f"{inp['train_pixels'].shape[0]} pixels of {inp['pixel_source']}")
    common.log(report.snr_line(inp["snr_db"], settings.gam))
    prior = sdp.train_prior(inp["train_pixels"], steps=cfg.train.steps, key=cfg.seed,
                            workdir=workdir, mesh=mesh, policy=policy,
                            **sdp_config.prior_settings(cfg))
  # A windowed plan keeps every result on disk (written strip by strip), not in memory.
  files = report.scene_files(workdir, methods, z.shape[:2] + y.shape[-1:]) if windows[0] \
      else None
  common.log(f"solving {'the whole scene at once' if not windows[0] else f'{windows[0]}-pixel windows'}"
             f" (memory budget {settings.memory_gb or sdp.fusion.default_memory_gb():.1f} GB)")
  out = sdp.run_methods(y, z, prior=prior, key=jax.random.fold_in(jax.random.key(cfg.seed), 1),
                        methods=methods, psf=inp["psf"], srf=inp["srf"],
                        steps=cfg.solver.num_steps, mesh=mesh, policy=policy, outputs=files,
                        **sdp_config.fusion_settings(cfg))
  for line in report.blind_fit_lines(out, cfg.blind.radiometry):
    common.log(line)
  # No-data pixels are left out of every metric (pixels, windows or Q blocks holding them).
  table = sdp.no_reference_table(out.results, y, z, ratio, valid=inp["valid"])
  if inp["reference"] is not None:
    full = sdp.reference_table(inp["reference"], out.results, ratio, valid=inp["valid"])
    table = {k: {**full[k], **v} for k, v in table.items()}
  seconds = {"train": prior.info["seconds"] if prior else 0.0, **out.seconds,
             "total": time.perf_counter() - t_start}
  main = "sdp" if "sdp" in out.results else next(iter(out.results))
  written = report.write_fused(workdir, out, main, inp, cfg.data.hsi, cfg.data.msi)
  result = {**table, "seconds": seconds, "conventions": metrics.CONVENTIONS}
  common.write_json(workdir / "metrics.json", result)
  common.write_json(workdir / "run.json", {
      "ratio": ratio, "blind": out.blind, "msi_calibration": out.calibration,
      "lr_pixel_centre_hr_px": sdp.blind.footprint_centre(out.psf).round(3).tolist(),
      "lr_hsi_snr_db": inp["snr_db"],
      "scale": inp["scale"], "methods": list(out.results),
      "output_X": main, "train": report.prior_summary(prior), "windows": windows,
      "files": written, "policy": policy.__dict__,
      "no_data_pixels": 0 if inp["valid"] is None else int((~inp["valid"]).sum()),
      "config": common.config_to_dict(cfg)})
  if inp["reference"] is not None and not windows[0]:
    report.save_fusion_figures(workdir, inp["reference"], out.results, table, y=y)
    report.print_table(table)
  else:
    common.log(common.format_table(table, ["d_lambda", "d_s", "qnr"]))
  report.remove_scene_files(files)
  common.log(f"wrote {', '.join(written)} (X = {main}) and {workdir / 'metrics.json'}")
  return result


if __name__ == "__main__":
  runner.run_main(run, "configs/sdp.py:real", "workdirs/fuse", "SDP config")
