"""How every entry point runs: flags, one workdir per run, clear errors, a status in run.json.

`run_main(run_fn, ...)` is the `__main__` of each `launch/*.py`:
  * --config (resolved against the package, so any working directory works), --workdir,
    --coordinator_address / --num_processes / --process_id (multi-process runs), --verbose,
    --fresh (a new sub-folder WORKDIR/run-<N> instead of reusing WORKDIR).
  * The workdir is checked before any work (not a file, writable), locked for the run (a
    second run on it stops at once, naming the first one's process), cleared of temp files
    a killed run left, and DIR/run.json says "status": "running" until the run ends as
    "finished", "failed" or "interrupted" (a killed run leaves "running" with its pid).
  * An error prints one paragraph (what is wrong, which file or flag, what to do) and exits
    with status 1; Ctrl-C exits with 130. --verbose (or HSIJAX_VERBOSE=1) shows the
    traceback. A run that fails before writing anything leaves no empty workdir behind.
"""
from __future__ import annotations

import os
import re
import sys
import traceback
from typing import Any, Callable

from hsijax import sharding
from hsijax import workdir as workdir_lib
from launch import common

EXIT_ERROR, EXIT_INTERRUPTED = 1, 130


def _message(e: BaseException) -> str:
  text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  return f"error: {text}" if text else f"error: {type(e).__name__}"


def run_main(run_fn: Callable[[Any, Any], Any], default_config: str, default_workdir: str,
             what: str = "Config") -> None:
  """The `__main__` of an entry point: flags, workdir, errors and status around run_fn."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file("config", str(common.REPO / default_config),
                                  f"{what} file and preset.", lock_config=True)
  flags.DEFINE_string("workdir", default_workdir, "Output folder.")
  flags.DEFINE_string("coordinator_address", None, "Multi-process runs: HOST:PORT of process "
                      "0 (cluster launchers are detected without it).")
  flags.DEFINE_integer("num_processes", None, "Multi-process runs: number of processes.")
  flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index.")
  flags.DEFINE_bool("fresh", False, "Start in a new sub-folder WORKDIR/run-<N> instead of "
                    "resuming (or refusing) what WORKDIR holds.")
  flags.DEFINE_bool("verbose", os.environ.get("HSIJAX_VERBOSE", "") not in ("", "0"),
                    "Show the traceback of an error.")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    absl_logging.set_verbosity(absl_logging.WARNING)  # no INFO lines from backend probing
    path, created = None, False
    try:
      sharding.initialize_distributed(coordinator_address=f.coordinator_address,
                                      num_processes=f.num_processes, process_id=f.process_id)
      target = workdir_lib.fresh_subfolder(f.workdir) if f.fresh else f.workdir
      path, created = workdir_lib.prepare(target)
      if f.fresh:
        common.log(f"fresh run in {path} (resume it with --workdir={path})")
      workdir_lib.set_status(path, "running")
      run_fn(f.config, str(path))
      workdir_lib.set_status(path, "finished")
    except KeyboardInterrupt:
      if path is not None:
        workdir_lib.set_status(path, "interrupted")
      print("interrupted: checkpoints written so far are kept; run the same command again "
            "to resume", file=sys.stderr)
      sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # noqa: BLE001  (every error ends as one paragraph)
      if f.verbose:
        traceback.print_exc()
      if path is not None:
        workdir_lib.failed(path, created, _message(e))
      hint = "" if f.verbose else " (--verbose shows the traceback)"
      expected = isinstance(e, (ValueError, KeyError, FileNotFoundError, TypeError, OSError))
      print(_message(e) + ("" if expected else f" [{type(e).__name__}: an internal error; "
                           "please report it]") + hint, file=sys.stderr)
      sys.exit(EXIT_ERROR)

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001  (a bad flag or config field: one paragraph)
      print(f"error: {_flag_error(e, argv)}", file=sys.stderr)
      sys.exit(EXIT_ERROR)

  app.run(main, argv=common.resolve_config_path(sys.argv), flags_parser=parse)


def _flag_error(e: BaseException, argv: list[str]) -> str:
  """The readable part of a flag / config parsing error (no nested traceback text)."""
  text = str(e.args[0] if e.args else e)
  if "Traceback" in text:  # config_flags wraps a get_config error with its traceback
    head = text.split("Traceback")[0].strip().rstrip(":")
    text = f"{head}: {text.strip().splitlines()[-1].strip()}"
  text = " ".join(text.replace("\\n", " ").replace("\\'", "'").split()).strip("'\"")
  m = re.search(r"(\w+)'? Did you mean \"(\w+)\" instead", text)
  field = m.group(1) if m else (text if re.fullmatch(r"\w+", text) else None)
  if field is not None:  # ml_collections' message for an unknown field
    flag = next((a.split("=")[0] for a in argv if f".{field}=" in a or a.endswith(f".{field}")),
                f"--config...{field}")
    text = (f"unknown config field in {flag}" + (f" (did you mean {m.group(2)!r}?)" if m
                                                 else "") +
            "; the config file's docstring and get_config list every field")
  return f"{text} (command line: {' '.join(argv[1:])})"
