"""The README's first Python example runs as written, from another directory, and its SDP
beats its Baseline (the claim the README makes)."""
import os
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _first_python_block() -> str:
  text = (REPO / "README.md").read_text()
  section = text[text.index("## Use it from Python"):]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs_as_written(tmp_path):
  script = tmp_path / "example.py"
  script.write_text(_first_python_block())
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", HSIJAX_PROGRESS="0")
  env.pop("PYTHONPATH", None)  # the installed package, as a user has it
  proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Warning" not in proc.stderr, proc.stderr[-2000:]
  rows = dict(re.findall(r"^(SDP|Baseline)\s+PSNR\s+([\d.]+) dB", proc.stdout, re.M))
  assert set(rows) == {"SDP", "Baseline"}, proc.stdout
  assert float(rows["SDP"]) > float(rows["Baseline"]) + 2.0, proc.stdout
