"""Benchmark presets for `launch.bench`.

Presets:
  cpu    every workload at sizes that finish in < 15 minutes on 2 CPU cores, JAX and the
         PyTorch eager reference side by side.
  gpu    the same workloads at paper scale (256 x 256 SDP scenes, the paper U-Net on 256 x 256
         crops, full 1000-step DDPM sampling) for an accelerator host.
  tiny   a minute-long smoke run (tests): small shapes, 2 repeats; DDIM (4 steps) runs in
         full, DDPM (1000 steps) is estimated.

Workloads (`workloads` is a comma-separated subset of these names):
  sdm_train            one spectral-model training step (batch 512, B = 103, Adam + EMA),
                       timed as blocks of `train_calls_per_repeat` back-to-back steps (as a
                       training loop runs them), the same for JAX and PyTorch.
  sdp_step_<S>         one SDP solver timestep (K Adam steps on X) on an S x S x 103 scene,
                       ratio 8, 15 x 15 PSF, 4 MSI bands: the library's jitted solver run for
                       sdp.steps = (n1, n2) outer steps; per step = (t(n2) - t(n1)) / (n2 - n1).
  scdm_<u>[_icmg]      one SCDM sampler step of U-Net <u> ("tiny" / "paper" / in the cpu
                       preset also "paper256"), without or with ICMG (conditional +
                       unconditional prediction from one call that runs the noisy
                       stream's encoder once, as in `scdm.sampler`), PDT on; timed like the
                       solver, the library sampler over scdm.steps = (n1, n2) steps
                       (scdm.unet_steps[<u>] when given).
  sample_<u>_<m>       full sampling with method m ("ddim": `sampling.ddim_steps` steps, "ddpm":
                       `sampling.ddpm_steps`), ICMG on; when the predicted time exceeds
                       `sampling.max_full_s` the total is estimated from the per-step time of
                       the matching scdm_<u>_icmg workload (marked "estimated": true).
  <name>@<precision>   any workload above at a matmul precision policy of hsijax.policy
                       ("float32", "tensorfloat32", "bfloat16"; e.g. sdm_train@bfloat16);
                       without a suffix `precision` applies. The SDP denoiser rounds its
                       matmul operands to bf16 under "bfloat16" (on every platform); other
                       models get jax.default_matmul_precision (no effect on CPU). The PyTorch
                       reference stays float32; such workloads are not checked against the
                       ratio targets.
Each workload is timed `repeats` times (median), or `workload_repeats[name]` times where the
preset sets a count of its own.

Launch commands (run from the repository root):
  python -m launch.bench --config=configs/bench.py:cpu --workdir=workdirs/bench
  python -m launch.bench --config=configs/bench.py:cpu --config.workloads=sdp_step_64,sdm_train \
      --workdir=workdirs/bench_sdp
  python -m launch.bench --config=configs/bench.py:gpu --config.torch=False \
      --workdir=workdirs/bench_gpu
  python -m launch.bench --config=configs/bench.py:cpu --config.torch=False \
      --config.workloads=sdm_train,sdm_train@bfloat16,sdp_step_64,sdp_step_64@bfloat16 \
      --workdir=workdirs/bench_bf16
"""
from __future__ import annotations

import ml_collections

PRESETS = ("cpu", "gpu", "tiny")


def _unet(base: int, mults: tuple, attn_levels: tuple, groups: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "base": base, "channel_mults": mults, "num_res_down": 2, "num_res_up": 3,
      "attn_levels": attn_levels, "mid_attn": True, "dropout": 0.1, "groups": groups})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Benchmark config for preset `arg` in PRESETS (default "cpu")."""
  preset = (arg or "cpu").strip()
  if preset not in PRESETS:
    raise ValueError(f"unknown bench preset {arg!r}; use one of {PRESETS}, e.g. "
                     "--config=configs/bench.py:cpu")
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seed = 0
  c.mesh = ml_collections.ConfigDict({"axes": ("data",), "shape": (-1,)})
  c.repeats = 7            # timed repeats per workload (median reported; JAX / PyTorch pairs)
  # Per-workload repeat counts (name without "@precision"). The two cheap workloads with 0.5
  # targets get 15 pairs (~1 s each): their median then rides out a slow phase of the VM
  # that covers a few pairs; a scdm_paper256 pair takes ~15 s, so 5 there (saves ~40 s).
  c.workload_repeats = ml_collections.ConfigDict(
      {"sdm_train": 15, "sdp_step_64": 15, "scdm_paper256": 5})
  c.warmup = 1             # untimed calls after compilation
  c.train_calls_per_repeat = 10  # sdm_train: back-to-back steps per timed repeat (both sides)
  c.torch = True           # also time the PyTorch eager reference when torch is installed
  # torch thread counts to try per workload (0 = os.cpu_count(), the cores XLA uses); the
  # fastest is timed. 1 guards against OpenMP slowdowns on a shared, oversubscribed CPU.
  c.torch_threads = (0, 1)
  c.matmul_n = 2048        # (n, n) @ (n, n) float32 for the machine's matmul peak
  # Matmul precision of workloads without an "@<precision>" suffix (hsijax.policy).
  c.precision = "default"
  c.workloads = ("sdm_train,sdp_step_64,sdp_step_128,scdm_tiny,scdm_tiny_icmg,scdm_paper,"
                 "scdm_paper_icmg,scdm_paper256,sample_tiny_ddim,sample_tiny_ddpm,"
                 "sample_paper_ddim,sample_paper_ddpm")

  c.sdp = ml_collections.ConfigDict()
  c.sdp.num_bands = 103
  c.sdp.msi_bands = 4
  c.sdp.ratio = 8
  c.sdp.psf_size = 15
  c.sdp.hidden = 512
  c.sdp.num_layers = 5
  c.sdp.time_dim = 64
  c.sdp.K = 3
  c.sdp.lam = 0.1
  c.sdp.gam = 1e-3
  c.sdp.lr = 1e-3
  # JAX per-step time = (time of a steps[1]-step solve - time of a steps[0]-step solve) /
  # (steps[1] - steps[0]): the marginal cost, free of per-call costs (see time_marginal).
  c.sdp.steps = (1, 3)
  c.sdp.train_batch = 512
  c.sdp.train_pixels = 4096  # pool of random "clean" pixels the batches are drawn from

  c.scdm = ml_collections.ConfigDict()
  c.scdm.out_channels = 48  # stage 2 of Houston: all 48 bands ...
  c.scdm.cond_channels = 12  # ... conditioned on the 12 first-stage bands
  c.scdm.guidance_scale = 1.0
  c.scdm.pdt_target = "eps"
  c.scdm.pdt_p_T = 0.88
  c.scdm.steps = (2, 6)  # sampler steps of the two timed JAX programs (marginal per step)
  paper_unet = _unet(128, (1, 2, 2, 2, 2, 2, 2), (3,), 32)
  c.scdm.unets = ml_collections.ConfigDict({
      "tiny": _unet(16, (1, 2, 2), (1,), 8),
      "paper": paper_unet,
      # The same U-Net on the paper's 256 x 256 crops (one step: ~3 s JAX, ~5 s PyTorch
      # here), so timed over (1, 2) steps and without ICMG in the cpu preset.
      "paper256": paper_unet,
  })
  c.scdm.sizes = ml_collections.ConfigDict({"tiny": 32, "paper": 64, "paper256": 256})  # H = W
  c.scdm.unet_steps = ml_collections.ConfigDict({"paper256": (1, 2)})
  c.scdm.batch = 1

  c.sampling = ml_collections.ConfigDict()
  c.sampling.ddim_steps = 50
  c.sampling.ddpm_steps = 1000
  # A full run happens when both frameworks' predicted times are below this; otherwise both
  # totals are estimated from the measured per-step times (keeps the cpu preset < 15 min).
  c.sampling.max_full_s = 45.0

  if preset == "gpu":
    c.torch = False
    c.workloads = c.workloads.replace("sdp_step_128,", "sdp_step_128,sdp_step_256,").replace(
        "scdm_paper256,", "")  # "paper" is the 256 x 256 one here
    c.sdp.steps = (2, 12)
    c.scdm.sizes = ml_collections.ConfigDict({"tiny": 64, "paper": 256, "paper256": 256})
    c.scdm.unet_steps = ml_collections.ConfigDict()
    c.scdm.steps = (5, 25)
    c.sampling.max_full_s = 3600.0
    c.repeats = 10
    c.workload_repeats = ml_collections.ConfigDict()
  elif preset == "tiny":
    c.repeats = 2
    c.workload_repeats = ml_collections.ConfigDict()
    c.train_calls_per_repeat = 2
    c.matmul_n = 256
    c.sdp.num_bands = 16
    c.sdp.hidden = 32
    c.sdp.ratio = 4
    c.sdp.psf_size = 7
    c.sdp.steps = (1, 2)
    c.sdp.train_batch = 64
    c.sdp.train_pixels = 256
    c.scdm.out_channels = 6
    c.scdm.cond_channels = 3
    c.scdm.steps = (1, 2)
    c.scdm.unets = ml_collections.ConfigDict({
        "tiny": _unet(8, (1, 2), (1,), 4),
        "paper": _unet(8, (1, 2), (), 4),
    })
    c.scdm.sizes = ml_collections.ConfigDict({"tiny": 8, "paper": 8})
    c.sampling.ddim_steps = 4
    c.sampling.max_full_s = 0.5  # DDIM (4 steps) runs in full, DDPM (1000) is estimated
    c.workloads = ("sdm_train,sdp_step_16,scdm_tiny,scdm_tiny_icmg,scdm_paper,scdm_paper_icmg,"
                   "sample_tiny_ddim,sample_tiny_ddpm,sample_paper_ddim,sample_paper_ddpm")
  return c
