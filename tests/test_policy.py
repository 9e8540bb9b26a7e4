"""The platform policy: one place for platform choices; the accelerator path checked on CPU by
its structure (jaxpr loops, native convolutions, explicit precision) and by equality with
the CPU path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common as config_common
from configs import sdp as sdp_config
from hsijax import classical, degrade, diffusion, linear_baseline, sdp, synthetic
from hsijax.policy import Policy, solver_chunk
from hsijax.sdp.denoiser import SpectralDenoiser

CPU, GPU, TPU = (Policy.for_backend(b) for b in ("cpu", "gpu", "tpu"))


def test_backend_policies_and_overrides():
  assert (CPU.conv_impl, CPU.blur_method, CPU.pixel_chunk, CPU.donate) == (
      "cpu", "matmul", 512, False)
  for p in (GPU, TPU):
    assert (p.conv_impl, p.blur_method, p.pixel_chunk, p.donate) == ("xla", "conv", None, True)
  assert Policy.for_backend("cuda") == GPU
  assert Policy.default() == CPU  # the tests run on CPU
  assert CPU.replace(steps_per_call=3).steps_per_call == 3
  with pytest.raises(ValueError, match="valid"):
    CPU.replace(chunk=3)
  with pytest.raises(ValueError, match="blur_method"):
    Policy(blur_method="fft")
  # --config.policy.<field>=... reaches the policy; unset fields keep the backend's.
  cfg = sdp_config.get_config("crop")
  cfg.policy.pixel_chunk, cfg.policy.donate = 1024, True
  p = config_common.policy(cfg)
  assert (p.pixel_chunk, p.donate, p.blur_method) == (1024, True, "matmul")


def test_solver_chunk_from_memory_estimate():
  assert solver_chunk(CPU, 10**6, 512, 5, 103) == 512
  assert solver_chunk(GPU, 256 * 256, 512, 5, 103) is None        # 65k pixels fit in 8 GB
  chunk = solver_chunk(GPU, 4096 * 4096, 512, 5, 103)              # 16.8M pixels do not
  assert chunk is not None and chunk & (chunk - 1) == 0 and chunk < 4096 * 4096
  per_pixel = 4 * (3 * 4 * 512 + 4 * 103 + 5 * 512)
  assert chunk * per_pixel <= 8 * 2**30 < 2 * chunk * per_pixel


def _solver_case():
  sc = synthetic.make_scene(0, 64, 32, 12, num_endmembers=3, source="generated",
                            wavelengths_nm=(450, 850))
  w = degrade.wald_protocol(sc.cube, ratio=4, key=jax.random.key(0),
                            srf=degrade.ikonos_srf(sc.wavelengths_nm))
  model = SpectralDenoiser(num_bands=12, hidden=32)
  params = model.init(jax.random.key(0), jnp.zeros((1, 12)), 0)
  sched = diffusion.make_respaced_schedule("linear", 100, 4)
  args = (params, np.asarray(w.y), np.asarray(w.z), np.asarray(w.psf), np.asarray(w.srf),
          jax.random.key(1))
  return model, sched, args


def _loop_depths(jaxpr, depth=0):
  """Nesting depth of every loop (scan / while) in a jaxpr, sub-jaxprs included."""
  out = []
  for e in jaxpr.eqns:
    inner = depth
    if e.primitive.name in ("scan", "while"):
      out.append(depth)
      inner = depth + 1
    for v in e.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else [v]):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          out += _loop_depths(sub, inner)
  return out


def test_gpu_policy_solver_has_no_loop_inside_its_k_loop_and_equals_the_cpu_path():
  model, sched, args = _solver_case()
  kw = dict(lam=0.1, gam=0.01, lr=1e-2, K=3, ratio=4)
  gpu = sdp.make_solver(model, sched, policy=GPU, **kw)
  cpu = sdp.make_solver(model, sched, policy=CPU.replace(pixel_chunk=256), **kw)
  # Outer scan over timesteps (depth 0) and the K-step scan (depth 1), nothing deeper: the
  # prior gradient of all 2048 pixels is one batched computation. The CPU path maps 8
  # blocks of 256 pixels in sequence inside the K loop.
  assert sorted(set(_loop_depths(jax.make_jaxpr(gpu)(*args).jaxpr))) == [0, 1]
  assert 2 in _loop_depths(jax.make_jaxpr(cpu)(*args).jaxpr)
  np.testing.assert_allclose(np.asarray(gpu(*args)), np.asarray(cpu(*args)), rtol=1e-5,
                             atol=1e-5)


def test_untiled_solve_shards_rows_over_the_devices_and_equals_one_device():
  model, sched, args = _solver_case()
  kw = dict(lam=0.1, gam=0.01, lr=1e-2, K=3, ratio=4)
  from hsijax import sharding
  mesh = sharding.make_mesh()
  assert mesh.shape["data"] == 8
  one = sdp.make_solver(model, sched, **kw)(*args)
  eight = sdp.make_solver(model, sched, mesh=mesh, **kw)(*args)
  assert eight.sharding.spec == jax.sharding.PartitionSpec("data")
  np.testing.assert_allclose(np.asarray(eight), np.asarray(one), rtol=1e-6, atol=1e-7)


def _dot_precisions(fn, *args):
  out = []

  def walk(jaxpr):
    for e in jaxpr.eqns:
      if e.primitive.name == "dot_general":
        out.append(e.params["precision"])
      for v in e.params.values():
        for sub in (v if isinstance(v, (list, tuple)) else [v]):
          sub = getattr(sub, "jaxpr", sub)
          if hasattr(sub, "eqns"):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return out


def test_reference_numerics_run_float32_matmuls_on_every_backend():
  # TF32 (GPU) or one bf16 pass (TPU) would change published numbers: the classical
  # methods and the linear baseline trace every matmul at HIGHEST precision.
  rng = np.random.default_rng(0)
  y = jnp.asarray(rng.uniform(size=(4, 4, 6)), jnp.float32)
  z = jnp.asarray(rng.uniform(size=(8, 8, 3)), jnp.float32)
  psf = jnp.asarray(degrade.gaussian_psf(2))
  srf = jnp.full((3, 6), 1 / 6, jnp.float32)
  highest = jax.lax.Precision.HIGHEST
  for fn, args in ((lambda y, z: classical.detail_injection(y, z, psf, 2), (y, z)),
                   (lambda y, z: classical.subspace_ls(y, z, psf, srf, 2), (y, z)),
                   (lambda a, b: linear_baseline.apply(linear_baseline.fit(a, b), a),
                    (y[..., :3].reshape(-1, 3), y.reshape(-1, 6)))):
    precisions = _dot_precisions(fn, *args)
    assert precisions and all(p in (highest, (highest, highest)) for p in precisions), \
        precisions
