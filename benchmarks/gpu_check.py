"""The accelerator check: correctness against CPU references, then the paper-scale timings.

    python -m benchmarks.gpu_check --workdir=workdirs/gpu_check            # on the GPU host
    python -m benchmarks.gpu_check --workdir=/tmp/gpu_check --size=small   # a CPU dry run

Needs only hsijax's own dependencies (jax, flax, optax, orbax; no ml_collections, no torch),
so it runs on a bare accelerator image with `pip install -e . --no-deps`. On the default
backend it runs the accelerator policy (`Policy.default()`) and compares with the same
computation on the CPU backend under the CPU policy, in float32 at HIGHEST precision (which
agrees with float64 to ~1e-6 relative, far below TF32's ~1e-3):

  solver_step       SDP solve of `check.solver_steps` timesteps (K = 3) on a 64 x 64 x 103 scene
  unet_forward      the paper U-Net (base 128, 7 levels) on a 64 x 64 crop, with ICMG
  train_step        one spectral-prior training step (batch 512, B = 103): loss and weights

Each passes when its relative error (max |a - b| / max |b|) is within `TF32_BOUND`. Then it
times, with compilation separate and `block_until_ready`, median of repeats:

  sdp_step_256      one SDP solver timestep on 256 x 256 x 103 (ratio 8, 15 x 15 PSF, K = 3),
                    the marginal time between solves of n1 and n2 timesteps
  sdp_solve_256     a whole 1000-timestep SDP solve of that scene (target: <= 10 s on an H100)
  sdm_train_step    spectral-prior training step, batch 512, steps_per_call steps per dispatch
  unet_step_256     one guided sampler step of the paper U-Net on a 256 x 256 crop
  cascade_ddim50    a two-stage (12 -> 48 bands) DDIM-50 cascade on 256 x 256 with ICMG and
                    PDT (target: <= 15 s on an H100)

and writes DIR/gpu_check.json and DIR/gpu_check.md. `--size=small` shrinks every shape so the
whole script runs in a few minutes on a CPU (a dry run of the code paths, not a benchmark).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

TF32_BOUND = 1e-2  # relative error allowed against the float32 reference (TF32: 10-bit mantissa)

SIZES = {  # name -> shapes (full: the paper's scales; small: a CPU dry run)
    "full": {"check_hw": 64, "bands": 103, "hidden": 512, "unet_base": 128,
             "unet_mults": (1, 2, 2, 2, 2, 2, 2), "check_unet_hw": 64, "scene": 256,
             "solver_steps": 1000, "marginal": (10, 30), "unet_hw": 256, "ddim": 50,
             "train_batch": 512, "train_steps": 200, "repeats": 3},
    "small": {"check_hw": 16, "bands": 24, "hidden": 64, "unet_base": 16,
              "unet_mults": (1, 2, 2), "check_unet_hw": 16, "scene": 32, "solver_steps": 20,
              "marginal": (2, 4), "unet_hw": 32, "ddim": 3, "train_batch": 64,
              "train_steps": 20, "repeats": 2},
}


def _rel_err(a: Any, b: Any) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _on_cpu(fn: Callable[..., Any], *args: Any) -> Any:
  """fn(*args) on the CPU backend (arguments copied there), float32 matmuls at HIGHEST."""
  cpu = jax.devices("cpu")[0]
  args = jax.device_put(jax.device_get(args), cpu)
  with jax.default_device(cpu), jax.default_matmul_precision("float32"):
    return jax.device_get(fn(*args))


def _timed(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
  t0 = time.perf_counter()
  jax.block_until_ready(fn())  # compile + first run
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return {"first_call_s": first, "s": float(np.median(times)), "times": times}


# ----------------------------------------------------------------------------- problems


def _sdp_problem(hw: int, bands: int, hidden: int, ratio: int = 8):
  from hsijax import degrade, synthetic
  from hsijax.sdp.denoiser import SpectralDenoiser
  sc = synthetic.make_scene(0, 2 * hw, hw, bands, num_endmembers=6, source="generated",
                            wavelengths_nm=(430, 860))
  w = degrade.wald_protocol(sc.cube, ratio=ratio, key=jax.random.key(0),
                            srf=degrade.ikonos_srf(sc.wavelengths_nm))
  model = SpectralDenoiser(num_bands=bands, hidden=hidden)
  params = model.init(jax.random.key(1), jnp.zeros((1, bands)), 0)
  args = tuple(np.asarray(a) for a in (w.y, w.z, w.psf, w.srf))
  return model, params, args


def _solver(model, steps: int, policy, ratio: int = 8):
  from hsijax import diffusion, sdp
  sched = diffusion.make_respaced_schedule("linear", 1000, steps)
  return sdp.make_solver(model, sched, lam=0.1, gam=1e-3, lr=1e-3, K=3, ratio=ratio,
                         policy=policy)


def _unet(size: dict, out: int, policy):
  from hsijax.scdm.unet import CondUNet
  return CondUNet(out_channels=out, base=size["unet_base"], channel_mults=size["unet_mults"],
                  policy=policy)


# ----------------------------------------------------------------------------- checks


def check(size: dict, policy) -> dict[str, Any]:
  """Accelerator policy on the default backend vs the CPU policy on the CPU backend."""
  from hsijax.policy import Policy
  from hsijax.scdm.unet import init_params
  from hsijax.sdp import train as sdp_train
  cpu_policy = Policy.for_backend("cpu")
  out = {}
  model, params, (y, z, psf, srf) = _sdp_problem(size["check_hw"], size["bands"],
                                                 size["hidden"])
  key = jax.random.key(2)
  got = _solver(model, 2, policy)(params, y, z, psf, srf, key)
  want = _on_cpu(_solver(model, 2, cpu_policy), params, y, z, psf, srf, key)
  out["solver_step"] = _rel_err(got, want)

  hw = size["check_unet_hw"]
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, hw, hw, 48)).astype(np.float32)
  cond = rng.normal(size=(2, hw, hw, 12)).astype(np.float32)
  t = np.array([10, 900], np.int32)
  p = init_params(_unet(size, 48, cpu_policy), jax.random.key(3), x.shape, cond.shape)
  fwd = lambda pol: jax.jit(lambda p, x, c, t: _unet(size, 48, pol).apply(
      {"params": p}, x, c, t, with_uncond=True))
  out["unet_forward"] = _rel_err(fwd(policy)(p, x, cond, t),
                                 _on_cpu(fwd(cpu_policy), p, x, cond, t))

  s = sdp_train.PriorSettings(hidden=size["hidden"], batch=size["train_batch"])
  got_state, got_loss = _train_step(s, size["bands"])
  want_state, want_loss = _on_cpu(lambda: _train_step(s, size["bands"]))
  out["train_step_loss"] = _rel_err(got_loss, want_loss)
  out["train_step_weights"] = max(
      _rel_err(a, b) for a, b in zip(jax.tree_util.tree_leaves(got_state.params),
                                     jax.tree_util.tree_leaves(want_state.params)))
  return {k: {"rel_error": v, "pass": bool(v <= TF32_BOUND)} for k, v in out.items()}


def _train_step(s, bands: int):
  from hsijax import diffusion
  from hsijax.sdp import train as sdp_train
  model = s.model(bands)
  opt = sdp_train.make_optimizer()
  state = sdp_train.init_train_state(model, jax.random.key(4), opt)
  step = jax.jit(sdp_train.make_train_step(model, diffusion.make_schedule("linear", 1000),
                                           opt))
  batch = jnp.asarray(np.random.default_rng(5).uniform(size=(s.batch, bands)), jnp.float32)
  state, m = step(state, batch, jax.random.key(6))
  return state, m["loss"]


# ----------------------------------------------------------------------------- timings


def timings(size: dict, policy) -> dict[str, Any]:
  from hsijax import diffusion, scdm
  from hsijax.sdp import train as sdp_train
  out: dict[str, Any] = {}
  reps = size["repeats"]
  model, params, (y, z, psf, srf) = _sdp_problem(size["scene"], size["bands"], size["hidden"])
  key = jax.random.key(7)
  n1, n2 = size["marginal"]
  short, long = _solver(model, n1, policy), _solver(model, n2, policy)
  t1 = _timed(lambda: short(params, y, z, psf, srf, key), reps)
  t2 = _timed(lambda: long(params, y, z, psf, srf, key), reps)
  out["sdp_step_256"] = {"s": (t2["s"] - t1["s"]) / (n2 - n1), "steps": [n1, n2]}
  full = _solver(model, size["solver_steps"], policy)
  out["sdp_solve_256"] = _timed(lambda: full(params, y, z, psf, srf, key), 1) | {
      "timesteps": size["solver_steps"]}

  s = sdp_train.PriorSettings(hidden=size["hidden"], batch=size["train_batch"],
                              log_every=size["train_steps"],
                              checkpoint_every=size["train_steps"])
  pixels = np.random.default_rng(8).uniform(size=(50_000, size["bands"])).astype(np.float32)
  fit = lambda: sdp_train.fit(pixels, steps=size["train_steps"], key=0, settings=s,
                              show_progress=False, policy=policy)[0].params
  t = _timed(fit, 1)
  out["sdm_train_step"] = {"s": t["s"] / size["train_steps"],
                           "steps_per_call": policy.steps_per_call,
                           "first_call_s": t["first_call_s"]}

  hw = size["unet_hw"]
  unet = _unet(size, 48, policy)
  p = scdm.init_params(unet, jax.random.key(9), (1, hw, hw, 48), (1, hw, hw, 12))
  x = jnp.asarray(np.random.default_rng(10).normal(size=(1, hw, hw, 48)), jnp.float32)
  cond = jnp.asarray(np.random.default_rng(11).normal(size=(1, hw, hw, 12)), jnp.float32)
  step = jax.jit(lambda p, x, c: unet.apply({"params": p}, x, c, jnp.array([500]),
                                            with_uncond=True))
  out["unet_step_256"] = _timed(lambda: step(p, x, cond), reps)

  casc = scdm.make_cascade(48, rgb_bands=(4, 11, 22), unet=dict(
      base=size["unet_base"], channel_mults=size["unet_mults"]))
  params = [scdm.init_params(casc.stage_model(k, policy), jax.random.key(12 + k),
                             (1, hw, hw, casc.stage_channels(k)[0]),
                             (1, hw, hw, casc.stage_channels(k)[1])) for k in range(2)]
  casc = casc.with_params(params)
  rgb = np.random.default_rng(13).uniform(size=(hw, hw, 3)).astype(np.float32)
  stages = [{"pdt_target": "x", "pdt_p_T": 0.96},
            {"guidance_scale": 1.0, "pdt_target": "x", "pdt_p_T": 0.88}]
  run = lambda: scdm.sample(casc, rgb, key=0, stages=stages, method="ddim",
                            num_steps=size["ddim"], tile=hw, show_progress=False,
                            policy=policy)
  out["cascade_ddim50"] = _timed(run, 1) | {"ddim_steps": size["ddim"]}
  return out


def _markdown(record: dict[str, Any]) -> str:
  lines = [f"# gpu_check on {record['device']} ({record['backend']}, jax {record['jax']})", "",
           "| check | relative error | within TF32 bound |", "|---|---|---|"]
  for k, v in record["checks"].items():
    lines.append(f"| {k} | {v['rel_error']:.2e} | {'yes' if v['pass'] else 'NO'} |")
  lines += ["", "| timing | seconds | first call (compile) s |", "|---|---|---|"]
  for k, v in record["timings"].items():
    lines.append(f"| {k} | {v['s']:.4g} | {v.get('first_call_s', float('nan')):.3g} |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--size", choices=sorted(SIZES), default="full")
  ap.add_argument("--skip_checks", action="store_true")
  args = ap.parse_args(argv)
  from hsijax.policy import Policy
  size = SIZES[args.size]
  policy = Policy.default()
  device = jax.devices()[0]
  record: dict[str, Any] = {"device": getattr(device, "device_kind", str(device)),
                            "backend": jax.default_backend(), "jax": jax.__version__,
                            "host": platform.node(), "size": args.size,
                            "policy": policy.__dict__, "tf32_bound": TF32_BOUND}
  out = pathlib.Path(args.workdir)
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  record["checks"] = {} if args.skip_checks else check(size, policy)
  print(json.dumps(record["checks"], indent=1), flush=True)
  record["timings"] = timings(size, policy)
  record["total_s"] = time.perf_counter() - t0
  (out / "gpu_check.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
  (out / "gpu_check.md").write_text(_markdown(record))
  print(_markdown(record), flush=True)
  return record


if __name__ == "__main__":
  main()
