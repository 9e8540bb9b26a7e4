"""SCDM conditional U-Net: shapes, hand-counted parameters, the shared encoder."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hsijax.scdm import unet
from hsijax.scdm.unet import CondUNet, count_params

TINY = dict(base=8, channel_mults=(1, 2), num_res_down=1, num_res_up=2, attn_levels=(1,),
            groups=4, dropout=0.0)


def _init(model, n=2, hw=16, c_cond=3, seed=0):
  """The "params" collection (init_params: one random draw, fast to compile on CPU)."""
  return unet.init_params(model, jax.random.key(seed), (n, hw, hw, model.out_channels),
                          (n, hw, hw, c_cond))


# Parameter-count building blocks (flax and torch store the same numbers).
def conv(k, cin, cout):
  return k * k * cin * cout + cout


def dense(i, o):
  return i * o + o


def gn(c):
  return 2 * c


def attn(c):
  return gn(c) + dense(c, 3 * c) + dense(c, c)


def res(cin, cout, temb, with_attn=False):
  n = gn(cin) + conv(3, cin, cout) + dense(temb, cout) + gn(cout) + conv(3, cout, cout)
  if cin != cout:
    n += conv(1, cin, cout)
  return n + (attn(cout) if with_attn else 0)


def test_output_shape_three_levels():
  model = CondUNet(out_channels=5, base=8, channel_mults=(1, 2, 2), num_res_down=1,
                   num_res_up=2, attn_levels=(2,), groups=4)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 32, 32, 5)), jnp.float32)
  cond = jnp.asarray(rng.normal(size=(3, 32, 32, 3)), jnp.float32)
  params = {"params": _init(model, n=3, hw=32)}
  apply = jax.jit(model.apply, static_argnames="train")
  out = apply(params, x, cond, jnp.array([0, 5, 999]))
  assert out.shape == (3, 32, 32, 5)
  assert np.all(np.isfinite(out))
  # Train mode with dropout differs from eval mode (dropout is wired in). An RBG key keeps
  # the compile short on CPU (threefry compiles per dropout layer).
  out_train = apply(params, x, cond, jnp.array([0, 5, 999]), train=True,
                    rngs={"dropout": jax.random.key(1, impl="unsafe_rbg")})
  assert not np.allclose(out, out_train)


def test_param_count_by_hand_small_config():
  params = _init(CondUNet(out_channels=4, **TINY))
  # base 8, mults (1, 2): levels with 8 and 16 channels, temb 32, groups irrelevant.
  time = (8 * 32 + 32) + (32 * 32 + 32)                      # 288 + 1056
  first = (9 * 4 * 8 + 8) + (9 * 3 * 8 + 8)                  # conv_in 296 + cond_in 224
  # Encoder: level 0 ResBlock(8->8) = 16 + 584 + 264 + 16 + 584 = 1464, down conv 584;
  # level 1 ResBlock(8->16) = 16 + 1168 + 528 + 32 + 2320 + skip 144 = 4208, attn(16) =
  # 32 + 816 + 272 = 1120.
  encoder = 1464 + 584 + 4208 + 1120
  # Middle: ResBlock(16) 32 + 2320 + 528 + 32 + 2320 = 5232, attention 1120, ResBlock 5232.
  middle = 5232 + 1120 + 5232
  # Skips per stream: conv_in 8, res0 8, down 8, res1 16 (popped from the end).
  # Level 1: in 16 + 2*16 = 48 -> 16: 96 + 6928 + 528 + 32 + 2320 + 784 = 10688, + attn;
  #          in 16 + 2*8  = 32 -> 16: 64 + 4624 + 528 + 32 + 2320 + 528 = 8096, + attn;
  #          upsample conv 16 -> 16: 2320.
  # Level 0: in 16 + 2*8 = 32 -> 8: 64 + 2312 + 264 + 16 + 584 + 264 = 3504;
  #          in  8 + 2*8 = 24 -> 8: 48 + 1736 + 264 + 16 + 584 + 200 = 2848.
  decoder = 10688 + 1120 + 8096 + 1120 + 2320 + 3504 + 2848
  out = 16 + (9 * 8 * 4 + 4)                                 # norm_out, conv_out 292
  expected = time + first + encoder + middle + decoder + out
  assert expected == 50828
  assert count_params(params) == expected


def _derived_count(out_ch, cond_ch, base, mults, n_down, n_up, attn_levels, mid_attn):
  """Parameter count derived from the architecture description (SPEC section 4)."""
  temb = 4 * base
  total = dense(base, temb) + dense(temb, temb) + conv(3, out_ch, base) + conv(3, cond_ch, base)
  ch, skips = base, [base]
  for level, m in enumerate(mults):
    for _ in range(n_down):
      total += res(ch, base * m, temb, level in attn_levels)
      ch = base * m
      skips.append(ch)
    if level != len(mults) - 1:
      total += conv(3, ch, ch)
      skips.append(ch)
  total += res(ch, ch, temb, mid_attn) + res(ch, ch, temb)
  for level in reversed(range(len(mults))):
    for _ in range(n_up):
      s = skips.pop()
      total += res(ch + 2 * s, base * mults[level], temb, level in attn_levels)
      ch = base * mults[level]
    if level != 0:
      total += conv(3, ch, ch)
  assert not skips
  return total + gn(ch) + conv(3, ch, out_ch)


def test_derived_count_matches_small_config():
  assert _derived_count(4, 3, 8, (1, 2), 1, 2, (1,), True) == 50828


def test_paper_config_param_count_via_eval_shape():
  model = CondUNet(out_channels=12)  # paper defaults: stage 1 of Houston, RGB condition
  shapes = jax.eval_shape(
      model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 64, 64, 12), jnp.float32),
      jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
      jax.ShapeDtypeStruct((1,), jnp.int32))
  got = count_params(shapes["params"])
  want = _derived_count(12, 3, 128, (1, 2, 2, 2, 2, 2, 2), 2, 3, (3,), True)
  assert got == want
  assert 75e6 < got < 80e6  # 77.46 M: six 256-channel levels, decoder inputs up to 768 ch


def test_one_encoder_and_condition_branch_has_only_its_first_conv():
  params = _init(CondUNet(out_channels=4, **TINY))
  assert set(params) == {"time_embed", "conv_in", "cond_in", "encoder", "middle", "decoder",
                         "norm_out", "conv_out"}
  # Extra parameters of the condition branch = its first conv only: removing the condition
  # input changes the count by exactly cond_in's kernel and bias.
  assert count_params(params["cond_in"]) == conv(3, 3, 8)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  names = [jax.tree_util.keystr(p) for p, _ in flat]
  assert [n for n in names if "cond" in n] == ["['cond_in']['bias']", "['cond_in']['kernel']"]


def _manual_forward(p, model, x, cond, t, enc_x, enc_c):
  """Reference forward pass with two SEPARATE encoder calls (parameters enc_x / enc_c)."""
  kw = dict(base=model.base, channel_mults=model.channel_mults, attn_levels=model.attn_levels,
            dropout=0.0, groups=model.groups)
  temb = unet.TimeEmbedding(model.base).apply({"params": p["time_embed"]}, t)
  hx = nn.Conv(model.base, (3, 3)).apply({"params": p["conv_in"]}, x)
  hc = nn.Conv(model.base, (3, 3)).apply({"params": p["cond_in"]}, cond)
  enc = unet.Encoder(num_res_down=model.num_res_down, **kw)
  sx = enc.apply({"params": enc_x}, hx, temb, False)
  sc = enc.apply({"params": enc_c}, hc, temb, False)
  h = unet.Middle(model.groups, 0.0, model.mid_attn).apply(
      {"params": p["middle"]}, sx[-1], temb, False)
  h = unet.Decoder(num_res_up=model.num_res_up, **kw).apply(
      {"params": p["decoder"]}, h, sx, sc, temb, False)
  h = nn.silu(nn.GroupNorm(unet.group_count(h.shape[-1], model.groups), epsilon=1e-5).apply(
      {"params": p["norm_out"]}, h))
  return nn.Conv(model.out_channels, (3, 3)).apply({"params": p["conv_out"]}, h)


def test_shared_encoder_equals_two_calls_and_perturbation_reaches_both_streams():
  model = CondUNet(out_channels=4, **TINY)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 16, 16, 4)), jnp.float32)
  cond = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  t = jnp.array([10, 700])
  p = _init(model)
  out = model.apply({"params": p}, x, cond, t)
  ref = _manual_forward(p, model, x, cond, t, p["encoder"], p["encoder"])
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)

  # Perturb one encoder weight: the model's new output equals the reference with the
  # perturbation applied in BOTH streams, and differs from applying it to either one only.
  enc2 = jax.tree_util.tree_map(lambda a: a, p["encoder"])
  enc2["level0_res0"]["conv1"]["kernel"] = enc2["level0_res0"]["conv1"]["kernel"] + 0.2
  p2 = dict(p, encoder=enc2)
  out2 = model.apply({"params": p2}, x, cond, t)
  both = _manual_forward(p, model, x, cond, t, enc2, enc2)
  only_x = _manual_forward(p, model, x, cond, t, enc2, p["encoder"])
  only_c = _manual_forward(p, model, x, cond, t, p["encoder"], enc2)
  np.testing.assert_allclose(out2, both, rtol=1e-4, atol=1e-5)
  assert np.max(np.abs(out2 - only_x)) > 1e-3
  assert np.max(np.abs(out2 - only_c)) > 1e-3


def test_init_params_matches_flax_init_structure_and_distribution():
  model = CondUNet(out_channels=4, **TINY)
  ref = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 4)),
                       jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,), jnp.int32))["params"]
  p = _init(model)
  assert jax.tree_util.tree_structure(p) == jax.tree_util.tree_structure(ref)
  assert jax.tree_util.tree_map(lambda a: a.shape, p) == \
      jax.tree_util.tree_map(lambda a: a.shape, ref)
  # lecun_normal: std 1 / sqrt(fan_in), truncated at 2 / 0.8796 in units of that std.
  k = np.asarray(p["decoder"]["level1_res0"]["conv1"]["kernel"])  # (3, 3, 48, 16)
  fan_in = 9 * 48
  assert abs(k.std() * np.sqrt(fan_in) - 1.0) < 0.05
  assert np.abs(k).max() * np.sqrt(fan_in) <= 2.0 / 0.87962566103423978 + 1e-5
  np.testing.assert_array_equal(p["norm_out"]["scale"], 1.0)
  np.testing.assert_array_equal(p["conv_in"]["bias"], 0.0)
  # Different kernels are different draws; same key -> same parameters.
  assert not np.allclose(p["conv_in"]["kernel"][..., 0], p["conv_in"]["kernel"][..., 1])
  same = _init(model)
  np.testing.assert_array_equal(same["conv_out"]["kernel"], p["conv_out"]["kernel"])


def test_group_count_caps_to_divisor():
  assert unet.group_count(256, 32) == 32
  assert unet.group_count(24, 32) == 24
  assert unet.group_count(24, 16) == 12
  assert unet.group_count(7, 4) == 1


@pytest.mark.parametrize("kwargs, shape, match", [
    (dict(num_res_up=3), (1, 16, 16, 4), "num_res_up"),
    ({}, (1, 15, 15, 4), "divisible"),
    ({}, (1, 16, 16, 5), "out_channels"),
])
def test_bad_config_or_input_raises(kwargs, shape, match):
  model = CondUNet(out_channels=4, **dict(TINY, **kwargs))
  with pytest.raises(ValueError, match=match):
    model.init(jax.random.PRNGKey(0), jnp.zeros(shape), jnp.zeros(shape[:3] + (3,)),
               jnp.zeros((1,), jnp.int32))
