"""The exactness-check launcher runs and reports exact round trips and gradient paths."""

from launchers import launcher, read_results, succeeded


def jobs(folder):
  return {"quick": launcher("check_exactness.py", folder("check_exactness"), ["--quick"])}


def test_check_exactness_quick(background_jobs):
  report = read_results(succeeded(background_jobs.results(jobs)["quick"]))
  assert report["all_exact"] is True
  assert len(report["round_trips"]) == 4
  assert all(r["exact"] and r["max_abs_error"] == 0.0 for r in report["round_trips"])
  assert report["hypergradient"]["reversible_shared_relative_error"] < 1e-4
  assert report["hypergradient"]["reversible_unshared_relative_error"] < 1e-4
