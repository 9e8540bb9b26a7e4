"""grain input pipelines over tile sources: step-indexed batches that resume bit-identically.

A batch function `batch_fn(step)` is a pure function of (seed, step, process_index,
process_count): no iterator state, so a run restarted at step s reads exactly the batches
it would have read. Global batch `step` holds the examples with global indices
step * batch + j, j < batch; process p of P gets j in [p * batch / P, (p + 1) * batch / P),
so the processes' batches concatenated in process order are the single-process batch
(bitwise; `batch` must be divisible by P).

grain pieces used:
  * crops: `grain.MapDataset.source(tile ids).shuffle(seed).repeat().random_map(crop, seed)`
    -- every tile that fits the crop is visited once per epoch, in a fresh order each epoch,
    and the crop position comes from grain's per-index Philox generator, so element g is a
    function of (seed, g) alone and is read by random access.
  * pixels: `grain.MapDataset.range(...).random_map(draw, seed)` -- element c is
    `pixels_per_read` pixels of one tile chosen with probability proportional to its area,
    so pixels are uniform over the dataset while each step reads only
    ceil(batch / pixels_per_read) tiles.
  * iteration: `StepBatches.iterate(start)` maps the batch function over
    `grain.MapDataset.range(start, ...)` and prefetches whole batches in grain threads
    (`to_iter_dataset(grain.ReadOptions(...))`), in step order.

A source is anything with len() and [i] -> {"tile": (h, w, B) ...}: the ArrayRecord source of
`open_source`, or a list of such dicts. Tile sizes come from the dataset's metadata (written
by `build`); other sources (or TFDS sub-splits such as "train[:50%]") are scanned once.
"""
from __future__ import annotations

import collections
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from hsijax.datasets import builders

_SEED_RANGE = 2 ** 32
CACHE_MB = 512  # default LRU cache of decoded tiles per batch function


class _Tiles:
  """Decoded tiles by record index, with a thread-safe LRU cache of `cache_mb` MiB (a
  cache hit returns the same values, so caching never changes a batch)."""

  def __init__(self, source, cache_mb: float):
    self._source, self._budget = source, int(cache_mb * 2 ** 20)
    self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
    self._bytes, self._lock = 0, threading.Lock()

  def __getitem__(self, index: int) -> np.ndarray:
    with self._lock:
      if index in self._cache:
        self._cache.move_to_end(index)
        return self._cache[index]
    tile = np.asarray(self._source[index]["tile"], np.float32)
    tile.flags.writeable = False
    if tile.nbytes <= self._budget:
      with self._lock:
        if index not in self._cache:
          self._cache[index] = tile
          self._bytes += tile.nbytes
        while self._bytes > self._budget:
          self._bytes -= self._cache.popitem(last=False)[1].nbytes
    return tile


class StepBatches:
  """`batch_fn(step)` plus `iterate(start_step)` with grain prefetching.

  Attributes:
    local_batch: examples per call on this process (batch // process_count).
    bands: B.
  """

  def __init__(self, fn: Callable[[int], Any], local_batch: int, bands: int):
    self._fn = fn
    self.local_batch = local_batch
    self.bands = bands

  def __call__(self, step: int):
    step = int(step)
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    return self._fn(step)

  def iterate(self, start_step: int = 0, *, num_threads: int = 2, prefetch: int = 4
              ) -> Iterator[tuple[int, Any]]:
    """(step, batch) for step = start_step, start_step + 1, ... with `prefetch` batches
    computed ahead in `num_threads` grain threads (num_threads=0: in the caller)."""
    import grain  # pylint: disable=g-import-not-at-top
    ds = grain.MapDataset.range(int(start_step), sys.maxsize).map(lambda s: (s, self(s)))
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                     prefetch_buffer_size=prefetch)))


def tile_shapes(source) -> np.ndarray:
  """(N, 2) int64 (h, w) of each record of `source`, from the build metadata when it
  describes exactly this source, else by reading every record once."""
  meta = builders.dataset_metadata(source)
  if meta is not None and len(meta.get("tile_shapes", ())) == len(source):
    return np.asarray(meta["tile_shapes"], np.int64).reshape(-1, 2)
  return np.asarray([np.shape(source[i]["tile"])[:2] for i in range(len(source))],
                    np.int64).reshape(-1, 2)


def _bands(source) -> int:
  meta = builders.dataset_metadata(source)
  if meta is not None and meta.get("bands"):
    return int(meta["bands"])
  return int(np.shape(source[0]["tile"])[2])


def _check(source, batch: int, seed: int, process_index: int, process_count: int
           ) -> tuple[int, int]:
  if len(source) == 0:
    raise ValueError("the dataset has no tiles")
  if batch < 1 or process_count < 1 or batch % process_count:
    raise ValueError(f"batch ({batch}) must be a positive multiple of process_count "
                     f"({process_count}): each process gets batch // process_count")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  if not 0 <= seed < _SEED_RANGE:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}")
  local = batch // process_count
  return process_index * local, (process_index + 1) * local


def scdm_crop_batches(source, *, crop: int, batch: int, seed: int, process_index: int = 0,
                      process_count: int = 1, cache_mb: float = CACHE_MB) -> StepBatches:
  """Random crop x crop crops: batch_fn(step) -> {"cube": (batch // process_count, crop,
  crop, B) float32}, source units.

  Tiles smaller than crop in either direction are skipped (ValueError when none fits);
  each epoch visits every other tile once, in a shuffled order, with a uniform position.
  Decoded tiles are kept in an LRU cache of `cache_mb` MiB (0: none).
  """
  import grain  # pylint: disable=g-import-not-at-top
  crop = int(crop)
  lo, hi = _check(source, batch, seed, process_index, process_count)
  shapes, tiles = tile_shapes(source), _Tiles(source, cache_mb)
  fits = np.flatnonzero((shapes[:, 0] >= crop) & (shapes[:, 1] >= crop))
  if crop < 1 or not fits.size:
    raise ValueError(
        f"no tile fits a {crop} x {crop} crop (largest tile {shapes[:, 0].max()} x "
        f"{shapes[:, 1].max()}); use a smaller crop or rebuild the dataset with a larger "
        "--tile")

  def take(index: int, rng: np.random.Generator) -> np.ndarray:
    h, w = shapes[index]
    r, c = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    return np.array(tiles[int(index)][r:r + crop, c:c + crop])

  examples = (grain.MapDataset.source([int(i) for i in fits]).shuffle(seed=seed).repeat()
              .random_map(take, seed=seed))

  def batch_fn(step: int) -> dict[str, np.ndarray]:
    base = step * batch
    return {"cube": np.stack([examples[base + j] for j in range(lo, hi)])}

  return StepBatches(batch_fn, hi - lo, _bands(source))


def prior_pixel_batches(source, *, batch: int, seed: int, process_index: int = 0,
                        process_count: int = 1, pixels_per_read: int = 256,
                        cache_mb: float = CACHE_MB) -> StepBatches:
  """Random pixels: batch_fn(step) -> (batch // process_count, B) float32, source units.

  Global pixel g is pixel g % k of chunk g // k (k = pixels_per_read): k pixels drawn with
  replacement from one tile, the tile chosen with probability proportional to its area
  (so every pixel of the dataset is equally likely). A process reads only the chunks that
  overlap its slice. Decoded tiles are kept in an LRU cache of `cache_mb` MiB (0: none).
  """
  import grain  # pylint: disable=g-import-not-at-top
  k = int(pixels_per_read)
  if k < 1:
    raise ValueError(f"pixels_per_read must be >= 1, got {pixels_per_read}")
  lo, hi = _check(source, batch, seed, process_index, process_count)
  shapes, tiles = tile_shapes(source), _Tiles(source, cache_mb)
  cdf = np.cumsum(shapes[:, 0] * shapes[:, 1])

  def draw(_, rng: np.random.Generator) -> np.ndarray:
    t = int(np.searchsorted(cdf, rng.integers(0, cdf[-1]), side="right"))
    tile = tiles[t]
    flat = rng.integers(0, tile.shape[0] * tile.shape[1], size=k)
    return tile.reshape(-1, tile.shape[-1])[flat]

  chunks = grain.MapDataset.range(sys.maxsize).random_map(draw, seed=seed)

  def batch_fn(step: int) -> np.ndarray:
    start, stop = step * batch + lo, step * batch + hi
    first, last = start // k, (stop - 1) // k
    pixels = np.concatenate([chunks[c] for c in range(first, last + 1)])
    return pixels[start - first * k:stop - first * k]

  return StepBatches(batch_fn, hi - lo, _bands(source))


def sample_pixels(source, num: int, seed: int) -> np.ndarray:
  """Up to `num` distinct random pixels (min(num, all pixels), B) float32, in random order.

  Pixels are drawn without replacement, uniformly over the whole dataset; each tile that
  holds a drawn pixel is read once, one at a time, so memory is one tile plus the result.
  """
  shapes = tile_shapes(source)
  areas = shapes[:, 0] * shapes[:, 1]
  cdf = np.cumsum(areas)
  total = int(cdf[-1]) if cdf.size else 0
  rng = np.random.default_rng(seed)
  n = min(int(num), total)
  if n <= 0:
    return np.zeros((0, _bands(source) if len(source) else 0), np.float32)
  picks = np.arange(total) if n == total else np.sort(rng.choice(total, size=n, replace=False))
  tiles = np.searchsorted(cdf, picks, side="right")
  starts = cdf - areas
  out = None
  bounds = np.flatnonzero(np.diff(tiles)) + 1
  for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, n]):
    t = int(tiles[lo])
    tile = np.asarray(source[t]["tile"])
    if out is None:
      out = np.empty((n, tile.shape[-1]), np.float32)
    out[lo:hi] = tile.reshape(-1, tile.shape[-1])[picks[lo:hi] - starts[t]]
  return out[rng.permutation(n)]
