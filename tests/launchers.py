"""What the launcher smoke tests share: running a launcher and checking what it wrote.

Each launcher runs as a subprocess, so that its absl flags stay out of the test process: a job
of the session's background pool (tests/background.py). The CPU time of each quick preset is
measured against its docstring's promise by experiments/benchmark_presets.py, not by a test.
"""

import json
import math
import pathlib
import sys

from background import REPO, Job

EXPERIMENTS = REPO / "experiments"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The environment of runs whose checks do not depend on how XLA compiles by default
# (bit-exactness does): XLA's backend optimisation level 0 compiles in about half the time;
# the last bits of float results may differ.
FAST_COMPILE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1 "
                             "--xla_backend_optimization_level=0"}


def launcher(script, out_dir, flags, **job):
  """The job that runs ``experiments/<script>`` with ``--out_dir`` and ``flags``; ``job``:
  more fields of ``background.Job`` (env, after, before)."""
  return Job([sys.executable, str(EXPERIMENTS / script), f"--out_dir={out_dir}", *flags],
             out_dir=pathlib.Path(out_dir), **job)


def quick(script, *overrides):
  """The flags of ``script``'s quick preset, then ``--config.<field>=value`` overrides."""
  name = pathlib.Path(script).stem
  return [f"--config={EXPERIMENTS / 'configs' / name}.py:quick",
          *(f"--config.{o}" for o in overrides)]


def succeeded(done):
  """Asserts a finished job (tests/background.py) exited cleanly; returns its out_dir."""
  assert done.returncode == 0, done.output[-4000:]
  return done.out_dir


def read_results(out_dir, name="results.json"):
  with open(pathlib.Path(out_dir) / name) as f:
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
