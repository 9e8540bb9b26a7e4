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
import os
import time
import types
import warnings
from typing import Any, Callable, ClassVar

import jax
import numpy as np

from hsijax import diffusion, progress, sharding, windowed
from hsijax import policy as policy_lib
from hsijax import settings as settings_lib
from hsijax.sdp import blind, solver, tiled
from hsijax.sdp.inputs import check_pair
from hsijax.sdp.prior import Prior


# The warm-started solver (beyond the paper): start from the mean of subspace LS and detail
# injection and visit the last fifth of the solver steps, with lighter weights than the
# paper's (docs/sdp_results.md, measured on eight real crops). `fuse(..., **WARM_START)`;
# the `crop` and `real` presets of configs/sdp.py use it. FusionSettings' own defaults stay
# the paper's.
WARM_START = types.MappingProxyType(dict(init="classical", start=0.2, lam=0.03, gam=3e-4,
                                         lr=1e-3, lr_scale=3.0))


@dataclasses.dataclass(frozen=True)
class FusionSettings(settings_lib.Settings):
  """How the fusion runs (Algorithm 1 and the blind estimation).

  Solver: lam (LR-HSI fidelity weight), gam (prior weight; ignored without a prior), lr
  (Adam lr on X for the full T-step schedule, scaled by T / steps when respaced, see
  `solver.respaced_lr_scale`), K (Adam steps per timestep), weight_decay, ema_decay (EMA of
  X, the output), init ("ones" as the paper, "upsample", or "classical": the mean of subspace
  LS and detail injection), start (fraction of the steps visited, the last ones; 1 = all, the
  paper), lr_scale (None = T / steps), respacing ("uniform" | "quadratic" choice of the
  visited timesteps).
  Blind estimation: blind_steps, blind_lr, psf_size (None = 2 ratio - 1), blind_crop (side
  in LR pixels of the central window it fits on, so it costs the same on any scene; 0 = the
  whole scene), blind_radiometry ("none": the authors' Z = rownorm(R) X; "affine": a gain
  and offset per MSI band, the MSI then mapped to the LR-HSI's units; "auto": both fitted,
  "affine" kept only when it cuts the LR-grid residual by more than `AUTO_RADIOMETRY_RATIO`;
  see `estimate_calibrated`).
  Large scenes: tile (window side in HR pixels; 0 = the whole scene at once; None = chosen
  from `memory_gb`, see `plan_windows`), tile_overlap, tiles_per_call (windows per call,
  sharded over the devices; with tile None also from the budget), memory_gb (host + device
  memory the solve may use; None = `default_memory_gb()`).
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
  start: float = 1.0
  lr_scale: float | None = None
  respacing: str = "uniform"
  blind_steps: int = 5000
  blind_lr: float = 1e-5
  psf_size: int | None = None
  blind_crop: int = 256
  blind_radiometry: str = "none"
  tile: int | None = None
  tile_overlap: int = 16
  tiles_per_call: int = 8
  memory_gb: float | None = None
  schedule: str = "linear"
  num_timesteps: int = 1000

  def __post_init__(self):
    if self.init not in solver.INITS:
      raise ValueError(f"unknown init {self.init!r}; use one of {solver.INITS}")
    if not 0.0 < float(self.start) <= 1.0:
      raise ValueError(f"start (the fraction of the solver steps visited) must be in (0, 1], "
                       f"got {self.start}")
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
    if int(self.blind_crop) != self.blind_crop or self.blind_crop < 0:
      raise ValueError(f"blind_crop must be an integer >= 0 (LR pixels; 0 = whole scene), "
                       f"got {self.blind_crop}")
    if self.blind_radiometry not in blind.RADIOMETRY + ("auto",):
      raise ValueError(f"unknown blind_radiometry {self.blind_radiometry!r}; use one of "
                       f"{blind.RADIOMETRY + ('auto',)}")
    if self.psf_size is not None and (self.psf_size < 1 or self.psf_size % 2 == 0):
      raise ValueError(f"psf_size must be a positive odd integer, got {self.psf_size}")
    if self.tile is not None and self.tile < 0:
      raise ValueError(f"tile must be >= 0 (0 = whole scene, None = from memory_gb), got "
                       f"{self.tile}")
    if self.memory_gb is not None and not self.memory_gb > 0:
      raise ValueError(f"memory_gb must be > 0, got {self.memory_gb}")


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
    calibration: the blind fit's MSI radiometry ({"model", "gain", "offset", "r2"}, see
      `estimate_calibrated`; None with known operators): the solve used
      `apply_msi_calibration(z, calibration)`, pass that with psf / srf to reuse the fit.
    seconds: {"blind": ..., "solve": ...} wall seconds (compilation included).
    windows: {"tile", "overlap", "tiles_per_call"} of the solve (tile 0 = whole scene).
  """
  x: np.ndarray
  psf: np.ndarray
  srf: np.ndarray
  ratio: int
  blind: bool
  steps: int
  calibration: dict[str, Any] | None = None
  seconds: dict[str, float] = dataclasses.field(default_factory=dict, compare=False)
  windows: dict[str, int] = dataclasses.field(default_factory=dict, compare=False)


# ----------------------------------------------------------------------------- solvers


@functools.lru_cache(maxsize=32)
def _cached_solver(model, schedule_key: tuple[str, int, int, str], ratio: int,
                   solver_kwargs: tuple[tuple[str, Any], ...], tiling: tuple[int, int, int],
                   mesh, policy: policy_lib.Policy) -> Callable[..., Any]:
  """The jitted solve for these ingredients (built once; the compiled program is reused)."""
  name, T, n, respacing = schedule_key
  schedule = diffusion.make_respaced_schedule(name, T, n, respacing)
  kwargs = dict(solver_kwargs)
  tile, overlap, per_call = tiling
  if tile > 0:
    return tiled.make_tiled_solver(model, schedule, ratio=ratio, tile=tile, overlap=overlap,
                                   tiles_per_call=per_call, mesh=mesh, policy=policy,
                                   **kwargs)
  return solver.make_solver(model, schedule, ratio=ratio, mesh=mesh, policy=policy, **kwargs)


def default_memory_gb() -> float:
  """The memory a solve may use by default: a sixteenth of this machine's RAM, at most 1 GB
  (so with the runtime, the prior and the output strips a scene of any size stays under
  ~3 GB: 2.8 GB measured for 1024 x 1024 x 128, docs/scaling.md)."""
  try:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  except (ValueError, OSError, AttributeError):
    total = 16.0
  return float(min(1.0, total / 16))


def solve_bytes(pixels: int, num_bands: int, msi_bands: int, hidden: int = 512,
                chunk: int = 512) -> int:
  """Working memory of one Algorithm-1 solve over `pixels` HR pixels (float32): X, its Adam
  moments, EMA, the noise, the gradient, the data terms' and XLA's temporaries (~16 B
  floats per pixel, measured), plus the prior's activations for one block of `chunk`
  pixels."""
  return int(4 * (pixels * (16 * num_bands + 3 * msi_bands) + chunk * 4 * 3 * hidden))


def plan_windows(shape: tuple[int, int, int], msi_bands: int, ratio: int,
                 settings: FusionSettings, *, hidden: int = 512, devices: int = 1,
                 methods: int = 1) -> tuple[int, int, int]:
  """(tile, overlap, tiles_per_call) for a scene (H, W, B) under settings.memory_gb.

  tile 0 (the whole scene at once) when its solve and the `methods` outputs fit the
  budget; else 128-pixel windows (a multiple of the ratio) overlapping by the settings'
  overlap (rounded up to the ratio), as many per call as fit (a multiple of `devices`),
  written out strip by strip. Explicit settings (tile not None) are returned as given.
  """
  H, W, B = shape
  if settings.tile is not None:
    return int(settings.tile), int(settings.tile_overlap), int(settings.tiles_per_call)
  budget = (settings.memory_gb or default_memory_gb()) * 2**30
  whole = solve_bytes(H * W, B, msi_bands, hidden) + methods * 4 * H * W * B
  if whole <= budget:
    return 0, int(settings.tile_overlap), int(settings.tiles_per_call)
  step = -(-128 // ratio) * ratio
  tile = min(step, min(H, W) // ratio * ratio)
  overlap = min(-(-int(settings.tile_overlap) // ratio) * ratio, tile - ratio)
  per_window = solve_bytes(tile * tile, B, msi_bands, hidden)
  strips = methods * 4 * 2 * tile * W * B
  fit = max(int((budget - strips) // per_window), 1)
  per_call = max(devices, fit // devices * devices)
  return tile, max(overlap, 0), per_call


def solver_for(prior: Prior | None, *, ratio: int, steps: int | None,
               settings: FusionSettings, mesh: jax.sharding.Mesh | None = None,
               policy: policy_lib.Policy | None = None, lr_rows: int | None = None
               ) -> tuple[Callable[..., Any], int]:
  """(the jitted solve `fuse` runs for these ingredients, its number of timesteps).

  Built once per (model, schedule, steps, solver and tiling settings, mesh, policy) and
  cached, so repeated fusions of same-shaped images reuse the compiled program. Untiled
  solves shard the rows over the local devices when `lr_rows` (the LR-HSI's height)
  splits evenly over them (policy.shard_pixels).
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
            ("init", s.init), ("start", float(s.start)),
            ("lr_scale", None if s.lr_scale is None else float(s.lr_scale)))
  tile = int(s.tile or 0)
  policy = policy_lib.resolve(policy)
  if tile > 0:
    tiled.check_tiling(tile, int(s.tile_overlap), ratio, int(s.tiles_per_call))
    mesh = sharding.make_mesh() if mesh is None else mesh
  elif policy.shard_pixels and jax.process_count() == 1:
    # Rows of the scene over the local devices, when they split evenly (else one device).
    mesh = sharding.make_mesh() if mesh is None else mesh
    n_data = mesh.shape[sharding.DATA_AXIS]
    if lr_rows is None or lr_rows % n_data:
      mesh = None
  else:
    mesh = None
  solve = _cached_solver(prior.model if prior else None, (name, int(T), n, s.respacing),
                         int(ratio), kwargs, (tile, int(s.tile_overlap),
                                              int(s.tiles_per_call)), mesh, policy)
  return solve, solver.run_positions(n, float(s.start))


def central_window(y: Any, z: Any, ratio: int, side: int) -> tuple[np.ndarray, np.ndarray]:
  """The central (at most side x side LR pixels) window of the pair as arrays: the whole
  pair when it is smaller or side is 0. Only that window of a lazy image is read."""
  h, w = y.shape[:2]
  n, m = (h, w) if not side else (min(h, side), min(w, side))
  a, c = (h - n) // 2, (w - m) // 2
  return (windowed.load(y[a:a + n, c:c + m]),
          windowed.load(z[a * ratio:(a + n) * ratio, c * ratio:(c + m) * ratio]))


def estimate_operators(y: Any, z: Any, ratio: int, *, steps: int, lr: float,
                       psf_size: int | None = None, crop: int = 0
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Blind (psf (k, k), srf (b, B)) from the two images (`hsijax.sdp.blind`), fitted on
  their central `crop` x `crop` LR-pixel window (`central_window`; 0 = whole images)."""
  y, z = central_window(y, z, ratio, crop)
  psf, srf = blind.estimate_psf_srf(y, z, ratio, psf_size=psf_size, num_steps=int(steps),
                                    lr=float(lr))
  return np.asarray(psf), np.asarray(srf)


# "auto" radiometry keeps the affine (gain / offset) model only when the authors' model leaves
# more than this many times its LR-grid residual sum of squares. Measured with the `real,fast`
# settings (docs/sdp_results.md): 0.2-3.5 on six same-sensor simulated pairs (the affine fit,
# a harder problem for the same Adam budget, can even end worse: 0.22 on aviris_moffett, where
# always using it cost SDP 3.4 dB), 7.5 and 15 on two others, 120-840 on pairs with per-band
# gains 0.7-1.4 and offsets of 2-5 %, 3.5 on a real CASI + RGB pair.
AUTO_RADIOMETRY_RATIO = 2.0
# ... and only when the affine model explains at least this much more of the MSI's variance
# on the LR grid (a ratio of two residuals at the noise floor means nothing).
AUTO_RADIOMETRY_MIN_R2_GAIN = 0.01
# Below this coefficient of determination (any MSI band, LR grid, chosen model) the MSI is
# not a linear image of what the HSI sees; `estimate_calibrated` warns.
MIN_MSI_R2 = 0.9


def apply_msi_calibration(z: Any, calibration: dict[str, Any] | None) -> Any:
  """The HR-MSI in the LR-HSI's units under a blind fit's calibration (`Fusion.calibration`,
  `MethodResults.calibration`): max((z - offset) / gain, 0) per band for the "affine" model
  (a view computed per window when z is read by windows), z itself otherwise."""
  if not calibration or calibration.get("model") != "affine":
    return z
  gain, offset = (np.asarray(calibration[k], np.float32) for k in ("gain", "offset"))
  if windowed.is_lazy(z):
    return windowed.ImageView(z, offset=offset, scale=gain, clip=True)
  return blind.calibrate_msi(z, gain, offset)


def unit_sum(psf: Any) -> np.ndarray:
  """The PSF as float32 scaled to sum 1; a PSF already summing to 1 (to float32 rounding) is
  returned as it is, so normalising twice changes nothing."""
  psf = np.asarray(psf, np.float32)
  total = float(psf.sum())
  return psf if abs(total - 1.0) <= 1e-6 else psf / np.float32(total)


def estimate_calibrated(y: Any, z: Any, ratio: int, *, steps: int, lr: float,
                        psf_size: int | None = None, radiometry: str = "none", crop: int = 0
                        ) -> tuple[np.ndarray, np.ndarray, Any, dict[str, Any]]:
  """Blind PSF / SRF and the HR-MSI in the LR-HSI's units: (psf, srf, z_used, calibration).

  Fitted on the central `crop` x `crop` LR pixels (`central_window`; 0 = whole images).
  radiometry "none": the authors' model, z_used = z. "affine": Z_j = g_j rownorm(R)_j X + o_j
  (`hsijax.sdp.blind`), z_used = max((z - o) / g, 0) (a view computed per window when z is
  read by windows). "auto": both are fitted and the affine one is kept when
  sum_j SS_res(none) > AUTO_RADIOMETRY_RATIO * sum_j SS_res(affine) on the LR grid and the
  affine fit explains AUTO_RADIOMETRY_MIN_R2_GAIN more of sum_j SS_tot.
  calibration: {"model": the one used, "gain", "offset" (in z's units), "r2" (per band, of the
  model used), "ss_ratio" (auto only)}. Warns when min r2 < MIN_MSI_R2.
  """
  if radiometry not in blind.RADIOMETRY + ("auto",):
    raise ValueError(f"unknown radiometry {radiometry!r}; use one of "
                     f"{blind.RADIOMETRY + ('auto',)}")
  y_fit, z_fit = central_window(y, z, ratio, crop)
  kw = dict(psf_size=psf_size, num_steps=int(steps), lr=float(lr))
  b = z.shape[-1]
  cal: dict[str, Any] = {}
  psf = srf = None
  if radiometry in ("none", "auto"):
    psf, srf = blind.estimate_psf_srf(y_fit, z_fit, ratio, **kw)
    ss0, tot = (np.asarray(a) for a in blind.lr_residuals(psf, srf, y_fit, z_fit, ratio))
    cal = {"model": "none", "gain": [1.0] * b, "offset": [0.0] * b,
           "r2": (1.0 - ss0 / np.maximum(tot, 1e-30)).tolist()}
  if radiometry in ("affine", "auto"):
    psf1, srf1, c1 = blind.estimate_psf_srf(y_fit, z_fit, ratio, radiometry="affine", **kw)
    aff = {"model": "affine", **{k: np.asarray(v).tolist() for k, v in c1.items()}}
    if radiometry == "affine":
      psf, srf, cal = psf1, srf1, aff
    else:
      ss1, _ = blind.lr_residuals(psf1, srf1, y_fit, z_fit, ratio, c1["gain"], c1["offset"])
      ratio_ss = float(np.sum(ss0) / max(float(np.sum(ss1)), 1e-30))
      r2_gain = float((np.sum(ss0) - np.sum(ss1)) / max(float(np.sum(tot)), 1e-30))
      if ratio_ss > AUTO_RADIOMETRY_RATIO and r2_gain > AUTO_RADIOMETRY_MIN_R2_GAIN:
        psf, srf, cal = psf1, srf1, aff
      cal["ss_ratio"], cal["r2_gain"] = ratio_ss, r2_gain
  z_used = apply_msi_calibration(z, cal)
  if min(cal["r2"]) < MIN_MSI_R2:
    hint = (" If the two sensors differ by a gain / offset per band, fit them: "
            "blind_radiometry='affine' (--config.blind.radiometry=affine)."
            if cal["model"] == "none" else "")
    warnings.warn(
        f"blind estimation: the HR-MSI fits the LR-HSI poorly on the LR grid (r2 per band "
        f"{np.round(cal['r2'], 3).tolist()} with the {cal['model']!r} radiometric model): it is "
        "not a linear image of the scene the LR-HSI sees (another date or sensor geometry, "
        "nonlinear processing such as gamma-encoded RGB, misregistration). Methods that "
        "trust the MSI (SDP, Baseline, detail injection, subspace LS) may fall below bicubic "
        f"upsampling of the LR-HSI.{hint}", stacklevel=2)
  return np.asarray(psf), np.asarray(srf), z_used, cal


def fuse(y: Any, z: Any, *, prior: Prior | None = None, key: Any, ratio: int | None = None,
         psf: Any = None, srf: Any = None, steps: int | None = None,
         mesh: jax.sharding.Mesh | None = None, show_progress: bool = True,
         policy: policy_lib.Policy | None = None, out: Any = None,
         **settings: Any) -> Fusion:
  """Fuses an LR-HSI with an HR-MSI by SDP (with a prior) or the Baseline (prior=None).

  Args:
    y: (h, w, B) LR-HSI in [0, 1] (scale both images by one common factor, e.g.
      `scale_pair`, so that Z = R X still holds; images beyond [0, 1] are divided by their
      joint maximum for the solve, with a warning, and X comes back in their units).
    z: (H, W, b) HR-MSI in [0, 1], H = ratio h, W = ratio w. Both may be images read by
      windows (`hsijax.windowed`): a windowed solve then reads only windows of them.
    prior: a trained `Prior` (train_prior / load_prior) for B bands; None = Baseline.
    key: PRNG key or int seed of the solver's diffusion noise (same key, same result).
    ratio: optional check of the ratio inferred from the shapes.
    psf: (k, k) known PSF (normalised to sum 1), or None to estimate it blindly.
    srf: (b, B) known SRF, or None to estimate it blindly (with the PSF).
    steps: solver timesteps (respaced from the prior's T); None = all T (the paper).
      100 is a good fast choice (see configs/sdp.py budgets).
    mesh: devices (default: all local ones): tiled solves shard windows over them,
      untiled ones the rows of the scene (when they split evenly).
    show_progress: False hides the progress output.
    policy: platform choices (hsijax.policy; None = the running backend's).
    out: an (H, W, B) float32 array to write X into (e.g. `np.lib.format.open_memmap` on
      disk): a windowed solve then writes it strip by strip and host memory stays bounded
      by the windows, whatever the scene size. None = a new array.
    **settings: `FusionSettings` fields (lam, gam, lr, K, init, tile, memory_gb,
      blind_steps, ...). tile None chooses whole-scene or windowed solving from memory_gb.

  Returns:
    Fusion(x, psf, srf, ratio, blind, steps, seconds, windows).
  """
  s = FusionSettings.from_kwargs(**settings)
  y, z = windowed.as_image(y), windowed.as_image(z)
  r = check_pair(y, z, psf=psf, srf=srf, ratio=ratio, psf_size=s.psf_size)
  unit = 1.0
  peak = max(windowed.stats(y).max, windowed.stats(z).max)
  if peak > 1.5:
    # Not in [0, 1] (e.g. raw DN): solve on both divided by one common factor (keeps
    # Z = R X) and return X in the inputs' units; say so, since a prior trained on spectra
    # scaled otherwise sees other values.
    unit = peak
    warnings.warn(f"fuse: the images reach {unit:.4g}, not [0, 1]; both were divided by "
                  f"{unit:.4g} for the solve and X is returned in their units. Scale them "
                  "yourself (hsijax.sdp.scale_pair) the same way as the prior's training "
                  "pixels to silence this", stacklevel=2)
    y, z = ((windowed.ImageView(a, scale=unit) if windowed.is_lazy(a) else a / unit)
            for a in (y, z))
  if prior is not None and prior.num_bands != y.shape[-1]:
    raise ValueError(f"the prior was trained on {prior.num_bands} bands but y has "
                     f"{y.shape[-1]}; train the prior on spectra of this sensor")
  devices = (sharding.make_mesh() if mesh is None else mesh).shape[sharding.DATA_AXIS]
  tile, overlap, per_call = plan_windows(z.shape[:2] + y.shape[-1:], z.shape[-1], r, s,
                                         hidden=prior.model.hidden if prior else 16,
                                         devices=devices)
  s = dataclasses.replace(s, tile=tile, tile_overlap=overlap, tiles_per_call=per_call)
  if not tile:  # the whole scene at once: it fits the budget, so read it
    y, z = windowed.load(y), windowed.load(z)
  solve, n = solver_for(prior, ratio=r, steps=steps, settings=s, mesh=mesh, policy=policy,
                        lr_rows=y.shape[0])
  seconds: dict[str, float] = {}
  is_blind = psf is None or srf is None
  calibration = None
  if is_blind:
    t0 = time.perf_counter()
    est_psf, est_srf, z, calibration = estimate_calibrated(
        y, z, r, steps=s.blind_steps, lr=s.blind_lr, psf_size=s.psf_size,
        radiometry=s.blind_radiometry if srf is None else "none", crop=s.blind_crop)
    seconds["blind"] = time.perf_counter() - t0
    psf = est_psf if psf is None else psf
    srf = est_srf if srf is None else srf
  psf = unit_sum(psf)
  srf = np.asarray(srf, np.float32)
  params = prior.params if prior is not None else None
  key = settings_lib.as_key(key)
  t0 = time.perf_counter()
  desc = "SDP solve" if prior is not None else "Baseline solve"
  with contextlib.nullcontext() if show_progress else progress.silenced():
    if tile > 0:  # the tiled solver opens one bar per chunk of windows itself
      x = solve(params, y, z, psf, srf, key, out=out)
    else:
      with progress.bar(n, desc=desc):
        x = np.asarray(jax.block_until_ready(solve(params, y, z, psf, srf, key)), np.float32)
      if out is not None:
        out[...] = x
        x = out
  if unit != 1.0 and out is not None:
    for a in range(0, out.shape[0], 64):  # by rows: `out` may be a file (fileio.BandFile)
      out[a:a + 64] = np.asarray(out[a:a + 64]) * np.float32(unit)
  elif unit != 1.0:
    x = np.asarray(x, np.float32) * np.float32(unit)
  seconds["solve"] = time.perf_counter() - t0
  return Fusion(x=x if out is not None else np.asarray(x, np.float32), psf=psf, srf=srf,
                ratio=r, blind=is_blind, steps=n, calibration=calibration, seconds=seconds,
                windows={"tile": tile, "overlap": overlap, "tiles_per_call": per_call})
