"""The exactness-check launcher runs and reports exact round trips and gradient paths."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_check_exactness_quick(tmp_path):
  subprocess.run([sys.executable, str(ROOT / "experiments" / "check_exactness.py"), "--quick",
                  f"--out_dir={tmp_path}"], check=True, cwd=ROOT, capture_output=True,
                 timeout=600)
  report = json.loads((tmp_path / "results.json").read_text())
  assert report["all_exact"] is True
  assert len(report["round_trips"]) == 4
  assert all(r["exact"] and r["max_abs_error"] == 0.0 for r in report["round_trips"])
  assert report["hypergradient"]["reversible_shared_relative_error"] < 1e-4
  assert report["hypergradient"]["reversible_unshared_relative_error"] < 1e-4
