"""Timing harness, FLOP counting and machine peaks for the benchmarks (`launch.bench`).

Three independent FLOP sources, so each number can be cross-checked:
* analytic counters from the shapes (`denoiser_flops`, `sdp_solver_step_flops`,
  `sdp_train_step_flops`, `unet_forward_flops` is the jaxpr count of a U-Net forward),
* `jaxpr_flops(fn, *args)`: walks the jaxpr and counts the dense ops (dot_general and
  convolutions, 2 FLOPs per multiply-add), multiplying scan bodies by their length,
* `xla_flops(compiled)`: XLA's own cost analysis. XLA counts a while-loop (scan) body ONCE,
  whatever its trip count, so for scanned programs only the analytic and jaxpr numbers are
  per-step totals.

FLOP convention: a multiply-add is 2 FLOPs; `FlopCount.matmul` holds dense (matmul / conv)
FLOPs, `FlopCount.other` an estimate of elementwise work (bias, LayerNorm, SiLU, Adam ...),
counted with the per-element costs in `_EW`.
"""
from __future__ import annotations

import math
import os
import resource
import statistics
import threading
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

# Elementwise FLOPs per element (rough but fixed, so counts are reproducible).
_EW = {
    "bias": 1,
    "modulate": 2,     # h * (1 + s) + s, with (1 + s) precomputed
    "layernorm": 8,    # mean, centre, square, mean, rsqrt, scale, gamma, beta
    "silu": 4,         # exp, add, divide, multiply
    "adam": 12,        # L2 term, two moment updates, sqrt, divide, update
    "ema": 3,
}


class FlopCount(NamedTuple):
  """FLOPs split into dense (matmul / conv) and elementwise parts."""
  matmul: float
  other: float

  @property
  def total(self) -> float:
    return self.matmul + self.other

  def __add__(self, o: "FlopCount") -> "FlopCount":  # type: ignore[override]
    return FlopCount(self.matmul + o.matmul, self.other + o.other)

  def scale(self, s: float) -> "FlopCount":
    return FlopCount(self.matmul * s, self.other * s)

  def as_dict(self) -> dict[str, float]:
    return {"matmul": self.matmul, "other": self.other, "total": self.total}


# --------------------------------------------------------------------------- timing


def compile_fn(fn: Callable, *args: Any) -> tuple[Any, float, float]:
  """AOT-compiles `fn` (jitted if it is not already) for `args`.

  Returns:
    (compiled executable, seconds to trace + lower, seconds to compile).
  """
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return compiled, t1 - t0, t2 - t1


def _timed_repeats(call: Callable[[], Any], repeats: int, warmup: int,
                   companion: Callable[[], Any] | None = None, calls_per_repeat: int = 1,
                   partner: Callable[[], Any] | None = None) -> dict[str, list[float]]:
  """Wall-clock and process-CPU seconds per call over `repeats` repeats after `warmup`
  calls; right after each repeat, the same for `partner` (another implementation of the
  workload, e.g. the PyTorch reference: each pair of repeats then meets the same machine
  load), then the wall-clock seconds of `companion()` (e.g. a reference matmul).

  Each repeat makes `calls_per_repeat` back-to-back calls and reports their mean: the steady
  state of a training loop, where caches stay warm and worker threads stay awake between
  steps (a companion matmul between single ~20 ms calls evicts both and taxes the next call).

  Returns:
    {"times", "cpu"} per repeat, "partner_times" / "partner_cpu" (empty without a
    partner) and "companion" (empty without a companion).
  """
  if repeats < 1 or warmup < 0 or calls_per_repeat < 1:
    raise ValueError(f"need repeats >= 1, warmup >= 0 and calls_per_repeat >= 1, got "
                     f"repeats={repeats}, warmup={warmup}, calls_per_repeat={calls_per_repeat}")
  for _ in range(warmup):
    call()
  out = {k: [] for k in ("times", "cpu", "partner_times", "partner_cpu", "companion")}

  def timed(fn, wall_key, cpu_key):
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(calls_per_repeat):
      fn()
    out[wall_key].append((time.perf_counter() - t0) / calls_per_repeat)
    out[cpu_key].append((time.process_time() - c0) / calls_per_repeat)

  for _ in range(repeats):
    timed(call, "times", "cpu")
    if partner is not None:
      timed(partner, "partner_times", "partner_cpu")
    if companion is not None:
      t0 = time.perf_counter()
      companion()
      out["companion"].append(time.perf_counter() - t0)
  return out


def _partner_record(r: dict[str, list[float]]) -> dict[str, Any] | None:
  """Timing record of the partner of `_timed_repeats` / `time_marginal` (None without)."""
  if not r["partner_times"]:
    return None
  return {"compile_s": 0.0, "step_s": float(np.median(r["partner_times"])),
          "times": r["partner_times"], "cpu_s": float(np.median(r["partner_cpu"])),
          "cpu_times": r["partner_cpu"], "paired": True}


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float | None:
  """Median over repeats of a[j] / b[j]: the ratio of two implementations timed in pairs
  (robust to load that drifts during a run, unlike median(a) / median(b))."""
  pairs = [x / y for x, y in zip(a, b) if y > 0]
  return float(np.median(pairs)) if pairs else None


def time_fn(fn: Callable, *args: Any, repeats: int = 5, warmup: int = 1,
            companion: Callable[[], Any] | None = None,
            calls_per_repeat: int = 1,
            partner: Callable[[], Any] | None = None) -> dict[str, Any]:
  """Times a JAX function: compile separately, then `warmup` calls, then `repeats` calls.

  Compilation is measured on its own through `jax.jit(fn).lower(*args).compile()`; every
  timed call ends with `jax.block_until_ready`, so asynchronous dispatch is not mistaken for
  speed.

  Returns:
    dict with lower_s, compile_s (seconds), step_s (median of the repeats), times (every
    repeat, seconds), cpu_s (median process CPU seconds per call: all threads; on a
    shared machine cpu_s / step_s shows how many cores the call really got), xla_flops (XLA
    cost analysis of the whole program, or None), memory (see `memory_stats`) and
    companion_times: with `companion` (a blocking zero-argument callable, e.g. a reference
    matmul) its time right after each repeat, so both see the same machine load.
    With calls_per_repeat = k each repeat is k back-to-back calls (times are per call).
    cpu_times: process-CPU seconds per call of every repeat. partner: None, or with
    `partner` (a blocking zero-argument callable, another implementation of the same
    step, warmed up by the caller) its record {step_s, times, cpu_s, cpu_times}, timed
    right after each repeat (see `paired_ratio`).
  """
  compiled, lower_s, compile_s = compile_fn(fn, *args)
  r = _timed_repeats(lambda: jax.block_until_ready(compiled(*args)), repeats, warmup,
                     companion, calls_per_repeat, partner)
  return {
      "companion_times": r["companion"],
      "lower_s": lower_s,
      "compile_s": compile_s,
      "step_s": float(np.median(r["times"])),
      "times": r["times"],
      "cpu_s": float(np.median(r["cpu"])),
      "cpu_times": r["cpu"],
      "xla_flops": xla_flops(compiled),
      "memory": memory_stats(compiled),
      "partner": _partner_record(r),
  }


def time_marginal(fn_short: Callable, fn_long: Callable, *args: Any, steps: tuple[int, int],
                  repeats: int = 5, warmup: int = 1,
                  companion: Callable[[], Any] | None = None,
                  partner: Callable[[], Any] | None = None) -> dict[str, Any]:
  """Steady-state seconds per step of a scanned program, free of per-call costs.

  `fn_short` and `fn_long` run the same loop for steps[0] < steps[1] steps. Each timed
  repeat calls both back to back (interleaved, so load drift hits both alike); the
  marginal time of repeat j is (long_j - short_j) / (steps[1] - steps[0]). Per-call costs
  (first touch of XLA's temporary buffers, which the loop then reuses, setup, transfer) cancel.

  Returns:
    dict with lower_s and compile_s (of fn_long), step_s (median marginal), times (the
    marginals), cpu_s (median marginal process-CPU seconds), overhead_s (median short
    call minus steps[0] x step_s), call_times {steps[0]: [...], steps[1]: [...]},
    companion_times (as in `time_fn`), xla_flops, memory (of fn_long), marginal_fallback
    (True when the median marginal was <= 0, i.e. a step is too cheap to resolve against
    call-to-call jitter; then times = long calls / steps[1], an upper bound), cpu_times
    (marginal process-CPU seconds of every repeat) and partner (as in `time_fn`: one
    partner step timed after each repeat's pair of calls).
  """
  n_short, n_long = steps
  if not 0 < n_short < n_long:
    raise ValueError(f"steps must be (short, long) with 0 < short < long, got {steps}")
  if repeats < 1 or warmup < 0:
    raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, "
                     f"warmup={warmup}")
  c_short, _, _ = compile_fn(fn_short, *args)
  c_long, lower_s, compile_s = compile_fn(fn_long, *args)
  run = lambda c: jax.block_until_ready(c(*args))
  for _ in range(warmup):
    run(c_short)
    run(c_long)
  short, long_, cpu, comp = [], [], [], []
  pr = {"partner_times": [], "partner_cpu": []}
  for _ in range(repeats):
    c0, t0 = time.process_time(), time.perf_counter()
    run(c_short)
    c1, t1 = time.process_time(), time.perf_counter()
    run(c_long)
    c2, t2 = time.process_time(), time.perf_counter()
    short.append(t1 - t0)
    long_.append(t2 - t1)
    cpu.append(((c2 - c1) - (c1 - c0)) / (n_long - n_short))
    if partner is not None:
      partner()
      c3, t3 = time.process_time(), time.perf_counter()
      pr["partner_times"].append(t3 - t2)
      pr["partner_cpu"].append(c3 - c2)
    if companion is not None:
      t0 = time.perf_counter()
      companion()
      comp.append(time.perf_counter() - t0)
  marg = [(b - a) / (n_long - n_short) for a, b in zip(short, long_)]
  fallback = float(np.median(marg)) <= 0
  if fallback:  # steps too cheap to resolve against call jitter: use the long call / n_long
    marg = [b / n_long for b in long_]
  step_s = float(np.median(marg))
  return {
      "lower_s": lower_s,
      "compile_s": compile_s,
      "step_s": step_s,
      "times": marg,
      "cpu_s": float(np.median(cpu)) if not fallback else None,
      "cpu_times": cpu if not fallback else None,
      "marginal_fallback": fallback,
      "overhead_s": float(np.median(short)) - n_short * step_s,
      "call_times": {str(n_short): short, str(n_long): long_},
      "companion_times": comp,
      "xla_flops": xla_flops(c_long),
      "memory": memory_stats(c_long),
      "partner": _partner_record(pr),
  }


def time_torch(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1,
               calls_per_repeat: int = 1) -> dict[str, Any]:
  """Times an eager PyTorch callable (no compilation; eager ops are synchronous on CPU);
  calls_per_repeat as in `time_fn`."""
  r = _timed_repeats(fn, repeats, warmup, calls_per_repeat=calls_per_repeat)
  return {"compile_s": 0.0, "step_s": float(np.median(r["times"])), "times": r["times"],
          "cpu_s": float(np.median(r["cpu"])), "cpu_times": r["cpu"]}


# --------------------------------------------------------------------------- XLA analyses


def xla_flops(compiled: Any) -> float | None:
  """FLOPs from XLA's cost analysis of a compiled program (None when unavailable).

  Note: XLA counts each while-loop (lax.scan) body once, not once per iteration.
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # backend without cost analysis
    return None
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per device
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def memory_stats(compiled: Any) -> dict[str, int] | None:
  """XLA buffer sizes (bytes) of a compiled program; `peak` is XLA's peak or the sum."""
  try:
    m = compiled.memory_analysis()
  except Exception:
    return None
  if m is None:
    return None
  out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
         for k in ("argument", "output", "temp", "alias", "generated_code")}
  peak = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
  # XLA:CPU's peak_memory_in_bytes can leave out temporaries; never report less than the sum.
  out["peak"] = max(peak, out["argument"] + out["output"] + out["temp"] - out["alias"])
  return out


def max_rss_bytes() -> int:
  """High-water mark of this process's resident memory (bytes; Linux reports KiB)."""
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def current_rss_bytes() -> int | None:
  """Resident memory of this process now (Linux /proc/self/statm; None elsewhere)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return None


class RSSMonitor:
  """Context manager sampling this process's resident memory in a background thread.

  `peak_bytes` is the highest RSS seen inside the block and `delta_bytes` its excess over
  the RSS at entry: the extra memory a workload touched (a lower bound when the allocator
  reuses memory freed before the block).
  """

  def __init__(self, interval_s: float = 0.002):
    self.interval_s = interval_s
    self.start_bytes = self.peak_bytes = current_rss_bytes() or 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self) -> None:
    while not self._stop.is_set():
      self.peak_bytes = max(self.peak_bytes, current_rss_bytes() or 0)
      self._stop.wait(self.interval_s)

  def __enter__(self) -> "RSSMonitor":
    self.start_bytes = self.peak_bytes = current_rss_bytes() or 0
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()
    self.peak_bytes = max(self.peak_bytes, current_rss_bytes() or 0)

  @property
  def delta_bytes(self) -> int:
    return max(0, self.peak_bytes - self.start_bytes)

  def as_dict(self) -> dict[str, int]:
    return {"rss_start": self.start_bytes, "rss_peak": self.peak_bytes,
            "rss_delta": self.delta_bytes, "max_rss_process": max_rss_bytes()}


# --------------------------------------------------------------------------- jaxpr FLOPs


def _dot_flops(eqn) -> float:
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  out = eqn.outvars[0].aval
  contract = math.prod(lhs[d] for d in lhs_contract)
  return 2.0 * out.size * contract


def _conv_flops(eqn) -> float:
  rhs = eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval
  dn = eqn.params["dimension_numbers"]
  rhs_spec = dn.rhs_spec  # (out feature dim, in feature dim, spatial dims...)
  window = math.prod(rhs[d] for d in rhs_spec[2:])
  in_per_group = rhs[rhs_spec[1]]
  flops = 2.0 * out.size * in_per_group * window
  # A transposed conv (input dilation, e.g. the gradient of a strided conv) multiplies
  # mostly inserted zeros; count only the useful multiply-adds.
  lhs_dil = eqn.params.get("lhs_dilation") or ()
  return flops / max(1, math.prod(lhs_dil))


def _count_jaxpr(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "scan":
      total += eqn.params["length"] * _count_jaxpr(eqn.params["jaxpr"].jaxpr)
    elif name == "cond":
      total += max(_count_jaxpr(b.jaxpr) for b in eqn.params["branches"])
    elif name == "while":  # unknown trip count: one iteration
      total += _count_jaxpr(eqn.params["body_jaxpr"].jaxpr)
    else:  # pjit, custom_jvp/vjp, remat, ...: recurse into every sub-jaxpr
      for sub in jex.core.jaxprs_in_params(eqn.params):
        total += _count_jaxpr(sub)
  return total


def jaxpr_flops(fn: Callable, *args: Any, **kwargs: Any) -> float:
  """Dense FLOPs (dot_general + conv, 2 per multiply-add) of `fn(*args)` from its jaxpr.

  Scan bodies are multiplied by their length; while loops count one iteration; cond takes
  the costliest branch. Elementwise ops are not counted.
  """
  closed = jax.make_jaxpr(fn)(*args, **kwargs)
  return _count_jaxpr(closed.jaxpr)


# --------------------------------------------------------------------------- peaks


def matmul_companion(n: int = 2048) -> tuple[Callable[[], Any], float]:
  """(blocking call of a compiled (n, n) @ (n, n) float32 matmul, its FLOPs): pass it as
  `companion` to time_fn / time_marginal for a load-matched peak next to every repeat."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  compiled, _, _ = compile_fn(lambda x, y: x @ y, a, b)
  jax.block_until_ready(compiled(a, b))
  return (lambda: jax.block_until_ready(compiled(a, b))), 2.0 * n ** 3


def peak_fraction(flops: float, step_times: Sequence[float], companion_times: Sequence[float],
                  companion_flops: float) -> float | None:
  """Median over repeats of (achieved FLOP/s) / (companion matmul FLOP/s right after)."""
  if not companion_times or not flops:
    return None
  return float(np.median([(flops / s) / (companion_flops / c)
                          for s, c in zip(step_times, companion_times) if s > 0 and c > 0]))


def measure_matmul_peak(n: int = 2048, repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
  """Achieved float32 GFLOP/s of a jitted (n, n) @ (n, n) matmul (median of repeats)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  r = time_fn(lambda x, y: x @ y, a, b, repeats=repeats, warmup=warmup)
  flops = 2.0 * n ** 3
  return {"n": n, "flops": flops, "step_s": r["step_s"], "times": r["times"],
          "gflops": flops / r["step_s"] / 1e9, "xla_flops": r["xla_flops"]}


def measure_torch_matmul_peak(n: int = 2048, repeats: int = 5,
                              warmup: int = 1) -> dict[str, Any] | None:
  """Same as `measure_matmul_peak` with torch.mm (None when torch is not installed)."""
  try:
    import torch
  except ImportError:
    return None
  g = torch.Generator().manual_seed(0)
  a = torch.randn(n, n, generator=g, dtype=torch.float32)
  b = torch.randn(n, n, generator=g, dtype=torch.float32)
  r = time_torch(lambda: torch.mm(a, b), repeats=repeats, warmup=warmup)
  flops = 2.0 * n ** 3
  return {"n": n, "flops": flops, "step_s": r["step_s"], "times": r["times"],
          "gflops": flops / r["step_s"] / 1e9, "threads": torch.get_num_threads()}


def gflops(flops: float | None, seconds: float | None) -> float | None:
  """flops / seconds in GFLOP/s (None if either is missing)."""
  if not flops or not seconds:
    return None
  return flops / seconds / 1e9


def machine_info() -> dict[str, Any]:
  """CPU count, load average, backend and devices (for the benchmark record)."""
  info: dict[str, Any] = {
      "cpu_count": os.cpu_count(),
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "jax": jax.__version__,
  }
  try:
    info["loadavg"] = os.getloadavg()
  except OSError:
    pass
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          info["cpu_model"] = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  try:
    import torch
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
  except ImportError:
    info["torch"] = None
  return info


# --------------------------------------------------------------------------- analytic counts


def _linear(n: float, fan_in: int, fan_out: int) -> float:
  return 2.0 * n * fan_in * fan_out


def _denoiser_layers(num_bands: int, hidden: int, num_layers: int) -> list[tuple[int, int, int]]:
  """Main layers as (fan_in from h, fan_in from x, fan_out)."""
  if num_layers < 2:
    raise ValueError(f"num_layers must be >= 2, got {num_layers}")
  B, H = num_bands, hidden
  return [(0, B, H)] + [(H, B, H)] * (num_layers - 2) + [(H, B, B)]


def denoiser_flops(num_bands: int, hidden: int = 512, num_layers: int = 5,
                   time_dim: int = 64) -> FlopCount:
  """Forward FLOPs PER PIXEL of the SDP spectral denoiser with a shared (scalar) timestep.

  The time MLP and the per-layer condition vectors are computed once per call, not per
  pixel (see `denoiser_time_flops`). Matmul part: 2 B H + (L - 2) 2 (H + B) H + 2 (H + B) B.
  """
  H = hidden
  matmul = sum(_linear(1, hi + xi, o) for hi, xi, o in _denoiser_layers(num_bands, H,
                                                                         num_layers))
  per_hidden = _EW["bias"] + _EW["modulate"] + _EW["layernorm"] + _EW["silu"]
  other = (num_layers - 1) * per_hidden * H + _EW["bias"] * num_bands
  return FlopCount(matmul, float(other))


def denoiser_time_flops(num_bands: int, hidden: int = 512, num_layers: int = 5,
                        time_dim: int = 64) -> FlopCount:
  """FLOPs of the time condition for ONE timestep: Linear(64, B), SiLU, Linear(B, B), and
  the (L - 1) condition layers Linear(B, H) on SiLU(c)."""
  B, H = num_bands, hidden
  matmul = _linear(1, time_dim, B) + _linear(1, B, B) + (num_layers - 1) * _linear(1, B, H)
  other = 2 * B * _EW["silu"] + 2 * B + (num_layers - 1) * H * _EW["bias"]
  return FlopCount(matmul, float(other))


def sdp_solver_step_flops(height: int, width: int, num_bands: int, msi_bands: int,
                          psf_size: int, ratio: int, K: int = 3, hidden: int = 512,
                          num_layers: int = 5, time_dim: int = 64) -> FlopCount:
  """FLOPs of ONE outer SDP solver timestep on an (height, width, num_bands) scene.

  = K x [denoiser forward + input-gradient backward on all H W pixels (weights frozen, so
  each layer's backward is one matmul of the forward's size) + blur_down forward and its
  transpose (k^2 multiply-adds per kept output, strided) + R X forward and backward + q_sample,
  residuals and Adam on X] + EMA of X + the time condition (once per timestep).
  """
  n = height * width
  B, b = num_bands, msi_bands
  if height % ratio or width % ratio:
    raise ValueError(f"ratio {ratio} must divide the scene size {height} x {width}")
  den = denoiser_flops(B, hidden, num_layers, time_dim)
  den_pass = FlopCount(2 * den.matmul * n, 3 * den.other * n)  # forward + backward
  lr_pixels = (height // ratio) * (width // ratio)
  blur = 2 * _linear(lr_pixels * B, psf_size * psf_size, 1)
  srf = 2 * _linear(n, B, b)
  # q_sample (3), three residuals, squares and sums, their gradients, clamp, Adam.
  other = n * B * (3 + 3 + _EW["adam"] + 1) + 4 * (lr_pixels * B + n * b)
  inner = den_pass + FlopCount(blur + srf, float(other))
  return inner.scale(K) + FlopCount(0.0, float(n * B * _EW["ema"])) + \
      denoiser_time_flops(B, hidden, num_layers, time_dim)


def _count_params(num_bands: int, hidden: int, num_layers: int, time_dim: int) -> int:
  B, H = num_bands, hidden
  main = sum((hi + xi) * o + o for hi, xi, o in _denoiser_layers(B, H, num_layers))
  time_mlp = time_dim * B + B + B * B + B
  cond = (num_layers - 1) * (B * H + H)
  norms = (num_layers - 1) * 2 * H
  return main + time_mlp + cond + norms


def sdp_train_step_flops(batch: int, num_bands: int, hidden: int = 512, num_layers: int = 5,
                         time_dim: int = 64) -> FlopCount:
  """FLOPs of one spectral-model training step (per-sample timesteps, forward + full backward
  + Adam + EMA).

  With one timestep per sample the time MLP and the condition layers run per sample. The
  backward pass computes every weight gradient (as many FLOPs as the forward) and the input
  gradient of every layer whose input depends on weights: the h part of the main layers
  after the first (`denoiser.concat_dot` skips the x part), not the embedding into time_0
  or x into layer 0.
  """
  B, H, L, n = num_bands, hidden, num_layers, batch
  layers = _denoiser_layers(B, H, L)
  fwd = sum(_linear(n, hi + xi, o) for hi, xi, o in layers)
  fwd += _linear(n, time_dim, B) + _linear(n, B, B) + (L - 1) * _linear(n, B, H)
  d_w = fwd
  d_in = sum(_linear(n, hi, o) for hi, xi, o in layers if hi) + _linear(n, B, B) + \
      (L - 1) * _linear(n, B, H)
  den = denoiser_flops(B, H, L, time_dim)
  p = _count_params(B, H, L, time_dim)
  other = 3 * den.other * n + p * (_EW["adam"] + _EW["ema"]) + n * B * 6
  return FlopCount(fwd + d_w + d_in, float(other))


def sdp_param_count(num_bands: int, hidden: int = 512, num_layers: int = 5,
                    time_dim: int = 64) -> int:
  """Number of parameters of the spectral denoiser (for cross-checks)."""
  return _count_params(num_bands, hidden, num_layers, time_dim)


def summarize_times(times: Sequence[float]) -> dict[str, float]:
  """min / median / max / relative spread of repeat times."""
  med = statistics.median(times)
  return {"min": min(times), "median": med, "max": max(times),
          "spread": (max(times) - min(times)) / med if med else 0.0}
