"""SDP (fusion with a spectral diffusion prior): presets for training, fusion and evaluation.

`get_config(arg)` takes a comma-separated option string: one preset name plus optional
modifiers, e.g. "crop", "crop,fast", "real,known", "paper_paviau".

Presets:
  paper_paviau, paper_ksc, paper_dc  256 x 256 Wald scenes as in the paper: ratio 8 (PSF
                                     15 x 15), lam 0.1, gam 1e-3, solver lr 1e-3 / 1e-3 /
                                     2.5e-3, T = 1000, K = 3, 30k training steps.
  real      a user's own LR-HSI / HR-MSI pair (the default of `launch.fuse`): the warm-started
            solver below, a gain / offset per MSI band in the blind fit where it explains
            the pair much better (blind.radiometry "auto": two sensors rarely share units),
            and the prior trained on the LR-HSI's pixels projected onto their first 10
            principal directions (data.train_rank = 10: drops their noise).
  paper_real  the paper's real-data solver values (lam 1.0, gam 0.1, solver lr 8e-3, cold
            start from ones): kept for comparison; on simulated pairs of every shared crop
            they over-regularise and lose to the Baseline (docs/sdp_results.md).
  crop      small real crops (the simulation protocol), ratio 4 (PSF 7 x 7), blind PSF / SRF,
            the warm-started solver below.
  demo      the self-made synthetic scene of `launch.demo` (minutes on a laptop CPU).
Modifiers:
  fast | paper   sets `budget` (number of training, solver and blind-estimation steps).
  known          `known_operators=True`: use the true PSF / SRF instead of estimating them.

The warm-started solver (`crop`, `real`; beyond the paper, measured on all eight shared crops
in docs/sdp_results.md): X starts from the mean of subspace LS and detail injection
(solver.init = "classical") and only the last fifth of the solver steps run (solver.start =
0.2, the smallest t), with lam 0.03, gam 3e-4 and the Adam lr 1e-3 x 3 (solver.lr_scale). From
a warm start the prior has to correct spectra, not build the image, and the LR-HSI term needs
less weight than the paper's 0.1 (the blind PSF is imperfect). The paper presets keep the
paper's cold start from ones over all steps.

Step counts left as None (`train.steps`, `solver.num_steps`, `blind.steps`, `blind.lr`) are
filled from `budgets[budget]` at run time by `resolve(config)`; an explicit command-line value
(`--config.train.steps=500`) always wins over the budget.

Launch commands (run from the repository root):
  python -m launch.demo --workdir=workdirs/demo
  python -m launch.train_sdm --config=configs/sdp.py:crop \
      --config.data.path=../shared/data/cubes/pavia_centre_crop.npz --workdir=workdirs/sdm
  python -m launch.evaluate_sdp --config=configs/sdp.py:crop \
      --config.data.path=../shared/data/cubes/pavia_centre_crop.npz --config.budget=fast \
      --workdir=workdirs/eval_pavia_centre
  python -m launch.evaluate_sdp --config=configs/sdp.py:crop \
      --config.data.path=../shared/data/cubes/houston2018_crop.npz \
      --config.data.wavelengths_nm=380:1050 --config.budget=fast --workdir=workdirs/eval_houston
  python -m launch.fuse --config=configs/sdp.py:real --config.data.hsi=lr_hsi.npz:Y \
      --config.data.msi=hr_msi.npz:Z [--config.data.reference=ref.npz:X] \
      [--config.data.train_pixels=clean.npz:pixels] [--config.budget=fast] --workdir=workdirs/fuse
  python -m launch.evaluate_sdp --config=configs/sdp.py:paper_paviau \
      --config.data.path=/data/PaviaU.mat --config.data.key=paviaU --workdir=workdirs/paviau

Large scenes (any entry point that fuses): `--config.solver.tile=64` solves 64 x 64 HR-pixel
windows overlapping by `--config.solver.tile_overlap=16` (both multiples of the ratio),
`--config.solver.tiles_per_call=8` windows per call sharded over the `data` mesh axis, and
blends them; memory is bounded by tiles_per_call windows (see docs/scaling.md). The default
tile = 0 solves the whole scene at once.
"""
from __future__ import annotations

import pathlib

import ml_collections

from configs import common
from ml_collections import config_dict

_REPO = pathlib.Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout; used only when present.
_SHARED = _REPO.parent / "shared" / "data"
_IKONOS = _SHARED / "srf" / "ikonos.npz"

PRESETS = ("paper_paviau", "paper_ksc", "paper_dc", "paper_real", "real", "crop", "demo")
BUDGETS = ("fast", "paper")


def default_srf_path() -> str:
  """The real IKONOS curves when ../shared/data is present, else "" (Gaussian IKONOS model)."""
  return str(_IKONOS) if _IKONOS.is_file() else ""


def _budgets() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      # Paper: 30k training steps (lr decay over the first 10k), all T = 1000 solver
      # timesteps, 5000 blind-estimation steps at lr 1e-5.
      "paper": {"train_steps": 30_000, "train_decay_steps": 10_000, "solver_steps": 1000,
                "blind_steps": 5000, "blind_lr": 1e-5},
      # Fast: a 100 x 100 x 200 crop end to end in < 10 min on 2 CPU cores. The lr decay is
      # compressed into the shorter run (a model still at lr 1e-2 cannot denoise the small-t
      # steps, and the prior then hurts); 100 respaced solver timesteps (the solver scales
      # its Adam lr by T / n, see hsijax.sdp.solver); blind estimation uses 5x fewer steps at
      # a 20x larger lr.
      "fast": {"train_steps": 4000, "train_decay_steps": 2500, "solver_steps": 100,
               "blind_steps": 1000, "blind_lr": 2e-4},
  })


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the SDP config for `arg` = "<preset>[,fast|paper][,known]" (default "demo")."""
  tokens = [t.strip() for t in (arg or "demo").split(",") if t.strip()]
  presets = [t for t in tokens if t in PRESETS]
  unknown = [t for t in tokens if t not in PRESETS + BUDGETS + ("known",)]
  if unknown or len(presets) != 1:
    raise ValueError(
        f"bad SDP config option {arg!r}: give exactly one preset of {PRESETS}, optionally "
        f"with ',fast' or ',paper' and ',known' (e.g. 'configs/sdp.py:crop,fast')")
  preset = presets[0]

  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seed = 0
  c.mesh = ml_collections.ConfigDict({"axes": ("data",), "shape": (-1,)})
  # Platform policy overrides, e.g. --config.policy.steps_per_call=1 (hsijax.policy).
  c.policy = common.policy_fields()
  # Matmul precision of the SDP denoiser (training and solver): "default" | "float32" |
  # "tensorfloat32" | "bfloat16" (hsijax.policy; accuracy in docs/benchmarks.md).
  c.precision = "default"
  c.budget = "paper"
  c.budgets = _budgets()
  # Blind PSF / SRF estimation is the default everywhere, as in the paper.
  c.known_operators = False
  # Which methods fuse / evaluate_sdp run: "all" or a comma list of
  # sdp, baseline, bicubic, detail_injection, subspace_ls.
  c.methods = "all"

  c.model = ml_collections.ConfigDict()
  c.model.hidden = 512
  c.model.num_layers = 5
  c.model.time_dim = 64
  c.model.dropout = 0.001

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = "linear"
  c.diffusion.num_timesteps = 1000
  c.diffusion.respacing = "uniform"

  c.train = ml_collections.ConfigDict()
  c.train.batch = 512
  c.train.steps = config_dict.placeholder(int)  # None -> budgets[budget].train_steps
  c.train.lr = 1e-2
  c.train.weight_decay = 1e-6
  c.train.ema = 0.999
  # The lr decays linearly to 1/1000 over decay_steps steps, then stays flat.
  c.train.decay_steps = config_dict.placeholder(int)  # None -> budgets[budget]
  c.train.checkpoint_every = 1000
  c.train.log_every = 100
  c.train.fid_samples = 2048  # generated spectra for the spectral FID

  c.solver = ml_collections.ConfigDict()
  c.solver.lam = 0.1
  c.solver.gam = 1e-3
  c.solver.lr = 1e-3
  c.solver.K = 3
  c.solver.weight_decay = 1e-6
  c.solver.ema = 0.9
  c.solver.num_steps = config_dict.placeholder(int)  # None -> budgets[budget].solver_steps
  # Adam lr multiplier; None = T / num_steps (the solver's default for respaced runs).
  c.solver.lr_scale = config_dict.placeholder(float)
  c.solver.init = "ones"  # the paper; "upsample"; "classical" (warm start, see above)
  c.solver.start = 1.0    # fraction of the solver steps visited (the last ones); 1 = all
  # Large scenes: solve in tile x tile HR-pixel windows overlapping by tile_overlap (both
  # multiples of the ratio), tiles_per_call windows per jitted call sharded over mesh.data,
  # written out strip by strip. tile = None (default): the whole scene in one call when it
  # fits `memory_gb`, else windows sized to it; 0: always the whole scene. Tiled equals
  # untiled to float rounding away from window edges (hsijax.sdp.tiled, docs/scaling.md).
  c.solver.tile = config_dict.placeholder(int)
  c.solver.tile_overlap = 16
  c.solver.tiles_per_call = 8
  # Memory (GB) a solve may use; None = a sixteenth of the machine's RAM, at most 1 GB.
  c.memory_gb = config_dict.placeholder(float)

  c.blind = ml_collections.ConfigDict()
  c.blind.steps = config_dict.placeholder(int)  # None -> budgets[budget].blind_steps
  c.blind.lr = config_dict.placeholder(float)   # None -> budgets[budget].blind_lr
  c.blind.psf_size = config_dict.placeholder(int)  # None -> 2 * ratio - 1
  c.blind.crop = 256  # fit on the central crop x crop LR pixels (0 = whole scene)
  # MSI radiometry in the blind fit: "none" (the authors' Z = rownorm(R) X), "affine" (a gain
  # and offset per MSI band; the MSI is mapped to the LR-HSI's units for every method) or
  # "auto" (both fitted, affine kept only where it explains the pair much better;
  # hsijax.sdp.fusion). `real` uses "auto".
  c.blind.radiometry = "none"

  c.data = ml_collections.ConfigDict()
  c.data.path = ""        # evaluate_sdp / train_sdm: one cube file (.npz / .mat / .h5 / .tif)
  # A TFDS dataset built by `python -m launch.build_dataset` (array_record, no TensorFlow):
  # NAME[:SPLIT] read through grain, instead of data.path, for training.
  c.data.tfds = ""
  c.data.tfds_dir = ""
  c.data.key = ""         # array name inside it ("" = the only / usual one)
  c.data.hsi = ""         # fuse: LR-HSI FILE[:KEY], (h, w, B)
  c.data.msi = ""         # fuse: HR-MSI FILE[:KEY], (H, W, b)
  c.data.reference = ""   # fuse: optional full-resolution reference FILE[:KEY], (H, W, B)
  c.data.train_pixels = ""  # fuse: optional clean spectra FILE[:KEY], (N, B) or (h, w, B)
  c.data.max_train_pixels = 262144  # fuse: LR-HSI pixels the prior trains on (all if fewer)
  # fuse: when the prior trains on LR-HSI pixels, project them onto their first `train_rank`
  # principal directions first (hsijax.sdp.low_rank_pixels; 0 = as read). `real` uses 10.
  c.data.train_rank = 0
  c.data.psf = ""         # fuse: optional known PSF FILE[:KEY], (k, k)
  c.data.srf = ""         # fuse: optional known SRF FILE[:KEY], (b, B)
  c.data.wavelengths_nm = ""  # "START:STOP" band-centre range when the file has none
  # fuse: "joint" divides LR-HSI, HR-MSI (and reference) by one common max (keeps Z = R X),
  # "separate" each by its own max, "none" expects data already in [0, 1].
  c.data.scale = "joint"
  c.data.ratio = 4
  c.data.snr_y_db = 20.0
  c.data.snr_z_db = 30.0
  c.data.srf_path = default_srf_path()  # "" -> Gaussian model of the IKONOS bands
  c.data.split = "rows"
  # Synthetic scene (demo only).
  c.data.height = 0
  c.data.width = 0
  c.data.num_bands = 0
  c.data.num_endmembers = 0
  c.data.spectra = "auto"

  if preset.startswith("paper_") and preset != "paper_real":
    c.budget = "paper"
    c.data.ratio = 8
    c.solver.lr = {"paper_paviau": 1e-3, "paper_ksc": 1e-3, "paper_dc": 2.5e-3}[preset]
    c.data.key = {"paper_paviau": "paviaU", "paper_ksc": "KSC", "paper_dc": "dc"}[preset]
  elif preset == "paper_real":
    c.solver.lam = 1.0
    c.solver.gam = 0.1
    c.solver.lr = 8e-3
  elif preset == "real":
    _warm_solver(c)
    # A user's pair comes from two sensors: both blind models are fitted and a gain and
    # offset per MSI band kept where they explain the pair much better (docs/sdp_results.md:
    # chosen on every cross-sensor pair measured; the authors' model kept on 6 of 8 same-sensor
    # ones, where always fitting the gain cost up to 3.4 dB).
    c.blind.radiometry = "auto"
    # The prior learns the LR-HSI's noise with its spectra; a rank-10 projection (HySure's
    # subspace size) removed it and raised SDP on every real-preset pair measured
    # (docs/sdp_results.md).
    c.data.train_rank = 10
  elif preset == "crop":
    _warm_solver(c)
    c.data.ratio = 4
    c.data.key = "cube"
  elif preset == "demo":
    c.budget = "demo"
    c.budgets.demo = ml_collections.ConfigDict({
        "train_steps": 3000, "train_decay_steps": 2000, "solver_steps": 100,
        "blind_steps": 1000, "blind_lr": 2e-4})
    c.data.ratio = 4
    c.data.height = 128  # top half trains the spectral model, bottom half is the reference
    c.data.width = 64
    c.data.num_bands = 64
    c.data.num_endmembers = 6
    c.data.wavelengths_nm = "400:780"
    c.model.hidden = 256
    c.train.checkpoint_every = 500

  if "fast" in tokens:
    c.budget = "fast"
  if "paper" in tokens:
    c.budget = "paper"
  if "known" in tokens:
    c.known_operators = True
  return c


def _warm_solver(c: ml_collections.ConfigDict) -> None:
  """The warm-started solver of the `crop` and `real` presets (module docstring)."""
  from hsijax.sdp.fusion import WARM_START  # pylint: disable=g-import-not-at-top
  for name, value in WARM_START.items():
    c.solver[name] = value


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Copy of `config` with the budget's step counts filled in wherever a field is None."""
  c = ml_collections.ConfigDict(config.to_dict())
  if c.budget not in c.budgets:
    raise ValueError(f"unknown budget {c.budget!r}; use one of {sorted(c.budgets.keys())} "
                     f"(--config.budget=fast)")
  b = c.budgets[c.budget]
  if c.train.steps is None:
    c.train.steps = int(b.train_steps)
  if c.train.decay_steps is None:
    c.train.decay_steps = int(b.train_decay_steps)
  if c.solver.num_steps is None:
    c.solver.num_steps = min(int(b.solver_steps), int(c.diffusion.num_timesteps))
  if c.blind.steps is None:
    c.blind.steps = int(b.blind_steps)
  if c.blind.lr is None:
    c.blind.lr = float(b.blind_lr)
  # Fail before any data is read or anything trained, naming the flag.
  for flag, value, low in (("train.steps", c.train.steps, 0), ("train.batch", c.train.batch, 1),
                           ("train.decay_steps", c.train.decay_steps, 1),
                           ("solver.num_steps", c.solver.num_steps, 1),
                           ("solver.K", c.solver.K, 1), ("blind.steps", c.blind.steps, 0),
                           ("blind.crop", c.blind.get("crop", 256), 0),
                           ("data.max_train_pixels", c.data.get("max_train_pixels", 1), 1),
                           ("data.train_rank", c.data.get("train_rank", 0), 0),
                           ("model.hidden", c.model.hidden, 1),
                           ("diffusion.num_timesteps", c.diffusion.num_timesteps, 21)):
    if int(value) < low:
      raise ValueError(f"--config.{flag}={value} must be >= {low}")
  for flag, value in (("solver.lam", c.solver.lam), ("solver.gam", c.solver.gam),
                      ("solver.lr", c.solver.lr), ("train.lr", c.train.lr)):
    if not float(value) >= 0:
      raise ValueError(f"--config.{flag}={value} must be >= 0")
  if int(c.data.ratio) < 1:
    raise ValueError(f"--config.data.ratio={c.data.ratio} must be a positive integer")
  if c.get("memory_gb") is not None and not float(c.memory_gb) > 0:
    raise ValueError(f"--config.memory_gb={c.memory_gb} must be > 0 (unset = the default)")
  if int(c.solver.tile or 0) > 0:  # fail before any training, with the flag names
    from hsijax.sdp.tiled import check_tiling  # pylint: disable=g-import-not-at-top
    try:
      check_tiling(int(c.solver.tile), int(c.solver.tile_overlap), int(c.data.ratio),
                   int(c.solver.tiles_per_call))
    except ValueError as e:
      raise ValueError(f"--config.solver.tile={c.solver.tile} / tile_overlap="
                       f"{c.solver.tile_overlap} / tiles_per_call={c.solver.tiles_per_call} "
                       f"(ratio {c.data.ratio}): {e}") from e
  elif int(c.solver.tile or 0) < 0:
    raise ValueError(f"--config.solver.tile={c.solver.tile} must be >= 0 (0 = whole scene)")
  return c



# ----------------------------------------------------------------------------- adapter
# The one place where config fields become the library's keyword settings.


def prior_settings(cfg: ml_collections.ConfigDict) -> dict:
  """`hsijax.sdp.train_prior` settings of a resolved config (steps and key aside)."""
  m, d, t = cfg.model, cfg.diffusion, cfg.train
  return dict(hidden=int(m.hidden), num_layers=int(m.num_layers), time_dim=int(m.time_dim),
              dropout=float(m.dropout), precision=str(cfg.precision),
              schedule=str(d.schedule), num_timesteps=int(d.num_timesteps),
              batch=int(t.batch), lr=float(t.lr), weight_decay=float(t.weight_decay),
              ema=float(t.ema), decay_steps=int(t.decay_steps),
              checkpoint_every=int(t.checkpoint_every), log_every=int(t.log_every))


def fusion_settings(cfg: ml_collections.ConfigDict) -> dict:
  """`hsijax.sdp.fuse` settings of a resolved config (steps, key and operators aside)."""
  s, b, d = cfg.solver, cfg.blind, cfg.diffusion
  return dict(lam=float(s.lam), gam=float(s.gam), lr=float(s.lr), K=int(s.K),
              weight_decay=float(s.weight_decay), ema_decay=float(s.ema), init=str(s.init),
              start=float(s.get("start", 1.0)),
              lr_scale=None if s.lr_scale is None else float(s.lr_scale),
              respacing=str(d.respacing), blind_steps=int(b.steps), blind_lr=float(b.lr),
              psf_size=None if b.psf_size is None else int(b.psf_size),
              blind_crop=int(b.get("crop", 256)),
              blind_radiometry=str(b.get("radiometry", "none")),
              tile=None if s.tile is None else int(s.tile), tile_overlap=int(s.tile_overlap),
              tiles_per_call=int(s.tiles_per_call), schedule=str(d.schedule),
              num_timesteps=int(d.num_timesteps),
              memory_gb=None if cfg.get("memory_gb") is None else float(cfg.memory_gb))


def methods(cfg: ml_collections.ConfigDict) -> str:
  """The methods to run ("all" = every method)."""
  from hsijax.sdp import METHODS  # pylint: disable=g-import-not-at-top
  value = str(cfg.get("methods", "all") or "all").strip()
  return ",".join(METHODS) if value == "all" else value
