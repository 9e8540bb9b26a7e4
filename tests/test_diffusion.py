"""Schedules against closed forms; DDPM / DDIM steps against hand derivations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hsijax import diffusion


def test_linear_schedule_closed_form():
  s = diffusion.make_schedule("linear", 1000)
  betas = np.linspace(1e-4, 2e-2, 1000)
  np.testing.assert_allclose(s.betas, betas, rtol=1e-6)
  np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-5)
  # abar_0 = 1 - beta_0 exactly; abar at the end is ~4e-5 for the DDPM schedule.
  assert float(s.alphas_cumprod[0]) == pytest.approx(1 - 1e-4, rel=1e-7)
  assert 3e-5 < float(s.alphas_cumprod[-1]) < 5e-5


def test_linear_schedule_scales_with_T():
  s = diffusion.make_schedule("linear", 100)
  np.testing.assert_allclose([s.betas[0], s.betas[-1]], [1e-3, 0.2], rtol=1e-6)


def test_cosine_schedule_closed_form():
  T, s_ = 50, 0.008
  s = diffusion.make_schedule("cosine", T)
  f = lambda t: np.cos((t / T + s_) / (1 + s_) * np.pi / 2) ** 2
  t = np.arange(1, T)  # the last beta is clipped at 0.999
  np.testing.assert_allclose(s.alphas_cumprod[:-1], f(t) / f(0), rtol=1e-5)
  assert float(s.betas[-1]) == pytest.approx(0.999)


def test_posterior_variance_and_mean_closed_form():
  s = diffusion.make_schedule("linear", 100)
  b = np.asarray(s.betas, np.float64)
  ab = np.cumprod(1 - b)
  t = 7
  np.testing.assert_allclose(s.posterior_variance[t], b[t] * (1 - ab[t - 1]) / (1 - ab[t]),
                             rtol=1e-5)
  assert float(s.posterior_variance[0]) == 0.0
  # Posterior mean with x0 predicted from eps equals the DDPM eps-form mean.
  rng = np.random.default_rng(0)
  x_t, eps = rng.normal(size=(2, 4, 3)).astype(np.float32)
  x0 = diffusion.x0_from_eps(s, x_t, t, eps)
  mean = diffusion.q_posterior_mean(s, x0, x_t, t)
  expected = (x_t - b[t] / np.sqrt(1 - ab[t]) * eps) / np.sqrt(1 - b[t])
  np.testing.assert_allclose(mean, expected, rtol=1e-4, atol=1e-5)


def test_q_sample_and_x0_roundtrip_per_example_timesteps():
  s = diffusion.make_schedule("linear", 1000)
  rng = np.random.default_rng(1)
  x0 = rng.uniform(size=(3, 5)).astype(np.float32)
  eps = rng.normal(size=(3, 5)).astype(np.float32)
  i = jnp.array([0, 500, 999])
  x_t = diffusion.q_sample(s, x0, i, eps)
  ab = np.asarray(s.alphas_cumprod)[[0, 500, 999]][:, None]
  np.testing.assert_allclose(x_t, np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps, rtol=1e-5)
  np.testing.assert_allclose(diffusion.x0_from_eps(s, x_t, i, eps), x0, atol=2e-3)
  np.testing.assert_allclose(diffusion.eps_from_x0(s, x_t, i, x0), eps, atol=1e-4)


def test_v_parameterisation_closed_forms_and_roundtrip():
  s = diffusion.make_schedule("linear", 1000)
  rng = np.random.default_rng(2)
  x0 = rng.uniform(-1, 1, size=(3, 5)).astype(np.float32)
  eps = rng.normal(size=(3, 5)).astype(np.float32)
  i = jnp.array([0, 500, 999])
  ab = np.asarray(s.alphas_cumprod, np.float64)[[0, 500, 999]][:, None]
  v = diffusion.v_target(s, x0, i, eps)
  np.testing.assert_allclose(v, np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0, rtol=1e-5, atol=1e-6)
  x_t = diffusion.q_sample(s, x0, i, eps)
  # From x_t and the true v both x0 and eps come back; x0 without the 1 / sqrt(abar) blow-up
  # of the eps form (at t = 999 that factor is ~156).
  np.testing.assert_allclose(diffusion.x0_from_v(s, x_t, i, v), x0, atol=1e-5)
  np.testing.assert_allclose(diffusion.eps_from_v(s, x_t, i, v), eps, atol=1e-5)
  np.testing.assert_allclose(diffusion.eps_from_prediction(s, x_t, i, v, "v"), eps, atol=1e-5)
  assert diffusion.eps_from_prediction(s, x_t, i, eps, "eps") is eps
  # A v error of 0.1 moves x0 by at most 0.1, an eps error of 0.1 by 0.1 sqrt(1-ab)/sqrt(ab).
  dv = np.full_like(v, 0.1)
  assert np.max(np.abs(diffusion.x0_from_v(s, x_t, i, v + dv) - x0)) <= 0.1 + 1e-5
  assert np.max(np.abs(diffusion.x0_from_eps(s, x_t, i, eps + dv) - x0)) > 10.0
  with pytest.raises(ValueError, match="prediction"):
    diffusion.eps_from_prediction(s, x_t, i, v, "x1")


def test_ddpm_step_noise_scale_and_last_step_deterministic():
  s = diffusion.make_schedule("linear", 100)
  x_t = jnp.zeros((4,))
  eps = jnp.zeros((4,))
  noise = jnp.ones((4,))
  out = diffusion.ddpm_step(s, x_t, 5, eps, noise, variance="beta")
  np.testing.assert_allclose(out, np.sqrt(s.betas[5]), rtol=1e-6)
  out = diffusion.ddpm_step(s, x_t, 5, eps, noise, variance="posterior")
  np.testing.assert_allclose(out, np.sqrt(s.posterior_variance[5]), rtol=1e-6)
  assert np.all(np.asarray(diffusion.ddpm_step(s, x_t, 0, eps, noise)) == 0.0)


@pytest.mark.parametrize("num_steps,kind", [(1000, "uniform"), (50, "uniform"),
                                            (20, "quadratic")])
def test_ddim_eta0_with_true_eps_recovers_x0(num_steps, kind):
  sched = diffusion.make_respaced_schedule("linear", 1000, num_steps, kind)
  rng = np.random.default_rng(2)
  x0 = jnp.asarray(rng.uniform(-1, 1, size=(2, 8)).astype(np.float32))
  eps = jnp.asarray(rng.normal(size=(2, 8)).astype(np.float32))
  n = sched.num_steps
  x_T = diffusion.q_sample(sched, x0, n - 1, eps)

  # The exact eps for the current x_t: with eta = 0 every x_t stays on the same line.
  def eps_fn(x, i):
    return diffusion.eps_from_x0(sched, x, i, x0)

  out = diffusion.sample(sched, eps_fn, x_T, jax.random.key(0), method="ddim", eta=0.0)
  np.testing.assert_allclose(out, x0, atol=1e-4)


def test_respacing_preserves_marginals():
  base = diffusion.make_schedule("linear", 1000)
  sched = diffusion.make_respaced_schedule("linear", 1000, 25)
  ts = np.asarray(sched.timesteps)
  assert ts[0] == 0 and ts[-1] == 999 and len(ts) == 25
  np.testing.assert_allclose(sched.alphas_cumprod, np.asarray(base.alphas_cumprod)[ts],
                             rtol=1e-5)


def test_quadratic_respacing_is_denser_near_zero():
  ts = diffusion.respaced_timesteps(1000, 50, "quadratic")
  assert len(ts) == 50 and len(np.unique(ts)) == 50
  assert np.diff(ts)[0] < np.diff(ts)[-1]


def test_sampler_is_one_scan_and_does_not_grow_with_steps():
  def count(n):
    sched = diffusion.make_respaced_schedule("linear", 1000, n)
    f = lambda x, key: diffusion.sample(sched, lambda x, i: 0.1 * x, x, key)
    jaxpr = jax.make_jaxpr(f)(jnp.zeros((3,)), jax.random.key(0))
    prims = [e.primitive.name for e in jaxpr.jaxpr.eqns]
    return prims.count("scan"), len(prims)

  assert count(10) == count(1000)
  assert count(10)[0] == 1


def test_ddpm_sampling_of_gaussian_data_matches_target_moments():
  # Exact eps-predictor for x0 ~ N(mu, sd^2): eps = sqrt(1-ab)(x - sqrt(ab) mu)/(ab sd^2 + 1-ab).
  mu, sd = 0.7, 0.3
  sched = diffusion.make_schedule("linear", 200)

  def eps_fn(x, i):
    ab = sched.alphas_cumprod[i]
    return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * mu) / (ab * sd**2 + 1 - ab)

  key = jax.random.key(3)
  x_T = jax.random.normal(jax.random.key(4), (20000,))
  out = np.asarray(diffusion.sample(sched, eps_fn, x_T, key, method="ddpm",
                                    variance="posterior"))
  assert abs(out.mean() - mu) < 0.02 and abs(out.std() - sd) < 0.02


def test_timestep_embedding_layout():
  e = diffusion.timestep_embedding(jnp.array([0.0, 3.0]), 8)
  assert e.shape == (2, 8)
  np.testing.assert_allclose(e[0], [1, 1, 1, 1, 0, 0, 0, 0], atol=1e-7)
  freqs = np.exp(-np.log(1e4) * np.arange(4) / 4)
  np.testing.assert_allclose(e[1], np.concatenate([np.cos(3 * freqs), np.sin(3 * freqs)]),
                             rtol=1e-5, atol=1e-6)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="unknown schedule"):
    diffusion.make_schedule("sigmoid")
  with pytest.raises(ValueError, match="num_steps"):
    diffusion.respaced_timesteps(10, 11)
  with pytest.raises(ValueError, match="unknown sampler"):
    diffusion.reverse_step("euler", diffusion.make_schedule("linear", 100), jnp.zeros(2), 1,
                           jnp.zeros(2), jnp.zeros(2))
