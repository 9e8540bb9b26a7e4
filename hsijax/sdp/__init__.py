"""SDP: hyperspectral fusion with a spectral diffusion prior (SPEC section 3).

  denoiser  SpectralDenoiser (per-pixel eps_theta), count_params
  train     TrainState, make_optimizer, init_train_state, make_train_step, fit,
            sample_spectra, evaluate_fid
  solver    make_solver (Algorithm 1 as one jitted program), fusion_loss / fusion_grad,
            respaced_lr_scale
  tiled     make_tiled_solver / fuse_tiled (large scenes: windows, sharded, blended)
  blind     estimate_psf_srf (blind PSF / SRF estimation)
"""
from hsijax.sdp.blind import blind_objective, estimate_psf_srf, project_psf, project_srf
from hsijax.sdp.denoiser import (SpectralDenoiser, apply_with_input_grad, count_params,
                                 fold_time_condition, time_condition)
from hsijax.sdp.solver import (fusion_grad, fusion_loss, initial_x, make_batched_solver,
                               make_solver, position_noise, respaced_lr_scale)
from hsijax.sdp.tiled import check_tiling, fuse_tiled, make_tiled_solver
from hsijax.sdp.train import (TrainState, diffusion_loss, evaluate_fid, fit, init_train_state,
                              lr_factor, make_optimizer, make_train_step, model_from_config,
                              sample_spectra, schedule_from_config)

__all__ = [
    "SpectralDenoiser", "count_params", "time_condition", "fold_time_condition",
    "apply_with_input_grad",
    "TrainState", "make_optimizer", "init_train_state", "make_train_step", "fit",
    "sample_spectra", "evaluate_fid", "diffusion_loss", "lr_factor", "model_from_config",
    "schedule_from_config",
    "make_solver", "make_batched_solver", "fusion_loss", "fusion_grad", "initial_x",
    "respaced_lr_scale", "position_noise",
    "make_tiled_solver", "fuse_tiled", "check_tiling",
    "estimate_psf_srf", "blind_objective", "project_psf", "project_srf",
]
