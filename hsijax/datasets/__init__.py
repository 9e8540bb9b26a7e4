"""TFDS datasets of hyperspectral tiles (array_record, no TensorFlow) and grain pipelines.

Build once, from files downloaded by hand (`python -m launch.build_dataset`):

    path = build("cubes", manual_dir="cubes/", data_dir="tfds/", tile=128)

Builders (`BUILDERS`): "cubes" (every cube file in a folder, one band count) and the paper
scenes "pavia_university" (PaviaU.mat), "pavia_centre" (Pavia.mat), "ksc" (KSC.mat),
"washington_dc_mall" (dc.tif / dc.mat), "houston2018" (20170218_UH_CASI_S4_NAD83.tif),
"chikusei" (HyperspecVNIR_Chikusei_20140729.mat). Records are tiles on a grid of
tile x tile pixels from each cube's top-left corner; the last row / column of tiles keeps
the remainder (smaller tiles), so every pixel is in exactly one record. Features: `tile`
(h, w, B) float32 in the file's units, `wavelengths_nm` (B,) (NaN when the file has none),
`source` (file name relative to manual_dir, bytes when read), `row`, `col` (top-left
corner). One split, "train", records in file order then raster order.

Read (`tfds.data_source` underneath) and feed training with resumable batch functions:

    source = open_source("cubes:train", "tfds/")
    crops = scdm_crop_batches(source, crop=64, batch=32, seed=0)   # crops(step)["cube"]
    pixels = prior_pixel_batches(source, batch=4096, seed=0)        # pixels(step)
    subset = sample_pixels(source, 10_000, seed=0)                  # (<=10000, B)
"""
from hsijax.datasets.builders import (ALIASES, BUILDERS, SPLIT, VERSION, Chikusei, Cubes,
                                      Houston2018, Ksc, PaviaCentre, PaviaUniversity,
                                      WashingtonDcMall, build, canonical_name,
                                      dataset_metadata, find_file, load_scene, open_source,
                                      summary, tile_grid)
from hsijax.datasets.pipelines import (StepBatches, prior_pixel_batches, sample_pixels,
                                       scdm_crop_batches, tile_shapes)

__all__ = [
    "ALIASES", "BUILDERS", "SPLIT", "VERSION", "Chikusei", "Cubes", "Houston2018", "Ksc",
    "PaviaCentre", "PaviaUniversity", "WashingtonDcMall", "build", "canonical_name",
    "dataset_metadata", "find_file", "load_scene", "open_source", "summary", "tile_grid",
    "StepBatches", "prior_pixel_batches", "sample_pixels", "scdm_crop_batches", "tile_shapes",
]
