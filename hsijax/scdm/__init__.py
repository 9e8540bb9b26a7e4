"""SCDM: spectral-cascaded diffusion for RGB -> hyperspectral (SPEC section 4).

  unet     CondUNet (DDPM U-Net whose condition branch shares the encoder), init_params
  cascade  band split per stage, RGB bands, stage conditions, normalisation
  sampler  DDPM / DDIM scans with ICMG and PDT, whole-cascade sampling in one jit
  train    loss, condition dropout, EMA, train step, random crops, fit

Parameters (`params`) are always the model's "params" collection, as held by
TrainState.params / TrainState.ema_params; `model.apply({"params": params}, ...)`.
"""
from hsijax.scdm.cascade import (HOUSTON_RGB_BANDS, NORMALISERS, PAPER_STAGE_COUNTS,
                                 PAVIA_RGB_BANDS, Normaliser,
                                 condition_channels, equally_spaced, first_stage_count,
                                 rgb_from_hsi, stage_band_indices, stage_condition,
                                 stage_counts)
from hsijax.scdm.sampler import (SAMPLERS, SamplerSettings, as_settings, cascade_num_steps,
                                 guided_eps, icmg, make_cascade_sampler, make_sampler,
                                 order_statistics, pdt_clamp_eps, pdt_clamp_x,
                                 pdt_percentile, per_sample_quantile, sampler_step)
from hsijax.scdm.train import (TrainState, compute_loss, cosine_similarity, drop_condition,
                               ema_update, fit, init_train_state, loss_terms, make_optimizer,
                               make_train_step, random_crops, scdm_loss)
from hsijax.scdm.unet import CondUNet, count_params, group_count, init_params
