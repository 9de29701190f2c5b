"""What the launcher smoke tests share: running a launcher and checking what it wrote.

Each launcher runs as a subprocess, so that its absl flags stay out of the test process.
"""

import json
import math
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def start_launcher(script, out_dir, flags, stdout=subprocess.PIPE, stderr=subprocess.STDOUT):
  """Starts ``experiments/<script>`` with ``--out_dir`` and ``flags``; returns the process."""
  return subprocess.Popen(
      [sys.executable, str(EXPERIMENTS / script), f"--out_dir={out_dir}", *flags], cwd=REPO,
      stdout=stdout, stderr=stderr, text=True)


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
