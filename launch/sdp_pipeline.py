"""Steps shared by the SDP entry points (train_sdm, fuse, evaluate_sdp, demo).

No flags here (each entry point defines its own), only functions of a *resolved* config
(`configs.sdp.resolve`):

  train_prior(pixels, cfg, workdir)         spectral diffusion model, resumable checkpoints
  estimate_operators(y, z, cfg)             blind PSF / SRF
  make_fusion_solver / run_solver           Algorithm 1 from the config (whole scene or tiled)
  fuse_all(y, z, cfg, ...)                  SDP, Baseline (gam = 0) and the classical methods
  reference_table / no_reference_table      metrics per method
"""
from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Callable

import jax
import numpy as np

from hsijax import (classical, data, degrade, diffusion, metrics, plots, progress, sharding,
                    synthetic)
from hsijax import sdp
from launch import common

FULL_REFERENCE_KEYS = ("psnr", "sam", "rmse", "ergas", "uiqi")


# ----------------------------------------------------------------------------- input checks


def check_finite(a: np.ndarray, name: str, flag: str) -> np.ndarray:
  """Raises a ValueError naming the input and the flag to fix when `a` has NaN / inf."""
  a = np.asarray(a, np.float32)
  bad = ~np.isfinite(a)
  if bad.any():
    raise ValueError(
        f"{name} has {int(bad.sum())} NaN/inf values (first at index "
        f"{tuple(int(i) for i in np.argwhere(bad)[0])}); fill or mask them (e.g. "
        f"np.nan_to_num) before passing {flag}")
  return a


def infer_ratio(y_shape: tuple[int, ...], z_shape: tuple[int, ...]) -> int:
  """The integer ratio H / h = W / w between HR-MSI (H, W, b) and LR-HSI (h, w, B)."""
  if len(y_shape) != 3 or len(z_shape) != 3:
    raise ValueError(
        f"LR-HSI must be (h, w, B) and HR-MSI (H, W, b); got {tuple(y_shape)} and "
        f"{tuple(z_shape)}; pass 3-D arrays (rows, columns, bands)")
  (h, w, _), (H, W, _) = y_shape[:3], z_shape[:3]
  if H < h or W < w:
    raise ValueError(f"HR-MSI {H} x {W} is smaller than LR-HSI {h} x {w}; swap "
                     "--config.data.hsi and --config.data.msi")
  if H % h or W % w:
    raise ValueError(
        f"the ratio does not divide: HR-MSI is {H} x {W} but LR-HSI is {h} x {w}, and "
        f"{H}/{h}, {W}/{w} are not both integers; crop the HR-MSI to a multiple of the "
        f"LR-HSI size (e.g. {h * max(H // h, 1)} x {w * max(W // w, 1)})")
  if H // h != W // w:
    raise ValueError(
        f"rows and columns give different ratios ({H}/{h} = {H // h} vs {W}/{w} = "
        f"{W // w}); the HR-MSI must be the same integer multiple of the LR-HSI on both axes")
  return H // h


def check_operators(psf: np.ndarray | None, srf: np.ndarray | None, num_hsi: int,
                    num_msi: int) -> None:
  """Shape checks for user-supplied PSF (k, k) and SRF (b, B)."""
  if srf is not None and srf.shape != (num_msi, num_hsi):
    hint = (" (it looks transposed: pass srf.T)" if srf.shape == (num_hsi, num_msi) else "")
    raise ValueError(
        f"SRF is {srf.shape} but must be (b, B) = ({num_msi}, {num_hsi}): one row per "
        f"HR-MSI band, one column per LR-HSI band{hint}; check --config.data.srf and that "
        f"the HSI / MSI band counts are right")
  if psf is not None and (psf.ndim != 2 or psf.shape[0] != psf.shape[1] or
                          psf.shape[0] % 2 == 0):
    raise ValueError(f"PSF must be a square (k, k) kernel with odd k, got {psf.shape}; "
                     "fix --config.data.psf")


def parse_range(text: str) -> tuple[float, float] | None:
  """"START:STOP" -> (start, stop); "" -> None."""
  if not text:
    return None
  try:
    start, stop = (float(v) for v in str(text).split(":"))
  except ValueError as e:
    raise ValueError(f"wavelengths_nm must be 'START:STOP' in nm (e.g. 430:860), got "
                     f"{text!r}") from e
  if not stop > start:
    raise ValueError(f"wavelengths_nm {text!r}: STOP must exceed START")
  return start, stop


# Used only when neither the file nor the command line gives band centres (SPEC section 6:
# nominal evenly spaced wavelengths over the sensor's range). The IKONOS bands span 450-850 nm.
DEFAULT_RANGE_NM = (400.0, 1000.0)


def band_wavelengths(num_bands: int, cfg_range: str, from_file: np.ndarray | None
                     ) -> tuple[np.ndarray, str]:
  """(B,) band centres and where they came from ("config", "file" or "default")."""
  rng = parse_range(cfg_range)
  if rng is not None:
    return degrade.nominal_wavelengths(num_bands, *rng), "config"
  if from_file is not None and np.asarray(from_file).size == num_bands:
    return np.asarray(from_file, np.float32), "file"
  common.log(f"no band wavelengths known; assuming {DEFAULT_RANGE_NM[0]:g}:"
             f"{DEFAULT_RANGE_NM[1]:g} nm (pass --config.data.wavelengths_nm=START:STOP)")
  return degrade.nominal_wavelengths(num_bands, *DEFAULT_RANGE_NM), "default"


def make_srf(wavelengths_nm: np.ndarray, srf_path: str) -> np.ndarray:
  """(4, B) IKONOS blue / green / red / NIR response resampled to the bands (rows sum 1)."""
  return np.asarray(degrade.ikonos_srf(np.asarray(wavelengths_nm), path=srf_path or None),
                    np.float32)


# ----------------------------------------------------------------------------- model


def train_prior(pixels: np.ndarray, cfg: Any, workdir: pathlib.Path | None
                ) -> tuple[sdp.SpectralDenoiser, Any, dict]:
  """Trains (or resumes / reloads) the spectral model on clean `pixels` (N, B).

  Returns (model, EMA params, info {"final_loss", "steps", "seconds", "history"}).
  """
  pixels = np.asarray(pixels, np.float32).reshape(-1, np.shape(pixels)[-1])
  t0 = time.perf_counter()
  state, history = sdp.fit(pixels, cfg, workdir=workdir)
  params = jax.device_get(state.ema_params)
  model = sdp.train.model_from_config(cfg, pixels.shape[1])
  if history.get("loss"):
    final = float(history["loss"][-1])
  else:  # already trained (resumed at the last step): the loss of one fresh batch instead
    key = jax.random.fold_in(jax.random.key(cfg.seed), 3)
    idx = np.asarray(jax.random.randint(key, (int(cfg.train.batch),), 0, pixels.shape[0]))
    final = float(sdp.train.diffusion_loss(model, state.params,
                                           sdp.train.schedule_from_config(cfg),
                                           jax.numpy.asarray(pixels[idx]), key, train=False))
  return model, params, {"final_loss": final, "steps": int(state.step),
                         "seconds": time.perf_counter() - t0, "history": history}


def spectral_fid(model, params, cfg, pixels: np.ndarray) -> float:
  """Spectral FID of `cfg.train.fid_samples` generated spectra against the real pixels."""
  schedule = sdp.train.schedule_from_config(cfg)
  key = jax.random.fold_in(jax.random.key(cfg.seed), 2)
  num = int(min(cfg.train.fid_samples, max(pixels.shape[0], 2 * pixels.shape[-1] + 2)))
  with progress.bar(schedule.num_steps, desc="FID sampling"):
    return sdp.train.evaluate_fid(model, params, schedule, pixels, key, num=num)


# ----------------------------------------------------------------------------- fusion


@dataclasses.dataclass
class Fusion:
  results: dict[str, np.ndarray]   # method -> (H, W, B) in [0, 1]
  psf: np.ndarray                  # (k, k) used by every method
  srf: np.ndarray                  # (b, B)
  seconds: dict[str, float]
  blind: bool


def estimate_operators(y: np.ndarray, z: np.ndarray, ratio: int, cfg: Any
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Blind (psf (k, k), srf (b, B)) from the observations (SPEC section 3)."""
  psf, srf = sdp.estimate_psf_srf(y, z, ratio, psf_size=cfg.blind.psf_size,
                                  num_steps=int(cfg.blind.steps), lr=float(cfg.blind.lr))
  return np.asarray(psf), np.asarray(srf)


def solver_schedule(cfg: Any) -> diffusion.Schedule:
  return diffusion.make_respaced_schedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps,
                                          int(cfg.solver.num_steps), cfg.diffusion.respacing)


def make_fusion_solver(model, ratio: int, cfg: Any, *, gam: float, desc: str
                       ) -> Callable[..., np.ndarray]:
  """Algorithm 1 from the config (gam > 0: SDP, gam = 0: Baseline).

  Returns solve(params, y (h, w, B), z (H, W, b), psf, srf, key) -> (H, W, B) NumPy. With
  `cfg.solver.tile` > 0 the scene is solved in overlapping windows, sharded over the mesh of
  `cfg.mesh` (`hsijax.sdp.tiled`; tile_overlap, tiles_per_call); 0 solves the whole scene in
  one call. Build once, call several times: the compiled program is reused.
  """
  schedule = solver_schedule(cfg)
  s = cfg.solver
  kwargs = dict(lam=float(s.lam), gam=float(gam), lr=float(s.lr), K=int(s.K),
                weight_decay=float(s.weight_decay), ema_decay=float(s.ema), init=s.init,
                ratio=ratio, lr_scale=None if s.lr_scale is None else float(s.lr_scale))
  tile = int(s.get("tile", 0) or 0)
  if tile > 0:
    return sdp.make_tiled_solver(model, schedule, tile=tile, overlap=int(s.tile_overlap),
                                 tiles_per_call=int(s.tiles_per_call),
                                 mesh=sharding.make_mesh(cfg.get("mesh")), desc=desc,
                                 **kwargs)
  solve_jit = sdp.make_solver(model, schedule, **kwargs)

  def solve(params, y, z, psf, srf, key) -> np.ndarray:
    with progress.bar(schedule.num_steps, desc=desc):
      return np.asarray(jax.block_until_ready(solve_jit(params, y, z, psf, srf, key)))

  return solve


def run_solver(model, params, y, z, psf, srf, ratio: int, cfg: Any, *, gam: float,
               desc: str) -> np.ndarray:
  """Algorithm 1 (gam > 0: SDP, gam = 0: Baseline) -> (H, W, B); see make_fusion_solver."""
  key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
  solve = make_fusion_solver(model, ratio, cfg, gam=gam, desc=desc)
  return solve(params, y, z, psf, srf, key)


def fuse_all(y: np.ndarray, z: np.ndarray, cfg: Any, *, model, params,
             psf: np.ndarray | None = None, srf: np.ndarray | None = None,
             with_classical: bool = True) -> Fusion:
  """SDP, Baseline and the classical methods with shared (given or blind) operators."""
  ratio = infer_ratio(y.shape, z.shape)
  seconds: dict[str, float] = {}
  blind = psf is None or srf is None
  if blind:
    t0 = time.perf_counter()
    est_psf, est_srf = estimate_operators(y, z, ratio, cfg)
    psf = est_psf if psf is None else psf
    srf = est_srf if srf is None else srf
    seconds["blind"] = time.perf_counter() - t0
  results: dict[str, np.ndarray] = {}
  for name, gam in (("sdp", cfg.solver.gam), ("baseline", 0.0)):
    t0 = time.perf_counter()
    results[name] = run_solver(model, params, y, z, psf, srf, ratio, cfg, gam=gam,
                               desc=f"{name} solve")
    seconds[name] = time.perf_counter() - t0
  if with_classical:
    for name in classical.METHODS:
      t0 = time.perf_counter()
      out = classical.run_method(name, y, z, psf, srf, ratio)
      results[name] = np.asarray(jax.block_until_ready(out))
      seconds[name] = time.perf_counter() - t0
  return Fusion(results=results, psf=np.asarray(psf), srf=np.asarray(srf), seconds=seconds,
                blind=blind)


# ----------------------------------------------------------------------------- metrics


def reference_table(reference: np.ndarray, results: dict[str, np.ndarray], ratio: int,
                    keys=FULL_REFERENCE_KEYS) -> dict[str, dict[str, float]]:
  """method -> {psnr, sam, rmse, ergas, uiqi} against the reference."""
  out = {}
  for name, x in results.items():
    m = metrics.all_metrics(reference, x, ratio)
    out[name] = {k: float(m[k]) for k in keys}
  return out


def no_reference_table(results: dict[str, np.ndarray], y: np.ndarray, z: np.ndarray,
                       ratio: int) -> dict[str, dict[str, float]]:
  """method -> {d_lambda, d_s, qnr} (Alparone et al. 2008)."""
  return {name: metrics.no_reference_metrics(x, z, y, ratio) for name, x in results.items()}


def save_figures(workdir: pathlib.Path, reference: np.ndarray, results: dict[str, np.ndarray],
                 *, wavelengths_nm=None, y=None, title=None) -> list[pathlib.Path]:
  """fusion.png (false colour + error maps) and band_psnr.png."""
  inputs = {"LR-HSI": y} if y is not None else None
  paths = [workdir / "fusion.png", workdir / "band_psnr.png"]
  common.save_figure(plots.fusion_figure(reference, results, wavelengths_nm=wavelengths_nm,
                                         inputs=inputs, title=title), paths[0])
  common.save_figure(plots.band_psnr_figure(reference, results, wavelengths_nm=wavelengths_nm,
                                            title=title), paths[1])
  return paths



# ----------------------------------------------------------------------------- scenes


@dataclasses.dataclass
class Scene:
  cube: np.ndarray            # (H, W, B) in [0, 1]
  wavelengths_nm: np.ndarray  # (B,)
  description: str


def load_scene(cfg: Any) -> Scene:
  """The cube of `cfg.data.path` (normalised), or the synthetic demo scene when no path."""
  if cfg.data.path:
    cube = data.load_cube(cfg.data.path, cfg.data.key or None)
    x = np.asarray(degrade.normalise_cube(check_finite(cube.data, cfg.data.path,
                                                       "--config.data.path")), np.float32)
    wl, src = band_wavelengths(x.shape[-1], cfg.data.wavelengths_nm, cube.wavelengths_nm)
    return Scene(x, np.asarray(wl, np.float32),
                 f"{pathlib.Path(cfg.data.path).name} {x.shape} (wavelengths: {src})")
  if cfg.data.height > 0:
    rng = parse_range(cfg.data.wavelengths_nm) or (400.0, 780.0)
    sc = synthetic.make_scene(cfg.seed, cfg.data.height, cfg.data.width, cfg.data.num_bands,
                              num_endmembers=cfg.data.num_endmembers, wavelengths_nm=rng,
                              source=cfg.data.spectra)
    return Scene(sc.cube, sc.wavelengths_nm,
                 f"synthetic {sc.cube.shape}, {len(sc.names)} {sc.source} endmembers")
  raise ValueError("no data: pass --config.data.path=FILE.npz (a cube H x W x B) or use the "
                   "demo preset (--config=configs/sdp.py:demo) for a synthetic scene")


def wald(scene: Scene, cfg: Any):
  """SPEC section 3 / 6 simulation: (LR-HSI, HR-MSI, reference, training pixels, truth)."""
  srf = make_srf(scene.wavelengths_nm, cfg.data.srf_path)
  key = jax.random.fold_in(jax.random.key(cfg.seed), 0)
  return degrade.wald_protocol(scene.cube, ratio=int(cfg.data.ratio), key=key, srf=srf,
                               snr_y_db=float(cfg.data.snr_y_db),
                               snr_z_db=float(cfg.data.snr_z_db), split=cfg.data.split)


def evaluate_scene(scene: Scene, cfg: Any, workdir: pathlib.Path, *, title: str = ""
                   ) -> tuple[dict, dict]:
  """Wald protocol, spectral model, every method, metrics, figures.

  Returns (metrics {"sdp": {...}, "baseline": {...}, <classical>: {...}, "seconds": {...}},
  details for run.json).
  """
  t_start = time.perf_counter()
  wd = wald(scene, cfg)
  y, z, ref = (np.asarray(a, np.float32) for a in (wd.y, wd.z, wd.x))
  ratio = int(wd.ratio)
  common.log(f"scene: {scene.description}; reference {ref.shape}, LR-HSI {y.shape}, HR-MSI "
             f"{z.shape}, {np.shape(wd.train_pixels)[0]} training pixels")
  model, params, info = train_prior(wd.train_pixels, cfg, workdir)
  common.log(f"spectral model: {info['steps']} steps, final loss {info['final_loss']:.4f} "
             f"({info['seconds']:.0f} s)")
  known = bool(cfg.known_operators)
  fusion = fuse_all(y, z, cfg, model=model, params=params,
                    psf=np.asarray(wd.psf) if known else None,
                    srf=np.asarray(wd.srf) if known else None)
  table = reference_table(ref, fusion.results, ratio)
  seconds = {"train": info["seconds"], **fusion.seconds,
             "total": time.perf_counter() - t_start}
  out = {**table, "seconds": seconds}
  details = {
      "scene": scene.description,
      "shapes": {"reference": ref.shape, "y": y.shape, "z": z.shape,
                 "train_pixels": np.shape(wd.train_pixels)},
      "ratio": ratio,
      "blind": fusion.blind,
      "operators": operator_errors(fusion.psf, fusion.srf, np.asarray(wd.psf),
                                   np.asarray(wd.srf)),
      "train": {"final_loss": info["final_loss"], "steps": info["steps"],
                "history": info["history"]},
      "no_reference": no_reference_table(fusion.results, y, z, ratio),
      "config": common.config_to_dict(cfg),
  }
  save_figures(workdir, ref, {LABELS.get(k, k): v for k, v in fusion.results.items()},
               wavelengths_nm=scene.wavelengths_nm, y=y, title=title or scene.description)
  return out, details


LABELS = {"sdp": "SDP", "baseline": "Baseline", "bicubic": "Bicubic",
           "detail_injection": "Detail inj.", "subspace_ls": "Subspace LS"}


def operator_errors(psf, srf, true_psf, true_srf) -> dict[str, float]:
  """How far the operators used are from the true ones (relative Frobenius errors)."""
  out = {}
  if psf.shape == true_psf.shape:
    out["psf_rel_error"] = float(np.linalg.norm(psf - true_psf) / np.linalg.norm(true_psf))
  if srf.shape == true_srf.shape:
    out["srf_rel_error"] = float(np.linalg.norm(srf - true_srf) / np.linalg.norm(true_srf))
  return out


def print_table(table: dict[str, dict[str, float]]) -> None:
  rows = {k: v for k, v in table.items() if k != "seconds"}
  common.log(common.format_table(rows, list(FULL_REFERENCE_KEYS)))
  if "seconds" in table:
    common.log("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in table["seconds"].items()))
