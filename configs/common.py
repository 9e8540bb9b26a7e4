"""Config pieces shared by the presets (sdp.py, scdm.py): the platform policy overrides."""
from __future__ import annotations

import ml_collections

def policy_fields() -> ml_collections.ConfigDict:
  """`--config.policy.<field>=...` overrides of the platform policy (hsijax.policy.Policy);
  None keeps the running backend's choice."""
  from ml_collections import config_dict as cd  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict({
      "conv_impl": cd.placeholder(str), "blur_method": cd.placeholder(str),
      "pixel_chunk": cd.placeholder(int), "memory_budget_gb": cd.placeholder(float),
      "donate": cd.placeholder(bool), "progress_every": cd.placeholder(int),
      "steps_per_call": cd.placeholder(int), "shard_pixels": cd.placeholder(bool)})


def policy(cfg) -> "hsijax.policy.Policy":  # noqa: F821
  """The platform policy of a config: the backend's, with `cfg.policy` overrides."""
  from hsijax.policy import Policy  # pylint: disable=g-import-not-at-top
  return Policy.from_config(cfg.get("policy"))
