"""Trains the stages of an SCDM cascade (RGB -> HSI), one conditional U-Net per stage.

    python -m launch.train_scdm --config=configs/scdm.py:tiny \
        --config.data.path=../shared/data/cubes/houston2018_crop.npz:cube \
        --config.data.split=quadrant --workdir=workdirs/scdm_tiny
    python -m launch.train_scdm --config=configs/scdm.py:paper_houston --config.stage=1 \
        --config.data.path=/data/houston_train.npz:cube --workdir=workdirs/scdm_houston
    # from a TFDS dataset (python -m launch.build_dataset --name=cubes ... --data_dir=tfds):
    python -m launch.train_scdm --config=configs/scdm.py:tiny --config.data.tfds=cubes \
        --config.data.tfds_dir=tfds --config.data.num_bands=N --workdir=workdirs/scdm_tfds

Stage k learns the bands of its stage from its condition (stage 0: the RGB bands
`data.rgb_bands` of the cube; stage k > 0: the TRUE bands of stage k - 1, as in the paper, so
stages train independently and in any order). `--config.stage=all` trains every stage in turn,
`--config.stage=k` only stage k. Library calls: configs.scdm.make_cascade (the config's
hsijax.scdm.Cascade), hsijax.scdm.train; load the result with hsijax.scdm.load(DIR).

Writes:
  DIR/cascade.json          the Cascade (band sets, normaliser, RGB bands, model and diffusion
                            settings) and what it was trained on; a later run with other data
                            or settings stops with an error instead of mixing stages.
  DIR/stage{k}/checkpoints  Orbax TrainState every train.checkpoint_every steps and at the end;
                            a killed run resumes from the latest one and ends with the same
                            parameters as an uninterrupted run.
  DIR/metrics.json          {"stage0": {"final_loss", "steps", "seconds", "num_bands",
                            "num_params"}, ...} (merged over runs).
"""
from __future__ import annotations

import json
from typing import Any

import jax

from configs import common as config_common
from configs import scdm as scdm_config
from hsijax import scdm, sharding
from launch import common, runner, scdm_data


def run(cfg, workdir) -> dict[str, Any]:
  """Trains the selected stages; returns (and writes) DIR/metrics.json's content."""
  scdm_config.validate(cfg)
  workdir = common.setup(workdir)
  stages = scdm_config.stages_to_train(cfg)
  batches = None
  if cfg.data.tfds:  # crops from a TFDS dataset through grain; a pixel sample for statistics
    from hsijax import datasets  # pylint: disable=g-import-not-at-top
    source = scdm_data.tfds_source(cfg)
    train = scdm_data.tfds_sample(source, 65536, int(cfg.seed))[:, None, None, :]
    batches = datasets.scdm_crop_batches(
        source, crop=int(cfg.train.crop), batch=int(cfg.train.batch), seed=int(cfg.seed),
        process_index=jax.process_index(), process_count=jax.process_count())
  else:
    train = scdm_data.training_images(cfg)
  cascade = scdm_config.make_cascade(cfg, train)
  common.log(f"SCDM: {cascade.num_stages} stage(s), bands per stage "
             f"{[len(b) for b in cascade.band_sets]}; training stage(s) {stages} on "
             f"{train.shape[0]} image(s) of {train.shape[1:3]} for {cfg.train.steps} steps")
  trained = scdm.train(cascade, train, steps=int(cfg.train.steps), key=int(cfg.seed),
                       workdir=workdir, stages=stages, mesh=sharding.make_mesh(cfg.mesh),
                       policy=config_common.policy(cfg), batches=batches,
                       **scdm_config.train_settings(cfg))
  metrics_path = workdir / "metrics.json"
  metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
  # Keep other stages' entries; sampling scores of older weights no longer apply.
  metrics = {k: v for k, v in metrics.items() if k.startswith("stage")}
  for name, entry in trained.info.items():
    entry = {k: v for k, v in entry.items() if k != "history"}
    if entry["final_loss"] is not None or name not in metrics:
      metrics[name] = entry
    common.log(f"{name}: final loss {entry['final_loss']} after {entry['steps']} steps "
               f"({entry['seconds']:.1f} s)")
  common.write_json(metrics_path, metrics)
  return metrics


if __name__ == "__main__":
  runner.run_main(run, "configs/scdm.py:tiny", "workdirs/scdm", "SCDM config")
