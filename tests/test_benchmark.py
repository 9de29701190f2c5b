"""The benchmark launcher runs end to end in its quick mode and writes well-formed outputs.

Benchmarks are not tests: nothing here asserts a time. The launcher runs in a subprocess, as a
user would run it, on a tiny network. Four methods cover its distinct paths (training alone,
the store-all reference, a checkpointed float hypergradient, the reversible one) in eight
compiles, about half a minute on two cores; a memory limit between unroll's plans at the two
lengths makes it skip unroll at the longer one, as the GPU run must at T = 10,000. The
forward-cost launcher runs beside it, as tiny.
"""

import json
import math
import os
import struct
import sys

import pytest

from background import Job

# Slow (every test reads the benchmark's subprocess run): the quick loop,
# -m "not slow", skips this module.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "benchmark.py")
METHODS = ["forward_exact", "unroll", "remat", "reversible"]
STEPS = [10, 20]
# XLA plans about 8 MB of temporaries for unroll at T = 10 and 16 MB at T = 20 (784-8-10,
# batch 200); every other method stays under 2 MB.
MEMORY_LIMIT_GB = 0.012
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


FORWARD_COST_METHODS = ["forward_float", "forward_exact", "reversible", "probe_float64_lanes",
                        "probe_state_traffic"]


def jobs(folder):
  out_dir, cost_dir = folder("benchmark"), folder("forward_cost")
  quick = Job(
      [sys.executable, SCRIPT, "--quick", f"--out_dir={out_dir}", "--sizes=784,8,10",
       "--steps=" + ",".join(map(str, STEPS)), "--methods=" + ",".join(METHODS),
       f"--memory_limit_gb={MEMORY_LIMIT_GB}", "--nomeasure_rss"], out_dir=out_dir,
      timeout=300)
  forward_cost = Job(
      [sys.executable, os.path.join(ROOT, "experiments", "forward_cost.py"),
       f"--out_dir={cost_dir}", "--widths=8", "--steps=6", "--repeats=1", "--num_train=600",
       "--methods=" + ",".join(FORWARD_COST_METHODS)], out_dir=cost_dir, timeout=300)
  return {"quick": quick, "forward_cost": forward_cost}


@pytest.fixture(scope="module")
def run(background_jobs):
  done = background_jobs.results(jobs)["quick"]
  assert done.returncode == 0, done.stderr[-4000:]
  with open(done.out_dir / "results.json") as f:
    results = json.load(f)
  return done.out_dir, results, done.stdout


def test_results_record_the_machine_and_configuration(run):
  _, results, _ = run
  assert results["complete"] is True
  for key in ("platform", "device_kind", "cpu", "jax", "date"):
    assert results["machine"][key]
  assert "--quick" in results["command"]
  config = results["config"]
  assert config["sizes"] == [784, 8, 10] and config["steps"] == STEPS
  assert config["methods"] == METHODS
  assert config["memory_limit_bytes"] == MEMORY_LIMIT_GB * 1e9
  assert results["num_weights"] == 784 * 8 + 8 + 8 * 10 + 10
  assert sorted(results["load_average"]) == sorted(map(str, STEPS))


def test_methods_that_fit_are_timed_and_the_others_only_planned(run):
  _, results, _ = run
  assert sorted(results["steps"]) == sorted(map(str, STEPS))
  limit = results["config"]["memory_limit_bytes"]
  for records in results["steps"].values():
    assert list(records) == METHODS
    for name, record in records.items():
      assert "error" not in record, (name, record.get("error"))
      memory = record["memory"]
      assert 0 < memory["temp_bytes"] <= memory["planned_bytes"]
      assert record["compile_s"] > 0 and record["trace_s"] > 0
      assert record["fits"] == (memory["planned_bytes"] <= limit)
      if record["fits"]:
        assert record["time_s"] > 0 and "not_run" not in record
        assert len(record["times_s"]) == results["config"]["repeats"]
      else:
        assert "time_s" not in record and "XLA's memory plan" in record["not_run"]
  assert results["steps"]["10"]["unroll"]["fits"]
  skipped = results["steps"]["20"]["unroll"]
  assert not skipped["fits"]
  # Its time is estimated from T = 10, linearly.
  assert skipped["time_estimate_from_steps"] == 10
  assert skipped["time_estimate_s"] == pytest.approx(
      2 * results["steps"]["10"]["unroll"]["time_s"])


def test_hypergradients_agree_and_bits_meet_the_bound(run):
  _, results, _ = run
  bound = math.log2(2**16 / round(0.9 * 2**16))
  assert results["bound_bits_per_weight_per_step"] == pytest.approx(bound)
  # Against unroll where it ran, else against the first float method that did.
  for key, reference in (("10", "unroll"), ("20", "remat")):
    records = results["steps"][key]
    for name in ("remat", "reversible"):
      assert records[name]["error_reference"] == reference
      assert records[name]["relative_error"]["max_per_leaf"] < 1e-4
    for name in ("reversible", "forward_exact"):
      stats = records[name]["stats"]
      assert stats["bits_per_weight_per_step"] == pytest.approx(bound, rel=0.01)
      assert not (stats["fixed_point_overflow"] or stats["buffer_overflow"])
      assert not stats["non_finite"]


def test_figures_are_png_files_and_the_table_is_printed(run):
  out_dir, _, stdout = run
  for name in ("time.png", "memory.png"):
    with open(out_dir / name, "rb") as f:
      header = f.read(24)
    assert header[:8] == PNG_SIGNATURE and header[12:16] == b"IHDR"
    width, height = struct.unpack(">II", header[16:24])
    assert width > 100 and height > 100
  assert "x unroll" in stdout and "not run" in stdout
  for name in METHODS:
    assert name in stdout


def test_forward_cost_times_each_method_and_the_probe_trains_like_the_methods(background_jobs):
  done = background_jobs.results(jobs)["forward_cost"]
  assert done.returncode == 0, done.stderr[-4000:]
  with open(done.out_dir / "results.json") as f:
    results = json.load(f)
  (network,) = results["networks"]
  assert network["sizes"] == [784, 8, 8, 8, 10] and network["num_weights"] == 6514
  assert list(network["median_s"]) == FORWARD_COST_METHODS
  assert all(t > 0 for t in network["median_s"].values())
  assert all(network["first_call_s"][m] >= network["median_s"][m] for m in FORWARD_COST_METHODS)
  assert set(network["ratios"]) == {"exact_over_float_training", "probe_over_float_training",
                                    "state_traffic_over_float_training"}
  # Exact training on either grid ends within float32 rounding of float training.
  values = network["values"]
  for method in ("forward_exact", "probe_float64_lanes"):
    assert math.isclose(values[method], values["forward_float"], rel_tol=1e-4), values
  # The traffic probe trains with nearby coefficients (momentum 0.875, learning rate 0.375).
  assert math.isclose(values["probe_state_traffic"], values["forward_float"], rel_tol=1e-3), values
  assert values["probe_state_traffic"] != values["forward_float"], values
  assert math.isfinite(values["reversible"])
  assert "exact_over_float_training" in done.stdout
