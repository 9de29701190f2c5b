"""The model benchmark launcher runs end to end in its quick mode and writes well-formed results.

Benchmarks are not tests: nothing here asserts a time. Two subprocess runs, as a user would run
them, in the quick preset (T = 5, tiny widths, compiled at XLA's optimisation level 0): both
models with unroll and the reversible method and their round trips; and the transformer alone
with unroll's memory estimated from T = 2 and 3 against a limit it cannot meet, so that unroll
is skipped at T = 5, as the GPU preset must skip it at T = 10,000. Compiles dominate: about a
minute and a half of CPU time for both runs on two cores.
"""

import pytest

from launchers import FAST_COMPILE
from launchers import launcher
from launchers import read_results
from launchers import succeeded

# Slow (subprocesses): the quick loop, -m "not slow", skips this module.
pytestmark = pytest.mark.slow

SCRIPT = "model_benchmark.py"
METHODS = ["unroll", "reversible"]
HYPERPARAMETERS = {"resnet": ["log_init_scale", "log_learning_rate", "log_weight_decay"],
                   "transformer": ["dropout_rate", "log_init_scale", "log_learning_rate",
                                   "log_weight_decay"]}


def jobs(folder):
  return {
      "both": launcher(SCRIPT, folder("model_benchmark"),
                       ["--quick", "--methods=" + ",".join(METHODS)], env=FAST_COMPILE),
      "estimate": launcher(SCRIPT, folder("model_benchmark_estimate"),
                           ["--quick", "--model=transformer", "--methods=unroll",
                            "--estimate_steps=2,3", "--memory_limit_gb=1e-6",
                            "--noround_trip"], env=FAST_COMPILE),
  }


@pytest.fixture(scope="module")
def runs(background_jobs):
  done = background_jobs.results(jobs)
  return {name: (read_results(succeeded(d)), d.stdout) for name, d in done.items()}


def test_results_follow_the_shared_schema(runs):
  results, _ = runs["both"]
  assert results["schema"] == "revhyper.experiments.results/2"
  assert results["experiment"] == "model_benchmark"
  for key in ("commit", "jax_version", "backend"):
    assert key in results["provenance"]
  assert results["departures"] and results["written_at"] and results["complete"] is True
  config = results["config"]
  assert config["mode"] == "quick" and config["steps"] == 5
  assert config["models"] == ["resnet", "transformer"] and config["methods"] == METHODS


def test_every_model_is_timed_measured_and_checked(runs):
  results, stdout = runs["both"]
  for name, record in results["models"].items():
    assert record["num_weights"] > 0
    assert record["hyperparameters"] == HYPERPARAMETERS[name]
    assert list(record["methods"]) == METHODS
    for method, r in record["methods"].items():
      assert "error" not in r, (name, method, r.get("error"))
      assert r["fits"] and r["finite"] and r["time_s"] > 0 and r["compile_s"] > 0
      assert len(r["times_s"]) == results["config"]["repeats"]
      assert 0 < r["memory"]["temp_bytes"] <= r["memory"]["planned_bytes"]
      assert r["error_reference"] == "unroll"
      assert sorted(r["relative_error"]["per_hyperparameter"]) == HYPERPARAMETERS[name]
    reversible = record["methods"]["reversible"]
    assert reversible["relative_error"]["global"] < 1e-4
    assert reversible["time_over_unroll"] > 0 and reversible["temp_over_unroll"] > 0
    trip = record["round_trip"]
    assert trip["exact"] and trip["rebuilt_bit_for_bit"] and trip["buffer_empty"]
    assert not (trip["fixed_point_overflow"] or trip["buffer_overflow"] or trip["non_finite"])
    assert trip["bits_per_weight_per_step"] > 0
    assert f"{name}: {record['num_weights']} weights" in stdout
  assert "round trip: exact = True" in stdout


def test_unroll_is_estimated_and_skipped_where_it_cannot_fit(runs):
  results, stdout = runs["estimate"]
  record = results["models"]["transformer"]
  estimate = record["unroll_estimate"]
  assert estimate["from_steps"] == [2, 3] and sorted(estimate["plans"]) == ["2", "3"]
  # Linear in T: the plan at T = 3 plus two more steps.
  plans = estimate["plans"]
  slope = plans["3"]["temp_bytes"] - plans["2"]["temp_bytes"]
  assert estimate["temp_bytes"] == plans["3"]["temp_bytes"] + 2 * slope
  unroll = record["methods"]["unroll"]
  assert unroll["fits"] is False and "time_s" not in unroll and "memory" not in unroll
  assert "estimated" in unroll["not_run"]
  assert "round_trip" not in record
  assert "unroll estimate at T = 5" in stdout and "not run" in stdout
