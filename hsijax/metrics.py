"""Image-quality metrics for hyperspectral images, in JAX (jittable, float32).

An independent NumPy (float64) twin with the same names, signatures and conventions lives in
tests/oracles/metrics_np.py; the tests check that the two agree to 1e-5 (relative; 5e-5 for the
spectral FID, whose trace difference cancels digits in float32).

Images are `(H, W, B)` (reference `x_ref`, estimate `x`); spectra sets are `(N, B)`. Every
function returns a 0-d array (use `float(...)`), except `psnr_per_band` `(B,)` and the dict
helpers `all_metrics` / `no_reference_metrics`, which return Python floats. Every function is
wrapped in `jax.jit`; integer arguments that fix shapes (`ratio` of `d_s`/`qnr`, `window`) and
`degrees` are static.

Definitions and conventions
  psnr_per_band  10 log10(peak_b^2 / MSE_b), peak_b = max of reference band b. MSE_b = 0 gives
                 +inf (so `psnr` of identical images is inf); a zero peak with MSE_b > 0 gives -inf.
  psnr           mean over bands of `psnr_per_band` (MPSNR).
  sam            mean over pixels of the angle between the two spectra, degrees by default
                 (`degrees=False`: radians). A pixel where either spectrum has norm 0 has angle 0
                 (no NaN). JAX uses the half-angle form 2 atan2(|u - v|, |u + v|) of unit vectors
                 u, v, which is accurate for small angles in float32 (arccos of a cosine near 1
                 is not) and needs no clipping; the NumPy twin uses arccos(clip(cos, -1, 1)).
  rmse           sqrt(mean over pixels and bands of the squared error).
  ergas          (100 / ratio) sqrt(mean_b(RMSE_b^2 / mean_b^2)), mean_b = mean of reference band
                 b; a band with RMSE_b = 0 contributes 0 (even if mean_b = 0), one with mean_b = 0
                 and RMSE_b > 0 makes the result inf.
  uiqi           Wang-Bovik Q = 4 s_xy m_x m_y / ((s_x^2 + s_y^2)(m_x^2 + m_y^2)) on every
                 `window` x `window` window (stride 1, 'valid'; population moments), averaged over
                 windows, then over bands. A side shorter than `window` uses the whole side (an
                 image smaller than the window is one window). Q is computed as the product
                 L * CS of L = 2 m_x m_y / (m_x^2 + m_y^2) and CS = 2 s_xy / (s_x^2 + s_y^2), and
                 a factor whose denominator is exactly 0 (a 0/0 case) is set to 1:
                   - both windows constant and equal              -> Q = 1
                   - both windows constant, values a != b         -> Q = 2ab / (a^2 + b^2)
                   - one window constant, the other not           -> Q = 0 (CS = 0)
                   - both windows all zero                        -> Q = 1
                 Constant windows are detected exactly (window max == min), and their variance
                 and covariance set to exactly 0, so float rounding cannot fake a structure.
                 Box sums use separable `lax.reduce_window` (no loop over windows); moments are
                 computed from data shifted by each band's own mean (float32 precision).
  ssim           per band, the mean of the SSIM map with an 11 x 11 Gaussian window (sigma 1.5,
                 normalised, 'valid'), K1 = 0.01, K2 = 0.03, C = (K L)^2 with L = `data_range`
                 (scalar or (B,)) or, by default, the reference band's max - min (1 when that is
                 0); then the mean over bands (MSSIM). Sides shorter than 11 shrink the window.
  d_lambda       Alparone et al. 2008 spectral distortion with p = 1: mean over ordered band pairs
                 l != r of |Q(F_l, F_r) - Q(Y_l, Y_r)|, F the fused (H, W, B) image, Y the LR-HSI.
  d_s            spatial distortion with q = 1: mean over HSI bands l and MSI bands k of
                 |Q(F_l, Z_k) - Q(Y_l, Zlr_k)|, Z the HR-MSI (H, W, b) and Zlr = Z averaged over
                 non-overlapping `ratio` x `ratio` blocks (the LR grid of Y).
  qnr            (1 - d_lambda)(1 - d_s) (alpha = beta = 1).
                 For the three no-reference indices Q is averaged over non-overlapping blocks
                 (Alparone et al. 2008; the pansharpening toolbox's S = 32): `block` x `block`
                 pixels on the HR images, `block / ratio` on the LR ones, so the two grids
                 cover the same ground (ratio = HR size / LR size). Per block it is the Q of
                 the block's pixels (same L * CS conventions as `uiqi`), all band pairs at
                 once from one Gram matrix per block. Images are cropped to whole blocks;
                 an LR side shorter than block / ratio shrinks the block to that side.
                 block=None is the global Q of two whole bands (the earlier definition). D = 0
                 exactly when the fused image is the nearest-neighbour upsample of Y (and Z
                 matches), with or without blocks.
  spectral_fid   ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between Gaussians fitted to
                 real (N, B) and generated (M, B) spectra (unbiased covariances, raw spectra as
                 features). JAX: S1 S2 has the same eigenvalues as the symmetric PSD matrix
                 S1^(1/2) S2 S1^(1/2), so Tr (S1 S2)^(1/2) = sum of sqrt of that matrix's
                 eigenvalues (`eigh`, clipped at 0). The NumPy twin uses `scipy.linalg.sqrtm`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

UIQI_WINDOW = 32
QNR_BLOCK = 32  # HR block side of the no-reference Q (Alparone et al. 2008; toolbox S)
SSIM_SIZE = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

# Metrics must not silently run matmuls in bf16 on TPU.
_HI = lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------- helpers


def _as_float(a) -> jax.Array:
  a = jnp.asarray(a)
  return a if jnp.issubdtype(a.dtype, jnp.floating) else a.astype(jnp.float32)


def _image(a, name: str) -> jax.Array:
  a = _as_float(a)
  if a.ndim != 3:
    raise ValueError(
        f"{name} must be an (H, W, B) image, got shape {a.shape}; "
        "add a band axis (a[..., None]) for a single-band image")
  return a


def _pair(x_ref, x) -> tuple[jax.Array, jax.Array]:
  x_ref, x = _image(x_ref, "x_ref"), _image(x, "x")
  if x_ref.shape != x.shape:
    raise ValueError(
        f"x_ref shape {x_ref.shape} != x shape {x.shape}; pass the estimate at the "
        "reference's size and band count")
  dtype = jnp.result_type(x_ref, x)
  return x_ref.astype(dtype), x.astype(dtype)


def _safe_div(num, den, fallback):
  ok = den != 0
  return jnp.where(ok, num / jnp.where(ok, den, 1), fallback)


def _q_from_moments(mx, my, vx, vy, cxy):
  """Wang-Bovik Q = luminance * (correlation * contrast), each factor 1 where it is 0/0."""
  lum = _safe_div(2 * mx * my, mx * mx + my * my, 1.0)
  cs = _safe_div(2 * cxy, vx + vy, 1.0)
  return lum * jnp.clip(cs, -1.0, 1.0)


def _window(a, wh: int, ww: int, op, init):
  """'valid' separable wh x ww window reduction of (H, W, B) -> (H-wh+1, W-ww+1, B)."""
  init = jnp.asarray(init, a.dtype)
  a = lax.reduce_window(a, init, op, (wh, 1, 1), (1, 1, 1), "VALID")
  return lax.reduce_window(a, init, op, (1, ww, 1), (1, 1, 1), "VALID")


def _box_mean(a, wh: int, ww: int):
  return _window(a, wh, ww, lax.add, 0) / (wh * ww)


def _box_constant(a, wh: int, ww: int):
  """True where the window holds a single value (exact: max == min)."""
  return _window(a, wh, ww, lax.max, -jnp.inf) == _window(a, wh, ww, lax.min, jnp.inf)


def _gauss1d(size: int, sigma: float) -> np.ndarray:
  k = np.arange(size) - (size - 1) / 2
  g = np.exp(-k * k / (2 * sigma * sigma))
  return g / g.sum()


def _gauss_filter(a, gh: np.ndarray, gw: np.ndarray):
  """'valid' separable correlation of (H, W, B); a static unroll over the <= 11 taps."""
  h = a.shape[0] - gh.size + 1
  a = sum(float(gh[k]) * a[k:k + h] for k in range(gh.size))
  w = a.shape[1] - gw.size + 1
  return sum(float(gw[k]) * a[:, k:k + w] for k in range(gw.size))


def _pairwise_q(a, b):
  """Global Q between every column of a (N, P) and every column of b (N, R) -> (P, R)."""
  ma, mb = a.mean(0), b.mean(0)
  ca = jnp.where(a.max(0) == a.min(0), 0.0, a - ma)  # constant band: exact zero moments
  cb = jnp.where(b.max(0) == b.min(0), 0.0, b - mb)
  va, vb = (ca * ca).mean(0), (cb * cb).mean(0)
  cov = jnp.einsum("np,nr->pr", ca, cb, precision=_HI) / a.shape[0]
  return _q_from_moments(ma[:, None], mb[None, :], va[:, None], vb[None, :], cov)


# ----------------------------------------------------------------------------- full reference


@jax.jit
def psnr_per_band(x_ref, x) -> jax.Array:
  """Per-band PSNR in dB, peak = max of the reference band: (H, W, B) x2 -> (B,)."""
  x_ref, x = _pair(x_ref, x)
  mse = jnp.mean((x_ref - x) ** 2, axis=(0, 1))
  peak2 = jnp.max(x_ref, axis=(0, 1)) ** 2
  return jnp.where(mse > 0, 10 * jnp.log10(_safe_div(peak2, mse, 1.0)), jnp.inf)


@jax.jit
def psnr(x_ref, x) -> jax.Array:
  """Mean over bands of `psnr_per_band` (MPSNR), in dB."""
  return jnp.mean(psnr_per_band(x_ref, x))


@functools.partial(jax.jit, static_argnames=("degrees",))
def sam(x_ref, x, degrees: bool = True) -> jax.Array:
  """Mean spectral angle over pixels (degrees, or radians); 0 where either norm is 0."""
  x_ref, x = _pair(x_ref, x)
  n1 = jnp.linalg.norm(x_ref, axis=-1, keepdims=True)
  n2 = jnp.linalg.norm(x, axis=-1, keepdims=True)
  u, v = _safe_div(x_ref, n1, 0.0), _safe_div(x, n2, 0.0)
  angle = 2 * jnp.arctan2(jnp.linalg.norm(u - v, axis=-1), jnp.linalg.norm(u + v, axis=-1))
  angle = jnp.where((n1[..., 0] > 0) & (n2[..., 0] > 0), angle, 0.0).mean()
  return jnp.degrees(angle) if degrees else angle


@jax.jit
def rmse(x_ref, x) -> jax.Array:
  """Root mean squared error over all pixels and bands."""
  x_ref, x = _pair(x_ref, x)
  return jnp.sqrt(jnp.mean((x_ref - x) ** 2))


@functools.partial(jax.jit, static_argnames=("ratio",))
def ergas(x_ref, x, ratio: float) -> jax.Array:
  """(100 / ratio) * sqrt(mean_b(RMSE_b^2 / mean_b^2)), mean_b = mean of the reference band."""
  if not ratio > 0:
    raise ValueError(f"ratio must be > 0 (the HR/LR pixel-size ratio, e.g. 4), got {ratio}")
  x_ref, x = _pair(x_ref, x)
  mse = jnp.mean((x_ref - x) ** 2, axis=(0, 1))
  mean2 = jnp.mean(x_ref, axis=(0, 1)) ** 2
  term = jnp.where(mse > 0, _safe_div(mse, mean2, jnp.inf), 0.0)
  return 100.0 / ratio * jnp.sqrt(jnp.mean(term))


@functools.partial(jax.jit, static_argnames=("window",))
def uiqi(x_ref, x, window: int = UIQI_WINDOW) -> jax.Array:
  """Wang-Bovik Q on window x window sliding windows (stride 1, 'valid'), mean over windows,
  then over bands. Conventions for constant windows: see the module docstring."""
  return jnp.mean(_uiqi_map(x_ref, x, window))


def _uiqi_map(x_ref, x, window: int):
  """Q of every window x window window: (H - window + 1, W - window + 1, B)."""
  if window < 1:
    raise ValueError(f"window must be a positive int (32 is standard), got {window}")
  x_ref, x = _pair(x_ref, x)
  wh, ww = min(window, x_ref.shape[0]), min(window, x_ref.shape[1])
  # Moments of data shifted by each band's own mean (covariances are invariant to separate
  # shifts): float32 keeps precision and a constant band becomes (nearly) 0.
  sa, sb = jnp.mean(x_ref, axis=(0, 1)), jnp.mean(x, axis=(0, 1))
  a, b = x_ref - sa, x - sb
  ma, mb = _box_mean(a, wh, ww), _box_mean(b, wh, ww)
  const_a, const_b = _box_constant(x_ref, wh, ww), _box_constant(x, wh, ww)
  va = jnp.where(const_a, 0.0, jnp.maximum(_box_mean(a * a, wh, ww) - ma * ma, 0.0))
  vb = jnp.where(const_b, 0.0, jnp.maximum(_box_mean(b * b, wh, ww) - mb * mb, 0.0))
  cov = jnp.where(const_a | const_b, 0.0, _box_mean(a * b, wh, ww) - ma * mb)
  return _q_from_moments(ma + sa, mb + sb, va, vb, cov)


@jax.jit
def ssim(x_ref, x, data_range=None) -> jax.Array:
  """Mean over bands of the mean SSIM map (Gaussian 11 x 11, sigma 1.5, 'valid')."""
  return jnp.mean(_ssim_map(x_ref, x, data_range))


def _ssim_map(x_ref, x, data_range=None):
  """SSIM of every Gaussian window: (H - 10, W - 10, B) (smaller images: one window)."""
  x_ref, x = _pair(x_ref, x)
  h, w, _ = x_ref.shape
  gh = _gauss1d(min(SSIM_SIZE, h), SSIM_SIGMA)
  gw = _gauss1d(min(SSIM_SIZE, w), SSIM_SIGMA)
  if data_range is None:
    rng = jnp.max(x_ref, axis=(0, 1)) - jnp.min(x_ref, axis=(0, 1))
    data_range = jnp.where(rng > 0, rng, 1.0)
  data_range = jnp.asarray(data_range, x_ref.dtype)
  c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
  # Moments of data shifted by each band's own mean (covariances are invariant to separate
  # shifts): float32 keeps precision and a constant band becomes (nearly) 0.
  sa, sb = jnp.mean(x_ref, axis=(0, 1)), jnp.mean(x, axis=(0, 1))
  a, b = x_ref - sa, x - sb
  ma, mb = _gauss_filter(a, gh, gw), _gauss_filter(b, gh, gw)
  va = jnp.maximum(_gauss_filter(a * a, gh, gw) - ma * ma, 0.0)
  vb = jnp.maximum(_gauss_filter(b * b, gh, gw) - mb * mb, 0.0)
  cov = _gauss_filter(a * b, gh, gw) - ma * mb
  ma, mb = ma + sa, mb + sb
  return ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))


@functools.partial(jax.jit, static_argnames=("ratio",))
def _all_metrics(x_ref, x, ratio):
  return {
      "psnr": psnr(x_ref, x),
      "sam": sam(x_ref, x),
      "rmse": rmse(x_ref, x),
      "ergas": ergas(x_ref, x, ratio),
      "uiqi": uiqi(x_ref, x),
      "ssim": ssim(x_ref, x),
  }


def all_metrics(x_ref, x, ratio: float) -> dict[str, float]:
  """{psnr, sam (degrees), rmse, ergas, uiqi, ssim} as floats (what the CLIs write to JSON);
  one compiled program per shape and ratio."""
  vals = _all_metrics(x_ref, x, ratio)
  return {k: float(vals[k]) for k in ("psnr", "sam", "rmse", "ergas", "uiqi", "ssim")}


def masked_metrics(x_ref, x, ratio: float, valid) -> dict[str, float]:
  """`all_metrics` over the pixels with valid[r, c] True (e.g. no-data pixels left out).

  PSNR (peak over the valid pixels), SAM, RMSE and ERGAS are the metrics of the valid pixels
  alone; UIQI and SSIM average their maps over the windows that hold valid pixels only (NaN
  when no window does). valid None or all True: `all_metrics`.
  """
  valid = None if valid is None else np.asarray(valid, bool)
  if valid is None or valid.all():
    return all_metrics(x_ref, x, ratio)
  x_ref, x = np.asarray(x_ref, np.float32), np.asarray(x, np.float32)
  if valid.shape != x_ref.shape[:2]:
    raise ValueError(f"valid {valid.shape} must be the images' (H, W) = {x_ref.shape[:2]}")
  if not valid.any():
    raise ValueError("valid marks no pixel; nothing to score")
  ref_px, x_px = x_ref[valid][:, None], x[valid][:, None]  # (N, 1, B): pixel-wise metrics
  out = {"psnr": float(psnr(ref_px, x_px)), "sam": float(sam(ref_px, x_px)),
         "rmse": float(rmse(ref_px, x_px)), "ergas": float(ergas(ref_px, x_px, ratio))}
  # Windowed metrics: fill invalid pixels with the reference (any value would do: only windows
  # without invalid pixels are kept) and keep the windows whose pixels are all valid.
  x = np.where(valid[..., None], x, x_ref)
  inside = jnp.asarray(valid, jnp.float32)[..., None]
  for name, fn, size in (("uiqi", _uiqi_map, UIQI_WINDOW), ("ssim", _ssim_map, SSIM_SIZE)):
    vals = fn(x_ref, x, size) if name == "uiqi" else fn(x_ref, x)
    wh, ww = vals.shape[0], vals.shape[1]
    full = _window(inside, x_ref.shape[0] - wh + 1, x_ref.shape[1] - ww + 1, lax.min,
                   jnp.inf)[..., 0] > 0
    out[name] = float(jnp.sum(jnp.where(full[..., None], vals, 0.0)) /
                      (jnp.sum(full) * vals.shape[-1])) if bool(full.any()) else float("nan")
  return out


@jax.jit
def _reconstruction_metrics(x_ref, x):
  return {"mpsnr": psnr(x_ref, x), "sam_deg": sam(x_ref, x), "sam_rad": sam(x_ref, x, False),
          "mssim": ssim(x_ref, x), "rmse": rmse(x_ref, x)}


def reconstruction_metrics(x_ref, x) -> dict[str, float]:
  """{mpsnr, sam_deg, sam_rad, mssim, rmse} as floats: the SCDM tables (RGB -> HSI), in the
  data's own units (RMSE) and with each reference band's max as the PSNR peak."""
  return {k: float(v) for k, v in _reconstruction_metrics(x_ref, x).items()}


# What every metrics.json records next to its numbers (the definitions in this module).
CONVENTIONS = {
    "psnr": "per band, peak = the reference band's max, then the mean over bands (MPSNR), dB",
    "sam": "mean over pixels of the spectral angle, degrees (sam_rad: radians)",
    "rmse": "over all pixels and bands, in the images' units",
    "ergas": "(100 / ratio) sqrt(mean_b(RMSE_b^2 / mean_b^2))",
    "uiqi": f"Wang-Bovik Q on {UIQI_WINDOW} x {UIQI_WINDOW} sliding windows, mean over "
            "windows then bands",
    "ssim": f"per band, {SSIM_SIZE} x {SSIM_SIZE} Gaussian window (sigma {SSIM_SIGMA}), "
            f"K1 {SSIM_K1}, K2 {SSIM_K2}, data range = reference band max - min; mean over "
            "bands (MSSIM)",
    "qnr": f"(1 - D_lambda)(1 - D_s), Q on {QNR_BLOCK} x {QNR_BLOCK} HR blocks "
           "(Alparone et al. 2008, p = q = 1)",
}


# ------------------------------------------------------------------------------ no reference


def _block_sides(h_lr: int, w_lr: int, block: int | None,
                 ratio: int) -> tuple[int | None, int | None]:
  """(HR, LR) block sides for HR blocks of `block` pixels; (None, None): global Q."""
  if block is None:
    return None, None
  if int(block) != block or block < 1:
    raise ValueError(f"block must be a positive int (32 as in the QNR toolbox) or None for "
                     f"the global Q, got {block}")
  lr = max(1, min(int(block) // ratio, h_lr, w_lr))
  return lr * ratio, lr


def _blocks(x, side: int):
  """(H, W, C) -> (n, side * side, C): the non-overlapping side x side blocks, row-major."""
  h, w, c = (x.shape[0] // side) * side, (x.shape[1] // side) * side, x.shape[2]
  x = x[:h, :w].reshape(h // side, side, w // side, side, c).transpose(0, 2, 1, 3, 4)
  return x.reshape(-1, side * side, c)


def _block_weights(valid, side: int | None):
  """(n,) 1.0 for the side x side blocks of an (H, W) valid mask without an invalid pixel;
  None (every block counts) when valid is None."""
  if valid is None:
    return None
  if side is None:
    raise ValueError("no-reference metrics with a valid mask need blocks (block=None is the "
                     "global Q over every pixel); pass block=32")
  return jnp.min(_blocks(jnp.asarray(valid, jnp.float32)[..., None], side), axis=(1, 2))


def _block_pairwise_q(a, b, side: int | None, weights=None):
  """Mean over non-overlapping side x side blocks of the per-block Q between every band of
  a (H, W, P) and every band of b (H, W, R) -> (P, R); side None: the global Q. weights
  (n,) (`_block_weights`): the mean over the blocks with weight 1 only."""
  if side is None:
    return _pairwise_q(a.reshape(-1, a.shape[2]), b.reshape(-1, b.shape[2]))
  q = jax.vmap(_pairwise_q)(_blocks(a, side), _blocks(b, side))
  if weights is None:
    return jnp.mean(q, axis=0)
  return jnp.einsum("n,npr->pr", weights, q) / jnp.maximum(jnp.sum(weights), 1.0)


def _check_dl(f, y, block):
  """Band check; with blocks also the integer HR / LR ratio, which is returned."""
  if f.shape[2] != y.shape[2] or f.shape[2] < 2:
    raise ValueError(
        f"x_fused {f.shape} and y_lr {y.shape} need the same band count, at least 2; pass the "
        "fused HSI and the LR-HSI it was made from")
  r = f.shape[0] // y.shape[0]
  if block is not None and (r < 1 or f.shape[:2] != (y.shape[0] * r, y.shape[1] * r)):
    raise ValueError(
        f"x_fused {f.shape[:2]} must be y_lr {y.shape[:2]} times an integer ratio for "
        "block-averaged Q; crop the fused image to ratio x the LR size (or pass block=None)")
  return r


@functools.partial(jax.jit, static_argnames=("block",))
def d_lambda(x_fused, y_lr, block: int | None = QNR_BLOCK, valid=None) -> jax.Array:
  """Spectral distortion: mean over band pairs l != r of |Q(F_l, F_r) - Q(Y_l, Y_r)|, Q
  block-averaged (`block` HR pixels, block / ratio LR; None: global). valid (H, W): only
  blocks without an invalid HR pixel count (no-data left out)."""
  f, y = _image(x_fused, "x_fused"), _image(y_lr, "y_lr")
  hr, lr = _block_sides(y.shape[0], y.shape[1], block, _check_dl(f, y, block))
  bands = f.shape[2]
  w = _block_weights(valid, hr)
  diff = jnp.abs(_block_pairwise_q(f, f, hr, w) - _block_pairwise_q(y, y, lr, w))
  off = ~np.eye(bands, dtype=bool)
  return jnp.sum(jnp.where(off, diff, 0.0)) / (bands * (bands - 1))


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


@functools.partial(jax.jit, static_argnames=("ratio", "block"))
def d_s(x_fused, z_msi, y_lr, ratio: int, block: int | None = QNR_BLOCK,
        valid=None) -> jax.Array:
  """Spatial distortion: mean over HSI bands l, MSI bands k of |Q(F_l, Z_k) - Q(Y_l, Zlr_k)|,
  Zlr = Z block-averaged over ratio x ratio blocks; Q block-averaged as in `d_lambda` (valid
  too)."""
  f, z, y = _image(x_fused, "x_fused"), _image(z_msi, "z_msi"), _image(y_lr, "y_lr")
  _check_ds(f, z, y, ratio)
  r = int(ratio)
  h, w, nb = z.shape
  z_lr = z.reshape(h // r, r, w // r, r, nb).mean((1, 3))
  hr, lr = _block_sides(h // r, w // r, block, r)
  wts = _block_weights(valid, hr)
  q_hr = _block_pairwise_q(f, z, hr, wts)
  q_lr = _block_pairwise_q(y, z_lr, lr, wts)
  return jnp.mean(jnp.abs(q_hr - q_lr))


@functools.partial(jax.jit, static_argnames=("ratio", "block"))
def qnr(x_fused, z_msi, y_lr, ratio: int, block: int | None = QNR_BLOCK) -> jax.Array:
  """QNR = (1 - D_lambda) * (1 - D_s) (alpha = beta = 1)."""
  return (1.0 - d_lambda(x_fused, y_lr, block)) * \
      (1.0 - d_s(x_fused, z_msi, y_lr, ratio, block))


@functools.partial(jax.jit, static_argnames=("ratio", "block"))
def _no_reference(x_fused, z_msi, y_lr, ratio, block, valid=None):
  dl = d_lambda(x_fused, y_lr, block, valid)
  ds = d_s(x_fused, z_msi, y_lr, ratio, block, valid)
  return {"d_lambda": dl, "d_s": ds, "qnr": (1.0 - dl) * (1.0 - ds)}


def no_reference_metrics(x_fused, z_msi, y_lr, ratio: int,
                         block: int | None = QNR_BLOCK, valid=None) -> dict[str, float]:
  """{d_lambda, d_s, qnr} as floats (Q averaged over `block` x `block` HR blocks; with an
  (H, W) valid mask over the blocks without no-data pixels only)."""
  vals = _no_reference(x_fused, z_msi, y_lr, ratio, block, valid)
  return {k: float(vals[k]) for k in ("d_lambda", "d_s", "qnr")}


@functools.partial(jax.jit, static_argnames=("ratio", "hr", "lr"))
def _no_reference_sums(f, z, y, ratio, hr, lr, valid=None):
  """Block-summed pairwise Q matrices of one strip (for `no_reference_metrics_by_rows`)."""
  r = int(ratio)
  h, w, nb = z.shape
  z_lr = z.reshape(h // r, r, w // r, r, nb).mean((1, 3))
  wts = _block_weights(valid, hr)
  n = jnp.float32((h // hr) * (w // hr)) if wts is None else jnp.sum(wts)
  return {"ff": _block_pairwise_q(f, f, hr, wts) * n, "yy": _block_pairwise_q(y, y, lr, wts) * n,
          "fz": _block_pairwise_q(f, z, hr, wts) * n,
          "yz": _block_pairwise_q(y, z_lr, lr, wts) * n, "n": n}


QNR_STRIP_BYTES = 64 * 2**20


def no_reference_metrics_by_rows(rows_fn, z_msi, y_lr, ratio: int,
                                 block: int = QNR_BLOCK, rows: int | None = None,
                                 valid=None) -> dict[str, float]:
  """`no_reference_metrics` of a fused image read by rows (a scene larger than memory).

  rows_fn(a, b) -> the fused image's rows a..b-1 (b - a, W, B) (e.g. a `fileio.BandFile`
  slice). The image is read in strips of whole Q blocks (`rows` rows; None: about
  QNR_STRIP_BYTES of float32 fused rows, at least one row of blocks); the block-averaged Q
  matrices are combined over the strips, so the result equals the whole-image computation
  (to float rounding). Images smaller than a block fall back to it.
  """
  z, y = z_msi, y_lr  # arrays or images read by windows (`hsijax.windowed`): sliced by strips
  H, W = z.shape[:2]
  r = int(ratio)
  hr, lr = _block_sides(y.shape[0], y.shape[1], block, r)
  if hr is None or H < hr or W < hr or hr % r:
    return no_reference_metrics(rows_fn(0, H), np.asarray(z[:]), np.asarray(y[:]), r, block,
                                valid)
  if rows is None:
    rows = QNR_STRIP_BYTES // (4 * W * max(y.shape[2], z.shape[2]))
  step = hr * max(1, int(rows) // hr)
  total = None
  for a in range(0, (H // hr) * hr, step):
    b = min(a + step, (H // hr) * hr)
    part = _no_reference_sums(jnp.asarray(rows_fn(a, b), jnp.float32), np.asarray(z[a:b]),
                              np.asarray(y[a // r:b // r]), r, hr, lr,
                              None if valid is None else np.asarray(valid[a:b]))
    total = part if total is None else jax.tree_util.tree_map(jnp.add, total, part)
  n = total["n"]
  bands = y.shape[2]
  off = ~np.eye(bands, dtype=bool)
  dl = float(jnp.sum(jnp.where(off, jnp.abs(total["ff"] - total["yy"]) / n, 0.0)) /
             (bands * (bands - 1)))
  ds = float(jnp.mean(jnp.abs(total["fz"] - total["yz"]) / n))
  return {"d_lambda": dl, "d_s": ds, "qnr": (1.0 - dl) * (1.0 - ds)}


# ------------------------------------------------------------------------------ spectral FID


def _spectra(a, name: str) -> jax.Array:
  a = _as_float(a)
  if a.ndim != 2 or a.shape[0] < 2:
    raise ValueError(
        f"{name} must be (N, B) spectra with N >= 2, got shape {a.shape}; reshape an image with "
        "x.reshape(-1, x.shape[-1])")
  return a


def _mean_cov(a):
  mu = a.mean(0)
  c = a - mu
  return mu, jnp.einsum("nb,nc->bc", c, c, precision=_HI) / (a.shape[0] - 1)


@jax.jit
def spectral_fid(real, generated) -> jax.Array:
  """Frechet distance between Gaussians fitted to real (N, B) and generated (M, B) spectra."""
  r, g = _spectra(real, "real"), _spectra(generated, "generated")
  if r.shape[1] != g.shape[1]:
    raise ValueError(f"real {r.shape} and generated {g.shape} need the same band count")
  mu1, s1 = _mean_cov(r)
  mu2, s2 = _mean_cov(g.astype(r.dtype))
  w1, v1 = jnp.linalg.eigh(s1)
  root1 = jnp.matmul(v1 * jnp.sqrt(jnp.maximum(w1, 0.0)), v1.T, precision=_HI)
  m = jnp.matmul(jnp.matmul(root1, s2, precision=_HI), root1, precision=_HI)
  lam = jnp.linalg.eigvalsh(0.5 * (m + m.T))
  tr_sqrt = jnp.sum(jnp.sqrt(jnp.maximum(lam, 0.0)))
  diff = mu1 - mu2
  return jnp.dot(diff, diff) + jnp.trace(s1) + jnp.trace(s2) - 2 * tr_sqrt
