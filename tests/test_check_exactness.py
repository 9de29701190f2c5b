"""The exactness-check launcher runs and reports exact round trips and gradient paths."""

from launchers import finish, read_results, start_launcher


def test_check_exactness_quick(tmp_path):
  finish(start_launcher("check_exactness.py", tmp_path, ["--quick"]), timeout=600)
  report = read_results(tmp_path)
  assert report["all_exact"] is True
  assert len(report["round_trips"]) == 4
  assert all(r["exact"] and r["max_abs_error"] == 0.0 for r in report["round_trips"])
  assert report["hypergradient"]["reversible_shared_relative_error"] < 1e-4
  assert report["hypergradient"]["reversible_unshared_relative_error"] < 1e-4
