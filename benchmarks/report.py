"""bench.json record (`benchmarks.workloads.run`) -> plain-text and Markdown tables."""
from __future__ import annotations

from typing import Any


def _fmt(v, spec: str = "{:.3g}") -> str:
  return "-" if v is None else spec.format(v)


def format_table(record: dict[str, Any]) -> str:
  """Plain-text table of a bench.json record (one row per workload)."""
  cols = [("workload", 20, "<"), ("compile s", 10, ">"), ("jax s/step", 12, ">"),
          ("torch s/step", 13, ">"), ("jax/torch", 10, ">"), ("cpu ratio", 10, ">"),
          ("GFLOP/step", 11, ">"),
          ("jax GF/s", 9, ">"), ("torch GF/s", 11, ">"), ("%peak", 7, ">"),
          ("XLA MB", 8, ">")]
  row = lambda cells: "".join(f"{c:{a}{w}}" for c, (_, w, a) in zip(cells, cols))
  lines = [row([c[0] for c in cols])]
  lines.append("-" * len(lines[0]))
  for name, r in record["workloads"].items():
    j, t = r["jax"], r.get("torch")
    if "flops_per_step" in r:
      frac = j.get("fraction_of_matmul_peak")
      mem = (j.get("memory") or {}).get("peak")
      lines.append(row([
          name, _fmt(j["compile_s"], "{:.1f}"), _fmt(j["step_s"]), _fmt(t and t["step_s"]),
          _fmt(r.get("ratio_jax_over_torch"), "{:.2f}"),
          _fmt(r.get("cpu_ratio_jax_over_torch"), "{:.2f}"),
          _fmt(r["flops_per_step"]["used"] / 1e9), _fmt(j.get("gflops"), "{:.1f}"),
          _fmt(t and t.get("gflops"), "{:.1f}"), _fmt(frac and 100 * frac, "{:.0f}"),
          _fmt(mem and mem / 2**20, "{:.0f}")]))
    else:  # full sampling: total seconds; "~" marks an estimate from the step time
      est = lambda x: "" if x is None else ("~" if x.get("estimated") else "")
      lines.append(row([
          name, "(total)", est(j) + _fmt(j["total_s"], "{:.4g}"),
          est(t) + _fmt(t and t["total_s"], "{:.4g}"),
          _fmt(r.get("ratio_jax_over_torch"), "{:.2f}"), "",
          _fmt(r["flops_total"] / 1e9, "{:.4g}"), "", "", "", ""]))
  pk = record["matmul_peak"]
  lines.append(f"matmul peak ({pk['jax']['n']}^3 float32, start of run): JAX "
               f"{pk['jax']['gflops']:.1f} GFLOP/s"
               + (f", torch {pk['torch']['gflops']:.1f} GFLOP/s" if pk.get("torch") else "")
               + ". %peak: median over repeats of JAX GFLOP/s / the same matmul's GFLOP/s "
               "timed right after each repeat. cpu ratio: JAX / PyTorch process-CPU seconds "
               "per step. ~ = estimated from the per-step time.")
  return "\n".join(lines)


def format_markdown(record: dict[str, Any]) -> str:
  """The bench.json record as a Markdown table (for docs/benchmarks.md)."""
  head = ("| workload | shape | compile s | JAX s/step | PyTorch s/step | JAX/PyTorch | "
          "JAX/PyTorch CPU s | GFLOP/step | JAX GFLOP/s | % of matmul peak | XLA peak MB |")
  lines = [head, "|" + "---|" * 11]
  for name, r in record["workloads"].items():
    j, t = r["jax"], r.get("torch")
    shape = ", ".join(f"{k}={v}" for k, v in r["shape"].items()
                      if k not in ("timed_steps", "channel_mults", "params", "unet_batch"))
    if "flops_per_step" in r:
      frac = j.get("fraction_of_matmul_peak")
      mem = (j.get("memory") or {}).get("peak")
      cells = [name, shape, _fmt(j["compile_s"], "{:.1f}"), _fmt(j["step_s"]),
               _fmt(t and t["step_s"]), _fmt(r.get("ratio_jax_over_torch"), "{:.2f}"),
               _fmt(r.get("cpu_ratio_jax_over_torch"), "{:.2f}"),
               _fmt(r["flops_per_step"]["used"] / 1e9), _fmt(j.get("gflops"), "{:.1f}"),
               _fmt(frac and 100 * frac, "{:.0f}"), _fmt(mem and mem / 2**20, "{:.0f}")]
    else:
      est = lambda x: "" if x is None else (" (est.)" if x.get("estimated") else "")
      cells = [name, shape, "", _fmt(j["total_s"], "{:.4g}") + " total" + est(j),
               (_fmt(t and t["total_s"], "{:.4g}") + " total" + est(t)) if t else "-",
               _fmt(r.get("ratio_jax_over_torch"), "{:.2f}"), "",
               _fmt(r["flops_total"] / 1e9, "{:.4g}") + " total", "", "", ""]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
