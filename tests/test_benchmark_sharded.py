"""The sharded benchmark runs end to end in its quick mode and writes well-formed results.

Benchmarks are not tests: nothing here asserts a time. The launcher runs in a subprocess with 8
simulated devices (it sets them itself where XLA_FLAGS names no device count), on a tiny
network: four compiles and four short runs, about half a minute on two cores.
"""

import json
import os
import sys

import pytest

from background import Job

# Slow (the test waits for the benchmark's subprocess run): the quick loop,
# -m "not slow", skips this module.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "benchmark_sharded.py")


def jobs(folder):
  out_dir = folder("benchmark_sharded")
  # conftest.py's one device must not reach the launcher: XLA_FLAGS is unset.
  return {"quick": Job([sys.executable, SCRIPT, "--quick", f"--out_dir={out_dir}"],
                       out_dir=out_dir, env={"PYTHONPATH": ROOT, "XLA_FLAGS": None},
                       timeout=300)}


def test_quick_run_writes_plans_times_and_errors(background_jobs):
  proc = background_jobs.results(jobs)["quick"]
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(proc.out_dir / "results.json") as f:
    results = json.load(f)
  assert results["complete"] is True
  assert results["machine"]["num_devices"] == 8 and results["config"]["devices"] == 8
  assert results["num_weights"] == 64 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10
  records = results["methods"]
  assert list(records) == ["unroll", "reversible", "reversible_one", "checkpoint"]
  # The quick run is small enough to run store-all backprop: the errors' reference, an
  # algorithm independent of the exact methods.
  assert results["error_reference"] == "unroll" and "error" not in records["unroll"]
  for name, record in records.items():
    memory = record["memory"]
    assert 0 < memory["temp_bytes"] <= memory["planned_bytes"]
    assert memory["loop_carry_bytes"] > 0
    assert record["time_s"] > 0
    if name != "unroll":
      assert record["error"] <= 1e-5
  # Float32 state and the exact grid round differently: a zero error would mean the methods
  # were compared with themselves.
  assert records["reversible_one"]["error"] > 0
  assert "reversible time, sharded / one device" in results["ratios"]
  assert "unroll plan / reversible plan (per device)" in results["ratios"]
  assert "reversible time, sharded / one device" in proc.stdout
