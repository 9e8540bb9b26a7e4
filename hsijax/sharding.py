"""Device mesh, shardings and multi-host setup.

The layout is the usual data-parallel one: a `jax.sharding.Mesh` built from the
config (`("data",)` by default, optionally `("data", "model")`), parameters
replicated, and pixels / images / tiles sharded along their leading axis over
the `"data"` mesh axis. Computations use `jax.jit(in_shardings=...,
out_shardings=...)` with the `NamedSharding`s made here.

Typical use in a launch script:

  sharding.initialize_distributed()          # before any other JAX call
  mesh = sharding.make_mesh(config.get("mesh"))
  params = sharding.replicate(params, mesh)
  batch = sharding.shard_batch(host_batch, mesh)
  step = jax.jit(train_step,
                 in_shardings=(sharding.replicated(mesh), sharding.data_sharded(mesh)),
                 out_shardings=sharding.replicated(mesh))

On CPU, `XLA_FLAGS=--xla_force_host_platform_device_count=8` gives 8 devices to
check that sharded and unsharded results agree.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
DEFAULT_MESH = {"axes": (DATA_AXIS,), "shape": (-1,)}

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------
# Mesh.


def _as_tuple(value: Any, name: str) -> tuple:
  """Tuple from a tuple/list or a comma-separated command-line string."""
  if isinstance(value, str):
    value = tuple(v.strip() for v in value.strip("()[] ").split(",") if v.strip())
  if not isinstance(value, Sequence):
    raise ValueError(f"mesh.{name} must be a tuple like ('data',) or (-1,), got {value!r}.")
  return tuple(value)


def _mesh_fields(config_mesh: Any) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Reads (axes, shape) from a ConfigDict, a dict or None."""
  if config_mesh is None:
    config_mesh = DEFAULT_MESH
  if hasattr(config_mesh, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict.
    config_mesh = config_mesh.to_dict()
  if not isinstance(config_mesh, Mapping):
    raise ValueError(
        "config_mesh must be a dict/ConfigDict like {'axes': ('data',), 'shape': (-1,)} "
        f"or None, got {type(config_mesh).__name__}.")
  unknown = set(config_mesh) - {"axes", "shape"}
  if unknown:
    raise ValueError(f"Unknown mesh config field(s) {sorted(unknown)}; only 'axes' and "
                     "'shape' are understood.")
  axes = tuple(str(a) for a in _as_tuple(config_mesh.get("axes", DEFAULT_MESH["axes"]), "axes"))
  if "shape" in config_mesh and config_mesh["shape"] is not None:
    try:
      shape = tuple(int(s) for s in _as_tuple(config_mesh["shape"], "shape"))
    except (TypeError, ValueError) as e:
      raise ValueError(f"mesh.shape must hold integers (-1 = all remaining devices), got "
                       f"{config_mesh['shape']!r}.") from e
  else:
    # Default: everything on the first axis, the others of size 1.
    shape = (-1,) + (1,) * (len(axes) - 1)
  return axes, shape


def _resolve_shape(axes: tuple[str, ...], shape: tuple[int, ...], n_devices: int) -> tuple[int, ...]:
  """Replaces a single -1 in `shape` so that the product is `n_devices`."""
  if not axes:
    raise ValueError("mesh.axes is empty; give at least one axis, e.g. ('data',).")
  if len(set(axes)) != len(axes):
    raise ValueError(f"mesh.axes {axes} has repeated names; give each axis a unique name.")
  if len(axes) != len(shape):
    raise ValueError(f"mesh.axes {axes} and mesh.shape {shape} have different lengths; give "
                     "one size per axis (use -1 for 'all remaining devices').")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh.shape {shape} has more than one -1; at most one axis can take "
                     "'all remaining devices'.")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh.shape {shape} has a size that is not positive; use positive "
                     "sizes and at most one -1.")
  fixed = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n_devices % fixed:
      raise ValueError(
          f"mesh.shape {shape} cannot fill {n_devices} devices: the fixed sizes multiply to "
          f"{fixed}, which does not divide {n_devices}. Choose sizes whose product divides "
          f"{n_devices}.")
    shape = tuple(n_devices // fixed if s == -1 else s for s in shape)
  elif fixed != n_devices:
    raise ValueError(
        f"mesh.shape {shape} multiplies to {fixed} but there are {n_devices} devices; make "
        f"the product equal {n_devices} or put -1 on one axis.")
  return shape


def make_mesh(config_mesh: Any = None, *, devices: Sequence[Any] | None = None) -> Mesh:
  """Builds the device mesh from config.

  Args:
    config_mesh: `{"axes": ("data",), "shape": (-1,)}` (the default when None) or
      e.g. `{"axes": ("data", "model"), "shape": (-1, 2)}`; a ConfigDict works
      too. A -1 means "all remaining devices"; without `shape` the first axis
      takes all devices and the others have size 1.
    devices: devices to use (default: all of `jax.devices()`, over all hosts).

  Returns:
    A `Mesh` whose axes are all `AxisType.Auto`: shardings are given to
    `jax.jit` and XLA propagates them inside (the pjit style), rather than being
    part of array types (`Explicit`, the `jax.make_mesh` default in jax 0.10),
    which would reject ops like reshapes across sharded dimensions in model code.

  Raises:
    ValueError: when the shape does not multiply to the device count.
  """
  axes, shape = _mesh_fields(config_mesh)
  devices = list(jax.devices() if devices is None else devices)
  shape = _resolve_shape(axes, shape, len(devices))
  return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


# ----------------------------------------------------------------------------
# Shardings and placement.


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device (parameters, optimiser state)."""
  return NamedSharding(mesh, PartitionSpec())


def _data_size(mesh: Mesh) -> int:
  if DATA_AXIS not in mesh.axis_names:
    raise ValueError(f"The mesh has axes {mesh.axis_names} but no {DATA_AXIS!r} axis; build it "
                     f"with make_mesh({{'axes': ('{DATA_AXIS}', ...), ...}}).")
  return mesh.shape[DATA_AXIS]


def data_sharded(mesh: Mesh, ndim: int | None = None) -> NamedSharding:
  """Sharding that splits the leading axis over `"data"`, other axes whole.

  `ndim` only spells the trailing axes out (`PartitionSpec("data", None, ...)`);
  both forms shard the same way, and ndim=None suits arrays of any rank >= 1.
  """
  _data_size(mesh)
  if ndim is None:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))
  if ndim < 1:
    raise ValueError(f"data_sharded needs ndim >= 1 (a leading batch axis), got {ndim}; "
                     "use replicated(mesh) for scalars.")
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS, *([None] * (ndim - 1))))


def _local_data_shards(mesh: Mesh) -> int:
  """Number of data shards fed by this process (all of them on one host)."""
  n = _data_size(mesh)
  procs = jax.process_count()
  # Multi-host convention: each process feeds an equal slice of the global batch.
  return n // procs if procs > 1 and n % procs == 0 else n


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Puts a host pytree on the devices, leading axis split over `"data"`.

  Args:
    batch: pytree of arrays, each `(N, ...)` with the same or different N
      (e.g. pixels `(N, B)` or images `(N, H, W, B)`). On several hosts each
      process passes its own part of the global batch.
    mesh: mesh with a `"data"` axis.

  Returns:
    The same pytree of `jax.Array`s sharded with `data_sharded(mesh)`.

  Raises:
    ValueError: for a scalar leaf or a leading size not divisible by the
      number of data shards.
  """
  n = _local_data_shards(mesh)
  sharding = data_sharded(mesh)

  def put(path, x):
    name = jax.tree_util.keystr(path) or "batch"
    shape = np.shape(x)
    if len(shape) == 0:
      raise ValueError(f"{name} is a scalar; batch leaves need a leading batch axis. Pass "
                       "scalars with replicate(tree, mesh) instead.")
    if shape[0] % n:
      raise ValueError(
          f"{name} has leading size {shape[0]}, which does not split over {n} devices on "
          f"the 'data' axis. Choose a batch size divisible by {n}, or pad with "
          "pad_to_multiple(x, multiple=...).")
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    # Multi-host: each process holds only its slice of the global batch.
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  return jax.tree_util.tree_map_with_path(put, batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Copies a pytree (e.g. parameters, keys) to every device of the mesh.

  On several hosts every process must pass the same values (each process places its own
  copy on its devices; `device_put` cannot target other processes' devices).
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, replicated(mesh))
  spec = replicated(mesh)
  return jax.tree_util.tree_map(lambda x: put_global(x, spec), tree)


def put_global(x: Any, spec: NamedSharding) -> jax.Array:
  """An array that every process holds whole -> a global array with sharding `spec`
  (also typed PRNG keys)."""
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(put_global(jax.random.key_data(x), spec),
                                    impl=jax.random.key_impl(x))
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, spec, lambda index: x[index])


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-host) sharded array as one NumPy array on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def pad_to_multiple(x: Any, multiple: int, axis: int = 0) -> tuple[Any, int]:
  """Pads `axis` up to a multiple of `multiple` by repeating the last entry.

  Used for pixel batches `(N, B)` or tiles `(N, h, w, B)` whose N does not divide
  the device count. Edge repetition (not zeros) keeps padded rows valid inputs,
  so nothing like a zero norm turns into NaN; drop them with `x[:original_size]`
  (or `unpad`) after the computation.

  Args:
    x: NumPy or JAX array.
    multiple: positive integer, e.g. `mesh.shape["data"]`.
    axis: axis to pad.

  Returns:
    (padded, original_size): padded has the same type as x and
    `padded.shape[axis] % multiple == 0`.
  """
  if int(multiple) != multiple or multiple < 1:
    raise ValueError(f"multiple must be a positive integer, got {multiple!r}.")
  ndim = np.ndim(x)
  if not -ndim <= axis < ndim:
    raise ValueError(f"axis {axis} is out of range for an array with {ndim} dimensions; "
                     f"pick an axis in [{-ndim}, {ndim}).")
  axis = axis % ndim
  size = np.shape(x)[axis]
  extra = -size % int(multiple)
  if extra == 0:
    return x, size
  if size == 0:
    raise ValueError(f"Cannot pad an empty axis {axis} by edge repetition; give at least one "
                     "entry.")
  widths = [(0, 0)] * ndim
  widths[axis] = (0, extra)
  xp = jnp if isinstance(x, jax.Array) else np
  return xp.pad(x, widths, mode="edge"), size


def unpad(x: Any, original_size: int, axis: int = 0) -> Any:
  """Undoes `pad_to_multiple`: keeps the first `original_size` entries of `axis`."""
  index = [slice(None)] * np.ndim(x)
  index[axis] = slice(0, original_size)
  return x[tuple(index)]


# ----------------------------------------------------------------------------
# Multi-host.


def _int_env(name: str) -> int | None:
  value = os.environ.get(name, "").strip()
  try:
    return int(value) if value else None
  except ValueError:
    return None


def _multihost_env() -> str | None:
  """Name of the detected multi-process launcher, or None on a single host."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  if (_int_env("SLURM_NTASKS") or 1) > 1 and "SLURM_JOB_ID" in os.environ:
    return "slurm"
  if (_int_env("OMPI_COMM_WORLD_SIZE") or 1) > 1 and "OMPI_MCA_orte_hnp_uri" in os.environ:
    return "openmpi"
  workers = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES")
  if workers and len([w for w in workers.split(",") if w.strip()]) > 1:
    return "tpu_pod"
  if os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu_multislice"
  return None


def initialize_distributed(force: bool = False, *, coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Starts the JAX multi-process runtime when the run spans several processes.

  Call it first thing in a launch script, before any other JAX call. Explicit arguments
  (the entry points' --coordinator_address, --num_processes, --process_id) win; otherwise it
  calls `jax.distributed.initialize()` only when the environment shows a multi-process
  launch, and is a no-op otherwise (a laptop, one GPU box, CI):

  * `JAX_COORDINATOR_ADDRESS` is set (manual launch; `JAX_NUM_PROCESSES` and
    `JAX_PROCESS_ID` are passed on when set),
  * Slurm with `SLURM_NTASKS > 1`,
  * Open MPI (`mpirun`) with `OMPI_COMM_WORLD_SIZE > 1`,
  * a Cloud TPU pod (several `TPU_WORKER_HOSTNAMES` / `TPU_PROCESS_ADDRESSES`)
    or multislice (`MEGASCALE_COORDINATOR_ADDRESS`).

  CPU devices of different processes talk through gloo collectives (set here). Calling it
  twice is safe: the second call sees the runtime is up and returns.

  Args:
    force: call `jax.distributed.initialize()` even when nothing above is found
      (for launchers JAX auto-detects itself, e.g. Kubernetes).
    coordinator_address, num_processes, process_id: an explicit multi-process launch
      (e.g. two processes on one machine: localhost:12345, 2, 0 and 1).

  Returns:
    True when the multi-host runtime is running after the call.
  """
  if jax.distributed.is_initialized():
    return True
  explicit = coordinator_address is not None
  launcher = "explicit" if explicit else _multihost_env()
  if launcher is None and not force:
    return False
  if explicit:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id too "
                       "(e.g. --num_processes=2 --process_id=0 on the first process)")
    if not 0 <= int(process_id) < int(num_processes):
      raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                       f"{num_processes})")
    kwargs = {"coordinator_address": coordinator_address,
              "num_processes": int(num_processes), "process_id": int(process_id)}
  elif launcher == "JAX_COORDINATOR_ADDRESS":
    kwargs = {"num_processes": _int_env("JAX_NUM_PROCESSES"),
              "process_id": _int_env("JAX_PROCESS_ID")}
  else:
    kwargs = {}
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  _log.info("Initialising jax.distributed (%s).", launcher or "forced")
  jax.distributed.initialize(**kwargs)
  return True


def is_main_process() -> bool:
  """True on process 0, the one that writes logs, JSON and figures."""
  return jax.process_index() == 0
