"""A workdir for one run at a time: checked before the work, locked, its status recorded.

    path, created = workdir.prepare("runs/fuse")     # refuses a file, a read-only folder,
                                                     # or a folder another run holds
    workdir.set_status(path, "running")              # DIR/run.json {"status": ...}
    ...
    workdir.set_status(path, "finished")

The lock is an exclusive `flock` on DIR/.hsijax.lock held for the life of the process (the
operating system drops it when the process dies, so a killed run never blocks the next one);
its text names the holder (pid, host, command, start time) for the error a second run gets.
Temp files that a killed run's atomic writes left (`.*.tmp`) are removed once the lock is
held. A killed run leaves "status": "running" in run.json with its pid.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import pathlib
import socket
import sys
from typing import Any

import jax

from hsijax import fileio

LOCK_FILE = ".hsijax.lock"
_HELD: list[Any] = []  # open lock files (kept for the life of the process)


def _now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def resolve(workdir: str | os.PathLike | None) -> pathlib.Path:
  """The absolute path of a --workdir value; refuses an empty one, a URL and a file."""
  if not workdir:
    raise ValueError("--workdir is required: pass --workdir=DIR for outputs and checkpoints")
  if "://" in str(workdir):  # pathlib would silently turn gs://b/x into ./gs:/b/x
    raise ValueError(
        f"--workdir={workdir} is a URL; the entry points write to local paths only. Mount "
        "the bucket (e.g. gcsfuse) or use a shared filesystem and pass its local path.")
  path = pathlib.Path(workdir).expanduser().resolve()
  if path.exists() and not path.is_dir():
    raise ValueError(f"--workdir={workdir} is a file, not a folder; pass a folder path")
  return path


def fresh_subfolder(workdir: str | os.PathLike) -> pathlib.Path:
  """WORKDIR/run-<N>, the next N not taken: a fresh start beside earlier runs (--fresh).

  In a multi-process run every process gets process 0's choice.
  """
  path = resolve(workdir)
  taken = [int(p.name[4:]) for p in path.glob("run-*") if p.name[4:].isdigit()]
  n = max(taken, default=0) + 1
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    n = int(multihost_utils.broadcast_one_to_all(jax.numpy.int32(n)))
  return path / f"run-{n}"


def prepare(workdir: str | os.PathLike) -> tuple[pathlib.Path, bool]:
  """Checks, creates and locks the workdir; returns (path, whether this run created it)."""
  path = resolve(workdir)
  created = not path.exists()
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_test.{os.getpid()}"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise ValueError(f"--workdir={workdir} cannot be written ({e.strerror}); pass a folder "
                     "you can write to") from e
  if jax.process_index() == 0:
    _lock(path)
    for stale in path.glob(".*.tmp"):  # half-written files of a killed run (fileio)
      stale.unlink(missing_ok=True)
  return path, created


def _lock(path: pathlib.Path) -> None:
  f = open(path / LOCK_FILE, "a+")  # pylint: disable=consider-using-with
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    f.seek(0)
    holder = f.read().strip() or "another process"
    f.close()
    raise ValueError(f"{path} is in use by another hsijax run ({holder}); wait for it to "
                     "finish or pass another --workdir") from None
  f.seek(0)
  f.truncate()
  f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {_now()}: "
          f"{' '.join(sys.argv)}")
  f.flush()
  _HELD.append(f)


def set_status(path: pathlib.Path, status: str, **extra: Any) -> None:
  """Merges the run's status into DIR/run.json (process 0)."""
  run_json = path / "run.json"
  try:
    record = json.loads(run_json.read_text()) if run_json.is_file() else {}
  except (OSError, json.JSONDecodeError):
    record = {}
  record.update({"status": status, "pid": os.getpid(), "command": sys.argv,
                 f"{status}_at": _now(), **extra})
  fileio.write_json(run_json, record)




def failed(path: pathlib.Path, created: bool, message: str) -> None:
  """After an error: a workdir this run created and filled with nothing is removed;
  otherwise run.json records the failure."""
  leftovers = {p.name for p in path.iterdir()} - {LOCK_FILE, "run.json"}
  if created and not leftovers:
    for name in (LOCK_FILE, "run.json"):
      (path / name).unlink(missing_ok=True)
    try:
      path.rmdir()
    except OSError:
      pass
    return
  set_status(path, "failed", error=message)
