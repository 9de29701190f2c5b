"""End-to-end tests of the schedule experiments: each launcher, resume, the notebook.

The launchers run as subprocesses (their absl flags stay out of this process) in their quick
presets, beside the other tests (tests/background.py). The tests check the science: the
reseeded meta-run lowers the held-out training loss on seeds it never saw; a resumed run
repeats an uninterrupted one bit for bit; the seed-averaged hypergradients match plain
backprop. (The CPU time each launcher's docstring promises for its quick preset is measured
by experiments/benchmark_presets.py, not here.)
"""

import re
import shutil
import sys

import numpy as np
import pytest

from background import Job
from launchers import (EXPERIMENTS, FAST_COMPILE, REPO, assert_finite, assert_png, launcher,
                       quick, read_results, succeeded)

# Slow (every test reads a launcher's subprocess run): the quick loop,
# -m "not slow", skips this module.
pytestmark = pytest.mark.slow

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


def jobs(folder):
  """The launchers' quick runs, a run stopped halfway and resumed, the notebook.

  The halfway run and its resumption compile the programs of the uninterrupted run, which
  they load from its persistent compilation cache; the uninterrupted run compiles them itself.
  """
  # Compiled fast: the checks are about the science, and the resumed run is compared with an
  # uninterrupted run compiled alike.
  cache = {"JAX_COMPILATION_CACHE_DIR": str(folder("jax_cache")),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **FAST_COMPILE}
  started = folder("schedules_resumed")
  notebook = folder("notebook")
  return {
      "schedules": launcher("schedules.py", folder("schedules"), quick("schedules.py"),
                            env=cache),
      "seed_averaged": launcher("seed_averaged.py", folder("seed_averaged"),
                                quick("seed_averaged.py"), env=FAST_COMPILE),
      "notebook": Job([sys.executable, "-c", EXECUTE_NOTEBOOK, str(NOTEBOOK),
                       str(notebook / "explore.ipynb"), str(REPO)], out_dir=notebook),
      "schedules_first_half": launcher("schedules.py", started,
                                       quick("schedules.py", "meta_iterations=2"), env=cache,
                                       after=("schedules",)),
      # Resumed in the same folder, from the first half's checkpoint; the first half's
      # results.json is kept aside.
      "resumed": launcher("schedules.py", started, quick("schedules.py") + ["--resume"],
                          env=cache, after=("schedules_first_half",),
                          before=lambda: shutil.copy(started / "results.json",
                                                     started / "first_half.json")),
  }


@pytest.fixture(scope="module")
def runs(background_jobs):
  return background_jobs.results(jobs)


def load(runs, name):
  out_dir = succeeded(runs[name])
  return out_dir, read_results(out_dir)


def test_schedules_reseeded_meta_run_lowers_the_held_out_loss(runs):
  out_dir, results = load(runs, "schedules")
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
  started = succeeded(runs["schedules_first_half"])
  first_half = read_results(started, "first_half.json")
  assert len(first_half["meta_loss"]) == 2
  _, resumed = load(runs, "resumed")
  assert resumed["resumed_from_iteration"] == 2
  # Resuming restores the exact arrays and the per-iteration keys: bit for bit.
  assert resumed["meta_loss"] == uninterrupted["meta_loss"]
  assert resumed["held_out"] == uninterrupted["held_out"]
  assert resumed["learned"] == uninterrupted["learned"]


def test_seed_averaged_hypergradient_matches_backprop(runs):
  out_dir, results = load(runs, "seed_averaged")
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


def test_notebook_runs_top_to_bottom(runs):
  nbformat = pytest.importorskip("nbformat")
  pytest.importorskip("nbclient")
  executed = succeeded(runs["notebook"]) / "explore.ipynb"
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
