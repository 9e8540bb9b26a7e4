"""Test oracle: an independent NumPy twin of `hsijax.metrics` (float64, host arrays).

Same functions, names, signatures and conventions as `hsijax.metrics`; see that module's docstring
for the definitions and the edge-case conventions. This twin is written independently (integral
images instead of `reduce_window`, `arccos` instead of the half-angle form, `scipy.linalg.sqrtm`
instead of an eigen-decomposition) so the tests can cross-check the two. It is not part of the
library: every published number is scored by `hsijax.metrics`.

Images are `(H, W, B)`, spectra sets `(N, B)`. Scalars are returned as `float`.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
from numpy.lib.stride_tricks import sliding_window_view

UIQI_WINDOW = 32
SSIM_SIZE = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


# ----------------------------------------------------------------------------------- helpers


def _image(a, name: str) -> np.ndarray:
  a = np.asarray(a, dtype=np.float64)
  if a.ndim != 3:
    raise ValueError(
        f"{name} must be an (H, W, B) image, got shape {a.shape}; "
        "add a band axis (a[..., None]) for a single-band image")
  return a


def _pair(x_ref, x) -> tuple[np.ndarray, np.ndarray]:
  x_ref, x = _image(x_ref, "x_ref"), _image(x, "x")
  if x_ref.shape != x.shape:
    raise ValueError(
        f"x_ref shape {x_ref.shape} != x shape {x.shape}; pass the estimate at the "
        "reference's size and band count")
  return x_ref, x


def _q_from_moments(mx, my, vx, vy, cxy):
  """Wang-Bovik Q = luminance * (correlation * contrast), each factor 1 where it is 0/0."""
  den_l = mx * mx + my * my
  lum = np.where(den_l > 0, 2 * mx * my / np.where(den_l > 0, den_l, 1.0), 1.0)
  den_c = vx + vy
  cs = np.where(den_c > 0, 2 * cxy / np.where(den_c > 0, den_c, 1.0), 1.0)
  return lum * np.clip(cs, -1.0, 1.0)


def _box_mean(a: np.ndarray, wh: int, ww: int) -> np.ndarray:
  """'valid' wh x ww box mean of (H, W, B) via an integral image -> (H-wh+1, W-ww+1, B)."""
  h, w, b = a.shape
  c = np.zeros((h + 1, w + 1, b))
  c[1:, 1:] = a.cumsum(0).cumsum(1)
  s = c[wh:, ww:] - c[:-wh, ww:] - c[wh:, :-ww] + c[:-wh, :-ww]
  return s / (wh * ww)


def _box_constant(a: np.ndarray, wh: int, ww: int) -> np.ndarray:
  """True where the 'valid' wh x ww window of (H, W, B) holds a single value."""
  mx = sliding_window_view(sliding_window_view(a, wh, axis=0).max(-1), ww, axis=1).max(-1)
  mn = sliding_window_view(sliding_window_view(a, wh, axis=0).min(-1), ww, axis=1).min(-1)
  return mx == mn


def _gauss1d(size: int, sigma: float) -> np.ndarray:
  k = np.arange(size) - (size - 1) / 2
  g = np.exp(-k * k / (2 * sigma * sigma))
  return g / g.sum()


def _gauss_filter(a: np.ndarray, gh: np.ndarray, gw: np.ndarray) -> np.ndarray:
  """'valid' separable correlation of (H, W, B) with gh (rows) and gw (columns)."""
  a = sliding_window_view(a, gh.size, axis=0) @ gh
  return sliding_window_view(a, gw.size, axis=1) @ gw


def _pairwise_q(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Global Q between every column of a (N, P) and every column of b (N, R) -> (P, R)."""
  ma, mb = a.mean(0), b.mean(0)
  ca, cb = a - ma, b - mb
  ca[:, a.max(0) == a.min(0)] = 0.0  # constant band: exact zero variance / covariance
  cb[:, b.max(0) == b.min(0)] = 0.0
  va, vb = (ca * ca).mean(0), (cb * cb).mean(0)
  cov = ca.T @ cb / a.shape[0]
  return _q_from_moments(ma[:, None], mb[None, :], va[:, None], vb[None, :], cov)


# ----------------------------------------------------------------------------- full reference


def psnr_per_band(x_ref, x) -> np.ndarray:
  """Per-band PSNR in dB, peak = max of the reference band -> (B,). MSE 0 gives +inf."""
  x_ref, x = _pair(x_ref, x)
  mse = ((x_ref - x) ** 2).mean((0, 1))
  peak2 = x_ref.max((0, 1)) ** 2
  with np.errstate(divide="ignore"):
    return np.where(mse > 0, 10 * np.log10(peak2 / np.where(mse > 0, mse, 1.0)), np.inf)


def psnr(x_ref, x) -> float:
  """Mean over bands of `psnr_per_band` (MPSNR), in dB."""
  return float(psnr_per_band(x_ref, x).mean())


def sam(x_ref, x, degrees: bool = True) -> float:
  """Mean spectral angle over pixels; a pixel where either spectrum has norm 0 counts as 0."""
  x_ref, x = _pair(x_ref, x)
  dot = (x_ref * x).sum(-1)
  nn = np.linalg.norm(x_ref, axis=-1) * np.linalg.norm(x, axis=-1)
  cos = np.where(nn > 0, dot / np.where(nn > 0, nn, 1.0), 1.0)
  angle = np.arccos(np.clip(cos, -1.0, 1.0)).mean()
  return float(np.degrees(angle) if degrees else angle)


def rmse(x_ref, x) -> float:
  """Root mean squared error over all pixels and bands."""
  x_ref, x = _pair(x_ref, x)
  return float(np.sqrt(((x_ref - x) ** 2).mean()))


def ergas(x_ref, x, ratio: float) -> float:
  """(100 / ratio) * sqrt(mean_b(RMSE_b^2 / mean_b^2)), mean_b = mean of the reference band."""
  if not ratio > 0:
    raise ValueError(f"ratio must be > 0 (the HR/LR pixel-size ratio, e.g. 4), got {ratio}")
  x_ref, x = _pair(x_ref, x)
  mse = ((x_ref - x) ** 2).mean((0, 1))
  mean2 = x_ref.mean((0, 1)) ** 2
  with np.errstate(divide="ignore"):
    term = np.where(mse > 0, mse / mean2, 0.0)
  return float(100.0 / ratio * np.sqrt(term.mean()))


def uiqi(x_ref, x, window: int = UIQI_WINDOW) -> float:
  """Wang-Bovik Q on window x window sliding windows (stride 1, 'valid'), mean over windows and
  bands. A side shorter than `window` uses the whole side."""
  if window < 1:
    raise ValueError(f"window must be a positive int (32 is standard), got {window}")
  x_ref, x = _pair(x_ref, x)
  wh, ww = min(window, x_ref.shape[0]), min(window, x_ref.shape[1])
  sa, sb = x_ref.mean((0, 1)), x.mean((0, 1))  # covariances are invariant to separate shifts
  a, b = x_ref - sa, x - sb
  ma, mb = _box_mean(a, wh, ww), _box_mean(b, wh, ww)
  const_a, const_b = _box_constant(x_ref, wh, ww), _box_constant(x, wh, ww)
  va = np.where(const_a, 0.0, np.maximum(_box_mean(a * a, wh, ww) - ma * ma, 0.0))
  vb = np.where(const_b, 0.0, np.maximum(_box_mean(b * b, wh, ww) - mb * mb, 0.0))
  cov = np.where(const_a | const_b, 0.0, _box_mean(a * b, wh, ww) - ma * mb)
  q = _q_from_moments(ma + sa, mb + sb, va, vb, cov)
  return float(q.mean())


def ssim(x_ref, x, data_range=None) -> float:
  """Mean over bands of the mean SSIM map (Gaussian 11 x 11, sigma 1.5, 'valid')."""
  x_ref, x = _pair(x_ref, x)
  h, w, _ = x_ref.shape
  gh = _gauss1d(min(SSIM_SIZE, h), SSIM_SIGMA)
  gw = _gauss1d(min(SSIM_SIZE, w), SSIM_SIGMA)
  if data_range is None:
    rng = x_ref.max((0, 1)) - x_ref.min((0, 1))
    data_range = np.where(rng > 0, rng, 1.0)
  data_range = np.asarray(data_range, np.float64)
  c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
  sa, sb = x_ref.mean((0, 1)), x.mean((0, 1))  # covariances are invariant to separate shifts
  a, b = x_ref - sa, x - sb
  ma, mb = _gauss_filter(a, gh, gw), _gauss_filter(b, gh, gw)
  va = np.maximum(_gauss_filter(a * a, gh, gw) - ma * ma, 0.0)
  vb = np.maximum(_gauss_filter(b * b, gh, gw) - mb * mb, 0.0)
  cov = _gauss_filter(a * b, gh, gw) - ma * mb
  ma, mb = ma + sa, mb + sb
  s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
  return float(s.mean((0, 1)).mean())


def all_metrics(x_ref, x, ratio: float) -> dict[str, float]:
  """{psnr, sam (degrees), rmse, ergas, uiqi, ssim} as floats (what the CLIs write to JSON)."""
  return {
      "psnr": psnr(x_ref, x),
      "sam": sam(x_ref, x),
      "rmse": rmse(x_ref, x),
      "ergas": ergas(x_ref, x, ratio),
      "uiqi": uiqi(x_ref, x),
      "ssim": ssim(x_ref, x),
  }


# ------------------------------------------------------------------------------ no reference


QNR_BLOCK = 32


def _block_q(a: np.ndarray, b: np.ndarray, side: int | None) -> np.ndarray:
  """Mean of the per-block global Q over non-overlapping side x side blocks (loops over the
  blocks; an independent twin of the JAX reshape), (H, W, P) x (H, W, R) -> (P, R)."""
  if side is None:
    return _pairwise_q(a.reshape(-1, a.shape[2]), b.reshape(-1, b.shape[2]))
  qs = []
  for i in range(0, a.shape[0] - side + 1, side):
    for j in range(0, a.shape[1] - side + 1, side):
      qs.append(_pairwise_q(a[i:i + side, j:j + side].reshape(-1, a.shape[2]),
                            b[i:i + side, j:j + side].reshape(-1, b.shape[2])))
  return np.mean(qs, axis=0)


def _sides(h_lr: int, w_lr: int, block: int | None, ratio: int):
  """(HR block side, LR block side); (None, None) for the global Q."""
  if block is None:
    return None, None
  if int(block) != block or block < 1:
    raise ValueError(f"block must be a positive int or None, got {block}")
  lr = max(1, min(int(block) // ratio, h_lr, w_lr))
  return lr * ratio, lr


def d_lambda(x_fused, y_lr, block: int | None = QNR_BLOCK) -> float:
  """Spectral distortion: mean over band pairs l != r of |Q(F_l, F_r) - Q(Y_l, Y_r)|, Q
  averaged over `block` (HR) / block / ratio (LR) blocks, or global with block=None."""
  f, y = _image(x_fused, "x_fused"), _image(y_lr, "y_lr")
  if f.shape[2] != y.shape[2] or f.shape[2] < 2:
    raise ValueError(
        f"x_fused {f.shape} and y_lr {y.shape} need the same band count, at least 2; pass the "
        "fused HSI and the LR-HSI it was made from")
  bands = f.shape[2]
  r = f.shape[0] // y.shape[0]
  if block is not None and (r < 1 or f.shape[:2] != (y.shape[0] * r, y.shape[1] * r)):
    raise ValueError(f"x_fused {f.shape[:2]} must be y_lr {y.shape[:2]} times an integer "
                     "ratio for block-averaged Q; crop it (or pass block=None)")
  hr, lr = _sides(y.shape[0], y.shape[1], block, r)
  qf = _block_q(f, f, hr)
  qy = _block_q(y, y, lr)
  off = ~np.eye(bands, dtype=bool)
  return float(np.abs(qf - qy)[off].mean())


def _check_ds(f, z, y, ratio):
  h, w, bands = f.shape
  if int(ratio) != ratio or ratio < 1 or h % ratio or w % ratio:
    raise ValueError(
        f"ratio {ratio} must be a positive int dividing the HR size {h} x {w}; crop the images "
        "to a multiple of the ratio")
  if z.shape[:2] != (h, w):
    raise ValueError(f"z_msi {z.shape} must have the fused image's size {h} x {w}")
  if y.shape != (h // ratio, w // ratio, bands):
    raise ValueError(
        f"y_lr {y.shape} must be {(h // ratio, w // ratio, bands)} (fused size / ratio, same "
        "bands); check the ratio")


def d_s(x_fused, z_msi, y_lr, ratio: int, block: int | None = QNR_BLOCK) -> float:
  """Spatial distortion: mean over HSI bands l, MSI bands k of |Q(F_l, Z_k) - Q(Y_l, Zlr_k)|,
  Zlr = Z block-averaged by `ratio`; Q block-averaged as in `d_lambda`."""
  f, z, y = _image(x_fused, "x_fused"), _image(z_msi, "z_msi"), _image(y_lr, "y_lr")
  _check_ds(f, z, y, ratio)
  ratio = int(ratio)
  h, w, nb = z.shape
  z_lr = z.reshape(h // ratio, ratio, w // ratio, ratio, nb).mean((1, 3))
  hr, lr = _sides(h // ratio, w // ratio, block, ratio)
  qh = _block_q(f, z, hr)
  ql = _block_q(y, z_lr, lr)
  return float(np.abs(qh - ql).mean())


def qnr(x_fused, z_msi, y_lr, ratio: int, block: int | None = QNR_BLOCK) -> float:
  """QNR = (1 - D_lambda) * (1 - D_s) (alpha = beta = 1)."""
  return (1.0 - d_lambda(x_fused, y_lr, block)) * \
      (1.0 - d_s(x_fused, z_msi, y_lr, ratio, block))


def no_reference_metrics(x_fused, z_msi, y_lr, ratio: int,
                         block: int | None = QNR_BLOCK) -> dict[str, float]:
  """{d_lambda, d_s, qnr} as floats."""
  dl, ds = d_lambda(x_fused, y_lr, block), d_s(x_fused, z_msi, y_lr, ratio, block)
  return {"d_lambda": dl, "d_s": ds, "qnr": (1.0 - dl) * (1.0 - ds)}


# ------------------------------------------------------------------------------ spectral FID


def _spectra(a, name: str) -> np.ndarray:
  a = np.asarray(a, np.float64)
  if a.ndim != 2 or a.shape[0] < 2:
    raise ValueError(
        f"{name} must be (N, B) spectra with N >= 2, got shape {a.shape}; reshape an image with "
        "x.reshape(-1, x.shape[-1])")
  return a


def spectral_fid(real, generated) -> float:
  """Frechet distance between Gaussians fitted (unbiased covariance) to real (N, B) and
  generated (M, B) spectra."""
  r, g = _spectra(real, "real"), _spectra(generated, "generated")
  if r.shape[1] != g.shape[1]:
    raise ValueError(f"real {r.shape} and generated {g.shape} need the same band count")
  mu1, mu2 = r.mean(0), g.mean(0)
  s1 = np.atleast_2d(np.cov(r, rowvar=False))
  s2 = np.atleast_2d(np.cov(g, rowvar=False))
  covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
  if not np.all(np.isfinite(covmean)):  # singular product: regularise slightly, as usual
    eps = 1e-6 * np.eye(s1.shape[0])
    covmean = np.real(scipy.linalg.sqrtm((s1 + eps) @ (s2 + eps)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
