"""SCDM acceptance experiment: one stage vs two stages vs two stages + PDT/ICMG vs linear.

    python -m launch.evaluate_scdm --config=configs/scdm.py:tiny --workdir=workdirs/scdm_eval

On a cube (default ../shared/data/cubes/houston2018_crop.npz) the RGB condition is the HSI
bands `data.rgb_bands`. The cube is split into four quadrants; three train, the fourth
(`data.test_quadrant`, default bottom-right) is sampled from its RGB bands and scored against
the true bands (hsijax.scdm.evaluate). Models (trained once, resumable): DIR/one_stage/ (one
U-Net making all N bands) and DIR/cascade/ (stage 0: RGB -> n bands, stage 1: n -> N).

Rows (same trained weights for the rows that share a model): linear (per-pixel affine least
squares), 1 stage, 1 stage + the last stage's PDT/ICMG, 2 stages, 2 stages + PDT/ICMG (the
paper's best, with the config's PDT target), and the same with the other PDT target.

Writes DIR/metrics.json {"results", "results_generated_bands" (without the RGB bands),
"seconds", "training", "setup", "budget", "conventions"}, DIR/results.md, DIR/samples.npz,
DIR/evaluate.png and DIR/band_psnr.png.
"""
from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from configs import common as config_common
from configs import scdm as scdm_config
from hsijax import metrics, plots, scdm, sharding
from hsijax.scdm import evaluate as scdm_eval
from launch import common, runner, scdm_data


def run(cfg, workdir) -> dict[str, Any]:
  scdm_config.validate(cfg)
  workdir = common.setup(workdir)
  t_start = time.perf_counter()
  if len(cfg.stages) != 2:
    raise ValueError("evaluate_scdm compares 1 and 2 stages and takes the PDT/ICMG settings "
                     "from a 2-stage config; drop the ',stages=K' modifier")
  cube = scdm_data.load_cube(cfg)
  train, test = scdm_eval.split_cube(cube, "quadrant", int(cfg.data.test_quadrant))
  rgb_bands = list(cfg.data.rgb_bands)
  mesh, policy = sharding.make_mesh(cfg.mesh), config_common.policy(cfg)
  common.log(f"SCDM evaluation on {cfg.data.path}: train {train.shape}, test "
             f"{scdm_eval.QUADRANT_NAMES[cfg.data.test_quadrant]} quadrant {test.shape}, "
             f"{cfg.train.steps} steps per model, {cfg.sample.method} "
             f"{cfg.sample.num_steps} sampling steps")
  models, training = {}, {}
  t0 = time.perf_counter()
  for name, num_stages in (("one_stage", 1), ("cascade", 2)):
    models[name] = scdm.train(scdm_config.make_cascade(cfg, train, num_stages), train,
                              steps=int(cfg.train.steps), key=int(cfg.seed),
                              workdir=workdir / name, mesh=mesh, policy=policy,
                              **scdm_config.train_settings(cfg))
    for k, entry in models[name].info.items():
      training[f"{name}/{k}"] = {**{n: v for n, v in entry.items() if n != "history"},
                                 "loss_curve": entry["history"]}
  train_seconds = time.perf_counter() - t0
  best = scdm_config.split_stage_list(cfg)
  plain = [{"guidance_scale": 0.0, "pdt_target": "none", "pdt_p_T": 1.0}]
  target = best[-1]["pdt_target"]
  other = {"x": "eps", "eps": "x"}.get(target)
  variants = [("1 stage", models["one_stage"], plain),
              (f"1 stage + PDT({target})/ICMG", models["one_stage"], best[-1:]),
              ("2 stages", models["cascade"], plain * 2),
              (f"2 stages + PDT({target})/ICMG", models["cascade"], best)]
  if other:  # the other PDT variant (paper: eps, authors' code: x) on the same weights
    variants.append((f"2 stages + PDT({other})/ICMG", models["cascade"],
                     [s | {"pdt_target": other} for s in best]))
  key = jax.random.fold_in(jax.random.key(int(cfg.seed)), 1_000_003)
  res = scdm_eval.compare(test, train, rgb_bands, variants, key=key, mesh=mesh,
                          policy=policy, **scdm_config.sample_settings(cfg))
  outputs, sample_seconds = res.pop("outputs"), res["sampling_seconds"]
  seconds = {"training": train_seconds, "sampling": float(sum(sample_seconds.values())),
             "total": time.perf_counter() - t_start}
  gen = scdm_eval.generated_bands(test.shape[-1], rgb_bands)
  table = (f"All {test.shape[-1]} bands:\n\n" + scdm_eval.markdown_table(
      res["results"], sample_seconds) + f"\nThe {len(gen)} bands that are not inputs "
           f"(without RGB bands {rgb_bands}):\n\n" + scdm_eval.markdown_table(
               res["results_generated_bands"], sample_seconds))
  casc = models["cascade"]
  out = {**res, "seconds": seconds, "training": training,
         "setup": {"data": cfg.data.path, "train_shape": list(train.shape),
                   "test_shape": list(test.shape), "test_quadrant": int(cfg.data.test_quadrant),
                   "rgb_bands": rgb_bands, "band_sets": [list(b) for b in casc.band_sets],
                   "normaliser": [casc.norm_mean, casc.norm_std], "stages_best": best,
                   "devices": jax.device_count()},
         "budget": {"train_steps_per_model": int(cfg.train.steps), "models": 3,
                    **scdm_config.sample_settings(cfg), "batch": int(cfg.train.batch),
                    "crop": int(cfg.train.crop)},
         "conventions": metrics.CONVENTIONS, "config": common.config_to_dict(cfg)}
  common.write_json(workdir / "metrics.json", out)
  common.save_npz(workdir / "samples.npz", reference=test, rgb=test[..., rgb_bands],
                  **{n.replace(" ", "_").replace("/", "_").replace("+", "plus"): x
                     for n, x in outputs.items()})
  common.write_text(workdir / "results.md", table)
  bands = sorted(rgb_bands, reverse=True)
  common.save_figure(plots.fusion_figure(test, outputs, bands=bands, scores=res["results"],
                                         title="SCDM evaluation (held-out quadrant)"),
                     workdir / "evaluate.png")
  common.save_figure(plots.band_psnr_figure(test, outputs, scores=res["results"]),
                     workdir / "band_psnr.png")
  common.log("\n" + table + f"\ntotal {seconds['total']:.0f} s (training "
             f"{seconds['training']:.0f} s, sampling {seconds['sampling']:.0f} s)")
  return out


if __name__ == "__main__":
  runner.run_main(run, "configs/scdm.py:tiny", "workdirs/scdm_eval", "SCDM config")
