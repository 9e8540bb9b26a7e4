"""The PyTorch eager references compute the same functions as the JAX library (same weights)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks.torch_ref import load_flax_params, timestep_embedding  # noqa: E402
from hsijax import diffusion  # noqa: E402


def _random_params(model, *args, seed=0):
  """Random variables with the shapes of model.init (no init compile; fine for parity)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)
  rng = np.random.default_rng(seed)
  def fill(path, leaf):
    base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    return jnp.asarray(base + 0.3 * rng.standard_normal(leaf.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _nchw(a):
  return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous()


def test_timestep_embedding_matches():
  t = np.array([0, 1, 17, 999])
  for dim in (8, 9, 64):
    a = np.asarray(diffusion.timestep_embedding(jnp.asarray(t), dim))
    b = timestep_embedding(torch.from_numpy(t), dim).numpy()
    # float32 sin / cos of arguments up to ~1000 differ by a few ULPs between libraries.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def denoiser():
  from hsijax.sdp.denoiser import SpectralDenoiser
  from benchmarks.torch_ref.sdp import SpectralDenoiser as TorchDenoiser
  B, H = 12, 32
  model = SpectralDenoiser(B, hidden=H)
  params = _random_params(model, jnp.ones((2, B)), 0)
  tmodel = load_flax_params(TorchDenoiser(B, hidden=H), params).eval()
  return model, params, tmodel


def test_denoiser_forward_matches(denoiser):
  model, params, tmodel = denoiser
  x = np.random.default_rng(0).standard_normal((50, 12)).astype(np.float32)
  for t in (7, np.arange(50) * 13):
    a = np.asarray(model.apply(params, jnp.asarray(x), t))
    with torch.no_grad():
      b = tmodel(torch.from_numpy(x), torch.as_tensor(t)).numpy()
    # Tolerance set by float32 sin / cos of large timestep arguments (see above).
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert np.abs(a).max() > 0.1  # a real signal, not zeros


def test_load_flax_params_rejects_other_sizes(denoiser):
  from benchmarks.torch_ref.sdp import SpectralDenoiser as TorchDenoiser
  _, params, _ = denoiser
  with pytest.raises(ValueError, match="shape"):
    load_flax_params(TorchDenoiser(12, hidden=16), params)
  with pytest.raises((KeyError, ValueError)):
    load_flax_params(TorchDenoiser(12, hidden=32, num_layers=4), params)


def _scene(rng, H, B, b, ratio):
  y = rng.uniform(size=(H // ratio, H // ratio, B)).astype(np.float32)
  z = rng.uniform(size=(H, H, b)).astype(np.float32)
  srf = rng.uniform(size=(b, B)).astype(np.float32)
  srf /= srf.sum(1, keepdims=True)
  return y, z, srf


def test_solver_loss_and_gradient_match(denoiser):
  from hsijax import degrade
  from hsijax.sdp import solver
  from benchmarks.torch_ref.sdp import SDPSolver
  model, params, tmodel = denoiser
  rng = np.random.default_rng(1)
  H, B, b, ratio = 16, 12, 3, 4
  y, z, srf = _scene(rng, H, B, b, ratio)
  psf = np.asarray(degrade.gaussian_psf(ratio, 7), np.float32)
  # A non-symmetric PSF also checks that both sides correlate (not convolve) the same way.
  psf_asym = rng.uniform(size=(7, 7)).astype(np.float32)
  psf_asym /= psf_asym.sum()
  sched = diffusion.make_schedule("linear", 100)
  X = rng.uniform(size=(H, H, B)).astype(np.float32)
  eps = rng.standard_normal((H, H, B)).astype(np.float32)
  kw = dict(model=model, schedule=sched, lam=0.1, gam=1e-1, ratio=ratio)
  loss_and_grad = jax.jit(jax.value_and_grad(functools.partial(solver.fusion_loss, **kw)))
  for p in (psf, psf_asym):
    loss_j, grad_j = loss_and_grad(jnp.asarray(X), params, jnp.asarray(y), jnp.asarray(z),
                                   jnp.asarray(p), jnp.asarray(srf), jnp.asarray(eps),
                                   jnp.int32(40))
    ref = SDPSolver(tmodel, sched, y, z, p, srf, ratio=ratio, lam=0.1, gam=1e-1)
    Xt = _nchw(X[None]).requires_grad_(True)
    loss_t = ref.loss(Xt, _nchw(eps[None]), 40)
    loss_t.backward()
    np.testing.assert_allclose(float(loss_j), float(loss_t), rtol=1e-5)
    grad_t = Xt.grad[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(np.asarray(grad_j), grad_t, rtol=1e-4,
                               atol=1e-4 * np.abs(grad_t).max())


def test_solver_steps_match_library_solver(denoiser):
  """Three outer steps (K = 1) of the library solver equal the torch loop fed the same eps."""
  from hsijax import degrade
  from hsijax.sdp import solver
  from benchmarks.torch_ref.sdp import SDPSolver
  model, params, tmodel = denoiser
  rng = np.random.default_rng(2)
  H, B, b, ratio = 16, 12, 3, 4
  y, z, srf = _scene(rng, H, B, b, ratio)
  psf = np.asarray(degrade.gaussian_psf(ratio, 7), np.float32)
  sched = diffusion.make_respaced_schedule("linear", 1000, 3)
  kw = dict(lam=0.1, gam=1e-1, lr=1e-2, K=1, ratio=ratio)
  # lr_scale=1: the plain Adam lr (the library scales it by T / n for respaced schedules).
  solve = solver.make_solver(model, sched, lr_scale=1.0, **kw)
  key = jax.random.PRNGKey(5)
  X_jax = np.asarray(solve(params, y, z, psf, srf, key))

  ref = SDPSolver(tmodel, sched, y, z, psf, srf, **kw)
  for i in (2, 1, 0):  # the library draws eps from fold_in(fold_in(key, i), k)
    eps = jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), 0), (H, H, B))
    ref.inner_step(i, _nchw(np.asarray(eps)[None]))
  X_torch = ref.X_ema[0].permute(1, 2, 0).numpy()
  assert np.abs(X_torch - 1.0).max() > 1e-3  # X moved away from its ones initialisation
  np.testing.assert_allclose(X_jax, X_torch, atol=1e-5)


def test_unet_forward_matches():
  from hsijax.scdm.unet import CondUNet
  from benchmarks.torch_ref.scdm import CondUNet as TorchUNet
  # Two levels (one down / up sample), attention at level 1 and in the middle, 1x1 skips.
  kw = dict(base=8, channel_mults=(1, 2), attn_levels=(1,), groups=4)
  model = CondUNet(5, **kw)
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 8, 8, 5)).astype(np.float32)
  c = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
  t = np.array([3, 700])
  params = _random_params(model, x, c, t)
  tmodel = load_flax_params(TorchUNet(5, 3, **kw), params).eval()
  apply = jax.jit(model.apply)
  a = np.asarray(apply(params, x, c, t))
  with torch.no_grad():
    b = tmodel(_nchw(x), _nchw(c), torch.from_numpy(t)).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  assert np.abs(a).max() > 0.1
  # The condition matters (the shared encoder branch is wired in).
  with torch.no_grad():
    b0 = tmodel(_nchw(x), _nchw(0 * c), torch.from_numpy(t)).permute(0, 2, 3, 1).numpy()
  a0 = np.asarray(apply(params, x, 0 * c, t))
  np.testing.assert_allclose(a0, b0, rtol=1e-4, atol=1e-4)
  assert np.abs(a0 - a).max() > 1e-3


def test_sdm_trainer_step_decreases_nothing_weird(denoiser):
  """The torch training step runs, returns a finite loss, moves weights and the EMA."""
  from benchmarks.torch_ref.sdp import SDMTrainer, SpectralDenoiser as TorchDenoiser, lr_lambda
  _, params, _ = denoiser
  tm = load_flax_params(TorchDenoiser(12, hidden=32), params)
  before = tm.layer_0.weight.detach().clone()
  pixels = np.random.default_rng(4).uniform(size=(100, 12)).astype(np.float32)
  tr = SDMTrainer(tm, diffusion.make_schedule("linear", 100), pixels, batch=16)
  loss = tr.step()
  assert np.isfinite(loss) and loss > 0
  moved = (tm.layer_0.weight - before).abs().max().item()
  ema_moved = (tr.ema.layer_0.weight - before).abs().max().item()
  assert moved > 0 and ema_moved == pytest.approx(moved * 1e-3, rel=0.05)
  assert lr_lambda(0) == 1.0 and lr_lambda(10_000) == pytest.approx(0.001)


@pytest.mark.parametrize("method,scale,pdt", [("ddpm", 1.0, "eps"), ("ddim", 0.0, "x")])
def test_sampler_step_matches(method, scale, pdt):
  """One reverse step (ICMG: shared-encoder call here, a 2N batch in torch; PDT; DDPM / DDIM) equals the library's."""
  from hsijax.scdm import sampler
  from hsijax.scdm.unet import CondUNet
  from benchmarks.torch_ref.scdm import CondUNet as TorchUNet, Sampler
  kw = dict(base=8, channel_mults=(1, 2), attn_levels=(), groups=4)
  model = CondUNet(4, **kw)
  rng = np.random.default_rng(6)
  x = (2.0 * rng.standard_normal((2, 8, 8, 4))).astype(np.float32)
  c = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
  noise = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  params = _random_params(model, x, c, np.zeros(2, np.int32))
  sched = diffusion.make_respaced_schedule("linear", 1000, 10)
  settings = sampler.SamplerSettings(method=method, guidance_scale=scale, pdt_target=pdt,
                                     pdt_p_T=0.9)
  i = 7
  step = jax.jit(lambda p, x, c, n: sampler.sampler_step(
      sampler.apply_fn_of(model), p, sched, x, jnp.int32(i), c, n, settings, 1000))
  a = np.asarray(step(params["params"], x, c, noise))
  tmodel = load_flax_params(TorchUNet(4, 3, **kw), params)
  ref = Sampler(tmodel, sched, method=method, guidance_scale=scale, pdt_target=pdt,
                pdt_p_T=0.9)
  b = ref.step(_nchw(x), _nchw(c), i, noise=_nchw(noise)).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  assert np.abs(a - x).max() > 1e-2  # the step changed x
