"""End-to-end tests of the figure 1, 8, 9, 10 and 11 launchers in their quick presets.

Each launcher runs as a subprocess (its absl flags stay out of this process) with
``--config=experiments/configs/<launcher>.py:quick``, beside the other tests
(tests/background.py), and the tests check the science the launcher claims, not only its
files: meta-learning lowers the held-out loss, learned task sharing beats the paper's tied
baseline on validation, the chaos sweep's hypergradients match finite differences at small
learning rates and diverging runs are flagged without stopping the sweep. (The CPU time each
launcher's docstring promises for its quick preset is measured by
experiments/benchmark_presets.py, not here.)
The multitask launcher also runs on a miniature Omniglot written in the archives' layout.
"""

import math

import numpy as np
import pytest

from launchers import (FAST_COMPILE, assert_finite, assert_png, launcher, quick, read_results,
                       succeeded)

# Slow (every test reads a launcher's subprocess run): the quick loop,
# -m "not slow", skips this module.
pytestmark = pytest.mark.slow

SCHEMA = "revhyper.experiments.results/2"


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


def jobs(folder):
  """Every launcher's quick preset, and two variants, the longest first (tests/background.py);
  all compiled fast, since their checks are about the science, not the last bits."""
  omniglot = fake_omniglot(folder("omniglot"))
  jobs = {
      "multitask": launcher("multitask.py", folder("multitask"), quick("multitask.py"),
                            env=FAST_COMPILE),
      "multitask_omniglot": launcher(
          "multitask.py", folder("multitask_omniglot"),
          quick("multitask.py", f"omniglot_dir={omniglot}", "meta_iterations=1", "eval_seeds=2",
                "baseline_log_l2_grid=(-4.0,)", "num_steps=3"), env=FAST_COMPILE),
  }
  for name in ("l2_per_weight", "learn_data", "chaos"):
    jobs[name] = launcher(f"{name}.py", folder(name), quick(f"{name}.py"), env=FAST_COMPILE)
  # The chaos grid reaches learning rates that diverge: they must be flagged, not fatal.
  jobs["chaos_diverging"] = launcher("chaos.py", folder("chaos_diverging"), quick(
      "chaos.py", "num_rates=6", "chunk=6", "log_rate_max=14.0", "num_steps=5"),
      env=FAST_COMPILE)
  jobs["toy_valley"] = launcher("toy_valley.py", folder("toy_valley"), quick("toy_valley.py"),
                                env=FAST_COMPILE)
  return jobs


@pytest.fixture(scope="module")
def runs(background_jobs):
  """{name: Done} of every job above."""
  return background_jobs.results(jobs)


def load(runs, name):
  out_dir = succeeded(runs[name])
  results = read_results(out_dir)
  assert results["schema"] == SCHEMA
  assert results["provenance"]["jax_version"] and results["provenance"]["backend"]
  assert results["config"] and isinstance(results["departures"], list)
  return out_dir, results


def test_toy_valley_meta_learning_lowers_the_final_loss(runs):
  out_dir, results = load(runs, "toy_valley")
  assert_finite(results)
  assert results["config"]["start"] == [1.4, 3.9]
  assert results["num_hyperparameters"] == 100
  assert len(results["trajectories"]) == 4 and len(results["trajectories"][0]) == 51
  assert results["trajectories"][0][0] == pytest.approx([1.4, 3.9])
  # Each trajectory ends at the weights whose loss is that run's meta-loss.
  assert results["final_loss_per_run"] == pytest.approx(results["meta_loss"], rel=1e-4)
  assert min(results["meta_loss"][1:]) < results["meta_loss"][0] - 10.0
  for name in ("trajectories", "schedules"):
    assert_png(out_dir / f"{name}.png")


def test_l2_per_weight_learned_penalties_on_held_out_seeds(runs):
  out_dir, results = load(runs, "l2_per_weight")
  assert_finite(results)
  assert results["num_hyperparameters"] == 7850
  held_out = results["held_out"]
  assert set(held_out) == {"initial", "learned", "best_uniform", "no_penalty"}
  for setting in held_out.values():
    assert setting["test_loss"]["n"] == results["config"]["eval_seeds"] >= 20
  # The meta-objective is fitted on the meta-training draw; on fresh draws the validation
  # loss still goes down.
  assert (held_out["learned"]["valid_loss"]["mean"]
          < held_out["initial"]["valid_loss"]["mean"])
  assert results["history"][-1]["aux"]["valid_nll"] < results["history"][0]["aux"]["valid_nll"]
  penalty = np.asarray(results["learned"]["log_penalty_W"])
  assert penalty.shape == (784, 10)
  for name in ("penalty_maps", "meta_learning_curve"):
    assert_png(out_dir / f"{name}.png")


def test_learn_data_learned_images_help_on_held_out_seeds(runs):
  out_dir, results = load(runs, "learn_data")
  assert_finite(results)
  assert results["num_hyperparameters"] == 10 * 784 + 1
  before, after = results["held_out"]["before"], results["held_out"]["after"]
  assert after["test_loss"]["mean"] + 3 * after["test_loss"]["sd"] < before["test_loss"]["mean"]
  assert np.asarray(results["learned"]["images"]).shape == (10, 784)
  for name in ("learned_images", "meta_learning_curve"):
    assert_png(out_dir / f"{name}.png")


def test_multitask_learned_sharing_beats_tied_on_validation(runs):
  out_dir, results = load(runs, "multitask")
  assert_finite(results)
  assert results["substitute"] is True and "stand-in" in results["data"]
  held_out = results["held_out"]
  assert held_out["learned"]["valid_nll"]["n"] >= 20
  assert held_out["learned"]["valid_nll"]["mean"] < held_out["tied"]["valid_nll"]["mean"]
  assert held_out["learned"]["valid_nll"]["mean"] < held_out["initial"]["valid_nll"]["mean"]
  # Both baselines were tuned over the whole grid.
  grid = results["config"]["baseline_log_l2_grid"]
  for name in ("separate", "tied"):
    assert [r["log_l2"] for r in results["baseline_l2_search"][name]] == grid
  mixing = np.asarray(results["learned_mixing"])
  assert mixing.shape == (3, 10, 10)
  for name in ("coupling", "comparison"):
    assert_png(out_dir / f"{name}.png")


def test_multitask_on_omniglot_layout(runs):
  out_dir, results = load(runs, "multitask_omniglot")
  assert_finite(results)
  assert results["substitute"] is False
  assert "Omniglot" in results["data"] and "stand-in" not in results["data"]
  assert results["task_names"][:5] == [f"Alphabet_{k}" for k in range(5)]
  assert results["task_names"][5:] == [f"Alphabet_{k} (rotated)" for k in range(5)]
  assert results["layer_sizes"][-1] == 2  # two characters per alphabet
  assert_png(out_dir / "coupling.png")


def test_chaos_hypergradient_matches_finite_differences_at_small_rates(runs):
  out_dir, results = load(runs, "chaos")
  assert results["config"]["centre_inputs"] is False
  log_rates = np.asarray(results["log_learning_rates"])
  rel = np.asarray(results["relative_disagreement"], dtype=float)
  small = (log_rates < 1.2) & np.isfinite(rel)
  assert small.sum() >= 5
  assert np.all(rel[small] < 0.05), rel[small]
  # Past the best rate the loss surface is chaotic: the criterion finds an onset there.
  onset = results["chaos_onset_log_learning_rate"]
  assert onset is not None and onset > 1.2
  assert results["hypergradient_exceeds_threshold_log_learning_rate"] is not None
  assert_png(out_dir / "chaos.png")


def test_chaos_flags_diverging_runs_without_stopping(runs):
  _, results = load(runs, "chaos_diverging")
  failed = results["failed"]
  assert len(failed) == 6 and not failed[0] and failed[-1]
  assert results["num_failed"] == sum(failed) >= 1
  assert math.isfinite(results["training_loss"][0])
  assert math.isnan(results["finite_difference"][0])  # no central difference at the ends
