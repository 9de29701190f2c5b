"""What the launcher smoke tests share: running a launcher and checking what it wrote.

Each launcher runs as a subprocess, so that its absl flags stay out of the test process.
"""

import ast
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def start_launcher(script, out_dir, flags, stdout=subprocess.PIPE, stderr=subprocess.STDOUT):
  """Starts ``experiments/<script>`` with ``--out_dir`` and ``flags``; returns the process."""
  return subprocess.Popen(
      [sys.executable, str(EXPERIMENTS / script), f"--out_dir={out_dir}", *flags], cwd=REPO,
      stdout=stdout, stderr=stderr, text=True)


def quick(script, *overrides):
  """The flags of ``script``'s quick preset, then ``--config.<field>=value`` overrides."""
  name = pathlib.Path(script).stem
  return [f"--config={EXPERIMENTS / 'configs' / name}.py:quick",
          *(f"--config.{o}" for o in overrides)]


def claimed_quick_seconds(script):
  """The CPU time the launcher's docstring promises for its quick preset: '... # under N
  CPU-seconds'."""
  doc = ast.get_docstring(ast.parse((EXPERIMENTS / script).read_text()))
  match = re.search(r":quick.*?#[^\n]*under (\d+) CPU-seconds", doc, re.S)
  assert match, f"{script}'s docstring states no time for its quick preset"
  return int(match.group(1))


def run_all(jobs, parallel=2, timeout=600):
  """Runs ``{name: (script, out_dir, flags)}``, at most ``parallel`` at once (one per core).

  Returns ``{name: (out_dir, returncode, output, cpu_seconds)}``: cpu_seconds is the user and
  system time of the launcher's process (interpreter start and imports included), which other
  processes on a shared machine change far less than its wall time.
  """
  pending, running, done = list(jobs.items()), {}, {}
  while pending or running:
    while pending and len(running) < parallel:
      name, (script, out_dir, flags) = pending.pop(0)
      log = open(pathlib.Path(out_dir).parent / f"{pathlib.Path(out_dir).name}.log", "w+")
      running[name] = (start_launcher(script, out_dir, flags, stdout=log, stderr=log),
                       out_dir, log, time.monotonic())
    time.sleep(0.2)
    for name, (proc, out_dir, log, started) in list(running.items()):
      # wait4 reaps the process and reports its own resource usage.
      pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
      if pid == 0:
        if time.monotonic() - started > timeout:
          proc.kill()
        continue
      proc.returncode = os.waitstatus_to_exitcode(status)
      log.seek(0)
      done[name] = (out_dir, proc.returncode, log.read(), usage.ru_utime + usage.ru_stime)
      log.close()
      del running[name]
  return done


def finish(proc, timeout):
  """Waits for a process from ``start_launcher`` and asserts it succeeded."""
  output, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, output[-4000:]


def read_results(out_dir):
  with open(pathlib.Path(out_dir) / "results.json") as f:
    return json.load(f)


def assert_finite(tree, where="results"):
  """Every float in a results tree (dicts and lists) is finite."""
  if isinstance(tree, dict):
    for k, v in tree.items():
      assert_finite(v, f"{where}.{k}")
  elif isinstance(tree, list):
    for i, v in enumerate(tree):
      assert_finite(v, f"{where}[{i}]")
  elif isinstance(tree, float):
    assert math.isfinite(tree), where


def assert_png(path):
  """A PNG file with some content, not an empty figure."""
  data = pathlib.Path(path).read_bytes()
  assert data[:8] == PNG_SIGNATURE, path
  assert len(data) > 10_000, f"{path} is only {len(data)} bytes"
