"""Synthetic hyperspectral scenes: real spectra mixed by smooth random abundance maps.

The demo must run without any data files, so it builds its own scene here. Each pixel is a
convex mix (linear mixing model) of `M` endmember spectra; the abundance maps are a softmax
over `M` smoothed Gaussian random fields, so they are non-negative, sum to one, and form
regions with soft borders, as land-cover maps do.

Endmember spectra, by `source`:
  "colour"     reflectances shipped by the `colour-science` package (ColorChecker N Ohta,
               CIE test colour samples, NIST CQS samples; 53 real spectra, 380-780 nm).
  "usgs"       the USGS splib07 library convolved to AVIRIS (../shared/data/speclib, when the
               file is present; 560 minerals / materials, 383-2508 nm).
  "generated"  fallback with no dependency: smooth continua (a sigmoid "edge" such as
               vegetation's red edge plus a gentle slope) minus Gaussian absorption features,
               clipped to [0.02, 0.95], i.e. plausible but not measured reflectances.
  "auto"       the first of colour / usgs / generated that covers the requested wavelengths.
Everything is reproducible from `seed` (NumPy PCG64 generator); `Scene.source` records which
library was used, since "auto" depends on what is installed.
"""
from __future__ import annotations

import pathlib
from typing import NamedTuple, Sequence

import numpy as np
from scipy import ndimage

_SPECLIB = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "speclib" /
            "usgs_splib07_aviris95.npz")
SOURCES = ("auto", "colour", "usgs", "generated")


class Scene(NamedTuple):
  """A synthetic scene; `cube == abundances @ endmembers` exactly (up to float32 rounding)."""
  cube: np.ndarray            # (H, W, B) float32, max 1
  abundances: np.ndarray      # (H, W, M) float32, >= 0, sums to 1 over M
  endmembers: np.ndarray      # (M, B) float32 (scaled with the cube)
  wavelengths_nm: np.ndarray  # (B,) float32 band centres
  names: tuple[str, ...]      # endmember names
  source: str                 # "colour" | "usgs" | "generated"


def band_wavelengths(num_bands: int, start: float, stop: float) -> np.ndarray:
  """(B,) evenly spaced band centres from `start` to `stop` nm inclusive."""
  if num_bands < 1 or not stop > start:
    raise ValueError(f"need num_bands >= 1 and stop > start, got {num_bands}, {start}:{stop}")
  return np.linspace(start, stop, num_bands, dtype=np.float64)


def _resample(spectra: np.ndarray, src_nm: np.ndarray, dst_nm: np.ndarray) -> np.ndarray:
  """Linear interpolation of (M, L) spectra sampled at `src_nm` onto `dst_nm` -> (M, B)."""
  # One (B, L) interpolation matrix instead of a loop over spectra.
  eye = np.eye(src_nm.size)
  weights = np.stack([np.interp(dst_nm, src_nm, row) for row in eye], axis=1)  # (B, L)
  return spectra @ weights.T


def _check_range(source: str, lo: float, hi: float, dst_nm: np.ndarray) -> None:
  if dst_nm.min() < lo - 1e-6 or dst_nm.max() > hi + 1e-6:
    raise ValueError(
        f"the {source!r} spectra cover {lo:g}-{hi:g} nm but the scene asks for "
        f"{dst_nm.min():g}-{dst_nm.max():g} nm; narrow the wavelength range or use "
        f"source='generated' (any range) or 'usgs' (383-2508 nm)")


def colour_spectra(wavelengths_nm: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
  """(53, B) measured reflectances from colour-science, resampled to `wavelengths_nm`."""
  try:
    import colour  # pylint: disable=import-outside-toplevel
    from colour.quality import SDS_TCS, SDS_VS  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("source='colour' needs the colour-science package: "
                      "pip install colour-science (or use source='generated')") from e
  sets = {"ohta": colour.SDS_COLOURCHECKERS["ColorChecker N Ohta"],
          "tcs": SDS_TCS["CIE 1995"], "cqs": SDS_VS["NIST CQS 9.0"]}
  dst = np.asarray(wavelengths_nm, np.float64)
  lo = max(min(sd.wavelengths) for s in sets.values() for sd in s.values())
  hi = min(max(sd.wavelengths) for s in sets.values() for sd in s.values())
  _check_range("colour", lo, hi, dst)
  rows, names = [], []
  for set_name, sds in sets.items():
    for name, sd in sds.items():
      rows.append(np.interp(dst, np.asarray(sd.wavelengths), np.asarray(sd.values)))
      names.append(f"{set_name}:{name}")
  return np.stack(rows), tuple(names)


def usgs_spectra(wavelengths_nm: np.ndarray,
                 path: str | pathlib.Path | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
  """(560, B) USGS splib07 (AVIRIS-1995 convolved) reflectances, resampled."""
  path = pathlib.Path(path) if path else _SPECLIB
  if not path.is_file():
    raise FileNotFoundError(f"USGS spectral library {path} not found; pass its path or use "
                            f"source='colour' / 'generated'")
  with np.load(path) as f:
    spectra = np.asarray(f["spectra"], np.float64)
    src = np.asarray(f["wavelengths_nm"], np.float64)
    names = tuple(str(n).strip() for n in f["names"])
  dst = np.asarray(wavelengths_nm, np.float64)
  _check_range("usgs", src.min(), src.max(), dst)
  return _resample(spectra, src, dst), names


def generated_spectra(wavelengths_nm: np.ndarray, num: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, tuple[str, ...]]:
  """(num, B) smooth synthetic reflectances: continuum with an edge minus absorption bands."""
  lam = np.asarray(wavelengths_nm, np.float64)
  lo, hi = lam.min(), lam.max()
  span = max(hi - lo, 1.0)
  u = (lam - lo) / span  # (B,) in [0, 1]
  base = rng.uniform(0.05, 0.5, (num, 1))
  slope = rng.uniform(-0.2, 0.3, (num, 1))
  edge_height = rng.uniform(0.0, 0.45, (num, 1)) * (rng.random((num, 1)) < 0.6)
  edge_pos = rng.uniform(0.2, 0.8, (num, 1))
  edge_width = rng.uniform(0.01, 0.08, (num, 1))
  cont = base + slope * u + edge_height / (1 + np.exp(-(u - edge_pos) / edge_width))
  num_feat = 4
  depth = rng.uniform(0.0, 0.25, (num, num_feat, 1))
  centre = rng.uniform(0.0, 1.0, (num, num_feat, 1))
  width = rng.uniform(0.02, 0.12, (num, num_feat, 1))
  absorb = np.prod(1 - depth * np.exp(-0.5 * ((u - centre) / width) ** 2), axis=1)
  spectra = np.clip(cont * absorb, 0.02, 0.95)
  return spectra, tuple(f"generated:{i}" for i in range(num))


def library_spectra(wavelengths_nm: np.ndarray, source: str = "auto", *,
                    num_generated: int = 32, seed: int = 0,
                    speclib_path: str | pathlib.Path | None = None
                    ) -> tuple[np.ndarray, tuple[str, ...], str]:
  """(M, B) candidate endmembers, their names and the source actually used."""
  if source not in SOURCES:
    raise ValueError(f"unknown spectra source {source!r}; use one of {SOURCES}")
  dst = np.asarray(wavelengths_nm, np.float64)
  order = ("colour", "usgs", "generated") if source == "auto" else (source,)
  errors = []
  for s in order:
    try:
      if s == "colour":
        spectra, names = colour_spectra(dst)
      elif s == "usgs":
        spectra, names = usgs_spectra(dst, speclib_path)
      else:
        spectra, names = generated_spectra(dst, num_generated, np.random.default_rng(seed))
      return spectra, names, s
    except (ImportError, FileNotFoundError, ValueError) as e:
      if source != "auto":
        raise
      errors.append(f"{s}: {e}")
  raise RuntimeError("no spectra source worked: " + "; ".join(errors))  # unreachable


def smooth_abundances(rng: np.random.Generator, height: int, width: int, num: int, *,
                      length_scale: float = 4.0, sharpness: float = 4.0) -> np.ndarray:
  """(H, W, M) abundances: softmax over M of standardised Gaussian-smoothed white noise.

  `length_scale` is the smoothing sigma in pixels (region size); `sharpness` scales the
  fields before the softmax (large -> nearly pure pixels with thin mixed borders).
  """
  noise = rng.standard_normal((num, height, width))
  # Smooth each field in space only (sigma 0 along the endmember axis); wrap avoids edges.
  fields = ndimage.gaussian_filter(noise, sigma=(0, length_scale, length_scale), mode="wrap")
  fields = (fields - fields.mean(axis=(1, 2), keepdims=True)) / (
      fields.std(axis=(1, 2), keepdims=True) + 1e-12)
  logits = sharpness * np.moveaxis(fields, 0, -1)
  logits -= logits.max(axis=-1, keepdims=True)
  a = np.exp(logits)
  return a / a.sum(axis=-1, keepdims=True)


def make_scene(seed: int = 0, height: int = 128, width: int = 64, num_bands: int = 64, *,
               num_endmembers: int = 6,
               wavelengths_nm: Sequence[float] | np.ndarray = (400.0, 780.0),
               source: str = "auto", length_scale: float = 4.0, sharpness: float = 4.0,
               speclib_path: str | pathlib.Path | None = None) -> Scene:
  """A reproducible (H, W, B) scene in [0, 1] (max exactly 1) from `seed`.

  Args:
    wavelengths_nm: (start, stop) nm for `num_bands` evenly spaced bands, or (B,) centres.
  """
  if min(height, width) < 1 or num_endmembers < 1:
    raise ValueError(f"height, width and num_endmembers must be >= 1, got "
                     f"{height}, {width}, {num_endmembers}")
  wl = np.asarray(wavelengths_nm, np.float64)
  if wl.size == 2 and num_bands != 2:
    wl = band_wavelengths(num_bands, wl[0], wl[1])
  if wl.size != num_bands:
    raise ValueError(f"{wl.size} wavelengths given for num_bands={num_bands}; give (start, "
                     f"stop) or exactly num_bands centres")
  rng = np.random.default_rng(seed)
  library, names, used = library_spectra(wl, source, seed=seed, speclib_path=speclib_path)
  if num_endmembers > library.shape[0]:
    raise ValueError(f"num_endmembers={num_endmembers} but the {used!r} library has only "
                     f"{library.shape[0]} spectra; ask for fewer endmembers")
  pick = np.sort(rng.choice(library.shape[0], size=num_endmembers, replace=False))
  endmembers = library[pick]
  abundances = smooth_abundances(rng, height, width, num_endmembers,
                                 length_scale=length_scale, sharpness=sharpness)
  cube = abundances @ endmembers
  scale = cube.max()
  if not scale > 0:
    raise ValueError("the chosen spectra are all zero; pick another seed or source")
  return Scene(cube=(cube / scale).astype(np.float32),
               abundances=abundances.astype(np.float32),
               endmembers=(endmembers / scale).astype(np.float32),
               wavelengths_nm=wl.astype(np.float32),
               names=tuple(names[i] for i in pick),
               source=used)
