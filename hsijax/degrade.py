"""Degradation operators and the synthetic (Wald) protocol for HSI/MSI fusion.

Observation model (the SDP paper, eqs. 1-2), for a reference cube X of shape (H, W, B):

  Y = blur_down(X, psf, ratio) + E_y      LR-HSI, (H/r, W/r, B)
  Z = spectral_response(X, srf) + E_z     HR-MSI, (H, W, b)

Everything that runs inside the SDP solver (`blur_down`, `spectral_response`,
`add_noise`, `upsample`) is a pure, jittable JAX function, differentiable in
its array arguments (including the PSF and SRF, for blind estimation), and
written for a single scene: batch it with `jax.vmap`. Shape and argument
checks only look at static shapes, so they also run under `jax.jit`.

Host-side helpers (`gaussian_psf`, SRF construction, `normalise_cube`,
`wald_protocol`) use NumPy and are called once per experiment.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Sequence
import warnings

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

# FWHM = 2 sqrt(2 ln 2) sigma ~= 2.3548 sigma.
FWHM_PER_SIGMA = float(2.0 * np.sqrt(2.0 * np.log(2.0)))

# Gaussian stand-ins for the IKONOS multispectral responses: (centre, FWHM) in
# nm. Centres and widths are the half-maximum midpoints and widths of the real
# curves (HySure's ikonos_spec_resp.mat, 5 nm grid), rounded up to 5 nm.
IKONOS_GAUSSIAN_NM = {
    "blue": (480.0, 70.0),
    "green": (550.0, 90.0),
    "red": (665.0, 70.0),
    "nir": (805.0, 95.0),
}
IKONOS_BANDS = ("blue", "green", "red", "nir")

_HIGHEST = lax.Precision.HIGHEST


# ----------------------------------------------------------------------------
# Spatial degradation.
# ----------------------------------------------------------------------------


def gaussian_psf(ratio: int, size: int | None = None) -> np.ndarray:
  """Isotropic Gaussian PSF with FWHM = `ratio` pixels, normalised to sum 1.

  Args:
    ratio: spatial downsampling ratio r; sigma = r / 2.3548.
    size: odd kernel side k; defaults to 2 * r - 1 (r = 8 -> 15 x 15).

  Returns:
    float32 array (k, k), centred at (k // 2, k // 2), summing to 1.
  """
  ratio = _check_ratio(ratio)
  k = 2 * ratio - 1 if size is None else int(size)
  if k < 1 or k % 2 == 0:
    raise ValueError(
        f"gaussian_psf: size must be a positive odd integer, got {size}; "
        f"use an odd size such as {max(1, k + 1 if k > 0 else 1)} (default 2*ratio-1)")
  sigma = ratio / FWHM_PER_SIGMA
  d = np.arange(k, dtype=np.float64) - (k - 1) / 2
  g = np.exp(-0.5 * (d / sigma) ** 2)
  psf = np.outer(g, g)
  return (psf / psf.sum()).astype(np.float32)


def _check_ratio(ratio) -> int:
  if isinstance(ratio, bool) or not isinstance(ratio, (int, np.integer)):
    raise ValueError(
        f"ratio must be a static Python int, got {type(ratio).__name__} {ratio!r}; "
        "pass it as a plain int (under jax.jit mark it static, e.g. static_argnames='ratio')")
  if ratio < 1:
    raise ValueError(f"ratio must be >= 1, got {ratio}")
  return int(ratio)


def _check_blur_args(x, psf, ratio: int) -> tuple[int, int, int, int]:
  """Static-shape validation shared by the blur_down implementations."""
  ratio = _check_ratio(ratio)
  if jnp.ndim(x) != 3:
    raise ValueError(
        f"blur_down expects one image x of shape (H, W, B), got shape {jnp.shape(x)}; "
        "for a batch use jax.vmap(blur_down, in_axes=(0, None, None))")
  if jnp.ndim(psf) != 2 or psf.shape[0] != psf.shape[1] or psf.shape[0] % 2 == 0:
    raise ValueError(
        f"psf must be a square 2-D kernel with odd side (k, k), got shape {jnp.shape(psf)}; "
        "pad it with a row/column of zeros to an odd size (e.g. gaussian_psf(ratio) is "
        "(2*ratio-1, 2*ratio-1))")
  h_full, w_full = x.shape[0], x.shape[1]
  for name, n in (("height H", h_full), ("width W", w_full)):
    if n % ratio:
      raise ValueError(
          f"blur_down: ratio {ratio} does not divide the image {name} = {n} "
          f"(x shape {x.shape}); crop the image to a multiple of the ratio, e.g. "
          f"x[:{h_full // ratio * ratio}, :{w_full // ratio * ratio}]")
  return h_full, w_full, psf.shape[0], ratio


def blur_down(x: jax.Array, psf: jax.Array, ratio: int, *,
              method: Literal["matmul", "conv"] = "matmul") -> jax.Array:
  """Per-band 2-D convolution with `psf`, then keep every `ratio`-th pixel.

  out[i, j, b] = sum_{u, v} psf[u, v] * xpad[r*i + (k-1) - u, r*j + (k-1) - v, b]
  where xpad is x zero-padded by p = (k-1)/2 on each side: a true convolution
  (like scipy.signal.convolve2d(mode="same")), sampled at 0, r, 2r, ...
  For symmetric PSFs (e.g. the Gaussian) this equals cross-correlation.

  Only the kept outputs are computed. Two equivalent formulations:
    "matmul" (default): split the padded image into r x r blocks, contract
      every block with the m x m sub-kernels of the (zero-padded, flipped) PSF
      in ONE matmul ((N, r*r) @ (r*r, m*m), m = ceil(k / r)), then add the m*m
      shifted low-resolution partial sums. Fastest on CPU for the value and the
      gradient (the gradient of a grouped strided conv is very slow on XLA:CPU).
    "conv": lax.conv_general_dilated with window_strides=(r, r) and
      feature_group_count=B (the natural choice on GPU/TPU).
  (Timings of both and of the formulations tried: docs/benchmarks.md, "blur_down".)

  Args:
    x: (H, W, B) image; H and W must be multiples of `ratio`.
    psf: (k, k) kernel, k odd. Differentiable (blind PSF estimation).
    ratio: static int r.
    method: "matmul" or "conv" (same result to float32 rounding).

  Returns:
    (H / r, W / r, B) array.
  """
  h_full, w_full, k, r = _check_blur_args(x, psf, ratio)
  dtype = jnp.result_type(x, psf, jnp.float32)
  x = jnp.asarray(x, dtype)
  psf = jnp.asarray(psf, dtype)
  p = (k - 1) // 2
  kernel = psf[::-1, ::-1]  # convolution = correlation with the flipped kernel
  n_bands = x.shape[2]
  if method == "conv":
    w = jnp.broadcast_to(kernel[:, :, None, None], (k, k, 1, n_bands))
    out = lax.conv_general_dilated(
        x[None], w, window_strides=(r, r), padding=((p, p), (p, p)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=n_bands,
        precision=_HIGHEST)
    return out[0]
  if method != "matmul":
    raise ValueError(f"blur_down: unknown method {method!r}; use 'matmul' or 'conv'")

  h, w = h_full // r, w_full // r
  m = -(-k // r)  # sub-kernels per axis
  # Kernel row u = a*r + s -> (a, s); zero-padded to m*r so it tiles evenly.
  kb = jnp.pad(kernel, ((0, m * r - k), (0, m * r - k))).reshape(m, r, m, r)
  kmat = jnp.transpose(kb, (1, 3, 0, 2)).reshape(r * r, m * m)  # (s, t) x (a, c)
  # Pad so that the padded size is (h + m - 1) * r; the high side may be
  # negative (a crop) for small kernels: those pixels have zero weight.
  rows, cols = h + m - 1, w + m - 1
  xp = lax.pad(x, jnp.zeros((), dtype),
               ((p, rows * r - h_full - p, 0), (p, cols * r - w_full - p, 0), (0, 0, 0)))
  blocks = xp.reshape(rows, r, cols, r, n_bands)
  blocks = jnp.transpose(blocks, (0, 2, 4, 1, 3)).reshape(rows * cols * n_bands, r * r)
  # partial[I, J, b, a, c] = sum_{s,t} kb[a, s, c, t] * xp[r*I + s, r*J + t, b]
  partial = jnp.matmul(blocks, kmat, precision=_HIGHEST).reshape(rows, cols, n_bands, m, m)
  # out[i, j] = sum_{a, c} partial[i + a, j + c, :, a, c]  (all low resolution).
  out = partial[:h, :w, :, 0, 0]
  for a in range(m):
    for c in range(m):
      if a or c:
        out = out + partial[a:a + h, c:c + w, :, a, c]
  return out


# ----------------------------------------------------------------------------
# Spectral degradation.
# ----------------------------------------------------------------------------


def spectral_response(x: jax.Array, srf: jax.Array) -> jax.Array:
  """Apply a spectral response: each MSI band a weighted sum of HSI bands.

  Args:
    x: (..., B) image, e.g. (H, W, B).
    srf: (b, B) response matrix R (rows usually sum to 1).

  Returns:
    (..., b) array, out[..., i] = sum_j srf[i, j] * x[..., j].
  """
  if jnp.ndim(srf) != 2:
    raise ValueError(f"srf must be a (b, B) matrix, got shape {jnp.shape(srf)}")
  if jnp.shape(x)[-1] != srf.shape[1]:
    raise ValueError(
        f"spectral_response: x has {jnp.shape(x)[-1]} bands (shape {jnp.shape(x)}) but the "
        f"SRF has {srf.shape[1]} columns (shape {srf.shape}); build the SRF for this cube's "
        "band wavelengths, e.g. ikonos_srf(wavelengths_nm) with len(wavelengths_nm) == B")
  return jnp.einsum("...j,ij->...i", x, srf, precision=_HIGHEST)


def nominal_wavelengths(num_bands: int, start_nm: float, stop_nm: float) -> np.ndarray:
  """`num_bands` evenly spaced band centres from start_nm to stop_nm (inclusive), (B,)."""
  if num_bands < 1 or not stop_nm > start_nm:
    raise ValueError(
        f"nominal_wavelengths needs num_bands >= 1 and stop_nm > start_nm, got "
        f"{num_bands}, {start_nm}, {stop_nm}; e.g. nominal_wavelengths(103, 430, 860)")
  return np.linspace(start_nm, stop_nm, int(num_bands), dtype=np.float64)


def srf_from_curves(curve_wavelengths_nm, curves, band_wavelengths_nm,
                    names: Sequence[str] | None = None) -> np.ndarray:
  """Resample sensor response curves onto band centres; rows sum to 1.

  Each curve is linearly interpolated at the band wavelengths (zero outside
  the curve's wavelength range; negative values are clipped to zero), then
  each row is divided by its sum.

  Args:
    curve_wavelengths_nm: (M,) increasing wavelengths of the curve samples.
    curves: (b, M) relative responses.
    band_wavelengths_nm: (B,) centres of the HSI bands.
    names: optional b band names for error messages.

  Returns:
    float32 (b, B) SRF matrix with rows summing to 1.
  """
  cw = np.asarray(curve_wavelengths_nm, np.float64)
  curves = np.atleast_2d(np.asarray(curves, np.float64))
  bw = np.asarray(band_wavelengths_nm, np.float64)
  if cw.ndim != 1 or curves.shape[1] != cw.shape[0]:
    raise ValueError(
        f"srf_from_curves: curves {curves.shape} must be (b, M) with M = "
        f"len(curve_wavelengths_nm) = {cw.shape}")
  if bw.ndim != 1 or bw.size == 0:
    raise ValueError(f"band_wavelengths_nm must be a non-empty 1-D array, got {bw.shape}")
  if np.any(np.diff(cw) <= 0):
    order = np.argsort(cw)
    cw, curves = cw[order], curves[:, order]
  names = list(names) if names is not None else [f"row {i}" for i in range(curves.shape[0])]
  curves = np.clip(curves, 0.0, None)
  srf = np.stack([np.interp(bw, cw, c, left=0.0, right=0.0) for c in curves])
  lo, hi = bw.min(), bw.max()
  for i, (row, curve) in enumerate(zip(srf, curves)):
    if not row.sum() > 0:
      support = cw[curve > 0]
      rng = f"{support.min():.0f}-{support.max():.0f} nm" if support.size else "empty"
      raise ValueError(
          f"SRF band {names[i]!r} (response {rng}) has no overlap with the cube's bands "
          f"({lo:.0f}-{hi:.0f} nm); drop that MSI band or check the wavelengths "
          "(micrometres vs nm; use nominal_wavelengths(B, start, stop) if unknown)")
    total = np.trapezoid(curve, cw)
    inside = (cw >= lo) & (cw <= hi)
    if total > 0 and np.trapezoid(curve[inside], cw[inside]) < 0.5 * total:
      warnings.warn(
          f"SRF band {names[i]!r}: less than half of its response lies within the cube's "
          f"wavelength range {lo:.0f}-{hi:.0f} nm; the simulated band is only approximate",
          stacklevel=2)
  return (srf / srf.sum(axis=1, keepdims=True)).astype(np.float32)


def ikonos_srf(band_wavelengths_nm, path=None, bands=IKONOS_BANDS) -> np.ndarray:
  """IKONOS blue, green, red, NIR response resampled onto the cube's bands.

  Args:
    band_wavelengths_nm: (B,) band centres in nm.
    path: optional `ikonos.npz` with keys wavelengths_nm, blue, green, red,
      nir (e.g. ../shared/data/srf/ikonos.npz). Without it, Gaussian curves
      with the centres/FWHMs in IKONOS_GAUSSIAN_NM, truncated where they fall
      below 1e-3 of the peak (the real curves have finite support).
    bands: which of ("blue", "green", "red", "nir") to return, e.g. the first
      three for a scene that stops before the near infrared.

  Returns:
    float32 (len(bands), B), one row per band, each summing to 1.
  """
  unknown = [b for b in bands if b not in IKONOS_BANDS]
  if unknown or not bands:
    raise ValueError(f"unknown IKONOS band(s) {unknown or bands}; choose from {IKONOS_BANDS}")
  if path is not None:
    try:
      with np.load(path) as f:
        wl = np.asarray(f["wavelengths_nm"], np.float64)
        curves = np.stack([np.asarray(f[n], np.float64) for n in IKONOS_BANDS])
    except FileNotFoundError as e:
      raise FileNotFoundError(f"IKONOS SRF file not found: {path}") from e
    except KeyError as e:
      raise KeyError(
          f"{path}: needs arrays wavelengths_nm, {', '.join(IKONOS_BANDS)} ({e}); "
          "or pass path=None for the Gaussian approximation") from e
  else:
    wl = np.arange(300.0, 1101.0, 1.0)
    curves = []
    for name in IKONOS_BANDS:
      centre, fwhm = IKONOS_GAUSSIAN_NM[name]
      g = np.exp(-0.5 * ((wl - centre) / (fwhm / FWHM_PER_SIGMA)) ** 2)
      curves.append(np.where(g >= 1e-3, g, 0.0))
    curves = np.stack(curves)
  pick = [IKONOS_BANDS.index(b) for b in bands]
  return srf_from_curves(wl, curves[pick], band_wavelengths_nm, names=tuple(bands))


# ----------------------------------------------------------------------------
# Noise, normalisation, upsampling.
# ----------------------------------------------------------------------------


def add_noise(key: jax.Array, x: jax.Array, snr_db) -> jax.Array:
  """Add white Gaussian noise at a per-band SNR.

  sigma_b^2 = mean(x[..., b]^2) / 10^(snr_db / 10), means over all but the
  last axis. `snr_db` may be traced; None or inf adds no noise.

  Args:
    key: PRNG key.
    x: (..., B) image.
    snr_db: signal-to-noise ratio in dB.

  Returns:
    x + noise, same shape and dtype.
  """
  if snr_db is None:
    return x
  x = jnp.asarray(x)
  axes = tuple(range(x.ndim - 1))
  power = jnp.mean(jnp.square(x), axis=axes, keepdims=True)
  sigma = jnp.sqrt(power / 10.0 ** (jnp.asarray(snr_db, x.dtype) / 10.0))
  return x + sigma * jax.random.normal(key, x.shape, x.dtype)


def normalise_cube(cube) -> np.ndarray:
  """Clip negatives to 0 and divide by the cube's max (each scene scaled to [0, 1]), float32."""
  cube = np.asarray(cube, np.float32)
  bad = int(np.size(cube) - np.count_nonzero(np.isfinite(cube)))
  if bad:
    raise ValueError(
        f"normalise_cube: cube contains {bad} NaN/inf values; replace them first "
        "(e.g. np.nan_to_num(cube)) or drop the bad bands")
  cube = np.clip(cube, 0.0, None)
  peak = float(cube.max()) if cube.size else 0.0
  if peak <= 0:
    raise ValueError(
        f"normalise_cube: cube of shape {cube.shape} has no positive values (max {peak}); "
        "check the file/key, or that negative offsets were not meant to be kept")
  return cube / peak


def upsample(y: jax.Array, ratio: int, method: str = "bicubic") -> jax.Array:
  """Upsample an LR image (h, w, B) -> (h*r, w*r, B) to initialise the solver.

  Aligned with `blur_down`'s sampling grid: LR pixel (i, j) lands on HR pixel
  (r*i, r*j) (not the centre of an r x r block). Edges are extended by
  replication. Bicubic may slightly overshoot [0, 1]; the solver clamps.

  Args:
    y: (h, w, B) image.
    ratio: static int r.
    method: any jax.image method ("bicubic", "bilinear", "nearest", ...).
  """
  r = _check_ratio(ratio)
  if jnp.ndim(y) != 3:
    raise ValueError(f"upsample expects (h, w, B), got {jnp.shape(y)}; vmap for batches")
  h, w, n_bands = y.shape
  pad = 2  # support radius of the cubic kernel, in LR pixels
  yp = jnp.pad(y, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
  # Half-pixel-centre coordinates: HR pixel r*i (centre r*i + 0.5) must map to
  # padded LR pixel i + pad (centre i + pad + 0.5): t = 0.5 - (pad + 0.5) r.
  t = 0.5 - (pad + 0.5) * r
  return jax.image.scale_and_translate(
      yp, (h * r, w * r, n_bands), (0, 1), jnp.array([r, r], jnp.float32),
      jnp.array([t, t], jnp.float32), method=method, antialias=False)


# ----------------------------------------------------------------------------
# Synthetic (Wald) protocol.
# ----------------------------------------------------------------------------


class WaldData(NamedTuple):
  """Simulated fusion problem. `ratio` is a Python int (keep it static)."""
  y: jax.Array             # (h, w, B) noisy LR-HSI
  z: jax.Array             # (H, W, b) noisy HR-MSI
  x: jax.Array             # (H, W, B) reference, in [0, 1]
  train_pixels: jax.Array  # (N, B) clean spectra disjoint from x (see split)
  psf: jax.Array           # (k, k)
  srf: jax.Array           # (b, B)
  ratio: int


def wald_protocol(cube, *, ratio: int, key: jax.Array, srf, snr_y_db: float | None = 20.0,
                  snr_z_db: float | None = 30.0, psf=None,
                  split: Literal["rows"] | None = "rows") -> WaldData:
  """Simulate LR-HSI / HR-MSI from a real cube (Wald's protocol, as in the SDP paper's experiments).

  1. normalise_cube: clip negatives, divide by the max (whole cube).
  2. split="rows": the top H // 2 rows give the training spectra
     (reshaped (N, B)); the bottom rows, cropped to a multiple of `ratio` in
     both directions (from the top-left), are the reference X.
     split=None: X is the whole cube (cropped) and train_pixels are X's own
     pixels: for demos only, as the spectral model then sees the test pixels.
  3. Y = add_noise(blur_down(X, psf)), Z = add_noise(spectral_response(X, srf)),
     with two keys split from `key` (same key -> identical output).

  Args:
    cube: (H, W, B) array in any units.
    ratio: spatial ratio r (the paper uses 8; crops use 4).
    key: PRNG key for the noise.
    srf: (b, B) spectral response, e.g. ikonos_srf(wavelengths_nm).
    snr_y_db, snr_z_db: noise levels (None = noiseless).
    psf: (k, k) kernel; default gaussian_psf(ratio).
    split: "rows" or None.

  Returns:
    WaldData.
  """
  r = _check_ratio(ratio)
  cube = np.asarray(cube)
  if cube.ndim != 3:
    raise ValueError(f"wald_protocol expects a cube (H, W, B), got shape {cube.shape}")
  srf = jnp.asarray(srf, jnp.float32)
  if srf.ndim != 2 or srf.shape[1] != cube.shape[2]:
    raise ValueError(
        f"srf shape {srf.shape} does not match the cube's {cube.shape[2]} bands; "
        "build it with ikonos_srf(wavelengths_nm) for this cube's wavelengths")
  psf = jnp.asarray(gaussian_psf(r) if psf is None else psf, jnp.float32)
  cube = normalise_cube(cube)
  n_rows, n_cols, n_bands = cube.shape
  if split == "rows":
    top = n_rows // 2
    train, ref = cube[:top], cube[top:]
  elif split is None:
    train, ref = None, cube
  else:
    raise ValueError(f"wald_protocol: split must be 'rows' or None, got {split!r}")
  hr, wr = ref.shape[0] // r * r, ref.shape[1] // r * r
  if hr == 0 or wr == 0:
    raise ValueError(
        f"wald_protocol: the reference part has shape {ref.shape[:2]}, smaller than the "
        f"ratio {r}; use a smaller ratio or a larger cube (split='rows' keeps the bottom half)")
  ref = ref[:hr, :wr]
  train = ref if train is None else train
  x = jnp.asarray(ref)
  key_y, key_z = jax.random.split(key)
  y = _simulate_y(key_y, x, psf, r, snr_y_db)
  z = _simulate_z(key_z, x, srf, snr_z_db)
  return WaldData(y=y, z=z, x=x, train_pixels=jnp.asarray(train.reshape(-1, n_bands)),
                  psf=psf, srf=srf, ratio=r)


def _simulate_y(key, x, psf, ratio, snr_db):
  return add_noise(key, _blur_down_jit(x, psf, ratio), snr_db)


def _simulate_z(key, x, srf, snr_db):
  return add_noise(key, spectral_response(x, srf), snr_db)


_blur_down_jit = jax.jit(blur_down, static_argnames=("ratio", "method"))
