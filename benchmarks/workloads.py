"""The SDP and SCDM speed workloads, JAX next to the PyTorch eager reference.

For every workload named in the config (configs/bench.py): its shape, JAX compile seconds,
steady-state seconds per step (median of `repeats` timed calls after `warmup` calls, each
ending in block_until_ready), FLOPs per step (analytic from the shapes, from the jaxpr, and
from XLA's cost analysis), achieved GFLOP/s and its fraction of the measured matmul peak,
memory (XLA buffer sizes, resident-memory peak), and the same for the PyTorch eager reference
(`benchmarks.torch_ref`) with the JAX / PyTorch time ratio. `run` returns the whole record
(what `python -m launch.bench` writes to bench.json).

Timed code paths are the library's own: the SDP solver is `hsijax.sdp.solver.make_solver`, the
training step `hsijax.sdp.train.make_train_step`, SCDM steps `hsijax.scdm.sampler.make_sampler`.
Scanned programs (solver, sampler) are compiled for n1 and n2 steps (`sdp.steps`,
`scdm.steps`) and the JAX time per step is the marginal (t(n2) - t(n1)) / (n2 - n1): per-call
costs (XLA allocates its temporary buffers once per call and the loop reuses them) cancel, as
they do in a real 1000-step run; they are reported as `overhead_s`.
PyTorch steps are timed one call at a time (eager code has no per-call setup to amortise;
`sdm_train`: blocks of the same number of steps as JAX's), each right after a JAX repeat
(`harness._timed_repeats(partner=...)`), and JAX / PyTorch is the median of the per-pair
ratios, so load that drifts during a run hits both sides of every pair alike.
Measurements and their discussion: docs/benchmarks.md.
"""
from __future__ import annotations

import functools
import inspect
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness as bm
from hsijax import diffusion
from hsijax import policy as policy_lib

# (blocking reference matmul, its FLOPs), set by run(): timed after every JAX repeat.
_COMPANION: list = []

# Acceptance targets: JAX / PyTorch time ratio upper bounds, and matmul-peak fraction.
RATIO_TARGETS = {"sdm_train": 0.5, "sdp_step": 0.5, "scdm": 0.8}
PEAK_TARGET = {"sdp_step": 0.7}


# --------------------------------------------------------------------------- helpers


def torch_ready(config) -> bool:
  """True when the config asks for the PyTorch reference and torch imports."""
  if not config.torch:
    return False
  try:
    import torch  # noqa: F401
    import benchmarks.torch_ref  # noqa: F401
  except ImportError:
    return False
  return True


def _time_jax(fn: Callable, *args: Any, config, calls_per_repeat: int = 1,
              partner: Callable[[], Any] | None = None) -> dict[str, Any]:
  """bm.time_fn (one step per call) with resident-memory monitoring."""
  with bm.RSSMonitor() as mon:
    r = bm.time_fn(fn, *args, repeats=config.repeats, warmup=config.warmup,
                   companion=_COMPANION[0] if _COMPANION else None,
                   calls_per_repeat=calls_per_repeat, partner=partner)
  r["memory"] = dict(r["memory"] or {}, **mon.as_dict())
  return r


def _time_jax_marginal(build: Callable[[int], Callable], *args: Any, config,
                       steps, partner: Callable[[], Any] | None = None) -> dict[str, Any]:
  """bm.time_marginal of build(steps[0]) vs build(steps[1]) with RSS monitoring."""
  n1, n2 = (int(s) for s in steps)
  with bm.RSSMonitor() as mon:
    r = bm.time_marginal(build(n1), build(n2), *args, steps=(n1, n2),
                         repeats=config.repeats, warmup=config.warmup,
                         companion=_COMPANION[0] if _COMPANION else None, partner=partner)
  r["memory"] = dict(r["memory"] or {}, **mon.as_dict())
  r["xla_flops_program"] = r.pop("xla_flops")
  return r


def _torch_threads(fn: Callable[[], Any], *, config) -> dict[str, Any]:
  """Sets torch to its fastest thread count for `fn` among config.torch_threads.

  Each candidate count (0 = os.cpu_count(), the cores XLA uses) gets `warmup` calls and one
  timed probe call. On a shared, oversubscribed CPU torch's OpenMP barriers can make 2
  threads many times slower than 1, which would otherwise flatter the JAX / PyTorch ratio.

  Returns:
    {"threads": best count (now set), "candidates": [...], "thread_probe_s": {count: s},
     "memory": resident memory during the probes (torch alone)}.
  """
  from benchmarks import torch_ref
  cands = [int(t) or (os.cpu_count() or 1) for t in config.torch_threads]
  cands = list(dict.fromkeys(cands))
  probe = {}
  with bm.RSSMonitor() as mon:
    for n in cands:
      torch_ref.set_threads(n)
      for _ in range(max(int(config.warmup), 1) if len(cands) > 1 else 0):
        fn()
      t0 = time.perf_counter()
      fn()
      probe[n] = time.perf_counter() - t0
  best = min(probe, key=probe.get)
  torch_ref.set_threads(best)
  return {"threads": best, "candidates": cands,
          "thread_probe_s": {str(k): v for k, v in probe.items()}, "memory": mon.as_dict()}


def _time_with_torch(time_jax: Callable[..., dict], torch_fn: Callable[[], Any] | None, *,
                     config) -> tuple[dict, dict | None]:
  """Times JAX and (when given) the PyTorch step in pairs: after torch's thread probe,
  `time_jax(partner=...)` runs one PyTorch repeat (as many calls as a JAX repeat makes) right
  after every JAX repeat, so each pair meets the same machine load; the ratio is then the median
  of the per-pair ratios (`bm.paired_ratio`), robust to load that drifts during a run.

  Returns:
    (JAX record, PyTorch record or None); the PyTorch record also has the thread probe.
  """
  if torch_fn is None:
    return time_jax(partner=None), None
  from benchmarks import torch_ref
  probe = _torch_threads(torch_fn, config=config)
  try:
    # The repeat loop calls the partner `calls_per_repeat` times per repeat, as the JAX step,
    # and reports seconds per call.
    jax_r = time_jax(partner=torch_fn)
  finally:
    torch_ref.set_threads(probe["candidates"][0])
  torch_r = jax_r.pop("partner")
  torch_r.update({k: probe[k] for k in ("threads", "thread_probe_s", "memory")})
  return jax_r, torch_r


def _time_torch(fn: Callable[[], Any], *, config, calls_per_repeat: int = 1
                ) -> dict[str, Any]:
  """Times a torch callable on its own at its best thread count (`_torch_threads`); used
  for the full-sampling totals, which are too long to pair with JAX repeat by repeat."""
  from benchmarks import torch_ref
  probe = _torch_threads(fn, config=config)
  try:
    with bm.RSSMonitor() as mon:
      r = bm.time_torch(fn, repeats=config.repeats, warmup=config.warmup
                        if len(probe["candidates"]) == 1 else 0,
                        calls_per_repeat=calls_per_repeat)
  finally:
    torch_ref.set_threads(probe["candidates"][0])
  r["threads"] = probe["threads"]
  r["thread_probe_s"] = probe["thread_probe_s"]
  r["memory"] = mon.as_dict()
  return r


def _finish(shape: dict, flops: dict, jax_r: dict, torch_r: dict | None,
            peaks: dict) -> dict[str, Any]:
  """Adds GFLOP/s, peak fractions and the JAX / PyTorch ratio to one workload's record."""
  per_step = flops.get("analytic") or flops.get("jaxpr") or flops.get("xla")
  flops["used"] = per_step
  out = {"shape": shape, "flops_per_step": flops, "jax": jax_r, "torch": torch_r}
  for fw, r in (("jax", jax_r), ("torch", torch_r)):
    if r is None:
      continue
    r["gflops"] = bm.gflops(per_step, r["step_s"])
    # JAX: median over repeats of achieved / matmul GFLOP/s, the reference matmul timed right
    # after each repeat (same machine load); torch: against torch's matmul peak of the run.
    frac = None
    if fw == "jax" and r.get("companion_times") and _COMPANION:
      frac = bm.peak_fraction(per_step, r["times"], r["companion_times"], _COMPANION[1])
      r["matmul_peak_interleaved_gflops"] = \
          _COMPANION[1] / float(np.median(r["companion_times"])) / 1e9
    elif fw == "torch":
      peak = (peaks.get("torch") or {}).get("gflops")
      frac = r["gflops"] / peak if r["gflops"] and peak else None
    r["fraction_of_matmul_peak"] = frac
    start = peaks["jax"]["gflops"]
    r["fraction_of_start_jax_matmul_peak"] = r["gflops"] / start if r["gflops"] else None
  out["ratio_jax_over_torch"] = None
  out["cpu_ratio_jax_over_torch"] = None
  if torch_r:
    paired = torch_r.get("paired", False)
    # Timed in pairs: median of the per-pair ratios; otherwise the ratio of the medians.
    out["ratio_method"] = "median of per-repeat pairs" if paired else "ratio of medians"
    out["ratio_of_medians"] = jax_r["step_s"] / torch_r["step_s"]
    out["ratio_jax_over_torch"] = bm.paired_ratio(jax_r["times"], torch_r["times"]) \
        if paired else out["ratio_of_medians"]
    # Same ratio in process-CPU seconds: robust when other jobs share the cores (wall time
    # then depends on how many cores each framework happened to get).
    if jax_r.get("cpu_s") and torch_r.get("cpu_s"):
      out["cpu_ratio_jax_over_torch"] = \
          bm.paired_ratio(jax_r["cpu_times"], torch_r["cpu_times"]) \
          if paired and jax_r.get("cpu_times") else jax_r["cpu_s"] / torch_r["cpu_s"]
  return out


def _total(fc) -> float:
  return fc.total if isinstance(fc, bm.FlopCount) else float(fc)


# --------------------------------------------------------------------------- SDP


def _sdp_model(config, precision: str = "default"):
  from hsijax.sdp.denoiser import SpectralDenoiser
  s = config.sdp
  model = SpectralDenoiser(num_bands=s.num_bands, hidden=s.hidden, num_layers=s.num_layers,
                           time_dim=s.time_dim, precision=precision)
  params = jax.jit(model.init)(jax.random.PRNGKey(config.seed),
                               jnp.zeros((1, s.num_bands), jnp.float32), 0)
  return model, params


def _torch_denoiser(config, params):
  from benchmarks.torch_ref import load_flax_params
  from benchmarks.torch_ref.sdp import SpectralDenoiser
  s = config.sdp
  return load_flax_params(SpectralDenoiser(s.num_bands, s.hidden, s.num_layers, s.time_dim),
                          params)


def _sdp_scene(config, size: int):
  """Random LR-HSI / HR-MSI of the right shapes, a Gaussian PSF and a row-normalised SRF."""
  from hsijax import degrade
  s = config.sdp
  if size % s.ratio:
    raise ValueError(f"sdp size {size} must be a multiple of sdp.ratio={s.ratio}")
  rng = np.random.default_rng(config.seed)
  h = size // s.ratio
  y = rng.uniform(size=(h, h, s.num_bands)).astype(np.float32)
  z = rng.uniform(size=(size, size, s.msi_bands)).astype(np.float32)
  psf = np.asarray(degrade.gaussian_psf(s.ratio, s.psf_size), np.float32)
  srf = rng.uniform(size=(s.msi_bands, s.num_bands)).astype(np.float32)
  srf /= srf.sum(axis=1, keepdims=True)
  return y, z, psf, srf


def bench_sdm_train(config, peaks: dict, use_torch: bool,
                    precision: str = "default") -> dict[str, Any]:
  """One spectral-model training step: forward + full backward + Adam + EMA.

  `precision` is the denoiser's matmul policy (hsijax.policy); the PyTorch reference
  always runs in float32.
  """
  from hsijax.sdp import train as sdp_train
  s = config.sdp
  model, _ = _sdp_model(config, precision)
  sched = diffusion.make_schedule("linear", 1000)
  opt = sdp_train.make_optimizer(lr=1e-2, weight_decay=1e-6)
  state = sdp_train.init_train_state(model, jax.random.PRNGKey(config.seed), opt)
  rng = np.random.default_rng(config.seed)
  pixels = rng.uniform(size=(s.train_pixels, s.num_bands)).astype(np.float32)
  batch = jnp.asarray(pixels[:s.train_batch])
  key = jax.random.PRNGKey(config.seed + 1)
  # Not donated: every timed call gets the same state. This is how `train.fit` jits it on
  # CPU (`Policy.donate`); on accelerators fit donates it (same program otherwise).
  step = jax.jit(sdp_train.make_train_step(model, sched, opt, 0.999))

  flops = {
      "analytic": _total(bm.sdp_train_step_flops(s.train_batch, s.num_bands, s.hidden,
                                                 s.num_layers, s.time_dim)),
      "analytic_matmul": bm.sdp_train_step_flops(s.train_batch, s.num_bands, s.hidden,
                                                 s.num_layers, s.time_dim).matmul,
      "jaxpr": bm.jaxpr_flops(step, state, batch, key),
  }
  # Training runs steps back to back: time blocks of them, the same way for both frameworks.
  k = int(config.get("train_calls_per_repeat", 1))
  torch_fn = None
  if use_torch:
    from benchmarks.torch_ref.sdp import SDMTrainer
    trainer = SDMTrainer(_torch_denoiser(config, state.params), sched, pixels,
                         batch=s.train_batch, seed=config.seed)
    torch_fn = trainer.step
  jax_r, torch_r = _time_with_torch(
      lambda partner: _time_jax(step, state, batch, key, config=config, calls_per_repeat=k,
                                partner=partner), torch_fn, config=config)
  flops["xla"] = jax_r["xla_flops"]
  shape = {"batch": s.train_batch, "bands": s.num_bands, "hidden": s.hidden,
           "layers": s.num_layers}
  return _finish(shape, flops, jax_r, torch_r, peaks)


def bench_sdp_step(config, size: int, peaks: dict, use_torch: bool,
                   precision: str = "default") -> dict[str, Any]:
  """One SDP solver timestep (K inner Adam steps on X) on a size x size x B scene."""
  from hsijax.sdp import solver as sdp_solver
  s = config.sdp
  model, params = _sdp_model(config, precision)
  y, z, psf, srf = _sdp_scene(config, size)
  n1, n2 = (int(v) for v in s.steps)

  extra = {}
  if "lr_scale" in inspect.signature(sdp_solver.make_solver).parameters:
    extra["lr_scale"] = 1.0  # the full-schedule lr (cost is the same either way)

  def build(n: int):
    sched = diffusion.make_respaced_schedule("linear", 1000, n)
    return sdp_solver.make_solver(model, sched, lam=s.lam, gam=s.gam, lr=s.lr, K=s.K,
                                  ratio=s.ratio, **extra)

  sched = diffusion.make_respaced_schedule("linear", 1000, n1)
  solve = build(n1)
  key = jax.random.PRNGKey(config.seed)
  args = (params, jnp.asarray(y), jnp.asarray(z), jnp.asarray(psf), jnp.asarray(srf), key)

  analytic = bm.sdp_solver_step_flops(size, size, s.num_bands, s.msi_bands, s.psf_size,
                                      s.ratio, s.K, s.hidden, s.num_layers, s.time_dim)
  flops = {"analytic": analytic.total, "analytic_matmul": analytic.matmul,
           "jaxpr": bm.jaxpr_flops(solve, *args) / n1}
  # XLA counts scan bodies once: take K x the cost of one inner gradient evaluation, by
  # the solver's own gradient function when it has one.
  kw = dict(model=model, schedule=sched, lam=s.lam, gam=s.gam, ratio=s.ratio)
  grad = functools.partial(sdp_solver.fusion_grad, **kw) if hasattr(sdp_solver, "fusion_grad") \
      else jax.grad(functools.partial(sdp_solver.fusion_loss, **kw))
  eps = jnp.zeros((size, size, s.num_bands), jnp.float32)
  grad_args = (jnp.ones_like(eps), params, *args[1:5], eps, jnp.int32(0))
  inner, _, _ = bm.compile_fn(grad, *grad_args)
  inner_xla = bm.xla_flops(inner)
  flops["xla"] = s.K * inner_xla if inner_xla else None
  flops["xla_note"] = "K x XLA cost analysis of one inner gradient (XLA counts loops once)"

  torch_fn = None
  if use_torch:
    from benchmarks.torch_ref.sdp import SDPSolver
    ref = SDPSolver(_torch_denoiser(config, params), diffusion.make_schedule("linear", 1000),
                    y, z, psf, srf, ratio=s.ratio, lam=s.lam, gam=s.gam, lr=s.lr, K=s.K,
                    seed=config.seed)
    torch_fn = lambda: ref.timestep(500)
  jax_r, torch_r = _time_with_torch(
      lambda partner: _time_jax_marginal(build, *args, config=config, steps=(n1, n2),
                                         partner=partner), torch_fn, config=config)
  shape = {"H": size, "W": size, "B": s.num_bands, "b": s.msi_bands, "ratio": s.ratio,
           "psf": s.psf_size, "K": s.K, "hidden": s.hidden, "timed_steps": [n1, n2]}
  return _finish(shape, flops, jax_r, torch_r, peaks)


# --------------------------------------------------------------------------- SCDM


_SCDM_CACHE: dict[tuple, Any] = {}  # (unet, seed, scdm config) -> (model, params, cond)


def _scdm_setup(config, unet: str):
  """Builds (once per run) the U-Net, its initial params and a random condition.

  Keyed by the settings that determine them, not by the config object: workloads with their
  own repeat count run on a copy of the config and still share the setup.
  """
  key = (unet, config.seed, config.scdm.to_json_best_effort(sort_keys=True))
  if key not in _SCDM_CACHE:
    _SCDM_CACHE[key] = _scdm_setup_uncached(config, unet)
  return _SCDM_CACHE[key]


def _scdm_setup_uncached(config, unet: str):
  """(model, variables {"params": ...}, cond (N, H, W, C_cond) numpy)."""
  from hsijax.scdm import unet as scdm_unet
  from hsijax.scdm.unet import CondUNet
  c = config.scdm
  u = c.unets[unet]
  size, n = int(c.sizes[unet]), int(c.batch)
  model = CondUNet(out_channels=c.out_channels, base=u.base,
                   channel_mults=tuple(u.channel_mults), num_res_down=u.num_res_down,
                   num_res_up=u.num_res_up, attn_levels=tuple(u.attn_levels),
                   mid_attn=u.mid_attn, dropout=u.dropout, groups=u.groups)
  rng = np.random.default_rng(config.seed)
  cond = rng.standard_normal((n, size, size, c.cond_channels)).astype(np.float32)
  key = jax.random.PRNGKey(config.seed)
  x_shape = (n, size, size, c.out_channels)
  if hasattr(scdm_unet, "init_params"):  # one random draw: much faster to compile
    params = scdm_unet.init_params(model, key, x_shape, cond.shape)
  else:
    params = jax.jit(model.init)(key, jnp.zeros(x_shape), jnp.asarray(cond),
                                 jnp.zeros((n,), jnp.int32))["params"]
  return model, {"params": params}, cond


def _torch_unet(config, unet: str, params):
  from benchmarks.torch_ref import load_flax_params
  from benchmarks.torch_ref.scdm import CondUNet
  c = config.scdm
  u = c.unets[unet]
  m = CondUNet(c.out_channels, c.cond_channels, base=u.base,
               channel_mults=tuple(u.channel_mults), num_res_down=u.num_res_down,
               num_res_up=u.num_res_up, attn_levels=tuple(u.attn_levels),
               mid_attn=u.mid_attn, dropout=u.dropout, groups=u.groups)
  return load_flax_params(m, params).eval()


def _jax_sampler(config, model, sched, method: str, icmg: bool):
  from hsijax.scdm import sampler as scdm_sampler
  c = config.scdm
  fn = scdm_sampler.make_sampler(model, sched, method=method,
                                 guidance_scale=c.guidance_scale if icmg else 0.0,
                                 pdt_target=c.pdt_target, pdt_p_T=c.pdt_p_T)
  return fn if hasattr(fn, "lower") else jax.jit(fn)


def _torch_sampler(config, tmodel, sched, method: str, icmg: bool):
  from benchmarks.torch_ref.scdm import Sampler
  c = config.scdm
  return Sampler(tmodel, sched, method=method, guidance_scale=c.guidance_scale if icmg else 0.0,
                 pdt_target=c.pdt_target, pdt_p_T=c.pdt_p_T, seed=config.seed)


def _nchw(a: np.ndarray):
  import torch
  return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous()


def bench_scdm_step(config, unet: str, icmg: bool, peaks: dict,
                    use_torch: bool) -> dict[str, Any]:
  """One SCDM DDPM sampler step (U-Net forward; with ICMG the conditional and
  zero-condition predictions from one with_uncond call; PDT; update)."""
  c = config.scdm
  model, params, cond = _scdm_setup(config, unet)
  n1, n2 = (int(v) for v in c.get("unet_steps", {}).get(unet, c.steps))
  build = lambda n: _jax_sampler(config, model, diffusion.make_respaced_schedule(
      "linear", 1000, n), "ddpm", icmg)
  sched = diffusion.make_respaced_schedule("linear", 1000, n1)
  sample = build(n1)
  key = jax.random.PRNGKey(config.seed)
  cond_j = jnp.asarray(cond)
  nb = cond.shape[0]
  size = cond.shape[1]
  xb = jnp.zeros((nb, size, size, c.out_channels), jnp.float32)
  cb = jnp.zeros((nb, size, size, c.cond_channels), jnp.float32)
  tb = jnp.zeros((nb,), jnp.int32)
  fwd = lambda p, x, cc, t: model.apply(p, x, cc, t, with_uncond=icmg)
  fwd_c, _, _ = bm.compile_fn(fwd, params, xb, cb, tb)
  flops = {"analytic": bm.jaxpr_flops(fwd, params, xb, cb, tb),
           "analytic_note": "FLOPs of the matmuls / convolutions of the step's U-Net "
                            "call as run (with ICMG: both predictions, noisy-stream "
                            "encoder shared; Winograd layers: their 16 matmuls), counted "
                            "from its jaxpr shapes",
           "jaxpr": bm.jaxpr_flops(sample, params["params"], cond_j, key) / n1,
           "xla": bm.xla_flops(fwd_c),
           "xla_note": "XLA cost analysis of the same U-Net call"}
  torch_fn = None
  if use_torch:
    import torch
    tm = _torch_unet(config, unet, params)
    ref = _torch_sampler(config, tm, sched, "ddpm", icmg)
    x0 = torch.randn((cond.shape[0], c.out_channels, size, size))
    cond_t = _nchw(cond)
    torch_fn = lambda: ref.step(x0, cond_t, n1 - 1)
  jax_r, torch_r = _time_with_torch(
      lambda partner: _time_jax_marginal(build, params["params"], cond_j, key, config=config,
                                         steps=(n1, n2), partner=partner),
      torch_fn, config=config)
  u = c.unets[unet]
  from hsijax.scdm.unet import count_params
  shape = {"N": int(cond.shape[0]), "H": size, "W": size, "C_out": c.out_channels,
           "C_cond": c.cond_channels, "base": u.base, "channel_mults": list(u.channel_mults),
           "icmg": icmg, "params": count_params(params),
           # batch of the encoder (noisy + condition streams) and of the decoder
           "unet_batch": [3 * nb, 2 * nb] if icmg else [2 * nb, nb],
           "pdt": c.pdt_target, "timed_steps": [n1, n2]}
  return _finish(shape, flops, jax_r, torch_r, peaks)


def bench_sample(config, unet: str, method: str, step: dict, use_torch: bool) -> dict[str, Any]:
  """Full sampling (ICMG on): run when short enough, else estimated from the step time."""
  c, sc = config.scdm, config.sampling
  n = int(sc.ddim_steps if method == "ddim" else sc.ddpm_steps)
  model, params, cond = _scdm_setup(config, unet)
  sched = diffusion.make_respaced_schedule("linear", 1000, n)
  out: dict[str, Any] = {"shape": {"steps": n, "method": method, "icmg": True,
                                   **{k: step["shape"][k] for k in ("N", "H", "W", "C_out")}},
                         "flops_total": step["flops_per_step"]["used"] * n}
  fws = ["jax"] + (["torch"] if use_torch and step["torch"] is not None else [])
  out["torch"] = None
  # Run both frameworks in full, or estimate both: the comparison stays like for like.
  full = max(step[fw]["step_s"] * n for fw in fws) <= sc.max_full_s
  for fw in fws:
    per = step[fw]["step_s"]
    predicted = per * n
    rec: dict[str, Any] = {"per_step_s": per, "predicted_s": predicted}
    if full:
      if fw == "jax":
        sample = _jax_sampler(config, model, sched, method, True)
        args = (params["params"], jnp.asarray(cond), jax.random.PRNGKey(config.seed))
        compiled, _, comp = bm.compile_fn(sample, *args)
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        rec.update(total_s=time.perf_counter() - t0, compile_s=comp, estimated=False)
      else:
        from benchmarks import torch_ref
        torch_ref.set_threads(step["torch"]["threads"])  # the step's fastest count
        ref = _torch_sampler(config, _torch_unet(config, unet, params), sched, method, True)
        t0 = time.perf_counter()
        ref.sample(_nchw(cond), c.out_channels)
        rec.update(total_s=time.perf_counter() - t0, compile_s=0.0, estimated=False,
                   threads=step["torch"]["threads"])
        torch_ref.set_threads(int(config.torch_threads[0]) or None)
    else:
      rec.update(total_s=predicted, estimated=True,
                 note=f"estimated: {n} steps x the measured per-step time (a full run "
                      f"would take > sampling.max_full_s = {sc.max_full_s} s per framework)")
    out[fw] = rec
  out["ratio_jax_over_torch"] = out["jax"]["total_s"] / out["torch"]["total_s"] \
      if out.get("torch") else None
  return out


# --------------------------------------------------------------------------- driver


def _parse(workloads: str) -> list[str]:
  names = [w.strip() for w in str(workloads).split(",") if w.strip()]
  if not names:
    raise ValueError("config.workloads is empty; list e.g. 'sdm_train,sdp_step_64'")
  return names


def split_precision(name: str, default: str = "default") -> tuple[str, str]:
  """"sdm_train@bfloat16" -> ("sdm_train", "bfloat16"); no suffix -> (name, default)."""
  base, sep, prec = name.partition("@")
  return base, policy_lib.check_precision(prec if sep else default)


def run_workload(name: str, config, peaks: dict, use_torch: bool,
                 done: dict[str, Any]) -> dict[str, Any]:
  """Dispatches one workload by name (see configs/bench.py), at its precision and with its
  own repeat count when `config.workload_repeats` has one."""
  name, prec = split_precision(name, config.get("precision", "default"))
  repeats = config.get("workload_repeats", {}).get(name)
  if repeats is not None and int(repeats) != config.repeats:
    config = config.copy_and_resolve_references()
    config.repeats = int(repeats)
  # SDP models take the policy themselves (operand dtypes); scope() covers other models.
  with policy_lib.precision_scope(prec):
    out = _run_workload(name, config, peaks, use_torch, done, prec)
  out["precision"] = prec
  return out


def _run_workload(name: str, config, peaks: dict, use_torch: bool, done: dict[str, Any],
                  prec: str) -> dict[str, Any]:
  if name == "sdm_train":
    return bench_sdm_train(config, peaks, use_torch, prec)
  if name.startswith("sdp_step_"):
    return bench_sdp_step(config, int(name[len("sdp_step_"):]), peaks, use_torch, prec)
  if name.startswith("scdm_"):
    rest = name[len("scdm_"):]
    icmg = rest.endswith("_icmg")
    unet = rest[:-len("_icmg")] if icmg else rest
    if unet not in config.scdm.unets:
      raise ValueError(f"unknown U-Net {unet!r} in workload {name!r}; "
                       f"configure it under scdm.unets ({list(config.scdm.unets)})")
    return bench_scdm_step(config, unet, icmg, peaks, use_torch)
  if name.startswith("sample_"):
    unet, _, method = name[len("sample_"):].rpartition("_")
    if method not in ("ddim", "ddpm") or unet not in config.scdm.unets:
      raise ValueError(f"bad workload {name!r}; use sample_<unet>_<ddim|ddpm> with <unet> in "
                       f"{list(config.scdm.unets)}")
    step_name = f"scdm_{unet}_icmg"
    if prec != config.get("precision", "default"):
      step_name += f"@{prec}"
    if step_name not in done:
      done[step_name] = bench_scdm_step(config, unet, True, peaks, use_torch)
    return bench_sample(config, unet, method, done[step_name], use_torch)
  raise ValueError(f"unknown workload {name!r}; see the list in configs/bench.py")


def check_targets(results: dict[str, Any]) -> dict[str, Any]:
  """Which acceptance targets (ratio and peak fraction) each workload meets (workloads at
  a non-default precision, "name@precision", are not held to them: not like for like)."""
  out = {}
  for name, r in results.items():
    if "@" in name:
      continue
    group = "sdp_step" if name.startswith("sdp_step") else \
        "scdm" if name.startswith("scdm_") else name
    rec = {}
    ratio = r.get("ratio_jax_over_torch")
    if group in RATIO_TARGETS and ratio is not None:
      rec["ratio"] = {"value": ratio, "target": RATIO_TARGETS[group],
                      "met": ratio <= RATIO_TARGETS[group]}
      cpu = r.get("cpu_ratio_jax_over_torch")
      if cpu is not None:
        rec["cpu_ratio"] = {"value": cpu, "target": RATIO_TARGETS[group],
                            "met": cpu <= RATIO_TARGETS[group]}
    if group in PEAK_TARGET and r.get("jax"):
      frac = r["jax"].get("fraction_of_matmul_peak")
      if frac is not None:
        rec["peak_fraction"] = {"value": frac, "target": PEAK_TARGET[group],
                                "met": frac >= PEAK_TARGET[group]}
    if rec:
      out[name] = rec
  return out


# --------------------------------------------------------------------------- run


def _noop(*_: Any) -> None:
  pass


def run(config, *, log: Callable[[str], Any] = _noop,
        on_update: Callable[[dict[str, Any]], Any] = _noop) -> dict[str, Any]:
  """Runs every configured workload; returns the bench.json record.

  Args:
    config: a configs/bench.py config.
    log: called with a progress line before each workload.
    on_update: called with the record after every workload and at the end (e.g. to
      rewrite bench.json, so an interrupted run keeps what it has measured).
  """
  use_torch = torch_ready(config)
  if use_torch:
    from benchmarks import torch_ref
    torch_ref.set_threads(int(config.torch_threads[0]) or None)
  names = _parse(config.workloads)
  record: dict[str, Any] = {
      "config": config.to_dict(),
      "machine": bm.machine_info(),
      "started": time.strftime("%Y-%m-%d %H:%M:%S"),
      "torch_reference": use_torch,
  }
  peaks = {"jax": bm.measure_matmul_peak(config.matmul_n, repeats=config.repeats)}
  _COMPANION[:] = bm.matmul_companion(config.matmul_n)
  peaks["torch"] = None
  if use_torch:  # best over the candidate thread counts, as for the workloads
    from benchmarks import torch_ref
    by_threads = {}
    for n in dict.fromkeys(int(t) or (os.cpu_count() or 1) for t in config.torch_threads):
      torch_ref.set_threads(n)
      by_threads[n] = bm.measure_torch_matmul_peak(config.matmul_n, repeats=config.repeats)
    best = max(by_threads, key=lambda n: by_threads[n]["gflops"])
    peaks["torch"] = dict(by_threads[best], threads=best,
                          gflops_by_threads={str(k): v["gflops"] for k, v in by_threads.items()})
    torch_ref.set_threads(int(config.torch_threads[0]) or None)
  record["matmul_peak"] = peaks
  record["workloads"] = {}
  done: dict[str, Any] = {}
  t_start = time.perf_counter()
  for name in names:
    log(f"[bench] {name} ...")
    t0 = time.perf_counter()
    load = os.getloadavg()
    if name not in done:
      done[name] = run_workload(name, config, peaks, use_torch, done)
    record["workloads"][name] = done[name]
    record["workloads"][name]["wall_s"] = time.perf_counter() - t0
    record["workloads"][name]["loadavg"] = load
    record["targets"] = check_targets(record["workloads"])
    on_update(record)
  _SCDM_CACHE.clear()
  _COMPANION.clear()
  record["wall_s"] = time.perf_counter() - t_start
  record["machine"]["loadavg_end"] = os.getloadavg()
  record["targets"] = check_targets(record["workloads"])
  on_update(record)
  return record
