"""Builds a TFDS dataset of hyperspectral tiles (array_record files, no TensorFlow).

  python -m launch.build_dataset --name=cubes --manual_dir=DIR --data_dir=OUT [--tile=128]
      [--compression=none|zstd|brotli]
  python -m launch.build_dataset --name=pavia_university --manual_dir=~/downloads --data_dir=OUT

--name: "cubes" (every .npz / .npy / .mat / .h5 / .tif / ENVI cube under DIR, all with the
same band count) or a paper scene found in DIR by its usual file name: pavia_university
(PaviaU.mat), pavia_centre (Pavia.mat), ksc (KSC.mat), washington_dc_mall (dc.tif / dc.mat),
houston2018 (20170218_UH_CASI_S4_NAD83.tif), chikusei (HyperspecVNIR_Chikusei_20140729.mat).
Writes OUT/NAME/1.0.0 (replacing an earlier build once the new one is complete) and prints
what it built. Read it back with `hsijax.datasets.open_source("NAME:train", OUT)` or
`tfds.data_source("NAME", data_dir=OUT, split="train")`.

Bad input (missing folder or file, mixed band counts, unreadable cube) prints one error
paragraph and exits with status 1; --verbose shows the traceback.
"""
from __future__ import annotations

import os
import sys
import traceback

from absl import app, flags
from absl import logging as absl_logging

_NAME = flags.DEFINE_string("name", None, "Dataset: cubes, pavia_university, pavia_centre, "
                            "ksc, washington_dc_mall, houston2018 or chikusei.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Folder with the downloaded file(s) "
                                  "(for one paper scene, the file itself also works).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Output folder (TFDS data_dir).")
_TILE = flags.DEFINE_integer("tile", 128, "Tile size in pixels (edge tiles keep the "
                             "remainder and may be smaller).")
_COMPRESSION = flags.DEFINE_enum("compression", "none", ["none", "zstd", "brotli"],
                                 "Record compression: none reads fastest; zstd saves ~40 % "
                                 "of the disk on real cubes, brotli a little more.")
_VERBOSE = flags.DEFINE_bool("verbose", os.environ.get("HSIJAX_VERBOSE", "") not in ("", "0"),
                             "Show the traceback of an error.")


def _size(num_bytes: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if num_bytes < 1024 or unit == "GiB":
      return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
    num_bytes /= 1024
  return ""


def run(name: str, manual_dir: str, data_dir: str, tile: int, compression: str = "none"
        ) -> dict:
  """Builds the dataset, prints a summary and returns it (`hsijax.datasets.summary`)."""
  missing = [f"--{k}" for k, v in (("name", name), ("manual_dir", manual_dir),
                                   ("data_dir", data_dir)) if not v]
  if missing:
    raise ValueError(f"{' and '.join(missing)} required: python -m launch.build_dataset "
                     "--name=NAME --manual_dir=DIR --data_dir=OUT [--tile=128]")
  from hsijax import datasets  # pylint: disable=g-import-not-at-top  (tfds: ~1 s)
  path = datasets.build(name, manual_dir, data_dir, tile=tile, compression=compression)
  info = datasets.summary(path)
  print(f"built {info['name']}: {info['num_tiles']} tile(s) of up to {info['tile']} x "
        f"{info['tile']} pixels x {info['bands']} bands, {_size(info['num_bytes'])} in "
        f"{info['num_shards']} array_record shard(s) -> {info['path']}")
  for f in info["files"]:
    wl = "wavelengths" if f["wavelengths"] else "no wavelengths"
    print(f"  {f['source']}: {f['height']} x {f['width']} x {f['bands']}, "
          f"{f['num_tiles']} tile(s), {wl}")
  if info["ignored"]:
    print(f"  ignored (not cube files): {', '.join(info['ignored'])}")
  print(f"read it with hsijax.datasets.open_source('{info['name']}:train', "
        f"'{os.path.dirname(os.path.dirname(info['path']))}')")
  return info


def main(argv) -> None:
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; flags are --name, --manual_dir, "
          "--data_dir, --tile", file=sys.stderr)
    sys.exit(1)
  absl_logging.set_verbosity(absl_logging.WARNING)  # TFDS logs each step at INFO
  try:
    run(_NAME.value, _MANUAL_DIR.value, _DATA_DIR.value, _TILE.value, _COMPRESSION.value)
  except KeyboardInterrupt:
    print("interrupted: nothing was replaced; run the same command again", file=sys.stderr)
    sys.exit(130)
  except Exception as e:  # noqa: BLE001  (every error ends as one paragraph)
    if _VERBOSE.value:
      traceback.print_exc()
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    expected = isinstance(e, (ValueError, KeyError, OSError, TypeError))
    print(f"error: {text or type(e).__name__}"
          + ("" if expected else f" [{type(e).__name__}: an internal error; please report it]")
          + ("" if _VERBOSE.value else " (--verbose shows the traceback)"), file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
