"""Smoke test of the BatchNorm convnet's schedules launcher, end to end on its quick preset."""

import pytest

from launchers import (FAST_COMPILE, assert_finite, assert_png, launcher, quick, read_results,
                       succeeded)

# Slow (the test reads a launcher's subprocess run): the quick loop, -m "not slow", skips it.
pytestmark = pytest.mark.slow

QUICK = quick("batchnorm_schedules.py", "meta_iterations=2", "eval_seeds=2")


def jobs(folder):
  return {"quick": launcher("batchnorm_schedules.py", folder("batchnorm_schedules"), QUICK,
                           env=FAST_COMPILE)}


@pytest.fixture(scope="module")
def run(background_jobs):
  out_dir = succeeded(background_jobs.results(jobs)["quick"])
  return out_dir, read_results(out_dir)


def test_results_hold_the_history_the_learned_settings_and_the_comparison(run):
  _, results = run
  assert_finite(results)
  # The shared schema: provenance and the resolved config, overrides included.
  assert results["schema"] == "revhyper.experiments.results/2"
  assert {"commit", "jax_version", "backend"} <= set(results["provenance"])
  config = results["config"]
  assert config["split"] == [500, 200, 200] and config["eval_seeds"] == 2
  assert results["departures"]
  assert [r["iteration"] for r in results["history"]] == [0, 1]
  layers = ["stem", "block1.conv1", "block1.conv2", "head"]
  assert results["layers"] == layers
  learned = results["learned"]
  for name in ("learning_rate", "weight_decay"):
    assert sorted(learned[name]) == sorted(layers)
    assert all(len(v) == config["num_steps"] for v in learned[name].values())
  assert learned["shift_pixels"] > 0
  # Per layer, knots of the log learning rate and log weight decay, and the log shift.
  assert results["num_hyperparameters"] == 2 * len(layers) * config["knots"] + 1
  comparison = results["comparison"]
  assert {"learned", "learned_schedules_without_augmentation",
          "optax_adamw_defaults"} <= set(comparison)
  assert any(name.startswith("best_constant_lr_") for name in comparison)
  for c in comparison.values():
    assert c["test_error"]["n"] == 2 and 0 <= c["test_error"]["mean"] <= 1
  assert set(results["grid_valid_error"]) == {"0.001", "0.01"}


def test_figures_are_written(run):
  out_dir, _ = run
  for name in ("learning_rates", "weight_decays", "meta_learning_curve", "test_error"):
    assert_png(out_dir / f"{name}.png")
