"""One resumable training loop shared by the SDP spectral model and the SCDM U-Nets.

The loop is deliberately dumb: the model-specific work lives in a pure, jitted
`train_step(state, batch, key) -> (state, metrics)` and a host-side `batch_fn(step)`. Keys and
batches are derived from the global step (`fold_in(key, step)`), so a run that is killed and
resumed from its last checkpoint ends with exactly the parameters of an uninterrupted run.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import flax
import jax
import numpy as np

from hsijax import fileio, progress
from hsijax.checkpoint import Checkpointer


HISTORY_FILE = "history.json"  # next to the checkpoints: the loss curve of the whole run


def _history_path(checkpointer: Checkpointer) -> str:
  return os.path.join(str(checkpointer.directory), HISTORY_FILE)


def load_history(checkpointer: Checkpointer, upto: int) -> dict[str, list[float]]:
  """The logged {"step", "loss"} of earlier runs in this checkpoint directory, up to step
  `upto` (entries past the restored checkpoint belong to work that is redone)."""
  try:
    with open(_history_path(checkpointer)) as f:
      saved = json.load(f)
  except (FileNotFoundError, json.JSONDecodeError, OSError):
    return {"step": [], "loss": []}
  keep = [i for i, s in enumerate(saved.get("step", [])) if s <= upto]
  return {k: [saved[k][i] for i in keep] for k in ("step", "loss")}


def _save_history(checkpointer: Checkpointer, history: dict[str, list[float]]) -> None:
  """Writes the history atomically (temp file + rename), from process 0 only."""
  if jax.process_index() != 0:
    return
  fileio.atomic_write(_history_path(checkpointer), lambda f: json.dump(history, f))


@flax.struct.dataclass
class TrainState:
  """The state every model trains: step (int32 scalar), params, their EMA, optimiser state.

  What params / ema_params hold is the model's business (SDP: the flax variables
  {"params": ...}; SCDM: the "params" collection).
  """
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def run(train_step: Callable[[Any, Any, jax.Array], tuple[Any, dict]],
        state: Any,
        batch_fn: Callable[[int], Any],
        *,
        num_steps: int,
        key: jax.Array,
        checkpointer: Checkpointer | None = None,
        log_every: int = 100,
        desc: str = "train") -> tuple[Any, dict[str, list[float]]]:
  """Runs `train_step` from the latest checkpoint (if any) up to `num_steps`.

  On resume, process 0 prints "<desc>: resuming from step N of M (<checkpoint dir>)".

  Args:
    train_step: pure step; its first argument may be donated.
    state: initial state (used as the restore target, so it also fixes shardings).
    batch_fn: step -> batch already placed on devices (e.g. via sharding.shard_batch).
    num_steps: total number of steps of the full run (not of this call).
    key: base PRNG key; step s uses fold_in(key, s).
    checkpointer: saves every `checkpointer.save_interval_steps` and at the end.

  Returns:
    (final state, history) with history["step"], history["loss"] sampled every `log_every`,
    for the whole run: with a checkpointer the history is saved next to the checkpoints
    (`HISTORY_FILE`) whenever a checkpoint is, and a resumed run starts from the saved
    entries up to its restored step.
  """
  start = 0
  history: dict[str, list[float]] = {"step": [], "loss": []}
  if checkpointer is not None and checkpointer.latest_step() is not None:
    start = int(checkpointer.latest_step())
    state = checkpointer.restore(start, target=state)
    history = load_history(checkpointer, start)
    if jax.process_index() == 0:
      # One machine-readable line so logs (and tests) show where a restarted run picked up.
      print(f"{desc}: resuming from step {start} of {num_steps} ({checkpointer.directory})",
            flush=True)
  if start >= num_steps:
    return state, history
  bar = progress.host_bar(total=num_steps, initial=start, desc=desc, unit="step")
  for step in range(start, num_steps):
    state, metrics = train_step(state, batch_fn(step), jax.random.fold_in(key, step))
    done = step + 1
    if done % log_every == 0 or done == num_steps:
      loss = float(np.asarray(metrics["loss"]))
      history["step"].append(done)
      history["loss"].append(loss)
      bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
    bar.update(1)
    if checkpointer is not None and checkpointer.save(done, state, force=(done == num_steps)):
      _save_history(checkpointer, history)
  bar.close()
  if checkpointer is not None:
    checkpointer.wait()
  return state, history
