"""Progress for long host loops and for code running inside `jax.jit` / `lax.scan`.

A jitted solver cannot print as it goes, so `tick` emits a `jax.debug.callback` every `every`
steps that moves the *currently active* host bar. The active bar lives in a module-level
stack rather than in the traced function's closure, so a cached compilation keeps reporting to
whichever bar the caller opened this time:

    with progress.bar(total=num_steps, desc="SDP solve"):
      x = solve(params, y, z, psf, srf, key)      # solve calls progress.tick(i) in its scan

How progress shows (environment variable HSIJAX_PROGRESS, on process 0 only):
  bar   a tqdm bar (the default when stderr is a terminal);
  log   one plain line at every 10% of a bar (and at its end) with elapsed seconds and the
        last loss: readable in batch-job logs and CI (the default otherwise);
  off   nothing ("0" works too). `silenced()` turns it off for a block of code.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

_ACTIVE: list[Any] = []
_SILENCED = [0]
MODES = ("bar", "log", "off")


def mode() -> str:
  """"bar", "log" or "off" (see the module docstring)."""
  if _SILENCED[0] or jax.process_index() != 0:
    return "off"
  flag = os.environ.get("HSIJAX_PROGRESS", "").strip().lower()
  if flag in ("0", "false", "off", "none"):
    return "off"
  if flag in ("1", "true", "bar"):
    return "bar"
  if flag == "log":
    return "log"
  return "bar" if sys.stderr.isatty() else "log"


def enabled() -> bool:
  return mode() != "off"


@contextlib.contextmanager
def silenced() -> Iterator[None]:
  """No progress output inside the block (nested blocks are fine)."""
  _SILENCED[0] += 1
  try:
    yield
  finally:
    _SILENCED[0] -= 1


class LogBar:
  """The tqdm calls hsijax uses (update, set_postfix, close, n), printed as log lines."""

  def __init__(self, total: int | None, desc: str = "", unit: str = "step", initial: int = 0):
    self.total, self.desc, self.unit = total, desc, unit
    self.n = int(initial)
    self._start = time.perf_counter()
    self._postfix = ""
    self._next = self._mark_after(self.n)
    self._closed = False

  def _mark_after(self, n: int) -> int:
    if not self.total:
      return 1 << 62
    tenth = max(self.total / 10.0, 1.0)
    return min(int((int(n / tenth) + 1) * tenth), self.total)

  def _print(self) -> None:
    total = f"/{self.total}" if self.total else ""
    pct = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
    post = f", {self._postfix}" if self._postfix else ""
    print(f"{self.desc}: {self.n}{total} {self.unit}s{pct}, "
          f"{time.perf_counter() - self._start:.1f} s{post}", file=sys.stdout, flush=True)

  def update(self, k: int = 1) -> None:
    self.n += int(k)
    if self.n >= self._next:
      self._print()
      self._next = self._mark_after(self.n)

  def set_postfix(self, refresh: bool = False, **kwargs: Any) -> None:
    del refresh
    self._postfix = ", ".join(f"{k} {v}" for k, v in kwargs.items())

  def close(self) -> None:
    if not self._closed and self.total and self.n < self.total and self.n > 0:
      self._print()
    self._closed = True


def _make(total: int | None, desc: str, unit: str, initial: int = 0, iterable=None):
  m = mode()
  if m == "log" and iterable is None:
    return LogBar(total, desc, unit, initial)
  return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial,
              disable=(m != "bar"), dynamic_ncols=True)


@contextlib.contextmanager
def bar(total: int, desc: str = "", unit: str = "step") -> Iterator[Any]:
  """Opens a host bar that `tick` calls inside jitted code will advance."""
  b = _make(int(total), desc, unit)
  _ACTIVE.append(b)
  try:
    yield b
  finally:
    _ACTIVE.remove(b)
    b.close()


def _advance_to(position) -> None:
  if _ACTIVE:
    b = _ACTIVE[-1]
    position = int(position)
    if position > b.n:
      b.update(position - b.n)


def tick(done: jax.Array, every: int = 10) -> None:
  """Inside traced code: report that `done` steps are finished (every `every` steps).

  `done` is a traced integer (e.g. the number of outer solver steps completed). Costs one
  host callback per `every` steps and nothing else.
  """
  done = jnp.asarray(done)
  jax.lax.cond(
      (done % every == 0),
      lambda d: jax.debug.callback(_advance_to, d, ordered=False),
      lambda d: None,
      done)


def host_bar(iterable: Iterable | None = None, total: int | None = None,
             desc: str = "", unit: str = "it", initial: int = 0) -> Any:
  """A bar for Python-level loops (training steps, files), shown on process 0 only."""
  return _make(total, desc, unit, initial, iterable)
