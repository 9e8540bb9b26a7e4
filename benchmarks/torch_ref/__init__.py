"""PyTorch eager references of the SDP and SCDM workloads, for benchmarks and parity tests.

Written the way the authors' PyTorch code runs: NCHW tensors, Python loops over timesteps and
inner steps, one op at a time, `torch.optim.Adam` (L2 `weight_decay`), `torch.no_grad()` for
sampling, float32, `torch.set_num_threads(os.cpu_count())`. Module names mirror the flax
parameter trees, so `load_flax_params` copies JAX weights 1:1 and both sides compute the
same function (tested in tests/test_torch_ref.py). Importing this package needs torch; only
the benchmarks (`benchmarks.workloads`) and the tests use it, never the library.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn


def set_threads(num_threads: int | None = None) -> int:
  """Gives torch the same cores as XLA (all of them by default); returns the count."""
  n = int(num_threads or os.cpu_count() or 1)
  torch.set_num_threads(n)
  return n


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 1e4) -> torch.Tensor:
  """Sinusoidal embedding (..., dim): first half cos, second half sin (as hsijax.diffusion)."""
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) *
                    torch.arange(half, dtype=torch.float32, device=t.device) / half)
  args = t.to(torch.float32)[..., None] * freqs
  emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
  if dim % 2:
    emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
  return emb


def _to_tensor(a: Any) -> torch.Tensor:
  return torch.from_numpy(np.array(a, dtype=np.float32, copy=True))


def _load_leaf_module(module: nn.Module, leaves: Mapping[str, Any], path: str) -> None:
  """Copies one flax module's leaves (kernel/bias or scale/bias) into a torch module."""
  with torch.no_grad():
    for name, value in leaves.items():
      v = _to_tensor(value)
      if name == "kernel":
        if isinstance(module, nn.Linear):
          target, v = module.weight, v.T                        # (in, out) -> (out, in)
        elif isinstance(module, nn.Conv2d):
          if v.ndim == 2:                                        # Dense used as a 1x1 conv
            v = v.T[:, :, None, None]
          else:                                                  # (kh, kw, in, out)
            v = v.permute(3, 2, 0, 1)
          target = module.weight
        else:
          raise ValueError(f"{path}: cannot load a kernel into {type(module).__name__}")
      elif name == "scale":
        target = module.weight
      elif name == "bias":
        target = module.bias
      else:
        raise ValueError(f"{path}: unknown flax parameter {name!r}")
      if tuple(target.shape) != tuple(v.shape):
        raise ValueError(f"{path}/{name}: torch shape {tuple(target.shape)} != flax shape "
                         f"{tuple(v.shape)}; build the torch module with the same sizes")
      target.copy_(v.contiguous())


def load_flax_params(module: nn.Module, params: Mapping[str, Any]) -> nn.Module:
  """Copies a flax parameter tree into `module`, whose submodule names mirror the flax names.

  Args:
    module: torch module; the flax path a/b/c maps to submodule `a.b.c`.
    params: flax variables ({"params": ...}) or the inner params dict.

  Returns:
    `module` (modified in place). Raises KeyError for a flax path the module lacks, and
    ValueError when a torch parameter would stay unset.
  """
  tree = params.get("params", params) if isinstance(params, Mapping) else params
  loaded: set[str] = set()

  def walk(node: Mapping[str, Any], prefix: str) -> None:
    if all(not isinstance(v, Mapping) for v in node.values()):
      try:
        sub = module.get_submodule(prefix)
      except AttributeError as e:
        raise KeyError(f"flax path {prefix!r} has no torch submodule; build the torch model "
                       "with the same configuration as the flax one") from e
      _load_leaf_module(sub, node, prefix)
      loaded.update(f"{prefix}.{n}" for n, _ in sub.named_parameters())
      return
    for k, v in node.items():
      walk(v, f"{prefix}.{k}" if prefix else k)

  walk(tree, "")
  missing = [n for n, _ in module.named_parameters() if n not in loaded]
  if missing:
    raise ValueError(f"torch parameters not set from the flax tree: {missing[:5]}...; the "
                     "two models are built with different configurations")
  return module
