"""Images read by windows (hsijax.windowed): every format gives the values of the whole-array
loader, views equal the whole-image transforms bit for bit, and a windowed fusion reads only
windows of its inputs and returns what the in-memory fusion returns."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import tifffile

from configs import sdp as sdp_config
from hsijax import data, sdp, windowed


@pytest.fixture
def cube():
  rng = np.random.default_rng(0)
  c = rng.uniform(-0.1, 1.0, size=(23, 17, 6)).astype(np.float32)
  c[4, 5, 2] = np.nan
  return c


def _envi(tmp_path, cube, interleave, byte_order, extra=""):
  order = {"bsq": (2, 0, 1), "bil": (0, 2, 1), "bip": (0, 1, 2)}[interleave]
  dt = np.dtype(">f4" if byte_order else "<f4")
  (tmp_path / "s.img").write_bytes(b"\0" * 7 + np.transpose(cube, order).astype(dt).tobytes())
  h, w, b = cube.shape
  (tmp_path / "s.hdr").write_text(
      f"ENVI\nsamples = {w}\nlines = {h}\nbands = {b}\nheader offset = 7\ndata type = 4\n"
      f"interleave = {interleave}\nbyte order = {byte_order}\n" + extra)
  return tmp_path / "s.hdr"


def _h5(tmp_path, cube, matlab):
  with h5py.File(tmp_path / "c.h5", "w") as f:
    if matlab:  # MATLAB v7.3 stores an (H, W, B) array column-major: (B, W, H)
      f.create_dataset("cube", data=np.transpose(cube)).attrs["MATLAB_class"] = b"single"
    else:
      f.create_dataset("cube", data=cube)
  return tmp_path / "c.h5"


WRITERS = {
    "envi_bsq_le": lambda p, c: _envi(p, c, "bsq", 0),
    "envi_bil_be": lambda p, c: _envi(p, c, "bil", 1),
    "envi_bip_le": lambda p, c: _envi(p, c, "bip", 0),
    "npy": lambda p, c: (np.save(p / "c.npy", c), p / "c.npy")[1],
    "tiff_contig": lambda p, c: (tifffile.imwrite(p / "c.tif", c, photometric="minisblack",
                                                  planarconfig="contig"), p / "c.tif")[1],
    "tiff_planar": lambda p, c: (tifffile.imwrite(p / "c.tif", np.moveaxis(c, -1, 0),
                                                  photometric="minisblack",
                                                  planarconfig="separate"), p / "c.tif")[1],
    "h5": lambda p, c: _h5(p, c, matlab=False),
    "mat73": lambda p, c: _h5(p, c, matlab=True),
}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_every_lazy_format_reads_windows_equal_to_the_whole_array(tmp_path, cube, fmt):
  path = WRITERS[fmt](tmp_path, cube)
  img = windowed.open_image(path)
  whole, valid, _, _ = data.load_masked(path)
  assert img.windowed and img.shape == whole.shape == cube.shape
  for rows, cols in ((slice(0, 23), slice(0, 17)), (slice(3, 11), slice(5, 9)),
                     (slice(20, 23), slice(16, 17)), (slice(4, 5), slice(5, 6))):
    np.testing.assert_array_equal(img[rows, cols], whole[rows, cols])
  np.testing.assert_array_equal(img[6:9], whole[6:9])  # rows only
  assert np.isnan(img[4:5, 5:6]).all() and not valid[4, 5]  # a bad band = a no-data pixel


def test_compressed_tiff_and_npz_are_read_whole_with_the_same_values(tmp_path, cube):
  tifffile.imwrite(tmp_path / "z.tif", cube, compression="zlib", photometric="minisblack",
                   planarconfig="contig")
  np.savez(tmp_path / "c.npz", cube=cube)
  for path in (tmp_path / "z.tif", f"{tmp_path}/c.npz:cube"):
    img = windowed.open_image(path)
    assert not img.windowed
    np.testing.assert_array_equal(img[2:9, 1:4], data.load_masked(path)[0][2:9, 1:4])


def test_envi_bbl_scale_factor_and_ignore_value_per_window(tmp_path):
  cube = np.random.default_rng(1).uniform(1, 2, size=(9, 7, 4)).astype(np.float32) * 1000
  cube[2, 3] = -9999.0
  hdr = _envi(tmp_path, cube, "bsq", 0, "bbl = {1, 0, 1, 1}\nreflectance scale factor = "
                                        "1000\ndata ignore value = -9999\n"
                                        "wavelength = {400, 410, 420, 430}\n")
  with pytest.warns(UserWarning, match="dropped 1 bad bands"):
    img = windowed.open_image(hdr)
  with pytest.warns(UserWarning):
    whole, _, wl, _ = data.load_masked(hdr)
  assert img.shape == (9, 7, 3) and list(img.wavelengths_nm) == list(wl) == [400, 420, 430]
  np.testing.assert_array_equal(img[1:5, 2:6], whole[1:5, 2:6])
  assert np.isnan(img[2:3, 3:4]).all()


def test_stats_by_strips_match_numpy(cube, monkeypatch):
  monkeypatch.setattr(windowed, "STRIP_BYTES", 4 * 17 * 6 * 3)  # three rows per strip
  st = windowed.stats(cube)
  finite = cube[np.isfinite(cube)]
  assert st.max == finite.max() and st.min == finite.min()
  assert st.negatives == int((finite < 0).sum()) and st.nonfinite == 1
  assert st.first_nonfinite == (4, 5, 2)
  np.testing.assert_allclose(st.positive_mean, np.maximum(finite, 0).mean(), rtol=1e-6)
  assert st.valid.sum() == 23 * 17 - 1 and not st.valid[4, 5]


def test_view_equals_fill_clip_and_scale_of_the_whole_image(tmp_path, cube):
  img = windowed.open_image(WRITERS["envi_bsq_le"](tmp_path, cube))
  valid = windowed.stats(img).valid
  fill = np.median(cube[valid], axis=0)
  view = windowed.ImageView(windowed.ImageView(img, fill=fill), scale=3.7, clip=True)
  expected = np.maximum(sdp.fill_invalid(cube, valid), 0) / 3.7
  np.testing.assert_array_equal(view[0:23, 0:17], expected)
  np.testing.assert_array_equal(view[5:12, 3:8], expected[5:12, 3:8])


def test_scale_pair_of_lazy_images_equals_scale_pair_of_arrays(tmp_path, cube):
  cube = np.nan_to_num(cube)
  z = cube[..., :2].repeat(2, 0).repeat(2, 1) * 40
  np.save(tmp_path / "y.npy", cube)
  np.save(tmp_path / "z.npy", z)
  for mode in ("joint", "separate"):
    ya, za, sa = sdp.scale_pair(cube, z, mode)
    yl, zl, sl = sdp.scale_pair(windowed.open_image(tmp_path / "y.npy"),
                                windowed.open_image(tmp_path / "z.npy"), mode)
    assert windowed.is_lazy(yl) and sa == sl
    np.testing.assert_array_equal(windowed.load(yl), ya)
    np.testing.assert_array_equal(zl[10:30, 4:20], za[10:30, 4:20])


def test_sample_pixels_all_when_few_else_a_spread_subset(cube, monkeypatch):
  valid = windowed.stats(cube).valid
  np.testing.assert_array_equal(windowed.sample_pixels(cube, 10_000, valid=valid), cube[valid])
  monkeypatch.setattr(windowed, "STRIP_BYTES", 4 * 17 * 6 * 2)
  a = windowed.sample_pixels(cube, 100, seed=3, valid=valid)
  b = windowed.sample_pixels(cube, 100, seed=3, valid=valid)
  np.testing.assert_array_equal(a, b)
  n = valid.sum()  # Binomial(n, 100 / n): mean 100, sd < 10
  assert 60 <= a.shape[0] <= 140 and np.isfinite(a).all()
  rows = {tuple(p) for p in cube[valid]}
  assert all(tuple(p) in rows for p in a) and n > a.shape[0]


class _Recorder:
  """An in-memory image that records the size of every window read from it."""

  def __init__(self, a):
    self.a, self.shape, self.reads = a, a.shape, []

  def __getitem__(self, key):
    out = self.a[key]
    self.reads.append(out.shape[0] * out.shape[1])
    return out


def _scene(H=160, r=4, B=8, b=3):
  from hsijax import synthetic
  cube = np.asarray(synthetic.make_scene(0, H, H, B, num_endmembers=4,
                                         source="generated").cube, np.float32)
  srf = np.random.default_rng(0).uniform(size=(b, B)).astype(np.float32)
  srf /= srf.sum(1, keepdims=True)
  y = cube.reshape(H // r, r, H // r, r, B).mean((1, 3))
  return y, cube @ srf.T


def test_windowed_fusion_reads_only_windows_and_equals_the_in_memory_one(monkeypatch):
  y, z = _scene()
  settings = dict(tile=32, tile_overlap=8, tiles_per_call=4, blind_steps=5, blind_crop=8,
                  **sdp.WARM_START)
  methods = "baseline,bicubic,detail_injection,subspace_ls"

  def run(y_in, z_in):
    outs = {m: np.zeros(z.shape[:2] + y.shape[-1:], np.float32) for m in methods.split(",")}
    return sdp.run_methods(y_in, z_in, prior=None, key=0, methods=methods, steps=4,
                           outputs=outs, show_progress=False, **settings)

  monkeypatch.setattr(windowed, "STRIP_BYTES", 4 * 160 * 3 * 8)  # strips of 8 HR rows
  y_rec, z_rec = _Recorder(y), _Recorder(z)
  lazy, ref = run(y_rec, z_rec), run(y, z)
  for m in methods.split(","):
    np.testing.assert_array_equal(lazy.results[m], ref.results[m])
  np.testing.assert_array_equal(lazy.srf, ref.srf)
  # Never the scene: solver windows (32 HR / 8 LR px), classical windows (128 HR / 32 LR),
  # the blind estimation's 8 x 8 LR crop and the statistics' strips.
  assert max(z_rec.reads) <= 128 * 128 < z.shape[0] * z.shape[1]
  assert max(y_rec.reads) <= 32 * 32 < y.shape[0] * y.shape[1]
  assert 8 * 8 in y_rec.reads and 32 * 32 in z_rec.reads  # the blind crop


def test_blind_crop_fits_the_central_window():
  y, z = _scene(H=96)
  full = sdp.estimate_operators(y[8:16, 8:16], z[32:64, 32:64], 4, steps=20, lr=1e-3)
  crop = sdp.estimate_operators(y, z, 4, steps=20, lr=1e-3, crop=8)
  for a, b in zip(full, crop):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="blind_crop"):
    sdp.FusionSettings(blind_crop=-1)


def _geotiff(path, z):
  tags = [(33550, "d", 3, (2.0, 2.0, 0.0), True),
          (33922, "d", 6, (0.0, 0.0, 0.0, 500000.0, 4000000.0, 0.0), True),
          (34735, "H", 8, (1, 1, 0, 1, 1024, 0, 1, 1), True)]
  tifffile.imwrite(path, z, photometric="minisblack", planarconfig="contig", extratags=tags)


def test_fuse_on_envi_and_geotiff_read_by_windows_equals_npz_in_memory(tmp_path):
  from launch import fuse
  y, z = _scene(H=160, B=8)
  _envi(tmp_path, y * 1000, "bsq", 0, "wavelength = {" + ", ".join(
      str(400 + 20 * i) for i in range(8)) + "}\n")
  _geotiff(tmp_path / "z.tif", z * 1000)
  np.savez(tmp_path / "pair.npz", Y=y * 1000, Z=z * 1000)

  def run(hsi, msi, out):
    cfg = sdp_config.get_config("real,fast")
    cfg.data.hsi, cfg.data.msi = hsi, msi
    cfg.methods = "sdp,baseline,detail_injection"
    cfg.train.steps, cfg.solver.num_steps, cfg.blind.steps = 30, 3, 5
    cfg.model.hidden = 32
    cfg.data.max_train_pixels = 800  # of 1600: a sample spread over the scene
    cfg.solver.tile, cfg.solver.tile_overlap = 32, 8  # 36 windows
    return fuse.run(cfg, str(tmp_path / out))

  a = run(str(tmp_path / "s.hdr"), str(tmp_path / "z.tif"), "files")
  b = run(f"{tmp_path}/pair.npz:Y", f"{tmp_path}/pair.npz:Z", "npz")
  assert json.loads((tmp_path / "files" / "run.json").read_text())["windows"][0] == 32
  with np.load(tmp_path / "files" / "fused.npz") as f, np.load(tmp_path / "npz" /
                                                               "fused.npz") as g:
    np.testing.assert_array_equal(f["X"], g["X"])
    np.testing.assert_array_equal(f["X_baseline"], g["X_baseline"])
  assert a["sdp"] == b["sdp"]
  with tifffile.TiffFile(tmp_path / "files" / "fused.tif") as t:
    tags = t.pages[0].tags
    assert tags[33550].value == (2.0, 2.0, 0.0) and tags[33922].value[3:5] == (500000.0,
                                                                              4000000.0)
    assert t.series[0].shape == (8, 160, 160)
  assert windowed.open_image(tmp_path / "files" / "fused.hdr").wavelengths_nm[-1] == 540.0


def test_affine_msi_calibration_of_a_lazy_msi_equals_the_in_memory_one():
  from hsijax.sdp import blind, fusion
  y, z = _scene(H=64)
  z_cross = z * np.array([0.7, 1.3, 0.9], np.float32) + np.float32(0.02)
  kw = dict(steps=30, lr=1e-3, radiometry="affine", crop=8)
  psf_a, srf_a, z_a, cal_a = fusion.estimate_calibrated(y, z_cross, 4, **kw)
  rec = _Recorder(z_cross)
  psf_l, srf_l, z_l, cal_l = fusion.estimate_calibrated(y, rec, 4, **kw)
  assert windowed.is_lazy(z_l) and max(rec.reads) == 32 * 32  # only the crop was read
  np.testing.assert_array_equal(psf_a, psf_l)
  assert cal_a == cal_l and cal_a["model"] == "affine"
  np.testing.assert_array_equal(z_l[8:40, 0:64], z_a[8:40])
  np.testing.assert_array_equal(
      z_a, blind.calibrate_msi(z_cross, cal_a["gain"], cal_a["offset"]))
