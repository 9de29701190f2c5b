"""Smoke tests of the schedule experiments: each launcher end to end, resume, the notebook.

The launchers run as subprocesses (their absl flags stay out of this process) on settings
smaller than --quick: a 784-10-10 net, 5 training steps, a few hundred digits. Each run is
mostly single-threaded XLA compilation, so the runs that depend on nothing (the notebook, the
seed-averaged launcher, the first half of the resumed run) start together when this module's
first test starts, and the tests collect them: the file takes about as long as its longest
chain of runs, not the sum of all of them.
"""

import re
import subprocess
import sys

import pytest

from launchers import (EXPERIMENTS, REPO, assert_finite, assert_png, finish, read_results,
                       start_launcher)

NOTEBOOK = EXPERIMENTS / "explore.ipynb"
TIMEOUT_S = 600  # generous: compilation on a loaded 2-core machine

SCHEDULES_TINY = ["--quick", "--layer_sizes=784,10,10", "--num_steps=5", "--batch_size=50",
                  "--split=300,100,100"]
SEED_AVERAGED_TINY = ["--quick", "--layer_sizes=784,10,10", "--num_steps=5", "--batch_size=50",
                      "--num_train=300", "--num_seeds=2"]

EXECUTE_NOTEBOOK = """
import sys
import nbclient
import nbformat
nb = nbformat.read(sys.argv[1], as_version=4)
nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                        resources={"metadata": {"path": sys.argv[3]}}).execute()
nbformat.write(nb, sys.argv[2])
"""


def run_launcher(script, out_dir, flags):
  finish(start_launcher(script, out_dir, flags), TIMEOUT_S)
  return read_results(out_dir)


@pytest.fixture(scope="module", autouse=True)
def background(request, tmp_path_factory):
  """Starts the independent runs of the selected tests: {test name: (process, path)}."""
  selected = {item.name for item in request.session.items}
  jobs = {}
  if "test_notebook_runs_top_to_bottom" in selected:
    executed = tmp_path_factory.mktemp("notebook") / "explore.ipynb"
    jobs["test_notebook_runs_top_to_bottom"] = (subprocess.Popen(
        [sys.executable, "-c", EXECUTE_NOTEBOOK, str(NOTEBOOK), str(executed), str(REPO)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), executed)
  if "test_seed_averaged_writes_results_and_figure" in selected:
    out_dir = tmp_path_factory.mktemp("seed_averaged")
    jobs["test_seed_averaged_writes_results_and_figure"] = (
        start_launcher("seed_averaged.py", out_dir, SEED_AVERAGED_TINY), out_dir)
  if "test_schedules_resume_matches_uninterrupted_run" in selected:
    out_dir = tmp_path_factory.mktemp("schedules_resumed")
    jobs["test_schedules_resume_matches_uninterrupted_run"] = (
        start_launcher("schedules.py", out_dir, SCHEDULES_TINY + ["--meta_iterations=2"]),
        out_dir)
  yield jobs
  for proc, _ in jobs.values():
    if proc.poll() is None:
      proc.kill()
      proc.communicate()


@pytest.fixture
def started(request, background):
  """This test's run started by ``background``, once it has finished: its path."""
  proc, path = background[request.node.name]
  finish(proc, TIMEOUT_S)
  return path


@pytest.fixture(scope="module")
def schedules_run(tmp_path_factory):
  """An uninterrupted 4-iteration run: (out_dir, results)."""
  out_dir = tmp_path_factory.mktemp("schedules")
  return out_dir, run_launcher("schedules.py", out_dir, SCHEDULES_TINY + ["--meta_iterations=4"])


def test_schedules_writes_results_and_figures(schedules_run):
  out_dir, results = schedules_run
  for key in ("settings", "data", "meta_loss", "history", "before", "after", "learned",
              "inverse_sqrt_fan_in", "wall_seconds"):
    assert key in results, key
  assert_finite(results)
  assert results["settings"]["layer_sizes"] == [784, 10, 10]
  assert results["settings"]["num_hyperparameters"] == 2 * 4 * 5 + 4
  assert "bundled" in results["data"]
  assert len(results["meta_loss"]) == len(results["history"]) == 4
  assert results["after"]["train_loss"] < results["meta_loss"][0]  # meta-learning helps
  names = {"W1", "b1", "W2", "b2"}
  for kind in ("learning_rate", "momentum"):
    assert set(results["learned"][kind]) == names
    assert all(len(s) == 5 for s in results["learned"][kind].values())
  assert all(m >= 0.01 for s in results["learned"]["momentum"].values() for m in s)
  assert set(results["learned"]["init_scale"]) == names
  for split in ("train", "valid", "test"):
    assert 0 <= results["after"][f"{split}_error"] <= 1
  for name in ("learning_rates", "momenta", "meta_learning_curve", "init_scales"):
    assert_png(out_dir / f"{name}.png")


def test_schedules_resume_matches_uninterrupted_run(schedules_run, started):
  _, uninterrupted = schedules_run
  first_half = read_results(started)
  assert len(first_half["meta_loss"]) == 2
  resumed = run_launcher("schedules.py", started,
                         SCHEDULES_TINY + ["--meta_iterations=4", "--resume"])
  assert resumed["resumed_from_iteration"] == 2
  # Resuming restores the exact arrays: the runs agree bit for bit, not approximately.
  assert resumed["meta_loss"] == uninterrupted["meta_loss"]
  assert resumed["after"] == uninterrupted["after"]
  assert resumed["learned"] == uninterrupted["learned"]


def test_seed_averaged_writes_results_and_figure(started):
  results = read_results(started)
  for key in ("settings", "data", "final_training_loss", "mean_hypergradient",
              "standard_error", "per_seed_hypergradient", "wall_seconds"):
    assert key in results, key
  assert_finite(results)
  assert len(results["final_training_loss"]) == 2
  for name, mean in results["mean_hypergradient"].items():
    assert len(mean) == 5, name
    assert len(results["per_seed_hypergradient"][name]) == 2, name
  assert any(abs(x) > 0 for mean in results["mean_hypergradient"].values() for x in mean)
  assert_png(started / "seed_averaged_hypergradients.png")


def test_notebook_runs_top_to_bottom(started):
  nbformat = pytest.importorskip("nbformat")
  source = nbformat.read(NOTEBOOK, as_version=4)
  assert all(not cell.get("outputs") for cell in source.cells if cell.cell_type == "code")
  nb = nbformat.read(started, as_version=4)
  text = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                 for out in cell.outputs)
  assert "initial state rebuilt exactly: True" in text
  relative_error = re.search(r"relative error of the hypergradient: (\S+)", text)
  assert relative_error and float(relative_error.group(1)) < 1e-4, text
  assert any("image/png" in out.get("data", {}) for cell in nb.cells
             if cell.cell_type == "code" for out in cell.outputs)
