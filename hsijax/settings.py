"""How the library's verbs take their arguments: keyword settings and PRNG keys.

Settings are frozen dataclasses (`hsijax.sdp.PriorSettings`, `FusionSettings`, ...). The verbs
take them as keyword arguments (`train_prior(pixels, steps=..., key=..., hidden=256)`), so a
script needs no config system; `from_kwargs` turns a typo into an error that lists the valid
names instead of a bare TypeError. Keys may be given as a typed key, a raw uint32 key or an
int seed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

T = TypeVar("T")


class Settings:
  """Base of the settings dataclasses: `from_kwargs` and checks shared by all of them."""
  WHAT: ClassVar[str] = "settings"

  @classmethod
  def from_kwargs(cls, **settings: Any):
    """cls(**settings), with an error that lists the valid names for a misspelt one."""
    return from_kwargs(cls, settings, cls.WHAT)

  def require_positive(self, *names: str) -> None:
    """ValueError unless every named integer field is >= 1."""
    for name in names:
      if int(getattr(self, name)) < 1:
        raise ValueError(f"{self.WHAT} setting {name} must be >= 1, got {getattr(self, name)}")


def from_kwargs(cls: type[T], settings: dict[str, Any], what: str) -> T:
  """cls(**settings), with unknown names reported together with the valid ones."""
  known = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(settings) - set(known))
  if unknown:
    raise TypeError(f"unknown {what} setting(s) {unknown}; valid names: {known}")
  return cls(**settings)


def as_dict(settings: Any) -> dict[str, Any]:
  """A settings dataclass as a JSON-friendly dict (tuples become lists)."""
  def plain(v):
    if isinstance(v, tuple):
      return [plain(x) for x in v]
    return v
  return {f.name: plain(getattr(settings, f.name)) for f in dataclasses.fields(settings)}


def as_key(key: Any) -> jax.Array:
  """A typed PRNG key from a typed key, a raw (2,) uint32 key or an int seed."""
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    return jax.random.key(int(key))
  if key is None:
    raise TypeError("key is required: pass key=jax.random.key(0) or an int seed")
  arr = key if isinstance(key, jax.Array) else jnp.asarray(key)
  if jax.dtypes.issubdtype(arr.dtype, jax.dtypes.prng_key):
    return arr
  if arr.dtype == jnp.uint32 and arr.shape == (2,):
    return jax.random.wrap_key_data(arr)
  raise TypeError(f"key must be jax.random.key(seed) or an int seed, got {key!r}")


def key_fingerprint(key: Any) -> str:
  """Hex digits of a key's data (to record which key a run used)."""
  return np.asarray(jax.random.key_data(as_key(key))).astype(">u4").tobytes().hex()
