"""Atomic file writes: a temp file in the target folder, then os.replace.

A reader (or a restarted run) sees either the old file or the complete new one, never a
half-written one, even if the process is killed mid-write.
"""
from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Any, Callable


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Any], Any],
                 mode: str = "w") -> pathlib.Path:
  """Calls write_fn(file) on a temp file beside `path`, then renames it to `path`.

  Creates missing parent folders; on any error the temp file is removed and the previous
  `path` (if any) is left untouched.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, mode) as f:
      write_fn(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
  """Writes `text` to `path` atomically."""
  return atomic_write(path, lambda f: f.write(text))
