"""Tiled vs untiled SDP on one scene: the numbers of docs/scaling.md ("Large scenes").

    # untiled reference (a tile covering the scene = one window, position-keyed noise)
    python -m launch.sdp_tiles --config=configs/sdp.py:demo --config.data.height=512 \
        --config.data.width=256 --config.data.num_bands=103 --config.model.hidden=512 \
        --config.train.steps=500 --config.solver.num_steps=10 --config.solver.tile=256 \
        --workdir=workdirs/tiles
    # tiled: same flags with --config.solver.tile=64 --config.solver.tile_overlap=16
    #        [--config.solver.tiles_per_call=8]

The scene is the config's (`sdp_pipeline.load_scene`: the synthetic demo scene unless
--config.data.path is given), simulated by the Wald protocol with the known PSF / SRF; the
spectral model is trained once and reloaded from DIR/checkpoints by later runs. Each run
solves SDP with `sdp_pipeline.make_fusion_solver` (the tiling config of every entry point), and writes DIR/tile_<T>.npz (X) and DIR/tile_<T>.json: wall seconds of the solve
(first call, compile included, and a second call), peak resident memory of the process, the
XLA temp memory of one jitted call, and PSNR against the reference. A tiled run also
compares with the untiled result already in DIR (any tile_<T>.npz whose T covers the
scene): max |difference| by distance to the nearest inner window edge, in the windows'
interiors and at the seams, and neighbour differences across seams vs elsewhere.
"""
from __future__ import annotations

import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import sdp as sdp_config
from hsijax import metrics, sharding, tiling
from hsijax import sdp
from launch import common, sdp_pipeline

BINS = (0, 2, 4, 8, 12, 16, 24, 32, 48)


def _compiled_temp_mb(model, params, y, z, psf, srf, key, cfg, ratio: int) -> float:
  """XLA temp memory (MB) of one jitted call: the whole scene, or one chunk of windows."""
  s = cfg.solver
  solve = sdp.make_solver(model, sdp_pipeline.solver_schedule(cfg), lam=float(s.lam),
                          gam=float(s.gam), lr=float(s.lr), K=int(s.K), ratio=ratio,
                          noise="position")
  H, W = z.shape[:2]
  tile = int(s.tile)
  if tile >= max(H, W):
    lowered = solve.lower(params, y, z, psf, srf, key, jnp.zeros(2, jnp.int32))
  else:
    n_data = sharding.make_mesh(cfg.get("mesh")).shape[sharding.DATA_AXIS]
    n = len(tiling.make_grid(H, W, tile, int(s.tile_overlap), ratio).starts)
    chunk = -(-min(int(s.tiles_per_call), n) // n_data) * n_data
    tl = tile // ratio
    spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    lowered = jax.jit(jax.vmap(solve, in_axes=(None, 0, 0, None, None, None, 0))).lower(
        params, spec((chunk, tl, tl, y.shape[-1])), spec((chunk, tile, tile, z.shape[-1])),
        psf, srf, key, jax.ShapeDtypeStruct((chunk, 2), jnp.int32))
  analysis = lowered.compile().memory_analysis()
  return float(analysis.temp_size_in_bytes) / 1e6 if analysis is not None else float("nan")


def compare(tiled: np.ndarray, full: np.ndarray, grid: tiling.TileGrid, halo: int) -> dict:
  """Differences between a tiled and the untiled result, by distance to inner window edges."""
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


def run(config, workdir: str) -> dict:
  workdir = common.setup(workdir)
  cfg = sdp_config.resolve(config)
  scene = sdp_pipeline.load_scene(cfg)
  wd = sdp_pipeline.wald(scene, cfg)
  y, z, ref = (np.asarray(a, np.float32) for a in (wd.y, wd.z, wd.x))
  psf, srf, ratio = np.asarray(wd.psf), np.asarray(wd.srf), int(wd.ratio)
  common.log(f"{scene.description}: LR-HSI {y.shape}, HR-MSI {z.shape}, ratio {ratio}")
  model, params, _ = sdp_pipeline.train_prior(wd.train_pixels, cfg, workdir)
  H, W = z.shape[:2]
  tile = int(cfg.solver.tile)
  if tile <= 0:
    raise ValueError("set --config.solver.tile (>= the scene size for the untiled reference)")
  key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
  solve = sdp_pipeline.make_fusion_solver(model, ratio, cfg, gam=float(cfg.solver.gam),
                                          desc=f"tile {tile}")
  seconds = []
  for _ in range(2):  # the first call compiles; the second is the steady-state time
    t0 = time.perf_counter()
    x = solve(params, y, z, psf, srf, key)
    seconds.append(time.perf_counter() - t0)
  result = {
      "scene": scene.description, "hr_shape": z.shape, "lr_shape": y.shape, "ratio": ratio,
      "tile": tile, "overlap": int(cfg.solver.tile_overlap),
      "tiles_per_call": int(cfg.solver.tiles_per_call), "devices": jax.device_count(),
      "solver_steps": int(cfg.solver.num_steps), "K": int(cfg.solver.K),
      "seconds_first_call": seconds[0], "seconds_second_call": seconds[1],
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "xla_temp_mb_per_call": _compiled_temp_mb(model, params, y, z, psf, srf, key, cfg,
                                                ratio),
      "psnr": float(metrics.psnr(ref, x)),
  }
  common.save_npz(workdir / f"tile_{tile}.npz", X=x)
  refs = [p for p in sorted(workdir.glob("tile_*.npz"))
          if int(p.stem.split("_")[1]) >= max(H, W)]
  if tile < max(H, W) and refs:
    full = np.load(refs[0])["X"]
    grid = tiling.make_grid(H, W, tile, int(cfg.solver.tile_overlap), ratio)
    halo = sdp.check_tiling(tile, int(cfg.solver.tile_overlap), ratio,
                            int(cfg.solver.tiles_per_call))
    result["vs_untiled"] = compare(x, full, grid, halo)
    result["windows"] = len(grid.starts)
  common.write_json(workdir / f"tile_{tile}.json", result)
  common.log(str(common.to_builtin(result)))
  return result


if __name__ == "__main__":
  common.run_main(run, "configs/sdp.py:demo", "workdirs/tiles", "SDP config")
