"""Writing results: atomic, process 0 only, readable under the user's umask.

Every writer puts the data into a temp file beside the target and renames it into place, so a
reader (or a restarted run) sees either the old file or the complete new one, never a
half-written one, even if the process is killed mid-write. The file then gets the mode a plain
`open(path, "w")` would give (0666 minus the umask), not the temp file's 0600. On several
hosts only process 0 writes.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
import zipfile
from typing import Any, Callable, Iterator

import jax
import numpy as np


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Any], Any],
                 mode: str = "w", process0_only: bool = False) -> pathlib.Path:
  """Calls write_fn(file) on a temp file beside `path`, then renames it to `path`.

  Creates missing parent folders; on any error the temp file is removed and the previous
  `path` (if any) is left untouched. process0_only: skip on every process but 0.
  """
  with atomic_path(path, process0_only) as tmp:
    if tmp is not None:
      with open(tmp, mode) as f:
        write_fn(f)
  return pathlib.Path(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, process0_only: bool = True) -> Iterator[str | None]:
  """Yields a temp file name beside `path` for writers that need a path (tifffile, ...);
  renamed to `path` when the block succeeds, removed when it fails. None on processes other
  than 0 (they write nothing)."""
  path = pathlib.Path(path)
  if process0_only and jax.process_index() != 0:
    yield None
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def to_builtin(obj: Any) -> Any:
  """Numpy / JAX scalars and arrays, tuples and paths as JSON-serialisable Python values.

  Non-finite floats become the strings "inf", "-inf" and "nan" (strict JSON has no Infinity;
  PSNR of identical images is +inf).
  """
  if isinstance(obj, float) and not np.isfinite(obj):
    return str(obj)
  if isinstance(obj, dict):
    return {str(k): to_builtin(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_builtin(v) for v in obj]
  if isinstance(obj, (np.ndarray, jax.Array)):
    arr = np.asarray(obj)
    return to_builtin(arr.item()) if arr.ndim == 0 else to_builtin(arr.tolist())
  if isinstance(obj, np.generic):
    return to_builtin(obj.item())
  if isinstance(obj, pathlib.PurePath):
    return str(obj)
  return obj


def write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
  """Writes `text` atomically (process 0 only)."""
  return atomic_write(path, lambda f: f.write(text), process0_only=True)


def write_json(path: str | os.PathLike, obj: Any) -> pathlib.Path:
  """Writes `obj` as indented strict JSON atomically (process 0 only)."""
  text = json.dumps(to_builtin(obj), indent=2, allow_nan=False)
  return write_text(path, text + "\n")


def save_npz(path: str | os.PathLike, **arrays: Any) -> pathlib.Path:
  """np.savez atomically (process 0 only); `BandFile` values are streamed by rows, so a
  scene larger than memory is never read whole."""
  def write(f):
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
      for name, value in arrays.items():
        with zf.open(f"{name}.npy", "w", force_zip64=True) as entry:
          if isinstance(value, BandFile):
            np.lib.format.write_array_header_2_0(entry, {
                "descr": np.lib.format.dtype_to_descr(value.dtype), "fortran_order": False,
                "shape": value.shape})
            for _, _, rows in value.row_blocks():
              entry.write(rows.tobytes())
          else:
            np.lib.format.write_array(entry, np.asarray(value), allow_pickle=False)
  return atomic_write(path, write, mode="wb", process0_only=True)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> pathlib.Path:
  """Saves a matplotlib figure as PNG atomically (process 0 only) and closes it."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  try:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"),
                 mode="wb", process0_only=True)
  finally:
    plt.close(fig)
  return pathlib.Path(path)


class BandFile:
  """An (H, W, B) float32 image kept on disk band-sequentially ((B, H, W), raw), written and
  read by rows with positioned reads and writes: no memory map, so a scene larger than
  memory never counts towards the process's resident memory.

    store = BandFile.create(path, (H, W, B))
    store[a:b] = rows                 # (b - a, W, B), e.g. `tiling.map_tiles(out=store)`
    rows = store[a:b]                 # (b - a, W, B)
    band = store.band(k)              # (H, W), one contiguous read
  """

  def __init__(self, path: str | os.PathLike, shape: tuple[int, int, int], mode: str = "r+b"):
    self.path = pathlib.Path(path)
    self.shape = tuple(int(v) for v in shape)
    self.dtype = np.dtype(np.float32)
    self.ndim = 3
    self._f = open(self.path, mode)  # pylint: disable=consider-using-with

  @classmethod
  def create(cls, path: str | os.PathLike, shape: tuple[int, int, int]) -> "BandFile":
    with open(path, "wb") as f:
      f.truncate(4 * int(np.prod(shape)))
    return cls(path, shape)

  def _rows(self, key) -> tuple[int, int]:
    H = self.shape[0]
    if key is Ellipsis:
      return 0, H
    if isinstance(key, slice) and key.step in (None, 1):
      a, b, _ = key.indices(H)
      return a, max(a, b)
    raise IndexError("BandFile supports row slices [a:b] and [...] only")

  def __setitem__(self, key, rows) -> None:
    a, b = self._rows(key)
    H, W, B = self.shape
    rows = np.broadcast_to(np.asarray(rows, np.float32), (b - a, W, B))
    for k in range(B):
      os.pwrite(self._f.fileno(), np.ascontiguousarray(rows[:, :, k]).tobytes(),
                4 * (k * H * W + a * W))

  def __getitem__(self, key) -> np.ndarray:
    a, b = self._rows(key)
    H, W, B = self.shape
    out = np.empty((b - a, W, B), np.float32)
    for k in range(B):
      out[:, :, k] = np.frombuffer(os.pread(self._f.fileno(), 4 * (b - a) * W,
                                            4 * (k * H * W + a * W)),
                                   np.float32).reshape(b - a, W)
    return out

  def band(self, k: int) -> np.ndarray:
    H, W, _ = self.shape
    return np.frombuffer(os.pread(self._f.fileno(), 4 * H * W, 4 * k * H * W),
                         np.float32).reshape(H, W)

  def row_blocks(self, rows: int = 64):
    """Yields (a, b, self[a:b]) over the whole image in blocks of `rows` rows."""
    for a in range(0, self.shape[0], rows):
      b = min(a + rows, self.shape[0])
      yield a, b, self[a:b]

  def close(self) -> None:
    self._f.close()

  def __len__(self) -> int:
    return self.shape[0]
