"""The README's main job: SDP fusion on a scene the project makes itself (no files needed).

    python -m launch.demo --workdir=workdirs/demo

Builds a synthetic hyperspectral scene (real reflectance spectra from colour-science mixed by
smooth random abundance maps, `hsijax.synthetic`), simulates the LR-HSI / HR-MSI pair by the
Wald protocol, trains the spectral diffusion model on the scene's other half, fuses with SDP,
the Baseline (gam = 0) and the classical methods (blind PSF / SRF), prints a metrics table and
writes DIR/metrics.json, DIR/fusion.png and DIR/band_psnr.png. A few minutes on a laptop CPU.
"""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from configs import sdp as sdp_config
from launch import common, sdp_pipeline


# Lower is better for these; higher for the others.
_LOWER = ("sam", "rmse", "ergas")


def run(config, workdir: str) -> dict:
  """Runs with a (possibly unresolved) SDP config; returns what metrics.json holds."""
  workdir = common.setup(workdir)
  cfg = sdp_config.resolve(config)
  scene = sdp_pipeline.load_scene(cfg)
  table, details = sdp_pipeline.evaluate_scene(scene, cfg, workdir, title="hsijax demo")
  common.write_json(workdir / "run.json", details)
  common.write_json(workdir / "metrics.json", table)
  sdp_pipeline.print_table(table)
  s, b = table["sdp"], table["baseline"]
  wins = [k for k in s if (s[k] < b[k] if k in _LOWER else s[k] > b[k])]
  common.log(f"SDP beats the Baseline on {len(wins)}/{len(s)} metrics "
             f"(PSNR {s['psnr'] - b['psnr']:+.2f} dB, SAM {s['sam'] - b['sam']:+.2f} deg)")
  common.log(f"figures: {workdir / 'fusion.png'}, {workdir / 'band_psnr.png'}")
  return table


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  # Flags are defined here, not at import, so tests can import every entry point at once.
  config_flags.DEFINE_config_file("config", "configs/sdp.py:demo", "SDP config file and preset.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", "workdirs/demo", "Output folder.")
  app.run(main)
