"""SCDM conditional U-Net: shapes, hand-counted parameters, the shared encoder."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from hsijax.kernels import cpu_conv
from hsijax.policy import Policy
from hsijax.scdm import unet
from hsijax.scdm.unet import CondUNet, count_params

CPU, GPU = Policy.for_backend("cpu"), Policy.for_backend("gpu")
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
  """Parameter count derived from the architecture description (the SCDM paper, the authors' code)."""
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


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_with_uncond_equals_separate_conditional_and_unconditional_calls(backend):
  model = CondUNet(out_channels=4, policy=Policy.for_backend(backend), **TINY)
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(3, 16, 16, 4)), jnp.float32)
  cond = jnp.asarray(rng.normal(size=(3, 16, 16, 3)), jnp.float32)
  t = jnp.array([3, 400, 999])
  p = _init(model, n=3)
  pair = model.apply({"params": p}, x, cond, t, with_uncond=True)
  assert pair.shape == (6, 16, 16, 4)
  eps_c = model.apply({"params": p}, x, cond, t)
  eps_0 = model.apply({"params": p}, x, jnp.zeros_like(cond), t)
  np.testing.assert_allclose(pair[0::2], eps_c, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(pair[1::2], eps_0, rtol=1e-4, atol=1e-5)
  assert np.max(np.abs(eps_c - eps_0)) > 1e-3  # the two halves are not the same prediction
  with pytest.raises(ValueError, match="with_uncond=True is for sampling"):
    model.apply({"params": p}, x, cond, t, train=True, with_uncond=True,
                rngs={"dropout": jax.random.key(0)})


def test_interleave_of_k_arrays_round_trips_sample_major():
  a, b, c = (jnp.arange(6.0).reshape(2, 3) + 10 * j for j in range(3))
  abc = unet.interleave(a, b, c)
  np.testing.assert_array_equal(abc[:, 0], [0, 10, 20, 3, 13, 23])
  for got, want in zip(unet.deinterleave(abc, 3), (a, b, c)):
    np.testing.assert_array_equal(got, want)


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


def test_init_params_torch_scheme_is_pytorch_layer_defaults():
  """kernels and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)) of their layer (std 1/sqrt(3
  fan_in): sqrt(3) below flax's), GroupNorm scale 1 / bias 0, one draw per key."""
  model = CondUNet(out_channels=4, **TINY)
  p = unet.init_params(model, jax.random.key(0), (1, 16, 16, 4), (1, 16, 16, 3), "torch")
  flax_p = _init(model)
  assert jax.tree_util.tree_structure(p) == jax.tree_util.tree_structure(flax_p)
  layer = p["decoder"]["level1_res0"]["conv1"]
  fan_in = 9 * 48
  k, b = np.asarray(layer["kernel"]), np.asarray(layer["bias"])
  assert np.abs(k).max() <= 1 / np.sqrt(fan_in) + 1e-7 and np.abs(b).max() <= 1 / np.sqrt(fan_in)
  assert abs(k.std() * np.sqrt(3 * fan_in) - 1.0) < 0.05
  assert abs(np.asarray(flax_p["decoder"]["level1_res0"]["conv1"]["kernel"]).std()
             / k.std() - np.sqrt(3)) < 0.1
  assert np.abs(b).max() > 0.3 / np.sqrt(fan_in)  # biases drawn, not zero
  np.testing.assert_array_equal(p["norm_out"]["scale"], 1.0)
  np.testing.assert_array_equal(p["norm_out"]["bias"], 0.0)
  with pytest.raises(ValueError, match="unknown parameter init"):
    unet.init_params(model, jax.random.key(0), (1, 16, 16, 4), (1, 16, 16, 3), "kaiming")


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


# ----------------------------------------------------------------------------- Conv3x3


def _conv_case(seed, shape, c_out):
  """Random input `shape` (N, H, W, C_in), 3x3 kernel to c_out channels and bias."""
  rng = np.random.default_rng(seed)
  draw = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return draw(*shape), draw(3, 3, shape[-1], c_out), draw(c_out)


def _lax_conv(x, kernel, bias, stride):
  return lax.conv_general_dilated(x, kernel, (stride, stride), ((1, 1), (1, 1)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias


@pytest.mark.parametrize("hw, stride", [((1, 1), 1), ((2, 2), 1), ((3, 5), 1), ((8, 8), 1),
                                        ((2, 2), 2), ((3, 3), 2), ((4, 6), 2), ((1, 1), 2)])
def test_im2col_conv_equals_lax_conv(hw, stride):
  x, kernel, bias = _conv_case(5, (2, *hw, 6), 7)
  got = cpu_conv.im2col_conv(x, kernel, bias, stride)
  want = _lax_conv(x, kernel, bias, stride)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_im2col_conv_drops_only_padding_taps():
  # 1 x 1 map: only the centre tap sees data, so the result is x @ kernel[1, 1] + bias and
  # changing any other tap changes nothing.
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(3, 1, 1, 4)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(5,)), jnp.float32)
  np.testing.assert_allclose(cpu_conv.im2col_conv(x, kernel, bias)[:, 0, 0],
                             x[:, 0, 0] @ kernel[1, 1] + bias, rtol=1e-6, atol=1e-6)
  assert cpu_conv._conv_taps(1, 1, 1, 1, 3) == (1, 2)
  assert cpu_conv._conv_taps(2, 2, 1, 1, 3) == (0, 3)
  assert cpu_conv._conv_taps(2, 1, 2, 1, 3) == (1, 3)  # 2 -> 1 with stride 2: rows 0, 1 only


@pytest.mark.parametrize("hw", [(2, 2), (4, 6), (10, 8)])
def test_winograd_conv_equals_lax_conv(hw):
  x, kernel, bias = _conv_case(11, (2, *hw, 5), 7)
  got = cpu_conv.winograd_conv(x, cpu_conv.winograd_kernel(kernel), bias)
  np.testing.assert_allclose(got, _lax_conv(x, kernel, bias, 1), rtol=1e-5, atol=2e-5)


def test_winograd_kernel_is_g_k_gt_and_odd_maps_are_refused():
  rng = np.random.default_rng(12)
  kernel = rng.normal(size=(3, 3, 2, 3))
  g = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
  want = np.einsum("ra,abio,sb->rsio", g, kernel, g).reshape(16, 2, 3)
  np.testing.assert_allclose(cpu_conv.winograd_kernel(jnp.float32(kernel)), want, rtol=1e-6,
                             atol=1e-6)
  with pytest.raises(ValueError, match="even H and W"):
    cpu_conv.winograd_conv(jnp.zeros((1, 5, 4, 2)), jnp.zeros((16, 2, 3)), jnp.zeros(3))


def test_use_winograd_rule():
  assert cpu_conv.use_winograd((1, 32, 32, 768), 256)
  assert cpu_conv.use_winograd((2, 128, 128, 256), 256)
  assert not cpu_conv.use_winograd((2, 64, 64, 128), 128)      # 128 outputs: slower measured
  assert not cpu_conv.use_winograd((1, 256, 256, 256), 256)    # beyond 128 x 128
  assert not cpu_conv.use_winograd((1, 8, 8, 256), 256)        # im2col size
  assert not cpu_conv.use_winograd((1, 18, 15, 256), 256)      # odd width


def test_cached_winograd_kernels_give_the_same_outputs():
  # base 256 at 16 x 16: every stride-1 3x3 conv of the encoder and decoder runs by Winograd.
  model = CondUNet(out_channels=4, base=256, channel_mults=(1, 1), num_res_down=1,
                   num_res_up=2, attn_levels=(), groups=8, dropout=0.0, policy=CPU)
  rng = np.random.default_rng(13)
  x = jnp.asarray(rng.normal(size=(1, 16, 16, 4)), jnp.float32)
  cond = jnp.asarray(rng.normal(size=(1, 16, 16, 3)), jnp.float32)
  t = jnp.array([250])
  p = unet.init_params(model, jax.random.key(1), x.shape, cond.shape)
  cached = jax.jit(lambda p: cpu_conv.with_winograd_kernels(model, p, x.shape, cond.shape))(p)
  kernels = {jax.tree_util.keystr(path[:-1]): leaf for path, leaf in
             jax.tree_util.tree_flatten_with_path(cached)[0]
             if path[-1].key == "winograd_kernel"}
  # conv_in / cond_in map to 256 channels at 16 x 16 too; level-1 convs (8 x 8) use im2col.
  assert "['conv_in']" in kernels and "['encoder']['level0_res0']['conv1']" in kernels
  assert not any("level1" in k for k in kernels)
  np.testing.assert_allclose(kernels["['conv_in']"],
                             cpu_conv.winograd_kernel(p["conv_in"]["kernel"]), rtol=1e-6)
  apply = jax.jit(lambda p: model.apply({"params": p}, x, cond, t))
  plain = apply(p)
  np.testing.assert_allclose(apply(cached), plain, rtol=1e-5, atol=1e-5)
  xla = model.clone(policy=GPU)
  np.testing.assert_allclose(plain, xla.apply({"params": p}, x, cond, t), rtol=1e-4,
                             atol=1e-4)


@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (5, 4)])
def test_upsample_conv_equals_conv_of_nearest_upsample(hw):
  h, kernel, bias = _conv_case(10, (2, *hw, 5), 6)
  up = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
  want = _lax_conv(up, kernel, bias, 1)
  got = cpu_conv.upsample_conv(h, kernel, bias)
  assert got.shape == (2, 2 * hw[0], 2 * hw[1], 6)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("strides, hw", [(1, 16), (1, 4), (2, 16), (2, 4)])
def test_conv3x3_xla_is_nn_conv_and_cpu_agrees(strides, hw):
  """impl="xla" is nn.Conv bit for bit (same params); "cpu" agrees on both sides of the
  small-map threshold (16 x 16 = 256 pixels uses lax.conv, 4 x 4 the matmul)."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(2, hw, hw, 5)), jnp.float32)
  ref = nn.Conv(6, (3, 3), strides=(strides, strides), padding=((1, 1), (1, 1)))
  p = ref.init(jax.random.key(0), x)
  xla = unet.Conv3x3(6, strides, impl="xla")
  auto = unet.Conv3x3(6, strides, impl="cpu")
  p_new = xla.init(jax.random.key(0), x)
  # Same names, shapes and (same RNG path) values as nn.Conv: checkpoints are unchanged.
  assert jax.tree_util.tree_structure(p_new) == jax.tree_util.tree_structure(p)
  for a, b in zip(jax.tree_util.tree_leaves(p_new), jax.tree_util.tree_leaves(p)):
    np.testing.assert_array_equal(a, b)
  p = jax.tree_util.tree_map(lambda a: a + 0.1, p)  # non-zero bias
  want = ref.apply(p, x)
  np.testing.assert_array_equal(xla.apply(p, x), want)
  np.testing.assert_allclose(auto.apply(p, x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, groups", [((2, 4, 6, 12), 4), ((3, 5, 5, 8), 8),
                                           ((2, 7, 16), 4)])
def test_group_norm_matches_flax_group_norm(shape, groups):
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=shape) * 3 + 2, jnp.float32)  # offset: tests the mean
  ref = nn.GroupNorm(num_groups=groups, epsilon=1e-5)
  p = ref.init(jax.random.key(0), x)
  mine = cpu_conv.GroupNorm(groups)
  assert jax.tree_util.tree_map(jnp.shape, mine.init(jax.random.key(0), x)) == \
      jax.tree_util.tree_map(jnp.shape, p)
  p = {"params": {"scale": jnp.asarray(rng.normal(size=shape[-1]), jnp.float32),
                  "bias": jnp.asarray(rng.normal(size=shape[-1]), jnp.float32)}}
  np.testing.assert_allclose(mine.apply(p, x), ref.apply(p, x), rtol=1e-5, atol=1e-5)
  # Independent NumPy check: each sample's group has mean 0, variance 1 before the affine.
  xn = np.asarray(x, np.float64).reshape(shape[0], -1, groups, shape[-1] // groups)
  mu = xn.mean(axis=(1, 3), keepdims=True)
  z = ((xn - mu) / np.sqrt(xn.var(axis=(1, 3), keepdims=True) + 1e-5)).reshape(shape)
  want = z * np.asarray(p["params"]["scale"]) + np.asarray(p["params"]["bias"])
  np.testing.assert_allclose(mine.apply(p, x), want, rtol=1e-4, atol=1e-4)


def _count_convs(fn, *args):
  return sum(e.primitive.name == "conv_general_dilated"
             for e in jax.make_jaxpr(fn)(*args).eqns)


def test_cpu_policy_matches_gpu_policy_same_param_tree():
  # Three levels at 16 x 16: maps 16 (lax.conv), 8 and 4 (matmul: 3x3 convs, the 8 -> 4
  # downsample and the 4 -> 8 upsample conv).
  cfg = dict(TINY, channel_mults=(1, 2, 2), attn_levels=(2,))
  auto = CondUNet(out_channels=4, policy=CPU, **cfg)
  xla = CondUNet(out_channels=4, policy=GPU, **cfg)
  assert cpu_conv.SMALL_MAP_MAX_PIXELS < 16 * 16 and cpu_conv.SMALL_MAP_MAX_PIXELS >= 8 * 8
  shapes = [jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 16, 16, 4)),
                           jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,), jnp.int32))
            for m in (auto, xla)]
  assert jax.tree_util.tree_structure(shapes[0]) == jax.tree_util.tree_structure(shapes[1])
  assert jax.tree_util.tree_map(lambda a: a.shape, shapes[0]) == \
      jax.tree_util.tree_map(lambda a: a.shape, shapes[1])
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(2, 16, 16, 4)), jnp.float32)
  cond = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  t = jnp.array([3, 900])
  p = {"params": _init(auto, hw=16)}
  p = jax.tree_util.tree_map(lambda a: a + 0.05, p)  # non-zero biases and GroupNorm shifts
  out_auto = jax.jit(auto.apply)(p, x, cond, t)
  out_xla = jax.jit(xla.apply)(p, x, cond, t)
  np.testing.assert_allclose(out_auto, out_xla, rtol=1e-4, atol=1e-5)
  assert np.std(out_xla) > 0.1  # a real signal, not a near-zero output
  # The CPU policy really takes the matmul path on the small maps: fewer convolutions.
  n_auto = _count_convs(lambda p: auto.apply(p, x, cond, t), p)
  n_xla = _count_convs(lambda p: xla.apply(p, x, cond, t), p)
  assert n_auto < n_xla


def test_gpu_policy_runs_every_3x3_kernel_as_a_native_convolution():
  # Acceptance (accelerator path traced on CPU): under the GPU policy every 3 x 3 U-Net
  # kernel is one conv_general_dilated (none by im2col / phase / Winograd rewrites).
  model = CondUNet(out_channels=4, policy=GPU, **dict(TINY, channel_mults=(1, 2, 2)))
  x, cond, t = jnp.zeros((1, 16, 16, 4)), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,), int)
  p = {"params": _init(model, hw=16)}
  kernels3 = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(p)[0]
              if path[-1].key == "kernel" and leaf.shape[:2] == (3, 3)]
  jaxpr = jax.make_jaxpr(lambda p: model.apply(p, x, cond, t))(p)
  convs = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "conv_general_dilated"]
  windows = [e.invars[1].aval.shape[:2] for e in convs]
  # conv_in, cond_in (applied once) and every other 3x3 kernel: one native conv each.
  assert windows.count((3, 3)) == len(kernels3)
  with pytest.raises(ValueError, match="conv_impl"):
    Policy(conv_impl="cudnn")


def _all_eqns(jaxpr):
  for e in jaxpr.eqns:
    yield e
    for sub in jax.core.subjaxprs(e) if hasattr(jax.core, "subjaxprs") else ():
      yield from _all_eqns(sub)


@pytest.mark.slow
def test_paper_unet_auto_matches_xla_at_64():
  """The paper U-Net at 64 x 64 (maps 64 ... 1): both conv implementations agree."""
  models = [CondUNet(out_channels=48, policy=p) for p in (CPU, GPU)]
  p = {"params": unet.init_params(models[0], jax.random.key(0), (1, 64, 64, 48),
                                  (1, 64, 64, 12))}
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.normal(size=(1, 64, 64, 48)), jnp.float32)
  cond = jnp.asarray(rng.normal(size=(1, 64, 64, 12)), jnp.float32)
  outs = [jax.jit(m.apply)(p, x, cond, jnp.array([500])) for m in models]
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=2e-5)
