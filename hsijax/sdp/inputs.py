"""The inputs of a fusion: checks before any work, scaling, pixels without data.

  check_pair    refuses a bad (LR-HSI, HR-MSI) pair with the problem and the fix; the ratio
  scale_pair    both images into [0, 1] (jointly by default), with the scales to undo it
  fill_invalid  no-data pixels filled (for the solve) ...
  fused_valid   ... and the HR pixels of the result that are backed by data
  finish_output X back in the inputs' units, no-data pixels NaN (also on disk, by rows)
"""
from __future__ import annotations

from typing import Any

import numpy as np

from hsijax import windowed


def infer_ratio(y_shape: tuple[int, ...], z_shape: tuple[int, ...]) -> int:
  """The integer ratio H / h = W / w between HR-MSI (H, W, b) and LR-HSI (h, w, B)."""
  if len(y_shape) != 3 or len(z_shape) != 3:
    raise ValueError(
        f"LR-HSI must be (h, w, B) and HR-MSI (H, W, b); got {tuple(y_shape)} and "
        f"{tuple(z_shape)}; pass 3-D arrays (rows, columns, bands)")
  (h, w, _), (H, W, _) = y_shape[:3], z_shape[:3]
  if H < h or W < w:
    raise ValueError(f"HR-MSI {H} x {W} is smaller than LR-HSI {h} x {w}; the two images "
                     "are swapped (pass the hyperspectral image as y, the multispectral as z)")
  if H % h or W % w:
    raise ValueError(
        f"the ratio does not divide: HR-MSI is {H} x {W} but LR-HSI is {h} x {w}, and "
        f"{H}/{h}, {W}/{w} are not both integers; crop the HR-MSI to a multiple of the "
        f"LR-HSI size (e.g. {h * max(H // h, 1)} x {w * max(W // w, 1)})")
  if H // h != W // w:
    raise ValueError(
        f"rows and columns give different ratios ({H}/{h} = {H // h} vs {W}/{w} = "
        f"{W // w}); the HR-MSI must be the same integer multiple of the LR-HSI on both axes")
  return H // h


def _finite(a: np.ndarray, name: str) -> None:
  bad = ~np.isfinite(a)
  if bad.any():
    raise ValueError(
        f"{name} has {int(bad.sum())} NaN/inf values (first at index "
        f"{tuple(int(i) for i in np.argwhere(bad)[0])}); fill or mask them (e.g. "
        "np.nan_to_num) first")


def check_pair(y: Any, z: Any, *, psf: Any = None, srf: Any = None, ratio: int | None = None,
               psf_size: int | None = None, names: tuple[str, str] = ("y (LR-HSI)",
                                                                        "z (HR-MSI)"),
               same_units: bool = True) -> int:
  """Checks a fusion problem before any work; returns the ratio.

  Refuses (ValueError naming the problem and the fix): non-3-D or non-finite images, sizes
  whose ratio is not an integer, an HSI with fewer than 3 bands or not more bands than the
  MSI, an image with no positive value or no variation at all, a PSF that is not a square
  odd kernel with a positive sum or is larger than the HR image, an SRF that is not (b, B),
  and (same_units) two images whose mean levels differ more than tenfold: each HR-MSI band
  is a weighted average of HSI bands, so in the same units their means are comparable.
  """
  y, z = windowed.as_image(y), windowed.as_image(z)
  r = infer_ratio(y.shape, z.shape)
  if ratio is not None and int(ratio) != r:
    raise ValueError(f"ratio={ratio} was given but the shapes {y.shape[:2]} and "
                     f"{z.shape[:2]} give {r}; drop ratio= or fix the images")
  B, b = y.shape[-1], z.shape[-1]
  if B < 3:
    raise ValueError(f"{names[0]} has {B} band(s); a hyperspectral image needs at least 3 "
                     "(the prior models spectra): check the file / key")
  if b >= B:
    raise ValueError(f"{names[1]} has {b} bands and {names[0]} {B}; the hyperspectral image "
                     "must have more bands (are the two swapped?)")
  summary = []
  for a, name in ((y, names[0]), (z, names[1])):
    st = windowed.stats(a)  # by strips: a lazy image is never read whole
    if st.nonfinite:
      raise ValueError(f"{name} has {st.nonfinite} NaN/inf values (first at index "
                       f"{st.first_nonfinite}); fill or mask them (e.g. np.nan_to_num) first")
    if not st.max > 0:
      raise ValueError(f"{name} has no positive value (max {st.max:.4g}); it is "
                       "empty or in the wrong units: check the file / key")
    if st.max == st.min:
      raise ValueError(f"{name} is constant ({st.max:.4g} everywhere); there is "
                       "nothing to fuse: check the file / key")
    summary.append(st)
  if same_units:
    my, mz = summary[0].positive_mean, summary[1].positive_mean
    if not 0.1 <= mz / my <= 10.0:
      raise ValueError(
          f"{names[1]} averages {mz:.4g} and {names[0]} {my:.4g} ({mz / my:.3g} times): the "
          "two images seem to be in different units (e.g. reflectance and raw counts). "
          "Convert them to the same units, or scale each by its own maximum (scale_pair(y, "
          "z, 'separate'); --config.data.scale=separate)")
  H, W = z.shape[:2]
  k = 2 * r - 1 if psf_size is None else int(psf_size)
  if psf is not None:
    psf = np.asarray(psf)
    _finite(psf, "psf")
    if psf.ndim != 2 or psf.shape[0] != psf.shape[1] or psf.shape[0] % 2 == 0:
      raise ValueError(f"PSF must be a square (k, k) kernel with odd k, got {psf.shape}")
    if not float(psf.sum()) > 0:
      raise ValueError(f"PSF sums to {float(psf.sum()):.4g}; a blur kernel needs a positive "
                       "sum (it is normalised to 1): check the PSF file")
    k = psf.shape[0]
  if k > min(H, W):
    raise ValueError(f"the PSF ({k} x {k}) is larger than the HR image ({H} x {W}); use a "
                     f"larger scene (LR-HSI at least {-(-k // r)} x {-(-k // r)} pixels for "
                     f"ratio {r}) or a smaller PSF")
  if srf is not None:
    srf = np.asarray(srf)
    _finite(srf, "srf")
    if srf.shape != (b, B):
      hint = " (it looks transposed: pass srf.T)" if srf.shape == (B, b) else ""
      raise ValueError(f"SRF is {srf.shape} but must be (b, B) = ({b}, {B}): one row per "
                       f"HR-MSI band, one column per LR-HSI band{hint}")
    if np.any(srf.sum(axis=1) <= 0):
      raise ValueError("every SRF row must have a positive sum (each MSI band a weighted sum "
                       "of HSI bands)")
  return r




def scale_pair(y: Any, z: Any, mode: str = "joint") -> tuple[np.ndarray, np.ndarray,
                                                            dict[str, float]]:
  """Scales an (LR-HSI, HR-MSI) pair into [0, 1] for `fuse`; returns (y, z, scales).

  Negative values (noise around a zero offset) are clipped first; how many is reported in
  scales["clipped"]. mode "joint" divides both by one common maximum (keeps Z = R X when
  both are in the same units), "separate" each by its own maximum, "none" expects data
  already in [0, 1]. Multiply the fused X by scales["hsi"] to return to the input's units.
  Lazy images (`hsijax.windowed`) come back as views scaled window by window.
  """
  lazy = windowed.is_lazy(y) or windowed.is_lazy(z)
  y, z = windowed.as_image(y), windowed.as_image(z)
  st_y, st_z = windowed.stats(y), windowed.stats(z)
  clipped = {"hsi": st_y.negatives, "msi": st_z.negatives}
  m_y, m_z = max(st_y.max, 0.0), max(st_z.max, 0.0)  # the maxima once negatives are clipped
  if mode == "joint":
    s_y = s_z = max(m_y, m_z)
  elif mode == "separate":
    s_y, s_z = m_y, m_z
  elif mode == "none":
    if max(m_y, m_z) > 1.5:
      raise ValueError(f"scale 'none' expects images in [0, 1], but they reach "
                       f"{max(m_y, m_z):.4g}; use 'joint' (the default: "
                       "one common maximum) or 'separate' (--config.data.scale=joint)")
    s_y = s_z = 1.0
  else:
    raise ValueError(f"unknown scale mode {mode!r}; use joint, separate or none")
  if not (s_y > 0 and s_z > 0):
    raise ValueError("an input image has no positive value (all zeros or negative); check "
                     "the LR-HSI and HR-MSI files / keys")
  scales = {"hsi": s_y, "msi": s_z, "clipped": clipped}
  if lazy:  # computed window by window when read
    return (windowed.ImageView(y, scale=s_y, clip=True),
            windowed.ImageView(z, scale=s_z, clip=True), scales)
  return np.maximum(y, 0) / s_y, np.maximum(z, 0) / s_z, scales


def fill_invalid(a: Any, valid: Any) -> np.ndarray:
  """(h, w, C) image with its invalid pixels (valid (h, w) False) set to each band's median
  over the valid ones, so the solve can run over them (they are marked in the output)."""
  a = np.array(a, np.float32)
  valid = np.asarray(valid, bool)
  if not valid.any():
    raise ValueError("every pixel of the image is missing (no-data); check the file")
  a[~valid] = np.median(a[valid], axis=0)
  return a


def fused_valid(y_valid: Any, z_valid: Any, ratio: int) -> np.ndarray | None:
  """(H, W) pixels of the fused image backed by data: valid in the HR-MSI and under a valid
  LR-HSI pixel (None when both masks are None)."""
  if y_valid is None and z_valid is None:
    return None
  out = None if z_valid is None else np.asarray(z_valid, bool)
  if y_valid is not None:
    up = np.repeat(np.repeat(np.asarray(y_valid, bool), ratio, 0), ratio, 1)
    out = up if out is None else out & up
  return out


def finish_output(x: Any, scale: float = 1.0, valid: Any = None) -> Any:
  """X in the inputs' units (times `scale`) with pixels without data (valid False) set to
  NaN: a new array, or in place by rows for an on-disk `fileio.BandFile`."""
  valid = None if valid is None else np.asarray(valid, bool)

  def fix(rows, a):
    rows = np.asarray(rows, np.float32) * np.float32(scale)
    if valid is not None:
      rows = np.where(valid[a:a + rows.shape[0], :, None], rows, np.nan)
    return rows
  if isinstance(x, np.ndarray):
    return fix(x, 0)
  for a in range(0, x.shape[0], 64):
    x[a:a + 64] = fix(x[a:a + 64], a)
  return x
