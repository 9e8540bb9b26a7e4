"""Progress bars from inside jit, the shared training loop's resume, atomic JSON output, workdirs."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hsijax import progress, trainloop
from hsijax.checkpoint import Checkpointer
from launch import common


def test_tick_inside_scan_moves_the_active_bar_even_from_a_cached_compile(monkeypatch):
  monkeypatch.setenv("HSIJAX_PROGRESS", "1")

  @jax.jit
  def run(x):
    def body(c, i):
      progress.tick(i + 1, every=5)
      return c + 1.0, None
    return jax.lax.scan(body, x, jnp.arange(20))[0]

  for _ in range(2):  # the second call reuses the compiled program
    with progress.bar(20, "scan") as b:
      jax.block_until_ready(run(jnp.float32(0)))
      jax.effects_barrier()
      assert b.n == 20


def test_tick_without_bar_is_a_noop():
  out = jax.jit(lambda: (progress.tick(jnp.int32(10), every=5), 3.0)[1])()
  assert float(out) == 3.0


def _toy_problem(calls=None):
  """A tiny model trained by `trainloop.multi_step`: each step draws its noise and batch from
  its own step number, as the real models do; `calls` counts the dispatches."""
  target = jnp.arange(4.0)
  opt = optax.adam(0.1)
  key = jax.random.key(0)

  def one(state):
    params, opt_state, step = state
    noise = 0.01 * jax.random.normal(jax.random.fold_in(key, step), (4,))
    batch = target + 0.001 * step
    loss, g = jax.value_and_grad(lambda p: jnp.sum((p - batch - noise) ** 2))(params)
    upd, opt_state = opt.update(g, opt_state)
    return (optax.apply_updates(params, upd), opt_state, step + 1), loss

  jitted = jax.jit(trainloop.multi_step(one))

  def run(state, count):
    if calls is not None:
      calls.append(int(count))
    return jitted(state, count)

  init = (jnp.zeros(4), opt.init(jnp.zeros(4)), jnp.int32(0))
  return run, init


def test_resumed_run_equals_uninterrupted(tmp_path):
  step, init = _toy_problem()
  full, hist = trainloop.run(step, init, num_steps=12, log_every=4, steps_per_call=3)
  assert hist["step"] == [4, 8, 12]
  with Checkpointer(tmp_path / "ck", save_interval_steps=5) as ck:
    trainloop.run(step, init, num_steps=7, checkpointer=ck, log_every=4, steps_per_call=3)
    assert ck.latest_step() == 7
  # A new process would start again from `init` and pick up step 7 from disk.
  with Checkpointer(tmp_path / "ck", save_interval_steps=5) as ck:
    resumed, rhist = trainloop.run(step, init, num_steps=12, checkpointer=ck, log_every=4,
                                   steps_per_call=3)
  np.testing.assert_array_equal(np.asarray(resumed[0]), np.asarray(full[0]))
  assert not np.allclose(np.asarray(full[0]), 0.0)
  # The history covers the whole run: step 4 comes from the first process (saved next to
  # the checkpoints), 7 is the first run's last step, 8 and 12 from the resumed one.
  assert rhist["step"] == [4, 7, 8, 12]
  full_loss = dict(zip(hist["step"], hist["loss"]))
  assert [l for s_, l in zip(rhist["step"], rhist["loss"]) if s_ != 7] == \
      [full_loss[4], full_loss[8], full_loss[12]]


def test_k_steps_per_dispatch_equal_one_step_per_dispatch():
  calls_k, calls_1 = [], []
  step_k, init = _toy_problem(calls_k)
  step_1, _ = _toy_problem(calls_1)
  a, hist_a = trainloop.run(step_k, init, num_steps=25, log_every=10, steps_per_call=4)
  b, hist_b = trainloop.run(step_1, init, num_steps=25, log_every=10, steps_per_call=1)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert hist_a == hist_b and hist_a["step"] == [10, 20, 25]
  # Chunks of 4 cut at the log points 10 and 20: 4 4 2 | 4 4 2 | 4 1 -> 8 dispatches, not 25.
  assert calls_k == [4, 4, 2, 4, 4, 2, 4, 1] and len(calls_1) == 25
  assert int(a[2]) == 25


def test_history_past_the_restored_checkpoint_is_dropped(tmp_path):
  step, init = _toy_problem()
  with Checkpointer(tmp_path / "ck", save_interval_steps=3) as ck:
    trainloop.run(step, init, num_steps=6, checkpointer=ck, log_every=1)
    # As if the process died after logging steps 7-8 but before their checkpoint landed.
    saved = trainloop.load_history(ck, upto=10**9)
    assert saved["step"] == [1, 2, 3, 4, 5, 6]
    assert trainloop.load_history(ck, upto=4)["step"] == [1, 2, 3, 4]
  (tmp_path / "ck" / trainloop.HISTORY_FILE).write_text("{not json")
  with Checkpointer(tmp_path / "ck", save_interval_steps=3) as ck:
    assert trainloop.load_history(ck, upto=6) == {"step": [], "loss": []}


def test_write_json_is_atomic_and_converts_arrays(tmp_path):
  path = tmp_path / "m.json"
  common.write_json(path, {"a": np.float32(1.5), "b": jnp.arange(3), "c": (np.int64(2),),
                           "psnr": np.float32(np.inf)})
  assert json.loads(path.read_text()) == {"a": 1.5, "b": [0, 1, 2], "c": [2], "psnr": "inf"}
  with pytest.raises(TypeError):
    common.write_json(path, {"bad": object()})
  # The failed write left the previous file intact and no temp files behind.
  assert json.loads(path.read_text())["a"] == 1.5
  assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_format_table_lists_every_method():
  text = common.format_table({"sdp": {"psnr": 40.0}, "baseline": {"psnr": 35.25}})
  assert "sdp" in text and "35.2500" in text


def test_setup_rejects_url_workdirs_without_creating_anything(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match="URL; the entry points write to local paths"):
    common.setup("gs://bucket/run")
  assert list(tmp_path.iterdir()) == []  # no ./gs:/bucket/run left behind
  with pytest.raises(ValueError, match="--workdir is required"):
    common.setup("")
  assert common.setup("runs/a") == tmp_path / "runs" / "a" and (tmp_path / "runs/a").is_dir()
