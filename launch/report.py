"""Tables and figures the SDP entry points print and write (one place for all of them)."""
from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from hsijax import data, fileio, plots
from hsijax import sdp
from launch import common


def print_table(table: dict[str, Any]) -> None:
  """The full-reference metrics of every method, then the seconds per phase."""
  rows = {k: v for k, v in table.items() if k not in ("seconds", "conventions")}
  common.log(common.format_table(rows, list(sdp.evaluate.FULL_REFERENCE_KEYS)))
  if "seconds" in table:
    common.log("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in table["seconds"].items()))


def save_fusion_figures(workdir: pathlib.Path, reference: np.ndarray,
                        results: dict[str, np.ndarray], table: dict[str, Any], *,
                        wavelengths_nm=None, y=None, title=None) -> list[pathlib.Path]:
  """fusion.png (false colour + error maps) and band_psnr.png, titled with the table's
  numbers (metrics.json and the figures agree)."""
  label = lambda k: sdp.evaluate.LABELS.get(k, k)
  named = {label(k): v for k, v in results.items()}
  scores = {label(k): v for k, v in table.items() if k in results}
  paths = [workdir / "fusion.png", workdir / "band_psnr.png"]
  common.save_figure(plots.fusion_figure(reference, named, wavelengths_nm=wavelengths_nm,
                                         inputs={"LR-HSI": y} if y is not None else None,
                                         title=title, scores=scores), paths[0])
  common.save_figure(plots.band_psnr_figure(reference, named, wavelengths_nm=wavelengths_nm,
                                            title=title, scores=scores), paths[1])
  return paths


def calibration_line(c: dict, setting: str) -> str:
  """One log line of the blind fit's MSI radiometry (`MethodResults.calibration`)."""
  ratio = f", residual ratio none / affine {c['ss_ratio']:.3g}" if "ss_ratio" in c else ""
  return (f"MSI radiometry ({setting}): model {c['model']}, gain "
          f"{np.round(c['gain'], 4).tolist()}, offset {np.round(c['offset'], 4).tolist()}, "
          f"LR-grid r2 {np.round(c['r2'], 4).tolist()}{ratio}")


def geometry_line(psf, ratio: int) -> str:
  """One log line of where the blind PSF puts the LR-HSI pixels on the HR grid."""
  c = np.round(sdp.blind.footprint_centre(psf), 2) + 0.0  # no "-0.00"
  return (f"blind PSF: LR pixel (i, j) is centred on HR pixel ({ratio} i {c[0]:+.2f}, "
          f"{ratio} j {c[1]:+.2f}); images sharing their outer corners give "
          f"{(ratio - 1) / 2:+.2f} on both axes, a blurred image decimated from its first pixel "
          "+0.00; another value suggests the MSI is misregistered, which the PSF absorbs "
          "(the fused image is on the MSI's grid)")


def blind_fit_lines(out, setting: str) -> list[str]:
  """The log lines of a blind fit (`MethodResults` of `run_methods`): MSI radiometry, geometry."""
  lines = [] if out.calibration is None else [calibration_line(out.calibration, setting)]
  return lines + ([geometry_line(out.psf, out.ratio)] if out.blind else [])


# The `real` preset's solver weights were measured on pairs of 20-30 dB (docs/sdp_results.md);
# on cleaner ones its prior weight cost SDP up to 3.5 dB against its Baseline.
HIGH_SNR_DB = 35.0


def lr_snr_db(pixels: np.ndarray) -> float | None:
  """`sdp.subspace_snr_db` of the LR-HSI's (N, B) pixels; None with 10 bands or fewer, or
  none of their energy outside 10 directions (run.json is strict JSON: no inf)."""
  snr = sdp.subspace_snr_db(pixels, 10) if pixels.shape[-1] > 10 else float("nan")
  return round(snr, 2) if np.isfinite(snr) else None


def snr_line(snr_db: float | None, gam: float) -> str:
  """One log line of the LR-HSI's estimated SNR, with a warning where the prior weight was
  not measured."""
  if snr_db is None:
    return "LR-HSI SNR not estimated (10 bands or fewer, or no energy outside 10 directions)"
  line = (f"LR-HSI SNR about {snr_db:.1f} dB (the energy outside its first 10 principal "
          "directions taken as noise: a lower bound)")
  if snr_db > HIGH_SNR_DB:
    line += (f". Warning: the prior weight (--config.solver.gam={gam:g}) was chosen on pairs "
             "of 20-30 dB; on 40 dB pairs SDP fell below detail injection, on one 3.5 dB "
             "below its own Baseline (docs/sdp_results.md). Compare with X_baseline in "
             "fused.npz, or try --config.solver.gam=3e-5")
  return line


def prior_summary(prior) -> dict[str, Any] | None:
  """What run.json records of the spectral prior."""
  if prior is None:
    return None
  return {k: prior.info.get(k) for k in ("final_loss", "steps", "seconds", "workdir")}


def scene_files(workdir: pathlib.Path, methods: str, shape) -> dict[str, Any]:
  """Disk-backed (H, W, B) results, one per method (a windowed solve writes them by rows)."""
  return {m: fileio.BandFile.create(workdir / f".result_{m}.bsq", shape)
          for m in methods.split(",")}


def remove_scene_files(files: dict[str, Any] | None) -> None:
  for f in (files or {}).values():
    f.close()
    f.path.unlink(missing_ok=True)


def write_fused(workdir: pathlib.Path, out, main: str, inp: dict, hsi_spec: str,
                msi_spec: str) -> list[str]:
  """fused.npz (X = `main`, X_baseline, valid, psf, srf, scale) in the LR-HSI's units, and
  fused.tif (bands first, float32, the HR-MSI's georeferencing) when the HR-MSI is a TIFF,
  fused.img / .hdr (ENVI, with wavelengths) when the LR-HSI is ENVI. NaN = no data."""
  scale, valid = inp["scale"]["hsi"], inp["valid"]
  results = {k: sdp.finish_output(v, scale, valid) for k, v in out.results.items()
             if k in (main, "baseline")}
  extra = {"X_baseline": results["baseline"]} if "baseline" in results and main != \
      "baseline" else {}
  if valid is not None:
    extra["valid"] = valid
  common.save_npz(workdir / "fused.npz", X=results[main], **extra, psf=out.psf, srf=out.srf,
                  scale=np.float32(scale))
  written = [str(workdir / "fused.npz")]
  msi, _ = data.parse_path_key(msi_spec)
  nodata = -9999.0 if valid is not None else None
  if pathlib.Path(msi).suffix.lower() in (".tif", ".tiff"):
    data.write_geotiff(workdir / "fused.tif", results[main], data.geotiff_tags(msi), nodata)
    written.append(str(workdir / "fused.tif"))
  hsi, _ = data.parse_path_key(hsi_spec)
  if pathlib.Path(hsi).suffix.lower() == ".hdr" or data.is_envi(hsi):
    data.write_envi(workdir / "fused", results[main], inp["wavelengths"], nodata)
    written.append(str(workdir / "fused.img"))
  return written
