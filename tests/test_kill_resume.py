"""Literal kill-and-resume tests of the training CLIs (acceptance: SIGKILL mid-run, restart).

For `launch.train_sdm` and `launch.train_scdm`, each test runs the real command three times
as subprocesses on a tiny config:

  1. uninterrupted, in workdir "full";
  2. in workdir "killed": waits until Orbax has FINALISED a checkpoint at step >= k (Orbax
     writes `<step>.orbax-checkpoint-tmp` and renames it to `<step>` when complete, so only
     all-digit directory names count), then SIGKILLs the whole process group and checks the
     run had not finished (exit by SIGKILL, no metrics.json, no final-step checkpoint);
  3. the same command again in "killed": it must print "resuming from step S" for the newest
     finalised step S left by the kill, finish, and end with final-step parameters, EMA and
     optimiser state bit-identical to run 1's (and the same final loss).

Subprocesses get one CPU device and a persistent XLA compilation cache shared by the three
launches (only the first pays the compile). Each test uses ~30 s of CPU; on 2 cores shared
with other jobs the SDM test took ~55 s and the SCDM one ~65 s (hence marked slow).
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from hsijax.checkpoint import Checkpointer

REPO = pathlib.Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 600      # one whole launch, cold compile on 2 loaded cores included
CKPT_TIMEOUT_S = 400     # until the killed run has a finalised checkpoint >= k
POLL_S = 0.05


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Subprocess environment: 1 CPU device, quiet bars, shared persistent compile cache."""
  e = dict(os.environ)
  e.update({
      "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
      "JAX_PLATFORMS": "cpu",
      "HSIJAX_PROGRESS": "0",
      "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "PYTHONUNBUFFERED": "1",
  })
  e["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH")
                                                   else []))
  return e


def _start(cmd: list[str], env: dict, log: pathlib.Path) -> subprocess.Popen:
  """Starts `cmd` niced, in its own process group, stdout + stderr to `log`."""
  with open(log, "ab") as f:
    return subprocess.Popen(["nice", "-n", "19", *cmd], cwd=REPO, env=env, stdout=f,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
  """SIGKILLs the process group of `proc` (no-op when it already exited) and reaps it."""
  if proc.poll() is None:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  proc.wait(timeout=60)


def _run_to_end(cmd: list[str], env: dict, log: pathlib.Path) -> str:
  """Runs `cmd` to completion; returns its output; fails with the output on error."""
  proc = _start(cmd, env, log)
  try:
    proc.wait(timeout=RUN_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    pytest.fail(f"{' '.join(cmd)} did not finish within {RUN_TIMEOUT_S} s; output:\n"
                f"{log.read_text()[-4000:]}")
  finally:
    _kill_group(proc)
  out = log.read_text()
  assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}:\n{out[-4000:]}"
  return out


def _finalised_steps(ckpt_dir: pathlib.Path) -> list[int]:
  """Steps with a complete checkpoint: Orbax renames `<step>.orbax-checkpoint-tmp` to
  `<step>` only after every file is written, so all-digit names are finished ones."""
  if not ckpt_dir.is_dir():
    return []
  return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit() and p.is_dir())


def _kill_after_checkpoint(cmd: list[str], env: dict, log: pathlib.Path,
                           ckpt_dir: pathlib.Path, min_step: int, num_steps: int) -> int:
  """Starts `cmd`, SIGKILLs its group once a checkpoint >= min_step is finalised.

  Returns the newest finalised step left on disk (what a restart must resume from).
  """
  proc = _start(cmd, env, log)
  try:
    deadline = time.monotonic() + CKPT_TIMEOUT_S
    while not any(s >= min_step for s in _finalised_steps(ckpt_dir)):
      if proc.poll() is not None:
        pytest.fail(f"the run to be killed exited (code {proc.returncode}) before a checkpoint "
                    f">= {min_step} appeared in {ckpt_dir}; output:\n{log.read_text()[-4000:]}")
      if time.monotonic() > deadline:
        pytest.fail(f"no finalised checkpoint >= {min_step} in {ckpt_dir} after "
                    f"{CKPT_TIMEOUT_S} s (found {_finalised_steps(ckpt_dir)}); output:\n"
                    f"{log.read_text()[-4000:]}")
      time.sleep(POLL_S)
    os.killpg(proc.pid, signal.SIGKILL)
  finally:
    _kill_group(proc)
  assert proc.returncode == -signal.SIGKILL, (
      f"the run finished (exit {proc.returncode}) before it could be killed; give it more "
      f"train.steps than {num_steps}. Output:\n{log.read_text()[-4000:]}")
  steps = _finalised_steps(ckpt_dir)
  assert steps and min_step <= steps[-1] < num_steps, (
      f"killed run left checkpoints {steps}; expected a newest one in [{min_step}, "
      f"{num_steps}) so that the restart has work left to do")
  return steps[-1]


def _final_state(ckpt_dir: pathlib.Path, step: int):
  with Checkpointer(ckpt_dir) as ckpt:
    assert ckpt.latest_step() == step, f"{ckpt_dir}: steps {ckpt.all_steps()}, wanted {step}"
    return ckpt.restore(step)


def _assert_same_state(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  assert len(la) == len(lb) > 3  # step, params, EMA params, optimiser state
  for (path, x), y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))


def _kill_resume_compare(tmp_path, env, cmd_for, ckpt_subdir: str, num_steps: int,
                         kill_at: int, desc: str):
  """The three launches; returns (resumed metrics.json, uninterrupted metrics.json)."""
  full, killed = tmp_path / "full", tmp_path / "killed"
  # Uninterrupted first: it fills the compile cache, so the run to be killed reaches its
  # checkpoints quickly and is killed with most of its steps still to go.
  _run_to_end(cmd_for(full), env, tmp_path / "full.log")
  resume_from = _kill_after_checkpoint(cmd_for(killed), env, tmp_path / "killed.log",
                                       killed / ckpt_subdir, kill_at, num_steps)
  assert not (killed / "metrics.json").exists(), "the killed run wrote its final metrics"
  out = _run_to_end(cmd_for(killed), env, tmp_path / "resumed.log")
  expected = f"{desc}: resuming from step {resume_from} of {num_steps}"
  assert expected in out, f"restart did not report {expected!r}; output:\n{out[-4000:]}"
  _assert_same_state(_final_state(killed / ckpt_subdir, num_steps),
                     _final_state(full / ckpt_subdir, num_steps))
  return (json.loads((killed / "metrics.json").read_text()),
          json.loads((full / "metrics.json").read_text()))


# ----------------------------------------------------------------------------- SDM (SDP)


def test_train_sdm_killed_and_restarted_matches_uninterrupted(tmp_path, env):
  rng = np.random.default_rng(0)
  np.savez(tmp_path / "pixels.npz", pixels=rng.uniform(0, 1, (64, 10)).astype(np.float32))
  num_steps, every = 1200, 50

  def cmd_for(workdir):
    return [sys.executable, "-m", "launch.train_sdm", "--config=configs/sdp.py:demo",
            f"--config.data.train_pixels={tmp_path / 'pixels.npz'}:pixels",
            "--config.model.hidden=16", "--config.diffusion.num_timesteps=40",
            "--config.train.batch=16", f"--config.train.steps={num_steps}",
            f"--config.train.checkpoint_every={every}", "--config.train.log_every=100",
            "--config.train.fid_samples=40", f"--workdir={workdir}"]

  resumed, full = _kill_resume_compare(tmp_path, env, cmd_for, "checkpoints", num_steps,
                                       kill_at=2 * every, desc="SDM train")
  assert resumed["steps"] == full["steps"] == num_steps
  assert resumed["final_loss"] == full["final_loss"]
  assert resumed["fid"] == full["fid"]  # same EMA parameters -> same generated spectra
  # The restart's loss history covers the whole run: the killed process's part is read
  # back from the checkpoint directory, so it equals the uninterrupted run's.
  assert resumed["loss_history"] == full["loss_history"]
  assert resumed["loss_history"]["step"][0] == 100


# ----------------------------------------------------------------------------- SCDM


def _cube(path, h=32, w=32, b=8):
  rng = np.random.default_rng(0)
  yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
  abund = np.stack([yy, xx, 1 - yy * xx], -1)
  cube = abund @ rng.uniform(500, 3000, size=(3, b)) + rng.normal(0, 10, (h, w, b))
  np.savez(path, cube=cube.astype(np.float32))


@pytest.mark.slow  # ~65 s: three U-Net launches; the SDM test covers the same loop by default
def test_train_scdm_killed_and_restarted_matches_uninterrupted(tmp_path, env):
  _cube(tmp_path / "cube.npz")
  num_steps, every = 250, 25

  def cmd_for(workdir):
    return [sys.executable, "-m", "launch.train_scdm", "--config=configs/scdm.py:tiny,stages=1",
            f"--config.data.path={tmp_path / 'cube.npz'}:cube", "--config.data.num_bands=8",
            "--config.data.rgb_bands=(0,3,6)", "--config.data.split=quadrant",
            "--config.model.residual=False",  # one U-Net making all 8 bands
            "--config.model.base=8", "--config.model.channel_mults=(1,)",
            "--config.model.num_res_down=1", "--config.model.num_res_up=2",
            "--config.model.groups=4", "--config.train.crop=8", "--config.train.batch=8",
            f"--config.train.steps={num_steps}", f"--config.train.checkpoint_every={every}",
            "--config.train.log_every=50", "--config.train.ema_start=1",
            f"--workdir={workdir}"]

  resumed, full = _kill_resume_compare(tmp_path, env, cmd_for, "stage0/checkpoints",
                                       num_steps, kill_at=2 * every, desc="stage 0 (8 bands)")
  assert resumed["stage0"]["steps"] == full["stage0"]["steps"] == num_steps
  assert resumed["stage0"]["final_loss"] == full["stage0"]["final_loss"]
