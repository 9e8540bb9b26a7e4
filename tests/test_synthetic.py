"""Synthetic scene: shapes, range, exact linear mixing, sum-to-one, reproducibility."""
import numpy as np
import pytest

from hsijax import synthetic


@pytest.mark.parametrize("source", ["auto", "generated"])
def test_scene_shapes_range_and_mixing(source):
  sc = synthetic.make_scene(3, height=24, width=16, num_bands=20, num_endmembers=4,
                            source=source)
  assert sc.cube.shape == (24, 16, 20) and sc.cube.dtype == np.float32
  assert sc.abundances.shape == (24, 16, 4)
  assert sc.endmembers.shape == (4, 20)
  assert sc.wavelengths_nm.shape == (20,)
  np.testing.assert_allclose(sc.wavelengths_nm[[0, -1]], [400, 780])
  assert sc.cube.min() >= 0 and sc.cube.max() == pytest.approx(1.0)
  assert sc.abundances.min() >= 0
  np.testing.assert_allclose(sc.abundances.sum(-1), 1.0, atol=1e-6)
  # Linear mixing model holds exactly.
  np.testing.assert_allclose(sc.abundances @ sc.endmembers, sc.cube, atol=1e-6)
  assert len(sc.names) == 4 and len(set(sc.names)) == 4


def test_reproducible_and_seed_dependent():
  a = synthetic.make_scene(7, height=16, width=16, num_bands=12)
  b = synthetic.make_scene(7, height=16, width=16, num_bands=12)
  c = synthetic.make_scene(8, height=16, width=16, num_bands=12)
  np.testing.assert_array_equal(a.cube, b.cube)
  assert a.names == b.names
  assert not np.allclose(a.cube, c.cube)


def test_abundances_are_spatially_smooth():
  rng = np.random.default_rng(0)
  a = synthetic.smooth_abundances(rng, 64, 64, 3, length_scale=4.0, sharpness=2.0)
  # Neighbouring pixels are far more alike than random pixel pairs.
  neighbour = np.abs(np.diff(a, axis=0)).mean()
  shuffled = np.abs(a.reshape(-1, 3) - rng.permutation(a.reshape(-1, 3))).mean()
  assert neighbour < 0.25 * shuffled


def test_colour_spectra_are_real_reflectances():
  pytest.importorskip("colour")
  wl = synthetic.band_wavelengths(41, 380, 780)
  spectra, names = synthetic.colour_spectra(wl)
  assert spectra.shape == (53, 41) and len(names) == 53
  assert 0 < spectra.min() and spectra.max() < 1
  # ColorChecker "foliage" reflects more in the NIR than in the blue (the red edge).
  foliage = spectra[names.index("ohta:foliage")]
  assert foliage[-1] > 3 * foliage[np.argmin(np.abs(wl - 450))]


def test_generated_spectra_any_range():
  wl = synthetic.band_wavelengths(50, 400, 2400)
  spectra, _ = synthetic.generated_spectra(wl, 10, np.random.default_rng(0))
  assert spectra.shape == (10, 50)
  assert spectra.min() >= 0.02 and spectra.max() <= 0.95
  # Smooth: second differences small compared with the values.
  assert np.abs(np.diff(spectra, 2, axis=1)).max() < 0.1


def test_usgs_source(shared_data):
  path = shared_data / "speclib" / "usgs_splib07_aviris95.npz"
  sc = synthetic.make_scene(0, height=8, width=8, num_bands=30, wavelengths_nm=(450, 2300),
                            source="usgs", speclib_path=path)
  assert sc.source == "usgs" and sc.cube.shape == (8, 8, 30)
  with np.load(path) as f:
    lib_names = [str(n).strip() for n in f["names"]]
  assert all(n in lib_names for n in sc.names)


def test_bad_inputs_name_the_fix():
  with pytest.raises(ValueError, match="source='generated'"):
    synthetic.make_scene(0, height=8, width=8, num_bands=10, wavelengths_nm=(400, 1000),
                         source="colour")
  with pytest.raises(ValueError, match="fewer endmembers"):
    synthetic.make_scene(0, height=8, width=8, num_bands=10, num_endmembers=100,
                         source="generated")
  with pytest.raises(ValueError, match="unknown spectra source"):
    synthetic.make_scene(0, source="nope")
