"""Progress bars for long host loops and for code running inside `jax.jit` / `lax.scan`.

A jitted solver cannot print as it goes, so `tick` emits a `jax.debug.callback` every `every`
steps that moves the *currently active* host bar. The active bar lives in a module-level
stack rather than in the traced function's closure, so a cached compilation keeps reporting to
whichever bar the caller opened this time:

    with progress.bar(total=num_steps, desc="SDP solve"):
      x = solve(params, y, z, psf, srf, key)      # solve calls progress.tick(i) in its scan

Bars only draw on process 0 and when stderr is a terminal or HSIJAX_PROGRESS=1; otherwise
they are silent (tests, CI logs), but the callbacks still compile the same way.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

_ACTIVE: list[tqdm] = []


def enabled() -> bool:
  flag = os.environ.get("HSIJAX_PROGRESS")
  if flag is not None:
    return flag not in ("0", "", "false")
  return jax.process_index() == 0 and sys.stderr.isatty()


@contextlib.contextmanager
def bar(total: int, desc: str = "", unit: str = "step") -> Iterator[tqdm | None]:
  """Opens a host bar that `tick` calls inside jitted code will advance."""
  b = tqdm(total=int(total), desc=desc, unit=unit, disable=not enabled(), dynamic_ncols=True)
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
             desc: str = "", **kwargs) -> tqdm:
  """tqdm for Python-level loops (training steps, files), drawn on process 0 only."""
  return tqdm(iterable, total=total, desc=desc, disable=not enabled(), dynamic_ncols=True,
              **kwargs)
