"""Speed benchmark of the SDP and SCDM workloads, JAX next to the PyTorch eager reference.

  python -m launch.bench --config=configs/bench.py:cpu --workdir=workdirs/bench

Runs the workloads of the config (presets and workload names: configs/bench.py) with
`benchmarks.workloads.run`, rewrites DIR/bench.json after every workload (atomically), then
writes DIR/bench.md (Markdown table) and prints a table and which targets were met. What is
measured and how: benchmarks/workloads.py and docs/benchmarks.md.
"""
from __future__ import annotations

import os
from typing import Any

from benchmarks import report, workloads
from launch import common, runner


def run(config, workdir) -> dict[str, Any]:
  """Runs every configured workload; returns (and writes to DIR/bench.json) the record."""
  path = os.path.join(workdir, "bench.json")
  return workloads.run(config, log=common.log,
                       on_update=lambda record: common.write_json(path, record))


def main(config, workdir) -> dict[str, Any]:
  """The entry point: bench.json, bench.md, the table and the targets."""
  workdir = common.setup(workdir)
  record = run(config, str(workdir))
  common.log(report.format_table(record))
  common.write_text(workdir / "bench.md", report.format_markdown(record) + "\n")
  for name, t in record["targets"].items():
    for kind, v in t.items():
      common.log(f"target {name} {kind}: {v['value']:.3f} (target "
                 f"{'>=' if kind == 'peak_fraction' else '<='} {v['target']}) "
                 f"{'met' if v['met'] else 'NOT met'}")
  common.log(f"wrote {workdir / 'bench.json'}")
  return record


if __name__ == "__main__":
  runner.run_main(main, "configs/bench.py:cpu", "workdirs/bench", "Benchmark config")
