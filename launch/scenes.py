"""The cube an SDP evaluation runs on: a file (`data.path`) or the demo's synthetic scene."""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from hsijax import data, degrade, synthetic
from launch import common

# Used only when neither the file nor the command line gives band centres (nominal evenly
# spaced wavelengths over the sensor's range). The IKONOS bands span 450-850 nm.
DEFAULT_RANGE_NM = (400.0, 1000.0)


@dataclasses.dataclass
class Scene:
  cube: np.ndarray            # (H, W, B) in the file's units (synthetic: [0, 1])
  wavelengths_nm: np.ndarray  # (B,)
  description: str


def parse_range(text: str) -> tuple[float, float] | None:
  """"START:STOP" -> (start, stop); "" -> None."""
  if not text:
    return None
  try:
    start, stop = (float(v) for v in str(text).split(":"))
  except ValueError as e:
    raise ValueError(f"--config.data.wavelengths_nm must be 'START:STOP' in nm (e.g. "
                     f"430:860), got {text!r}") from e
  if not stop > start:
    raise ValueError(f"--config.data.wavelengths_nm={text}: STOP must exceed START")
  return start, stop


def band_wavelengths(num_bands: int, cfg_range: str, from_file) -> tuple[np.ndarray, str]:
  """(B,) band centres and where they came from ("config", "file" or "default")."""
  rng = parse_range(cfg_range)
  if rng is not None:
    return degrade.nominal_wavelengths(num_bands, *rng), "config"
  if from_file is not None and np.asarray(from_file).size == num_bands:
    return np.asarray(from_file, np.float32), "file"
  common.log(f"no band wavelengths known; assuming {DEFAULT_RANGE_NM[0]:g}:"
             f"{DEFAULT_RANGE_NM[1]:g} nm (pass --config.data.wavelengths_nm=START:STOP)")
  return degrade.nominal_wavelengths(num_bands, *DEFAULT_RANGE_NM), "default"


def load_scene(cfg) -> Scene:
  """The cube of `cfg.data.path`, or the synthetic demo scene when no path is given."""
  if cfg.data.path:
    path, key = data.parse_path_key(cfg.data.path)
    with common.naming("--config.data.path", cfg.data.path):
      cube = data.load_cube(path, key or cfg.data.key or None)
    wl, src = band_wavelengths(cube.data.shape[-1], cfg.data.wavelengths_nm,
                               cube.wavelengths_nm)
    return Scene(np.asarray(cube.data, np.float32), np.asarray(wl, np.float32),
                 f"{pathlib.Path(path).name} {cube.data.shape} (wavelengths: {src})")
  if cfg.data.height > 0:
    rng = parse_range(cfg.data.wavelengths_nm) or (400.0, 780.0)
    sc = synthetic.make_scene(cfg.seed, cfg.data.height, cfg.data.width, cfg.data.num_bands,
                              num_endmembers=cfg.data.num_endmembers, wavelengths_nm=rng,
                              source=cfg.data.spectra)
    return Scene(sc.cube, sc.wavelengths_nm,
                 f"synthetic {sc.cube.shape}, {len(sc.names)} {sc.source} endmembers")
  raise ValueError("no data: pass --config.data.path=FILE.npz (a cube H x W x B) or use the "
                   "demo preset (--config=configs/sdp.py:demo) for a synthetic scene")
