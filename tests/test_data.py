"""Tests for hsijax.data: every loader reads a small file written here in its format."""
import pathlib

import h5py
import numpy as np
import pytest
import scipy.io
import tifffile

from hsijax import data

H, W, B = 6, 5, 4


@pytest.fixture
def cube() -> np.ndarray:
  # Distinct values everywhere, so any axis mix-up changes the array.
  return (np.arange(H * W * B, dtype=np.float32).reshape(H, W, B) * 1.5 + 0.25)


WL_NM = np.array([450.0, 550.0, 650.0, 750.0])


def _check(result: data.Cube, cube, wavelengths=None):
  assert isinstance(result, data.Cube)
  assert result.data.dtype == np.float32 and result.data.shape == (H, W, B)
  np.testing.assert_array_equal(result.data, cube)
  if wavelengths is None:
    assert result.wavelengths_nm is None
  else:
    np.testing.assert_allclose(result.wavelengths_nm, wavelengths, rtol=1e-6)


# ----------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------


def test_npz(tmp_path, cube):
  path = tmp_path / "scene.npz"
  np.savez(path, cube=cube, wavelengths_nm=WL_NM, labels=np.zeros((H, W), np.uint8))
  _check(data.load_cube(path), cube, WL_NM)
  result = data.load_cube(f"{path}:cube")
  _check(result, cube, WL_NM)
  assert result.source == f"{path}:cube"


def test_npz_micrometres_and_compressed(tmp_path, cube):
  path = tmp_path / "um.npz"
  np.savez_compressed(path, data=cube, wavelength=WL_NM / 1000.0)
  _check(data.load_cube(path), cube, WL_NM)


def test_npy(tmp_path, cube):
  path = tmp_path / "x.npy"
  np.save(path, cube.astype(np.float64))
  _check(data.load_cube(path), cube)


def test_mat_v5_known_key_by_file_name(tmp_path, cube):
  # PaviaU.mat with a second 3-D array: the key named like the file wins.
  path = tmp_path / "PaviaU.mat"
  scipy.io.savemat(path, {"paviaU": cube.astype(np.float64), "other": cube[::-1] * 0,
                          "wavelength": (WL_NM / 1000.0)[None, :]})
  result = data.load_cube(path)
  _check(result, cube, WL_NM)
  assert result.source.endswith(":paviaU")


def test_mat_v5_uint16_single_array(tmp_path, cube):
  path = tmp_path / "KSC.mat"
  scipy.io.savemat(path, {"KSC": cube.astype(np.uint16)})
  _check(data.load_cube(path), cube.astype(np.uint16).astype(np.float32))


def _write_mat73(path, arrays):
  """A v7.3 MAT-file as MATLAB writes it: HDF5 with a 512-byte text userblock and
  column-major arrays (a MATLAB (H, W, B) variable is stored as (B, W, H))."""
  with h5py.File(path, "w", userblock_size=512) as f:
    for name, arr in arrays.items():
      f.create_dataset(name, data=np.asarray(arr).T)
      f[name].attrs["MATLAB_class"] = np.bytes_("double")
  with open(path, "r+b") as f:
    f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 .")


def test_mat_v73_transposed_layout(tmp_path, cube):
  path = tmp_path / "Indian_pines_corrected.mat"
  _write_mat73(path, {"indian_pines_corrected": cube.astype(np.float64),
                      "wavelengths_nm": WL_NM[None, :]})
  with h5py.File(path, "r") as f:
    assert f["indian_pines_corrected"].shape == (B, W, H)  # really stored transposed
  _check(data.load_cube(path), cube, WL_NM)


def test_geotiff_band_first_planar(tmp_path, cube):
  path = tmp_path / "20170218_UH_CASI_S4_NAD83.tif"
  # (B, H, W) in one planar image (GDAL's band interleave), like the DFC2018 Houston GeoTIFF.
  tifffile.imwrite(path, np.transpose(cube, (2, 0, 1)), photometric="minisblack",
                   planarconfig="separate")
  assert tifffile.imread(path).shape == (B, H, W)
  _check(data.load_cube(path), cube)


@pytest.mark.parametrize("shape", [(80, 50, 103), (8, 10, 48)])
def test_tiff_band_axis_comes_from_the_file_not_from_the_sizes(tmp_path, shape):
  # More bands than rows or columns: the smallest axis is NOT the band axis. Pixel-
  # interleaved (H, W, B) loads as is.
  cube = np.random.default_rng(0).uniform(size=shape).astype(np.float32)
  path = tmp_path / "hwb.tif"
  tifffile.imwrite(path, cube, photometric="minisblack", planarconfig="contig")
  np.testing.assert_array_equal(data.load_cube(path).data, cube)


def test_tiff_page_stack_is_ambiguous_until_the_layout_is_given(tmp_path, cube):
  # B pages of H x W (a band stack) and an (H, W, B) array written without a samples axis
  # look the same: refuse with the fix, then honour FILE:bhw / FILE:hwb.
  path = tmp_path / "pages.tif"
  tifffile.imwrite(path, np.transpose(cube, (2, 0, 1)), photometric="minisblack")
  with pytest.raises(ValueError, match=r"ambiguous.*pages.tif:bhw.*pages.tif:hwb"):
    data.load_cube(path)
  _check(data.load_cube(f"{path}:bhw"), cube)
  np.testing.assert_array_equal(data.load_cube(path, "hwb").data, np.transpose(cube, (2, 0, 1)))


def test_geotiff_band_last_uint16(tmp_path):
  # Pixel-interleaved (H, W, B) TIFF: already band-last, kept as is.
  cube = np.arange(20 * 30 * 12, dtype=np.uint16).reshape(20, 30, 12)
  path = tmp_path / "band_last.tiff"
  tifffile.imwrite(path, cube, photometric="minisblack", planarconfig="contig")
  assert tifffile.imread(path).shape == (20, 30, 12)
  out = data.load_cube(path)
  np.testing.assert_array_equal(out.data, cube.astype(np.float32))


def _write_envi(tmp_path, cube, interleave, *, byte_order=0, offset=0, binary_name="scene.img",
                header_name="scene.hdr"):
  dtype = np.dtype(">f4" if byte_order else "<f4")
  layout = {"bsq": (2, 0, 1), "bil": (0, 2, 1), "bip": (0, 1, 2)}[interleave]
  raw = np.ascontiguousarray(np.transpose(cube, layout), dtype=dtype).tobytes()
  (tmp_path / binary_name).write_bytes(b"\0" * offset + raw)
  wl_um = ",\n  ".join(f"{w / 1000:.3f}" for w in WL_NM)
  (tmp_path / header_name).write_text(
      "ENVI\ndescription = {test cube,\n  written by test_data}\n"
      f"samples = {W}\nlines   = {H}\nbands   = {B}\nheader offset = {offset}\n"
      f"file type = ENVI Standard\ndata type = 4\ninterleave = {interleave}\n"
      f"byte order = {byte_order}\nwavelength units = Micrometers\n"
      f"wavelength = {{\n  {wl_um}}}\n")
  return tmp_path / header_name, tmp_path / binary_name


@pytest.mark.parametrize("interleave,byte_order,offset", [
    ("bsq", 0, 0), ("bil", 0, 0), ("bil", 1, 128), ("bip", 1, 0)])
def test_envi(tmp_path, cube, interleave, byte_order, offset):
  header, binary = _write_envi(tmp_path, cube, interleave, byte_order=byte_order, offset=offset)
  _check(data.load_cube(header), cube, WL_NM)
  _check(data.load_cube(binary), cube, WL_NM)  # the binary's header is found beside it


def test_envi_header_named_after_binary(tmp_path, cube):
  header, _ = _write_envi(tmp_path, cube, "bsq", binary_name="houston",
                          header_name="houston.hdr")
  _check(data.load_cube(header), cube, WL_NM)
  fields = data.read_envi_header(header)
  assert fields["interleave"] == "bsq" and fields["samples"] == str(W)


def test_real_npz_with_two_3d_arrays(shared_data):
  # houston2018_crop.npz holds `cube` and `rgb_vhr` (both 3-D): the known key `cube` wins.
  result = data.load_cube(shared_data / "cubes" / "houston2018_crop.npz")
  assert result.data.shape == (128, 128, 48) and result.source.endswith(":cube")
  assert result.wavelengths_nm.shape == (48,)
  assert 380 <= result.wavelengths_nm[0] < result.wavelengths_nm[-1] <= 1050


# ----------------------------------------------------------------------------
# load_array and parse_path_key
# ----------------------------------------------------------------------------


def test_load_array(tmp_path):
  srf = np.arange(12, dtype=np.float32).reshape(3, 4)
  path = tmp_path / "srf.npz"
  np.savez(path, srf=srf, wavelengths_nm=WL_NM)
  np.testing.assert_array_equal(data.load_array(path), srf)  # wavelengths are not candidates
  np.testing.assert_array_equal(data.load_array(path, "srf", ndim=2), srf)
  mat = tmp_path / "vec.mat"
  scipy.io.savemat(mat, {"v": np.arange(5.0)})  # MATLAB stores it as (1, 5)
  np.testing.assert_array_equal(data.load_array(mat, ndim=1), np.arange(5.0))


def test_parse_path_key(tmp_path):
  assert data.parse_path_key("data/PaviaU.mat:paviaU") == ("data/PaviaU.mat", "paviaU")
  assert data.parse_path_key("data/PaviaU.mat") == ("data/PaviaU.mat", None)
  assert data.parse_path_key(r"C:\data\x.mat") == (r"C:\data\x.mat", None)
  assert data.parse_path_key("a.mat:") == ("a.mat:", None)
  weird = tmp_path / "odd:name.npz"  # an existing file containing ':' stays whole
  np.savez(weird, cube=np.ones((2, 2, 2)))
  assert data.parse_path_key(str(weird)) == (str(weird), None)
  assert data.normalise_cube is not None  # re-exported from degrade


# ----------------------------------------------------------------------------
# Errors: each names the file and the problem
# ----------------------------------------------------------------------------


def test_missing_file(tmp_path):
  path = tmp_path / "nope.mat"
  with pytest.raises(FileNotFoundError, match=str(path)):
    data.load_cube(path)


def test_wrong_key_lists_available(tmp_path, cube):
  path = tmp_path / "scene.npz"
  np.savez(path, cube=cube, labels=np.zeros((H, W)))
  with pytest.raises(KeyError) as info:
    data.load_cube(path, "paviaU")
  msg = str(info.value)
  for part in (str(path), "'paviaU'", "cube (6, 5, 4)", "labels (6, 5)", "FILE:KEY",
               "--config.data.key"):
    assert part in msg


def test_ambiguous_arrays(tmp_path, cube):
  path = tmp_path / "two.npz"
  np.savez(path, a=cube, b=cube)
  with pytest.raises(KeyError, match=r"several candidate arrays: a \(6, 5, 4\), b"):
    data.load_cube(path)
  _check(data.load_cube(f"{path}:b"), cube)


def test_key_for_single_array_format(tmp_path, cube):
  path = tmp_path / "x.tif"
  tifffile.imwrite(path, np.transpose(cube, (2, 0, 1)), photometric="minisblack",
                   planarconfig="separate")
  with pytest.raises(KeyError, match=r"x.tif.*single array.*drop ':cube'"):
    data.load_cube(path, "cube")


@pytest.mark.parametrize("writer", ["npz", "mat"])
def test_two_d_array_is_not_a_cube(tmp_path, writer):
  img = np.ones((H, W), np.float32)
  path = tmp_path / f"gt.{writer}"
  if writer == "npz":
    np.savez(path, gt=img)
  else:
    scipy.io.savemat(path, {"gt": img})
  with pytest.raises(ValueError, match=rf"gt\.{writer}:gt.*'gt' has shape \(6, 5\) \(2-D\).*cube"):
    data.load_cube(path)
  with pytest.raises(ValueError, match=r"shape \(6, 5\)"):
    data.load_cube(path, "gt")


def test_nan_values(tmp_path, cube):
  bad = cube.copy()
  bad[1, 2, 3] = np.nan
  bad[0, 0, 0] = np.inf
  path = tmp_path / "bad.npz"
  np.savez(path, cube=bad)
  with pytest.raises(ValueError, match=rf"bad\.npz:cube: 2 NaN/inf values.*nan_to_num"):
    data.load_cube(path)


@pytest.mark.parametrize("name", ["broken.mat", "broken.npz", "broken.tif", "broken.npy"])
def test_corrupt_file(tmp_path, name):
  path = tmp_path / name
  path.write_bytes(b"this is not a valid file" * 10)
  with pytest.raises(ValueError, match=rf"{name}.*cannot read"):
    data.load_cube(path)


def test_truncated_envi_and_unsupported(tmp_path, cube):
  header, binary = _write_envi(tmp_path, cube, "bsq")
  binary.write_bytes(binary.read_bytes()[:-8])
  with pytest.raises(ValueError, match=r"scene.hdr.*truncated"):
    data.load_cube(header)
  other = tmp_path / "x.csv"
  other.write_text("1,2")
  with pytest.raises(ValueError, match=r"x.csv.*unsupported.*\.npz"):
    data.load_cube(other)
