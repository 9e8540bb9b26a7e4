"""SCDM: spectral-cascaded diffusion for RGB -> hyperspectral.

Verbs:
  make_cascade(num_bands, *, rgb_bands, ...) -> Cascade       cascade.py (bands per stage,
                                                              normaliser, U-Net sizes; JSON)
  train(cascade, cube, *, steps, key, workdir, **settings)    pipeline.py (all or some stages)
  load(workdir) -> Cascade                                    pipeline.py (EMA weights only)
  sample(cascade, rgb, *, key, **settings) -> (H, W, N)       pipeline.py (tiled, sharded)
Building blocks:
  CondUNet, init_params                                       unet.py
  make_sampler, make_cascade_sampler, icmg, pdt_clamp_*       sampler.py (ICMG / PDT scans)
  make_train_step, scdm_loss, fit, random_crops               training.py
  stage_band_indices, Normaliser, rgb_from_hsi                cascade.py
  plan, fit, training_pairs, make_sampler (residual cascade)  residual.py (affine estimates
                                                              a residual cascade's U-Nets
                                                              add to; make_cascade(...,
                                                              residual=True))

Parameters (`params`) are always the model's "params" collection, as held by
TrainState.params / TrainState.ema_params; `model.apply({"params": params}, ...)`.
"""
from hsijax.scdm.cascade import (HOUSTON_RGB_BANDS, PAPER_STAGE_COUNTS, PAVIA_RGB_BANDS,
                                 Cascade, Normaliser, UNetSettings, condition_channels,
                                 make_cascade, rgb_from_hsi, stage_band_indices,
                                 stage_condition, stage_counts)
from hsijax.scdm.pipeline import (SampleSettings, StageTrainSettings, load, sample, train,
                                  train_stage)
from hsijax.scdm.sampler import (SamplerSettings, icmg, make_cascade_sampler, make_sampler,
                                 pdt_clamp_eps, pdt_clamp_x, pdt_percentile, sampler_step)
from hsijax.scdm.training import (TrainState, device_crops, fit, init_train_state,
                                  make_optimizer, make_train_step, random_crops, scdm_loss)
from hsijax.scdm.unet import CondUNet, count_params, init_params

__all__ = [
    # verbs and their values
    "make_cascade", "Cascade", "UNetSettings", "train", "train_stage", "load", "sample",
    "StageTrainSettings", "SampleSettings",
    # building blocks
    "CondUNet", "init_params", "count_params",
    "make_sampler", "make_cascade_sampler", "sampler_step", "SamplerSettings", "icmg",
    "pdt_clamp_eps", "pdt_clamp_x", "pdt_percentile",
    "TrainState", "make_train_step", "make_optimizer", "init_train_state", "scdm_loss",
    "fit", "random_crops", "device_crops",
    "stage_band_indices", "stage_counts", "stage_condition", "condition_channels",
    "rgb_from_hsi", "Normaliser", "HOUSTON_RGB_BANDS", "PAVIA_RGB_BANDS",
    "PAPER_STAGE_COUNTS",
]
