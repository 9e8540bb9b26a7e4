"""The spectral prior as a value: train it, keep it in a workdir, load it back.

    prior = hsijax.sdp.train_prior(pixels, steps=4000, key=0, workdir="runs/prior")
    prior = hsijax.sdp.load_prior("runs/prior")          # later, in another process
    fused = hsijax.sdp.fuse(y, z, prior=prior, key=1, steps=100)

A `Prior` holds the denoiser module and its EMA weights (what inference uses) plus the
diffusion schedule it was trained with. With `workdir`, training writes Orbax checkpoints to
`workdir/checkpoints` and resumes from the newest one, and `workdir/prior.json` records what
the checkpoints were trained on (model, diffusion and optimiser settings, a digest of the
pixels, the key): a later call with other data or settings is refused instead of silently
reusing (or mixing into) the old weights.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time
import warnings
from typing import Any

import jax
import numpy as np

from hsijax import diffusion, fileio
from hsijax import settings as settings_lib
from hsijax.checkpoint import Checkpointer
from hsijax.sdp import train as train_lib
from hsijax.sdp.denoiser import SpectralDenoiser

PRIOR_FILE = "prior.json"
FORMAT = "hsijax.sdp.prior/1"
# Settings that change the checkpoints' meaning; steps may grow (training continues) and the
# logging / checkpoint intervals may change freely.
_FINGERPRINT_SETTINGS = ("hidden", "num_layers", "time_dim", "dropout", "precision", "schedule",
                         "num_timesteps", "batch", "lr", "weight_decay", "ema", "decay_steps")


@dataclasses.dataclass(frozen=True)
class Prior:
  """A trained spectral diffusion prior.

  Attributes:
    model: the SpectralDenoiser (sizes, precision).
    params: its EMA variables {"params": ...} (host arrays), for `model.apply`.
    schedule_name: the diffusion schedule it was trained with ("linear" | "cosine").
    num_timesteps: T of that schedule.
    info: {"steps", "final_loss", "history": {"step", "loss"}, "seconds", "workdir"}.
  """
  model: SpectralDenoiser
  params: Any
  schedule_name: str = "linear"
  num_timesteps: int = 1000
  info: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

  @property
  def num_bands(self) -> int:
    return int(self.model.num_bands)

  def schedule(self, num_steps: int | None = None, respacing: str = "uniform"
               ) -> diffusion.Schedule:
    """The training schedule, or `num_steps` of its timesteps (respaced) for a solver."""
    return diffusion.make_respaced_schedule(self.schedule_name, self.num_timesteps, num_steps,
                                            respacing)


def pixels_digest(pixels: np.ndarray) -> str:
  """sha256 of the (N, B) float32 pixels (identifies the training data of a checkpoint)."""
  a = np.ascontiguousarray(np.asarray(pixels, np.float32))
  h = hashlib.sha256(str(a.shape).encode())
  h.update(memoryview(a).cast("B"))
  return h.hexdigest()


def _principal(a: np.ndarray, strip: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Mean (B,), eigenvalues (B,) ascending and eigenvectors (B, B) of the centred scatter."""
  n, b = a.shape
  strips = range(0, n, strip)
  mean = sum(a[i:i + strip].sum(0, dtype=np.float64) for i in strips) / n
  scatter = np.zeros((b, b))
  for i in strips:
    d = a[i:i + strip] - mean
    scatter += d.T @ d
  evals, evecs = np.linalg.eigh(scatter)
  return mean, evals, evecs


def low_rank_pixels(pixels: np.ndarray, rank: int, *, strip: int = 65536) -> np.ndarray:
  """Spectra projected onto their mean plus their first `rank` principal directions.

  An LR-HSI's own pixels are the only spectra a user's scene offers the prior, and they carry
  the sensor's noise; a diffusion model trained on them learns that noise as part of the
  spectra. Real spectra of a scene lie close to a low-dimensional subspace (the linear
  mixing model; HySure and subspace LS use the same assumption), so the projection keeps the
  spectra and removes most of the noise. Negative values are clipped to 0.

  Args:
    pixels: (N, B) spectra.
    rank: principal directions kept; rank >= B (or 0) returns the pixels unchanged.
    strip: rows per pass (memory: the projection never holds a float64 copy of all pixels).

  Returns:
    (N, B) float32.
  """
  a = np.asarray(pixels, np.float32)
  if rank < 0:
    raise ValueError(f"rank must be >= 0 (0 = no projection), got {rank}")
  if rank == 0 or rank >= a.shape[1]:
    return a
  mean, _, evecs = _principal(a, strip)
  v = evecs[:, -rank:]  # eigh sorts ascending: the leading directions are last
  out = np.empty_like(a)
  for i in range(0, a.shape[0], strip):
    out[i:i + strip] = np.maximum((a[i:i + strip] - mean) @ v @ v.T + mean, 0)
  return out


def subspace_snr_db(pixels: np.ndarray, rank: int = 10, *, strip: int = 65536) -> float:
  """The spectra's signal-to-noise ratio in dB, estimated from their principal directions.

  The energy outside the leading `rank` directions is taken as noise (white noise puts the
  share (B - rank) / B of its energy there, which is corrected for): 10 log10 of the pixels'
  total energy over that noise energy. Spectra with real detail beyond `rank` directions
  count it as noise too, so on clean data this is a lower bound.

  Args:
    pixels: (N, B) spectra with B > rank.
    rank: the signal subspace's dimension (10, as `low_rank_pixels` in the `real` preset).

  Returns:
    SNR in dB (inf for spectra that lie exactly in the subspace).
  """
  a = np.asarray(pixels, np.float32)
  if not 0 < rank < a.shape[1]:
    raise ValueError(f"rank must be in 1..B-1 = 1..{a.shape[1] - 1}, got {rank}")
  _, evals, _ = _principal(a, strip)
  noise = max(float(evals[:-rank].sum()), 0.0) * a.shape[1] / (a.shape[1] - rank)
  total = sum(float(np.sum(np.square(a[i:i + strip], dtype=np.float64)))
              for i in range(0, a.shape[0], strip))
  return float("inf") if noise == 0 else 10 * float(np.log10(total / noise))


def _fingerprint(pixels: np.ndarray, key: Any, settings: train_lib.PriorSettings
                 ) -> dict[str, Any]:
  full = settings_lib.as_dict(settings)
  return {
      "format": FORMAT,
      "num_bands": int(pixels.shape[1]),
      "settings": {k: full[k] for k in _FINGERPRINT_SETTINGS},
      "data": {"num_pixels": int(pixels.shape[0]), "sha256": pixels_digest(pixels)},
      "key": settings_lib.key_fingerprint(key),
  }


def _read_json(path: pathlib.Path) -> dict[str, Any] | None:
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); it was damaged: delete it and the "
                     "checkpoints beside it, or use a new workdir") from e


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  diffs = []
  if old.get("num_bands") != new["num_bands"]:
    diffs.append(f"bands {old.get('num_bands')} -> {new['num_bands']}")
  for k, v in new["settings"].items():
    if old.get("settings", {}).get(k) != v:
      diffs.append(f"{k} {old.get('settings', {}).get(k)!r} -> {v!r}")
  if old.get("data") != new["data"]:
    o = old.get("data") or {}
    diffs.append(f"training pixels ({o.get('num_pixels')} pixels, sha256 "
                 f"{str(o.get('sha256'))[:12]} -> {new['data']['num_pixels']} pixels, "
                 f"{new['data']['sha256'][:12]})")
  if old.get("key") != new["key"]:
    diffs.append("key / seed")
  return diffs


def check_workdir(workdir: str | pathlib.Path, fingerprint: dict[str, Any]) -> None:
  """Refuses a workdir whose checkpoints were trained on other data or settings."""
  path = pathlib.Path(workdir) / PRIOR_FILE
  old = _read_json(path)
  ckpt_dir = pathlib.Path(workdir) / "checkpoints"
  if old is None:
    if ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
      raise ValueError(
          f"{ckpt_dir} holds checkpoints but no {PRIOR_FILE} saying what they were trained "
          f"on, so they cannot be reused safely; use a new workdir (or delete {ckpt_dir})")
    return
  if old.get("format") != FORMAT:
    raise ValueError(f"{path} is not a spectral-prior record ({old.get('format')!r}); use "
                     "another workdir for the prior")
  diffs = _differences(old, fingerprint)
  if diffs:
    raise ValueError(
        f"{workdir} already holds a spectral prior trained with other inputs ("
        + "; ".join(diffs) + "). Reusing it would silently mix two runs: pass a new workdir "
        "(--workdir=...; --fresh starts one in a sub-folder), or delete the old one to retrain")


def train_prior(pixels: np.ndarray, *, steps: int, key: Any,
                workdir: str | pathlib.Path | None = None,
                mesh: jax.sharding.Mesh | None = None, show_progress: bool = True,
                policy: Any = None, batches: Any = None, **settings: Any) -> Prior:
  """Trains the per-pixel spectral diffusion model on clean spectra.

  Args:
    pixels: (N, B) clean spectra (or an (h, w, B) image of them) in [0, 1].
    steps: training steps (the paper: 30000; a few thousand suffice for small scenes when
      `decay_steps` is shortened too, see configs/sdp.py budgets).
    key: PRNG key or int seed (same key, same prior, also after a resumed run).
    workdir: folder for checkpoints (resumed from the newest) and prior.json; None = in
      memory only.
    mesh: device mesh with a "data" axis (default: all devices); batches are sharded on it.
    show_progress: False silences the progress output.
    policy: platform choices (steps per dispatch, donation; hsijax.policy), None = the
      running backend's.
    batches: batches(step) -> (batch, B) pixels in [0, 1] from a host pipeline (e.g.
      `hsijax.datasets.prior_pixel_batches` over a TFDS dataset) instead of drawing from
      `pixels`, which then is a sample of the data (fingerprint, band count).
    **settings: `PriorSettings` fields (hidden, num_layers, time_dim, dropout, precision,
      schedule, num_timesteps, batch, lr, weight_decay, ema, decay_steps,
      checkpoint_every, log_every).

  Returns:
    Prior with the EMA weights.
  """
  s = train_lib.PriorSettings.from_kwargs(**settings)
  pixels = np.asarray(pixels, np.float32)
  if pixels.ndim == 3:
    pixels = pixels.reshape(-1, pixels.shape[-1])
  if pixels.ndim != 2 or pixels.shape[0] < 1 or pixels.shape[1] < 1:
    raise ValueError(f"pixels must be (N, B) spectra or an (h, w, B) image, got shape "
                     f"{pixels.shape}")
  if not np.all(np.isfinite(pixels)):
    raise ValueError("pixels contain NaN/inf; fill or drop those spectra first")
  if not float(pixels.max()) > 0:
    raise ValueError("pixels have no positive value (all zeros or negative); pass clean "
                     "spectra (reflectance, or radiance divided by the scene's maximum)")
  if float(pixels.max()) > 1.5:
    peak = float(pixels.max())
    warnings.warn(f"train_prior: the pixels reach {peak:.4g}, not [0, 1]; they were divided "
                  f"by {peak:.4g}. Scale them yourself the same way as the images you fuse "
                  "to silence this", stacklevel=2)
    pixels = pixels / peak
  t0 = time.perf_counter()
  if workdir is not None:
    workdir = pathlib.Path(workdir)
    fp = _fingerprint(pixels, key, s)
    check_workdir(workdir, fp)
    fileio.write_json(workdir / PRIOR_FILE, fp | {"steps": int(steps)})
  state, history = train_lib.fit(pixels, steps=steps, key=key, settings=s, workdir=workdir,
                                 mesh=mesh, show_progress=show_progress, policy=policy,
                                 batches=batches)
  info = {"steps": int(np.asarray(state.step)),
          "final_loss": float(history["loss"][-1]) if history.get("loss") else None,
          "history": history, "seconds": time.perf_counter() - t0,
          "workdir": None if workdir is None else str(workdir)}
  return Prior(model=s.model(pixels.shape[1]), params=jax.device_get(state.ema_params),
               schedule_name=s.schedule, num_timesteps=int(s.num_timesteps), info=info)


def load_prior(workdir: str | pathlib.Path, step: int | None = None) -> Prior:
  """The prior saved in `workdir` by `train_prior` (EMA weights only; no optimiser state).

  Args:
    workdir: the folder given to train_prior (holds prior.json and checkpoints/).
    step: which checkpoint (default: the newest intact one; a damaged newer one is set
      aside with a warning).
  """
  workdir = pathlib.Path(workdir)
  record = _read_json(workdir / PRIOR_FILE)
  if record is None or record.get("format") != FORMAT:
    raise FileNotFoundError(
        f"{workdir} holds no trained spectral prior ({PRIOR_FILE} is missing); train one "
        "with hsijax.sdp.train_prior(..., workdir=...) or python -m launch.train_sdm")
  s = train_lib.PriorSettings.from_kwargs(**record["settings"])
  model = s.model(int(record["num_bands"]))
  abstract = jax.eval_shape(lambda k: train_lib.init_train_state(
      model, k, train_lib.make_optimizer()).ema_params, jax.random.key(0))
  with Checkpointer(workdir / "checkpoints") as ckpt:
    if not ckpt.all_steps():
      raise FileNotFoundError(f"{workdir / 'checkpoints'} holds no checkpoint; train the "
                              "prior first")
    step, part = ckpt.restore_part({"ema_params": abstract}, step=step)
  return Prior(model=model, params=part["ema_params"], schedule_name=s.schedule,
               num_timesteps=int(s.num_timesteps),
               info={"steps": step, "workdir": str(workdir)})
