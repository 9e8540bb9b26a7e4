"""Images read by windows, so a scene larger than memory is never held whole.

    img = hsijax.windowed.open_image("lr_hsi.hdr")   # nothing is read yet
    img.shape, img.wavelengths_nm, img.windowed       # (H, W, B); True for ENVI, .npy,
                                                      # uncompressed (Geo)TIFF, HDF5 / .mat v7.3
    block = img[0:128, 256:384]                       # (128, 128, B) float32, NaN = no data
    s = stats(img)                                    # max, min, means, valid mask: by strips
    view = ImageView(img, fill=medians, scale=s.max, clip=True)  # computed per window
    pixels = sample_pixels(view, 262144, seed=0, valid=s.valid)  # (N, B), never the scene

An "image" here is anything with a 3-D `shape` that slices as `img[a:b]` / `img[a:b, c:d]`
to a NumPy (rows, cols, C) array: NumPy arrays, memory maps, h5py / zarr datasets, and the
two classes of this module. The SDP entry points (`hsijax.sdp.fuse`, `run_methods`,
`check_pair`, `scale_pair`) accept such images and read only windows of them when the solve
is windowed (`hsijax.tiling.map_tiles` slices its inputs window by window).

Formats that cannot be read by windows (.npz, MATLAB v5 .mat, compressed TIFF) are read
whole when first sliced (`img.windowed` is False), with the same values.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from hsijax import data

STRIP_BYTES = 64 * 2**20  # float32 bytes per strip of rows read by `stats` / `sample_pixels`


def is_lazy(x: Any) -> bool:
  """Whether `x` is an image read on demand (not a NumPy / JAX array in memory)."""
  return (not isinstance(x, (np.ndarray, jax.Array)) and hasattr(x, "shape")
          and hasattr(x, "__getitem__") and len(getattr(x, "shape", ())) == 3)


def as_image(x: Any) -> Any:
  """Lazy images as they are; anything else as a float32 NumPy array."""
  return x if is_lazy(x) else np.asarray(x, np.float32)


def load(x: Any) -> np.ndarray:
  """The whole image as a float32 NumPy array (reads a lazy image completely)."""
  return np.asarray(x[:] if is_lazy(x) else x, np.float32)


def _slices(key: Any, shape: tuple[int, ...]) -> tuple[slice, slice]:
  """(rows, cols) unit-step slices from img[...], img[a:b], img[a:b, c:d] (, :)."""
  if key is Ellipsis:
    key = ()
  key = key if isinstance(key, tuple) else (key,)
  if len(key) == 3 and key[2] in (Ellipsis, slice(None)):
    key = key[:2]
  key = tuple(slice(None) if k is Ellipsis else k for k in key)
  if len(key) > 2 or not all(isinstance(k, slice) for k in key):
    raise IndexError(f"windowed images support [rows] and [rows, cols] slices, got {key!r}")
  key = key + (slice(None),) * (2 - len(key))
  out = []
  for k, n in zip(key, shape[:2]):
    a, b, step = k.indices(n)
    if step != 1:
      raise IndexError("windowed images support unit-step slices only")
    out.append(slice(a, max(a, b)))
  return out[0], out[1]


class FileImage:
  """An (H, W, B) image in a file, read window by window (see `open_image`).

  Values are those of `hsijax.data.load_masked`: float32, ENVI `bbl` bad bands dropped,
  `reflectance scale factor` divided out, pixels with the file's no-data value or a
  non-finite value in any band NaN in every band.
  """
  ndim = 3
  dtype = np.dtype(np.float32)

  def __init__(self, shape, source: str, wavelengths_nm, *, read=None, store=None,
               array: np.ndarray | None = None):
    self.shape = tuple(int(v) for v in shape)
    self.source = source
    self.wavelengths_nm = wavelengths_nm
    self.windowed = read is not None
    self._read, self._store, self._array = read, store, array

  def __getitem__(self, key) -> np.ndarray:
    rows, cols = _slices(key, self.shape)
    if self._read is None:
      return self._array[rows, cols]
    try:
      raw = self._read(rows, cols)
    except Exception as e:  # noqa: BLE001  (library errors for corrupt files vary widely)
      raise ValueError(f"{self.source}: cannot read rows {rows.start}..{rows.stop} "
                       f"({type(e).__name__}: {e}); the file may be corrupt or "
                       "truncated") from e
    arr, invalid = data._values(raw, self._store)  # pylint: disable=protected-access
    bad = invalid.any(axis=-1)
    return np.where(bad[..., None], np.float32(np.nan), arr) if bad.any() else arr

  def __array__(self, dtype=None, copy=None):
    a = self[:]
    return a if dtype is None else a.astype(dtype)

  def __len__(self) -> int:
    return self.shape[0]

  def __repr__(self) -> str:
    return (f"FileImage({self.source!r}, shape={self.shape}, "
            f"{'windowed' if self.windowed else 'in memory'})")


def open_image(path: data.PathLike, key: str | None = None) -> FileImage:
  """Opens an (H, W, B) image file ("FILE[:KEY]", formats of `hsijax.data`) without reading it.

  ENVI (memory map of bsq / bil / bip), .npy (memory map), uncompressed (Geo)TIFF (memory
  map) and HDF5 / MATLAB v7.3 .mat (h5py) are read by windows; other formats are read
  whole here. Raises what `hsijax.data.load_cube` raises for a missing file, a wrong key or
  a non-3-D array.
  """
  # pylint: disable=protected-access
  store, name, source = data._locate(path, key, 3)
  shape = store.shapes[name]
  read = store.window(name) if store.window is not None and len(shape) == 3 else None
  if read is None:
    arr, _, wavelengths, source = data.load_masked(path, key, ndim=3)
    return FileImage(arr.shape, source, wavelengths, array=arr)
  probe = read(slice(0, 1), slice(0, 1))
  if not np.issubdtype(probe.dtype, np.number) or np.iscomplexobj(probe):
    raise ValueError(f"{source}: array has dtype {probe.dtype}; a real numeric array is needed")
  if store.good_bands is not None and not store.good_bands.all():
    import warnings  # pylint: disable=g-import-not-at-top
    warnings.warn(f"{source}: dropped {int((~store.good_bands).sum())} bad bands marked in "
                  f"the header's bbl (kept {int(store.good_bands.sum())})", stacklevel=2)
  return FileImage(shape, source, data._wavelengths(store, name), read=read, store=store)


class ImageView:
  """Another image's values computed per window: missing (NaN) pixels set to `fill` (C,),
  then with a number `scale` max(a, 0) / scale (`clip`; as `scale_pair`), or with an
  `offset` (C,) or per-band `scale` (C,) max((a - offset) / scale, 0) (as
  `blind.calibrate_msi`).

  The same float32 operations as on the whole array, so any window equals the same window
  of the transformed whole image, bit for bit.
  """
  ndim = 3
  dtype = np.dtype(np.float32)
  windowed = True

  def __init__(self, source: Any, *, fill: Any = None, offset: Any = None, scale: Any = 1.0,
               clip: bool = False):
    self.source, self.shape = source, tuple(source.shape)
    self.fill = None if fill is None else np.asarray(fill, np.float32)
    self.offset = None if offset is None else np.asarray(offset, np.float32)
    # A number stays a Python float (float32 / float -> float32, as `array / s`).
    self.scale = float(scale) if np.ndim(scale) == 0 else np.asarray(scale, np.float32)
    self.clip = bool(clip)

  def __getitem__(self, key) -> np.ndarray:
    a = np.asarray(self.source[_slices(key, self.shape)], np.float32)
    if self.fill is not None:
      bad = np.isnan(a).any(axis=-1)
      if bad.any():
        a = np.array(a)
        a[bad] = self.fill
    if self.offset is None and not np.ndim(self.scale):  # as `scale_pair`: max(y, 0) / s
      a = np.maximum(a, 0) if self.clip else a
      return a / self.scale if self.scale != 1.0 else a
    a = (a - (0 if self.offset is None else self.offset)) / self.scale
    return np.maximum(a, 0) if self.clip else a  # as `blind.calibrate_msi`

  def __array__(self, dtype=None, copy=None):
    a = self[:]
    return a if dtype is None else a.astype(dtype)

  def __len__(self) -> int:
    return self.shape[0]


def strip_rows(shape: tuple[int, ...], strip_bytes: int | None = None) -> int:
  """Rows per strip so that one float32 strip of an (H, W, C) image is about strip_bytes
  (None = STRIP_BYTES)."""
  strip_bytes = STRIP_BYTES if strip_bytes is None else strip_bytes
  return max(1, int(strip_bytes // (4 * max(1, shape[1] * shape[2]))))


def strips(img: Any, strip_bytes: int | None = None):
  """Yields (a, b, img[a:b] as float32) over the image in strips of rows."""
  rows = strip_rows(img.shape, strip_bytes)
  for a in range(0, img.shape[0], rows):
    b = min(a + rows, img.shape[0])
    yield a, b, np.asarray(img[a:b], np.float32)


class Stats(NamedTuple):
  """Summary of an image, over its finite values (`stats`)."""
  max: float                  # nan when no value is finite
  min: float
  positive_mean: float        # mean of max(x, 0)
  negatives: int              # values < 0
  nonfinite: int              # NaN / inf values
  first_nonfinite: tuple[int, int, int] | None
  valid: np.ndarray | None    # (H, W) True where every band is finite; None = every pixel


def stats(img: Any) -> Stats:
  """`Stats` of an image, computed strip by strip (cached on lazy images)."""
  cached = getattr(img, "_hsijax_stats", None)
  if cached is not None:
    return cached
  hi, lo, pos, count, neg, nonfinite, first = -np.inf, np.inf, 0.0, 0, 0, 0, None
  valid = np.ones(img.shape[:2], bool)
  for a, _, block in strips(img):
    finite = np.isfinite(block)
    n_bad = int(block.size - np.count_nonzero(finite))
    if n_bad:
      if first is None:
        r, c, k = (int(i) for i in np.argwhere(~finite)[0])
        first = (a + r, c, k)
      nonfinite += n_bad
      valid[a:a + block.shape[0]] = finite.all(axis=-1)
      block = block[finite]
    if block.size:
      hi, lo = max(hi, float(block.max())), min(lo, float(block.min()))
      pos += float(np.maximum(block, 0).sum(dtype=np.float64))
      neg += int(np.count_nonzero(block < 0))
      count += block.size
  out = Stats(max=hi if count else float("nan"), min=lo if count else float("nan"),
              positive_mean=pos / count if count else float("nan"), negatives=neg,
              nonfinite=nonfinite, first_nonfinite=first,
              valid=None if valid.all() else valid)
  if is_lazy(img):
    try:
      img._hsijax_stats = out  # pylint: disable=protected-access
    except AttributeError:  # e.g. h5py datasets: no attributes of ours
      pass
  return out


def sample_pixels(img: Any, max_pixels: int, *, seed: int = 0,
                  valid: np.ndarray | None = None) -> np.ndarray:
  """(N, C) pixels of an image with valid[r, c] True, read strip by strip.

  Every valid pixel, in row-major order (as `img[valid]`), when there are at most
  `max_pixels`; else each is kept with probability max_pixels / (valid pixels), so about
  max_pixels of them, spread over the whole scene (same seed, same pixels).
  """
  H, W = img.shape[:2]
  total = H * W if valid is None else int(np.count_nonzero(valid))
  if total == 0:
    raise ValueError("the image has no pixel with data in every band; check the file")
  p = min(1.0, int(max_pixels) / total)
  rng = np.random.default_rng(seed)
  out = []
  for a, b, block in strips(img):
    keep = np.ones((b - a, W), bool) if valid is None else valid[a:b].copy()
    if p < 1.0:
      keep &= rng.random((b - a, W)) < p
    out.append(block[keep])
  return np.concatenate(out)
