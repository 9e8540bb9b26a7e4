"""Writing results: atomic, process 0 only, readable under the user's umask.

Every writer puts the data into a temp file beside the target and renames it into place, so a
reader (or a restarted run) sees either the old file or the complete new one, never a
half-written one, even if the process is killed mid-write. The file then gets the mode a plain
`open(path, "w")` would give (0666 minus the umask), not the temp file's 0600. On several
hosts only process 0 writes.
"""
from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any, Callable

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
  path = pathlib.Path(path)
  if process0_only and jax.process_index() != 0:
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, mode) as f:
      write_fn(f)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


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
  """np.savez atomically (process 0 only)."""
  host = {k: np.asarray(v) for k, v in arrays.items()}
  return atomic_write(path, lambda f: np.savez(f, **host), mode="wb", process0_only=True)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> pathlib.Path:
  """Saves a matplotlib figure as PNG atomically (process 0 only) and closes it."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  try:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"),
                 mode="wb", process0_only=True)
  finally:
    plt.close(fig)
  return pathlib.Path(path)
