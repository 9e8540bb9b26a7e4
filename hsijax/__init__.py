"""hsijax: spectral diffusion for hyperspectral imaging in JAX.

Modules (each a set of pure functions over arrays and pytrees):
  diffusion   noise schedules, forward process, DDPM / DDIM steps, respacing
  degrade     PSF, strided blur-and-downsample, SRF, noise, Wald protocol
  metrics     PSNR, SAM, RMSE, ERGAS, UIQI, SSIM, D_lambda, D_s, QNR, FID
  data        cube loaders (.npz, .mat v5 / v7.3, GeoTIFF, ENVI)
  sharding    meshes and shardings from config
  checkpoint  thin Orbax CheckpointManager wrapper
  sdp         spectral diffusion prior (denoiser, training, fusion solver, blind estimation)
  scdm        spectral-cascaded diffusion (U-Net, cascade, samplers, training)
"""

__version__ = "0.1.0"
