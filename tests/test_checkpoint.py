"""Tests for hsijax.checkpoint (Orbax round trips, shardings, retention)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from hsijax import checkpoint
from hsijax import sharding


def _state(seed: int = 0):
  """A small training state: flax-style params, adam state, step and keys."""
  rng = np.random.default_rng(seed)
  params = {
      "encoder": {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                              "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}},
      "table": jnp.asarray(rng.integers(-5, 5, size=(2, 6)), jnp.int32),
      "dense": nn.Dense(3).init(jax.random.key(seed), jnp.ones((1, 4)))["params"],
  }
  # Adam over the float leaves, after one real update so mu/nu/count are not zeros.
  float_params = {"encoder": params["encoder"], "dense": params["dense"]}
  opt = optax.adam(1e-3)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), float_params)
  _, opt_state = opt.update(grads, opt.init(float_params), float_params)
  return {
      "params": params,
      "opt_state": opt_state,
      "step": 17 + seed,
      "rng": jax.random.key_data(jax.random.key(seed)),
      "typed_rng": jax.random.key(seed + 100),
  }


def _assert_identical(a, b):
  """Leaf-by-leaf exact equality, including dtypes and tree structure."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    name = jax.tree_util.keystr(path)
    if isinstance(x, (int, float)):
      assert type(x) is type(y) and x == y, name
      continue
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert y.dtype == x.dtype, name
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype, name
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


def test_round_trip_with_target_is_exact(tmp_path):
  state = _state(0)
  with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
    assert ckpt.save(5, state) is True
    ckpt.wait()
    restored = ckpt.restore(target=state)
  _assert_identical(state, restored)
  # NamedTuples of the optax state come back as NamedTuples.
  assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
  assert int(restored["opt_state"][0].count) == 1
  assert isinstance(restored["step"], int) and restored["step"] == 17


def test_round_trip_with_abstract_target(tmp_path):
  state = _state(1)
  abstract = jax.eval_shape(lambda: state)
  assert isinstance(abstract["params"]["table"], jax.ShapeDtypeStruct)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state)
    restored = ckpt.restore(1, target=abstract)
  # eval_shape turns the step int into a ShapeDtypeStruct, so it returns as an array.
  assert int(restored["step"]) == 18
  restored["step"] = int(restored["step"])
  _assert_identical(state, restored)


def test_round_trip_without_target_keeps_values(tmp_path):
  state = _state(2)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(3, state)
    raw = ckpt.restore()
  np.testing.assert_array_equal(np.asarray(raw["params"]["table"]),
                                np.asarray(state["params"]["table"]))
  assert raw["step"] == 19
  np.testing.assert_array_equal(np.asarray(raw["rng"]), np.asarray(state["rng"]))
  np.testing.assert_array_equal(np.asarray(jax.random.key_data(raw["typed_rng"])),
                                np.asarray(jax.random.key_data(state["typed_rng"])))
  # Without a target the optax NamedTuple is a plain list holding the same numbers.
  mu = raw["opt_state"][0]["mu"]["encoder"]["Dense_0"]["kernel"]
  np.testing.assert_array_equal(np.asarray(mu),
                                np.asarray(state["opt_state"][0].mu["encoder"]["Dense_0"]["kernel"]))


def test_restored_key_draws_same_numbers(tmp_path):
  state = _state(3)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state)
    restored = ckpt.restore(target=state)
  want = jax.random.normal(jax.random.wrap_key_data(state["rng"]), (4,))
  got = jax.random.normal(jax.random.wrap_key_data(restored["rng"]), (4,))
  np.testing.assert_array_equal(np.asarray(want), np.asarray(got))
  np.testing.assert_array_equal(np.asarray(jax.random.uniform(state["typed_rng"], (3,))),
                                np.asarray(jax.random.uniform(restored["typed_rng"], (3,))))


def test_restore_into_data_sharding_on_eight_devices(tmp_path):
  mesh = sharding.make_mesh()
  data = np.arange(16 * 5, dtype=np.float32).reshape(16, 5)
  tree = {"pixels": jnp.asarray(data), "w": jnp.full((3,), 2.5, jnp.float32), "step": 4}
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(4, tree)  # Saved from a single device.
    shardings = {"pixels": sharding.data_sharded(mesh), "w": sharding.replicated(mesh),
                 "step": None}
    restored = ckpt.restore(target=tree, shardings=shardings)
  pix = restored["pixels"]
  assert pix.sharding == NamedSharding(mesh, P("data"))
  assert len(pix.addressable_shards) == 8
  for s in pix.addressable_shards:
    assert s.data.shape == (2, 5)
    np.testing.assert_array_equal(np.asarray(s.data), data[s.index])
  np.testing.assert_array_equal(np.asarray(pix), data)
  assert restored["w"].sharding.is_fully_replicated
  assert len(restored["w"].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.full((3,), 2.5, np.float32))
  assert restored["step"] == 4


def test_sharded_save_restores_single_sharding_everywhere(tmp_path):
  mesh = sharding.make_mesh({"axes": ("data", "model"), "shape": (-1, 2)})
  x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
  tree = {"x": sharding.shard_batch(x, mesh)}
  target = jax.eval_shape(lambda: {"x": jnp.zeros((8, 6), jnp.float32)})
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(0, tree)
    # One Sharding for every array leaf.
    restored = ckpt.restore(target=target, shardings=sharding.replicated(mesh))
  assert restored["x"].sharding.is_fully_replicated
  np.testing.assert_array_equal(np.asarray(restored["x"]), x)


def test_keeps_last_n_and_latest_step(tmp_path):
  with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    assert ckpt.latest_step() is None
    for step in (1, 2, 3, 4):
      ckpt.save(step, {"v": jnp.full((2,), float(step))})
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4]
    assert ckpt.latest_step() == 4
    np.testing.assert_array_equal(np.asarray(ckpt.restore()["v"]), [4.0, 4.0])
    np.testing.assert_array_equal(np.asarray(ckpt.restore(3)["v"]), [3.0, 3.0])
    with pytest.raises(FileNotFoundError, match=r"step 1 .*available steps: \[3, 4\]"):
      ckpt.restore(1)
  # Only the two newest step folders remain on disk.
  kept = sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit())
  assert kept == [3, 4]
  # A new Checkpointer on the same folder sees the same steps.
  with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as again:
    assert again.latest_step() == 4


def test_save_interval_and_force(tmp_path):
  with checkpoint.Checkpointer(tmp_path, max_to_keep=None, save_interval_steps=3) as ckpt:
    saved = [ckpt.save(step, {"v": jnp.zeros(1)}) for step in range(7)]
    assert ckpt.save(7, {"v": jnp.zeros(1)}, force=True) is True
    ckpt.wait()
    assert saved == [True, False, False, True, False, False, True]
    assert ckpt.all_steps() == [0, 3, 6, 7]
    with pytest.raises(ValueError, match="already exists"):
      ckpt.save(7, {"v": jnp.zeros(1)}, force=True)


def test_first_save_also_waits_for_the_interval(tmp_path):
  # Orbax's default policy would also save step 1 into an empty folder; ours does not.
  with checkpoint.Checkpointer(tmp_path, max_to_keep=None, save_interval_steps=5) as ckpt:
    saved = [step for step in range(1, 11) if ckpt.save(step, {"v": jnp.zeros(1)})]
    ckpt.wait()
    assert saved == [5, 10] and ckpt.all_steps() == [5, 10]
    assert ckpt.save_interval_steps == 5


def test_save_interrupted_by_a_kill_is_ignored_then_replaced(tmp_path):
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(5, {"v": jnp.full((2,), 5.0)})
  # What a process killed while writing step 7 leaves: the unrenamed temporary folder.
  partial = tmp_path / "7.orbax-checkpoint-tmp" / "default"
  partial.mkdir(parents=True)
  (partial / "half_written").write_bytes(b"\x00" * 10)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 5 and ckpt.all_steps() == [5]
    np.testing.assert_array_equal(np.asarray(ckpt.restore(target={"v": jnp.zeros(2)})["v"]),
                                  [5.0, 5.0])
    assert ckpt.save(7, {"v": jnp.full((2,), 7.0)}) is True
    ckpt.wait()
    assert ckpt.all_steps() == [5, 7]
    np.testing.assert_array_equal(np.asarray(ckpt.restore()["v"]), [7.0, 7.0])
  # Nothing of the killed save is left; the checksum record covers exactly the two saved steps.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["5", "7", checkpoint.CHECKSUM_FILE]
  recorded = json.loads((tmp_path / checkpoint.CHECKSUM_FILE).read_text())
  assert sorted(recorded) == ["5", "7"]


def test_restore_without_checkpoint_names_directory(tmp_path):
  directory = tmp_path / "empty"
  with checkpoint.Checkpointer(directory) as ckpt:
    with pytest.raises(FileNotFoundError) as info:
      ckpt.restore()
    assert str(directory) in str(info.value)


def test_relative_directory_is_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with checkpoint.Checkpointer("rel/ckpt") as ckpt:
    assert os.path.isabs(ckpt.directory)
    assert ckpt.directory == str(tmp_path / "rel" / "ckpt")
    ckpt.save(2, {"a": jnp.arange(3)})
  assert (tmp_path / "rel" / "ckpt" / "2").is_dir()


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep"):
    checkpoint.Checkpointer(tmp_path, max_to_keep=0)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, {"a": jnp.ones(2)})
    mesh = sharding.make_mesh()
    with pytest.raises(ValueError, match="needs target"):
      ckpt.restore(shardings=sharding.replicated(mesh))
    with pytest.raises(ValueError, match="same structure as target"):
      ckpt.restore(target={"a": jnp.ones(2)}, shardings={"b": None})
