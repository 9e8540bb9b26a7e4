"""Tests for hsijax.sharding on 8 forced CPU devices (see conftest.py)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from hsijax import sharding


def test_eight_devices_available():
  assert jax.device_count() == 8


def test_default_mesh_is_data_over_all_devices():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ("data",)
  assert mesh.shape == {"data": 8}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
  # Auto axes: shardings are jit arguments, not part of array types.
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_data_model_mesh_from_config_dict():
  cfg = ml_collections.ConfigDict({"axes": ("data", "model"), "shape": (-1, 2)})
  mesh = sharding.make_mesh(cfg)
  assert mesh.axis_names == ("data", "model")
  assert dict(mesh.shape) == {"data": 4, "model": 2}
  assert mesh.devices.shape == (4, 2)


def test_mesh_shape_from_plain_dict_and_string():
  assert dict(sharding.make_mesh({"axes": ("data",), "shape": (8,)}).shape) == {"data": 8}
  mesh = sharding.make_mesh({"axes": "data,model", "shape": "(2, -1)"})
  assert dict(mesh.shape) == {"data": 2, "model": 4}
  # No shape: the first axis takes every device.
  assert dict(sharding.make_mesh({"axes": ("data", "model")}).shape) == {"data": 8, "model": 1}


@pytest.mark.parametrize("cfg, match", [
    ({"axes": ("data",), "shape": (3,)}, r"multiplies to 3 but there are 8 devices"),
    ({"axes": ("data", "model"), "shape": (-1, 3)}, r"does not divide 8"),
    ({"axes": ("data", "model"), "shape": (-1,)}, r"different lengths"),
    ({"axes": ("data", "model"), "shape": (-1, -1)}, r"more than one -1"),
    ({"axes": ("data", "data"), "shape": (2, 4)}, r"repeated"),
    ({"axes": ("data",), "shape": (0,)}, r"not positive"),
    ({"axes": ("data",), "shape": (-1,), "size": 3}, r"Unknown mesh config"),
])
def test_invalid_mesh_config_raises(cfg, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(cfg)


def test_sharding_specs():
  mesh = sharding.make_mesh()
  assert sharding.replicated(mesh).spec == P()
  assert sharding.data_sharded(mesh).spec == P("data")
  assert sharding.data_sharded(mesh, ndim=3).spec == P("data", None, None)
  with pytest.raises(ValueError, match="ndim >= 1"):
    sharding.data_sharded(mesh, ndim=0)
  model_only = sharding.make_mesh({"axes": ("model",), "shape": (-1,)})
  with pytest.raises(ValueError, match="no 'data' axis"):
    sharding.data_sharded(model_only)


def test_shard_batch_places_two_rows_per_device():
  mesh = sharding.make_mesh()
  x = np.arange(80, dtype=np.float32).reshape(16, 5)
  out = sharding.shard_batch({"x": x, "y": x[:, :1] * 2}, mesh)
  arr = out["x"]
  assert isinstance(arr, jax.Array)
  assert arr.sharding == NamedSharding(mesh, P("data"))
  shards = arr.addressable_shards
  assert len(shards) == 8
  assert {s.device for s in shards} == set(jax.devices())
  for s in shards:
    assert s.data.shape == (2, 5)
    # Each device holds the two rows that its index selects.
    np.testing.assert_array_equal(np.asarray(s.data), x[s.index])
  starts = sorted(s.index[0].start for s in shards)
  assert starts == list(range(0, 16, 2))
  np.testing.assert_array_equal(np.asarray(arr), x)
  np.testing.assert_array_equal(np.asarray(out["y"]), x[:, :1] * 2)


def test_shard_batch_on_two_axis_mesh_replicates_over_model():
  mesh = sharding.make_mesh({"axes": ("data", "model"), "shape": (-1, 2)})
  x = np.arange(24, dtype=np.float32).reshape(8, 3)
  arr = sharding.shard_batch(x, mesh)
  # 4 data shards of 2 rows, each held by the 2 devices of its model group.
  assert all(s.data.shape == (2, 3) for s in arr.addressable_shards)
  assert len(arr.addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(arr), x)


def test_shard_batch_bad_size_message():
  mesh = sharding.make_mesh()
  with pytest.raises(ValueError) as info:
    sharding.shard_batch({"pixels": np.zeros((10, 3))}, mesh)
  msg = str(info.value)
  assert "10" in msg and "8 devices" in msg and "divisible by 8" in msg and "pixels" in msg
  with pytest.raises(ValueError, match="scalar"):
    sharding.shard_batch({"t": np.float32(1.0)}, mesh)


def test_replicate_puts_full_copy_everywhere():
  mesh = sharding.make_mesh()
  params = {"w": np.arange(6.0).reshape(2, 3), "b": np.ones(3)}
  out = sharding.replicate(params, mesh)
  assert out["w"].sharding.is_fully_replicated
  assert len(out["w"].addressable_shards) == 8
  for s in out["w"].addressable_shards:
    np.testing.assert_array_equal(np.asarray(s.data), params["w"])


def test_sharded_jit_matches_unsharded():
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(0)
  w = rng.normal(size=(5, 7)).astype(np.float32)
  b = rng.normal(size=(7,)).astype(np.float32)
  x = rng.normal(size=(16, 5)).astype(np.float32)

  def f(params, x):
    h = jnp.tanh(x @ params["w"] + params["b"])
    return h, jnp.mean(h ** 2)  # Per-row output and a cross-device reduction.

  params = {"w": w, "b": b}
  ref_rows, ref_loss = jax.jit(f)(params, x)
  rep, dat = sharding.replicated(mesh), sharding.data_sharded(mesh)
  sharded_f = jax.jit(f, in_shardings=(rep, dat), out_shardings=(dat, rep))
  rows, loss = sharded_f(sharding.replicate(params, mesh), sharding.shard_batch(x, mesh))
  assert rows.sharding == dat
  assert len({s.device for s in rows.addressable_shards}) == 8
  np.testing.assert_allclose(np.asarray(rows), np.asarray(ref_rows), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  # Independent NumPy check of the unsharded reference.
  np.testing.assert_allclose(np.asarray(ref_rows), np.tanh(x @ w + b), rtol=1e-5, atol=1e-6)


def test_pad_to_multiple_numpy_and_jax():
  x = np.arange(10, dtype=np.float32).reshape(5, 2)
  padded, n = sharding.pad_to_multiple(x, 8)
  assert n == 5 and padded.shape == (8, 2) and isinstance(padded, np.ndarray)
  np.testing.assert_array_equal(padded[:5], x)
  np.testing.assert_array_equal(padded[5:], np.repeat(x[-1:], 3, axis=0))
  np.testing.assert_array_equal(sharding.unpad(padded, n), x)

  padded, n = sharding.pad_to_multiple(jnp.asarray(x), 3, axis=1)
  assert isinstance(padded, jax.Array) and padded.shape == (5, 3) and n == 2
  np.testing.assert_array_equal(np.asarray(padded[:, 2]), x[:, 1])
  np.testing.assert_array_equal(np.asarray(sharding.unpad(padded, n, axis=1)), x)

  same, n = sharding.pad_to_multiple(x, 5)
  assert same is x and n == 5
  with pytest.raises(ValueError, match="positive integer"):
    sharding.pad_to_multiple(x, 0)
  with pytest.raises(ValueError, match="out of range"):
    sharding.pad_to_multiple(x, 2, axis=2)


def test_padded_batch_shards_and_unpads_to_same_result():
  mesh = sharding.make_mesh()
  x = np.linspace(-1, 1, 13 * 4, dtype=np.float32).reshape(13, 4)
  padded, n = sharding.pad_to_multiple(x, mesh.shape["data"])
  out = jax.jit(lambda v: v * 3.0 + 1.0, in_shardings=sharding.data_sharded(mesh),
                out_shardings=sharding.data_sharded(mesh))(sharding.shard_batch(padded, mesh))
  np.testing.assert_allclose(np.asarray(sharding.unpad(out, n)), x * 3.0 + 1.0, rtol=1e-6, atol=1e-6)


_MULTIHOST_VARS = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "SLURM_JOB_ID",
                   "OMPI_COMM_WORLD_SIZE", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES",
                   "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")


def test_initialize_distributed_is_noop_on_single_host(monkeypatch):
  for var in _MULTIHOST_VARS:
    monkeypatch.delenv(var, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  assert sharding.initialize_distributed() is False
  assert sharding.initialize_distributed() is False
  assert calls == []
  # A one-task Slurm job or a one-worker TPU VM is still single-host.
  monkeypatch.setenv("SLURM_NTASKS", "1")
  monkeypatch.setenv("SLURM_JOB_ID", "42")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
  assert sharding.initialize_distributed() is False
  assert calls == []
  assert sharding.is_main_process() is True


def test_initialize_distributed_detects_multihost(monkeypatch):
  for var in _MULTIHOST_VARS:
    monkeypatch.delenv(var, raising=False)
  calls = []
  state = {"up": False}

  def fake_initialize(**kw):
    calls.append(kw)
    state["up"] = True

  monkeypatch.setattr(jax.distributed, "initialize", fake_initialize)
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: state["up"])
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "2")
  assert sharding.initialize_distributed() is True
  assert calls == [{"num_processes": 4, "process_id": 2}]
  # Second call: already up, no second initialize.
  assert sharding.initialize_distributed() is True
  assert len(calls) == 1

  state["up"] = False
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
  monkeypatch.setenv("SLURM_NTASKS", "2")
  monkeypatch.setenv("SLURM_JOB_ID", "7")
  assert sharding.initialize_distributed() is True
  assert calls[-1] == {}
