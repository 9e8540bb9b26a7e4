"""Comparing fusion methods: SDP, the Baseline and the classical methods on one problem.

    out = hsijax.sdp.run_methods(y, z, prior=prior, key=1, steps=100)
    table = hsijax.sdp.reference_table(x_true, out.results, out.ratio)

and the paper's simulation protocol on a real cube (`evaluate_cube`): normalise the cube,
train the prior on its top half, simulate the LR-HSI (PSF blur, decimation, noise) and the
HR-MSI (SRF, noise) from its bottom half (Wald's protocol), run every method with the same
(blind or known) operators and score them against the bottom half.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, Sequence

import jax
import numpy as np

from hsijax import classical, degrade, metrics, tiling, windowed
from hsijax import settings as settings_lib
from hsijax.sdp import fusion as fusion_lib
from hsijax.sdp import prior as prior_lib
from hsijax.sdp.inputs import check_pair

METHODS = ("sdp", "baseline") + tuple(classical.METHODS)
LABELS = {"sdp": "SDP", "baseline": "Baseline", "bicubic": "Bicubic",
          "detail_injection": "Detail inj.", "subspace_ls": "Subspace LS"}
FULL_REFERENCE_KEYS = ("psnr", "sam", "rmse", "ergas", "uiqi")
NO_REFERENCE_KEYS = ("d_lambda", "d_s", "qnr")


@dataclasses.dataclass
class MethodResults:
  """Outputs of `run_methods`: method -> (H, W, B) in [0, 1], the shared operators, times."""
  results: dict[str, np.ndarray]
  psf: np.ndarray
  srf: np.ndarray
  ratio: int
  blind: bool
  seconds: dict[str, float]
  # The MSI's radiometric calibration when blind (`fusion.estimate_calibrated`), else None.
  calibration: dict[str, Any] | None = None


def check_methods(methods: Sequence[str] | str) -> tuple[str, ...]:
  """Method names from a sequence or a comma-separated string; refuses unknown ones."""
  if isinstance(methods, str):
    methods = [m.strip() for m in methods.split(",") if m.strip()]
  methods = tuple(dict.fromkeys(methods))
  unknown = [m for m in methods if m not in METHODS]
  if unknown or not methods:
    raise ValueError(f"unknown method(s) {unknown or methods!r}; choose from {METHODS} "
                     "(e.g. --config.methods=sdp,baseline)")
  return methods


def run_methods(y: Any, z: Any, *, prior: prior_lib.Prior | None, key: Any,
                methods: Sequence[str] | str = METHODS, psf: Any = None, srf: Any = None,
                steps: int | None = None, mesh: jax.sharding.Mesh | None = None,
                show_progress: bool = True, policy: Any = None,
                outputs: dict[str, Any] | None = None, **settings: Any) -> MethodResults:
  """Runs the chosen methods with one set of operators (estimated once when not given).

  Args:
    y, z: the (h, w, B) LR-HSI and (H, W, b) HR-MSI in [0, 1]: arrays, or images read by
      windows (`hsijax.windowed`, e.g. `scale_pair` of `open_image`s), which with `outputs`
      are only ever read window by window.
    prior: the spectral prior ("sdp" needs it).
    key: key or int seed of the SDP / Baseline solves (both use the same key).
    methods: names from METHODS (default all).
    psf, srf, steps, mesh, policy, **settings: as for `fuse`.
    outputs: method -> an (H, W, B) array to write into (e.g. `fileio.BandFile` on disk):
      the solve is then windowed as `fuse` plans it and the classical methods run window
      by window on the same grid (each window with its own regression / subspace), so no
      scene-sized array is ever held in memory.
  """
  methods = check_methods(methods)
  if "sdp" in methods and prior is None:
    raise ValueError("method 'sdp' needs a trained prior; pass prior= or drop 'sdp'")
  s = fusion_lib.FusionSettings.from_kwargs(**settings)
  y, z = windowed.as_image(y), windowed.as_image(z)
  if outputs is None:  # every result is held in memory, so the inputs can be too
    y, z = windowed.load(y), windowed.load(z)
  ratio = check_pair(y, z, psf=psf, srf=srf, psf_size=s.psf_size)
  seconds: dict[str, float] = {}
  blind = psf is None or srf is None
  calibration = None
  if blind:
    t0 = time.perf_counter()
    # Every method then sees the same MSI, in the LR-HSI's units when calibrated.
    est_psf, est_srf, z, calibration = fusion_lib.estimate_calibrated(
        y, z, ratio, steps=s.blind_steps, lr=s.blind_lr, psf_size=s.psf_size,
        radiometry=s.blind_radiometry if srf is None else "none", crop=s.blind_crop)
    seconds["blind"] = time.perf_counter() - t0
    psf = est_psf if psf is None else psf
    srf = est_srf if srf is None else srf
  psf = fusion_lib.unit_sum(psf)
  srf = np.asarray(srf, np.float32)
  key = settings_lib.as_key(key)
  results: dict[str, np.ndarray] = {}
  for name in methods:
    t0 = time.perf_counter()
    target = (outputs or {}).get(name)
    if name in ("sdp", "baseline"):
      out = fusion_lib.fuse(y, z, prior=prior if name == "sdp" else None, key=key, psf=psf,
                            srf=srf, steps=steps, mesh=mesh, show_progress=show_progress,
                            policy=policy, out=target, **settings)
      results[name] = out.x
    elif target is not None:
      results[name] = _classical_windows(name, y, z, psf, srf, ratio, target, mesh)
    else:
      results[name] = np.asarray(jax.block_until_ready(
          classical.run_method(name, y, z, psf, srf, ratio)), np.float32)
    seconds[name] = time.perf_counter() - t0
  return MethodResults(results=results, psf=psf, srf=srf, ratio=ratio, blind=blind,
                       seconds=seconds, calibration=calibration)


def _classical_windows(name, y, z, psf, srf, ratio, out, mesh):
  """A classical method on 128-pixel windows of the scene, written into `out` by strips."""
  tile = min(-(-128 // ratio) * ratio, min(z.shape[:2]) // ratio * ratio)
  overlap = min(-(-16 // ratio) * ratio, tile - ratio)
  grid = tiling.make_grid(z.shape[0], z.shape[1], tile, overlap, multiple=ratio)
  one = jax.vmap(lambda a, b: classical.run_method(name, a, b, psf, srf, ratio))
  return tiling.map_tiles(lambda c, starts, y_w, z_w: one(y_w, z_w), grid,
                          [(y, ratio), (z, 1)], tiles_per_call=8, mesh=mesh,
                          halo=overlap // 4, out=out)


def reference_table(reference: Any, results: dict[str, Any], ratio: int,
                    keys: Sequence[str] = FULL_REFERENCE_KEYS, valid: Any = None
                    ) -> dict[str, dict[str, float]]:
  """method -> {psnr, sam, rmse, ergas, uiqi} against the (H, W, B) reference; with an
  (H, W) `valid` mask over the pixels with data only (`metrics.masked_metrics`)."""
  out = {}
  for name, x in results.items():
    m = metrics.masked_metrics(reference, x, ratio, valid)
    out[name] = {k: float(m[k]) for k in keys}
  return out


def no_reference_table(results: dict[str, Any], y: Any, z: Any, ratio: int,
                       valid: Any = None) -> dict[str, dict[str, float]]:
  """method -> {d_lambda, d_s, qnr} (Alparone et al. 2008); results on disk
  (`fileio.BandFile`) are read by strips of rows. With an (H, W) `valid` mask only the Q
  blocks without no-data pixels count."""
  out = {}
  for name, x in results.items():
    if isinstance(x, np.ndarray):
      out[name] = metrics.no_reference_metrics(x, windowed.load(z), windowed.load(y), ratio,
                                               valid=valid)
    else:
      out[name] = metrics.no_reference_metrics_by_rows(lambda a, b, x=x: x[a:b], z, y, ratio,
                                                       valid=valid)
  return out


def operator_errors(psf, srf, true_psf, true_srf) -> dict[str, float]:
  """How far the operators used are from the true ones (relative Frobenius errors)."""
  out = {}
  psf, srf, true_psf, true_srf = map(np.asarray, (psf, srf, true_psf, true_srf))
  if psf.shape == true_psf.shape:
    out["psf_rel_error"] = float(np.linalg.norm(psf - true_psf) / np.linalg.norm(true_psf))
  if srf.shape == true_srf.shape:
    out["srf_rel_error"] = float(np.linalg.norm(srf - true_srf) / np.linalg.norm(true_srf))
  return out


@dataclasses.dataclass
class Evaluation:
  """Outputs of `evaluate_cube`."""
  table: dict[str, dict[str, float]]   # method -> metrics, plus "seconds"
  reference: np.ndarray                # (H, W, B) bottom half of the cube, in [0, 1]
  y: np.ndarray                        # simulated LR-HSI
  z: np.ndarray                        # simulated HR-MSI
  methods: MethodResults
  prior: prior_lib.Prior
  details: dict[str, Any]              # shapes, operators' errors, training, no-reference


def evaluate_cube(cube: Any, *, wavelengths_nm: Any, key: Any = 0, ratio: int = 4,
                  snr_y_db: float | None = 20.0, snr_z_db: float | None = 30.0,
                  srf: Any = None, srf_path: str | None = None,
                  known_operators: bool = False, train_steps: int,
                  prior_settings: dict[str, Any] | None = None, steps: int | None = None,
                  methods: Sequence[str] | str = METHODS, workdir: Any = None,
                  mesh: jax.sharding.Mesh | None = None, show_progress: bool = True,
                  policy: Any = None, **settings: Any) -> Evaluation:
  """The simulation protocol on a real (H, W, B) cube in any units.

  Keys: the simulation noise uses fold_in(key, 0), the prior `key` itself, the solves
  fold_in(key, 1). `srf` (b, B) defaults to the IKONOS blue / green / red / NIR response at
  `wavelengths_nm` (from `srf_path` when given, else a Gaussian model of the bands).
  **settings are `fuse` settings; `prior_settings` those of `train_prior`.
  """
  t_start = time.perf_counter()
  key = settings_lib.as_key(key)
  cube = np.asarray(cube, np.float32)
  if cube.ndim != 3:
    raise ValueError(f"cube must be (H, W, B), got shape {cube.shape}")
  wavelengths_nm = np.asarray(wavelengths_nm)
  dead = ~(cube.max(axis=(0, 1)) > 0)
  dropped = np.flatnonzero(dead).tolist() if srf is None else []
  if dropped:
    # Bands without any positive value (e.g. water-absorption bands zeroed by the source)
    # carry no signal: every method returns 0 there and their PSNR is undefined.
    warnings.warn(f"dropped {int(dead.sum())} of {cube.shape[-1]} bands that are zero or "
                  "negative everywhere (no signal, e.g. water-absorption bands)", stacklevel=2)
    cube, wavelengths_nm = cube[..., ~dead], wavelengths_nm[~dead]
  if srf is None:
    srf = degrade.ikonos_srf(np.asarray(wavelengths_nm), path=srf_path or None)
  wd = degrade.wald_protocol(cube, ratio=int(ratio), key=jax.random.fold_in(key, 0),
                             srf=np.asarray(srf, np.float32), snr_y_db=snr_y_db,
                             snr_z_db=snr_z_db, split="rows")
  y, z, ref = (np.asarray(a, np.float32) for a in (wd.y, wd.z, wd.x))
  prior = None
  if "sdp" in check_methods(methods):
    prior = prior_lib.train_prior(np.asarray(wd.train_pixels), steps=train_steps, key=key,
                                  workdir=workdir, mesh=mesh, show_progress=show_progress,
                                  **(prior_settings or {}))
  out = run_methods(y, z, prior=prior, key=jax.random.fold_in(key, 1), methods=methods,
                    psf=np.asarray(wd.psf) if known_operators else None,
                    srf=np.asarray(wd.srf) if known_operators else None, steps=steps,
                    mesh=mesh, show_progress=show_progress, policy=policy, **settings)
  table: dict[str, Any] = reference_table(ref, out.results, out.ratio)
  train_seconds = prior.info["seconds"] if prior is not None else 0.0
  table["seconds"] = {"train": train_seconds, **out.seconds,
                      "total": time.perf_counter() - t_start}
  details = {
      "dropped_bands": dropped,
      "shapes": {"reference": ref.shape, "y": y.shape, "z": z.shape,
                 "train_pixels": np.shape(wd.train_pixels)},
      "ratio": out.ratio, "blind": out.blind,
      "operators": operator_errors(out.psf, out.srf, wd.psf, wd.srf),
      "no_reference": no_reference_table(out.results, y, z, out.ratio),
  }
  if prior is not None:
    details["train"] = {k: prior.info.get(k) for k in ("final_loss", "steps", "history")}
  return Evaluation(table=table, reference=ref, y=y, z=z, methods=out, prior=prior,
                    details=details)
