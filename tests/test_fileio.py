import pytest

from hsijax import fileio


def test_atomic_write_replaces_whole_file_and_cleans_up_on_error(tmp_path):
  path = tmp_path / "sub" / "out.txt"
  fileio.write_text(path, "first")
  assert path.read_text() == "first"  # parent folder created

  def fail(f):
    f.write("half")
    raise RuntimeError("killed mid-write")

  with pytest.raises(RuntimeError):
    fileio.atomic_write(path, fail)
  # The failed write left the previous content and no temp file behind.
  assert path.read_text() == "first"
  assert [p.name for p in path.parent.iterdir()] == ["out.txt"]
