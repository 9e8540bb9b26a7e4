"""Tests for benchmarks.harness (FLOP counters, timing harness), benchmarks.workloads and
launch.bench (bench.json)."""
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import harness as bm


def test_denoiser_flops_hand_count():
  # B = 103, H = 512, L = 5: layer 0 is 103 -> 512, layers 1-3 are (512 + 103) -> 512,
  # layer 4 is (512 + 103) -> 103; 2 FLOPs per multiply-add.
  hand = 2 * 103 * 512 + 3 * 2 * 615 * 512 + 2 * 615 * 103
  assert hand == 2_121_442
  assert bm.denoiser_flops(103).matmul == hand
  # Time condition once per call: 64 -> B, B -> B, and 4 condition layers B -> H.
  assert bm.denoiser_time_flops(103).matmul == 2 * (64 * 103 + 103 * 103 + 4 * 103 * 512)
  # Two layers: input and output only.
  assert bm.denoiser_flops(7, hidden=5, num_layers=2).matmul == 2 * 7 * 5 + 2 * 12 * 7


def test_denoiser_flops_match_jaxpr_and_param_count():
  from hsijax.sdp.denoiser import SpectralDenoiser, count_params
  B, H, N = 12, 32, 40
  model = SpectralDenoiser(B, hidden=H)
  x = jnp.ones((N, B))
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, 3)  # shapes suffice
  counted = bm.jaxpr_flops(lambda p, x: model.apply(p, x, 3), params, x)
  expect = N * bm.denoiser_flops(B, H).matmul + bm.denoiser_time_flops(B, H).matmul
  assert counted == expect
  assert bm.sdp_param_count(B, H) == count_params(params)


def test_sdp_train_step_flops_match_jaxpr():
  from hsijax import diffusion
  from hsijax.sdp import train as sdp_train
  from hsijax.sdp.denoiser import SpectralDenoiser
  B, H, N = 10, 24, 16
  model = SpectralDenoiser(B, hidden=H)
  opt = sdp_train.make_optimizer()
  state = jax.eval_shape(lambda k: sdp_train.init_train_state(model, k, opt),
                         jax.random.PRNGKey(0))
  step = sdp_train.make_train_step(model, diffusion.make_schedule("linear", 100), opt)
  counted = bm.jaxpr_flops(step, state, jax.ShapeDtypeStruct((N, B), jnp.float32),
                          jax.random.PRNGKey(1))
  analytic = bm.sdp_train_step_flops(N, B, H).matmul
  assert counted == pytest.approx(analytic, rel=1e-9)


def test_jaxpr_flops_scan_and_conv():
  a = jnp.ones((8, 6))
  b = jnp.ones((6, 5))
  assert bm.jaxpr_flops(lambda a, b: a @ b, a, b) == 2 * 8 * 6 * 5

  def looped(a, c):
    return jax.lax.scan(lambda h, _: (h @ c, None), a, None, length=7)[0]
  c = jnp.ones((6, 6))
  assert bm.jaxpr_flops(looped, a, c) == 7 * 2 * 8 * 6 * 6

  # Depthwise 3x3 conv, stride 2, 4 channels on 10 x 10: 5 x 5 outputs x 4 x 9 MACs.
  x = jnp.ones((1, 10, 10, 4))
  w = jnp.ones((3, 3, 1, 4))
  conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=4)
  assert bm.jaxpr_flops(conv, x, w) == 2 * 25 * 4 * 9
  # jax.grad = the forward conv + the input gradient, a transposed conv (input dilated by
  # the stride) doing the same useful multiply-adds as the forward.
  grad = jax.grad(lambda x: conv(x, w).sum())
  assert bm.jaxpr_flops(grad, x) == 2 * (2 * 25 * 4 * 9)


def test_xla_flops_of_matmul():
  a = jnp.ones((32, 16))
  b = jnp.ones((16, 8))
  compiled, lower_s, compile_s = bm.compile_fn(lambda a, b: a @ b, a, b)
  assert lower_s >= 0 and compile_s >= 0
  flops = bm.xla_flops(compiled)
  if flops is not None:  # cost analysis is backend-dependent
    assert flops == pytest.approx(2 * 32 * 16 * 8, rel=0.01)


def test_time_fn_fields():
  a = jnp.arange(64.0).reshape(8, 8)
  calls = []
  r = bm.time_fn(lambda a: jnp.tanh(a @ a), a, repeats=5, warmup=2,
                 companion=lambda: calls.append(1))
  assert len(calls) == 5 and len(r["companion_times"]) == 5
  assert r["compile_s"] >= 0 and r["lower_s"] >= 0
  assert len(r["times"]) == 5 and all(t > 0 for t in r["times"])
  assert r["step_s"] == np.median(r["times"])
  assert r["memory"] is None or r["memory"]["peak"] >= 2 * 8 * 8 * 4
  with pytest.raises(ValueError, match="repeats"):
    bm.time_fn(lambda a: a, a, repeats=0)


def test_time_marginal_fields():
  def looped(n):
    return lambda a: jax.lax.fori_loop(0, n, lambda i, x: jnp.tanh(x @ a), a)
  a = jnp.eye(16) * 0.5
  r = bm.time_marginal(looped(2), looped(5), a, steps=(2, 5), repeats=3, warmup=1)
  assert r["step_s"] == np.median(r["times"]) and len(r["times"]) == 3
  assert set(r["call_times"]) == {"2", "5"} and len(r["call_times"]["5"]) == 3
  marg = [(b - s) / 3 for s, b in zip(r["call_times"]["2"], r["call_times"]["5"])]
  # A tiny loop body can be below call-to-call jitter: then the documented fallback (long
  # call / its step count, an upper bound) replaces the non-positive marginal times.
  assert r["marginal_fallback"] == (np.median(marg) <= 0)
  expected = [b / 5 for b in r["call_times"]["5"]] if r["marginal_fallback"] else marg
  np.testing.assert_allclose(r["times"], expected)
  assert r["compile_s"] >= 0
  with pytest.raises(ValueError, match="short"):
    bm.time_marginal(looped(2), looped(2), a, steps=(2, 2))


def test_peak_fraction():
  # 10 GFLOP in 0.5 s (20 GFLOP/s) next to a 4 GFLOP matmul in 0.1 s (40 GFLOP/s): 0.5.
  assert bm.peak_fraction(10e9, [0.5, 0.5, 1.0], [0.1, 0.1, 0.1], 4e9) == pytest.approx(0.5)
  assert bm.peak_fraction(10e9, [0.5], [], 4e9) is None


def test_time_torch_fields():
  calls = []
  r = bm.time_torch(lambda: calls.append(1), repeats=4, warmup=3)
  assert len(calls) == 7
  assert r["step_s"] == np.median(r["times"]) and r["compile_s"] == 0.0


def test_rss_monitor_sees_allocation():
  if bm.current_rss_bytes() is None:
    pytest.skip("no /proc/self/statm on this platform")
  with bm.RSSMonitor(interval_s=0.001) as mon:
    big = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    big += 1.0
    import time
    time.sleep(0.05)
  assert mon.delta_bytes >= 32 * 2**20
  assert mon.as_dict()["max_rss_process"] >= mon.peak_bytes // 2
  del big


def test_solver_step_flops_scale():
  base = bm.sdp_solver_step_flops(64, 64, 103, 4, 15, 8, K=3)
  big = bm.sdp_solver_step_flops(128, 128, 103, 4, 15, 8, K=3)
  # Dominated by the per-pixel network: 4x the pixels is ~4x the work.
  assert big.matmul / base.matmul == pytest.approx(4.0, rel=1e-3)
  # K x (forward + input gradient) of the denoiser is the bulk of the matmul FLOPs.
  net = 3 * 2 * 64 * 64 * bm.denoiser_flops(103).matmul
  assert 0.95 < net / base.matmul < 1.0
  with pytest.raises(ValueError, match="ratio"):
    bm.sdp_solver_step_flops(60, 60, 103, 4, 15, 8)


def test_bench_config_presets():
  from configs import bench as bench_cfg
  for p in bench_cfg.PRESETS:
    c = bench_cfg.get_config(p)
    assert c.repeats >= 1 and c.workloads
  cpu = bench_cfg.get_config("cpu")
  # The protocol: medians of at least 5 repeats, per-workload overrides included.
  assert min([cpu.repeats, *cpu.workload_repeats.values()]) >= 5
  with pytest.raises(ValueError, match="preset"):
    bench_cfg.get_config("nope")


def test_split_precision():
  from benchmarks import workloads as bench
  assert bench.split_precision("sdm_train") == ("sdm_train", "default")
  assert bench.split_precision("sdm_train", "float32") == ("sdm_train", "float32")
  assert bench.split_precision("sdp_step_64@bfloat16") == ("sdp_step_64", "bfloat16")
  with pytest.raises(ValueError, match="precision"):
    bench.split_precision("sdm_train@fp8")
  from configs import bench as bench_cfg
  assert bench_cfg.get_config("cpu").precision == "default"


STEP_KEYS = {"shape", "flops_per_step", "jax", "torch", "ratio_jax_over_torch"}
JAX_KEYS = {"compile_s", "step_s", "times", "gflops", "fraction_of_matmul_peak", "memory"}


def _run_bench(tmp_path, workloads, torch_on, workload_repeats=None):
  from configs import bench as bench_cfg
  from launch import bench
  config = bench_cfg.get_config("tiny")
  config.workloads = workloads
  config.repeats = 1
  config.warmup = 0
  config.torch = torch_on
  config.workload_repeats = workload_repeats or {}
  record = bench.run(config, str(tmp_path))
  on_disk = json.loads((tmp_path / "bench.json").read_text())
  return config, record, on_disk


def test_bench_json_has_every_workload(tmp_path):
  torch_on = True
  try:
    import torch  # noqa: F401
  except ImportError:
    torch_on = False
  names = ["sdm_train", "sdp_step_16", "scdm_tiny_icmg", "sample_tiny_ddpm",
           "sdm_train@bfloat16"]
  config, record, on_disk = _run_bench(tmp_path, ",".join(names), torch_on,
                                       workload_repeats={"scdm_tiny_icmg": 2})
  assert list(on_disk["workloads"]) == names
  # `repeats` everywhere except the workload with its own count.
  assert [len(on_disk["workloads"][n]["jax"]["times"]) for n in names[:3]] == [1, 1, 2]
  if torch_on:
    assert len(on_disk["workloads"]["scdm_tiny_icmg"]["torch"]["times"]) == 2
  assert on_disk["matmul_peak"]["jax"]["gflops"] > 0
  for name in names[:3]:
    w = on_disk["workloads"][name]
    assert STEP_KEYS <= set(w), name
    assert JAX_KEYS <= set(w["jax"]), name
    assert w["jax"]["compile_s"] >= 0 and w["jax"]["step_s"] > 0
    assert w["flops_per_step"]["used"] > 0
    # The jaxpr and analytic FLOP counts describe the same program.
    assert w["flops_per_step"]["jaxpr"] == pytest.approx(
        w["flops_per_step"].get("analytic_matmul", w["flops_per_step"]["analytic"]), rel=0.02)
    if torch_on:
      assert w["torch"]["step_s"] > 0
      # Timed in pairs: the median of the per-pair ratios.
      assert w["ratio_jax_over_torch"] == pytest.approx(
          np.median(np.divide(w["jax"]["times"], w["torch"]["times"])))
  # DDPM with 1000 steps is over tiny's max_full_s: estimated from the step time.
  s = on_disk["workloads"]["sample_tiny_ddpm"]
  assert s["jax"]["estimated"] and s["jax"]["total_s"] == pytest.approx(
      1000 * on_disk["workloads"]["scdm_tiny_icmg"]["jax"]["step_s"])
  assert "targets" in on_disk and "sdp_step_16" in on_disk["targets"]
  # The bf16 variant: same FLOP count, its own timing, recorded precision, no target check.
  w16, w32 = on_disk["workloads"]["sdm_train@bfloat16"], on_disk["workloads"]["sdm_train"]
  assert w16["precision"] == "bfloat16" and w32["precision"] == "default"
  assert w16["flops_per_step"]["jaxpr"] == w32["flops_per_step"]["jaxpr"]
  assert w16["jax"]["step_s"] > 0 and "sdm_train@bfloat16" not in on_disk["targets"]
  text = __import__("benchmarks.report", fromlist=["format_table"]).format_table(record)
  assert all(n in text for n in names)


@pytest.mark.slow
def test_bench_tiny_preset_all_workloads(tmp_path):
  from configs import bench as bench_cfg
  names = bench_cfg.get_config("tiny").workloads.split(",")
  _, _, on_disk = _run_bench(tmp_path, bench_cfg.get_config("tiny").workloads, False)
  assert list(on_disk["workloads"]) == names


def test_calls_per_repeat_times_blocks_and_reports_per_call():
  calls = []

  def call():
    calls.append(1)
    time.sleep(0.01)

  r = bm._timed_repeats(call, repeats=2, warmup=1, calls_per_repeat=3)
  assert len(calls) == 1 + 2 * 3 and len(r["times"]) == len(r["cpu"]) == 2
  assert r["companion"] == [] and r["partner_times"] == []
  # Per call, not per block: each call sleeps 10 ms.
  assert all(0.009 < t < 0.03 for t in r["times"])
  with pytest.raises(ValueError, match="calls_per_repeat"):
    bm._timed_repeats(call, repeats=1, warmup=0, calls_per_repeat=0)


def test_torch_partner_runs_as_many_steps_as_jax_per_repeat():
  pytest.importorskip("torch")
  import ml_collections
  from benchmarks import workloads as bench
  config = ml_collections.ConfigDict({"repeats": 2, "warmup": 0, "torch_threads": (1,)})
  steps = []

  def torch_step():
    steps.append(1)
    time.sleep(0.004)

  f = jax.jit(lambda a: a * 2.0)
  jax_r, torch_r = bench._time_with_torch(
      lambda partner: bench._time_jax(f, jnp.ones(4), config=config, calls_per_repeat=3,
                                      partner=partner), torch_step, config=config)
  # One probe call (a single thread candidate: no probe warm-up), then 3 steps per repeat.
  assert len(steps) == 1 + 2 * 3
  assert len(torch_r["times"]) == len(jax_r["times"]) == 2
  assert all(0.004 <= t < 0.05 for t in torch_r["times"])  # seconds per step
  assert torch_r["step_s"] == pytest.approx(np.median(torch_r["times"]))


def test_partner_is_timed_right_after_each_repeat_and_paired():
  order = []

  def call():
    order.append("a")
    time.sleep(0.01)

  def partner():
    order.append("b")
    time.sleep(0.03)

  r = bm._timed_repeats(call, repeats=3, warmup=1, partner=partner, calls_per_repeat=2,
                        companion=lambda: order.append("c"))
  # warm-up of the main call only, then per repeat: main block, partner block, companion.
  assert order == ["a"] + ["a", "a", "b", "b", "c"] * 3
  assert all(0.025 < t < 0.06 for t in r["partner_times"])
  ratio = bm.paired_ratio(r["times"], r["partner_times"])
  assert 0.15 < ratio < 0.5  # 10 ms vs 30 ms per call
  # Pairing cancels a slowdown that hits both members of a pair alike, a ratio of
  # medians does not.
  a, b = [1.0, 2.0, 4.0], [2.0, 4.0, 8.0]
  assert bm.paired_ratio(a, b) == 0.5
  assert bm.paired_ratio([1.0, 4.0, 4.0], [2.0, 2.0, 8.0]) == 0.5
  assert float(np.median([1.0, 4.0, 4.0]) / np.median([2.0, 2.0, 8.0])) == 2.0


def test_time_marginal_partner_record():
  a = jnp.ones((16, 16))

  def looped(n):
    return jax.jit(lambda a: jax.lax.fori_loop(0, n, lambda i, x: jnp.tanh(x @ x), a))

  calls = []
  r = bm.time_marginal(looped(1), looped(3), a, steps=(1, 3), repeats=3, warmup=1,
                       partner=lambda: (calls.append(1), time.sleep(0.02)))
  assert len(calls) == 3  # one partner call per repeat, none during warm-up
  p = r["partner"]
  assert p["paired"] and len(p["times"]) == len(p["cpu_times"]) == 3
  assert all(0.018 < t < 0.06 for t in p["times"])
  assert p["step_s"] == pytest.approx(float(np.median(p["times"])))


@pytest.mark.slow  # ~2.5 min on 2 CPU cores: every code path of the GPU check, small shapes
def test_gpu_check_dry_run_on_cpu(tmp_path):
  from benchmarks import gpu_check
  record = gpu_check.main(["--workdir", str(tmp_path), "--size", "small"])
  assert set(record["checks"]) == {"solver_step", "unet_forward", "train_step_loss",
                                   "train_step_weights"}
  # On CPU both sides are the same computation: exact agreement.
  assert all(v["rel_error"] == 0.0 and v["pass"] for v in record["checks"].values())
  assert set(record["timings"]) == {"sdp_step_256", "sdp_solve_256", "sdm_train_step",
                                    "unet_step_256", "cascade_ddim50"}
  assert all(v["s"] > 0 for v in record["timings"].values())
  assert (tmp_path / "gpu_check.json").is_file() and "| solver_step |" in \
      (tmp_path / "gpu_check.md").read_text()
