"""Host-side loaders for hyperspectral cubes and auxiliary arrays (NumPy).

Formats, chosen by file extension:
  .npz / .npy         numpy
  .mat                MATLAB v5 (scipy.io) and v7.3 (HDF5, via h5py; MATLAB
                      writes column-major, so axes are reversed on read)
  .h5 / .hdf5         HDF5 datasets in numpy order (MATLAB-written ones, marked by
                      their MATLAB_class attribute, are reversed like .mat v7.3)
  .tif / .tiff        GeoTIFF / TIFF (tifffile): the band axis is the one tifffile
                      reports as samples ("YXS" pixel-interleaved, "SYX" planar)
                      or channels; a stack of single-band pages is ambiguous and
                      needs "FILE.tif:bhw" (pages are bands) or "FILE.tif:hwb"
  .hdr (+ binary)     ENVI: header parsed here (samples, lines, bands, data
                      type, interleave bsq/bil/bip, byte order, header offset,
                      wavelength); the binary is found beside the header (or
                      pass the binary, its .hdr is found beside it)

Arrays are addressed by key ("FILE:KEY" strings, see `parse_path_key`). With
no key the only suitable array is used; when a file holds several, a key equal
to the file name (PaviaU.mat -> paviaU, KSC.mat -> KSC, ...) or one of
KNOWN_CUBE_KEYS is tried before giving up with the list of keys.
"""

from __future__ import annotations

import os
import pathlib
from typing import Callable, NamedTuple, Sequence
import warnings
import zipfile

import numpy as np

from hsijax.degrade import normalise_cube  # noqa: F401  (re-exported)

PathLike = str | os.PathLike

# Variable names of the usual public scene files, tried in this order when a
# file holds several 3-D arrays and no key is given.
KNOWN_CUBE_KEYS = (
    "paviaU", "pavia", "KSC", "indian_pines_corrected", "indian_pines", "salinas_corrected",
    "salinas", "Botswana", "houston", "Houston", "hsi", "HSI", "cube", "data", "img", "image",
    "dc", "DC", "X")
WAVELENGTH_KEYS = ("wavelengths_nm", "wavelength_nm", "wavelengths", "wavelength", "wl")

_SUPPORTED = ".npz, .npy, .mat (v5 and v7.3), .h5/.hdf5, .tif/.tiff, ENVI .hdr + binary"
_ENVI_DTYPES = {1: "u1", 2: "i2", 3: "i4", 4: "f4", 5: "f8", 12: "u2", 13: "u4", 14: "i8",
                15: "u8"}
_ENVI_BINARY_EXTS = ("", ".img", ".dat", ".raw", ".bsq", ".bil", ".bip", ".bin", ".envi")
_KEY_HINT = "pass one as FILE:KEY or --config.data.key=KEY"


class Cube(NamedTuple):
  """A hyperspectral cube as loaded from disk."""
  data: np.ndarray                   # float32 (H, W, B), source units
  wavelengths_nm: np.ndarray | None  # (B,) band centres in nm, if the file has them
  source: str                        # "path" or "path:key"


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------


def parse_path_key(spec: PathLike) -> tuple[str, str | None]:
  """Split "FILE:KEY" into (FILE, KEY); plain paths give (path, None).

  An existing file name containing ':' is kept whole, and a single letter
  before ':' (a Windows drive) is never taken as a file name.
  """
  spec = os.fspath(spec)
  if os.path.exists(spec) or ":" not in spec:
    return spec, None
  path, key = spec.rsplit(":", 1)
  if not path or not key or len(path) == 1 or "/" in key or "\\" in key:
    return spec, None
  return path, key


def load_array(path: PathLike, key: str | None = None, ndim: int | None = None) -> np.ndarray:
  """Load one numeric array as float32 (e.g. a (b, B) SRF or (N, B) pixels).

  Args:
    path: file, or "FILE:KEY" when `key` is None.
    key: array name inside the file (npz/mat); None picks the only array
      (with `ndim` dimensions, when given).
    ndim: required number of dimensions; singleton axes are squeezed to reach
      it (MATLAB stores vectors as (1, n)).

  Raises:
    FileNotFoundError, KeyError (unknown or ambiguous key), ValueError (wrong
    ndim, NaN/inf values, unreadable file).
  """
  arr, _, _ = _load(path, key, ndim)
  return arr


def load_cube(path: PathLike, key: str | None = None) -> Cube:
  """Load an (H, W, B) cube and, when the file has them, its band wavelengths.

  Wavelengths come from a `wavelengths_nm` / `wavelength(s)` array in the same
  npz/mat file or from an ENVI header; values below 10 are taken as
  micrometres and converted to nm. A wavelength list whose length differs
  from B is ignored with a warning.
  """
  data, wavelengths, source = _load(path, key, 3)
  if wavelengths is not None and wavelengths.shape != (data.shape[2],):
    warnings.warn(
        f"{source}: {wavelengths.size} wavelengths for {data.shape[2]} bands; ignoring them "
        "(give them with --config.data.wavelengths_nm=START:STOP if needed)", stacklevel=2)
    wavelengths = None
  return Cube(data=data, wavelengths_nm=wavelengths, source=source)


# ----------------------------------------------------------------------------
# Dispatch and key selection.
# ----------------------------------------------------------------------------


class _Store(NamedTuple):
  """Uniform view of a file: array shapes, a reader, optional wavelengths."""
  shapes: dict[str, tuple[int, ...]]
  read: Callable[[str], np.ndarray]
  single: bool                       # one unnamed array (tif, npy, ENVI)
  wavelengths: np.ndarray | None     # from the header (ENVI) or None
  kind: str
  nodata: float | None = None        # ENVI "data ignore value", TIFF GDAL_NODATA
  good_bands: np.ndarray | None = None  # ENVI "bbl": (B,) bool, False = bad band
  scale: float | None = None         # ENVI "reflectance scale factor": data / scale
  # window(name) -> read(rows: slice, cols: slice) -> (r, c, B) in the stored dtype, for
  # formats that can read a window without the rest (memory maps, HDF5); None otherwise.
  window: Callable[[str], Callable[[slice, slice], np.ndarray]] | None = None


def load_masked(path: PathLike, key: str | None = None, ndim: int | None = 3
                ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, str]:
  """(array, valid (H, W) bool or None, wavelengths or None, source) with no-data masked.

  Unlike `load_array`, pixels whose value in any band is the file's no-data value (ENVI
  "data ignore value", TIFF GDAL_NODATA) or NaN / inf are not an error: they are marked
  invalid (valid[r, c] = False) and set to NaN in the array. ENVI "bbl" bad bands are
  dropped and "reflectance scale factor" divided out, with a warning that says so.
  """
  arr, wavelengths, source, valid = _load(path, key, ndim, masked=True)
  return arr, valid, wavelengths, source


def _locate(path, key, ndim) -> tuple[_Store, str, str]:
  """(the opened file, the name of the array to read, "path[:name]" for messages)."""
  path = os.fspath(path)
  if key is None:
    path, key = parse_path_key(path)
  key = key or None
  store = _open(path, key)
  if store.kind == "TIFF" and key is not None and key.lower() in TIFF_LAYOUTS:
    key = None  # a layout, not an array name
  name = _select(store, path, key, ndim)
  return store, name, path if store.single else f"{path}:{name}"


def _load(path, key, ndim, masked: bool = False):
  store, name, source = _locate(path, key, ndim)
  shape = store.shapes[name]
  try:
    arr = np.asarray(store.read(name))
  except Exception as e:  # noqa: BLE001  (library errors for corrupt files vary widely)
    raise ValueError(f"{source}: cannot read the array ({type(e).__name__}: {e}); "
                     f"the {store.kind} file may be corrupt or truncated") from e
  if ndim is not None and arr.ndim != ndim:
    squeezed = np.squeeze(arr)
    arr = squeezed if squeezed.ndim == ndim else arr
  if ndim is not None and arr.ndim != ndim:
    raise ValueError(_ndim_message(source, name, shape, ndim))
  if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) or np.iscomplexobj(arr):
    raise ValueError(f"{source}: array has dtype {arr.dtype}; a real numeric array is needed")
  if store.good_bands is not None and arr.ndim == 3 and not store.good_bands.all():
    warnings.warn(f"{source}: dropped {int((~store.good_bands).sum())} bad bands marked "
                  f"in the header's bbl (kept {int(store.good_bands.sum())})", stacklevel=3)
  arr, invalid = _values(arr, store)
  bad = int(invalid.sum())
  valid = None
  if bad and masked and arr.ndim == 3:
    valid = ~invalid.any(axis=-1)
    arr = np.where(valid[..., None], arr, np.nan).astype(np.float32)
  elif bad:
    what = (f"no-data values ({store.nodata}) or NaN/inf" if store.nodata is not None
            else "NaN/inf values")
    raise ValueError(
        f"{source}: {bad} {what} out of {arr.size} (missing data); fix the file (e.g. "
        "np.nan_to_num, or interpolate / drop the bad bands or pixels) and load it again")
  wavelengths = _wavelengths(store, name)
  if masked:
    return arr, wavelengths, source, valid
  return arr, wavelengths, source


def _wavelengths(store: _Store, name: str) -> np.ndarray | None:
  """Band centres in nm of array `name`: from the header (ENVI) or a wavelength array beside
  it (npz / mat / HDF5), bbl bad bands dropped; None when the file has none."""
  wavelengths = store.wavelengths
  if wavelengths is None and not store.single:
    wl_name = _find_key(store.shapes, WAVELENGTH_KEYS)
    if wl_name is not None and wl_name != name:
      wavelengths = np.asarray(store.read(wl_name), np.float64).ravel()
  if wavelengths is not None:
    wavelengths = _to_nm(wavelengths)
    if store.good_bands is not None and wavelengths.size == store.good_bands.size:
      wavelengths = wavelengths[store.good_bands]
  return wavelengths


def _values(arr: np.ndarray, store: _Store) -> tuple[np.ndarray, np.ndarray]:
  """Stored values as float32 (bbl bad bands dropped, reflectance scale factor divided out)
  and where they are missing (non-finite or the no-data value); whole arrays and windows."""
  arr = arr.astype(np.float32, copy=False)
  if store.good_bands is not None and arr.ndim == 3 and not store.good_bands.all():
    arr = arr[..., store.good_bands]
  if store.scale:
    arr = arr / np.float32(store.scale)
  invalid = ~np.isfinite(arr)
  if store.nodata is not None:
    invalid |= arr == np.float32(store.nodata / (store.scale or 1.0))
  return arr, invalid


def _ndim_message(source, name, shape, ndim):
  what = {1: "a vector (n,)", 2: "a matrix, e.g. (N, B) pixels or a (b, B) SRF",
          3: "a cube (H, W, B)"}.get(ndim, f"a {ndim}-D array")
  fix = ("; a 2-D (H, W) array is a single band or a label map, not a hyperspectral cube: "
         "check the file and key" if ndim == 3 and len(shape) == 2 else "")
  return (f"{source}: array {name!r} has shape {tuple(shape)} ({len(shape)}-D) but {what} "
          f"is needed{fix}")


def _find_key(shapes, candidates):
  lower = {k.lower(): k for k in shapes}
  for c in candidates:
    if c in shapes:
      return c
    if c.lower() in lower:
      return lower[c.lower()]
  return None


def _listing(shapes):
  return ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items()) or "(none)"


def _select(store: _Store, path: str, key: str | None, ndim: int | None) -> str:
  """Name of the array to read; raises KeyError / ValueError with the listing."""
  shapes = store.shapes
  if store.single:
    name = next(iter(shapes))
    if key is not None:
      raise KeyError(
          f"{path}: a {store.kind} file holds a single array {tuple(shapes[name])} and has no "
          f"keys, but key {key!r} was given; drop ':{key}' / --config.data.key")
    return name
  if not shapes:
    raise ValueError(f"{path}: no numeric arrays found in this {store.kind} file")
  if key is not None:
    if key in shapes:
      return key
    matches = [k for k in shapes if k.lower() == key.lower()]
    if len(matches) == 1:
      return matches[0]
    raise KeyError(
        f"{path}: no array named {key!r}; available: {_listing(shapes)}; {_KEY_HINT} "
        f"(e.g. {path}:{next(iter(shapes))})")
  data_keys = {k: v for k, v in shapes.items() if k.lower() not in WAVELENGTH_KEYS}
  fitting = {k: v for k, v in data_keys.items() if ndim is None or len(v) == ndim}
  if not fitting and ndim is not None:
    # Allow MATLAB-style singleton axes, e.g. (1, n) for a vector.
    fitting = {k: v for k, v in data_keys.items()
               if len([d for d in v if d != 1]) == ndim}
  if len(fitting) == 1:
    return next(iter(fitting))
  if not fitting:
    if len(data_keys) == 1:
      name = next(iter(data_keys))
      raise ValueError(_ndim_message(f"{path}:{name}", name, data_keys[name], ndim))
    raise KeyError(
        f"{path}: no {ndim}-D array among {_listing(shapes)}; {_KEY_HINT}")
  stem = pathlib.Path(path).stem
  preferred = _find_key(fitting, (stem,) + KNOWN_CUBE_KEYS)
  if preferred is not None:
    return preferred
  raise KeyError(
      f"{path}: several candidate arrays: {_listing(fitting)}; {_KEY_HINT} "
      f"(e.g. {path}:{next(iter(fitting))})")


def _to_nm(wl: np.ndarray) -> np.ndarray:
  wl = np.asarray(wl, np.float64).ravel()
  if wl.size and np.nanmax(wl) < 10.0:  # micrometres
    wl = wl * 1000.0
  return wl


def _open(path: str, key: str | None = None) -> _Store:
  p = pathlib.Path(path)
  suffix = p.suffix.lower()
  envi_header = _envi_header_for(p)
  if not p.is_file() and envi_header is None:
    raise FileNotFoundError(f"file not found: {path} (working directory {os.getcwd()})")
  openers = {".npz": _open_npz, ".npy": _open_npy, ".mat": _open_mat, ".tif": _open_tiff,
             ".tiff": _open_tiff, ".h5": _open_h5, ".hdf5": _open_h5, ".he5": _open_h5}
  if suffix in openers:
    opener, kind = openers[suffix], suffix.lstrip(".")
  elif envi_header is not None:
    opener, kind = _open_envi, "ENVI"
  else:
    raise ValueError(f"{path}: unsupported file type {suffix or '(no extension)'!r}; "
                     f"supported: {_SUPPORTED}")
  try:
    if opener is _open_tiff:
      return opener(p, key.lower() if key and key.lower() in TIFF_LAYOUTS else None)
    return opener(p)
  except (FileNotFoundError, KeyError):
    raise
  except _FormatError as e:
    raise ValueError(f"{path}: {e}") from e
  except Exception as e:  # noqa: BLE001  (library errors for corrupt files vary widely)
    raise ValueError(f"{path}: cannot read as a {kind} file ({type(e).__name__}: {e}); "
                     "is it complete and really in that format?") from e


class _FormatError(Exception):
  """A problem found while parsing a file (message completed by _open)."""


# ----------------------------------------------------------------------------
# Format readers.
# ----------------------------------------------------------------------------


def _open_npz(p: pathlib.Path) -> _Store:
  shapes = {}
  with zipfile.ZipFile(p) as zf:  # headers only: no array is read here
    for member in zf.namelist():
      if not member.endswith(".npy"):
        continue
      with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
        shape, _, dtype = reader(f)
      if dtype.kind in "biuf":
        shapes[member[:-4]] = tuple(shape)

  def read(name):
    with np.load(p, allow_pickle=False) as f:
      return f[name]
  return _Store(shapes, read, False, None, "npz")


def _open_npy(p: pathlib.Path) -> _Store:
  arr = np.load(p, mmap_mode="r", allow_pickle=False)

  def window(_):
    def read(rows, cols):  # a fresh map per read: pages read are not kept mapped
      return np.array(np.load(p, mmap_mode="r", allow_pickle=False)[rows, cols])
    return read
  return _Store({p.stem: arr.shape}, lambda _: np.asarray(arr), True, None, "npy",
                window=window if arr.ndim == 3 else None)


def _open_mat(p: pathlib.Path) -> _Store:
  import h5py  # pylint: disable=g-import-not-at-top
  if h5py.is_hdf5(p):
    return _open_mat73(p)
  import scipy.io  # pylint: disable=g-import-not-at-top
  numeric = {"double", "single", "int8", "uint8", "int16", "uint16", "int32", "uint32",
             "int64", "uint64", "logical"}
  shapes = {name: tuple(shape) for name, shape, cls in scipy.io.whosmat(p) if cls in numeric}

  def read(name):
    return scipy.io.loadmat(p, variable_names=[name])[name]
  return _Store(shapes, read, False, None, "MATLAB v5 .mat")


def _open_mat73(p: pathlib.Path, kind: str = "MATLAB v7.3 (HDF5) .mat") -> _Store:
  """HDF5 (.mat v7.3, .h5, .hdf5). Datasets MATLAB wrote (they carry a MATLAB_class
  attribute) are column-major, so their axes are reversed; others (h5py, numpy order) are
  read as stored."""
  import h5py  # pylint: disable=g-import-not-at-top
  shapes, matlab = {}, {}
  with h5py.File(p, "r") as f:
    for name, item in f.items():
      if name.startswith("#") or not isinstance(item, h5py.Dataset):
        continue  # MATLAB's reference storage, structs and cells
      if item.dtype.kind in "biuf":
        # MATLAB is column-major: a MATLAB (H, W, B) array is stored (B, W, H).
        matlab[name] = "MATLAB_class" in item.attrs
        shapes[name] = tuple(reversed(item.shape)) if matlab[name] else tuple(item.shape)

  def read(name):
    with h5py.File(p, "r") as f:
      a = f[name][()]
    return np.transpose(a) if matlab[name] else a

  def window(name):
    if len(shapes[name]) != 3:
      return None

    def read_window(rows, cols):
      with h5py.File(p, "r") as f:
        if matlab[name]:  # stored (B, W, H)
          return np.transpose(f[name][:, cols, rows])
        return f[name][rows, cols, :]
    return read_window
  return _Store(shapes, read, False, None, kind, window=window)


def _open_h5(p: pathlib.Path) -> _Store:
  return _open_mat73(p, "HDF5")


TIFF_LAYOUTS = ("hwb", "bhw")


def _open_tiff(p: pathlib.Path, layout: str | None = None) -> _Store:
  import tifffile  # pylint: disable=g-import-not-at-top
  with tifffile.TiffFile(p) as tif:
    series = tif.series[0]
    shape, axes = tuple(series.shape), series.axes
    # Uncompressed, contiguous data can be memory-mapped and read by windows.
    offset = series.dataoffset
    stored = np.dtype(series.dtype).newbyteorder(tif.byteorder)
    tag = tif.pages[0].tags.get(42113)  # GDAL_NODATA, an ASCII number
    nodata = None
    if tag is not None:
      try:
        nodata = float(str(tag.value).strip("\x00 "))
      except ValueError:
        nodata = None
  shape_in = shape
  order = (0, 1, 2)
  if len(shape) == 3:
    order = _band_last_order(p, shape, axes, layout)
    shape = tuple(shape[i] for i in order)

  def read(_):
    arr = tifffile.imread(p)
    if arr.shape != shape_in:
      raise ValueError(f"first image series has shape {shape_in}, read {arr.shape}")
    return np.transpose(arr, order) if arr.ndim == 3 else arr

  def window(_):
    def read_window(rows, cols):
      mm = np.memmap(p, dtype=stored, mode="r", offset=offset, shape=shape_in)
      return np.transpose(mm, order)[rows, cols].astype(stored.newbyteorder("="))
    return read_window
  lazy = offset is not None and len(shape) == 3
  return _Store({p.stem: shape}, read, True, None, "TIFF", nodata,
                window=window if lazy else None)


def _band_last_order(p: pathlib.Path, shape, axes: str, layout: str | None
                     ) -> tuple[int, int, int]:
  """Axis order that puts the bands last, from the axes tifffile reports.

  "S" (samples: pixel-interleaved "YXS" or planar "SYX") and "C" (channels) are the band
  axis. A stack of single-sample pages ("QYX", "IYX", "ZYX") is ambiguous: the pages may be
  bands, or the rows of an (H, W, B) array that was written without a samples axis; then the
  caller must say which (`layout`, "FILE.tif:hwb" or "FILE.tif:bhw").
  """
  if layout is not None:
    return (0, 1, 2) if layout == "hwb" else (1, 2, 0)
  axes = axes.upper()
  for band_axis in "SC":
    if len(axes) == 3 and axes.count(band_axis) == 1 and "Y" in axes and "X" in axes:
      band = axes.index(band_axis)
      return tuple(i for i in range(3) if i != band) + (band,)
  raise _FormatError(
      f"the TIFF stores {shape[0]} pages of {shape[1]} x {shape[2]} single-band images "
      f"(tifffile axes {axes!r}), so its layout is ambiguous: the pages may be the bands "
      f"(a band-sequential stack: {shape[0]} bands of {shape[1]} x {shape[2]}) or the rows of "
      f"an (H, W, B) = {shape} array written without a samples axis. Say which by appending "
      f"it to the path: {p.name}:bhw (pages are bands) or {p.name}:hwb (the array as tifffile "
      "reads it is rows x columns x bands); or rewrite the file with "
      "tifffile.imwrite(path, cube_hwb, photometric='minisblack', planarconfig='contig')")


def _envi_header_for(p: pathlib.Path) -> pathlib.Path | None:
  if p.suffix.lower() == ".hdr":
    return p if p.is_file() else None
  for candidate in (p.with_name(p.name + ".hdr"), p.with_suffix(".hdr")):
    if candidate != p and candidate.is_file():
      return candidate
  return None


def is_envi(path: PathLike) -> bool:
  """Whether `path` is an ENVI header or a binary with a header beside it."""
  return _envi_header_for(pathlib.Path(path)) is not None


def read_envi_header(path: PathLike) -> dict[str, str]:
  """Parse an ENVI header into {lower-case field: raw value} ({...} kept, unwrapped)."""
  text = pathlib.Path(path).read_text(encoding="latin-1")
  if not text.lstrip().startswith("ENVI"):
    raise _FormatError("not an ENVI header (first line must be 'ENVI')")
  fields, lines, i = {}, text.splitlines()[1:], 0
  while i < len(lines):
    line = lines[i]
    i += 1
    if "=" not in line:
      continue
    name, value = (s.strip() for s in line.split("=", 1))
    if value.startswith("{"):
      while "}" not in value and i < len(lines):  # multi-line {...} values
        value += " " + lines[i].strip()
        i += 1
    fields[name.lower()] = value
  return fields


def _envi_list(value: str) -> list[str]:
  return [s.strip() for s in value.strip().strip("{}").split(",") if s.strip()]


def _open_envi(p: pathlib.Path) -> _Store:
  header = _envi_header_for(p)
  if p.suffix.lower() != ".hdr" and not p.is_file():
    raise FileNotFoundError(f"ENVI data file not found: {p} (its header {header} exists)")
  fields = read_envi_header(header)
  binary = p if p.suffix.lower() != ".hdr" else _envi_binary_for(header, fields)
  try:
    samples, lines, bands = (int(fields[k]) for k in ("samples", "lines", "bands"))
  except KeyError as e:
    raise _FormatError(f"ENVI header {header} lacks the required field {e}") from e
  code = int(fields.get("data type", "4"))
  if code not in _ENVI_DTYPES:
    raise _FormatError(f"ENVI data type {code} (complex or unknown) is not supported; "
                       f"supported codes: {sorted(_ENVI_DTYPES)}")
  order = ">" if fields.get("byte order", "0").strip() == "1" else "<"
  dtype = np.dtype(order + _ENVI_DTYPES[code])
  offset = int(fields.get("header offset", "0"))
  interleave = fields.get("interleave", "bsq").strip().lower()
  layouts = {"bsq": ((bands, lines, samples), (1, 2, 0)),
             "bil": ((lines, bands, samples), (0, 2, 1)),
             "bip": ((lines, samples, bands), (0, 1, 2))}
  if interleave not in layouts:
    raise _FormatError(f"unknown ENVI interleave {interleave!r}; expected bsq, bil or bip")
  stored_shape, to_hwb = layouts[interleave]
  expected = offset + lines * samples * bands * dtype.itemsize
  size = binary.stat().st_size
  if size < expected:
    raise _FormatError(
        f"ENVI binary {binary} has {size} bytes but the header ({lines} lines x {samples} "
        f"samples x {bands} bands of {dtype}, offset {offset}) needs {expected}: the file is "
        "truncated or the header does not match it")
  wavelengths = None
  if "wavelength" in fields:
    wavelengths = np.array([float(v) for v in _envi_list(fields["wavelength"])])
    units = fields.get("wavelength units", "").lower()
    if units.startswith("micro") or units in ("um", "µm"):
      wavelengths = wavelengths * 1000.0

  nodata = float(fields["data ignore value"]) if "data ignore value" in fields else None
  good = None
  if "bbl" in fields:
    good = np.array([float(v) != 0 for v in _envi_list(fields["bbl"])])
    if good.size != bands:
      raise _FormatError(f"bbl lists {good.size} bands but the header says bands = {bands}")
  scale = float(fields["reflectance scale factor"]) if "reflectance scale factor" in fields \
      else None
  if scale is not None and not scale > 0:
    raise _FormatError(f"reflectance scale factor {scale} must be > 0")

  def read(_):
    raw = np.fromfile(binary, dtype=dtype, count=lines * samples * bands, offset=offset)
    return np.transpose(raw.reshape(stored_shape), to_hwb).astype(dtype.newbyteorder("="))

  def window(_):
    def read_window(rows, cols):  # a fresh map per read: pages read are not kept mapped
      mm = np.memmap(binary, dtype=dtype, mode="r", offset=offset, shape=stored_shape)
      return np.transpose(mm, to_hwb)[rows, cols].astype(dtype.newbyteorder("="))
    return read_window
  kept = bands if good is None else int(good.sum())
  return _Store({binary.name: (lines, samples, kept)}, read, True, wavelengths, "ENVI",
                nodata, good, scale, window)


def _envi_binary_for(header: pathlib.Path, fields: dict[str, str]) -> pathlib.Path:
  named = fields.get("data file", "").strip("{} ")
  candidates = [header.with_name(named)] if named else []
  stem = header.with_suffix("")  # scene.img.hdr -> scene.img ; scene.hdr -> scene
  candidates += [stem.with_name(stem.name + ext) for ext in _ENVI_BINARY_EXTS]
  for c in candidates:
    if c.is_file() and c != header:
      return c
  raise FileNotFoundError(
      f"ENVI header {header}: binary data file not found (tried "
      f"{', '.join(c.name for c in candidates)}); put the data file beside the header "
      "with the same base name, or pass the data file's path")


__all__ = ["Cube", "KNOWN_CUBE_KEYS", "load_array", "load_cube", "load_masked", "normalise_cube",
           "parse_path_key", "read_envi_header"]


# ----------------------------------------------------------------------------
# Writers (atomic: a temp file beside the target, then a rename).
# ----------------------------------------------------------------------------

# GeoTIFF georeferencing tags: ModelPixelScale, ModelTiepoint, ModelTransformation,
# GeoKeyDirectory, GeoDoubleParams, GeoAsciiParams (and GDAL's metadata / nodata).
GEO_TAGS = (33550, 33922, 34264, 34735, 34736, 34737, 42112)


def geotiff_tags(path: PathLike) -> list[tuple]:
  """The georeferencing tags of a (Geo)TIFF as tifffile `extratags` ([] if none)."""
  import tifffile  # pylint: disable=g-import-not-at-top
  path, _ = parse_path_key(path)
  if pathlib.Path(path).suffix.lower() not in (".tif", ".tiff"):
    return []
  out = []
  with tifffile.TiffFile(path) as tif:
    for code in GEO_TAGS:
      tag = tif.pages[0].tags.get(code)
      if tag is not None:
        value = tag.value
        count = len(value) if isinstance(value, (tuple, list)) else (
            len(value) + 1 if isinstance(value, str) else 1)
        out.append((code, tag.dtype, count, value, True))
  return out


def write_geotiff(path: PathLike, cube, extratags: Sequence[tuple] = (),
                  nodata: float | None = None) -> pathlib.Path:
  """Writes an (H, W, B) cube as a band-first (B, H, W) float32 planar GeoTIFF.

  `extratags` (e.g. `geotiff_tags(hr_msi_path)`) carry the georeferencing; NaN pixels are
  written as `nodata` (GDAL_NODATA) when given. Band by band, so a memory-mapped cube is
  never read whole.
  """
  import tifffile  # pylint: disable=g-import-not-at-top
  from hsijax import fileio  # pylint: disable=g-import-not-at-top
  h, w, b = cube.shape
  tags = [t for t in extratags if t[0] != 42113]
  if nodata is not None:
    tags.append((42113, "s", 0, f"{nodata:g}", True))

  def bands():
    for k in range(b):
      band = np.asarray(cube.band(k) if hasattr(cube, "band") else cube[:, :, k], np.float32)
      yield band if nodata is None else np.where(np.isnan(band), np.float32(nodata), band)

  with fileio.atomic_path(path) as tmp:
    if tmp is not None:
      tifffile.imwrite(tmp, data=bands(), shape=(b, h, w), dtype=np.float32,
                       photometric="minisblack", planarconfig="separate", extratags=tags,
                       metadata=None)
  return pathlib.Path(path)


def write_envi(path: PathLike, cube, wavelengths_nm=None,
               nodata: float | None = None) -> pathlib.Path:
  """Writes an (H, W, B) cube as ENVI band-sequential float32 (`path`.img + `path`.hdr,
  `path` without extension), with its wavelengths and `data ignore value` for NaN pixels."""
  from hsijax import fileio  # pylint: disable=g-import-not-at-top
  base = pathlib.Path(path).with_suffix("")
  h, w, b = cube.shape

  def write_bands(f):
    for k in range(b):
      band = np.asarray(cube.band(k) if hasattr(cube, "band") else cube[:, :, k], np.float32)
      if nodata is not None:
        band = np.where(np.isnan(band), np.float32(nodata), band)
      f.write(band.astype("<f4").tobytes())

  fileio.atomic_write(base.with_suffix(".img"), write_bands, mode="wb", process0_only=True)
  lines = ["ENVI", "description = {hsijax fused image}", f"samples = {w}", f"lines = {h}",
           f"bands = {b}", "header offset = 0", "file type = ENVI Standard",
           "data type = 4", "interleave = bsq", "byte order = 0"]
  if nodata is not None:
    lines.append(f"data ignore value = {nodata:g}")
  if wavelengths_nm is not None:
    lines += ["wavelength units = Nanometers",
              "wavelength = {" + ", ".join(f"{v:g}" for v in np.ravel(wavelengths_nm)) + "}"]
  return fileio.write_text(base.with_suffix(".hdr"), "\n".join(lines) + "\n")
