"""SCDM (RGB -> HSI by a spectral cascade of conditional diffusion models): presets.

`get_config(arg)` takes a comma-separated option string: one preset plus optional modifiers,
e.g. "tiny", "paper_houston", "tiny,stages=1".

Presets:
  paper_houston       IEEE GRSS DFC 2018 Houston as in the paper: N = 48 bands, 2 stages
                      (12 then 48 bands), U-Net base 128, mults (1, 2, 2, 2, 2, 2, 2), 256 x 256
                      crops, batch 4, 100k steps, Adam lr 1e-4, EMA 0.9999 after 2k steps, L1 +
                      SAM loss (weight 1), condition dropped with p = 0.1. Sampling: T = 1000
                      DDPM; stage 1 PDT (p_T 0.96), no guidance; stage 2 PDT (p_T 0.88) + ICMG.
                      Normalisation (x - 3693) / 7410 (the authors' code).
  paper_pavia_centre  Pavia Centre: N = 102 (17 then 102 bands), PDT p_T 0.97 / 0.90,
                      normalisation mean / std measured on the training data.
  tiny                CPU-sized (the acceptance run of launch.evaluate_scdm): a RESIDUAL
                      cascade (beyond the paper, hsijax.scdm.residual). Stage 1 makes the
                      floor(sqrt(3 N)) bands of eq. 12 as the per-pixel affine least-squares
                      map from RGB plus a U-Net's x0-predicted residual (normalised by its
                      per-band std); stage 2 is the affine map from stage 1's bands + RGB
                      alone (estimate only, no U-Net); the RGB input bands are returned
                      exactly. U-Net base 96, mults (1, 1, 1), one ResBlock down / two up,
                      8 x 8 crops, batch 8, 3000 steps, lr 1e-3 cosine-decayed, L1 + SAM loss
                      (SAM in data units); DDIM with 3 respaced steps of T = 1000, 8 x 8 tiles
                      overlapping by 4, no PDT / ICMG; per-band normalisation from the data.
Modifiers:
  stages=1|2|3        number of cascade stages (default 2, the paper's best). One stage makes
                      all N bands straight from RGB. S stages make floor(3 (N/3)^(k/S)) bands
                      at stage k = 1..S (eq. 12 generalised): Houston 12 -> 48 for S = 2 and
                      7 -> 19 -> 48 for S = 3. The paper's 3-stage ablation used 12 -> 24 -> 48
                      (Houston) and 12 -> 34 -> 102 (Pavia Centre): the paper presets with
                      stages=3 set `stage_counts` to those; override with
                      --config.stage_counts="(12,24,48)".
  authors             the authors' code instead of the paper's text where they differ: PDT
                      on x_t with p_T 0.96 and ICMG scale 2.5 in every stage, and PyTorch's
                      layer initialisation (train.param_init = "torch"); e.g.
                      "paper_houston,authors". The paper-text settings stay the default.

ICMG scale of stage 2: the paper gives s = 2.5 for a guided first stage and only says "lower"
for the second; its best setting guides only stage 2. We use s = 1.0 there
(`eps_hat = eps_c + 1.0 * (eps_c - eps_0)`, i.e. twice the conditional direction); override with
`--config.stages[1].guidance_scale=...`.

Why the tiny preset looks like this (Houston quadrant experiment, Pavia Centre and Samson
checks, 2 shared CPU cores; numbers and dates in docs/scdm_results.md):
  * residual of an affine estimate: the network only adds what a per-pixel affine map cannot
    explain, and a network that learned nothing returns the linear map. On Houston (45
    generated bands) it gave +4.6 dB over the same x0-model diffusing the bands themselves
    (evaluate_scdm, 2026-12-07: residual 1 stage 35.70 dB vs plain 1 stage 31.08 dB).
  * prediction "x0" (not the paper's eps, not "v"): with eps or v the network has to pass
    x_t through to its output at small t (through the final GroupNorm + SiLU); a tiny U-Net
    does not learn that in a few thousand steps. Overfitting ONE 32 x 32 image: 28.6 dB (v)
    vs 43.2 dB (x0) after the same steps; on Houston x0 >> v >> eps.
  * stage 2 = its affine estimate alone: from the ~14 stage-1 bands + RGB the affine
    residual is <= 0.1 band std; a U-Net there gave +0.2 dB on Houston and -0.3 dB on Pavia
    Centre for twice the training time.
  * SAM term in data units (train.sam_space = "data"): in per-band normalised units it is
    the angle between mean-removed spectra, ill-defined for average pixels.
  * DDIM with 3 steps: 1 step (the t = T regression) was far worse, 3-5 best, 10-50 slightly
    worse; no PDT / ICMG (they did not help the x0 residual model).
  * 8 x 8 crops, batch 8: 16 x 16 crops at batch 2 (the same pixels per step) were 1.2 dB
    worse; 8 x 8 sampling tiles (GroupNorm sees the statistics it trained on).
  * lr 1e-3 with cosine decay to 1e-5 (short runs), EMA 0.995 from step 500.
  * flax's initialisation, not PyTorch's (train.param_init = "torch", the authors' layers):
    on the Houston one-stage residual model the two were within 0.13 dB MPSNR and 0.1 deg
    SAM after the same 3000 steps (research run, 2026-12-07), so the default stays.

Fields read by the launch scripts:
  seed, mesh                  as in every hsijax config.
  stage                       "all" | "0" | "1" | "2": which stage(s) `train_scdm` trains.
  stage_counts                bands made by each stage (empty = the floor(3 (N/3)^(k/S)) rule).
  stages[k]                   per-stage sampling settings: guidance_scale (0 = no ICMG),
                              pdt_target ("eps" = paper, "x" = authors' code, "none" = off),
                              pdt_p_T (percentile at t = T; 1.0 = no truncation).
  data.path / data.key        training cube FILE[:KEY] (H, W, N) in original units.
  data.rgb                    sampling input FILE[:KEY] (H, W, 3); "" = the RGB bands
                              `data.rgb_bands` of the cube at data.path (test quadrant if split).
  data.reference              optional reference FILE[:KEY] (H, W, N) for metrics; with
                              split="quadrant" and no rgb/reference, the held-out quadrant is it.
  data.split                  "none" (train on the whole cube) | "quadrant" (train on three
                              quadrants, hold out `data.test_quadrant`: 0 TL, 1 TR, 2 BL, 3 BR).
  data.norm_mean / norm_std   scalar normalisation (x - mean) / std; None = from training data.
  data.norm_per_band          measure mean / std per band instead (tiny preset).
  model.prediction            "eps" (paper) | "v" | "x0" (tiny preset).
  model.residual              each stage diffuses the residual of a per-pixel affine estimate
                              fitted on the training data (hsijax.scdm.residual; tiny preset).
  model.estimate_only         residual stages without a U-Net (tiny preset: (1,)).
  train.sam_space             "normalised" (paper presets) | "data" (tiny preset).
  eval_models                 launch.evaluate_scdm: "plain" and / or "residual".

Launch commands (run from the repository root):
  # CPU-sized end to end on the Houston crop (three quadrants train, the fourth is sampled):
  python -m launch.train_scdm --config=configs/scdm.py:tiny \
      --config.data.path=../shared/data/cubes/houston2018_crop.npz:cube \
      --config.data.split=quadrant --workdir=workdirs/scdm_tiny
  python -m launch.sample_scdm --config=configs/scdm.py:tiny \
      --config.data.path=../shared/data/cubes/houston2018_crop.npz:cube \
      --config.data.split=quadrant --workdir=workdirs/scdm_tiny
  # Only the second stage (e.g. on another host), then sampling from the user's own RGB:
  python -m launch.train_scdm --config=configs/scdm.py:paper_houston --config.stage=1 \
      --config.data.path=/data/houston_train.npz:cube --workdir=workdirs/scdm_houston
  python -m launch.sample_scdm --config=configs/scdm.py:paper_houston \
      --config.data.rgb=/data/scene_rgb.npz:rgb --workdir=workdirs/scdm_houston
  # Acceptance experiment (linear baseline; plain and residual cascades of 1 and 2 stages,
  # with and without PDT/ICMG; the residual rows took 16 minutes on 2 shared CPU cores, see
  # docs/scdm_results.md; --config.eval_models=residual runs only those):
  python -m launch.evaluate_scdm --config=configs/scdm.py:tiny --workdir=workdirs/scdm_eval
"""
from __future__ import annotations

import pathlib

import ml_collections

from configs import common
from ml_collections import config_dict

_REPO = pathlib.Path(__file__).resolve().parents[1]
_HOUSTON = _REPO.parent / "shared" / "data" / "cubes" / "houston2018_crop.npz"

PRESETS = ("paper_houston", "paper_pavia_centre", "tiny")


def stage_settings(guidance_scale: float = 0.0, pdt_target: str = "eps",
                   pdt_p_T: float = 1.0) -> ml_collections.ConfigDict:
  """Sampling settings of one cascade stage."""
  return ml_collections.ConfigDict({
      "guidance_scale": float(guidance_scale),
      "pdt_target": pdt_target,
      "pdt_p_T": float(pdt_p_T),
  })


def _default_stages(num_stages: int, p_first: float, p_last: float, guidance_last: float,
                    pdt_target: str = "eps") -> list[ml_collections.ConfigDict]:
  """Paper's best setting: PDT in every stage, ICMG only in the last (full-band) stage."""
  if num_stages == 1:
    # One model makes all N bands: the full-band stage's truncation and guidance.
    return [stage_settings(guidance_last, pdt_target, p_last)]
  ps = [p_first + (p_last - p_first) * k / (num_stages - 1) for k in range(num_stages)]
  return [stage_settings(guidance_last if k == num_stages - 1 else 0.0, pdt_target,
                         round(p, 4)) for k, p in enumerate(ps)]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the SCDM config for `arg` = "<preset>[,stages=K]" (default "tiny")."""
  tokens = [t.strip() for t in (arg or "tiny").split(",") if t.strip()]
  presets = [t for t in tokens if t in PRESETS]
  others = [t for t in tokens if t not in PRESETS]
  num_stages = 2
  for t in others:
    if t.startswith("stages=") and t[len("stages="):] in ("1", "2", "3"):
      num_stages = int(t[len("stages="):])
    elif t == "authors":
      pass
    else:
      presets = []  # Force the error below.
  if len(presets) != 1:
    raise ValueError(f"bad SCDM config option {arg!r}: give exactly one preset of {PRESETS}, "
                     "optionally with ',stages=1|2|3' and ',authors' (e.g. "
                     "'configs/scdm.py:tiny,stages=1')")
  preset = presets[0]

  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seed = 0
  c.mesh = ml_collections.ConfigDict({"axes": ("data",), "shape": (-1,)})
  # Platform policy overrides, e.g. --config.policy.steps_per_call=1 (hsijax.policy).
  c.policy = common.policy_fields()
  c.stage = "all"  # train_scdm: "all" trains every stage in turn, "k" only stage k.
  c.stage_counts = ()  # bands per stage, e.g. (12, 24, 48); () = floor(3 (N/3)^(k/S))
  # launch.evaluate_scdm: model families to train and compare, "plain" (the paper's cascade
  # with this config's sizes: 1 stage, 2 stages, 2 stages + PDT/ICMG) and / or "residual"
  # (hsijax.scdm.residual: affine estimates only, 1 stage, 2 stages, 2 stages + PDT/ICMG).
  c.eval_models = "plain,residual"

  c.data = ml_collections.ConfigDict()
  c.data.path = ""        # training cube FILE[:KEY], (H, W, N) original units
  # A TFDS dataset built by `python -m launch.build_dataset` (array_record, no TensorFlow):
  # NAME[:SPLIT] read through grain, instead of data.path, for training.
  c.data.tfds = ""
  c.data.tfds_dir = ""
  c.data.key = ""         # array name when data.path has no ":KEY" ("" = auto)
  c.data.num_bands = 48   # N; checked against the data
  c.data.rgb = ""         # sampling input FILE[:KEY], (H, W, 3); "" = RGB bands of the cube
  c.data.rgb_bands = (4, 11, 22)  # 0-based HSI bands forming R, G, B (paper: bands 23, 12, 5)
  c.data.reference = ""   # optional reference FILE[:KEY] for metrics at sampling time
  c.data.split = "none"   # "none" | "quadrant"
  c.data.test_quadrant = 3  # held-out quadrant for split="quadrant": 0 TL, 1 TR, 2 BL, 3 BR
  c.data.norm_mean = config_dict.placeholder(float)  # None -> mean of the training cube
  c.data.norm_std = config_dict.placeholder(float)   # None -> std of the training cube
  c.data.norm_per_band = False  # True: per-band mean / std measured on the training cube

  c.model = ml_collections.ConfigDict()
  c.model.base = 128
  c.model.channel_mults = (1, 2, 2, 2, 2, 2, 2)
  c.model.num_res_down = 2
  c.model.num_res_up = 3
  c.model.attn_levels = (3,)  # 16 x 16 for 256 x 256 inputs (the authors' code)
  c.model.mid_attn = True
  c.model.dropout = 0.1
  c.model.groups = 32
  c.model.cond_rgb = False  # later stages: also condition on the RGB input (off = paper)
  c.model.prediction = "eps"  # network target: "eps" (paper) | "v" (sqrt(abar) eps - sqrt(1-abar) x0)
  #                             | "x0" (the clean bands)
  c.model.residual = False  # True: each stage diffuses the residual of a per-pixel affine
  #                           estimate fitted on the training data (hsijax.scdm.residual)
  c.model.estimate_only = ()  # residual stages without a U-Net (the affine estimate alone)

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = "linear"
  c.diffusion.num_timesteps = 1000

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100_000
  c.train.batch = 4
  c.train.crop = 256
  c.train.lr = 1e-4
  c.train.lr_schedule = "constant"  # paper; "cosine" decays to 1% over train.steps (so
  # resuming with a larger train.steps changes the schedule; a killed run resumes exactly)
  c.train.ema_decay = 0.9999
  c.train.ema_start = 2000
  c.train.loss_type = "l1"  # authors' code; the paper text says "mse"
  c.train.sam_weight = 1.0
  c.train.cond_drop = 0.1
  c.train.sam_space = "normalised"  # "data": the SAM term in the data's units (the metric's)
  c.train.param_init = "flax"  # "torch": PyTorch's layer defaults (the authors' code)
  c.train.log_every = 100
  c.train.checkpoint_every = 5000
  c.train.max_to_keep = 2

  c.sample = ml_collections.ConfigDict()
  c.sample.method = "ddpm"   # "ddpm" (ancestral, sigma^2 = beta) | "ddim"
  c.sample.num_steps = config_dict.placeholder(int)  # None -> every one of the T steps
  c.sample.respacing = "uniform"
  c.sample.eta = 0.0         # DDIM only
  c.sample.tile = 256        # inputs larger than this are cut into tile x tile pieces
  c.sample.overlap = -1      # pixels shared by neighbouring tiles (-1: a quarter tile)
  c.sample.tiles_per_call = 8  # tiles sampled together (sharded over "data")
  c.sample.use_ema = True

  if preset == "paper_houston":
    c.data.num_bands = 48
    c.data.norm_mean = 3693.0
    c.data.norm_std = 7410.0
    c.stages = _default_stages(num_stages, 0.96, 0.88, 1.0)
    if num_stages == 3:
      c.stage_counts = (12, 24, 48)  # the paper's 3-stage ablation
  elif preset == "paper_pavia_centre":
    c.data.num_bands = 102
    c.data.rgb_bands = (9, 29, 59)  # the paper's 1-based bands 60, 30, 10
    c.stages = _default_stages(num_stages, 0.97, 0.90, 1.0)
    if num_stages == 3:
      c.stage_counts = (12, 34, 102)  # the paper's 3-stage ablation
  elif preset == "tiny":
    # CPU-sized (see the module docstring for why each value is what it is).
    c.data.path = str(_HOUSTON) + ":cube" if _HOUSTON.is_file() else ""
    c.data.num_bands = 48
    c.data.norm_per_band = True
    c.model.base = 96          # >= 2 N: see "Why the tiny preset looks like this" above
    c.model.channel_mults = (1, 1, 1)
    c.model.num_res_down = 1
    c.model.num_res_up = 2
    c.model.attn_levels = ()
    c.model.mid_attn = True
    c.model.dropout = 0.0
    c.model.groups = 8
    c.train.steps = 3000
    c.train.batch = 8
    c.train.crop = 8
    c.model.prediction = "x0"  # see "Why the tiny preset looks like this"
    c.model.residual = True    # diffuse the residual of the per-pixel affine map
    c.model.estimate_only = tuple(range(1, num_stages))  # later stages: the affine map alone
    c.train.sam_space = "data"
    c.train.lr = 1e-3
    c.train.lr_schedule = "cosine"
    c.train.ema_decay = 0.995
    c.train.ema_start = 500
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.sample.method = "ddim"   # eta = 0, 3 of the T = 1000 steps (respaced)
    c.sample.num_steps = 3
    c.sample.tile = 8          # = train.crop: GroupNorm sees the statistics it trained on
    c.sample.overlap = 4       # half a tile: most pixels blend 4 independently sampled tiles
    c.sample.tiles_per_call = 256
    # No PDT / ICMG (see above); evaluate_scdm's paper rows use paper_stages(...) instead.
    c.stages = [stage_settings(0.0, "none", 1.0) for _ in range(num_stages)]
  if "authors" in others:
    c.stages = [stage_settings(2.5, "x", 0.96) for _ in range(num_stages)]
    c.train.param_init = "torch"
  return c


def paper_stages(num_stages: int = 2, pdt_target: str = "x") -> list[dict]:
  """The paper's best PDT / ICMG settings at the tiny preset's p_T (0.96 -> 0.88), as dicts
  (launch.evaluate_scdm's "+ PDT/ICMG" rows)."""
  return [dict(s.to_dict()) for s in _default_stages(num_stages, 0.96, 0.88, 1.0,
                                                    pdt_target=pdt_target)]


def split_stage_list(config) -> list[dict]:
  """The per-stage sampling settings as plain dicts (ConfigDicts inside a list)."""
  return [dict(s.to_dict() if hasattr(s, "to_dict") else s) for s in config.stages]


# ----------------------------------------------------------------------------- adapter
# The one place where config fields become the library's settings.


def unet_settings(cfg) -> dict:
  m = cfg.model
  return dict(base=int(m.base), channel_mults=tuple(int(v) for v in m.channel_mults),
              num_res_down=int(m.num_res_down), num_res_up=int(m.num_res_up),
              attn_levels=tuple(int(v) for v in m.attn_levels), mid_attn=bool(m.mid_attn),
              dropout=float(m.dropout), groups=int(m.groups))


def make_cascade(cfg, train_images, num_stages: int | None = None):
  """The hsijax.scdm.Cascade of a config for (M, H, W, N) training cubes (original units):
  the config's normaliser, or the cubes' mean / std (per band with data.norm_per_band)."""
  from hsijax import scdm  # pylint: disable=g-import-not-at-top
  num_stages = len(cfg.stages) if num_stages is None else int(num_stages)
  fitted = scdm.Normaliser.fit(train_images, per_band=bool(cfg.data.norm_per_band))
  mean = fitted.mean if cfg.data.norm_mean is None else cfg.data.norm_mean
  std = fitted.std if cfg.data.norm_std is None else cfg.data.norm_std
  return scdm.make_cascade(
      int(train_images.shape[-1]), rgb_bands=tuple(cfg.data.rgb_bands), num_stages=num_stages,
      counts=tuple(cfg.stage_counts) or None, norm_mean=mean, norm_std=std,
      unet=unet_settings(cfg), prediction=str(cfg.model.prediction),
      cond_rgb=bool(cfg.model.cond_rgb), schedule=str(cfg.diffusion.schedule),
      num_timesteps=int(cfg.diffusion.num_timesteps), residual=bool(cfg.model.residual),
      estimate_only=tuple(int(k) for k in cfg.model.estimate_only
                          if int(k) < num_stages) if cfg.model.residual else ())


def train_settings(cfg) -> dict:
  """hsijax.scdm.train settings (steps and key aside)."""
  t = cfg.train
  return dict(batch=int(t.batch), crop=int(t.crop), lr=float(t.lr),
              lr_schedule=str(t.lr_schedule), ema_decay=float(t.ema_decay),
              ema_start=int(t.ema_start), loss_type=str(t.loss_type),
              sam_weight=float(t.sam_weight), cond_drop=float(t.cond_drop),
              sam_space=str(t.sam_space), param_init=str(t.get("param_init", "flax")),
              checkpoint_every=int(t.checkpoint_every), max_to_keep=int(t.max_to_keep),
              log_every=int(t.log_every))


def sample_settings(cfg) -> dict:
  """hsijax.scdm.sample settings (key and per-stage settings aside)."""
  s = cfg.sample
  return dict(method=str(s.method), num_steps=None if s.num_steps is None else
              int(s.num_steps), respacing=str(s.respacing), eta=float(s.eta),
              tile=int(s.tile), overlap=int(s.overlap), tiles_per_call=int(s.tiles_per_call))


def stages_to_train(cfg) -> list[int]:
  """--config.stage: "all" or one stage index."""
  n = len(cfg.stages)
  sel = str(cfg.stage).strip().lower()
  if sel == "all":
    return list(range(n))
  if sel.isdigit() and int(sel) < n:
    return [int(sel)]
  raise ValueError(f"--config.stage must be 'all' or a stage index in 0..{n - 1}, got "
                   f"{cfg.stage!r}")


def validate(cfg) -> None:
  """Refuses out-of-range fields before any data is read, naming the flag."""
  for flag, value, low in (("train.steps", cfg.train.steps, 0),
                           ("train.batch", cfg.train.batch, 1),
                           ("train.crop", cfg.train.crop, 1), ("sample.tile", cfg.sample.tile, 1),
                           ("sample.tiles_per_call", cfg.sample.tiles_per_call, 1),
                           ("model.base", cfg.model.base, 1),
                           ("diffusion.num_timesteps", cfg.diffusion.num_timesteps, 21)):
    if int(value) < low:
      raise ValueError(f"--config.{flag}={value} must be >= {low}")
  if cfg.sample.num_steps is not None and not 1 <= int(cfg.sample.num_steps) <= int(
      cfg.diffusion.num_timesteps):
    raise ValueError(f"--config.sample.num_steps={cfg.sample.num_steps} must be in [1, "
                     f"{cfg.diffusion.num_timesteps}] (or unset for all timesteps)")
  if len(tuple(cfg.data.rgb_bands)) != 3:
    raise ValueError(f"--config.data.rgb_bands={tuple(cfg.data.rgb_bands)} must name 3 bands, "
                     "e.g. \"--config.data.rgb_bands=(22,11,4)\"")
  if not 0 <= int(cfg.data.test_quadrant) <= 3:
    raise ValueError(f"--config.data.test_quadrant={cfg.data.test_quadrant} must be 0..3")
