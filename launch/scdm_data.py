"""The SCDM entry points' inputs: the training cube and the image to sample."""
from __future__ import annotations

from typing import Any

import numpy as np

from hsijax.scdm import evaluate as scdm_eval
from launch import common


def load_cube(cfg) -> np.ndarray:
  """The (H, W, N) cube of `data.path`, checked against `data.num_bands` / `rgb_bands`."""
  cube = common.load_input(cfg.data.path, "--config.data.path", (3,),
                           default_key=cfg.data.key or None)
  if cfg.data.num_bands and cube.shape[-1] != cfg.data.num_bands:
    raise ValueError(f"the cube has {cube.shape[-1]} bands but data.num_bands = "
                     f"{cfg.data.num_bands}; pass --config.data.num_bands={cube.shape[-1]} "
                     "or the right file")
  rgb_bands = tuple(cfg.data.rgb_bands)
  if len(rgb_bands) != 3 or max(rgb_bands) >= cube.shape[-1] or min(rgb_bands) < 0:
    raise ValueError(f"--config.data.rgb_bands={rgb_bands} must be 3 band indices in [0, "
                     f"{cube.shape[-1]}), e.g. \"--config.data.rgb_bands=(b,g,r)\"")
  return cube


def training_images(cfg) -> np.ndarray:
  """(M, h, w, N) training cubes: the cube, or its three training quadrants."""
  train, _ = scdm_eval.split_cube(load_cube(cfg), str(cfg.data.split),
                                  int(cfg.data.test_quadrant))
  return train


def sampling_inputs(cfg, num_bands: int, rgb_bands) -> tuple[np.ndarray, Any, str]:
  """(rgb (H, W, 3), reference (H, W, N) or None, description), original units.

  data.rgb if given, else the RGB bands of data.reference, else of data.path (its held-out
  quadrant with data.split=quadrant).
  """
  reference = None
  if cfg.data.reference:
    reference = common.load_input(cfg.data.reference, "--config.data.reference", (3,))
    if reference.shape[-1] != num_bands:
      raise ValueError(f"--config.data.reference must be an (H, W, {num_bands}) cube, got "
                       f"{reference.shape}; pass the hyperspectral reference of the RGB input")
  if cfg.data.rgb:
    rgb, source = common.load_input(cfg.data.rgb, "--config.data.rgb", (3,)), cfg.data.rgb
  elif reference is not None:
    rgb, source = reference[..., list(rgb_bands)], cfg.data.reference
  elif cfg.data.path:
    cube = load_cube(cfg)
    _, held_out = scdm_eval.split_cube(cube, str(cfg.data.split), int(cfg.data.test_quadrant))
    reference = cube if held_out is None else held_out
    rgb = reference[..., list(rgb_bands)]
    source = cfg.data.path + ("" if held_out is None else
                              f" ({scdm_eval.QUADRANT_NAMES[cfg.data.test_quadrant]} quadrant)")
  else:
    raise ValueError("nothing to sample: pass --config.data.rgb=FILE[:KEY] (an RGB image) or "
                     "--config.data.path=FILE[:KEY] (a cube whose RGB bands are used, with "
                     "--config.data.split=quadrant for the held-out quadrant)")
  if rgb.ndim != 3 or rgb.shape[-1] != 3:
    raise ValueError(f"the RGB input must be (H, W, 3), got shape {rgb.shape}; pass a "
                     "3-channel image (channels last) with --config.data.rgb=FILE[:KEY]")
  if reference is not None and reference.shape[:2] != rgb.shape[:2]:
    raise ValueError(f"--config.data.reference {reference.shape[:2]} and the RGB input "
                     f"{rgb.shape[:2]} differ in size; pass co-registered images")
  return np.asarray(rgb, np.float32), reference, source


def tfds_source(cfg):
  """The random-access source of --config.data.tfds=NAME[:SPLIT] in --config.data.tfds_dir."""
  from hsijax import datasets  # pylint: disable=g-import-not-at-top
  if not cfg.data.tfds_dir:
    raise ValueError("--config.data.tfds needs --config.data.tfds_dir=DIR (the --data_dir "
                     "given to python -m launch.build_dataset)")
  name = cfg.data.tfds if ":" in cfg.data.tfds else f"{cfg.data.tfds}:train"
  with common.naming("--config.data.tfds", cfg.data.tfds):
    return datasets.open_source(name, cfg.data.tfds_dir)


def tfds_sample(source, num: int, seed: int) -> np.ndarray:
  """Up to `num` random pixels (n, B) of the dataset (statistics, fingerprint, band count)."""
  from hsijax import datasets  # pylint: disable=g-import-not-at-top
  return np.asarray(datasets.sample_pixels(source, num, seed), np.float32)
