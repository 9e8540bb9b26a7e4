"""Overlapping tiles with smooth blending, so large scenes run in bounded memory.

A scene (H, W, C) is cut into `tile x tile` windows on a regular grid whose step is
`tile - overlap`; the last row/column of windows is pushed back to end at the image border, so
every window is full size and no padding is needed. Windows are processed independently (e.g.
`vmap`-ed and sharded over the mesh's `data` axis) and merged with weights that ramp linearly
across the overlap on window sides inside the image (image-border sides keep weight 1). With
`halo` = h, the h pixels at each inner window edge get weight 0, so any computation whose
output depends only on inputs within h pixels is reproduced exactly everywhere.

Positions are multiples of `multiple` (e.g. the SDP ratio, so the low-resolution windows of
Y line up with the high-resolution windows of Z).
"""
from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class TileGrid(NamedTuple):
  """Top-left corners (n, 2) of every window, plus the sizes used to build them."""
  starts: np.ndarray
  tile: int
  overlap: int
  height: int
  width: int


def _axis_starts(size: int, tile: int, step: int, multiple: int) -> np.ndarray:
  if tile >= size:
    return np.array([0])
  starts = list(range(0, size - tile, step)) + [size - tile]
  starts = np.unique(np.asarray(starts) // multiple * multiple)
  return starts


def make_grid(height: int, width: int, tile: int, overlap: int, multiple: int = 1) -> TileGrid:
  """Window corners covering an (height, width) image.

  Raises ValueError when the tile or overlap is not a multiple of `multiple`, or the overlap
  is not smaller than the tile.
  """
  if tile % multiple or overlap % multiple:
    raise ValueError(f"tile ({tile}) and overlap ({overlap}) must be multiples of {multiple} "
                     "(the downsampling ratio); round them to a multiple")
  if not 0 <= overlap < tile:
    raise ValueError(f"overlap ({overlap}) must be in [0, tile={tile})")
  if height % multiple or width % multiple:
    raise ValueError(f"image size {height}x{width} is not a multiple of {multiple}; crop it")
  tile_h, tile_w = min(tile, height), min(tile, width)
  if tile_h != tile_w:
    raise ValueError(f"tile {tile} does not fit the {height}x{width} image in both "
                     "directions; use a tile no larger than the smaller side")
  rows = _axis_starts(height, tile_h, tile_h - overlap, multiple)
  cols = _axis_starts(width, tile_w, tile_w - overlap, multiple)
  starts = np.stack(np.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)
  return TileGrid(starts=starts, tile=tile_h, overlap=min(overlap, tile_h - 1),
                  height=height, width=width)


def extract(x: jax.Array, grid: TileGrid, scale: int = 1) -> jax.Array:
  """Windows of x: (n, tile / scale, tile / scale, C). `scale` > 1 cuts a low-res image."""
  size = grid.tile // scale
  starts = jnp.asarray(grid.starts // scale)

  def one(s):
    return jax.lax.dynamic_slice(x, (s[0], s[1], 0), (size, size, x.shape[-1]))

  return jax.vmap(one)(starts)


def _ramp(tile: int, overlap: int, halo: int, left: bool, right: bool) -> np.ndarray:
  """1-D weights: 0 over `halo`, then linear up to 1 across the rest of the overlap."""
  w = np.ones(tile, np.float32)
  width = overlap - halo
  if overlap > 0:
    edge = np.concatenate([np.zeros(halo, np.float32),
                           (np.arange(width, dtype=np.float32) + 0.5) / max(width, 1)])
    if left:
      w[:overlap] = edge
    if right:
      w[-overlap:] = edge[::-1]
  return w


def blend_weights(grid: TileGrid, halo: int = 0) -> np.ndarray:
  """(n, tile, tile) weights: ramps only on window sides that lie inside the image.

  The first `halo` pixels of an inner side get weight 0, so a local operation of radius
  <= halo is reproduced exactly; image-border sides keep weight 1 (nothing else covers them).
  """
  if not 0 <= 2 * halo <= grid.overlap:
    raise ValueError(f"halo ({halo}) must be at most half the overlap ({grid.overlap})")
  t = grid.tile
  out = []
  for r, c in grid.starts:
    wr = _ramp(t, grid.overlap, halo, r > 0, r + t < grid.height)
    wc = _ramp(t, grid.overlap, halo, c > 0, c + t < grid.width)
    out.append(np.outer(wr, wc))
  return np.stack(out)


def merge(tiles: jax.Array, grid: TileGrid, halo: int = 0) -> jax.Array:
  """Weighted average of (n, tile, tile, C) windows back into an (H, W, C) image."""
  weights = jnp.asarray(blend_weights(grid, halo))[..., None]
  shape = (grid.height, grid.width, tiles.shape[-1])

  def add(carry, item):
    acc, norm = carry
    tile, w, s = item
    at = (s[0], s[1], 0)
    acc = jax.lax.dynamic_update_slice(
        acc, jax.lax.dynamic_slice(acc, at, tile.shape) + tile * w, at)
    norm = jax.lax.dynamic_update_slice(
        norm, jax.lax.dynamic_slice(norm, at, w.shape) + w, at)
    return (acc, norm), None

  init = (jnp.zeros(shape, tiles.dtype), jnp.zeros(shape[:2] + (1,), tiles.dtype))
  (acc, norm), _ = jax.lax.scan(add, init, (tiles, weights, jnp.asarray(grid.starts)))
  return acc / norm


def accumulate(acc: np.ndarray, norm: np.ndarray, tiles: np.ndarray, starts: np.ndarray,
               weights: np.ndarray) -> None:
  """Adds weighted windows into host running sums, in place (`merge` in NumPy, by parts).

  acc (H, W, C) and norm (H, W, 1) are the running weighted sum and weight total; tiles
  (n, t, t, C), starts (n, 2), weights (n, t, t) are some of a grid's windows (e.g. one
  chunk of a sharded run). After every window is added, acc / norm equals `merge`.
  """
  t = tiles.shape[1]
  for tile, (r, c), w in zip(np.asarray(tiles), np.asarray(starts), np.asarray(weights)):
    acc[r:r + t, c:c + t] += tile * w[..., None]
    norm[r:r + t, c:c + t, 0] += w


def chunks(num_windows: int, per_call: int, multiple: int = 1):
  """Yields (indices (size,), num_real): the windows 0..num_windows-1 in calls of equal size.

  size is `per_call` rounded up to a multiple of `multiple` (e.g. the mesh's `data` size, so
  each call splits evenly over the devices), and no larger than needed for all windows. The
  last call is padded by repeating the last window; keep the first num_real outputs.
  """
  if num_windows < 1 or per_call < 1 or multiple < 1:
    raise ValueError(f"need num_windows, per_call and multiple >= 1, got {num_windows}, "
                     f"{per_call}, {multiple}")
  size = -(-min(int(per_call), num_windows) // multiple) * multiple
  for a in range(0, num_windows, size):
    yield np.minimum(np.arange(a, a + size), num_windows - 1), min(size, num_windows - a)


def border_distance(grid: TileGrid, halo: int = 0) -> np.ndarray:
  """(H, W) distance of each pixel to the nearest inner edge of a window that feeds it.

  For every window with nonzero blend weight at a pixel, the distance (in pixels, Chebyshev)
  to that window's nearest side lying inside the image (image-border sides do not count:
  the untiled computation sees the same edge); the minimum over those windows. Pixels fed
  only by windows without inner sides get a large value (max(H, W)). This is the distance
  that bounds how far tiled results can differ from the untiled ones.
  """
  t = grid.tile
  big = max(grid.height, grid.width)
  out = np.full((grid.height, grid.width), big, np.int64)
  idx = np.arange(t)
  weights = blend_weights(grid, halo)
  for (r, c), w in zip(grid.starts, weights):
    d_r = np.minimum(idx if r > 0 else big, t - 1 - idx if r + t < grid.height else big)
    d_c = np.minimum(idx if c > 0 else big, t - 1 - idx if c + t < grid.width else big)
    d_r, d_c = np.broadcast_to(d_r, (t,)), np.broadcast_to(d_c, (t,))
    d = np.minimum(d_r[:, None], d_c[None, :])
    d = np.where(w > 0, d, big)
    out[r:r + t, c:c + t] = np.minimum(out[r:r + t, c:c + t], d)
  return out


def map_tiles(fn: Callable[..., jax.Array], grid: TileGrid,
              inputs: Sequence[tuple[np.ndarray, int]], *, tiles_per_call: int,
              mesh: jax.sharding.Mesh | None = None, halo: int = 0, desc: str | None = None,
              steps_per_call: int = 0, out: np.ndarray | None = None) -> np.ndarray:
  """Runs `fn` on every window of `grid`, a chunk of windows per call, and blends the outputs.

  The one tile loop of the library (SDP windows, SCDM tiles). Windows are cut on the host,
  `tiles_per_call` at a time (rounded up to a multiple of the mesh's `data` axis, the last
  chunk padded by repeating its last window), placed on the devices sharded over `data`,
  and the (n, t, t, C) outputs are gathered back and blended with `blend_weights(grid,
  halo)`. Only a strip of rows is held: windows come in row-major order, so once a window
  of a lower row starts, the rows above it are final and go to the output.

  Args:
    fn: fn(call_index, starts (n, 2) int32, *windows) -> (n, tile, tile, C), windows being
      one (n, tile / scale, tile / scale, C_i) array per input, all sharded over `data`.
      call_index numbers the chunks (e.g. to fold a key).
    grid: the windows (`make_grid`).
    inputs: (image, scale) pairs: image (H / scale, W / scale, C_i) on the host (NumPy
      arrays or memory maps; only the windows are read).
    tiles_per_call: windows per call.
    mesh: mesh with a `data` axis (default: all devices).
    halo: blend halo (see `blend_weights`).
    desc: progress label (None: no progress): a bar (or log lines) counting the windows
      done; in a terminal each call also shows a bar of `steps_per_call` steps that jitted
      code inside fn advances with `progress.tick`.
    out: where to write the (H, W, C) result (e.g. `np.lib.format.open_memmap`), strip by
      strip, so host memory holds two windows' height of rows, not the scene; None = a new
      array.

  Returns:
    (H, W, C) float32 array (`out` when given).
  """
  from hsijax import progress, sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh() if mesh is None else mesh
  data = sharding.data_sharded(mesh)
  weights = blend_weights(grid, halo)
  n = len(grid.starts)
  t, H, W = grid.tile, grid.height, grid.width
  rows = 2 * t  # strip height: the current row of windows and the next one
  acc = norm = None
  top = 0  # scene row of the strip's first row; rows above it are written

  def flush(upto):
    nonlocal top
    k = min(upto, H) - top
    if k <= 0:
      return
    out[top:top + k] = acc[:k] / norm[:k]
    # Shift the strip up by k rows in place, k rows at a time (no block overlaps its source,
    # so no temporary copy of the strip), and clear the freed rows.
    for buf in (acc, norm):
      for a in range(0, rows - k, k):
        b = min(a + k, rows - k)
        buf[a:b] = buf[a + k:b + k]
      buf[rows - k:] = 0
    top += k

  calls = list(chunks(n, tiles_per_call, mesh.shape[sharding.DATA_AXIS]))
  windows_bar = progress.host_bar(total=n, desc=desc, unit="window") if desc else None
  for c, (idx, n_real) in enumerate(calls):
    starts = grid.starts[idx]
    windows = [np.stack([np.asarray(img[r // s:(r + t) // s, col // s:(col + t) // s],
                                    np.float32) for r, col in starts]) for img, s in inputs]
    args = [sharding.put_global(w, data) for w in windows]
    # Inside a call, jitted loops tick an (unshown) step bar; the windows bar counts calls.
    with progress.bar(steps_per_call, desc="") if desc and progress.mode() == "bar" \
        else contextlib.nullcontext():
      result = sharding.to_host(fn(c, sharding.put_global(starts.astype(np.int32), data),
                                   *args))
    if windows_bar is not None:
      windows_bar.update(n_real)
    if acc is None:
      out = np.zeros((H, W, result.shape[-1]), np.float32) if out is None else out
      acc = np.zeros((rows, W, result.shape[-1]), np.float32)
      norm = np.zeros((rows, W, 1), np.float32)
    for tile_out, (r, col), w in zip(result[:n_real], starts[:n_real],
                                     weights[idx[:n_real]]):
      if r + t > top + rows:  # rows above this window are final
        flush(r)
      acc[r - top:r - top + t, col:col + t] += tile_out * w[..., None]
      norm[r - top:r - top + t, col:col + t, 0] += w
  flush(H)
  if windows_bar is not None:
    windows_bar.close()
  return out
