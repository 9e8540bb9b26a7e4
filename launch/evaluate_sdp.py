"""SDP on one real cube under the SPEC section 6 protocol (Wald simulation of a crop).

    python -m launch.evaluate_sdp --config=configs/sdp.py:crop \
        --config.data.path=../shared/data/cubes/pavia_centre_crop.npz \
        [--config.data.key=cube] [--config.data.wavelengths_nm=430:860] \
        [--config.budget=fast] --workdir=workdirs/eval

The cube is normalised (negatives clipped, divided by its max); its top half trains the
spectral model, its bottom half (cropped to a multiple of the ratio) is the reference, from
which the LR-HSI (PSF blur, decimation, 20 dB noise) and HR-MSI (IKONOS SRF, 30 dB noise) are
simulated. SDP, Baseline (gam = 0) and the classical methods run with blind PSF / SRF unless
--config.known_operators=True.

Writes DIR/metrics.json = {"sdp": {psnr, sam, rmse, ergas, uiqi}, "baseline": {...},
"<classical method>": {...}, "seconds": {...}}, DIR/run.json (details), DIR/fusion.png,
DIR/band_psnr.png and DIR/checkpoints/ (the spectral model; a rerun resumes from it).
"""
from __future__ import annotations


from configs import sdp as sdp_config
from launch import common, sdp_pipeline


def run(config, workdir: str) -> dict:
  """Runs with a (possibly unresolved) SDP config; returns what metrics.json holds."""
  workdir = common.setup(workdir)
  cfg = sdp_config.resolve(config)
  if not cfg.data.path:
    raise ValueError("evaluate_sdp needs a cube: pass --config.data.path=FILE.npz "
                     "(e.g. ../shared/data/cubes/pavia_centre_crop.npz)")
  scene = sdp_pipeline.load_scene(cfg)
  table, details = sdp_pipeline.evaluate_scene(scene, cfg, workdir)
  common.write_json(workdir / "run.json", details)
  common.write_json(workdir / "metrics.json", table)
  sdp_pipeline.print_table(table)
  common.log(f"wrote {workdir / 'metrics.json'} and figures in {workdir}")
  return table


if __name__ == "__main__":
  common.run_main(run, "configs/sdp.py:crop", "workdirs/evaluate_sdp", "SDP config")
