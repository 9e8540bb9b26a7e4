"""Two processes with 4 CPU devices each (gloo collectives, `jax.distributed.initialize` via
the entry points' --coordinator_address / --num_processes / --process_id) train the spectral
prior to the parameters one process with 8 devices reaches."""
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from hsijax import sdp

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAGS = ["--config=configs/sdp.py:demo", "--config.data.height=16", "--config.data.width=8",
         "--config.data.num_bands=10", "--config.data.num_endmembers=3",
         "--config.model.hidden=16", "--config.diffusion.num_timesteps=40",
         "--config.train.batch=16", "--config.train.steps=6", "--config.train.log_every=2",
         "--config.train.checkpoint_every=3", "--config.train.fid_samples=30"]


def _env(devices: int) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", HSIJAX_PROGRESS="0")
  env["PYTHONPATH"] = str(REPO)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # three processes, each compiling the training step (~1-2 min on 2 cores)
def test_two_processes_train_the_prior_like_one_process_with_eight_devices(tmp_path):
  cmd = [sys.executable, "-m", "launch.train_sdm", *FLAGS]
  port = _free_port()
  procs = [subprocess.Popen(cmd + [f"--workdir={tmp_path / 'two'}",
                                   f"--coordinator_address=localhost:{port}",
                                   "--num_processes=2", f"--process_id={i}"],
                            cwd=REPO, env=_env(4), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  one = subprocess.run(cmd + [f"--workdir={tmp_path / 'one'}"], cwd=REPO, env=_env(8),
                       capture_output=True, text=True, timeout=900)
  outs = [p.communicate(timeout=900)[0] for p in procs]
  assert one.returncode == 0, one.stderr[-3000:]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "final loss" in outs[0] and "final loss" not in outs[1]  # process 0 reports
  a, b = sdp.load_prior(tmp_path / "one"), sdp.load_prior(tmp_path / "two")
  assert a.info["steps"] == b.info["steps"] == 6
  for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
    # Same program and batches; only the cross-process reduction order may differ.
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_coordinator_flag_needs_the_other_two(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "launch.train_sdm", *FLAGS,
                         f"--workdir={tmp_path}", "--coordinator_address=localhost:1"],
                        cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "--num_processes and --process_id" in proc.stderr
