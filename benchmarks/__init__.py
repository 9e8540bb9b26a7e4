"""Speed benchmarks of hsijax, next to PyTorch eager references of the same math.

Not part of the library: `import hsijax` never imports this package (nor torch).

Modules:
  harness     timing (compile, steady state, marginal per step of scanned programs, paired
              JAX / PyTorch repeats), FLOP counts (analytic, jaxpr, XLA), matmul peak,
              resident-memory monitor
  workloads   the SDP / SCDM workloads of `python -m launch.bench` and the run over a config
  report      bench.json record -> plain-text and Markdown tables
  torch_ref   PyTorch eager references of SDP and SCDM (needs torch)

Results and how they were measured: docs/benchmarks.md.
"""
