"""What every `python -m launch.<name>` shares: flags, workdir, input files, tables."""
from __future__ import annotations

import contextlib
import logging
import os
import pathlib
from typing import Any

import jax
import numpy as np
from absl import logging as absl_logging

from hsijax import data, fileio, sharding, windowed
from hsijax import workdir as workdir_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
# Writers shared with the library (atomic, process 0 only, umask modes).
write_json, write_text, save_npz, save_figure = (fileio.write_json, fileio.write_text,
                                                 fileio.save_npz, fileio.save_figure)
to_builtin = fileio.to_builtin


def setup(workdir: str | os.PathLike | None) -> pathlib.Path:
  """Multi-host init, creates `workdir`, and quietens library logs; returns the path."""
  sharding.initialize_distributed()
  path = workdir_lib.resolve(workdir)
  path.mkdir(parents=True, exist_ok=True)
  # The entry points print their own progress; library INFO logs (backend probing, Orbax)
  # would bury it.
  absl_logging.set_verbosity(absl_logging.WARNING if jax.process_index() == 0 else
                             absl_logging.ERROR)
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  return path


def log(msg: str) -> None:
  """Prints on process 0 only (so multi-host runs print once)."""
  if jax.process_index() == 0:
    print(msg, flush=True)


@contextlib.contextmanager
def naming(flag: str, spec: str):
  """Re-raises a reader's error with the flag and value that led to it."""
  try:
    yield
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise type(e)(f"{flag}={spec}: {e}") from e


MEDIAN_PIXELS = 2**20  # pixels whose band medians fill no-data pixels (all, when fewer)


def open_image(spec: str, flag: str) -> tuple[Any, np.ndarray | None, Any]:
  """An (H, W, C) image FILE[:KEY] opened to be read by windows (`hsijax.windowed`; formats
  that cannot be are read whole), its valid-pixel mask (None when every pixel is valid) and
  its band wavelengths (or None). No-data pixels (ENVI data ignore value, TIFF nodata, NaN)
  read as each band's median over the valid pixels (of up to MEDIAN_PIXELS spread over the
  image) and are reported, not an error."""
  if not spec:
    raise ValueError(f"{flag} is empty; pass {flag}=FILE[:KEY]")
  path, key = data.parse_path_key(spec)
  with naming(flag, spec):
    img = windowed.open_image(path, key)
    valid = windowed.stats(img).valid
  if valid is None:
    return img, None, img.wavelengths_nm
  if not valid.any():
    raise ValueError(f"{flag}={spec}: every pixel has no data; check the file")
  log(f"{img.source}: {int((~valid).sum())} of {valid.size} pixels have no data; they are "
      "filled for the solve, left out of training and marked NaN in the output")
  fill = np.median(windowed.sample_pixels(img, MEDIAN_PIXELS, valid=valid), axis=0)
  return windowed.ImageView(img, fill=fill), valid, img.wavelengths_nm


def load_input(spec: str, flag: str, ndim: tuple[int, ...] = (3,),
               default_key: str | None = None) -> np.ndarray:
  """FILE[:KEY] as float32, with errors that name the flag; checks the dimensions."""
  if not spec:
    raise ValueError(f"{flag} is empty; pass {flag}=FILE[:KEY]")
  path, key = data.parse_path_key(spec)
  with naming(flag, spec):
    a = np.asarray(data.load_array(path, key or default_key,
                                   ndim=ndim[0] if len(ndim) == 1 else None), np.float32)
  if a.ndim not in ndim:
    raise ValueError(f"{flag}={spec} is {a.shape}; expected "
                     f"{' or '.join(f'{n}-D' for n in ndim)} (images are rows x columns x "
                     "bands); pick the right FILE:KEY")
  return a


def config_to_dict(cfg) -> dict:
  """ConfigDict (or dict) to plain JSON-friendly dict."""
  d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  return to_builtin(d)


def format_table(rows: dict[str, dict[str, float]], keys: list[str] | None = None,
                 fmt: str = "{:.4f}") -> str:
  """Plain-text table: one row per method, one column per metric."""
  if not rows:
    return ""
  keys = keys or list(next(iter(rows.values())).keys())
  width = max(len(k) for k in rows) + 2
  head = "method".ljust(width) + "".join(k.rjust(12) for k in keys)
  lines = [head, "-" * len(head)]
  for name, vals in rows.items():
    cells = "".join((fmt.format(vals[k]) if k in vals else "-").rjust(12) for k in keys)
    lines.append(name.ljust(width) + cells)
  return "\n".join(lines)


def resolve_config_path(argv: list[str]) -> list[str]:
  """--config=configs/x.py[:arg] works from any directory: a path that does not exist here
  is looked up in the installed package's checkout."""
  out = []
  for a in argv:
    if a.startswith("--config="):
      path, sep, arg = a[len("--config="):].partition(":")
      if not os.path.exists(path) and (REPO / path).is_file():
        a = f"--config={REPO / path}{sep}{arg}"
    out.append(a)
  return out
