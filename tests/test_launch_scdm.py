"""End-to-end tests of the SCDM entry points (train_scdm, sample_scdm) and configs/scdm.py.

Everything runs on a small synthetic cube (32 x 32 x 8, RGB = bands 0, 3, 6) with a tiny
U-Net so compiles stay short; tests/conftest.py gives 8 CPU devices, so batches of 8 are
sharded over the mesh `data` axis.
"""
import json

import jax
import numpy as np
import pytest

from configs import scdm as scdm_config
from hsijax import metrics, scdm
from hsijax.checkpoint import Checkpointer
from hsijax.scdm import evaluate as scdm_eval
from launch import sample_scdm, scdm_data, train_scdm


def _cube(path, h=32, w=32, b=8, seed=0):
  """Smooth positive cube in DN-like units, saved as path (npz, key 'cube')."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
  abund = np.stack([yy, xx, 1 - yy * xx], -1)
  spectra = rng.uniform(500, 3000, size=(3, b))
  cube = (abund @ spectra + rng.normal(0, 10, (h, w, b))).astype(np.float32)
  np.savez(path, cube=cube)
  return cube


def _cfg(path, **overrides):
  cfg = scdm_config.get_config("tiny")
  cfg.data.path = f"{path}:cube"
  cfg.data.num_bands = 8
  cfg.data.rgb_bands = (0, 3, 6)
  cfg.data.split = "quadrant"
  # The paper's (plain) cascade through the entry points; the residual one (the tiny
  # preset's default) in tests/test_scdm_residual.py.
  cfg.model.residual = False
  cfg.model.estimate_only = ()
  cfg.model.base = 8
  cfg.model.channel_mults = (1, 2)
  cfg.model.groups = 4
  cfg.train.steps = 2
  cfg.train.crop = 16
  cfg.train.batch = 8
  cfg.train.checkpoint_every = 1
  cfg.train.log_every = 1
  cfg.sample.num_steps = 2
  cfg.sample.tile = 16
  for k, v in overrides.items():
    node = cfg
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return cfg


# ------------------------------------------------------------------------------- config


def test_presets_follow_the_paper():
  c = scdm_config.get_config("paper_houston")
  assert (c.data.num_bands, c.model.base, tuple(c.model.channel_mults)) == \
      (48, 128, (1, 2, 2, 2, 2, 2, 2))
  assert (c.train.crop, c.train.batch, c.train.steps, c.train.lr) == (256, 4, 100_000, 1e-4)
  assert (c.train.ema_decay, c.train.ema_start, c.train.sam_weight, c.train.cond_drop) == \
      (0.9999, 2000, 1.0, 0.1)
  assert (c.data.norm_mean, c.data.norm_std) == (3693.0, 7410.0)
  assert (c.sample.method, c.sample.num_steps, c.diffusion.num_timesteps) == \
      ("ddpm", None, 1000)
  s0, s1 = c.stages
  assert (s0.guidance_scale, s0.pdt_target, s0.pdt_p_T) == (0.0, "eps", 0.96)
  assert s1.pdt_p_T == 0.88 and 0 < s1.guidance_scale < 2.5
  p = scdm_config.get_config("paper_pavia_centre")
  assert p.data.num_bands == 102 and [s.pdt_p_T for s in p.stages] == [0.97, 0.90]
  assert p.data.norm_mean is None  # measured on the data
  assert len(scdm_config.get_config("tiny,stages=1").stages) == 1
  # The authors' code as one named option; the paper-text settings stay the default.
  a = scdm_config.get_config("paper_houston,authors,stages=3")
  assert [(s.guidance_scale, s.pdt_target, s.pdt_p_T) for s in a.stages] == \
      [(2.5, "x", 0.96)] * 3
  assert scdm.StageTrainSettings(**scdm_config.train_settings(a)).param_init == "torch"
  assert c.train.param_init == "flax"
  assert len(scdm_config.get_config("tiny,stages=3").stages) == 3
  # 3 stages: the eq. 12 rule by default, the paper's ablation counts in the paper presets.
  cube48 = np.random.default_rng(0).uniform(1, 2, (1, 8, 8, 48))
  bands = lambda cfg, n=None: [len(b) for b in
                               scdm_config.make_cascade(cfg, cube48, n).band_sets]
  assert bands(scdm_config.get_config("tiny,stages=3")) == [7, 19, 48]
  h3 = scdm_config.get_config("paper_houston,stages=3")
  assert bands(h3) == [12, 24, 48]
  assert tuple(scdm_config.get_config("paper_pavia_centre,stages=3").stage_counts) == \
      (12, 34, 102)
  assert bands(h3, 1) == [48]
  assert scdm_config.make_cascade(h3, cube48).norm_mean == 3693.0  # the paper's normaliser
  with h3.unlocked():
    h3.stage_counts = (12, 48)
  with pytest.raises(ValueError, match="one band count per stage"):
    scdm_config.make_cascade(h3, cube48)
  assert c.model.prediction == "eps"  # the paper's target
  legacy = scdm.make_cascade(8, rgb_bands=(0, 3, 6)).to_json()
  legacy["model"].pop("prediction")  # an scdm_meta.json from before the option
  assert scdm.Cascade.from_json(legacy).prediction == "eps"
  with pytest.raises(ValueError, match="stages=1"):
    scdm_config.get_config("tiny,stages=5")
  with pytest.raises(ValueError, match="preset"):
    scdm_config.get_config("houston")


# ------------------------------------------------------------------------- train + sample


def _one_level(cfg):
  # The smallest U-Net (one level, one ResBlock down): short compiles, same code paths.
  cfg.model.channel_mults = (1,)
  cfg.model.num_res_down = 1
  cfg.model.num_res_up = 2
  return cfg


def test_train_and_sample_end_to_end(tmp_path):  # ~45 s of CPU: two stage compiles, sampler
  cube = _cube(tmp_path / "cube.npz")
  cfg = _one_level(_cfg(tmp_path / "cube.npz", **{"train.checkpoint_every": 100}))
  wd = tmp_path / "run"
  metrics = train_scdm.run(cfg, wd)
  assert set(metrics) == {"stage0", "stage1"}
  assert [metrics[k]["num_bands"] for k in ("stage0", "stage1")] == [4, 8]
  assert all(np.isfinite(metrics[k]["final_loss"]) and metrics[k]["steps"] == 2
             for k in metrics)
  assert Checkpointer(wd / "stage1" / "checkpoints").latest_step() == 2
  meta = json.loads((wd / "cascade.json").read_text())
  assert meta["band_sets"] == [[0, 2, 4, 6], list(range(8))]
  train = np.stack(scdm_eval.quadrants(cube)[:3])
  np.testing.assert_allclose(meta["norm_mean"], train.mean((0, 1, 2)), rtol=1e-5)  # per band
  np.testing.assert_allclose(meta["norm_std"], train.std((0, 1, 2)), rtol=1e-5)

  out = sample_scdm.run(cfg, wd)
  with np.load(wd / "samples.npz") as f:
    x = f["X"]
  assert x.shape == (16, 16, 8) and x.dtype == np.float32 and np.all(np.isfinite(x))
  saved = json.loads((wd / "metrics.json").read_text())
  for key in ("mpsnr", "sam_deg", "sam_rad", "mssim", "rmse"):
    assert key in saved and key in out
  assert "stage0" in saved  # training entries kept
  ref = scdm_eval.quadrants(cube)[3]
  np.testing.assert_allclose(saved["rmse"], np.sqrt(np.mean((ref - x) ** 2.0)), rtol=1e-5)
  np.testing.assert_allclose(saved["sam_rad"], np.deg2rad(saved["sam_deg"]), rtol=1e-5)
  assert (wd / "samples.png").is_file() and "conventions" in saved
  # The library verbs give the entry point's cube bit for bit (same weights, settings, key).
  casc = scdm.load(wd)
  lib = scdm.sample(casc, ref[..., list(cfg.data.rgb_bands)],
                    key=jax.random.fold_in(jax.random.key(int(cfg.seed)), 1_000_003),
                    stages=scdm_config.split_stage_list(cfg), **scdm_config.sample_settings(cfg))
  np.testing.assert_array_equal(lib, x)
  # Any image size samples (padded to the U-Net's factor inside, cropped back).
  odd = scdm.sample(casc, ref[:13, :11, list(cfg.data.rgb_bands)], key=0, num_steps=2,
                    method="ddim", tile=16, show_progress=False)
  assert odd.shape == (13, 11, 8) and np.all(np.isfinite(odd))
  with pytest.raises(ValueError, match="2-stage cascade"):
    sample_scdm.run(_cfg(tmp_path / "cube.npz", stages=[cfg.stages[0]]), wd)


def _tiny_resume_cfg(path, steps):
  # One level and one stage: the smallest U-Net, so three short runs compile quickly.
  cfg = _one_level(_cfg(path, **{"train.steps": steps, "stage": "0", "train.crop": 8}))
  cfg.train.ema_start = 1
  # The run is "killed" by asking for fewer steps, which would also shorten a cosine decay:
  # a real kill keeps train.steps (tests/test_kill_resume.py covers that with the preset).
  cfg.train.lr_schedule = "constant"
  return cfg


@pytest.mark.slow  # three short training runs
def test_resume_after_interruption_equals_uninterrupted(tmp_path):
  _cube(tmp_path / "cube.npz")
  path = tmp_path / "cube.npz"
  train_scdm.run(_tiny_resume_cfg(path, 2), tmp_path / "a")   # "killed" after 2 steps
  train_scdm.run(_tiny_resume_cfg(path, 4), tmp_path / "a")   # resumed to 4
  train_scdm.run(_tiny_resume_cfg(path, 4), tmp_path / "b")   # uninterrupted
  states = []
  for d in ("a", "b"):
    with Checkpointer(tmp_path / d / "stage0" / "checkpoints") as ck:
      assert ck.latest_step() == 4
      states.append(ck.restore())
  leaves_a = jax.tree_util.tree_leaves(states[0])
  leaves_b = jax.tree_util.tree_leaves(states[1])
  assert len(leaves_a) == len(leaves_b) > 0
  for la, lb in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
  # Something did train: parameters moved away from a fresh initialisation.
  first = json.loads((tmp_path / "a" / "metrics.json").read_text())["stage0"]
  assert first["steps"] == 4


# ---------------------------------------------------------------------------------- errors


def test_sampling_errors_name_stage_and_fix(tmp_path):
  _cube(tmp_path / "cube.npz")
  cfg = _cfg(tmp_path / "cube.npz")
  wd = tmp_path / "run"
  with pytest.raises(FileNotFoundError, match="launch.train_scdm"):
    sample_scdm.run(cfg, wd)  # nothing trained at all
  train = scdm_eval.split_cube(np.load(tmp_path / "cube.npz")["cube"], "quadrant")[0]
  scdm.train(scdm_config.make_cascade(cfg, train), train, steps=0, key=0, workdir=wd,
             stages=[], **scdm_config.train_settings(cfg))  # cascade.json only
  with pytest.raises(FileNotFoundError, match=r"stage 0 .*--config.stage=0"):
    sample_scdm.run(cfg, wd)
  np.savez(tmp_path / "rgba.npz", rgb=np.ones((16, 16, 4), np.float32))
  with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
    scdm_data.sampling_inputs(_cfg(tmp_path / "cube.npz",
                                   **{"data.rgb": f"{tmp_path}/rgba.npz:rgb"}), 8, (0, 3, 6))
  with pytest.raises(ValueError, match="no parameters"):
    scdm.sample(scdm.make_cascade(8, rgb_bands=(0, 1, 2)), np.ones((4, 4, 3)), key=0)


def test_training_errors(tmp_path):
  _cube(tmp_path / "cube.npz")
  path = tmp_path / "cube.npz"
  with pytest.raises(ValueError, match="stage index"):
    train_scdm.run(_cfg(path, stage="5"), tmp_path / "a")
  with pytest.raises(ValueError, match="multiple of 2"):
    train_scdm.run(_cfg(path, **{"train.crop": 15}), tmp_path / "b")
  with pytest.raises(ValueError, match="larger than the training images"):
    train_scdm.run(_cfg(path, **{"train.crop": 32}), tmp_path / "c")
  with pytest.raises(ValueError, match="num_bands=8"):
    train_scdm.run(_cfg(path, **{"data.num_bands": 48}), tmp_path / "d")
  with pytest.raises(ValueError, match="multiple of the device count"):
    train_scdm.run(_cfg(path, **{"train.batch": 4}), tmp_path / "e")
  with pytest.raises(FileNotFoundError):
    train_scdm.run(_cfg(tmp_path / "missing.npz"), tmp_path / "f")
  # A second run with another model (or seed) in the same folder refuses to mix stages.
  train = scdm_eval.split_cube(np.load(path)["cube"], "quadrant")[0]
  prepare = lambda cfg, seed=0: scdm.train(scdm_config.make_cascade(cfg, train), train,
                                           steps=0, key=seed, workdir=tmp_path / "g",
                                           stages=[], **scdm_config.train_settings(cfg))
  prepare(_cfg(path))
  with pytest.raises(ValueError, match=r"other inputs \(model"):
    prepare(_cfg(path, **{"model.base": 16}))
  with pytest.raises(ValueError, match="training key differs"):
    prepare(_cfg(path), seed=1)


def test_scores_and_table():
  rng = np.random.default_rng(0)
  ref = rng.uniform(1, 2, size=(12, 12, 5)).astype(np.float32)
  s = metrics.reconstruction_metrics(ref, ref * 1.0)
  assert s["rmse"] == 0 and s["sam_deg"] < 1e-3 and s["mpsnr"] == np.inf and s["mssim"] == 1
  x = ref * 2.0  # same spectral angles, RMSE = rms(ref)
  s = metrics.reconstruction_metrics(ref, x)
  assert s["sam_deg"] < 1e-3
  np.testing.assert_allclose(s["rmse"], np.sqrt(np.mean(ref.astype(np.float64) ** 2)),
                             rtol=1e-6)
  table = scdm_eval.markdown_table({"linear": s}, {"linear": 0.5})
  assert table.count("\n") == 3 and "| linear |" in table
  assert scdm_eval.generated_bands(6, (4, 1, 2)) == [0, 3, 5]


def test_normaliser_scalar_and_per_band(tmp_path):
  rng = np.random.default_rng(0)
  train = rng.uniform(100, 5000, size=(3, 4, 4, 8)) * np.linspace(0.1, 1, 8)
  cfg = _cfg(tmp_path / "unused.npz", **{"data.norm_per_band": False})
  c = scdm_config.make_cascade(cfg, train)
  np.testing.assert_allclose([c.norm_mean, c.norm_std], [train.mean(), train.std()], rtol=1e-12)
  cfg.data.norm_per_band = True
  c = scdm_config.make_cascade(cfg, train)
  np.testing.assert_allclose(c.norm_mean, train.mean((0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(c.norm_std, train.std((0, 1, 2)), rtol=1e-6)
  z = c.encode(train)
  np.testing.assert_allclose(z.mean((0, 1, 2)), 0, atol=1e-4)
  np.testing.assert_allclose(z.std((0, 1, 2)), 1, atol=1e-4)
  np.testing.assert_allclose(c.decode(z), train, rtol=1e-5)
  # A band subset (e.g. the RGB bands) uses those bands' statistics.
  np.testing.assert_allclose(c.encode(train[..., [0, 3, 5]], [0, 3, 5]), z[..., [0, 3, 5]],
                             rtol=1e-5, atol=1e-5)
  cfg.data.norm_mean, cfg.data.norm_std = 3693.0, 7410.0  # fixed values win
  c = scdm_config.make_cascade(cfg, train)
  assert (c.norm_mean, c.norm_std) == (3693.0, 7410.0)
  # A constant band cannot be normalised per band: a clear error, not a division by zero.
  train[..., 2] = 7.0
  cfg.data.norm_mean = cfg.data.norm_std = None
  with pytest.raises(ValueError, match=r"band\(s\) \[2\].*constant"):
    scdm_config.make_cascade(cfg, train)
  # The JSON round trip keeps every field.
  assert scdm.Cascade.from_json(json.loads(json.dumps(c.to_json()))) == c
