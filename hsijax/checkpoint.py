"""Orbax checkpoints of training state (a thin `CheckpointManager` wrapper).

One item per step, written with `ocp.args.StandardSave` and read with
`ocp.args.StandardRestore`, under `directory/<step>/`. Saving is asynchronous
(the device-to-host copy happens before `save` returns, so donated/updated
buffers are safe); `wait()` or `close()` blocks until files are on disk. On
several hosts every process calls `save`/`restore` with its own shards.

What a state pytree may hold:
  * flax parameter dicts (nested dicts of arrays), NumPy or JAX arrays, sharded
    or not;
  * optax states (NamedTuples such as `ScaleByAdamState`): restored as the
    same NamedTuples when a `target` is given, as plain lists/dicts otherwise;
  * Python ints/floats such as a step counter: restored as Python scalars;
  * PRNG keys: both typed keys (`jax.random.key`) and raw uint32 keys
    (`jax.random.PRNGKey` or `jax.random.key_data(key)`) round-trip. Orbax
    stores typed keys as their uint32 key data plus the key implementation,
    so a typed key comes back typed, with or without `target`.

Example:

  with Checkpointer(workdir / "checkpoints", max_to_keep=3) as ckpt:
    start = 0
    if ckpt.latest_step() is not None:
      state = ckpt.restore(target=state, shardings=state_shardings)
      start = ckpt.latest_step()
    for step in range(start, num_steps):
      state = train_step(state, batch)
      ckpt.save(step + 1, state)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from hsijax import fileio


_ITEM = "default"  # the item folder CheckpointManager writes for a single unnamed item
CHECKSUM_FILE = "checksums.json"  # beside the step folders: {step: {file: sha256}}


def _file_hashes(step_dir: str) -> dict[str, str]:
  """{path relative to the step folder: sha256} of every file under it."""
  out = {}
  for root, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(root, name)
      h = hashlib.sha256()
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          h.update(block)
      out[os.path.relpath(path, step_dir)] = h.hexdigest()
  return dict(sorted(out.items()))


def _absolute(directory: os.PathLike | str) -> str:
  """Absolute local path; remote URLs (gs://, s3://) pass through unchanged."""
  directory = os.fspath(directory)
  if "://" in directory:
    return directory
  return os.path.abspath(os.path.expanduser(directory))


def _is_array_like(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _abstract_leaf(x: Any, sharding: jax.sharding.Sharding | None) -> Any:
  """Restore target for one leaf: a ShapeDtypeStruct carrying the wanted sharding.

  Python scalars stay as they are (Orbax restores them as Python scalars).
  NumPy leaves without a sharding stay NumPy; JAX arrays keep their own
  sharding unless one is given.
  """
  if not _is_array_like(x):
    return x
  if sharding is None:
    if isinstance(x, (np.ndarray, np.generic)):
      return x
    sharding = getattr(x, "sharding", None)
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def _abstract_target(target: Any, shardings: Any) -> Any:
  """Pairs every target leaf with its sharding (None, one Sharding, or a pytree)."""
  leaves, treedef = jax.tree_util.tree_flatten(target)
  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    per_leaf = [shardings] * len(leaves)
  else:
    try:
      # Sharding pytree with the target's structure; None leaves keep defaults.
      per_leaf = treedef.flatten_up_to(shardings)
    except (ValueError, TypeError) as e:
      raise ValueError(
          "shardings must be one jax.sharding.Sharding or a pytree with the same structure "
          f"as target (None where the default is fine); it does not match: {e}") from e
  return jax.tree_util.tree_unflatten(
      treedef, [_abstract_leaf(x, s) for x, s in zip(leaves, per_leaf)])


class Checkpointer:
  """Saves and restores state pytrees in one directory, keeping the newest N.

  Args:
    directory: where step folders go; made absolute (Orbax requires it) and
      created if missing.
    max_to_keep: how many most recent checkpoints stay on disk (None = all).
    save_interval_steps: `save` writes only when `step` is a multiple of this
      (unless `force=True`); also for the first save into an empty directory.

  Crash safety: Orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it to
  `<step>` once complete, so a process killed mid-save leaves only the tmp folder, which
  `latest_step` / `restore` ignore and the next save of that step replaces. Old checkpoints
  are deleted only after a newer one is complete (a kill during that deletion can leave a
  partial OLDER folder, which Orbax deletes later; the latest step is always complete).
  """

  def __init__(self, directory: os.PathLike | str, max_to_keep: int | None = 3,
               save_interval_steps: int = 1):
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1 or None (keep all), got {max_to_keep}.")
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}.")
    self.directory = _absolute(directory)
    self.save_interval_steps = int(save_interval_steps)
    # Orbax's default policy also saves the first step offered to an empty directory
    # (InitialSavePolicy), e.g. a full-size checkpoint at step 1 of every run; keep only
    # the interval (and Orbax's preemption saves on multi-host jobs).
    policy = ocp.checkpoint_managers.AnySavePolicy([
        ocp.checkpoint_managers.FixedIntervalPolicy(self.save_interval_steps),
        ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
    ])
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_decision_policy=policy, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  # -- writing ---------------------------------------------------------------

  def save(self, step: int, pytree: Any, force: bool = False) -> bool:
    """Starts saving `pytree` as checkpoint `step`.

    Returns:
      True when a save was started; False when `save_interval_steps` skips
      this step (use `force=True` to save anyway, e.g. at the last step).

    Raises:
      ValueError: when checkpoint `step` already exists.
    """
    step = int(step)
    if step in self._manager.all_steps():
      raise ValueError(f"A checkpoint for step {step} already exists in {self.directory}; "
                       "save under a new step or delete the old one first.")
    # The previous save is long done by now (a checkpoint interval of training ago); waiting
    # for it makes sure its files are complete before their checksums are recorded.
    self.wait()
    return self._manager.save(step, args=ocp.args.StandardSave(pytree), force=force)

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk (and records their checksums)."""
    self._manager.wait_until_finished()
    self._record_checksums()

  # -- integrity ---------------------------------------------------------------

  def _checksum_path(self) -> str:
    return os.path.join(self.directory, CHECKSUM_FILE)

  def _read_checksums(self) -> dict[str, dict[str, str]]:
    try:
      with open(self._checksum_path()) as f:
        return json.load(f)
    except (OSError, json.JSONDecodeError):
      return {}

  def _record_checksums(self) -> None:
    """sha256 of every file of each finished step (process 0), dropping deleted steps."""
    if jax.process_index() != 0:
      return
    old = self._read_checksums()
    steps = [str(s) for s in self._manager.all_steps()]
    new = {s: old[s] if old.get(s) else _file_hashes(os.path.join(self.directory, s))
           for s in steps}
    new = {s: v for s, v in new.items() if v}
    if new != old:
      fileio.atomic_write(self._checksum_path(), lambda f: json.dump(new, f))

  def verify(self, step: int) -> list[str]:
    """What is wrong with checkpoint `step` against its recorded checksums ([] = intact, or
    no record: a step finished by a run that was killed before recording it)."""
    recorded = self._read_checksums().get(str(int(step)))
    if recorded is None:
      return []
    actual = _file_hashes(os.path.join(self.directory, str(int(step))))
    problems = [f"{name} missing" for name in recorded if name not in actual]
    problems += [f"{name} changed" for name, h in recorded.items()
                 if name in actual and actual[name] != h]
    return problems

  def _set_aside(self, step: int, why: str) -> None:
    """Moves a corrupt step out of the way (kept for inspection) and warns."""
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(self.directory, f"corrupt-{step}")
    warnings.warn(f"checkpoint step {step} in {self.directory} is damaged ({why}); it was "
                  f"moved to {dst} and the previous intact checkpoint is used instead",
                  stacklevel=3)
    if jax.process_index() == 0 and os.path.isdir(src):
      if os.path.exists(dst):
        shutil.rmtree(dst)
      os.rename(src, dst)
    self._manager.reload()
    self._record_checksums()

  def _intact(self, attempt, step: int | None):
    """attempt(step) on the newest intact checkpoint (or on `step`), setting damaged newer
    ones aside; returns (step, result)."""
    self.wait()
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(
          f"No checkpoint found in {self.directory}; train first or point the directory at "
          "an existing checkpoints folder.")
    if step is not None:
      if int(step) not in steps:
        raise FileNotFoundError(
            f"No checkpoint for step {step} in {self.directory}; available steps: {steps}.")
      candidates = [int(step)]
    else:
      candidates = steps[::-1]
    errors = []
    for s in candidates:
      problems = self.verify(s)
      if not problems:
        try:
          return s, attempt(s)
        except Exception as e:  # noqa: BLE001  (a damaged file fails in many ways)
          problems = [f"unreadable: {type(e).__name__}: {str(e)[:200]}"]
      errors.append(f"step {s}: {'; '.join(problems)}")
      if step is None:
        self._set_aside(s, "; ".join(problems))
    raise ValueError(f"no intact checkpoint in {self.directory} ({' | '.join(errors)}); "
                     "delete the folder to train from scratch")

  # -- reading ---------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Steps with a finished checkpoint, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """Newest saved step, or None when the directory holds no checkpoint."""
    return self._manager.latest_step()

  def restore(self, step: int | None = None, target: Any = None, shardings: Any = None) -> Any:
    """Reads checkpoint `step` (default: the latest).

    Args:
      step: which checkpoint; None = `latest_step()`.
      target: pytree with the saved structure, concrete (e.g. the freshly
        initialised state) or abstract (`jax.eval_shape(init_fn, ...)`, leaves
        `jax.ShapeDtypeStruct`). It rebuilds containers such as optax
        NamedTuples and sets shapes/dtypes. Without it, the saved structure is
        returned with NamedTuples as lists and arrays on their saved sharding.
      shardings: where restored arrays land: one `jax.sharding.Sharding` for
        every array leaf, or a pytree matching `target` (None leaves = default:
        a JAX array's own sharding, NumPy stays NumPy). Arrays are read straight
        into these shardings, e.g. `NamedSharding(mesh, P("data"))` over 8
        devices. Needs `target`.

    Returns:
      The restored pytree.

    Raises:
      FileNotFoundError: when there is no checkpoint (or not this step).
      ValueError: for `shardings` without `target`.
    """
    if target is None and shardings is not None:
      raise ValueError("restore(shardings=...) needs target=... to pair shardings with "
                       "leaves; pass the initial state or jax.eval_shape of its init.")
    return self.restore_latest(target, shardings, step=step)[1]

  def restore_latest(self, target: Any = None, shardings: Any = None,
                     step: int | None = None) -> tuple[int, Any]:
    """(step, pytree) of the newest intact checkpoint (or of `step`), as `restore` reads it.

    Each step's files are checked against the sha256 sums recorded when it was saved; a
    damaged or unreadable newest step is moved aside (to `corrupt-<step>`, with a warning)
    and the one before it is used.
    """
    def attempt(s):
      if target is None:
        return self._manager.restore(int(s), args=ocp.args.StandardRestore())
      abstract = _abstract_target(target, shardings)
      return self._manager.restore(int(s), args=ocp.args.StandardRestore(abstract))
    return self._intact(attempt, step)

  def restore_part(self, part: Any, step: int | None = None) -> tuple[int, Any]:
    """(step, the subtrees named by `part`) of checkpoint `step` (default: newest intact).

    `part` is a dict with some of the saved top-level keys, each mapping to an (abstract or
    concrete) target of that subtree, e.g. {"ema_params": jax.eval_shape(...)}: only those
    arrays are read (for inference, the optimiser state is never loaded). Arrays come back
    as NumPy arrays. Damaged steps are handled as in `restore_latest`.
    """
    abstract = jax.tree_util.tree_map(
        lambda x: np.zeros(x.shape, x.dtype) if _is_array_like(x) else x, part)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)

    def attempt(s):
      item = os.path.join(self.directory, str(s), _ITEM)
      return ocp.PyTreeCheckpointer().restore(
          item, args=ocp.args.PyTreeRestore(abstract, restore_args=restore_args,
                                            partial_restore=True))
    return self._intact(attempt, step)

  # -- lifetime --------------------------------------------------------------

  def close(self) -> None:
    """Waits for pending saves (recording their checksums) and releases the manager."""
    self.wait()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def __repr__(self) -> str:
    return f"Checkpointer({self.directory!r}, steps={self.all_steps()})"
