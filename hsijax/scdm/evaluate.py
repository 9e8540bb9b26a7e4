"""Scoring SCDM: the quadrant protocol, the linear baseline and the comparison table.

The cube is cut into four equal quadrants; three train, the fourth (default the bottom-right)
is sampled from its RGB bands and scored against its true bands. The per-pixel affine
least-squares map from RGB (`hsijax.linear_baseline`) fitted on the training quadrants is the
baseline any generative model has to beat. Scores are `hsijax.metrics.reconstruction_metrics`
on all N bands and on the N - 3 bands that are not RGB inputs.

All-band MPSNR rule: a method that returns its input bands exactly (a residual cascade, and the
linear map up to float rounding) has an infinite (or ~150 dB) PSNR on them, so the all-band
MPSNR caps every band's PSNR at PSNR_CAP_DB = 100 dB before averaging (`capped_mpsnr`, for
every row alike); SAM, MSSIM and RMSE are unchanged. The headline comparison is the table of
the N - 3 non-input bands, which no copying can inflate.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

from hsijax import linear_baseline, metrics
from hsijax.scdm import pipeline
from hsijax.scdm.cascade import Cascade

QUADRANT_NAMES = ("top-left", "top-right", "bottom-left", "bottom-right")
METRIC_KEYS = ("mpsnr", "sam_deg", "sam_rad", "mssim", "rmse")
PSNR_CAP_DB = 100.0


def capped_mpsnr(reference: np.ndarray, x: np.ndarray, cap: float = PSNR_CAP_DB) -> float:
  """Mean over bands of min(PSNR_b, cap) (hsijax.metrics.psnr_per_band): finite when some
  bands are exact copies of the reference."""
  return float(np.mean(np.minimum(np.asarray(metrics.psnr_per_band(reference, x)), cap)))


def quadrants(cube: np.ndarray) -> list[np.ndarray]:
  """Four equal (H//2, W//2, N) quadrants: top-left, top-right, bottom-left, bottom-right."""
  h, w = cube.shape[0] // 2, cube.shape[1] // 2
  return [cube[:h, :w], cube[:h, w:2 * w], cube[h:2 * h, :w], cube[h:2 * h, w:2 * w]]


def split_cube(cube: np.ndarray, split: str, test_quadrant: int = 3
               ) -> tuple[np.ndarray, np.ndarray | None]:
  """(training images (M, h, w, N), held-out image (h, w, N) or None).

  split "none": the whole cube trains, nothing is held out; "quadrant": three quadrants
  train and `test_quadrant` (0 TL, 1 TR, 2 BL, 3 BR) is held out.
  """
  if split == "none":
    return cube[None], None
  if split == "quadrant":
    if not 0 <= int(test_quadrant) < 4:
      raise ValueError(f"test_quadrant must be 0..3 (0 TL, 1 TR, 2 BL, 3 BR), got "
                       f"{test_quadrant}")
    if min(cube.shape[:2]) < 2:
      raise ValueError(f"a {cube.shape[0]} x {cube.shape[1]} cube has no quadrants")
    q = quadrants(cube)
    return np.stack([q[i] for i in range(4) if i != int(test_quadrant)]), q[int(test_quadrant)]
  raise ValueError(f"split must be 'none' or 'quadrant', got {split!r}")


def generated_bands(num_bands: int, rgb_bands: Sequence[int]) -> list[int]:
  """Bands a method has to infer: all but the RGB input bands."""
  inputs = set(int(b) for b in rgb_bands)
  return [b for b in range(num_bands) if b not in inputs]


def linear_map(train: np.ndarray, rgb_bands: Sequence[int], rgb: np.ndarray) -> np.ndarray:
  """The per-pixel affine least-squares map RGB -> N bands fitted on `train`, applied."""
  lin = linear_baseline.fit(train[..., list(rgb_bands)], train)
  return np.asarray(linear_baseline.apply(lin, rgb), np.float32)


def score(reference: np.ndarray, outputs: dict[str, np.ndarray], rgb_bands: Sequence[int]
          ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
  """(scores on all bands, scores on the bands that are not RGB inputs) per output; the
  all-band MPSNR is `capped_mpsnr` (see the module docstring)."""
  gen = generated_bands(reference.shape[-1], rgb_bands)
  return ({n: metrics.reconstruction_metrics(reference, x) | {
      "mpsnr": capped_mpsnr(reference, x)} for n, x in outputs.items()},
          {n: metrics.reconstruction_metrics(reference[..., gen], x[..., gen])
           for n, x in outputs.items()})


def markdown_table(results: dict[str, dict[str, float]], seconds: dict[str, float]) -> str:
  head = ("| method | MPSNR (dB) ↑ | SAM (deg) ↓ | SAM (rad) ↓ | MSSIM ↑ | RMSE ↓ | "
          "sampling s |")
  lines = [head, "|" + "---|" * 7]
  for name, r in results.items():
    lines.append(f"| {name} | {r['mpsnr']:.2f} | {r['sam_deg']:.2f} | {r['sam_rad']:.4f} | "
                 f"{r['mssim']:.4f} | {r['rmse']:.4g} | {seconds.get(name, 0.0):.1f} |")
  return "\n".join(lines) + "\n"


def compare(test: np.ndarray, train: np.ndarray, rgb_bands: Sequence[int],
            variants: Sequence[tuple[str, Cascade, Sequence[Any] | None]], *, key: Any,
            sample: Callable[..., np.ndarray] = pipeline.sample, **sample_settings: Any
            ) -> dict[str, Any]:
  """Samples each (name, trained cascade, per-stage settings) variant on the held-out
  image's RGB and scores it and the linear map.

  Returns {"outputs": {name: cube}, "results", "results_generated_bands",
  "sampling_seconds"}.
  """
  rgb = test[..., list(rgb_bands)]
  outputs, seconds = {}, {}
  t0 = time.perf_counter()
  outputs["linear"] = linear_map(train, rgb_bands, rgb)
  seconds["linear"] = time.perf_counter() - t0
  for name, cascade, stages in variants:
    t0 = time.perf_counter()
    outputs[name] = sample(cascade, rgb, key=key, stages=stages, **sample_settings)
    seconds[name] = time.perf_counter() - t0
  results, generated = score(test, outputs, rgb_bands)
  return {"outputs": outputs, "results": results, "results_generated_bands": generated,
          "sampling_seconds": seconds}
