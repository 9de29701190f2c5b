"""Smoke tests of the figure 1, 8, 9, 10 and 11 launchers, each end to end.

The multitask launcher also runs on a miniature Omniglot written in the archives' layout, so
that its --omniglot_dir path is exercised without the real data.

Every launcher runs as a subprocess (its absl flags stay out of this process) in --quick mode
with further flags that shrink it below --quick (fewer steps, iterations and examples, smaller
nets), and the tests check what it wrote: results.json with the expected keys, finite numbers
where they must be, histories of the requested length, and valid PNG figures. The five
launchers start together and share the 2 cores, so the file's wall time is about that of the
slowest one rather than their sum.
"""

import math
import subprocess

import numpy as np
import pytest

from launchers import assert_finite, assert_png, read_results, start_launcher

TIMEOUT_S = 240

TINY = {
    "toy_valley": ["--quick", "--num_steps=10", "--meta_iterations=2"],
    "l2_per_weight": ["--quick", "--split=300,300", "--num_steps=5", "--batch_size=50",
                      "--meta_iterations=3"],
    "learn_data": ["--quick", "--split=300,300", "--num_steps=5", "--meta_iterations=3"],
    "multitask": ["--quick", "--num_steps=5", "--meta_iterations=2", "--layer_sizes=784,8,4,4",
                  "--train_per_class=5", "--valid_per_class=5", "--test_per_class=5",
                  "--tied_grid=-8,-6"],
    # The range reaches learning rates that diverge, so the sweep must mark failed runs.
    "chaos": ["--quick", "--num_rates=8", "--chunk=8", "--num_steps=5", "--batch_size=25",
              "--num_train=100", "--layer_sizes=784,10,10", "--window=3",
              "--log_rate_max=14"],
}


def fake_omniglot(folder):
  """A miniature Omniglot in the archives' extracted layout: 105x105 black-on-white drawings.

  images_background holds 5 alphabets of 2 characters, images_evaluation 1 alphabet; each
  character has 20 drawings, as in the real data.
  """
  from PIL import Image, ImageDraw  # Pillow comes with matplotlib
  rng = np.random.default_rng(0)
  layout = {"images_background": [f"Alphabet_{k}" for k in range(5)],
            "images_evaluation": ["Extra"]}
  for archive, alphabets in layout.items():
    for alphabet in alphabets:
      for character in ("character01", "character02"):
        char_dir = folder / archive / alphabet / character
        char_dir.mkdir(parents=True)
        strokes = rng.uniform(10, 95, size=(3, 4))  # the character's shape
        for drawing in range(20):
          img = Image.new("L", (105, 105), 255)
          pen = ImageDraw.Draw(img)
          for stroke in strokes + rng.normal(0, 3, size=strokes.shape):
            pen.line(tuple(stroke), fill=0, width=4)
          img.save(char_dir / f"{drawing:02d}.png")
  return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Starts every launcher at once; returns {name: (out_dir, returncode, stderr)}."""
  omniglot = fake_omniglot(tmp_path_factory.mktemp("omniglot"))
  tiny = dict(TINY, multitask_omniglot=[
      "--quick", f"--omniglot_dir={omniglot}", "--num_steps=3", "--meta_iterations=1",
      "--layer_sizes=784,8,4,3", "--tied_grid=-8"])
  started = {}
  for name, flags in tiny.items():
    out_dir = tmp_path_factory.mktemp(name)
    err = open(out_dir.parent / f"{name}.stderr", "w+")
    script = name.split("_omniglot")[0]
    proc = start_launcher(f"{script}.py", out_dir, flags, stdout=subprocess.DEVNULL, stderr=err)
    started[name] = (out_dir, proc, err)
  done = {}
  for name, (out_dir, proc, err) in started.items():
    try:
      returncode = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      proc.kill()
      returncode = proc.wait()
    err.seek(0)
    done[name] = (out_dir, returncode, err.read())
    err.close()
  return done


def load(runs, name):
  out_dir, returncode, stderr = runs[name]
  assert returncode == 0, stderr[-4000:]
  return out_dir, read_results(out_dir)


def assert_keys(results, keys):
  for key in keys:
    assert key in results, key


def test_toy_valley(runs):
  out_dir, results = load(runs, "toy_valley")
  assert_keys(results, ("settings", "data", "meta_loss", "history", "trajectories",
                        "learning_rates", "momenta", "final_loss_per_run", "wall_seconds"))
  assert_finite(results)
  assert results["num_hyperparameters"] == 2 * 10
  assert len(results["history"]) == 2
  assert len(results["meta_loss"]) == len(results["trajectories"]) == 3
  for path in results["trajectories"]:
    assert len(path) == 11 and all(len(point) == 2 for point in path)
    assert path[0] == pytest.approx(results["settings"]["start"])
  # Each trajectory ends at the weights whose loss is that run's meta-loss.
  assert results["final_loss_per_run"] == pytest.approx(results["meta_loss"], rel=1e-5)
  assert results["meta_loss"][-1] < results["meta_loss"][0]
  assert all(len(s) == 10 for s in results["learning_rates"] + results["momenta"])
  for name in ("trajectories", "schedules"):
    assert_png(out_dir / f"{name}.png")


def test_l2_per_weight(runs):
  out_dir, results = load(runs, "l2_per_weight")
  assert_keys(results, ("settings", "data", "meta_loss", "history", "before", "after",
                        "learned", "wall_seconds"))
  assert_finite(results)
  assert "bundled" in results["data"]
  assert results["settings"]["num_hyperparameters"] == 7850
  assert len(results["meta_loss"]) == len(results["history"]) == 3
  assert results["meta_loss"][0] == pytest.approx(results["before"]["valid_loss"], rel=1e-5)
  assert results["after"]["valid_loss"] < results["before"]["valid_loss"]
  assert results["no_penalty"]["valid_loss"] > 0
  assert len(results["uniform_search"]) == 8
  assert results["best_uniform_penalty"]["valid_loss"] == min(
      r["valid_loss"] for r in results["uniform_search"])
  penalty = results["learned"]["log_penalty_W"]
  assert len(penalty) == 784 and all(len(row) == 10 for row in penalty)
  assert len(results["learned"]["log_penalty_b"]) == 10
  for name in ("penalty_maps", "meta_learning_curve"):
    assert_png(out_dir / f"{name}.png")


def test_learn_data(runs):
  out_dir, results = load(runs, "learn_data")
  assert_keys(results, ("settings", "data", "meta_loss", "history", "before", "after",
                        "learned", "wall_seconds"))
  assert_finite(results)
  assert results["settings"]["num_hyperparameters"] == 10 * 784 + 1
  assert len(results["meta_loss"]) == len(results["history"]) == 3
  assert results["after"]["valid_loss"] < results["before"]["valid_loss"]
  images = results["learned"]["images"]
  assert len(images) == 10 and all(len(image) == 784 for image in images)
  assert results["learned"]["labels"] == list(range(10))
  assert results["learned"]["l2_penalty"] > 0
  for name in ("learned_images", "meta_learning_curve"):
    assert_png(out_dir / f"{name}.png")


def test_multitask(runs):
  out_dir, results = load(runs, "multitask")
  assert_keys(results, ("settings", "data", "task_names", "meta_loss", "history", "test_nll",
                        "separate", "tied", "learned", "learned_coupling", "learned_l2",
                        "wall_seconds"))
  assert_finite(results)
  # Without Omniglot the run must say plainly that it used a substitute.
  assert results["substitute"] is True
  assert "substitute" in results["data"] and "MNIST" in results["data"]
  assert len(results["task_names"]) == 10
  assert len(results["meta_loss"]) == len(results["history"]) == 2
  assert set(results["test_nll"]) == {"separate", "tied", "learned"}
  # The tied baseline is the best of its grid by validation NLL, and the learned run's start.
  assert [r["log_coupling"] for r in results["tied_search"]] == [-8, -6]
  best = min(results["tied_search"], key=lambda r: r["valid_nll"])
  assert results["tied_log_coupling"] == best["log_coupling"]
  assert results["meta_loss"][0] == pytest.approx(
      best["valid_nll"] * 10 * 4 * 5, rel=1e-4)  # summed over 10 tasks x 4 classes x 5
  assert all(v > 0 for v in results["test_nll"].values())
  for kind in ("separate", "tied", "learned"):
    assert len(results[kind]["per_task"]["test_nll"]) == 10
  coupling = results["learned_coupling"]
  assert len(coupling) == 3 and all(len(m) == 10 and all(len(r) == 10 for r in m)
                                    for m in coupling)
  assert all(coupling[l][i][i] == 0 for l in range(3) for i in range(10))
  assert all(coupling[l][i][j] == pytest.approx(coupling[l][j][i])
             for l in range(3) for i in range(10) for j in range(10))
  for name in ("coupling", "meta_learning_curve"):
    assert_png(out_dir / f"{name}.png")


def test_multitask_on_omniglot_layout(runs):
  out_dir, results = load(runs, "multitask_omniglot")
  assert_finite(results)
  assert results["substitute"] is False
  assert "Omniglot" in results["data"] and "substitute" not in results["data"]
  # The first 5 alphabets, then the same 5 rotated.
  assert results["task_names"][:5] == [f"Alphabet_{k}" for k in range(5)]
  assert results["task_names"][5:] == [f"Alphabet_{k} (rotated)" for k in range(5)]
  assert results["settings"]["examples_per_class"] == [10, 5, 5]
  assert len(results["learned"]["per_task"]["test_nll"]) == 10
  assert_png(out_dir / "coupling.png")


def test_chaos(runs):
  out_dir, results = load(runs, "chaos")
  assert_keys(results, ("settings", "data", "log_learning_rates", "training_loss",
                        "hypergradient", "finite_difference", "relative_disagreement",
                        "disagree", "fixed_point_overflow", "failed", "num_failed",
                        "chaos_onset_log_learning_rate", "best_log_learning_rate",
                        "wall_seconds"))
  for key in ("log_learning_rates", "training_loss", "hypergradient", "finite_difference",
              "disagree", "failed", "fixed_point_overflow"):
    assert len(results[key]) == 8, key
  ok = [not f for f in results["failed"]]
  assert ok[0], "the smallest learning rate must train"
  assert all(math.isfinite(v) for v, good in zip(results["training_loss"], ok) if good)
  # Diverging rates are recorded, not fatal: e^14 leaves the fixed-point range.
  assert results["num_failed"] == sum(results["failed"]) >= 1
  assert results["failed"][-1] and results["fixed_point_overflow"][-1]
  # No central difference at the ends of the grid.
  assert math.isnan(results["finite_difference"][0])
  assert math.isnan(results["finite_difference"][-1])
  onset = results["chaos_onset_log_learning_rate"]
  assert onset is not None and 0.5 <= onset <= 14
  assert_png(out_dir / "chaos.png")
