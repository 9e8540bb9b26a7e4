"""Fusing an LR-HSI with an HR-MSI: `fuse`, the verb, and the checks it runs first.

    fused = hsijax.sdp.fuse(y, z, prior=prior, key=jax.random.key(1), steps=100)
    fused.x            # (H, W, B) in the inputs' [0, 1] scale
    fused.psf, fused.srf

`prior=None` runs the paper's "Baseline" (gam = 0: the data terms alone). PSF and SRF are
estimated blindly (`hsijax.sdp.blind`) unless given; the ratio comes from the shapes. The
solver (`hsijax.sdp.solver`, Algorithm 1 as one XLA program) is built once per model, shape
and setting and reused: a second call with the same ones does not compile again. With
`tile > 0` the scene is solved in overlapping windows, sharded over the devices
(`hsijax.sdp.tiled`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
import warnings
from typing import Any, Callable, ClassVar

import jax
import numpy as np

from hsijax import diffusion, progress, sharding
from hsijax import settings as settings_lib
from hsijax.sdp import blind, solver, tiled
from hsijax.sdp.prior import Prior


@dataclasses.dataclass(frozen=True)
class FusionSettings(settings_lib.Settings):
  """How the fusion runs (Algorithm 1 and the blind estimation).

  Solver: lam (LR-HSI fidelity weight), gam (prior weight; ignored without a prior), lr
  (Adam lr on X for the full T-step schedule, scaled by T / steps when respaced, see
  `solver.respaced_lr_scale`), K (Adam steps per timestep), weight_decay, ema_decay (EMA of
  X, the output), init ("ones" as the paper, or "upsample"), lr_scale (None = T / steps),
  respacing ("uniform" | "quadratic" choice of the visited timesteps).
  Blind estimation: blind_steps, blind_lr, psf_size (None = 2 ratio - 1).
  Large scenes: tile (window side in HR pixels, 0 = whole scene), tile_overlap,
  tiles_per_call (windows per call, sharded over the devices).
  Baseline without a prior: schedule and num_timesteps of the loop it visits.
  """
  WHAT: ClassVar[str] = "fusion"
  lam: float = 0.1
  gam: float = 1e-3
  lr: float = 1e-3
  K: int = 3
  weight_decay: float = 1e-6
  ema_decay: float = 0.9
  init: str = "ones"
  lr_scale: float | None = None
  respacing: str = "uniform"
  blind_steps: int = 5000
  blind_lr: float = 1e-5
  psf_size: int | None = None
  tile: int = 0
  tile_overlap: int = 16
  tiles_per_call: int = 8
  schedule: str = "linear"
  num_timesteps: int = 1000

  def __post_init__(self):
    if self.init not in solver.INITS:
      raise ValueError(f"unknown init {self.init!r}; use one of {solver.INITS}")
    if int(self.K) != self.K or self.K < 1:
      raise ValueError(f"K (Adam steps per timestep) must be a positive integer, got {self.K}")
    for name in ("lam", "gam", "lr", "weight_decay"):
      value = getattr(self, name)
      if not np.isfinite(value) or value < 0:
        raise ValueError(f"fusion setting {name} must be a finite number >= 0, got {value}")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
    if int(self.blind_steps) != self.blind_steps or self.blind_steps < 0:
      raise ValueError(f"blind_steps must be an integer >= 0, got {self.blind_steps}")
    if self.psf_size is not None and (self.psf_size < 1 or self.psf_size % 2 == 0):
      raise ValueError(f"psf_size must be a positive odd integer, got {self.psf_size}")
    if self.tile < 0:
      raise ValueError(f"tile must be >= 0 (0 = whole scene), got {self.tile}")


@dataclasses.dataclass(frozen=True)
class Fusion:
  """The result of `fuse`.

  Attributes:
    x: (H, W, B) fused image, float32, in the units of the inputs.
    psf: (k, k) PSF used (given or estimated).
    srf: (b, B) SRF used (given or estimated).
    ratio: the spatial ratio H / h.
    blind: True when PSF and/or SRF were estimated.
    steps: solver timesteps visited.
    seconds: {"blind": ..., "solve": ...} wall seconds (compilation included).
  """
  x: np.ndarray
  psf: np.ndarray
  srf: np.ndarray
  ratio: int
  blind: bool
  steps: int
  seconds: dict[str, float] = dataclasses.field(default_factory=dict, compare=False)


# ----------------------------------------------------------------------------- input checks


def infer_ratio(y_shape: tuple[int, ...], z_shape: tuple[int, ...]) -> int:
  """The integer ratio H / h = W / w between HR-MSI (H, W, b) and LR-HSI (h, w, B)."""
  if len(y_shape) != 3 or len(z_shape) != 3:
    raise ValueError(
        f"LR-HSI must be (h, w, B) and HR-MSI (H, W, b); got {tuple(y_shape)} and "
        f"{tuple(z_shape)}; pass 3-D arrays (rows, columns, bands)")
  (h, w, _), (H, W, _) = y_shape[:3], z_shape[:3]
  if H < h or W < w:
    raise ValueError(f"HR-MSI {H} x {W} is smaller than LR-HSI {h} x {w}; the two images "
                     "are swapped (pass the hyperspectral image as y, the multispectral as z)")
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


def _finite(a: np.ndarray, name: str) -> None:
  bad = ~np.isfinite(a)
  if bad.any():
    raise ValueError(
        f"{name} has {int(bad.sum())} NaN/inf values (first at index "
        f"{tuple(int(i) for i in np.argwhere(bad)[0])}); fill or mask them (e.g. "
        "np.nan_to_num) first")


def check_pair(y: Any, z: Any, *, psf: Any = None, srf: Any = None, ratio: int | None = None,
               psf_size: int | None = None, names: tuple[str, str] = ("y (LR-HSI)",
                                                                        "z (HR-MSI)")) -> int:
  """Checks a fusion problem before any work; returns the ratio.

  Refuses (ValueError naming the problem and the fix): non-3-D or non-finite images, sizes
  whose ratio is not an integer, an HSI with fewer than 3 bands or not more bands than the
  MSI, an image with no positive value or no variation at all, a PSF that is not a square
  odd kernel with a positive sum or is larger than the HR image, an SRF that is not (b, B).
  """
  y, z = np.asarray(y), np.asarray(z)
  r = infer_ratio(y.shape, z.shape)
  if ratio is not None and int(ratio) != r:
    raise ValueError(f"ratio={ratio} was given but the shapes {y.shape[:2]} and "
                     f"{z.shape[:2]} give {r}; drop ratio= or fix the images")
  B, b = y.shape[-1], z.shape[-1]
  if B < 3:
    raise ValueError(f"{names[0]} has {B} band(s); a hyperspectral image needs at least 3 "
                     "(the prior models spectra): check the file / key")
  if b >= B:
    raise ValueError(f"{names[1]} has {b} bands and {names[0]} {B}; the hyperspectral image "
                     "must have more bands (are the two swapped?)")
  for a, name in ((y, names[0]), (z, names[1])):
    _finite(a, name)
    if not np.any(a > 0):
      raise ValueError(f"{name} has no positive value (max {float(a.max()):.4g}); it is "
                       "empty or in the wrong units: check the file / key")
    if float(a.max()) == float(a.min()):
      raise ValueError(f"{name} is constant ({float(a.max()):.4g} everywhere); there is "
                       "nothing to fuse: check the file / key")
  H, W = z.shape[:2]
  k = 2 * r - 1 if psf_size is None else int(psf_size)
  if psf is not None:
    psf = np.asarray(psf)
    _finite(psf, "psf")
    if psf.ndim != 2 or psf.shape[0] != psf.shape[1] or psf.shape[0] % 2 == 0:
      raise ValueError(f"PSF must be a square (k, k) kernel with odd k, got {psf.shape}")
    if not float(psf.sum()) > 0:
      raise ValueError(f"PSF sums to {float(psf.sum()):.4g}; a blur kernel needs a positive "
                       "sum (it is normalised to 1): check the PSF file")
    k = psf.shape[0]
  if k > min(H, W):
    raise ValueError(f"the PSF ({k} x {k}) is larger than the HR image ({H} x {W}); use a "
                     f"larger scene (LR-HSI at least {-(-k // r)} x {-(-k // r)} pixels for "
                     f"ratio {r}) or a smaller PSF")
  if srf is not None:
    srf = np.asarray(srf)
    _finite(srf, "srf")
    if srf.shape != (b, B):
      hint = " (it looks transposed: pass srf.T)" if srf.shape == (B, b) else ""
      raise ValueError(f"SRF is {srf.shape} but must be (b, B) = ({b}, {B}): one row per "
                       f"HR-MSI band, one column per LR-HSI band{hint}")
    if np.any(srf.sum(axis=1) <= 0):
      raise ValueError("every SRF row must have a positive sum (each MSI band a weighted sum "
                       "of HSI bands)")
  return r


# ----------------------------------------------------------------------------- solvers


@functools.lru_cache(maxsize=32)
def _cached_solver(model, schedule_key: tuple[str, int, int, str], ratio: int,
                   solver_kwargs: tuple[tuple[str, Any], ...], tiling: tuple[int, int, int],
                   mesh) -> Callable[..., Any]:
  """The jitted solve for these ingredients (built once; the compiled program is reused)."""
  name, T, n, respacing = schedule_key
  schedule = diffusion.make_respaced_schedule(name, T, n, respacing)
  kwargs = dict(solver_kwargs)
  tile, overlap, per_call = tiling
  if tile > 0:
    return tiled.make_tiled_solver(model, schedule, ratio=ratio, tile=tile, overlap=overlap,
                                   tiles_per_call=per_call, mesh=mesh, **kwargs)
  return solver.make_solver(model, schedule, ratio=ratio, **kwargs)


def solver_for(prior: Prior | None, *, ratio: int, steps: int | None,
               settings: FusionSettings, mesh: jax.sharding.Mesh | None = None
               ) -> tuple[Callable[..., Any], int]:
  """(the jitted solve `fuse` runs for these ingredients, its number of timesteps).

  Built once per (model, schedule, steps, solver and tiling settings, mesh) and cached, so
  repeated fusions of same-shaped images reuse the compiled program.
  """
  s = settings
  name, T = (prior.schedule_name, prior.num_timesteps) if prior else (s.schedule,
                                                                      s.num_timesteps)
  n = int(T if steps is None else steps)
  if not 1 <= n <= T:
    raise ValueError(f"steps={steps} must be in [1, {T}] (the prior's T)")
  gam = float(s.gam) if prior is not None else 0.0
  kwargs = (("lam", float(s.lam)), ("gam", gam), ("lr", float(s.lr)), ("K", int(s.K)),
            ("weight_decay", float(s.weight_decay)), ("ema_decay", float(s.ema_decay)),
            ("init", s.init), ("lr_scale", None if s.lr_scale is None else float(s.lr_scale)))
  tile = int(s.tile)
  if tile > 0:
    tiled.check_tiling(tile, int(s.tile_overlap), ratio, int(s.tiles_per_call))
    mesh = sharding.make_mesh() if mesh is None else mesh
  else:
    mesh = None
  solve = _cached_solver(prior.model if prior else None, (name, int(T), n, s.respacing),
                         int(ratio), kwargs, (tile, int(s.tile_overlap),
                                              int(s.tiles_per_call)), mesh)
  return solve, n


def estimate_operators(y: Any, z: Any, ratio: int, *, steps: int, lr: float,
                       psf_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Blind (psf (k, k), srf (b, B)) from the two images (`hsijax.sdp.blind`)."""
  psf, srf = blind.estimate_psf_srf(y, z, ratio, psf_size=psf_size, num_steps=int(steps),
                                    lr=float(lr))
  return np.asarray(psf), np.asarray(srf)


def fuse(y: Any, z: Any, *, prior: Prior | None = None, key: Any, ratio: int | None = None,
         psf: Any = None, srf: Any = None, steps: int | None = None,
         mesh: jax.sharding.Mesh | None = None, show_progress: bool = True,
         **settings: Any) -> Fusion:
  """Fuses an LR-HSI with an HR-MSI by SDP (with a prior) or the Baseline (prior=None).

  Args:
    y: (h, w, B) LR-HSI in [0, 1] (scale both images by one common factor, e.g.
      `scale_pair`, so that Z = R X still holds; images beyond [0, 1] are divided by their
      joint maximum for the solve, with a warning, and X comes back in their units).
    z: (H, W, b) HR-MSI in [0, 1], H = ratio h, W = ratio w.
    prior: a trained `Prior` (train_prior / load_prior) for B bands; None = Baseline.
    key: PRNG key or int seed of the solver's diffusion noise (same key, same result).
    ratio: optional check of the ratio inferred from the shapes.
    psf: (k, k) known PSF (normalised to sum 1), or None to estimate it blindly.
    srf: (b, B) known SRF, or None to estimate it blindly (with the PSF).
    steps: solver timesteps (respaced from the prior's T); None = all T (the paper).
      100 is a good fast choice (see configs/sdp.py budgets).
    mesh: devices for tiled solves (default: all).
    show_progress: False hides the progress output.
    **settings: `FusionSettings` fields (lam, gam, lr, K, init, tile, blind_steps, ...).

  Returns:
    Fusion(x, psf, srf, ratio, blind, steps, seconds).
  """
  s = FusionSettings.from_kwargs(**settings)
  y, z = np.asarray(y, np.float32), np.asarray(z, np.float32)
  r = check_pair(y, z, psf=psf, srf=srf, ratio=ratio, psf_size=s.psf_size)
  unit = 1.0
  if max(float(y.max()), float(z.max())) > 1.5:
    # Not in [0, 1] (e.g. raw DN): solve on both divided by one common factor (keeps
    # Z = R X) and return X in the inputs' units; say so, since a prior trained on spectra
    # scaled otherwise sees other values.
    unit = float(max(y.max(), z.max()))
    warnings.warn(f"fuse: the images reach {unit:.4g}, not [0, 1]; both were divided by "
                  f"{unit:.4g} for the solve and X is returned in their units. Scale them "
                  "yourself (hsijax.sdp.scale_pair) the same way as the prior's training "
                  "pixels to silence this", stacklevel=2)
    y, z = y / unit, z / unit
  if prior is not None and prior.num_bands != y.shape[-1]:
    raise ValueError(f"the prior was trained on {prior.num_bands} bands but y has "
                     f"{y.shape[-1]}; train the prior on spectra of this sensor")
  solve, n = solver_for(prior, ratio=r, steps=steps, settings=s, mesh=mesh)
  tile = int(s.tile)
  seconds: dict[str, float] = {}
  is_blind = psf is None or srf is None
  if is_blind:
    t0 = time.perf_counter()
    est_psf, est_srf = estimate_operators(y, z, r, steps=s.blind_steps, lr=s.blind_lr,
                                          psf_size=s.psf_size)
    seconds["blind"] = time.perf_counter() - t0
    psf = est_psf if psf is None else psf
    srf = est_srf if srf is None else srf
  psf = np.asarray(psf, np.float32)
  psf = psf / psf.sum()
  srf = np.asarray(srf, np.float32)
  params = prior.params if prior is not None else None
  key = settings_lib.as_key(key)
  t0 = time.perf_counter()
  desc = "SDP solve" if prior is not None else "Baseline solve"
  with contextlib.nullcontext() if show_progress else progress.silenced():
    if tile > 0:  # the tiled solver opens one bar per chunk of windows itself
      x = solve(params, y, z, psf, srf, key)
    else:
      with progress.bar(n, desc=desc):
        x = jax.block_until_ready(solve(params, y, z, psf, srf, key))
  seconds["solve"] = time.perf_counter() - t0
  return Fusion(x=np.asarray(x, np.float32) * np.float32(unit), psf=psf, srf=srf, ratio=r,
                blind=is_blind, steps=n, seconds=seconds)


def scale_pair(y: Any, z: Any, mode: str = "joint") -> tuple[np.ndarray, np.ndarray,
                                                            dict[str, float]]:
  """Scales an (LR-HSI, HR-MSI) pair into [0, 1] for `fuse`; returns (y, z, scales).

  Negative values (noise around a zero offset) are clipped first; how many is reported in
  scales["clipped"]. mode "joint" divides both by one common maximum (keeps Z = R X when
  both are in the same units), "separate" each by its own maximum, "none" expects data
  already in [0, 1]. Multiply the fused X by scales["hsi"] to return to the input's units.
  """
  y, z = np.asarray(y, np.float32), np.asarray(z, np.float32)
  clipped = {"hsi": int(np.count_nonzero(y < 0)), "msi": int(np.count_nonzero(z < 0))}
  y, z = np.maximum(y, 0), np.maximum(z, 0)
  if mode == "joint":
    s_y = s_z = float(max(y.max(), z.max()))
  elif mode == "separate":
    s_y, s_z = float(y.max()), float(z.max())
  elif mode == "none":
    s_y = s_z = 1.0
  else:
    raise ValueError(f"unknown scale mode {mode!r}; use joint, separate or none")
  if not (s_y > 0 and s_z > 0):
    raise ValueError("an input image has no positive value (all zeros or negative); check "
                     "the LR-HSI and HR-MSI files / keys")
  return y / s_y, z / s_z, {"hsi": s_y, "msi": s_z, "clipped": clipped}
