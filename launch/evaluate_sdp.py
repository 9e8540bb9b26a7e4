"""SDP on one real cube under the simulation protocol (Wald's protocol on a crop).

    python -m launch.evaluate_sdp --config=configs/sdp.py:crop \
        --config.data.path=../shared/data/cubes/pavia_centre_crop.npz \
        [--config.data.key=cube] [--config.data.wavelengths_nm=430:860] \
        [--config.methods=sdp,baseline,subspace_ls] [--config.budget=fast] --workdir=workdirs/eval

The cube is normalised (negatives clipped, divided by its max); its top half trains the
spectral prior, its bottom half (cropped to a multiple of the ratio) is the reference, from
which the LR-HSI (PSF blur, decimation, 20 dB noise) and HR-MSI (IKONOS SRF, 30 dB noise) are
simulated. Every method runs with blind PSF / SRF unless --config.known_operators=True.
Library call: hsijax.sdp.evaluate_cube.

Writes DIR/metrics.json = {"sdp": {psnr, sam, rmse, ergas, uiqi}, "baseline": {...},
"<classical method>": {...}, "seconds": {...}, "conventions": {...}}, DIR/run.json (details),
DIR/fusion.png, DIR/band_psnr.png and DIR/checkpoints/ (the prior; a rerun resumes from it).
"""
from __future__ import annotations

from configs import common as config_common
from configs import sdp as sdp_config
from hsijax import metrics, sharding
from hsijax import sdp
from launch import common, runner, report, scenes


def evaluate(cfg, workdir, scene: scenes.Scene, title: str | None = None) -> dict:
  """Runs the protocol on `scene` with a resolved config; writes every output file."""
  ev = sdp.evaluate_cube(
      scene.cube, wavelengths_nm=scene.wavelengths_nm, key=cfg.seed, ratio=cfg.data.ratio,
      snr_y_db=cfg.data.snr_y_db, snr_z_db=cfg.data.snr_z_db, srf_path=cfg.data.srf_path,
      known_operators=cfg.known_operators, train_steps=cfg.train.steps,
      prior_settings=sdp_config.prior_settings(cfg), steps=cfg.solver.num_steps,
      methods=sdp_config.methods(cfg), workdir=workdir, mesh=sharding.make_mesh(cfg.mesh),
      policy=config_common.policy(cfg), **sdp_config.fusion_settings(cfg))
  common.log(f"scene: {scene.description}; reference {ev.reference.shape}, LR-HSI "
             f"{ev.y.shape}, HR-MSI {ev.z.shape}")
  table = {**ev.table, "conventions": metrics.CONVENTIONS}
  common.write_json(workdir / "run.json", {"scene": scene.description, **ev.details,
                                           "config": common.config_to_dict(cfg)})
  common.write_json(workdir / "metrics.json", table)
  report.save_fusion_figures(workdir, ev.reference, ev.methods.results, ev.table,
                             wavelengths_nm=scene.wavelengths_nm, y=ev.y,
                             title=title or scene.description)
  report.print_table(table)
  return table


def run(config, workdir: str) -> dict:
  """Runs with a (possibly unresolved) SDP config; returns what metrics.json holds."""
  workdir = common.setup(workdir)
  cfg = sdp_config.resolve(config)
  if not cfg.data.path:
    raise ValueError("evaluate_sdp needs a cube: pass --config.data.path=FILE.npz "
                     "(e.g. ../shared/data/cubes/pavia_centre_crop.npz)")
  table = evaluate(cfg, workdir, scenes.load_scene(cfg))
  common.log(f"wrote {workdir / 'metrics.json'} and figures in {workdir}")
  return table


if __name__ == "__main__":
  runner.run_main(run, "configs/sdp.py:crop", "workdirs/evaluate_sdp", "SDP config")
