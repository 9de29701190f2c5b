"""The accuracy launcher runs end to end in its quick mode, and reversal is as accurate as backprop.

The launcher runs in a subprocess, as a user would run it, on one tiny network (784-16-10,
T = 10): both optimizers, both precisions, three float32 methods and a float64 reference each.
On a CPU the precisions give the same numbers, and exact reversal's hypergradient must be as
close to float64 as float32 backprop's.
"""

import json
import os
import sys

import pytest

from background import Job

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "accuracy.py")
METHODS = ["reversible", "checkpoint", "unroll"]


def jobs(folder):
  out_dir = folder("accuracy")
  checkpoint_dir = folder("accuracy_checkpoint_reference")
  return {"quick": Job([sys.executable, SCRIPT, "--quick", f"--out_dir={out_dir}"],
                       out_dir=out_dir, timeout=600),
          # The float64 reference by sqrt(T) checkpointing, for networks whose float64 unroll
          # would not fit: the same gradient, so the same errors.
          "checkpoint_reference": Job(
              [sys.executable, SCRIPT, "--quick", "--optimizers=adam", "--precisions=highest",
               "--methods=unroll", "--reference=checkpoint", f"--out_dir={checkpoint_dir}"],
              out_dir=checkpoint_dir, timeout=600)}


def load(done):
  assert done.returncode == 0, done.stderr[-4000:]
  with open(done.out_dir / "results.json") as f:
    return json.load(f), done.stdout


@pytest.fixture(scope="module")
def run(background_jobs):
  return load(background_jobs.results(jobs)["quick"])


def test_results_record_the_machine_and_every_row(run):
  results, stdout = run
  assert results["complete"] is True
  for key in ("backend", "device_kind", "jax"):
    assert results["machine"][key]
  config = results["config"]
  assert config["quick"] and config["sizes"] == [[784, 16, 10]] and config["steps"] == 10
  rows = results["rows"]
  keys = {(r["optimizer"], tuple(r["sizes"]), r["precision"], r["method"]) for r in rows}
  assert keys == {(o, (784, 16, 10), p, m) for o in ("sgd", "adam")
                  for p in ("default", "highest") for m in METHODS}
  assert len(rows) == len(keys) and len(results["references"]) == 2
  for row in rows:
    assert row["finite"] and row["num_weights"] == 784 * 16 + 16 + 16 * 10 + 10
    error = row["vs_float64"]
    assert set(error["groups"]) == {"log_learning_rate", "log_init_scale", "log_l2"}
    assert error["worst_group_error"] == max(error["groups"].values())
    assert ("vs_unroll" in row) == (row["method"] == "reversible")
  assert "vs float64" in stdout and "results in" in stdout


def test_reversal_is_as_accurate_as_backprop_on_the_cpu(run):
  results, stdout = run
  if results["machine"]["backend"] != "cpu":
    pytest.skip("the bounds hold for float32 products, the CPU's at every precision")
  assert results["precisions_agree"] and "gave the same numbers" in stdout
  rows = {(r["optimizer"], r["precision"], r["method"]): r["vs_float64"]["global"]
          for r in results["rows"]}
  for (optimizer, precision, method), error in rows.items():
    if method == "reversible":
      unroll = rows[(optimizer, precision, "unroll")]
      assert error < 1e-5, (optimizer, precision, error)
      assert error <= max(2 * unroll, 1e-6), (optimizer, precision, error, unroll)


def test_a_checkpointed_float64_reference_gives_unrolls_errors(run, background_jobs):
  unrolled, _ = run
  checkpointed, stdout = load(background_jobs.results(jobs)["checkpoint_reference"])
  assert checkpointed["config"]["reference"] == "checkpoint"
  assert [r["method"] for r in checkpointed["references"]] == ["checkpoint"]
  assert [r["method"] for r in unrolled["references"]] == ["unroll", "unroll"]
  assert "against float64 checkpoint" in stdout
  (row,) = checkpointed["rows"]
  (same,) = [r for r in unrolled["rows"] if (r["optimizer"], r["precision"], r["method"])
             == ("adam", "highest", "unroll")]
  # float64 checkpointing and unroll differ by float64 rounding, far below float32's errors.
  assert row["vs_float64"]["global"] == pytest.approx(same["vs_float64"]["global"], rel=1e-6)
  (reference,) = checkpointed["references"]
  assert reference["norm"] == pytest.approx(unrolled["references"][1]["norm"], rel=1e-12)
