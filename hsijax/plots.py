"""Figures for fusion results (matplotlib, Agg backend; the caller saves them).

    fig = plots.fusion_figure(reference, {"SDP": x_sdp, "Baseline": x_base}, wavelengths_nm=wl)
    common.save_figure(fig, workdir / "fusion.png")
    common.save_figure(plots.band_psnr_figure(reference, results), workdir / "band_psnr.png")
"""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402

# Band centres used for a natural-looking false colour when wavelengths are known.
_RGB_NM = (640.0, 550.0, 460.0)


def false_colour_bands(num_bands: int,
                       wavelengths_nm: Sequence[float] | None = None) -> tuple[int, int, int]:
  """(red, green, blue) band indices: nearest to 640/550/460 nm, else at 3/4, 1/2, 1/4."""
  if wavelengths_nm is not None and len(wavelengths_nm) == num_bands:
    wl = np.asarray(wavelengths_nm, np.float64)
    if wl.min() <= 500 and wl.max() >= 600:
      return tuple(int(np.argmin(np.abs(wl - c))) for c in _RGB_NM)
  return (int(0.75 * (num_bands - 1)), int(0.5 * (num_bands - 1)), int(0.25 * (num_bands - 1)))


def false_colour(cube: np.ndarray, bands: tuple[int, int, int],
                 limits: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
  """(H, W, B) -> (H, W, 3) in [0, 1], stretched per channel between `limits` (lo, hi)."""
  rgb = np.asarray(cube, np.float32)[..., list(bands)]
  if limits is None:
    limits = stretch_limits(rgb)
  lo, hi = limits
  return np.clip((rgb - lo) / np.maximum(hi - lo, 1e-12), 0, 1)


def stretch_limits(rgb: np.ndarray, pct: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel (lo, hi) percentiles of an (H, W, 3) image (robust contrast stretch)."""
  flat = rgb.reshape(-1, rgb.shape[-1])
  return np.percentile(flat, pct, axis=0), np.percentile(flat, 100 - pct, axis=0)


def band_psnr(reference: np.ndarray, x: np.ndarray) -> np.ndarray:
  """(B,) PSNR per band, peak = the reference band's max (as the MPSNR metric)."""
  ref = np.asarray(reference, np.float64)
  x = np.asarray(x, np.float64)
  mse = np.mean((ref - x) ** 2, axis=(0, 1))
  peak = ref.max(axis=(0, 1))
  return 10 * np.log10(np.maximum(peak, 1e-12) ** 2 / np.maximum(mse, 1e-20))


def fusion_figure(reference: np.ndarray, results: Mapping[str, np.ndarray], *,
                  wavelengths_nm: Sequence[float] | None = None,
                  inputs: Mapping[str, np.ndarray] | None = None,
                  title: str | None = None) -> plt.Figure:
  """Top row: false colour of the reference and each result (same stretch); bottom row:
  per-pixel RMSE over bands (same colour scale for all methods).

  Args:
    reference: (H, W, B) ground truth.
    results: method name -> (H, W, B) fused image.
    inputs: optional extra panels for the top row, e.g. {"LR-HSI": y (h, w, B)} (shown with
      the reference's bands and stretch) or {"HR-MSI": z (H, W, b)} (its first 3 bands).
  """
  reference = np.asarray(reference, np.float32)
  B = reference.shape[-1]
  bands = false_colour_bands(B, wavelengths_nm)
  limits = stretch_limits(reference[..., list(bands)])
  inputs = dict(inputs or {})
  names = list(results)
  ncols = 1 + len(names) + len(inputs)
  fig, axes = plt.subplots(2, ncols, figsize=(2.6 * ncols, 5.4), squeeze=False)
  errors = {n: np.sqrt(np.mean((np.asarray(results[n], np.float32) - reference) ** 2, -1))
            for n in names}
  vmax = max([float(np.percentile(e, 99)) for e in errors.values()] + [1e-6])
  col = 0
  for label, img in inputs.items():
    img = np.asarray(img, np.float32)
    if img.shape[-1] == B:
      rgb = false_colour(img, bands, limits)
    else:  # multispectral input: its own stretch of the last three bands (e.g. B, G, R)
      sel = tuple(range(max(img.shape[-1] - 3, 0), img.shape[-1]))[::-1][:3]
      sel = sel + (sel[-1],) * (3 - len(sel))
      rgb = false_colour(img, sel)
    axes[0, col].imshow(rgb, interpolation="nearest")
    axes[0, col].set_title(label)
    axes[1, col].axis("off")
    col += 1
  axes[0, col].imshow(false_colour(reference, bands, limits))
  axes[0, col].set_title("Reference")
  axes[1, col].axis("off")
  col += 1
  im = None
  for n in names:
    axes[0, col].imshow(false_colour(results[n], bands, limits))
    axes[0, col].set_title(n)
    im = axes[1, col].imshow(errors[n], cmap="magma", vmin=0, vmax=vmax)
    axes[1, col].set_title(f"RMSE map ({errors[n].mean():.4f})", fontsize=9)
    col += 1
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  if im is not None:
    fig.colorbar(im, ax=list(axes[1]), fraction=0.02, pad=0.01, label="per-pixel RMSE")
  if title:
    fig.suptitle(title)
  return fig


def band_psnr_figure(reference: np.ndarray, results: Mapping[str, np.ndarray], *,
                     wavelengths_nm: Sequence[float] | None = None,
                     title: str | None = None) -> plt.Figure:
  """PSNR of every band for each method (the paper's Fig. 9)."""
  reference = np.asarray(reference, np.float32)
  B = reference.shape[-1]
  x_axis = (np.asarray(wavelengths_nm, np.float64)
            if wavelengths_nm is not None and len(wavelengths_nm) == B else np.arange(B))
  fig, ax = plt.subplots(figsize=(6.4, 3.6))
  for name, x in results.items():
    ax.plot(x_axis, band_psnr(reference, x), label=name, lw=1.4)
  ax.set_xlabel("wavelength (nm)" if x_axis.dtype.kind == "f" else "band")
  ax.set_ylabel("PSNR (dB)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  if title:
    ax.set_title(title)
  return fig
