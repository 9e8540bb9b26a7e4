"""TFDS builders that tile hyperspectral cubes into array_record files, with no TensorFlow.

Each builder is a real `tfds.core.GeneratorBasedBuilder` (name, version 1.0.0, features,
`dataset_info.json` / `features.json` / `metadata.json`, one split "train"), so the result
is read back with `tfds.data_source(name, data_dir=..., split="train")` or `open_source`.

TensorFlow-free writing: TFDS encodes features with NumPy and serialises `tf.train.Example`
protos from its own copy of the proto definitions, so `download_and_prepare` runs without
TensorFlow -- except in its generic split writer, whose shuffler spills to temporary files
through `tf.io.gfile` once a split exceeds 1 GB (`tensorflow_datasets.core.shuffle`), which
fails without TensorFlow. `_TileBuilder._generate_splits` therefore replaces that writer:
it streams the encoded examples, in generation order, into ~1 GiB `array_record` shards
(`group_size:1` like TFDS's, for random access), renames them to TFDS's shard names and
returns the `SplitInfo`. Memory stays at one cube plus one tile whatever the dataset's size.

Compression: TFDS writes array_record's default (zstd level 3), which on a real
128 x 128 x 48 float32 tile (this repo's Houston crop) saves ~40 % of the disk but reads
3-5x slower (12-19 ms vs 4 ms a tile on a busy 2-core machine); training re-reads tiles at
random, so records are written uncompressed by default (`compression="zstd"`, or
`"brotli"`: ~45 % smaller, slowest reads, for archives).
"""
from __future__ import annotations

import os
import pathlib
import shutil
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer
from tensorflow_datasets.core.utils import py_utils as tfds_py_utils

from hsijax import data as data_lib

VERSION = "1.0.0"
SPLIT = "train"
META_KEY = "hsijax"
CUBE_SUFFIXES = (".npz", ".npy", ".mat", ".h5", ".hdf5", ".he5", ".tif", ".tiff", ".hdr")
SHARD_BYTES = 1 << 30  # start a new array_record shard past this many serialised bytes
COMPRESSION = {"none": "uncompressed", "zstd": "zstd:3", "brotli": "brotli"}

_INSTRUCTIONS = ("Put the downloaded file(s) in one folder and pass it as manual_dir "
                 "(python -m launch.build_dataset --name=NAME --manual_dir=DIR --data_dir=OUT).")


def tile_grid(height: int, width: int, tile: int) -> list[tuple[int, int, int, int]]:
  """(row, col, h, w) of the tiles of an H x W cube, row-major from the top-left corner.

  Tiles start every `tile` pixels; the last row / column of tiles keeps what is left, so
  edge tiles may be smaller than tile x tile and every pixel is in exactly one tile.
  """
  return [(r, c, min(tile, height - r), min(tile, width - c))
          for r in range(0, height, tile) for c in range(0, width, tile)]


class _TileBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Tiles of the cubes in `manual_dir`; subclasses say which files and how to load them.

  Not registered with TFDS (no global name clash, re-importable); the written dataset is
  read from its files, which TFDS does for any unregistered name.
  """

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): "Tiles (tile, wavelengths_nm, source, row, col), one split."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  DESCRIPTION = "Hyperspectral tiles."

  def __init__(self, *, tile: int = 128, manual_dir: str | os.PathLike | None = None,
               compression: str = "none", **kwargs):
    if int(tile) < 1:
      raise ValueError(f"tile must be a positive number of pixels, got {tile}")
    if compression not in COMPRESSION:
      raise ValueError(f"compression must be one of {', '.join(COMPRESSION)}, got "
                       f"{compression!r}")
    self._tile = int(tile)
    self._compression = compression
    self._manual_dir = manual_dir
    self._meta: dict[str, Any] = {}
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  # -- what subclasses define ------------------------------------------------------------

  def cube_files(self, manual_dir: pathlib.Path) -> list[tuple[pathlib.Path, str]]:
    """(path, source name) of the cubes to tile; raises FileNotFoundError when none."""
    raise NotImplementedError

  def load(self, path: pathlib.Path) -> data_lib.Cube:
    return data_lib.load_cube(path)

  # -- TFDS ------------------------------------------------------------------------------

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "tile": tfds.features.Tensor(shape=(None, None, None), dtype=np.float32,
                                         encoding="bytes", doc="(h, w, B), source units"),
            "wavelengths_nm": tfds.features.Tensor(shape=(None,), dtype=np.float32,
                                                   doc="(B,) band centres, NaN if unknown"),
            "source": tfds.features.Text(doc="file the tile comes from"),
            "row": tfds.features.Scalar(np.int32, doc="top row in the source cube"),
            "col": tfds.features.Scalar(np.int32, doc="left column in the source cube"),
        }),
        disable_shuffling=True,  # records stay in file / raster order
        metadata=tfds.core.MetadataDict(),
    )

  def _resolved_manual_dir(self, dl_manager=None) -> pathlib.Path:
    if self._manual_dir is not None:
      return pathlib.Path(self._manual_dir).expanduser()
    return pathlib.Path(os.fspath(dl_manager.manual_dir))

  def _split_generators(self, dl_manager):
    files = self.cube_files(self._resolved_manual_dir(dl_manager))
    return {SPLIT: self._generate_examples(files)}

  def _generate_examples(self, files: Sequence[tuple[pathlib.Path, str]]
                         ) -> Iterator[tuple[int, dict[str, Any]]]:
    bands, first, index = None, None, 0
    shapes, listing = [], []
    for path, name in files:
      cube = self.load(path)
      height, width, b = cube.data.shape
      if bands is None:
        bands, first = b, name
      elif b != bands:
        raise ValueError(
            f"{name} has {b} bands but {first} has {bands}: all cubes of one dataset must "
            f"have the same band count; move {name} to a folder of its own and build it as "
            "another dataset")
      wl = (np.full(b, np.nan, np.float32) if cube.wavelengths_nm is None
            else np.asarray(cube.wavelengths_nm, np.float32))
      grid = tile_grid(height, width, self._tile)
      listing.append({"source": name, "height": height, "width": width, "bands": b,
                      "first_record": index, "num_tiles": len(grid),
                      "wavelengths": cube.wavelengths_nm is not None})
      for r, c, h, w in grid:
        yield index, {"tile": np.ascontiguousarray(cube.data[r:r + h, c:c + w]),
                      "wavelengths_nm": wl, "source": name, "row": r, "col": c}
        shapes.append((h, w))
        index += 1
      del cube
    self._meta = {"tile": self._tile, "compression": self._compression, "bands": bands,
                  "num_tiles": index, "files": listing,
                  "ignored": list(getattr(self, "ignored", [])), "tile_shapes": shapes}

  def _generate_splits(self, dl_manager, download_config) -> list[tfds.core.SplitInfo]:
    """Streams each split into array_record shards in order (no TFDS shuffler, no TF)."""
    del download_config
    features = self.info.features
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    infos = []
    for split, examples in self._split_generators(dl_manager).items():
      template = self._get_filename_template(split_name=split)
      infos.append(_write_split(
          examples, template,
          lambda ex: serializer.serialize_example(features.encode_example(ex)),
          f"group_size:1,{COMPRESSION[self._compression]}"))
    self.info.metadata[META_KEY] = self._meta
    return infos

  # TFDS looks for checksums beside the builder's source file, and its lookup needs the
  # importlib_resources backport; these builders download nothing, so there is no such file.
  @tfds_py_utils.classproperty
  @classmethod
  def code_path(cls):
    return None

  # TFDS prints "Downloading and preparing ..." / "... prepared" to stdout; callers report.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass


def _write_split(examples, template, serialize, options: str) -> tfds.core.SplitInfo:
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  folder = pathlib.Path(os.fspath(template.data_dir))
  tmp, lengths, sizes, writer = [], [], [], None
  try:
    for _, example in examples:
      record = serialize(example)
      if writer is None or sizes[-1] >= SHARD_BYTES:
        if writer is not None:
          writer.close()
        tmp.append(folder / f".{template.split}-{len(tmp):05d}.partial")
        writer = array_record_module.ArrayRecordWriter(os.fspath(tmp[-1]), options)
        lengths.append(0)
        sizes.append(0)
      writer.write(record)
      lengths[-1] += 1
      sizes[-1] += len(record)
  finally:
    if writer is not None:
      writer.close()
  if not tmp:
    raise ValueError(f"no tiles were produced for split {template.split!r}")
  for i, path in enumerate(tmp):
    os.replace(path, os.fspath(template.sharded_filepath(shard_index=i, num_shards=len(tmp))))
  return tfds.core.SplitInfo(name=template.split, shard_lengths=lengths,
                             num_bytes=sum(sizes), filename_template=template)


# ----------------------------------------------------------------------------------------
# The builders.
# ----------------------------------------------------------------------------------------


class Cubes(_TileBuilder, skip_registration=True):
  """Every cube file under manual_dir (sub-folders too): .npz / .npy / .mat (v5, v7.3) /
  .h5 / .tif / ENVI .hdr (its binary beside it), loaded with `hsijax.data.load_cube`."""

  name = "cubes"
  DESCRIPTION = "Tiles of every cube file in a folder (all with the same band count)."

  def cube_files(self, manual_dir):
    if manual_dir.is_file():
      return [(manual_dir, manual_dir.name)]
    if not manual_dir.is_dir():
      raise FileNotFoundError(f"manual_dir {manual_dir} does not exist; pass the folder "
                              "that holds the cube files")
    found, ignored = [], []
    for path in sorted(p for p in manual_dir.rglob("*") if p.is_file()):
      rel = path.relative_to(manual_dir).as_posix()
      if path.suffix.lower() in CUBE_SUFFIXES:
        found.append((path, rel))
      elif not (path.name.startswith(".") or path.with_suffix(".hdr").is_file()
                or path.with_name(path.name + ".hdr").is_file()):  # not an ENVI binary
        ignored.append(rel)
    if not found:
      raise FileNotFoundError(
          f"no cube files in {manual_dir} (looked for {', '.join(CUBE_SUFFIXES)}"
          + (f"; ignored {', '.join(ignored[:8])}" if ignored else "; the folder is empty")
          + ")")
    self.ignored = ignored
    return found

  def load(self, path):
    try:
      return data_lib.load_cube(path)
    except KeyError as e:
      raise KeyError(f"{e.args[0] if e.args else e} (the cubes builder reads one cube per "
                     "file: save each cube in a file of its own)") from e


class _PaperBuilder(_TileBuilder, skip_registration=True):
  """One scene file, found by its usual names (case-insensitive, sub-folders searched)."""

  FILE_NAMES: tuple[str, ...] = ()
  KEYS: tuple[str, ...] = ()

  def cube_files(self, manual_dir):
    path = find_file(manual_dir, self.FILE_NAMES, self.name)
    return [(path, path.name)]

  def load(self, path):
    return load_scene(path, self.KEYS)


def find_file(manual_dir: str | os.PathLike, names: Sequence[str], what: str) -> pathlib.Path:
  """The first of `names` (case-insensitive, in order of preference) under manual_dir."""
  manual_dir = pathlib.Path(manual_dir).expanduser()
  wanted = [n.lower() for n in names]
  if manual_dir.is_file() and manual_dir.name.lower() in wanted:
    return manual_dir
  hits = []
  if manual_dir.is_dir():
    for root, dirs, files in os.walk(manual_dir):
      dirs.sort()
      hits += [pathlib.Path(root) / f for f in sorted(files) if f.lower() in wanted]
  if not hits:
    where = (f"{manual_dir} does not exist" if not manual_dir.exists() else
             f"not found in {manual_dir} or its sub-folders")
    raise FileNotFoundError(
        f"{what}: expected one of {', '.join(names)} (names compared case-insensitively); "
        f"{where}. Download the scene and put the file there.")
  return min(hits, key=lambda p: (wanted.index(p.name.lower()), len(p.parts)))


def load_scene(path: pathlib.Path, keys: Sequence[str] = ()) -> data_lib.Cube:
  """A paper scene: its usual keys tried first (case-insensitive); a TIFF whose page layout
  is ambiguous is read as a band-sequential stack (pages are bands), as these scenes are."""
  suffix = path.suffix.lower()
  if suffix in (".mat", ".npz", ".h5", ".hdf5", ".he5"):
    for key in keys:
      try:
        return data_lib.load_cube(path, key)
      except KeyError:
        continue
  try:
    return data_lib.load_cube(path)
  except ValueError as e:
    if suffix in (".tif", ".tiff") and "ambiguous" in str(e):
      return data_lib.load_cube(path, "bhw")
    raise


def _paper(cls_name: str, name: str, files: tuple[str, ...], keys: tuple[str, ...],
           description: str) -> type[_PaperBuilder]:
  return type(cls_name, (_PaperBuilder,), {
      "name": name, "FILE_NAMES": files, "KEYS": keys, "DESCRIPTION": description,
      "__module__": __name__, "__doc__": f"{description} From {' / '.join(files)}."},
      skip_registration=True)


PaviaUniversity = _paper("PaviaUniversity", "pavia_university", ("PaviaU.mat",), ("paviaU",),
                         "ROSIS Pavia University, 610 x 340 x 103.")
PaviaCentre = _paper("PaviaCentre", "pavia_centre", ("Pavia.mat", "PaviaC.mat"), ("pavia",),
                     "ROSIS Pavia Centre, 1096 x 715 x 102.")
Ksc = _paper("Ksc", "ksc", ("KSC.mat",), ("KSC",), "AVIRIS Kennedy Space Center, 176 bands.")
WashingtonDcMall = _paper(
    "WashingtonDcMall", "washington_dc_mall", ("dc.tif", "dc.tiff", "dc.mat"), ("dc",),
    "HYDICE Washington DC Mall, 1280 x 307 x 191.")
Houston2018 = _paper(
    "Houston2018", "houston2018",
    ("20170218_UH_CASI_S4_NAD83.tif", "20170218_UH_CASI_S4_NAD83.tiff",
     "20170218_UH_CASI_S4_NAD83.hdr", "houston2018.tif", "houston2018.mat"), ("houston",),
    "CASI Houston 2018 (GRSS DFC 2018), 48 bands 380-1050 nm.")
Chikusei = _paper("Chikusei", "chikusei",
                  ("HyperspecVNIR_Chikusei_20140729.mat", "chikusei.mat"), ("chikusei",),
                  "Headwall Hyperspec-VNIR-C Chikusei, 2517 x 2335 x 128.")

BUILDERS: dict[str, type[_TileBuilder]] = {
    b.name: b for b in (Cubes, PaviaUniversity, PaviaCentre, Ksc, WashingtonDcMall,
                        Houston2018, Chikusei)}
ALIASES = {"paviau": "pavia_university", "pavia_u": "pavia_university",
           "pavia": "pavia_centre", "paviac": "pavia_centre", "dc": "washington_dc_mall",
           "dc_mall": "washington_dc_mall", "houston": "houston2018",
           "houston_2018": "houston2018", "kennedy_space_center": "ksc"}


def canonical_name(name: str) -> str:
  """The builder name for `name` or one of its aliases (case-insensitive)."""
  key = str(name).strip().lower().replace("-", "_")
  key = ALIASES.get(key, key)
  if key not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(BUILDERS)}")
  return key


def build(name: str, manual_dir: str | os.PathLike, data_dir: str | os.PathLike, *,
          tile: int = 128, compression: str = "none") -> pathlib.Path:
  """Builds dataset `name` from the files in manual_dir into data_dir/NAME/1.0.0.

  The files are found (and named in any error) before anything is written; the dataset is
  written to a temporary folder beside it and moved into place only once complete, so a
  failed build leaves an existing dataset untouched. An existing dataset is replaced.

  Args:
    name: a key of BUILDERS or an alias ("paviaU", "dc", "houston", ...).
    manual_dir: folder with the downloaded file(s) (sub-folders are searched; for one
      paper scene the file itself also works).
    data_dir: TFDS data_dir to write NAME/1.0.0 into.
    tile: tile size in pixels (edge tiles keep the remainder).
    compression: "none" (default, fastest random reads), "zstd" (TFDS's default) or
      "brotli".

  Returns:
    the dataset's folder (data_dir/NAME/1.0.0).
  """
  name = canonical_name(name)
  manual_dir = pathlib.Path(manual_dir).expanduser().resolve()
  data_dir = pathlib.Path(data_dir).expanduser().resolve()
  if data_dir.exists() and not data_dir.is_dir():
    raise NotADirectoryError(f"data_dir {data_dir} is a file; pass a folder")
  cls = BUILDERS[name]
  cls(tile=tile, manual_dir=manual_dir, compression=compression,
      data_dir=os.fspath(data_dir)).cube_files(manual_dir)
  created = not data_dir.exists()
  staging = data_dir / f".building-{name}-{uuid.uuid4().hex[:8]}"
  staging.mkdir(parents=True)
  ok = False
  try:
    builder = cls(tile=tile, manual_dir=manual_dir, compression=compression,
                  data_dir=os.fspath(staging))
    builder.download_and_prepare(
        download_dir=os.fspath(staging / "downloads"),
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir),
                                                     try_download_gcs=False))
    built = pathlib.Path(os.fspath(builder.data_path))
    final = data_dir / name / VERSION
    if final.exists():
      shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(built, final)
    ok = True
  finally:
    shutil.rmtree(staging, ignore_errors=True)
    if created and not ok and not any(data_dir.iterdir()):
      data_dir.rmdir()  # a failed first build leaves no empty data_dir behind
  return final


def _parse(name_or_name_split: str) -> tuple[str, str]:
  name, _, split = str(name_or_name_split).partition(":")
  key = name.strip().lower().replace("-", "_")
  return ALIASES.get(key, key), split or SPLIT


def open_source(name_or_name_split: str, data_dir: str | os.PathLike):
  """Random-access source of a built dataset: "NAME" or "NAME:SPLIT" (e.g. "cubes:train",
  TFDS slices like "cubes:train[:50%]" work), read with `tfds.data_source` (no TF).

  Returns the `ArrayRecordDataSource` (len, [i] -> dict of NumPy arrays; `source` is
  bytes).
  """
  name, split = _parse(name_or_name_split)
  data_dir = pathlib.Path(data_dir).expanduser()
  if not (data_dir / name).is_dir():
    have = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and
                  not p.name.startswith(".")) if data_dir.is_dir() else []
    raise FileNotFoundError(
        f"no dataset {name!r} in {data_dir}" + (f" (it has {', '.join(have)})" if have else "")
        + f"; build it first: python -m launch.build_dataset --name={name} "
        f"--manual_dir=DIR --data_dir={data_dir}")
  return tfds.data_source(name, split=split, data_dir=os.fspath(data_dir))


def dataset_metadata(source) -> dict[str, Any] | None:
  """What `build` recorded (tile, bands, files, tile_shapes), or None for other sources."""
  info = getattr(source, "dataset_info", None)
  meta = getattr(info, "metadata", None) if info is not None else None
  if meta and META_KEY in meta:
    return meta[META_KEY]
  return None


def summary(path: str | os.PathLike) -> dict[str, Any]:
  """Tiles, band count, tile size, files and bytes of a dataset folder (data_dir/NAME/1.0.0)."""
  builder = tfds.builder_from_directory(os.fspath(path))
  meta = dict((builder.info.metadata or {}).get(META_KEY, {}))
  split = builder.info.splits[SPLIT]
  return {"name": builder.info.name, "path": os.fspath(path), "num_tiles": split.num_examples,
          "num_shards": len(split.shard_lengths), "num_bytes": int(split.num_bytes),
          "tile": meta.get("tile"), "bands": meta.get("bands"), "files": meta.get("files", []),
          "ignored": meta.get("ignored", [])}
