"""SCDM cascade: band split per stage, stage conditions, normalisation, cascade sampling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hsijax import diffusion
from hsijax.scdm import cascade, sampler


def test_first_stage_counts_of_the_paper():
  assert cascade.first_stage_count(48) == 12    # 3 sqrt(16) = 12 exactly
  assert cascade.first_stage_count(102) == 17   # 3 sqrt(34) = 17.49
  assert cascade.first_stage_count(31) == 9     # 3 sqrt(10.33) = 9.64
  assert cascade.first_stage_count(3) == 3


def test_houston_two_stages_every_fourth_band():
  first, last = cascade.stage_band_indices(48, 2)
  np.testing.assert_array_equal(first, np.arange(0, 48, 4))
  assert len(first) == 12
  np.testing.assert_array_equal(last, np.arange(48))


def test_pavia_centre_two_stages_seventeen_bands():
  first, last = cascade.stage_band_indices(102, 2)
  assert len(first) == 17
  np.testing.assert_array_equal(first, np.arange(0, 102, 6))  # 102 / 17 = 6
  np.testing.assert_array_equal(last, np.arange(102))


@pytest.mark.parametrize("n", [48, 102, 31])
def test_one_and_three_stages(n):
  (only,) = cascade.stage_band_indices(n, 1)
  np.testing.assert_array_equal(only, np.arange(n))
  sets = cascade.stage_band_indices(n, 3)
  counts = [len(s) for s in sets]
  # Equal multipliers from the 3 RGB bands: n_k = floor(3 (N / 3)^(k / 3)).
  assert counts == [int(np.floor(3 * (n / 3) ** (k / 3) + 1e-9)) for k in (1, 2)] + [n]
  assert counts[0] < counts[1] < counts[2] == n
  for s in sets:
    assert np.all(np.diff(s) > 0) and s[0] == 0 and s[-1] < n
    # Equally spaced: the gaps differ by at most one band.
    if len(s) > 1:
      assert np.ptp(np.diff(s)) <= 1


def test_paper_three_stage_counts_are_nested_for_houston():
  sets = cascade.stage_band_indices(48, 3, counts=cascade.PAPER_STAGE_COUNTS[("houston", 3)])
  np.testing.assert_array_equal(sets[0], np.arange(0, 48, 4))
  np.testing.assert_array_equal(sets[1], np.arange(0, 48, 2))
  assert set(sets[0]) <= set(sets[1]) <= set(sets[2])
  pav = cascade.stage_band_indices(102, 3,
                                   counts=cascade.PAPER_STAGE_COUNTS[("pavia_centre", 3)])
  np.testing.assert_array_equal(pav[1], np.arange(0, 102, 3))


@pytest.mark.parametrize("counts, match", [((12, 40), "last stage"), ((24, 12, 48), "increasing"),
                                           ((12,), "one entry per stage")])
def test_bad_counts_raise(counts, match):
  with pytest.raises(ValueError, match=match):
    cascade.stage_band_indices(48, 2 if len(counts) != 3 else 3, counts=counts)


def test_rgb_and_stage_conditions():
  cube = np.arange(2 * 3 * 3 * 48, dtype=np.float32).reshape(2, 3, 3, 48)
  rgb = cascade.rgb_from_hsi(cube)
  np.testing.assert_array_equal(rgb, cube[..., [4, 11, 22]])
  with pytest.raises(ValueError, match="out of range"):
    cascade.rgb_from_hsi(cube[..., :20])
  prev = jnp.asarray(cube[..., ::4])
  np.testing.assert_array_equal(cascade.stage_condition(0, rgb, None), rgb)
  np.testing.assert_array_equal(cascade.stage_condition(1, rgb, prev), prev)
  both = cascade.stage_condition(1, rgb, prev, include_rgb=True)
  assert both.shape == (2, 3, 3, 15)
  np.testing.assert_array_equal(both[..., 12:], rgb)
  with pytest.raises(ValueError, match="previous"):
    cascade.stage_condition(1, rgb, None)
  assert cascade.condition_channels(0, [12, 48]) == 3
  assert cascade.condition_channels(1, [12, 48]) == 12
  assert cascade.condition_channels(1, [12, 48], include_rgb=True) == 15


def test_normaliser():
  norm = cascade.NORMALISERS["houston"]
  x = np.array([3693.0, 3693.0 + 7410.0])
  np.testing.assert_allclose(norm.encode(x), [0.0, 1.0])
  np.testing.assert_allclose(norm.decode(norm.encode(x)), x)
  cube = np.random.default_rng(0).normal(5.0, 2.0, size=(10, 10, 4))
  fitted = cascade.Normaliser.fit(cube)
  np.testing.assert_allclose(fitted.encode(cube).mean(), 0.0, atol=1e-6)
  np.testing.assert_allclose(fitted.encode(cube).std(), 1.0, atol=1e-6)
  per_band = cascade.Normaliser.fit(cube, per_band=True)
  np.testing.assert_allclose(per_band.encode(cube).std(axis=(0, 1)), 1.0, atol=1e-5)
  assert per_band.select([1, 3]).mean.shape == (2,)


class Fake:
  """eps = a x + b mean(cond) + t / 1000 for any number of channels."""

  def __init__(self, out_channels):
    self.out_channels = out_channels

  def apply(self, params, x, cond, t, train=False):
    p = params["params"]
    return p["a"] * x + p["b"] * cond.mean(-1, keepdims=True) + \
        t.astype(jnp.float32)[:, None, None, None] / 1000.0


def _fake_cascade(num_stages):
  counts = cascade.stage_counts(48, num_stages)
  models = [Fake(c) for c in counts]
  params = [{"a": jnp.float32(0.2 + 0.1 * k), "b": jnp.float32(0.5)} for k in range(num_stages)]
  settings = [dict(pdt_target="eps", pdt_p_T=0.9, guidance_scale=1.0 * k)
              for k in range(num_stages)]
  return counts, models, params, settings


def test_cascade_sampler_chains_stage_outputs():
  counts, models, params, settings = _fake_cascade(2)
  sched = diffusion.make_respaced_schedule("linear", 1000, 3)
  rgb = jax.random.normal(jax.random.key(0), (2, 4, 4, 3)) + 2.0
  key = jax.random.key(5)
  fn = sampler.make_cascade_sampler(models, [sched] * 2, settings, return_stages=True)
  outs = fn(params, rgb, key)
  assert [o.shape for o in outs] == [(2, 4, 4, 12), (2, 4, 4, 48)]
  # Reference: each stage alone, fed the previous stage's output, key fold_in(key, k).
  prev = rgb
  for k in range(2):
    s = sampler.make_sampler(models[k], sched, **settings[k])
    prev = s(params[k], prev, jax.random.fold_in(key, k))
    np.testing.assert_allclose(outs[k], prev, rtol=1e-5, atol=1e-5)
  assert sampler.cascade_num_steps([sched] * 2) == 6


@pytest.mark.parametrize("num_stages", [1, 3])
def test_cascade_sampler_one_and_three_stages(num_stages):
  counts, models, params, settings = _fake_cascade(num_stages)
  sched = diffusion.make_respaced_schedule("linear", 1000, 2)
  fn = sampler.make_cascade_sampler(models, [sched] * num_stages, settings)
  out = fn(params, jnp.ones((1, 4, 4, 3)), jax.random.key(0))
  assert out.shape == (1, 4, 4, 48) and np.all(np.isfinite(out))
  with pytest.raises(ValueError, match="parameter sets"):
    fn(params + params[:1], jnp.ones((1, 4, 4, 3)), jax.random.key(0))


def test_cascade_with_rgb_condition_has_more_channels():
  seen = {}

  class Spy(Fake):
    def apply(self, params, x, cond, t, train=False):
      seen[self.out_channels] = cond.shape[-1]
      return super().apply(params, x, cond, t)

  models = [Spy(12), Spy(48)]
  params = [{"a": jnp.float32(0.1), "b": jnp.float32(0.1)}] * 2
  sched = diffusion.make_respaced_schedule("linear", 1000, 2)
  fn = sampler.make_cascade_sampler(models, [sched] * 2, [{}, {}], include_rgb=True)
  out = fn(params, jnp.ones((1, 4, 4, 3)), jax.random.key(0))
  assert out.shape == (1, 4, 4, 48)
  assert seen == {12: 3, 48: 15}
