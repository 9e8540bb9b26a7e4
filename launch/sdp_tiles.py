"""Tiled vs untiled SDP on one scene: the numbers of docs/scaling.md ("Large scenes").

    # untiled reference (a tile covering the scene = one window, position-keyed noise)
    python -m launch.sdp_tiles --config=configs/sdp.py:demo --config.data.height=512 \
        --config.data.width=256 --config.data.num_bands=103 --config.model.hidden=512 \
        --config.train.steps=500 --config.solver.num_steps=10 --config.solver.tile=256 \
        --workdir=workdirs/tiles
    # tiled: same flags with --config.solver.tile=64 --config.solver.tile_overlap=16
    #        [--config.solver.tiles_per_call=8]

The scene is the config's (the synthetic demo scene unless --config.data.path is given),
simulated by Wald's protocol with the known PSF / SRF; the prior is trained once and reloaded
from DIR by later runs. Each run solves SDP with `hsijax.sdp.fuse` (tile settings from the
config) twice (the first call compiles) and writes DIR/tile_<T>.npz (X) and
DIR/tile_<T>.json: wall seconds of both calls, peak resident memory, PSNR against the
reference, and for a tiled run the differences to an untiled result already in DIR
(`hsijax.sdp.tiled.tiling_differences`).
"""
from __future__ import annotations

import resource
import time

import jax
import numpy as np

from configs import common as config_common
from configs import sdp as sdp_config
from hsijax import degrade, metrics, sharding, tiling
from hsijax import sdp
from launch import common, runner, scenes


def run(config, workdir: str) -> dict:
  workdir = common.setup(workdir)
  cfg = sdp_config.resolve(config)
  tile = int(cfg.solver.tile or 0)
  if tile <= 0:
    raise ValueError("set --config.solver.tile (>= the scene size for the untiled reference)")
  scene = scenes.load_scene(cfg)
  srf = degrade.ikonos_srf(scene.wavelengths_nm, path=cfg.data.srf_path or None)
  wd = degrade.wald_protocol(scene.cube, ratio=int(cfg.data.ratio), srf=srf,
                             key=jax.random.fold_in(jax.random.key(cfg.seed), 0))
  y, z, ref = (np.asarray(a, np.float32) for a in (wd.y, wd.z, wd.x))
  common.log(f"{scene.description}: LR-HSI {y.shape}, HR-MSI {z.shape}, ratio {wd.ratio}")
  prior = sdp.train_prior(np.asarray(wd.train_pixels), steps=cfg.train.steps, key=cfg.seed,
                          workdir=workdir, policy=config_common.policy(cfg),
                          **sdp_config.prior_settings(cfg))
  mesh = sharding.make_mesh(cfg.mesh)
  seconds = []
  for _ in range(2):  # the first call compiles; the second is the steady-state time
    t0 = time.perf_counter()
    x = sdp.fuse(y, z, prior=prior, key=jax.random.fold_in(jax.random.key(cfg.seed), 1),
                 psf=wd.psf, srf=wd.srf, steps=cfg.solver.num_steps, mesh=mesh,
                 policy=config_common.policy(cfg), **sdp_config.fusion_settings(cfg)).x
    seconds.append(time.perf_counter() - t0)
  H, W = z.shape[:2]
  result = {
      "scene": scene.description, "hr_shape": z.shape, "lr_shape": y.shape,
      "ratio": wd.ratio, "tile": tile, "overlap": int(cfg.solver.tile_overlap),
      "tiles_per_call": int(cfg.solver.tiles_per_call), "devices": jax.device_count(),
      "solver_steps": int(cfg.solver.num_steps), "K": int(cfg.solver.K),
      "seconds_first_call": seconds[0], "seconds_second_call": seconds[1],
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "psnr": float(metrics.psnr(ref, x)),
  }
  common.save_npz(workdir / f"tile_{tile}.npz", X=x)
  refs = [p for p in sorted(workdir.glob("tile_*.npz"))
          if int(p.stem.split("_")[1]) >= max(H, W)]
  if tile < max(H, W) and refs:
    full = np.load(refs[0])["X"]
    grid = tiling.make_grid(H, W, tile, int(cfg.solver.tile_overlap), wd.ratio)
    halo = sdp.tiled.check_tiling(tile, int(cfg.solver.tile_overlap), wd.ratio,
                                  int(cfg.solver.tiles_per_call))
    result["vs_untiled"] = sdp.tiled.tiling_differences(x, full, grid, halo)
    result["windows"] = len(grid.starts)
  common.write_json(workdir / f"tile_{tile}.json", result)
  common.log(str(common.to_builtin(result)))
  return result


if __name__ == "__main__":
  runner.run_main(run, "configs/sdp.py:demo", "workdirs/tiles", "SDP config")
