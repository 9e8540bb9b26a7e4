"""Tables and figures the SDP entry points print and write (one place for all of them)."""
from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from hsijax import plots
from hsijax import sdp
from launch import common


def print_table(table: dict[str, Any]) -> None:
  """The full-reference metrics of every method, then the seconds per phase."""
  rows = {k: v for k, v in table.items() if k not in ("seconds", "conventions")}
  common.log(common.format_table(rows, list(sdp.evaluate.FULL_REFERENCE_KEYS)))
  if "seconds" in table:
    common.log("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in table["seconds"].items()))


def save_fusion_figures(workdir: pathlib.Path, reference: np.ndarray,
                        results: dict[str, np.ndarray], table: dict[str, Any], *,
                        wavelengths_nm=None, y=None, title=None) -> list[pathlib.Path]:
  """fusion.png (false colour + error maps) and band_psnr.png, titled with the table's
  numbers (metrics.json and the figures agree)."""
  label = lambda k: sdp.evaluate.LABELS.get(k, k)
  named = {label(k): v for k, v in results.items()}
  scores = {label(k): v for k, v in table.items() if k in results}
  paths = [workdir / "fusion.png", workdir / "band_psnr.png"]
  common.save_figure(plots.fusion_figure(reference, named, wavelengths_nm=wavelengths_nm,
                                         inputs={"LR-HSI": y} if y is not None else None,
                                         title=title, scores=scores), paths[0])
  common.save_figure(plots.band_psnr_figure(reference, named, wavelengths_nm=wavelengths_nm,
                                            title=title, scores=scores), paths[1])
  return paths


def prior_summary(prior) -> dict[str, Any] | None:
  """What run.json records of the spectral prior."""
  if prior is None:
    return None
  return {k: prior.info.get(k) for k in ("final_loss", "steps", "seconds", "workdir")}
