"""SDP: hyperspectral fusion with a spectral diffusion prior.

Verbs (plain arrays in, small frozen dataclasses out):
  train_prior(pixels, *, steps, key, **settings) -> Prior      prior.py
  load_prior(workdir) -> Prior                                 prior.py
  low_rank_pixels(pixels, rank) -> pixels                      prior.py (LR-HSI pixels denoised
                                                               for training)
  subspace_snr_db(pixels) -> dB                                prior.py
  fuse(y, z, *, prior=None, key, ...) -> Fusion                fusion.py (prior=None: Baseline;
                                                               fuse(..., **WARM_START) for the
                                                               warm-started solver)
  check_pair, scale_pair, fill_invalid, finish_output          inputs.py
  run_methods / evaluate_cube                                  evaluate.py (SDP vs Baseline vs
                                                               classical; the Wald protocol)
Building blocks:
  SpectralDenoiser, fold_time_condition, apply_with_input_grad denoiser.py
  make_solver, make_batched_solver, fusion_loss, fusion_grad   solver.py (Algorithm 1)
  make_tiled_solver, fuse_tiled                                tiled.py (windows of large scenes)
  estimate_psf_srf, footprint_centre                           blind.py
  make_train_step, make_optimizer, init_train_state, fit,      train.py
  sample_spectra, evaluate_fid
"""
from hsijax.sdp.blind import (blind_objective, estimate_psf_srf, footprint_centre, project_psf,
                              project_srf)
from hsijax.sdp.denoiser import (SpectralDenoiser, apply_with_input_grad, count_params,
                                 fold_time_condition, time_condition)
from hsijax.sdp.evaluate import (METHODS, Evaluation, MethodResults, evaluate_cube,
                                 no_reference_table, reference_table, run_methods)
from hsijax.sdp.fusion import (WARM_START, Fusion, FusionSettings, apply_msi_calibration,
                               estimate_calibrated, estimate_operators, fuse, plan_windows)
from hsijax.sdp.inputs import (check_pair, fill_invalid, finish_output, fused_valid,
                               infer_ratio, scale_pair)
from hsijax.sdp.prior import (Prior, load_prior, low_rank_pixels, subspace_snr_db,
                              train_prior)
from hsijax.sdp.solver import (fusion_grad, fusion_loss, initial_x, make_batched_solver,
                               make_solver, respaced_lr_scale)
from hsijax.sdp.tiled import fuse_tiled, make_tiled_solver
from hsijax.sdp.train import (PriorSettings, TrainState, diffusion_loss, evaluate_fid, fit,
                              init_train_state, make_optimizer, make_train_step,
                              sample_spectra)

__all__ = [
    # verbs and their values
    "train_prior", "load_prior", "Prior", "PriorSettings", "low_rank_pixels", "subspace_snr_db",
    "fuse", "Fusion", "FusionSettings", "WARM_START", "scale_pair", "check_pair", "infer_ratio",
    "fill_invalid", "fused_valid", "finish_output", "plan_windows",
    "run_methods", "MethodResults", "evaluate_cube", "Evaluation", "METHODS",
    "reference_table", "no_reference_table", "estimate_operators", "estimate_calibrated",
    "apply_msi_calibration",
    # building blocks
    "SpectralDenoiser", "count_params", "time_condition", "fold_time_condition",
    "apply_with_input_grad",
    "make_solver", "make_batched_solver", "fusion_loss", "fusion_grad", "initial_x",
    "respaced_lr_scale", "make_tiled_solver", "fuse_tiled",
    "estimate_psf_srf", "footprint_centre", "blind_objective", "project_psf", "project_srf",
    "TrainState", "make_optimizer", "init_train_state", "make_train_step", "fit",
    "diffusion_loss", "sample_spectra", "evaluate_fid",
]
