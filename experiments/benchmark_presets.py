"""The CPU time of every launcher's quick preset, against what its docstring promises.

Each launcher's module docstring states the CPU time of its quick preset (``... # under N
CPU-seconds``). This script runs every quick preset in a fresh process, one at a time, with
the environment a user has (XLA's default compilation, one host device), and prints the
process's own CPU time (user and system, interpreter start and imports included) beside the
promise. CPU time moves far less with other processes on a shared machine than wall time
does, but it still moves: read a preset a few percent over its promise on a loaded machine
as a reason to rerun, and one well over as a broken promise.

  python experiments/benchmark_presets.py                          # every launcher, ~5 min
  python experiments/benchmark_presets.py --launchers=chaos,toy_valley --out=/tmp/presets.json

The exit status is 1 when a preset broke its promise or failed, so that CI can run it.
"""

import ast
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import threading

from absl import app
from absl import flags

EXPERIMENTS = pathlib.Path(__file__).resolve().parent
LAUNCHERS = ("schedules", "seed_averaged", "adam_schedules", "toy_valley", "l2_per_weight",
             "learn_data", "multitask", "chaos", "hpo_benchmark", "batchnorm_schedules")

_LAUNCHERS = flags.DEFINE_list("launchers", list(LAUNCHERS), "The launchers to run.")
_OUT = flags.DEFINE_string("out", None, "Optional path of a JSON file for the results.")
_TIMEOUT = flags.DEFINE_integer("timeout", 900, "Seconds before a preset's run is stopped.")


def promised_cpu_seconds(name):
  """The CPU time that ``experiments/<name>.py``'s docstring promises for its quick preset."""
  doc = ast.get_docstring(ast.parse((EXPERIMENTS / f"{name}.py").read_text()))
  match = re.search(r":quick.*?#[^\n]*under (\d+) CPU-seconds", doc or "", re.S)
  if match is None:
    raise ValueError(f"experiments/{name}.py's docstring states no time for its quick preset")
  return int(match.group(1))


def run_quick_preset(name, out_dir, timeout):
  """Runs the quick preset in a fresh process; returns ``(exit status, CPU seconds, stderr)``."""
  argv = [sys.executable, str(EXPERIMENTS / f"{name}.py"),
          f"--config={EXPERIMENTS / 'configs' / name}.py:quick", f"--out_dir={out_dir}"]
  # One host device, as a user's process has; a variable set for a multi-device run would
  # change what is measured.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  with tempfile.TemporaryFile("w+") as err:
    proc = subprocess.Popen(argv, cwd=EXPERIMENTS.parent, env=env, stdout=subprocess.DEVNULL,
                            stderr=err, text=True)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
      # wait4 reports the child's own resource usage, which getrusage would mix with others'.
      _, status, usage = os.wait4(proc.pid, 0)
    finally:
      timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped: Popen must not wait again
    err.seek(0)
    return proc.returncode, usage.ru_utime + usage.ru_stime, err.read()


def main(argv):
  del argv
  unknown = sorted(set(_LAUNCHERS.value) - set(LAUNCHERS))
  if unknown:
    raise app.UsageError(f"unknown launchers {unknown}; choose from {list(LAUNCHERS)}")
  rows, broken = [], []
  print(f"{'launcher':<16} {'CPU-s':>8} {'promise':>8} {'ratio':>6}  verdict", flush=True)
  with tempfile.TemporaryDirectory() as scratch:
    for name in _LAUNCHERS.value:
      promise = promised_cpu_seconds(name)
      code, seconds, stderr = run_quick_preset(name, pathlib.Path(scratch) / name,
                                               _TIMEOUT.value)
      verdict = "failed" if code != 0 else "kept" if seconds <= promise else "BROKEN"
      if verdict != "kept":
        broken.append(name)
      print(f"{name:<16} {seconds:>8.1f} {promise:>8d} {seconds / promise:>6.2f}  {verdict}",
            flush=True)
      if code != 0:
        print(stderr[-2000:], file=sys.stderr)
      rows.append({"launcher": name, "cpu_seconds": seconds, "promise": promise,
                   "returncode": code})
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(rows, f, indent=1)
  if broken:
    print(f"promises broken or runs failed: {', '.join(broken)}")
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
