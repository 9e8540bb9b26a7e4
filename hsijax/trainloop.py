"""One resumable training loop shared by the SDP spectral model and the SCDM U-Nets.

The loop is deliberately dumb: the model-specific work lives in a jitted
`multi_step(state, count) -> (state, last_loss)` that runs `count` training steps in one
dispatch (a `lax.fori_loop` over the steps, the data resident on the devices, each step's
batch and noise drawn on the device from `fold_in(key, state.step)`: `multi_step`). The loop
calls it for chunks of at most `steps_per_call` steps that end at every log and checkpoint
point. Because `count` is a traced value, every chunk runs the same compiled program, so
the chunking never changes the result: a run that is killed and resumed from its last
checkpoint ends with exactly the parameters of an uninterrupted one, and k steps per
dispatch give the parameters of one step per dispatch.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
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


def multi_step(one_step: Callable[[Any], tuple[Any, jax.Array]]
               ) -> Callable[[Any, jax.Array], tuple[Any, jax.Array]]:
  """(state, count) -> (state after `count` steps, loss of the last one), one fori_loop.

  `one_step(state) -> (state, loss)` draws its own batch and keys from state.step; jit the
  result (with the data closed over or passed in).
  """
  def run_steps(state, count):
    def body(_, carry):
      state, _ = carry
      return one_step(state)
    return jax.lax.fori_loop(0, count, body, (state, jnp.zeros((), jnp.float32)))
  return run_steps


def host_multi_step(one_step: Callable[[Any, Any], tuple[Any, jax.Array]]
                    ) -> Callable[[Any, Any], tuple[Any, jax.Array]]:
  """(state, batches stacked on a leading step axis) -> (state after them, last loss): the
  steps of one dispatch when the batches come from a host pipeline (one lax.scan)."""
  def run_steps(state, batches):
    state, losses = jax.lax.scan(one_step, state, batches)
    return state, losses[-1]
  return run_steps


def host_batches(batch_fn: Callable[[int], Any], mesh: jax.sharding.Mesh,
                 count: int, start: int) -> Any:
  """Batches of steps start .. start + count - 1 from a host pipeline, stacked (count, ...)
  and placed with the batch axis (1) split over the mesh's "data" axis; on several
  processes each passes its own slice of every step's batch."""
  from hsijax import sharding  # pylint: disable=g-import-not-at-top
  stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs),
                                   *[batch_fn(s) for s in range(start, start + count)])
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.DATA_AXIS))
  return jax.tree_util.tree_map(
      lambda a: jax.make_array_from_process_local_data(spec, np.asarray(a)), stacked)


def _next_stop(step: int, num_steps: int, every: Sequence[int], per_call: int) -> int:
  """End of the chunk that starts at `step`: per_call steps, cut at multiples of `every`."""
  stop = min(num_steps, step + per_call)
  for e in every:
    if e > 0:
      stop = min(stop, (step // e + 1) * e)
  return stop


def run(multi_step_fn: Callable[[Any, jax.Array], tuple[Any, jax.Array]],
        state: Any,
        *,
        num_steps: int,
        checkpointer: Checkpointer | None = None,
        log_every: int = 100,
        steps_per_call: int = 1,
        desc: str = "train") -> tuple[Any, dict[str, list[float]]]:
  """Runs training from the latest checkpoint (if any) up to `num_steps`.

  On resume, process 0 prints "<desc>: resuming from step N of M (<checkpoint dir>)".

  Args:
    multi_step_fn: jitted (state, count) -> (state, loss of the last step) (`multi_step`);
      its first argument may be donated.
    state: initial state (used as the restore target, so it also fixes shardings).
    num_steps: total number of steps of the full run (not of this call).
    checkpointer: saves every `checkpointer.save_interval_steps` and at the end.
    log_every: loss history interval (steps).
    steps_per_call: steps per dispatch (chunks also end at log and checkpoint points).

  Returns:
    (final state, history) with history["step"], history["loss"] sampled every `log_every`,
    for the whole run: with a checkpointer the history is saved next to the checkpoints
    (`HISTORY_FILE`) whenever a checkpoint is, and a resumed run starts from the saved
    entries up to its restored step.
  """
  start = 0
  history: dict[str, list[float]] = {"step": [], "loss": []}
  if checkpointer is not None and checkpointer.latest_step() is not None:
    start, state = checkpointer.restore_latest(target=state)  # newest intact step
    history = load_history(checkpointer, start)
    if jax.process_index() == 0:
      # One machine-readable line so logs (and tests) show where a restarted run picked up.
      print(f"{desc}: resuming from step {start} of {num_steps} ({checkpointer.directory})",
            flush=True)
  if start >= num_steps:
    return state, history
  bar = progress.host_bar(total=num_steps, initial=start, desc=desc, unit="step")
  interval = checkpointer.save_interval_steps if checkpointer is not None else 0
  step = start
  while step < num_steps:
    stop = _next_stop(step, num_steps, (log_every, interval), max(int(steps_per_call), 1))
    state, loss = multi_step_fn(state, jnp.int32(stop - step))
    bar.update(stop - step)
    step = stop
    if step % log_every == 0 or step == num_steps:
      value = float(np.asarray(loss))
      history["step"].append(step)
      history["loss"].append(value)
      bar.set_postfix(loss=f"{value:.4g}", refresh=False)
    if checkpointer is not None and checkpointer.save(step, state, force=(step == num_steps)):
      _save_history(checkpointer, history)
  bar.close()
  if checkpointer is not None:
    checkpointer.wait()
  return state, history
