"""SDP entry points end to end on tiny configs: outputs, resume, input errors, CLI contract."""
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sdp as sdp_config
from hsijax import degrade, synthetic
from hsijax.checkpoint import Checkpointer
from hsijax import sdp
from launch import demo, evaluate_sdp, fuse, report, train_sdm

REPO = pathlib.Path(__file__).resolve().parents[1]
METHODS = {"sdp", "baseline", "bicubic", "detail_injection", "subspace_ls"}
FULL_REF = {"psnr", "sam", "rmse", "ergas", "uiqi"}


def _tiny(cfg, steps=3):
  """Shrinks every step count and the network so one run takes seconds."""
  cfg.model.hidden = 16
  cfg.diffusion.num_timesteps = 40
  cfg.train.batch = 16
  cfg.train.steps = steps
  cfg.train.checkpoint_every = 2
  cfg.train.log_every = 1
  cfg.train.fid_samples = 40
  cfg.solver.num_steps = 3
  cfg.blind.steps = 3
  return cfg


def _check_table(table, methods=METHODS, keys=FULL_REF):
  assert set(table) == set(methods) | {"seconds", "conventions"}
  for name in methods:
    vals = table[name]
    assert set(keys) <= set(vals), name
    assert all(math.isfinite(vals[k]) for k in keys), (name, vals)
    if "rmse" in keys:
      assert 0 <= vals["rmse"] <= 1 and 0 <= vals["sam"] <= 180
      assert -1 <= vals["uiqi"] <= 1 and vals["ergas"] >= 0
  assert all(v >= 0 for v in table["seconds"].values())
  assert {"train", "sdp", "baseline"} <= set(table["seconds"])


def _cube_file(tmp_path, scale=1000.0, with_wavelengths=True):
  sc = synthetic.make_scene(1, height=32, width=16, num_bands=12, num_endmembers=3,
                            source="generated", wavelengths_nm=(420, 900))
  arrays = {"cube": sc.cube * scale}
  if with_wavelengths:
    arrays["wavelengths_nm"] = sc.wavelengths_nm
  path = tmp_path / "cube.npz"
  np.savez(path, **arrays)
  return path, sc


# ----------------------------------------------------------------------------- config


def test_config_presets_and_budget():
  c = sdp_config.get_config("paper_dc")
  assert (c.data.ratio, c.solver.lam, c.solver.gam, c.solver.lr, c.solver.K) == (
      8, 0.1, 1e-3, 2.5e-3, 3)
  r = sdp_config.resolve(c)
  assert (r.train.steps, r.train.decay_steps, r.solver.num_steps, r.blind.steps) == (
      30000, 10000, 1000, 5000)
  assert r.blind.psf_size is None  # the library's 2 ratio - 1 for the ratio of the data
  assert sdp_config.prior_settings(r)["decay_steps"] == 10000
  assert sdp_config.fusion_settings(r)["lr"] == 2.5e-3
  assert sdp.FusionSettings(**sdp_config.fusion_settings(r)).lam == 0.1
  assert sdp.PriorSettings(**sdp_config.prior_settings(r)).hidden == 512
  paper_real = sdp_config.get_config("paper_real")
  assert (paper_real.solver.lam, paper_real.solver.gam, paper_real.solver.lr,
          paper_real.solver.init, paper_real.solver.start) == (1.0, 0.1, 8e-3, "ones", 1.0)
  assert paper_real.data.ratio == 4 and paper_real.budget == "paper"  # not a paper_* scene
  for name in ("real", "crop"):  # the warm-started solver, handed to the library as is
    warm = sdp.FusionSettings(**sdp_config.fusion_settings(
        sdp_config.resolve(sdp_config.get_config(name + ",fast"))))
    assert (warm.init, warm.start, warm.lam, warm.gam, warm.lr_scale) == (
        "classical", 0.2, 0.03, 3e-4, 3.0)
  # The prior trains on a rank-10 projection of the LR-HSI in `real` only (crop: clean pixels).
  assert [sdp_config.get_config(n).data.train_rank for n in ("real", "paper_real", "crop")] == [
      10, 0, 0]
  crop = sdp_config.get_config("crop,fast")
  assert crop.budget == "fast" and not crop.known_operators and crop.data.ratio == 4
  r = sdp_config.resolve(crop)
  assert r.solver.num_steps < 1000 and r.train.steps < 30000 and r.train.decay_steps == 2500
  crop.train.steps = 7  # an explicit value wins over the budget
  assert sdp_config.resolve(crop).train.steps == 7
  assert sdp_config.get_config("crop,known").known_operators
  with pytest.raises(ValueError, match="exactly one preset"):
    sdp_config.get_config("crop,real")
  bad = sdp_config.get_config("real")
  bad.data.train_rank = -1
  with pytest.raises(ValueError, match="train_rank=-1 must be >= 0"):
    sdp_config.resolve(bad)
  bad = sdp_config.get_config("crop")
  bad.budget = "slow"
  with pytest.raises(ValueError, match="--config.budget=fast"):
    sdp_config.resolve(bad)


# ----------------------------------------------------------------------------- entry points


def test_demo_end_to_end(tmp_path):
  cfg = _tiny(sdp_config.get_config("demo"))
  cfg.data.height, cfg.data.width, cfg.data.num_bands = 32, 16, 12
  cfg.data.num_endmembers = 3
  table = demo.run(cfg, str(tmp_path))
  _check_table(table)
  on_disk = json.loads((tmp_path / "metrics.json").read_text())
  assert on_disk.keys() == table.keys()
  np.testing.assert_allclose(on_disk["sdp"]["psnr"], table["sdp"]["psnr"])
  for png in ("fusion.png", "band_psnr.png"):
    assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  run = json.loads((tmp_path / "run.json").read_text())
  assert run["shapes"]["reference"] == [16, 16, 12] and run["shapes"]["y"] == [4, 4, 12]
  assert run["blind"] is True


@pytest.mark.slow
def test_evaluate_sdp_on_a_cube_file(tmp_path):
  path, sc = _cube_file(tmp_path)
  cfg = _tiny(sdp_config.get_config("crop,fast"))
  cfg.data.path = str(path)
  cfg.known_operators = True
  table = evaluate_sdp.run(cfg, str(tmp_path / "out"))
  _check_table(table)
  run = json.loads((tmp_path / "out" / "run.json").read_text())
  assert run["blind"] is False and run["operators"]["psf_rel_error"] == 0
  # The cube is normalised (DN x 1000 in the file): the bicubic result is within [0, 1]
  # and close to the reference, which a unit mistake would break.
  assert table["bicubic"]["rmse"] < 0.2
  assert "wavelengths: file" in run["scene"]


def test_train_sdm_outputs_and_resume_matches_uninterrupted(tmp_path):
  def cfg_for(steps):
    c = _tiny(sdp_config.get_config("demo"), steps=steps)
    c.data.height, c.data.width, c.data.num_bands, c.data.num_endmembers = 16, 8, 10, 3
    return c

  out = train_sdm.run(cfg_for(3), str(tmp_path / "a"))  # "killed" after 3 of 6 steps
  assert out["steps"] == 3 and out["num_bands"] == 10 and out["num_pixels"] == 8 * 8
  assert math.isfinite(out["final_loss"]) and out["final_loss"] > 0
  assert math.isfinite(out["fid"]) and out["fid"] >= 0
  metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
  assert {"final_loss", "fid", "steps"} <= set(metrics)
  train_sdm.run(cfg_for(6), str(tmp_path / "a"))       # resumes from step 3
  train_sdm.run(cfg_for(6), str(tmp_path / "b"))       # uninterrupted
  states = []
  for d in ("a", "b"):
    with Checkpointer(tmp_path / d / "checkpoints") as ckpt:
      assert ckpt.latest_step() == 6
      states.append(ckpt.restore())
  leaves_a, leaves_b = (jax.tree_util.tree_leaves(s) for s in states)
  assert len(leaves_a) == len(leaves_b) > 0
  for la, lb in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
  # Rerunning a finished run trains nothing more and still reports a loss.
  again = train_sdm.run(cfg_for(6), str(tmp_path / "b"))
  assert again["steps"] == 6 and math.isfinite(again["final_loss"])


def _fuse_inputs(tmp_path, ratio=2, scale=100.0):
  sc = synthetic.make_scene(2, height=16, width=16, num_bands=10, num_endmembers=3,
                            source="generated", wavelengths_nm=(450, 850))
  x = jnp.asarray(sc.cube)
  psf = degrade.gaussian_psf(ratio)
  srf = np.random.default_rng(0).uniform(0, 1, (3, 10)).astype(np.float32)
  srf /= srf.sum(1, keepdims=True)
  y = np.asarray(degrade.blur_down(x, psf, ratio)) * scale
  z = np.asarray(degrade.spectral_response(x, jnp.asarray(srf))) * scale
  np.savez(tmp_path / "lr.npz", Y=y)
  np.savez(tmp_path / "hr.npz", Z=z)
  np.savez(tmp_path / "ref.npz", X=np.asarray(x) * scale)
  np.savez(tmp_path / "ops.npz", psf=np.asarray(psf), srf=srf)
  return sc, y, z


def _fuse_cfg(tmp_path, **data):
  cfg = _tiny(sdp_config.get_config("real,fast"))
  cfg.data.hsi = str(tmp_path / "lr.npz") + ":Y"
  cfg.data.msi = str(tmp_path / "hr.npz") + ":Z"
  for k, v in data.items():
    cfg.data[k] = v
  return cfg


def test_fuse_end_to_end_with_reference(tmp_path, capsys):
  sc, y, _ = _fuse_inputs(tmp_path)
  cfg = _fuse_cfg(tmp_path, reference=str(tmp_path / "ref.npz") + ":X")
  table = fuse.run(cfg, str(tmp_path / "out"))
  log = capsys.readouterr().out
  assert "blind PSF: LR pixel (i, j) is centred on HR pixel (2 i " in log
  assert "LR-HSI SNR not estimated (10 bands or fewer" in log
  _check_table(table, keys=FULL_REF | {"d_lambda", "d_s", "qnr"})
  for v in (table[m] for m in METHODS):
    assert 0 <= v["d_lambda"] <= 2 and 0 <= v["d_s"] <= 2
    np.testing.assert_allclose(v["qnr"], (1 - v["d_lambda"]) * (1 - v["d_s"]), rtol=1e-5)
  with np.load(tmp_path / "out" / "fused.npz") as f:
    x = f["X"]
    assert x.shape == sc.cube.shape and x.dtype == np.float32
    # Returned in the input's units: scale x 100, so values up to ~100, never above.
    assert 0 <= x.min() and x.max() <= float(f["scale"]) + 1e-3 and x.max() > 5
    assert f["psf"].shape == (3, 3) and f["srf"].shape == (3, 10)  # blind, ratio 2 -> 3 x 3
  run = json.loads((tmp_path / "out" / "run.json").read_text())
  assert run["ratio"] == 2 and run["blind"] is True and run["lr_hsi_snr_db"] is None
  with np.load(tmp_path / "out" / "fused.npz") as f:  # where the blind PSF puts the LR pixels
    np.testing.assert_allclose(run["lr_pixel_centre_hr_px"],
                               sdp.blind.footprint_centre(f["psf"]), atol=1e-3)


def test_library_fuse_reproduces_launch_fuse_bit_for_bit(tmp_path):
  # Acceptance: the public API with the same settings and seed returns the same X as the
  # entry point (which is a shell over the same calls).
  _fuse_inputs(tmp_path)
  cfg = _fuse_cfg(tmp_path, train_rank=1)  # below the scene's rank (3 endmembers), so it acts
  cfg.methods = "sdp,baseline"
  fuse.run(cfg, str(tmp_path / "out"))
  r = sdp_config.resolve(cfg)
  y, z, scale = sdp.scale_pair(np.load(tmp_path / "lr.npz")["Y"],
                               np.load(tmp_path / "hr.npz")["Z"])
  pixels = sdp.low_rank_pixels(y.reshape(-1, y.shape[-1]), 1)
  assert not np.allclose(pixels, y.reshape(-1, y.shape[-1]))  # the projection did something
  prior = sdp.train_prior(pixels, steps=r.train.steps, key=r.seed,
                          **sdp_config.prior_settings(r))
  key = jax.random.fold_in(jax.random.key(r.seed), 1)
  got = sdp.fuse(y, z, prior=prior, key=key, steps=r.solver.num_steps,
                 **sdp_config.fusion_settings(r))
  # The blind fit's MSI calibration (the `real` preset's radiometry) goes with its operators.
  base = sdp.fuse(y, sdp.apply_msi_calibration(z, got.calibration), key=key, psf=got.psf,
                  srf=got.srf, steps=r.solver.num_steps,
                  **sdp_config.fusion_settings(r))
  with np.load(tmp_path / "out" / "fused.npz") as f:
    np.testing.assert_array_equal(got.x * scale["hsi"], f["X"])
    np.testing.assert_array_equal(base.x * scale["hsi"], f["X_baseline"])
    np.testing.assert_array_equal(got.psf, f["psf"])
  # Only the asked methods ran and were scored.
  table = json.loads((tmp_path / "out" / "metrics.json").read_text())
  assert set(table) == {"sdp", "baseline", "seconds", "conventions"}
  assert "UIQI" in table["conventions"]["uiqi"] or "Q" in table["conventions"]["uiqi"]


@pytest.mark.slow
def test_fuse_without_reference_known_operators(tmp_path):
  _fuse_inputs(tmp_path)
  cfg = _fuse_cfg(tmp_path, psf=str(tmp_path / "ops.npz") + ":psf",
                  srf=str(tmp_path / "ops.npz") + ":srf")
  table = fuse.run(cfg, str(tmp_path / "out"))
  _check_table(table, keys={"d_lambda", "d_s", "qnr"})
  assert "psnr" not in table["sdp"]
  run = json.loads((tmp_path / "out" / "run.json").read_text())
  assert run["blind"] is False
  with np.load(tmp_path / "out" / "fused.npz") as f, np.load(tmp_path / "ops.npz") as ops:
    np.testing.assert_allclose(f["srf"], ops["srf"], rtol=1e-6)


def test_fuse_snr_line_warns_only_above_the_measured_range():
  rng = np.random.default_rng(0)
  pixels = rng.uniform(0, 1, (300, 3)) @ rng.uniform(0, 1, (3, 40))
  pixels += rng.normal(0, 0.1 * pixels.std(), pixels.shape)
  snr = report.lr_snr_db(pixels)
  assert snr == round(sdp.subspace_snr_db(pixels, 10), 2) and 15 < snr < 30
  assert report.lr_snr_db(pixels[:, :10]) is None
  assert report.lr_snr_db(np.ones((50, 40))) is None  # no noise at all: not inf in run.json
  assert "Warning" not in report.snr_line(snr, 3e-4)
  assert f"{snr:.1f} dB" in report.snr_line(snr, 3e-4)
  warn = report.snr_line(report.HIGH_SNR_DB + 0.1, 3e-4)
  assert "--config.solver.gam=0.0003" in warn and "try --config.solver.gam=3e-5" in warn


# ----------------------------------------------------------------------------- input errors


def test_fuse_rejects_ratio_that_does_not_divide(tmp_path):
  _fuse_inputs(tmp_path)
  np.savez(tmp_path / "hr.npz", Z=np.ones((15, 16, 3), np.float32))
  with pytest.raises(ValueError, match="ratio does not divide.*crop the HR-MSI"):
    fuse.load_inputs(_fuse_cfg(tmp_path))
  np.savez(tmp_path / "hr.npz", Z=np.ones((16, 24, 3), np.float32))
  with pytest.raises(ValueError, match="different ratios"):
    fuse.load_inputs(_fuse_cfg(tmp_path))


def test_fuse_rejects_band_mismatch(tmp_path):
  _fuse_inputs(tmp_path)
  np.savez(tmp_path / "ops.npz", srf=np.ones((10, 3), np.float32) / 3)
  with pytest.raises(ValueError, match=r"\(b, B\) = \(3, 10\).*transposed"):
    fuse.load_inputs(_fuse_cfg(tmp_path, srf=str(tmp_path / "ops.npz") + ":srf"))
  np.savez(tmp_path / "px.npz", p=np.ones((50, 7), np.float32))
  with pytest.raises(ValueError, match="train_pixels have 7 bands"):
    fuse.load_inputs(_fuse_cfg(tmp_path, train_pixels=str(tmp_path / "px.npz") + ":p"))
  np.savez(tmp_path / "ref.npz", X=np.ones((16, 16, 9), np.float32))
  with pytest.raises(ValueError, match="fix --config.data.reference"):
    fuse.load_inputs(_fuse_cfg(tmp_path, reference=str(tmp_path / "ref.npz") + ":X"))


def test_fuse_rejects_nan_and_swapped_inputs(tmp_path):
  _, y, z = _fuse_inputs(tmp_path)
  y = y.copy()
  y[1, 2, 3] = np.nan  # a no-data pixel: masked (filled, left out, marked), not an error
  np.savez(tmp_path / "lr.npz", Y=y)
  inp = fuse.load_inputs(_fuse_cfg(tmp_path))
  assert (~inp["valid"]).sum() == 4 and not inp["valid"][2:4, 4:6].any()  # ratio 2
  assert np.isfinite(inp["y"]).all() and len(inp["train_pixels"]) == 8 * 8 - 1
  cfg = _fuse_cfg(tmp_path)
  cfg.data.hsi = str(tmp_path / "hr.npz") + ":Z"
  np.savez(tmp_path / "lr.npz", Y=np.ones((8, 8, 10), np.float32))
  cfg.data.msi = str(tmp_path / "lr.npz") + ":Y"
  with pytest.raises(ValueError, match="swap"):
    fuse.load_inputs(cfg)
  with pytest.raises(ValueError, match="--config.data.hsi=FILE"):
    fuse.load_inputs(_fuse_cfg(tmp_path, hsi=""))


def test_infer_ratio_any_divisor():
  assert sdp.infer_ratio((5, 7, 30), (15, 21, 4)) == 3
  assert sdp.infer_ratio((4, 4, 30), (32, 32, 4)) == 8
  with pytest.raises(ValueError, match="rows, columns, bands"):
    sdp.infer_ratio((4, 4), (8, 8, 3))


# ----------------------------------------------------------------------------- CLI contract


@pytest.mark.slow
def test_evaluate_sdp_command_line(tmp_path):
  path, _ = _cube_file(tmp_path, with_wavelengths=False)
  out = tmp_path / "cli"
  cmd = [sys.executable, "-m", "launch.evaluate_sdp", "--config=configs/sdp.py:crop",
         f"--config.data.path={path}", "--config.data.key=cube",
         "--config.data.wavelengths_nm=420:900", "--config.budget=fast",
         "--config.model.hidden=16", "--config.diffusion.num_timesteps=40",
         "--config.train.batch=16", "--config.train.steps=2", "--config.solver.num_steps=2",
         "--config.blind.steps=2", f"--workdir={out}"]
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = json.loads((out / "metrics.json").read_text())
  _check_table(table)
  assert "sdp" in proc.stdout and "psnr" in proc.stdout  # the printed table
  run = json.loads((out / "run.json").read_text())
  assert "wavelengths: config" in run["scene"]


def test_entry_point_runs_from_any_directory_and_logs_progress(tmp_path):
  # From a folder that holds no configs/: the config path resolves against the package; in a
  # non-terminal (CI, batch logs) progress comes as plain log lines.
  cmd = [sys.executable, "-m", "launch.train_sdm", "--config=configs/sdp.py:demo",
         "--config.data.height=16", "--config.data.width=8", "--config.data.num_bands=10",
         "--config.data.num_endmembers=3", "--config.model.hidden=16",
         "--config.diffusion.num_timesteps=40", "--config.train.batch=16",
         "--config.train.steps=4", "--config.train.log_every=2", "--config.train.fid_samples=30",
         "--workdir=out"]
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  env.pop("HSIJAX_PROGRESS", None)
  proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "SDM train: 4/4 steps (100%)" in proc.stdout and "loss" in proc.stdout
  assert (tmp_path / "out" / "metrics.json").is_file()
  assert (tmp_path / "out" / "prior.json").is_file()
  prior = sdp.load_prior(tmp_path / "out")
  assert prior.num_bands == 10 and prior.info["steps"] == 4
