"""One platform policy: every choice that depends on where the code runs, in one place.

    policy = Policy.for_backend("gpu")            # or Policy.default(): the running backend
    solve = hsijax.sdp.make_solver(model, schedule, ..., policy=policy)
    unet = hsijax.scdm.CondUNet(out_channels=48, policy=policy)

No other module asks `jax.default_backend()`: the entry points build the policy once
(`Policy.default()`, overridden by `--config.policy.<field>=...`) and pass it into the
library; functions that take `policy=None` use `Policy.default()`.

Fields (CPU / GPU / TPU values):
  conv_impl           "cpu": the U-Net's 3x3 convolutions by the CPU kernels of
                      `hsijax.kernels` (im2col + matmul on small maps, upsampling by phase
                      kernels, Winograd F(2x2, 3x3) on wide layers, a two-step GroupNorm);
                      "xla": native `lax.conv_general_dilated` everywhere, flax GroupNorm.
                      cpu / xla / xla.
  blur_method         `degrade.blur_down` on the SDP data terms: "matmul" (block matmul, fast
                      on CPU, where the gradient of a strided grouped conv is slow) or "conv"
                      (strided grouped convolution). matmul / conv / conv.
  pixel_chunk         pixels per block of the solver's prior gradient. CPU: 512 (one block's
                      activations stay in cache, blocks run one after another); accelerators:
                      None = all pixels in one batched computation, chunked only when a
                      memory estimate (`memory_budget_gb`) says they must be.
  memory_budget_gb    device memory the solver's prior gradient may use (for pixel_chunk None).
  donate              donate the training state to the jitted step (halves its memory).
                      False on CPU (XLA:CPU ran the SDM step 35-40% slower with donation),
                      True on accelerators.
  progress_every      scan steps between progress callbacks inside jitted loops (10 / 50 / 50:
                      a host callback costs more relative to a fast accelerator step).
  steps_per_call      training steps per dispatch (one `lax.fori_loop` of them between log and
                      checkpoint points): 10 / 100 / 100.
  shard_pixels        shard the rows of an untiled SDP solve over the mesh's `data` axis.

Matmul precision is not a platform choice here: the networks take theirs from their settings
(`PriorSettings.precision`, "default" = the backend's: float32 on CPU, TF32 on GPU, bf16
passes on TPU), and the data-fidelity terms, the classical methods, the linear baseline and
the metrics always run in float32 (`lax.Precision.HIGHEST`), so TF32 or bf16 never changes a
published number.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Iterator

import jax
import jax.numpy as jnp

BACKENDS = ("cpu", "gpu", "tpu")
CONV_IMPLS = ("cpu", "xla")
BLUR_METHODS = ("matmul", "conv")


@dataclasses.dataclass(frozen=True)
class Policy:
  """Platform choices (see the module docstring); hashable, so it can key compile caches."""
  backend: str = "cpu"
  conv_impl: str = "cpu"
  blur_method: str = "matmul"
  pixel_chunk: int | None = 512
  memory_budget_gb: float = 4.0
  donate: bool = False
  progress_every: int = 10
  steps_per_call: int = 10
  shard_pixels: bool = True

  def __post_init__(self):
    if self.backend not in BACKENDS:
      raise ValueError(f"unknown backend {self.backend!r}; use one of {BACKENDS}")
    if self.conv_impl not in CONV_IMPLS:
      raise ValueError(f"policy.conv_impl must be one of {CONV_IMPLS}, got {self.conv_impl!r}")
    if self.blur_method not in BLUR_METHODS:
      raise ValueError(f"policy.blur_method must be one of {BLUR_METHODS}, got "
                       f"{self.blur_method!r}")
    if self.pixel_chunk is not None and int(self.pixel_chunk) < 1:
      raise ValueError(f"policy.pixel_chunk must be >= 1 or None, got {self.pixel_chunk}")
    for name in ("progress_every", "steps_per_call"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"policy.{name} must be >= 1, got {getattr(self, name)}")

  @classmethod
  def for_backend(cls, name: str) -> "Policy":
    """The policy for "cpu", "gpu" (NVIDIA / AMD) or "tpu"."""
    name = {"cuda": "gpu", "rocm": "gpu"}.get(str(name).lower(), str(name).lower())
    if name not in BACKENDS:
      raise ValueError(f"unknown backend {name!r}; use one of {BACKENDS}")
    if name == "cpu":
      return cls()
    return cls(backend=name, conv_impl="xla", blur_method="conv", pixel_chunk=None,
               memory_budget_gb=8.0 if name == "gpu" else 4.0, donate=True,
               progress_every=50, steps_per_call=100)

  @classmethod
  def default(cls) -> "Policy":
    """The policy of the backend JAX runs on (the one place that asks)."""
    return cls.for_backend(jax.default_backend())

  def replace(self, **overrides: Any) -> "Policy":
    """A copy with some fields changed; unknown names are an error listing the valid ones."""
    known = [f.name for f in dataclasses.fields(self)]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
      raise ValueError(f"unknown policy field(s) {unknown}; valid: {known} "
                       "(--config.policy.<field>=...)")
    return dataclasses.replace(self, **overrides)

  @classmethod
  def from_config(cls, overrides: Any = None, backend: str | None = None) -> "Policy":
    """The backend's policy with a config's `policy` fields applied (unset ones = None)."""
    base = cls.default() if backend is None else cls.for_backend(backend)
    if overrides is None:
      return base
    d = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides)
    return base.replace(**{k: v for k, v in d.items() if v is not None})


def resolve(policy: Policy | None) -> Policy:
  """`policy`, or the running backend's when None."""
  return Policy.default() if policy is None else policy


def solver_chunk(policy: Policy, num_pixels: int, hidden: int, num_layers: int,
                 num_bands: int) -> int | None:
  """Pixels per block of the SDP prior gradient: the policy's fixed chunk, or (None) all
  pixels unless the saved activations (about 3 (L - 1) hidden + 4 B floats per pixel)
  exceed the memory budget, then the largest power of two that fits."""
  if policy.pixel_chunk is not None:
    return int(policy.pixel_chunk)
  per_pixel = 4 * (3 * (num_layers - 1) * hidden + 4 * num_bands + num_layers * hidden)
  fits = int(policy.memory_budget_gb * 2**30 // per_pixel)
  if num_pixels <= fits:
    return None
  chunk = 1
  while chunk * 2 <= fits:
    chunk *= 2
  return max(chunk, 256)


# ---------------------------------------------------------------------------------------
# Matmul precision (config field `precision`): one name for every platform.
#
#   "default"        the backend's default: full float32 on CPU, TF32 on recent NVIDIA GPUs,
#                    one bfloat16 pass on TPU. The library default (unchanged behaviour).
#   "float32"        full float32 matmuls everywhere (`lax.Precision.HIGHEST`): the reference.
#   "tensorfloat32"  TF32 / 3-pass bfloat16 where the hardware has it (`Precision.HIGH`); no
#                    effect on CPU.
#   "bfloat16"       matmul operands rounded to bfloat16, products accumulated in float32
#                    (`preferred_element_type=float32`); everything else (LayerNorm, SiLU,
#                    losses, optimiser state, parameters) stays float32. Same numerics on every
#                    platform (it is what a TPU does by default), and on CPUs with AVX512-BF16
#                    the dots can run on the bfloat16 units.
#
# Models written in this repository call `dot(a, b, precision)` for their matmuls (the SDP
# denoiser does); for third-party modules, `precision_scope(precision)` sets
# `jax.default_matmul_precision` while tracing (it cannot change operand dtypes, so there
# "bfloat16" only has an effect on accelerators).
# ---------------------------------------------------------------------------------------

PRECISIONS = ("default", "float32", "tensorfloat32", "bfloat16")

# Name -> lax.Precision for jnp.matmul (None = backend default). "bfloat16" casts operands.
_LAX = {"default": None, "float32": jax.lax.Precision.HIGHEST,
        "tensorfloat32": jax.lax.Precision.HIGH, "bfloat16": None}
# Name -> jax.default_matmul_precision value for `precision_scope` (None = leave the default alone).
_SCOPE = {"default": None, "float32": "float32", "tensorfloat32": "tensorfloat32",
          "bfloat16": "bfloat16"}


def check_precision(precision: str) -> str:
  """Returns `precision` if it is a known policy, else raises ValueError naming the choices."""
  if precision not in PRECISIONS:
    raise ValueError(f"unknown precision {precision!r}; use one of {PRECISIONS} "
                     "(e.g. --config.precision=bfloat16)")
  return precision


def operand_dtype(precision: str) -> jnp.dtype:
  """dtype the matmul operands are rounded to under `precision` (float32 or bfloat16)."""
  return jnp.dtype(jnp.bfloat16 if check_precision(precision) == "bfloat16" else jnp.float32)


def dot(a: jax.Array, b: jax.Array, precision: str = "default") -> jax.Array:
  """a @ b (matmul semantics) under a precision policy; the result is float32.

  Args:
    a: (..., k) array.  b: (k, m) or (k,) array.  precision: a name in PRECISIONS.
  """
  if check_precision(precision) == "bfloat16":
    return jnp.matmul(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                      preferred_element_type=jnp.float32)
  return jnp.matmul(a, b, precision=_LAX[precision])


@contextlib.contextmanager
def precision_scope(precision: str) -> Iterator[None]:
  """`jax.default_matmul_precision` for the policy while tracing (no-op for "default")."""
  value = _SCOPE[check_precision(precision)]
  if value is None:
    yield
  else:
    with jax.default_matmul_precision(value):
      yield


def precision_from_config(config) -> str:
  """config.precision (top level) if present, else "default"; validated."""
  value = config.get("precision", None) if hasattr(config, "get") else None
  return check_precision(value or "default")


def float32_matmuls(fn):
  """Decorator: `fn` traces and runs with float32 (HIGHEST) matmuls on every backend.

  For reference numerics (classical methods, the linear baseline): TF32 on a GPU or one bf16
  pass on a TPU would otherwise change their published numbers.
  """
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.default_matmul_precision("float32"):
      return fn(*args, **kwargs)
  return wrapped
