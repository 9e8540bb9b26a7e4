"""SDP fusion of large scenes: overlapping windows, batched, sharded, in bounded memory.

The HR-MSI Z (H, W, b) is cut into `tile x tile` windows (`hsijax.tiling.make_grid`, corners
multiples of the ratio) and the LR-HSI Y (h, w, B) into the matching `tile / ratio` windows,
so every window pair is itself a valid fusion problem. Windows are solved by Algorithm 1
(`solver.make_solver`) `vmap`-ed over a chunk of `tiles_per_call` windows, the chunk
sharded over the mesh's `data` axis (`jax.jit` with `NamedSharding`s, parameters
replicated; the chunk is padded to a multiple of the device count), and the outputs are
blended on the host (`tiling.map_tiles`, the loop SCDM tiles use too). Device memory is
that of one chunk, whatever the scene size.

Why tiled matches untiled. The solver uses noise="position": each pixel's diffusion noise
is keyed by its global position and the step, so a window sees exactly the slice of the
scene's noise field; the loss is a sum over pixels (no means) and Adam, clamp, EMA and
weight decay act per pixel. A window's run then differs from the scene's only through the
zero padding of `blur_down` at its inner edges (and, with init="upsample", the edge
extension of the upsampling; with init="classical" each window starts from its own
classical estimate, fitted on the window, so windows then match the scene only
approximately). Each Adam step spreads that difference by about a PSF
footprint plus the ratio, so after n K steps only pixels far from inner window edges are
guaranteed to match to float rounding; the difference decays fast with the distance (see
docs/scaling.md for measured numbers). Image-border sides of windows see the same zero
padding as the untiled solve and are exact.

The blend uses `halo` (default overlap // 4): the halo pixels nearest each inner window
edge get weight 0 and the next overlap - halo pixels ramp linearly, so every output pixel
comes from window pixels at least `halo` away from an inner edge, and neighbouring windows
are cross-faded over the rest of the overlap (no visible seam).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from hsijax import diffusion, progress, sharding, tiling, windowed
from hsijax.sdp import solver as solver_lib
from hsijax.sdp.denoiser import SpectralDenoiser


def check_tiling(tile: int, overlap: int, ratio: int, tiles_per_call: int,
                 halo: int | None = None) -> int:
  """Validates the tiling options; returns the halo (overlap // 4 when None).

  Raises ValueError naming the option and the fix.
  """
  if int(tile) != tile or tile < 1:
    raise ValueError(f"tile must be a positive number of HR-MSI pixels, got {tile!r} "
                     "(use tile=0 in the config for an untiled solve)")
  if tile % ratio:
    raise ValueError(f"tile ({tile}) must be a multiple of the ratio {ratio} so the LR-HSI "
                     f"windows line up with the HR-MSI windows; use {max(tile // ratio, 1) * ratio}"
                     f" or {(tile // ratio + 1) * ratio}")
  if overlap % ratio:
    raise ValueError(f"tile overlap ({overlap}) must be a multiple of the ratio {ratio}; use "
                     f"{overlap // ratio * ratio} or {(overlap // ratio + 1) * ratio}")
  if not 0 <= overlap < tile:
    raise ValueError(f"tile overlap ({overlap}) must be in [0, tile={tile}); a quarter of the "
                     "tile is a good choice")
  if int(tiles_per_call) != tiles_per_call or tiles_per_call < 1:
    raise ValueError(f"tiles_per_call must be a positive integer, got {tiles_per_call!r}")
  halo = overlap // 4 if halo is None else int(halo)
  if not 0 <= 2 * halo <= overlap:
    raise ValueError(f"halo ({halo}) must be in [0, overlap / 2 = {overlap // 2}]")
  return halo


def make_tiled_solver(model: SpectralDenoiser, schedule: diffusion.Schedule, *, ratio: int,
                      tile: int, overlap: int, tiles_per_call: int = 8,
                      halo: int | None = None, mesh: jax.sharding.Mesh | None = None,
                      desc: str = "SDP tiles", policy: Any = None, **solver_kwargs: Any
                      ) -> Callable[..., np.ndarray]:
  """Builds the tiled, sharded SDP solve.

  Args:
    model, schedule, ratio: as for `solver.make_solver`.
    tile: window side in HR-MSI pixels (a multiple of ratio, at most the scene's smaller
      side; a tile covering the whole scene runs the untiled solve).
    overlap: overlap of neighbouring windows in HR pixels (a multiple of ratio, < tile).
    tiles_per_call: windows solved per jitted call (rounded up to a multiple of the `data`
      axis size); bounds device memory.
    halo: blend halo (see module docstring); None = overlap // 4.
    mesh: mesh with a `data` axis (None: `sharding.make_mesh()`, all devices).
    desc: progress bar label.
    **solver_kwargs: lam, gam, lr, K, weight_decay, ema_decay, init, lr_scale, ... of
      `solver.make_solver` (noise is always "position").

  Returns:
    solve(params, y (h, w, B), z (H, W, b), psf (k, k), srf (b, B), key, out=None) -> X
    (y and z arrays or images read by windows, `hsijax.windowed`)
    (H, W, B) NumPy float32 on every process (written into `out`, strip by strip, when
    given, e.g. a memory map). The same key is used for every window.
  """
  ratio = int(ratio)
  halo = check_tiling(tile, overlap, ratio, tiles_per_call, halo)
  if "noise" in solver_kwargs:
    raise ValueError("the tiled solver always uses noise='position'; drop the noise argument")
  mesh = sharding.make_mesh() if mesh is None else mesh
  rep, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
  solve_one = solver_lib.make_solver(model, schedule, ratio=ratio, noise="position",
                                     policy=policy, **solver_kwargs)
  steps = solver_lib.run_positions(schedule.num_steps, solver_kwargs.get("start", 1.0))
  batched = jax.jit(jax.vmap(solve_one, in_axes=(None, 0, 0, None, None, None, 0)),
                    in_shardings=(rep, data, data, rep, rep, rep, data), out_shardings=data)

  def solve(params, y, z, psf, srf, key, out=None) -> np.ndarray:
    y, z = windowed.as_image(y), windowed.as_image(z)  # lazy images: read by windows
    if len(y.shape) != 3 or len(z.shape) != 3:
      raise ValueError(f"y must be (h, w, B) and z (H, W, b); got {y.shape} and {z.shape}")
    H, W = z.shape[:2]
    if (H, W) != (y.shape[0] * ratio, y.shape[1] * ratio):
      raise ValueError(f"z is {H} x {W} but y is {y.shape[0]} x {y.shape[1]} with ratio "
                       f"{ratio}; the HR-MSI must be exactly ratio times the LR-HSI")
    if tile >= max(H, W):  # one window: the untiled solve
      y, z = windowed.load(y), windowed.load(z)
      with progress.bar(steps, desc=desc):
        x = np.asarray(jax.device_get(solve_one(params, y, z, psf, srf, key,
                                                jnp.zeros(2, jnp.int32))))
      if out is None:
        return x
      out[...] = x
      return out
    grid = tiling.make_grid(H, W, tile, overlap, multiple=ratio)
    p = jax.device_put(params, rep)
    psf_d, srf_d = (jax.device_put(jnp.asarray(a, jnp.float32), rep) for a in (psf, srf))
    key_d = jax.device_put(key, rep)
    return tiling.map_tiles(
        lambda _, starts, y_w, z_w: batched(p, y_w, z_w, psf_d, srf_d, key_d, starts),
        grid, [(y, ratio), (z, 1)], tiles_per_call=tiles_per_call, mesh=mesh, halo=halo,
        desc=desc, steps_per_call=steps, out=out)

  return solve


def fuse_tiled(model: SpectralDenoiser, schedule: diffusion.Schedule, params: Any,
               y: Any, z: Any, psf: Any, srf: Any, key: jax.Array, *, ratio: int,
               tile: int, overlap: int, tiles_per_call: int = 8, halo: int | None = None,
               mesh: jax.sharding.Mesh | None = None, **solver_kwargs: Any) -> np.ndarray:
  """One tiled, sharded SDP solve: `make_tiled_solver(...)(params, y, z, psf, srf, key)`.

  Returns X (H, W, B) as NumPy float32. Equals the untiled
  `make_solver(..., noise="position")` solve away from inner window edges.
  """
  return make_tiled_solver(model, schedule, ratio=ratio, tile=tile, overlap=overlap,
                           tiles_per_call=tiles_per_call, halo=halo, mesh=mesh,
                           **solver_kwargs)(params, y, z, psf, srf, key)


BINS = (0, 2, 4, 8, 12, 16, 24, 32, 48)


def tiling_differences(tiled: np.ndarray, full: np.ndarray, grid: tiling.TileGrid,
                       halo: int) -> dict[str, Any]:
  """How a tiled result differs from the untiled one, by distance to inner window edges.

  Returns max / mean |difference| per distance bin (pixels to the nearest inner edge of a
  window that feeds the pixel), in the blend bands (seams) and elsewhere, and how much the
  differences between neighbouring pixels change across seams (a visible seam would).
  """
  dist = tiling.border_distance(grid, halo)
  err = np.abs(tiled - full).max(-1)
  by_distance = {}
  for lo, hi in zip(BINS, BINS[1:] + (10 ** 9,)):
    m = (dist >= lo) & (dist < hi)
    if m.any():
      by_distance[f"{lo}-{hi if hi < 10 ** 9 else 'inf'}"] = {
          "pixels": int(m.sum()), "max": float(err[m].max()), "mean": float(err[m].mean())}
  seam = dist < grid.overlap  # pixels in a blend band (fed by window pixels near an edge)
  out = {"by_distance": by_distance,
         "seam_max_abs_diff": float(err[seam].max()),
         "interior_max_abs_diff": float(err[~seam].max()),
         "interior_exact_fraction": float((err[~seam] == 0).mean())}
  for axis, name in ((0, "rows"), (1, "cols")):
    g_t, g_f = np.diff(tiled, axis=axis), np.diff(full, axis=axis)
    band = (np.delete(seam, -1, axis) | np.delete(seam, 0, axis))
    d = np.abs(g_t - g_f).max(-1)
    out[f"neighbour_diff_{name}"] = {
        "seam_max_abs_change": float(d[band].max()),
        "elsewhere_max_abs_change": float(d[~band].max()),
        "seam_max_abs_gradient": float(np.abs(g_t).max(-1)[band].max()),
        "elsewhere_max_abs_gradient": float(np.abs(g_t).max(-1)[~band].max())}
  return out
