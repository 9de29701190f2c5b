"""The exactness-check launcher runs and reports exact round trips and gradient paths."""

import importlib
import math
import pathlib
import sys

import pytest

from launchers import launcher, read_results, succeeded

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"
FLAGS = "--xla_backend_optimization_level=0"


def jobs(folder):
  # A flag set that the launcher was not started with runs the checks in a fresh process.
  return {"quick": launcher("check_exactness.py", folder("check_exactness"),
                            ["--quick", f"--xla_flag_sets={FLAGS}"])}


@pytest.mark.slow  # the launcher, in subprocesses
def test_check_exactness_quick_under_added_xla_flags(background_jobs):
  report = read_results(succeeded(background_jobs.results(jobs)["quick"]))
  assert report["all_exact"] is True
  (run,) = report["runs"]
  assert run["added_xla_flags"] == FLAGS and FLAGS in run["xla_flags"]
  assert len(run["round_trips"]) == 4
  assert all(r["exact"] and r["max_abs_error"] == 0.0 for r in run["round_trips"])
  assert run["hypergradient"]["reversible_shared_relative_error"] < 1e-4
  assert run["hypergradient"]["reversible_unshared_relative_error"] < 1e-4


def test_a_nan_hypergradient_is_reported_as_not_exact():
  # Under jit a failed in-pass reversal check gives NaN, not an exception.
  sys.path.insert(0, str(EXPERIMENTS))
  try:
    check_exactness = importlib.import_module("check_exactness")
  finally:
    sys.path.remove(str(EXPERIMENTS))
  failed = check_exactness.gradient_path_verdict("reversible_shared", math.nan, 2.0)
  assert failed["reversible_shared_exact"] is False
  assert math.isnan(failed["reversible_shared_relative_error"])
  passed = check_exactness.gradient_path_verdict("reversible_shared", 2.0 + 2e-7, 2.0)
  assert passed["reversible_shared_exact"] is True
  assert passed["reversible_shared_relative_error"] < 1e-6
  run = dict(added_xla_flags="", hypergradient=dict(failed, reversible_unshared_exact=True),
             round_trips=[dict(share_gradient=True, exact=True),
                          dict(share_gradient=False, exact=True)])
  (line,) = check_exactness.summary([run])
  assert "shared: round trips exact, gradient path NOT exact" in line
  assert "unshared: round trips exact, gradient path exact" in line
