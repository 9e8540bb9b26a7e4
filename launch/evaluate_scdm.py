"""SCDM acceptance experiment: linear vs plain and residual cascades of 1 and 2 stages.

    python -m launch.evaluate_scdm --config=configs/scdm.py:tiny --workdir=workdirs/scdm_eval
    # only the residual rows (and linear): --config.eval_models=residual

On a cube (default ../shared/data/cubes/houston2018_crop.npz) the RGB condition is the HSI
bands `data.rgb_bands`. The cube is split into four quadrants; three train, the fourth
(`data.test_quadrant`, default bottom-right) is sampled from its RGB bands and scored against
the true bands (hsijax.scdm.evaluate). Models (trained once, resumable), per family of
--config.eval_models: "plain" (model.residual off: the paper's cascade at this config's
sizes) DIR/one_stage/ and DIR/cascade/; "residual" (model.residual on, hsijax.scdm.residual)
DIR/residual_one_stage/ and DIR/residual_cascade/ (with the tiny preset: the preset itself).

Rows (same trained weights for the rows that share a model): linear (per-pixel affine least
squares); plain: 1 stage, 2 stages, 2 stages + PDT(x)/ICMG (the paper's best setting, PDT on
x_t as in the authors' code); residual: affine estimates only (the residual cascade with no
network: the linear map to stage 1's bands, then the affine map to all bands), 1 stage,
2 stages, 2 stages + PDT(x)/ICMG. Scores on all bands (per-band PSNR capped at 100 dB:
residual cascades return the input bands exactly) and on the bands that are not inputs.

Writes DIR/metrics.json {"results", "results_generated_bands" (without the RGB bands),
"seconds", "training", "setup", "budget", "conventions"}, DIR/results.md, DIR/samples.npz,
DIR/evaluate.png and DIR/band_psnr.png.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any

import jax
import numpy as np

from configs import common as config_common
from configs import scdm as scdm_config
from hsijax import metrics, plots, scdm, sharding
from hsijax.scdm import evaluate as scdm_eval
from launch import common, runner, scdm_data


def _family(cfg, residual: bool):
  """A copy of the config with model.residual set (the plain rows: off, no estimate-only)."""
  c = copy.deepcopy(cfg)
  with c.unlocked():
    c.model.residual = bool(residual)
    if not residual:
      c.model.estimate_only = ()
    elif not cfg.model.residual:  # a paper preset: stage 2 as the affine estimate too
      c.model.estimate_only = (1,)
  return c


def run(cfg, workdir) -> dict[str, Any]:
  scdm_config.validate(cfg)
  workdir = common.setup(workdir)
  t_start = time.perf_counter()
  if len(cfg.stages) != 2:
    raise ValueError("evaluate_scdm compares 1 and 2 stages and takes the PDT/ICMG settings "
                     "from a 2-stage config; drop the ',stages=K' modifier")
  families = [f.strip() for f in str(cfg.eval_models).split(",") if f.strip()]
  if not families or any(f not in ("plain", "residual") for f in families):
    raise ValueError(f"--config.eval_models={cfg.eval_models!r} must list 'plain' and / or "
                     "'residual' (comma-separated)")
  cube = scdm_data.load_cube(cfg)
  train, test = scdm_eval.split_cube(cube, "quadrant", int(cfg.data.test_quadrant))
  rgb_bands = list(cfg.data.rgb_bands)
  mesh, policy = sharding.make_mesh(cfg.mesh), config_common.policy(cfg)
  common.log(f"SCDM evaluation on {cfg.data.path}: train {train.shape}, test "
             f"{scdm_eval.QUADRANT_NAMES[cfg.data.test_quadrant]} quadrant {test.shape}, "
             f"{cfg.train.steps} steps per model, {cfg.sample.method} "
             f"{cfg.sample.num_steps} sampling steps, models {families}")
  models, training = {}, {}
  t0 = time.perf_counter()
  for family in families:
    fcfg = _family(cfg, family == "residual")
    prefix = "residual_" if family == "residual" else ""
    for name, num_stages in ((prefix + "one_stage", 1), (prefix + "cascade", 2)):
      models[name] = scdm.train(scdm_config.make_cascade(fcfg, train, num_stages), train,
                                steps=int(cfg.train.steps), key=int(cfg.seed),
                                workdir=workdir / name, mesh=mesh, policy=policy,
                                **scdm_config.train_settings(fcfg))
      for k, entry in models[name].info.items():
        training[f"{name}/{k}"] = {**{n: v for n, v in entry.items() if n != "history"},
                                   "loss_curve": entry["history"]}
  train_seconds = time.perf_counter() - t0
  plain = [{"guidance_scale": 0.0, "pdt_target": "none", "pdt_p_T": 1.0}]
  paper = scdm_config.paper_stages(2, "x")  # the paper's best, PDT on x_t (authors' code)
  variants = []
  if "plain" in families:
    variants += [("1 stage", models["one_stage"], plain),
                 ("2 stages", models["cascade"], plain * 2),
                 ("2 stages + PDT(x)/ICMG", models["cascade"], paper)]
  if "residual" in families:
    casc = models["residual_cascade"]
    affine = dataclasses.replace(casc, estimate_only=tuple(range(casc.num_stages)),
                                 params=(None,) * casc.num_stages)
    variants += [("residual: affine estimates only", affine, plain * 2),
                 ("residual 1 stage", models["residual_one_stage"], plain),
                 ("residual 2 stages", casc, plain * 2),
                 ("residual 2 stages + PDT(x)/ICMG", casc, paper)]
  key = jax.random.fold_in(jax.random.key(int(cfg.seed)), 1_000_003)
  res = scdm_eval.compare(test, train, rgb_bands, variants, key=key, mesh=mesh,
                          policy=policy, **scdm_config.sample_settings(cfg))
  outputs, sample_seconds = res.pop("outputs"), res["sampling_seconds"]
  seconds = {"training": train_seconds, "sampling": float(sum(sample_seconds.values())),
             "total": time.perf_counter() - t_start}
  gen = scdm_eval.generated_bands(test.shape[-1], rgb_bands)
  table = (f"All {test.shape[-1]} bands (per-band PSNR capped at {scdm_eval.PSNR_CAP_DB:g} dB, "
           "hsijax.scdm.evaluate.capped_mpsnr):\n\n" + scdm_eval.markdown_table(
      res["results"], sample_seconds) + f"\nThe {len(gen)} bands that are not inputs "
           f"(without RGB bands {rgb_bands}):\n\n" + scdm_eval.markdown_table(
               res["results_generated_bands"], sample_seconds))
  casc = models["residual_cascade" if "residual" in families else "cascade"]
  out = {**res, "seconds": seconds, "training": training,
         "setup": {"data": cfg.data.path, "train_shape": list(train.shape),
                   "test_shape": list(test.shape), "test_quadrant": int(cfg.data.test_quadrant),
                   "rgb_bands": rgb_bands, "band_sets": [list(b) for b in casc.band_sets],
                   "normaliser": [casc.norm_mean, casc.norm_std], "stages_paper": paper,
                   "devices": jax.device_count()},
         "budget": {"train_steps_per_model": int(cfg.train.steps),
                    "networks": sum(len(m.network_stages) for m in models.values()),
                    **scdm_config.sample_settings(cfg), "batch": int(cfg.train.batch),
                    "crop": int(cfg.train.crop)},
         "conventions": metrics.CONVENTIONS, "config": common.config_to_dict(cfg) | {
             "stages": scdm_config.split_stage_list(cfg)}}
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
