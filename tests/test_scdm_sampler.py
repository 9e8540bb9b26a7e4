"""SCDM samplers: one step against NumPy (ICMG, PDT eps / x), whole chains, jaxpr size,
quantiles, and sharded == single-device sampling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from hsijax import diffusion, sharding
from hsijax.scdm import sampler
from hsijax.scdm.unet import CondUNet, init_params

T = 1000


class FakeDenoiser:
  """eps = a x + 0.1 mean_c(cond) + t / 1000: a fixed function of every input."""

  def __init__(self, out_channels=3):
    self.out_channels = out_channels

  def apply(self, params, x, cond, t, train=False):
    del train
    return params["params"]["a"] * x + 0.1 * cond.mean(-1, keepdims=True) + \
        t.astype(jnp.float32)[:, None, None, None] / 1000.0


FAKE_PARAMS = {"a": jnp.float32(0.3)}


def np_fake_eps(x, cond, t):
  return 0.3 * x + 0.1 * cond.mean(-1, keepdims=True) + t / 1000.0


def np_clamp(v, p):
  """Per-sample tau = max(1, quantile(|v|, p)), clamp to [-tau, tau] (NumPy, float64)."""
  tau = np.maximum(np.quantile(np.abs(v).reshape(len(v), -1), p, axis=1), 1.0)
  tau = tau[:, None, None, None]
  return np.clip(v, -tau, tau)


def np_step(x, cond, i, noise, sched, *, scale, target, p_T, method="ddpm"):
  """Independent NumPy reverse step with ICMG and PDT (float64)."""
  t = int(sched["timesteps"][i])
  p = 1.0 - (1.0 - p_T) * t / (T - 1)
  if target == "x":
    x = np_clamp(x, p)
  e_c = np_fake_eps(x, cond, t)
  e_0 = np_fake_eps(x, np.zeros_like(cond), t)
  e = e_c + scale * (e_c - e_0)
  if target == "eps":
    e = np_clamp(e, p)
  abar = sched["abar"][i]
  abar_prev = sched["abar"][i - 1] if i > 0 else 1.0
  if method == "ddpm":
    beta = 1.0 - abar / abar_prev
    mean = (x - beta / np.sqrt(1.0 - abar) * e) / np.sqrt(1.0 - beta)
    return mean + (np.sqrt(beta) if i > 0 else 0.0) * noise
  x0 = (x - np.sqrt(1.0 - abar) * e) / np.sqrt(abar)
  return np.sqrt(abar_prev) * x0 + np.sqrt(1.0 - abar_prev) * e  # DDIM, eta = 0


def np_sched(s):
  return {"timesteps": np.asarray(s.timesteps),
          "abar": np.cumprod(1.0 - diffusion.linear_betas(T))[np.asarray(s.timesteps)]}


def _inputs(seed=0, n=2, hw=6):
  rng = np.random.default_rng(seed)
  x = 2.0 * rng.normal(size=(n, hw, hw, 3))      # |x| quantiles > 1: PDT-x clips
  cond = 8.0 * rng.normal(size=(n, hw, hw, 4))   # large guidance term: PDT-eps clips
  noise = rng.normal(size=(n, hw, hw, 3))
  return x, cond, noise


@pytest.mark.parametrize("target", [None, "eps", "x"])
def test_one_step_matches_numpy(target):
  sched = diffusion.make_schedule("linear", T)
  x, cond, noise = _inputs()
  settings = sampler.SamplerSettings(guidance_scale=2.5, pdt_target=target, pdt_p_T=0.88)
  i = 800
  step = jax.jit(lambda x, c, n: sampler.sampler_step(
      sampler.apply_fn_of(FakeDenoiser()), FAKE_PARAMS, sched, x, i, c, n, settings, T))
  got = step(jnp.float32(x), jnp.float32(cond), jnp.float32(noise))
  want = np_step(x, cond, i, noise, np_sched(sched), scale=2.5, target=target, p_T=0.88)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  if target is not None:  # the truncation really changed the result
    plain = np_step(x, cond, i, noise, np_sched(sched), scale=2.5, target=None, p_T=0.88)
    assert np.max(np.abs(want - plain)) > 1e-2


@pytest.mark.parametrize("method, target", [("ddpm", "eps"), ("ddpm", "x"), ("ddim", "eps")])
def test_whole_chain_matches_numpy_loop(method, target):
  sched = diffusion.make_respaced_schedule("linear", T, 4)
  _, cond, _ = _inputs(1)
  key = jax.random.key(7)
  sample = sampler.make_sampler(FakeDenoiser(), sched, method=method, guidance_scale=1.5,
                                pdt_target=target, pdt_p_T=0.9)
  got = sample(FAKE_PARAMS, jnp.float32(cond), key)
  # Same randomness as documented: x_T from split(key)[0], step noise fold_in(split[1], i).
  k_init, k_noise = jax.random.split(key)
  x = np.asarray(jax.random.normal(k_init, cond.shape[:3] + (3,)), np.float64)
  ns = np_sched(sched)
  for i in range(3, -1, -1):
    noise = np.asarray(jax.random.normal(jax.random.fold_in(k_noise, i), x.shape))
    x = np_step(x, cond, i, noise, ns, scale=1.5, target=target, p_T=0.9, method=method)
  np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)


class FakeVDenoiser(FakeDenoiser):
  """Outputs the v that corresponds to FakeDenoiser's eps at the same (x_t, t)."""

  def __init__(self, sched, out_channels=3):
    super().__init__(out_channels)
    self.abar = jnp.asarray(np.cumprod(1.0 - diffusion.linear_betas(T)), jnp.float32)

  def apply(self, params, x, cond, t, train=False):
    eps = super().apply(params, x, cond, t, train)
    a = self.abar[t][:, None, None, None]
    x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
    return jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0


@pytest.mark.parametrize("target", [None, "eps"])
def test_v_model_step_equals_eps_model_step(target):
  """A v-model whose v implies the fake eps samples exactly like the eps-model (with ICMG
  and PDT on the converted eps), on a respaced schedule."""
  sched = diffusion.make_respaced_schedule("linear", T, 10)
  x, cond, noise = _inputs(3)
  settings = sampler.SamplerSettings(guidance_scale=2.5, pdt_target=target, pdt_p_T=0.88)
  i = 4
  args = (jnp.float32(x), i, jnp.float32(cond), jnp.float32(noise), settings, T)
  got = sampler.sampler_step(sampler.apply_fn_of(FakeVDenoiser(sched)), FAKE_PARAMS, sched,
                             *args, prediction="v")
  want = np_step(x, cond, i, noise, np_sched(sched), scale=2.5, target=target, p_T=0.88)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
  # Read as eps, the same outputs give a different step.
  wrong = sampler.sampler_step(sampler.apply_fn_of(FakeVDenoiser(sched)), FAKE_PARAMS, sched,
                               *args, prediction="eps")
  assert np.max(np.abs(np.asarray(wrong) - want)) > 1e-2


def test_icmg_and_percentile_closed_forms():
  np.testing.assert_allclose(sampler.icmg(jnp.float32(2.0), jnp.float32(0.5), 2.5),
                             2.0 + 2.5 * 1.5)
  # Authors' table: linspace(p_T, 1, 1000)[::-1][t].
  table = np.linspace(0.96, 1.0, 1000)[::-1]
  for t in (0, 1, 500, 999):
    np.testing.assert_allclose(sampler.pdt_percentile(t, 1000, 0.96), table[t], rtol=1e-6)


@pytest.mark.parametrize("q", [1.0, 0.999, 0.96, 0.9, 0.88])
def test_per_sample_quantile_matches_numpy(q):
  rng = np.random.default_rng(2)
  a = np.abs(rng.normal(size=(3, 7, 5, 4))).astype(np.float32)
  want = np.quantile(a.reshape(3, -1).astype(np.float64), q, axis=1)
  for method in sampler.QUANTILE_METHODS:
    got = sampler.per_sample_quantile(jnp.asarray(a), q, method=method)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_order_statistics_equal_sorted_values():
  # Signed values, ties, infinities and very small / large magnitudes: bisection on the
  # float bits must return exactly what a sort puts at each rank.
  rng = np.random.default_rng(3)
  a = (rng.standard_normal((2, 500)) * 10.0 ** rng.integers(-30, 30, (2, 500))).astype(np.float32)
  a[0, :40] = 1.5  # ties
  a[1, 0], a[1, 1], a[1, 2] = np.inf, -np.inf, 0.0
  ranks = np.array([[0, 39, 40, 250, 499], [0, 1, 2, 498, 499]], np.int32)
  got = np.asarray(sampler.order_statistics(jnp.asarray(a), jnp.asarray(ranks)))
  want = np.take_along_axis(np.sort(a, axis=1), ranks, axis=1)
  np.testing.assert_array_equal(got, want)


def test_pdt_clamp_never_below_one():
  v = jnp.full((2, 4, 4, 1), 0.5).at[0, 0, 0, 0].set(-3.0)
  out = sampler.pdt_clamp_eps(v, 0.5)
  # tau = max(1, 0.5) = 1 for both samples: -3 -> -1, 0.5 untouched.
  assert float(out[0, 0, 0, 0]) == -1.0
  np.testing.assert_array_equal(out[1], v[1])


def _count(jaxpr, acc, loops_inside: int = 0):
  """Recursively counts equations and the outermost loop primitives of a (closed) jaxpr.

  A loop nested in another loop (e.g. the quantile's bisection inside the timestep scan)
  is not counted: "loops" are the loops over timesteps.
  """
  for eqn in jaxpr.eqns:
    acc["eqns"] += 1
    is_loop = eqn.primitive.name in ("scan", "while")
    if is_loop and not loops_inside:
      acc["loops"] += 1
    for v in eqn.params.values():
      subs = v if isinstance(v, (list, tuple)) else [v]
      for s in subs:
        inner = getattr(s, "jaxpr", None)
        depth = loops_inside + int(is_loop)
        if inner is not None:
          _count(inner if hasattr(inner, "eqns") else inner.jaxpr, acc, depth)
        elif hasattr(s, "eqns"):
          _count(s, acc, depth)
  return acc


TINY = dict(base=8, channel_mults=(1, 2), num_res_down=1, num_res_up=2, attn_levels=(1,),
            groups=4, dropout=0.0)


def test_jaxpr_has_one_scan_per_stage_and_does_not_grow_with_steps():
  models = [CondUNet(out_channels=4, **TINY), CondUNet(out_channels=8, **TINY)]
  settings = [dict(pdt_target="x", pdt_p_T=0.96),
              dict(guidance_scale=1.0, pdt_target="eps", pdt_p_T=0.88)]
  params = [jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 16, 16, m.out_channels)),
                           jnp.zeros((1, 16, 16, c)), jnp.zeros((1,), jnp.int32))["params"]
            for m, c in zip(models, (3, 4))]
  counts = {}
  for n in (10, 1000):
    sched = diffusion.make_respaced_schedule("linear", T, n)
    fn = sampler.make_cascade_sampler(models, [sched, sched], settings)
    jaxpr = jax.make_jaxpr(fn)(params, jnp.zeros((2, 16, 16, 3)), jax.random.key(0))
    counts[n] = _count(jaxpr.jaxpr, {"eqns": 0, "loops": 0})
  assert counts[10]["loops"] == counts[1000]["loops"] == 2
  assert counts[10]["eqns"] == counts[1000]["eqns"]


def test_sharded_sampling_equals_single_device():
  assert jax.device_count() == 8, "conftest forces 8 CPU devices"
  model = CondUNet(out_channels=4, **TINY)
  params = init_params(model, jax.random.key(0), (1, 16, 16, 4), (1, 16, 16, 3))
  sched = diffusion.make_respaced_schedule("linear", T, 3)
  sample = sampler.make_sampler(model, sched, guidance_scale=2.0, pdt_target="eps",
                                pdt_p_T=0.9)
  cond = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
  key = jax.random.key(2)
  dev0 = jax.devices()[0]
  single = sample(jax.device_put(params, dev0), jax.device_put(cond, dev0), key)
  mesh = sharding.make_mesh(None)
  data, rep = sharding.data_sharded(mesh), sharding.replicated(mesh)
  sharded_fn = jax.jit(sample, in_shardings=(rep, data, rep), out_shardings=data)
  out = sharded_fn(sharding.replicate(params, mesh), sharding.shard_batch(cond, mesh), key)
  assert out.sharding.spec == PartitionSpec("data")
  assert len(out.addressable_shards) == 8
  assert single.devices() == {dev0}
  # Same math, different XLA programs (per-device batch 1 vs 8): float32 round-off only,
  # amplified by the untrained net's large outputs, so compare relative to their scale.
  scale = float(np.max(np.abs(single)))
  assert scale > 1.0
  np.testing.assert_allclose(np.asarray(out), np.asarray(single), rtol=1e-4,
                             atol=1e-5 * scale)


def test_bad_settings_raise():
  with pytest.raises(ValueError, match="pdt_target"):
    sampler.SamplerSettings(pdt_target="x0")
  with pytest.raises(ValueError, match="sampler"):
    sampler.SamplerSettings(method="euler")
  with pytest.raises(ValueError, match="unknown sampler setting"):
    sampler.as_settings({"guidance": 1.0})
  assert sampler.as_settings({"pdt_target": "none"}).pdt_target is None
