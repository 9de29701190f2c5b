"""End-to-end tests of the schedule experiments: each launcher, resume, the notebook.

The launchers run as subprocesses (their absl flags stay out of this process) in their quick
presets, two at a time. The tests check the science: the reseeded meta-run lowers the held-out
training loss on seeds it never saw; a resumed run repeats an uninterrupted one bit for bit;
the seed-averaged hypergradients match plain backprop; and each quick run finishes within the
time its docstring states.
"""

import re
import subprocess
import sys

import numpy as np
import pytest

from launchers import (EXPERIMENTS, REPO, assert_finite, assert_png, claimed_quick_seconds,
                       quick, read_results, run_all)

NOTEBOOK = EXPERIMENTS / "explore.ipynb"

EXECUTE_NOTEBOOK = """
import sys
import nbclient
import nbformat
nb = nbformat.read(sys.argv[1], as_version=4)
nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                        resources={"metadata": {"path": sys.argv[3]}}).execute()
nbformat.write(nb, sys.argv[2])
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  jobs = {
      "schedules": ("schedules.py", tmp_path_factory.mktemp("schedules"),
                    quick("schedules.py")),
      "schedules_first_half": ("schedules.py", tmp_path_factory.mktemp("schedules_resumed"),
                               quick("schedules.py", "meta_iterations=2")),
      "seed_averaged": ("seed_averaged.py", tmp_path_factory.mktemp("seed_averaged"),
                        quick("seed_averaged.py")),
  }
  return run_all(jobs)


def load(runs, name, script=None):
  out_dir, returncode, output, cpu_seconds = runs[name]
  assert returncode == 0, output[-4000:]
  if script is not None:
    assert cpu_seconds <= claimed_quick_seconds(script), f"{name}: {cpu_seconds:.0f} CPU-s"
  return out_dir, read_results(out_dir)


def test_schedules_reseeded_meta_run_lowers_the_held_out_loss(runs):
  out_dir, results = load(runs, "schedules", "schedules.py")
  assert_finite(results)
  config = results["config"]
  assert config["reseed"] is True and config["meta_optimizer"] == "paper_adam"
  assert results["num_hyperparameters"] == 2 * 4 * config["num_steps"] + 4
  assert len(results["history"]) == config["meta_iterations"]
  before, after = results["held_out"]["before"], results["held_out"]["after"]
  assert before["train_loss"]["n"] == config["eval_seeds"] >= 20
  # On seeds never seen in meta-training, the learned hyperparameters train better: the
  # improvement is many standard deviations, not a lucky draw.
  gap = before["train_loss"]["mean"] - after["train_loss"]["mean"]
  assert gap > 3 * (before["train_loss"]["sd"] + after["train_loss"]["sd"])
  assert after["test_error"]["mean"] < before["test_error"]["mean"]
  curves = results["learning_curves"]
  assert len(curves["steps"]) == len(curves["after"][0]) and len(curves["after"]) >= 20
  assert np.mean(curves["after"], axis=0)[-1] < np.mean(curves["before"], axis=0)[-1]
  assert all(m >= config["min_momentum"] for s in results["learned"]["momentum"].values()
             for m in s)
  for name in ("learning_rates", "momenta", "learning_curves", "meta_learning_curve",
               "init_scales"):
    assert_png(out_dir / f"{name}.png")


def test_schedules_resume_matches_uninterrupted_run(runs):
  _, uninterrupted = load(runs, "schedules")
  started, first_half = load(runs, "schedules_first_half")
  assert len(first_half["meta_loss"]) == 2
  resumed = run_all({"resumed": ("schedules.py", started, quick("schedules.py") + ["--resume"])})
  _, returncode, output, _ = resumed["resumed"]
  assert returncode == 0, output[-4000:]
  resumed = read_results(started)
  assert resumed["resumed_from_iteration"] == 2
  # Resuming restores the exact arrays and the per-iteration keys: bit for bit.
  assert resumed["meta_loss"] == uninterrupted["meta_loss"]
  assert resumed["held_out"] == uninterrupted["held_out"]
  assert resumed["learned"] == uninterrupted["learned"]


def test_seed_averaged_hypergradient_matches_backprop(runs):
  out_dir, results = load(runs, "seed_averaged", "seed_averaged.py")
  assert_finite(results)
  config = results["config"]
  assert results["check_against_unroll"]["seeds"] >= 1
  assert results["check_against_unroll"]["max_relative_difference"] < 1e-4
  assert results["final_training_loss"]["n"] == config["num_seeds"]
  for kind in ("log_learning_rate", "logit_momentum"):
    for name, mean in results["mean_hypergradient"][kind].items():
      assert len(mean) == config["num_steps"], name
  # Raising every learning rate lowers the final loss at this starting point.
  assert sum(np.sum(m) for m in results["mean_hypergradient"]["log_learning_rate"].values()) < 0
  assert_png(out_dir / "seed_averaged_hypergradients.png")


def test_notebook_runs_top_to_bottom(tmp_path):
  nbformat = pytest.importorskip("nbformat")
  pytest.importorskip("nbclient")
  executed = tmp_path / "explore.ipynb"
  subprocess.run([sys.executable, "-c", EXECUTE_NOTEBOOK, str(NOTEBOOK), str(executed),
                  str(REPO)], cwd=REPO, check=True, timeout=600, capture_output=True)
  source = nbformat.read(NOTEBOOK, as_version=4)
  assert all(not cell.get("outputs") for cell in source.cells if cell.cell_type == "code")
  nb = nbformat.read(executed, as_version=4)
  text = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                 for out in cell.outputs)
  assert "initial state rebuilt exactly: True" in text
  relative_error = re.search(r"relative error of the hypergradient: (\S+)", text)
  assert relative_error and float(relative_error.group(1)) < 1e-4, text
  assert any("image/png" in out.get("data", {}) for cell in nb.cells
             if cell.cell_type == "code" for out in cell.outputs)
