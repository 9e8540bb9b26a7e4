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
  """(B,) PSNR per band: `hsijax.metrics.psnr_per_band`, so its mean is the tables' MPSNR."""
  from hsijax import metrics  # pylint: disable=g-import-not-at-top
  return np.asarray(metrics.psnr_per_band(np.asarray(reference, np.float32),
                                          np.asarray(x, np.float32)))


def _score_label(name: str, scores: Mapping[str, Mapping[str, float]] | None) -> str:
  """"name" plus its PSNR / SAM from the metrics table (the same numbers as metrics.json)."""
  s = (scores or {}).get(name)
  if not s:
    return name
  psnr = s.get("psnr", s.get("mpsnr"))
  sam = s.get("sam", s.get("sam_deg"))
  parts = [f"{psnr:.2f} dB" if psnr is not None else "", f"SAM {sam:.2f}°" if sam is not None
           else ""]
  return f"{name}\n" + ", ".join(p for p in parts if p)


def fusion_figure(reference: np.ndarray | None, results: Mapping[str, np.ndarray], *,
                  wavelengths_nm: Sequence[float] | None = None,
                  inputs: Mapping[str, np.ndarray] | None = None,
                  title: str | None = None,
                  scores: Mapping[str, Mapping[str, float]] | None = None,
                  bands: Sequence[int] | None = None) -> plt.Figure:
  """Top row: false colour of the reference and each result (same stretch); bottom row:
  per-pixel RMSE over bands (same colour scale for all methods).

  `scores` (method -> the metrics table's row) puts each method's PSNR / SAM and RMSE from
  that table into the panel titles, so the figure and metrics.json show the same numbers.
  `bands`: the (red, green, blue) bands to show (default from the wavelengths).

  Args:
    reference: (H, W, B) ground truth, or None (then only the results' false colour).
    results: method name -> (H, W, B) image.
    inputs: optional extra panels for the top row, e.g. {"LR-HSI": y (h, w, B)} (shown with
      the reference's bands and stretch) or {"HR-MSI": z (H, W, b)} (its first 3 bands).
  """
  has_ref = reference is not None
  base = np.asarray(reference if has_ref else next(iter(results.values())), np.float32)
  B = base.shape[-1]
  bands = tuple(bands) if bands is not None else false_colour_bands(B, wavelengths_nm)
  limits = stretch_limits(base[..., list(bands)])
  inputs = dict(inputs or {})
  names = list(results)
  ncols = int(has_ref) + len(names) + len(inputs)
  rows = 2 if has_ref else 1
  fig, axes = plt.subplots(rows, ncols, figsize=(2.6 * ncols, 2.7 * rows + 0.3),
                           squeeze=False)
  if not has_ref:
    for j, n in enumerate(names):
      axes[0, j].imshow(false_colour(results[n], bands, limits))
      axes[0, j].set_title(n, fontsize=9)
      axes[0, j].set_xticks([])
      axes[0, j].set_yticks([])
    if title:
      fig.suptitle(title)
    return fig
  reference = base
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
    axes[0, col].set_title(_score_label(n, scores), fontsize=9)
    im = axes[1, col].imshow(errors[n], cmap="magma", vmin=0, vmax=vmax)
    rmse = (scores or {}).get(n, {}).get("rmse")
    axes[1, col].set_title("per-pixel RMSE" if rmse is None else
                           f"per-pixel RMSE (RMSE {rmse:.4g})", fontsize=8)
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
                     title: str | None = None,
                     scores: Mapping[str, Mapping[str, float]] | None = None) -> plt.Figure:
  """PSNR of every band for each method (the paper's Fig. 9); the legend gives each
  method's MPSNR from `scores` (the metrics table) when given."""
  reference = np.asarray(reference, np.float32)
  B = reference.shape[-1]
  x_axis = (np.asarray(wavelengths_nm, np.float64)
            if wavelengths_nm is not None and len(wavelengths_nm) == B else np.arange(B))
  fig, ax = plt.subplots(figsize=(6.4, 3.6))
  for name, x in results.items():
    label = _score_label(name, scores).replace("\n", " (") + (")" if name in (scores or {})
                                                              else "")
    ax.plot(x_axis, band_psnr(reference, x), label=label, lw=1.4)
  ax.set_xlabel("wavelength (nm)" if x_axis.dtype.kind == "f" else "band")
  ax.set_ylabel("PSNR (dB)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  if title:
    ax.set_title(title)
  return fig
