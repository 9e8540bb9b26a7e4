"""hsijax: spectral diffusion for hyperspectral imaging in JAX.

    import hsijax
    prior = hsijax.sdp.train_prior(pixels, steps=3000, key=0)
    fused = hsijax.sdp.fuse(y, z, prior=prior, key=1, steps=100)
    print(hsijax.metrics.psnr(x_true, fused.x))

Packages (imported on first use, so `import hsijax` stays cheap and never imports torch):
  sdp        fusion with a spectral diffusion prior: train_prior, load_prior, fuse, ...
  scdm       RGB -> hyperspectral by a spectral cascade: make_cascade, train, load, sample
  metrics    PSNR, SAM, RMSE, ERGAS, UIQI, SSIM, D_lambda, D_s, QNR, spectral FID
  degrade    PSF, strided blur-and-downsample, SRF, noise, Wald's simulation protocol
  data       cube readers (.npz, .mat v5 / v7.3, GeoTIFF, ENVI)
  windowed   images read by windows (open_image): scenes larger than memory
  policy     the platform policy (Policy.for_backend) and matmul precision names
  datasets   TFDS builders (no TensorFlow) and grain batches
  diffusion  noise schedules, forward process, DDPM / DDIM steps, respacing
and the shared parts: classical, linear_baseline, synthetic, plots, sharding, checkpoint,
trainloop, tiling, progress, fileio, settings, kernels, workdir.
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = ("sdp", "scdm", "metrics", "degrade", "data", "datasets", "diffusion", "classical",
               "linear_baseline", "synthetic", "plots", "sharding", "checkpoint", "trainloop",
               "tiling", "progress", "fileio", "settings", "policy", "kernels", "workdir",
               "windowed")
__all__ = list(_SUBMODULES)


def __getattr__(name):
  if name in _SUBMODULES:
    module = importlib.import_module(f"hsijax.{name}")
    globals()[name] = module
    return module
  raise AttributeError(f"module 'hsijax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_SUBMODULES))
