"""Shared scaffolding for `python -m launch.<name>` entry points."""
from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

import jax
import numpy as np
from absl import logging as absl_logging

from hsijax import sharding
from hsijax.fileio import atomic_write as _atomic_write


def setup(workdir: str | os.PathLike | None) -> pathlib.Path:
  """Multi-host init, creates `workdir`, and quietens library logs; returns the path."""
  sharding.initialize_distributed()
  if not workdir:
    raise ValueError("--workdir is required: pass --workdir=DIR for outputs and checkpoints")
  if "://" in str(workdir):  # pathlib would silently turn gs://b/x into ./gs:/b/x
    raise ValueError(
        f"--workdir={workdir} is a URL; the entry points write to local paths only. Mount "
        "the bucket (e.g. gcsfuse) or use a shared filesystem and pass its local path.")
  path = pathlib.Path(workdir).expanduser().resolve()
  path.mkdir(parents=True, exist_ok=True)
  absl_logging.set_verbosity(absl_logging.INFO if jax.process_index() == 0 else
                             absl_logging.ERROR)
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  return path


def log(msg: str) -> None:
  """Prints on process 0 only (so multi-host runs print once)."""
  if jax.process_index() == 0:
    print(msg, flush=True)


def to_builtin(obj: Any) -> Any:
  """Recursively converts numpy / jax scalars and arrays to JSON-serialisable Python values.

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
  if isinstance(obj, pathlib.Path):
    return str(obj)
  return obj


def write_json(path: str | os.PathLike, obj: Any) -> pathlib.Path:
  """Writes `obj` as indented JSON atomically (temp file, then rename); process 0 only."""
  if jax.process_index() != 0:
    return pathlib.Path(path)
  text = json.dumps(to_builtin(obj), indent=2, sort_keys=False, allow_nan=False)
  return _atomic_write(path, lambda f: f.write(text + "\n"))


def write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
  """Writes `text` atomically (temp file, then rename); process 0 only."""
  if jax.process_index() != 0:
    return pathlib.Path(path)
  return _atomic_write(path, lambda f: f.write(text))


def save_npz(path: str | os.PathLike, **arrays: Any) -> pathlib.Path:
  """np.savez atomically; process 0 only."""
  if jax.process_index() != 0:
    return pathlib.Path(path)
  host = {k: np.asarray(v) for k, v in arrays.items()}
  return _atomic_write(path, lambda f: np.savez(f, **host), mode="wb")


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> pathlib.Path:
  """Saves a matplotlib figure as PNG atomically and closes it; process 0 only."""
  import matplotlib.pyplot as plt
  try:
    if jax.process_index() == 0:
      _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi,
                                                 bbox_inches="tight"), mode="wb")
  finally:
    plt.close(fig)
  return pathlib.Path(path)


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


def run_main(run_fn, default_config: str, default_workdir: str, what: str = "Config") -> None:
  """The `__main__` of an entry point: defines --config / --workdir and calls run_fn(cfg, dir).

  Flags are defined here, at run time rather than import time, so tests can import every
  entry point in one process.
  """
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", default_config, f"{what} file and preset.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", default_workdir, "Output folder.")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}")
    run_fn(flags.FLAGS.config, flags.FLAGS.workdir)

  app.run(main)
