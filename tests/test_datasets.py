"""hsijax.datasets: TFDS tile datasets (array_record, no TensorFlow) and grain batch functions."""
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
import tensorflow_datasets as tfds
import tifffile

from hsijax import data, datasets
from hsijax.datasets import builders
from launch import build_dataset

B = 5
TILE = 16
WL_NM = np.linspace(450.0, 850.0, B)


def _cube(seed, h, w, b=B):
  return np.random.default_rng(seed).uniform(0, 1000, (h, w, b)).astype(np.float32)


def _write_envi(folder, cube):
  h, w, b = cube.shape
  (folder / "scene.img").write_bytes(np.ascontiguousarray(np.transpose(cube, (2, 0, 1)),
                                                          "<f4").tobytes())
  wl_um = ", ".join(f"{x / 1000:.3f}" for x in WL_NM)
  (folder / "scene.hdr").write_text(
      f"ENVI\nsamples = {w}\nlines = {h}\nbands = {b}\nheader offset = 0\n"
      "file type = ENVI Standard\ndata type = 4\ninterleave = bsq\nbyte order = 0\n"
      f"wavelength units = Micrometers\nwavelength = {{{wl_um}}}\n")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """A cubes dataset from an npz (with wavelengths), an ENVI cube and a TIFF (none)."""
  root = tmp_path_factory.mktemp("cubes")
  manual = root / "manual"
  (manual / "more").mkdir(parents=True)
  cubes = {"a.npz": _cube(0, 40, 30), "more/c.tif": _cube(1, 18, 18), "scene.hdr": _cube(2, 20, 26)}
  np.savez(manual / "a.npz", cube=cubes["a.npz"], wavelengths_nm=WL_NM)
  tifffile.imwrite(manual / "more" / "c.tif", cubes["more/c.tif"], photometric="minisblack",
                   planarconfig="contig")
  _write_envi(manual, cubes["scene.hdr"])
  (manual / "README.txt").write_text("not a cube")
  path = datasets.build("cubes", manual, root / "tfds", tile=TILE)
  return {"cubes": cubes, "manual": manual, "data_dir": root / "tfds", "path": path}


def test_records_are_the_source_tiles_read_with_tfds_data_source(built):
  source = tfds.data_source("cubes", data_dir=str(built["data_dir"]), split="train")
  cubes = built["cubes"]
  expected = [(name, r, c) for name in ("a.npz", "more/c.tif", "scene.hdr")  # file order
              for r, c, _, _ in datasets.tile_grid(*cubes[name].shape[:2], TILE)]
  assert len(source) == len(expected) == 6 + 4 + 4
  for i, (name, r, c) in enumerate(expected):  # then raster order
    rec = source[i]
    assert (rec["source"].decode(), int(rec["row"]), int(rec["col"])) == (name, r, c)
    np.testing.assert_array_equal(rec["tile"], cubes[name][r:r + TILE, c:c + TILE])
    assert rec["tile"].dtype == np.float32
    if name == "more/c.tif":
      assert np.isnan(rec["wavelengths_nm"]).all() and rec["wavelengths_nm"].shape == (B,)
    else:
      np.testing.assert_allclose(rec["wavelengths_nm"], WL_NM, atol=1e-3)
  # Edge tiles keep the remainder: a.npz is 40 x 30 -> rows 16, 16, 8 x cols 16, 14.
  assert source[5]["tile"].shape == (8, 14, B)
  info = datasets.summary(built["path"])
  assert (info["num_tiles"], info["bands"], info["tile"]) == (14, B, TILE)
  assert [f["source"] for f in info["files"]] == ["a.npz", "more/c.tif", "scene.hdr"]
  assert info["ignored"] == ["README.txt"]  # scene.img is the ENVI binary, not ignored
  assert len(datasets.open_source("cubes:train", built["data_dir"])) == 14
  assert len(datasets.open_source("cubes:train[:50%]", built["data_dir"])) == 7


def test_several_shards_and_a_failed_build_keeps_the_old_dataset(built, tmp_path, monkeypatch):
  monkeypatch.setattr(builders, "SHARD_BYTES", 3000)  # a new shard after >= 3000 bytes
  manual = tmp_path / "one"
  manual.mkdir()
  cube = _cube(3, 33, 20)
  np.save(manual / "x.npy", cube)
  path = datasets.build("cubes", manual, tmp_path / "tfds", tile=TILE, compression="zstd")
  shards = sorted(path.glob("cubes-train.array_record-*"))
  assert len(shards) == datasets.summary(path)["num_shards"] > 1
  source = datasets.open_source("cubes", tmp_path / "tfds")
  np.testing.assert_array_equal(np.concatenate([np.concatenate(
      [source[2 * i + j]["tile"] for j in range(2)], 1) for i in range(3)], 0), cube)
  np.save(manual / "y.npy", _cube(4, 8, 8, B + 1))  # odd band count: the build fails ...
  with pytest.raises(ValueError, match=r"y\.npy has 6 bands but x\.npy has 5"):
    datasets.build("cubes", manual, tmp_path / "tfds", tile=TILE)
  assert len(datasets.open_source("cubes", tmp_path / "tfds")) == 6  # ... the old one stays
  assert [p.name for p in (tmp_path / "tfds").iterdir()] == ["cubes"]


def test_band_count_mismatch_names_the_odd_file(tmp_path):
  manual = tmp_path / "mixed"
  manual.mkdir()
  np.savez(manual / "a.npz", cube=_cube(0, 10, 10))
  np.savez(manual / "b.npz", cube=_cube(1, 10, 10, B - 1))
  with pytest.raises(ValueError, match=r"b\.npz has 4 bands but a\.npz has 5.*same band"):
    datasets.build("cubes", manual, tmp_path / "out")
  assert not (tmp_path / "out").exists()
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no cube files in .*empty"):
    datasets.build("cubes", tmp_path / "empty", tmp_path / "out")


def test_paper_builder_finds_paviau_mat(tmp_path):
  cube = _cube(5, 20, 12, 7)
  (tmp_path / "dl" / "pavia").mkdir(parents=True)
  scipy.io.savemat(tmp_path / "dl" / "pavia" / "PaviaU.mat",
                   {"paviaU": cube, "paviaU_gt": np.zeros((20, 12), np.uint8)})
  path = datasets.build("paviaU", tmp_path / "dl", tmp_path / "tfds", tile=10)
  assert path == tmp_path / "tfds" / "pavia_university" / "1.0.0"
  source = datasets.open_source("pavia_university:train", tmp_path / "tfds")
  assert len(source) == 4 and source[0]["source"] == b"PaviaU.mat"
  np.testing.assert_array_equal(source[3]["tile"], cube[10:20, 10:12])
  # Houston 2018: any case; a stack of single-band pages (ambiguous to hsijax.data) is read
  # as bands, as the DFC 2018 GeoTIFF is.
  tifffile.imwrite(tmp_path / "dl" / "20170218_uh_casi_s4_nad83.TIF",
                   np.transpose(cube, (2, 0, 1)), photometric="minisblack")
  source = datasets.open_source("houston:train", datasets.build(
      "houston2018", tmp_path / "dl", tmp_path / "tfds", tile=32).parents[1])
  np.testing.assert_array_equal(source[0]["tile"], cube)
  with pytest.raises(FileNotFoundError, match=r"HyperspecVNIR_Chikusei_20140729\.mat"):
    datasets.build("chikusei", tmp_path / "dl", tmp_path / "tfds")
  with pytest.raises(ValueError, match="unknown dataset 'indian'"):
    datasets.build("indian", tmp_path / "dl", tmp_path / "tfds")


def _all_pixels(source):
  return np.concatenate([source[i]["tile"].reshape(-1, B) for i in range(len(source))])


def test_crop_batches_are_step_pure_and_split_over_processes(built):
  source = datasets.open_source("cubes", built["data_dir"])
  crops = datasets.scdm_crop_batches(source, crop=8, batch=6, seed=7)
  first = crops(3)["cube"]
  assert first.shape == (6, 8, 8, B) and first.dtype == np.float32
  np.testing.assert_array_equal(first, datasets.scdm_crop_batches(
      source, crop=8, batch=6, seed=7)(3)["cube"])  # a fresh function: same batch
  assert not np.array_equal(first, crops(4)["cube"])
  assert not np.array_equal(first, datasets.scdm_crop_batches(
      source, crop=8, batch=6, seed=8)(3)["cube"])
  np.testing.assert_array_equal(first, datasets.scdm_crop_batches(
      source, crop=8, batch=6, seed=7, cache_mb=0)(3)["cube"])  # the tile cache is invisible
  half = datasets.open_source("cubes:train[:50%]", built["data_dir"])  # no metadata: scanned
  assert datasets.scdm_crop_batches(half, crop=8, batch=2, seed=0)(0)["cube"].shape == (
      2, 8, 8, B)
  halves = [datasets.scdm_crop_batches(source, crop=8, batch=6, seed=7, process_index=p,
                                       process_count=2)(3)["cube"] for p in (0, 1)]
  assert halves[0].shape == (3, 8, 8, B)
  np.testing.assert_array_equal(np.concatenate(halves), first)
  tiles = [source[i]["tile"] for i in range(len(source))]
  for crop in first:  # every crop is a window of a tile
    assert any(np.array_equal(t[r:r + 8, c:c + 8], crop) for t in tiles
               for r in range(t.shape[0] - 7) for c in range(t.shape[1] - 7))
  it = crops.iterate(2)
  for step in (2, 3, 4):
    s, b = next(it)
    assert s == step
    np.testing.assert_array_equal(b["cube"], crops(step)["cube"])
  with pytest.raises(ValueError, match="no tile fits a 17 x 17 crop"):
    datasets.scdm_crop_batches(source, crop=17, batch=2, seed=0)
  with pytest.raises(ValueError, match="multiple of process_count"):
    datasets.scdm_crop_batches(source, crop=8, batch=5, seed=0, process_count=2)


def test_pixel_batches_and_sample_pixels(built):
  source = datasets.open_source("cubes", built["data_dir"])
  everything = _all_pixels(source)
  pixels = datasets.prior_pixel_batches(source, batch=10, seed=1, pixels_per_read=4)
  first = pixels(5)
  assert first.shape == (10, B) and first.dtype == np.float32
  np.testing.assert_array_equal(first, pixels(5))
  assert not np.array_equal(first, pixels(6))
  halves = [datasets.prior_pixel_batches(source, batch=10, seed=1, pixels_per_read=4,
                                         process_index=p, process_count=2)(5) for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate(halves), first)  # chunk 2 straddles the halves
  rows = {r.tobytes() for r in everything}
  assert all(p.tobytes() in rows for p in first)

  some = datasets.sample_pixels(source, 50, seed=0)
  assert some.shape == (50, B)
  np.testing.assert_array_equal(some, datasets.sample_pixels(source, 50, seed=0))
  assert len({r.tobytes() for r in some}) == 50 and all(r.tobytes() in rows for r in some)
  every = datasets.sample_pixels(source, 10 ** 6, seed=0)  # "up to num": all of them
  assert every.shape == everything.shape == (40 * 30 + 18 * 18 + 20 * 26, B)
  np.testing.assert_array_equal(np.unique(every, axis=0), np.unique(everything, axis=0))


def test_launch_build_dataset(built, tmp_path, capsys):
  info = build_dataset.run("cubes", str(built["manual"]), str(tmp_path / "out"), 32)
  out = capsys.readouterr().out
  assert info["num_tiles"] == 2 + 1 + 1
  assert "built cubes: 4 tile(s)" in out and "5 bands" in out and "scene.hdr: 20 x 26 x 5" in out
  bad = subprocess.run(
      [sys.executable, "-m", "launch.build_dataset", "--name=ksc",
       f"--manual_dir={built['manual']}", f"--data_dir={tmp_path / 'bad'}"],
      capture_output=True, text=True, cwd=pathlib.Path(build_dataset.__file__).parents[1],
      check=False)
  assert bad.returncode == 1
  assert "error: ksc: expected one of KSC.mat" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_no_tensorflow_anywhere():
  assert "tensorflow" not in sys.modules  # nothing above imported it
  result = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True,
                          check=False)
  assert result.returncode != 0, "TensorFlow must stay uninstalled"
  assert data.load_cube is builders.data_lib.load_cube  # the builders load with hsijax.data


def test_train_prior_and_scdm_from_the_tfds_dataset(built, tmp_path):
  # Acceptance: a cubes dataset (built from files this test wrote) feeds a few training steps
  # of the spectral prior and of an SCDM cascade through grain; resuming reads the same
  # batches (same parameters as an uninterrupted run).
  from configs import scdm as scdm_config
  from configs import sdp as sdp_config
  from hsijax import sdp
  from launch import train_scdm, train_sdm
  c = sdp_config.get_config("crop")
  c.data.tfds, c.data.tfds_dir = "cubes", str(built["data_dir"])
  c.model.hidden, c.diffusion.num_timesteps = 16, 40
  c.train.batch, c.train.steps, c.train.log_every, c.train.fid_samples = 16, 4, 2, 20
  out = train_sdm.run(c, str(tmp_path / "sdm"))
  assert out["steps"] == 4 and out["num_bands"] == B and np.isfinite(out["final_loss"])
  assert sdp.load_prior(tmp_path / "sdm").num_bands == B
  s = scdm_config.get_config("tiny")
  s.data.path, s.data.tfds, s.data.tfds_dir = "", "cubes", str(built["data_dir"])
  s.data.num_bands, s.data.rgb_bands = B, (0, 2, 4)
  s.model.base, s.model.channel_mults, s.model.groups = 8, (1, 2), 4
  s.model.residual, s.model.estimate_only = False, ()  # two U-Net stages (tiny: residual)
  s.train.batch, s.train.crop, s.train.log_every, s.train.checkpoint_every = 8, 8, 1, 2
  s.train.steps = 3
  metrics = train_scdm.run(s, str(tmp_path / "scdm"))
  assert metrics["stage1"]["steps"] == 3 and np.isfinite(metrics["stage1"]["final_loss"])
  from hsijax import scdm
  casc = scdm.load(tmp_path / "scdm")
  assert casc.num_bands == B and [len(b) for b in casc.band_sets] == [3, 5]
