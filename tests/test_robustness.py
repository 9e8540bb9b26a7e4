"""Bad input and faults: every case ends in the right result or a clear error, never a silent
wrong result, a raw traceback or a half-written workdir."""
import json
import os
import pathlib
import stat
import subprocess
import sys
import time

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sdp as sdp_config
from hsijax import data, degrade, fileio, sdp, synthetic
from hsijax import workdir as workdir_lib
from hsijax.checkpoint import Checkpointer

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config=configs/sdp.py:demo", "--config.data.height=16", "--config.data.width=8",
        "--config.data.num_bands=10", "--config.data.num_endmembers=3",
        "--config.model.hidden=16", "--config.diffusion.num_timesteps=40",
        "--config.train.batch=16", "--config.train.steps=3", "--config.train.fid_samples=30"]


def _cli(args, cwd, timeout=600):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", HSIJAX_PROGRESS="0")
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)


# ----------------------------------------------------------------------------- 8, 9: CLI


@pytest.mark.parametrize("bad", ["--config.solver.lamb=1", "--config.train.steps=abc",
                                 "--config=configs/sdp.py:nope", "--config.train.steps=-5"])
def test_bad_flags_and_config_values_print_one_paragraph_and_leave_nothing(tmp_path, bad):
  out = tmp_path / "run"
  proc = _cli(["launch.train_sdm", *TINY, bad, f"--workdir={out}"], tmp_path)
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr and "error:" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert not out.exists()  # an early error leaves no empty workdir behind


def test_workdir_that_is_a_file_and_verbose_traceback(tmp_path):
  f = tmp_path / "file"
  f.write_text("x")
  proc = _cli(["launch.train_sdm", *TINY, f"--workdir={f}"], tmp_path)
  assert proc.returncode == 1 and "is a file, not a folder" in proc.stderr
  assert "Traceback" not in proc.stderr
  proc = _cli(["launch.train_sdm", *TINY, f"--workdir={f}", "--verbose"], tmp_path)
  assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_unwritable_workdir_is_refused_before_the_work(tmp_path):
  with pytest.raises(ValueError, match="cannot be written"):
    workdir_lib.prepare("/proc/hsijax_cannot_write_here")


def test_second_run_on_a_workdir_refuses_naming_the_first(tmp_path):
  code = (f"from hsijax import workdir; workdir.prepare({str(tmp_path)!r}); "
          "print('locked', flush=True); import time; time.sleep(60)")
  holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ValueError, match=rf"in use by another hsijax run \(pid {holder.pid}"):
      workdir_lib.prepare(tmp_path)
  finally:
    holder.kill()
    holder.wait()
  time.sleep(0.2)
  # The lock died with its process: the next run takes it.
  code = f"from hsijax import workdir; workdir.prepare({str(tmp_path)!r}); print('ok')"
  assert subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True).stdout.strip() == "ok"


def test_status_in_run_json_stale_temp_files_and_umask(tmp_path):
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / ".metrics.json.abc123.tmp").write_text("half")  # left by a kill
  old = os.umask(0o022)
  try:
    proc = _cli(["launch.train_sdm", *TINY, f"--workdir={tmp_path / 'run'}"], tmp_path)
  finally:
    os.umask(old)
  assert proc.returncode == 0, proc.stderr[-2000:]
  run = json.loads((tmp_path / "run" / "run.json").read_text())
  assert run["status"] == "finished" and run["pid"] > 0 and "finished_at" in run
  assert not list((tmp_path / "run").glob(".*.tmp"))
  for name in ("metrics.json", "run.json", "prior.json"):
    mode = stat.S_IMODE((tmp_path / "run" / name).stat().st_mode)
    assert mode == 0o644, (name, oct(mode))  # readable under umask 022, not 0600
  fileio.write_text(tmp_path / "x.txt", "y")
  assert stat.S_IMODE((tmp_path / "x.txt").stat().st_mode) & 0o044 == 0o044
  # 3: another seed on the same workdir is refused (naming the difference and --fresh);
  # --fresh starts over in WORKDIR/run-1 and leaves the first run untouched.
  before = (tmp_path / "run" / "prior.json").read_text()
  proc = _cli(["launch.train_sdm", *TINY, "--config.seed=7", f"--workdir={tmp_path / 'run'}"],
              tmp_path)
  assert proc.returncode == 1 and "key / seed" in proc.stderr and "--fresh" in proc.stderr
  proc = _cli(["launch.train_sdm", *TINY, "--config.seed=7", "--fresh",
               f"--workdir={tmp_path / 'run'}"], tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads((tmp_path / "run" / "run-1" / "run.json").read_text())["status"] == "finished"
  assert (tmp_path / "run" / "prior.json").read_text() == before
  assert workdir_lib.fresh_subfolder(tmp_path / "run").name == "run-2"


# ----------------------------------------------------------------------------- 2: validation


def test_config_values_are_checked_before_any_work():
  for field, value in (("train.steps", -5), ("solver.num_steps", 0), ("blind.steps", -1),
                       ("solver.lam", -1.0), ("diffusion.num_timesteps", 10)):
    c = sdp_config.get_config("crop")
    node, leaf = c, field.split(".")
    for part in leaf[:-1]:
      node = node[part]
    node[leaf[-1]] = value
    with pytest.raises(ValueError, match=rf"--config.{field}="):
      sdp_config.resolve(c)


# ----------------------------------------------------------------------------- 6: units


def _pair():
  sc = synthetic.make_scene(2, height=32, width=16, num_bands=10, num_endmembers=3,
                            source="generated", wavelengths_nm=(450, 850))
  w = degrade.wald_protocol(sc.cube, ratio=2, key=jax.random.key(0),
                            srf=degrade.ikonos_srf(sc.wavelengths_nm))
  return np.asarray(w.y), np.asarray(w.z)


def test_images_in_different_units_are_refused_and_scale_none_on_raw_data_too():
  y, z = _pair()
  with pytest.raises(ValueError, match="different units.*separate"):
    sdp.check_pair(y * 1000, z)  # LR-HSI in counts, HR-MSI in reflectance
  sdp.check_pair(y * 1000, z, same_units=False)  # the user said: scale each separately
  with pytest.raises(ValueError, match="scale 'none' expects"):
    sdp.scale_pair(y * 1000, z * 1000, "none")
  ys, zs, s = sdp.scale_pair(y - 0.9 * y.min() - 0.1 * y.max(), z)
  assert s["clipped"]["hsi"] > 0 and ys.min() == 0  # negatives clipped and counted


# ----------------------------------------------------------------------------- 7: files


def test_hdf5_in_numpy_order_is_not_reversed_but_matlab_files_are(tmp_path):
  cube = np.random.default_rng(0).uniform(size=(6, 5, 4)).astype(np.float32)
  with h5py.File(tmp_path / "numpy.h5", "w") as f:
    f["cube"] = cube
  np.testing.assert_array_equal(data.load_cube(tmp_path / "numpy.h5").data, cube)
  with h5py.File(tmp_path / "numpy.mat", "w") as f:  # .mat written by h5py, numpy order
    f["cube"] = cube
  np.testing.assert_array_equal(data.load_cube(tmp_path / "numpy.mat").data, cube)
  with h5py.File(tmp_path / "matlab.mat", "w") as f:  # as MATLAB writes it: column-major
    f["cube"] = cube.T
    f["cube"].attrs["MATLAB_class"] = np.bytes_("double")
  np.testing.assert_array_equal(data.load_cube(tmp_path / "matlab.mat").data, cube)


def _envi(tmp_path, cube, extra=""):
  np.ascontiguousarray(np.transpose(cube, (2, 0, 1)), "<f4").tofile(tmp_path / "s.img")
  h, w, b = cube.shape
  (tmp_path / "s.hdr").write_text(
      f"ENVI\nsamples = {w}\nlines = {h}\nbands = {b}\nheader offset = 0\ndata type = 4\n"
      f"interleave = bsq\nbyte order = 0\nwavelength = {{{', '.join(str(400 + 10 * i) for i in range(b))}}}\n"
      + extra)
  return tmp_path / "s.hdr"


def test_envi_bbl_scale_factor_and_ignore_value_are_honoured(tmp_path):
  cube = np.random.default_rng(1).uniform(1, 2, size=(6, 5, 4)).astype(np.float32) * 1000
  cube[2, 3] = -9999.0
  hdr = _envi(tmp_path, cube, "bbl = {1, 0, 1, 1}\nreflectance scale factor = 1000\n"
                               "data ignore value = -9999\n")
  with pytest.raises(ValueError, match="no-data"):
    data.load_cube(hdr)  # strict loader: missing data is an error, never read as data
  with pytest.warns(UserWarning, match="dropped 1 bad bands"):
    arr, valid, wl, _ = data.load_masked(hdr)
  assert arr.shape == (6, 5, 3) and list(wl) == [400.0, 420.0, 430.0]
  assert valid.sum() == 29 and not valid[2, 3] and np.isnan(arr[2, 3]).all()
  np.testing.assert_allclose(arr[0, 0], cube[0, 0, [0, 2, 3]] / 1000, rtol=1e-6)


def test_fuse_keeps_no_data_pixels_out_and_marks_them(tmp_path):
  y, z = _pair()
  y = y.copy()
  y[1, 2] = np.nan  # one missing LR pixel = a 2 x 2 HR block
  np.savez(tmp_path / "lr.npz", Y=y)
  np.savez(tmp_path / "hr.npz", Z=z)
  from launch import fuse
  cfg = sdp_config.get_config("real,fast")
  cfg.data.hsi, cfg.data.msi = f"{tmp_path}/lr.npz:Y", f"{tmp_path}/hr.npz:Z"
  cfg.methods = "baseline,bicubic"
  cfg.solver.num_steps, cfg.blind.steps = 3, 3
  fuse.run(cfg, str(tmp_path / "out"))
  with np.load(tmp_path / "out" / "fused.npz") as f:
    x, valid = f["X"], f["valid"]
  assert valid.shape == z.shape[:2] and (~valid).sum() == 4 and not valid[2:4, 4:6].any()
  assert np.isnan(x[~valid]).all() and np.isfinite(x[valid]).all()
  assert json.loads((tmp_path / "out" / "run.json").read_text())["no_data_pixels"] == 4


# ----------------------------------------------------------------------------- 4: checkpoints


def _flip_byte_in_largest_file(step_dir: pathlib.Path) -> None:
  files = [p for p in step_dir.rglob("*") if p.is_file()]
  f = max(files, key=lambda p: p.stat().st_size)
  b = bytearray(f.read_bytes())
  b[len(b) // 2] ^= 0xFF
  f.write_bytes(bytes(b))


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, damage):
  with Checkpointer(tmp_path, max_to_keep=3) as ck:
    for s in (1, 2, 3):
      ck.save(s, {"v": jnp.full(4, float(s))}, force=True)
  if damage == "flip":
    _flip_byte_in_largest_file(tmp_path / "3")
  else:
    victim = max((p for p in (tmp_path / "3").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    victim.unlink()
  with Checkpointer(tmp_path) as ck:
    with pytest.warns(UserWarning, match=r"step 3 .* damaged"):
      step, tree = ck.restore_latest(target={"v": jnp.zeros(4)})
    assert step == 2 and float(tree["v"][0]) == 2.0
    assert ck.all_steps() == [1, 2] and (tmp_path / "corrupt-3").is_dir()
    ck.save(3, {"v": jnp.full(4, 30.0)}, force=True)  # training goes on from step 2
  # Every step damaged: a clear error, not a silent restore.
  for s in (1, 2, 3):
    _flip_byte_in_largest_file(tmp_path / str(s))
  with Checkpointer(tmp_path) as ck, pytest.warns(UserWarning):
    with pytest.raises(ValueError, match="no intact checkpoint"):
      ck.restore_latest(target={"v": jnp.zeros(4)})


def test_load_prior_skips_a_damaged_step(tmp_path):
  y, z = _pair()
  pixels = y.reshape(-1, y.shape[-1])
  kw = dict(hidden=16, num_timesteps=40, batch=16, checkpoint_every=2, log_every=1)
  sdp.train_prior(pixels, steps=4, key=0, workdir=tmp_path, show_progress=False, **kw)
  _flip_byte_in_largest_file(tmp_path / "checkpoints" / "4")
  with pytest.warns(UserWarning, match="damaged"):
    prior = sdp.load_prior(tmp_path)
  assert prior.info["steps"] == 2


def test_no_data_pixels_are_left_out_of_the_metrics(tmp_path):
  # The reference's values under the no-data pixels must not matter: garbage there gives the
  # same table as the clean reference.
  y, z = _pair()
  y = y.copy()
  y[1, 2] = np.nan
  x_ref = np.repeat(np.repeat(y, 2, 0), 2, 1)  # any (H, W, B) reference will do
  x_ref = np.nan_to_num(x_ref, nan=0.5)
  garbage = x_ref.copy()
  garbage[2:4, 4:6] = 100.0
  np.savez(tmp_path / "in.npz", Y=y, Z=z, R=x_ref, G=garbage)
  from launch import fuse
  tables = []
  for key in ("R", "G"):
    cfg = sdp_config.get_config("real,fast")
    cfg.data.hsi, cfg.data.msi = f"{tmp_path}/in.npz:Y", f"{tmp_path}/in.npz:Z"
    cfg.data.reference = f"{tmp_path}/in.npz:{key}"
    cfg.data.scale = "separate"
    cfg.methods, cfg.blind.steps = "bicubic", 3
    tables.append(fuse.run(cfg, str(tmp_path / key))["bicubic"])
  # (UIQI is NaN here: its one 32 x 16 window holds the no-data pixels.)
  assert tables[0] == pytest.approx(tables[1], rel=1e-5, nan_ok=True)
  assert np.isfinite(tables[0]["psnr"]) and np.isfinite(tables[0]["sam"])
