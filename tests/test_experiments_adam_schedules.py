"""Smoke test of the AdamW schedules launcher, end to end on settings below its quick preset."""

import pytest

from launchers import (FAST_COMPILE, assert_finite, assert_png, launcher, quick, read_results,
                       succeeded)

# Slow (every test reads a launcher's subprocess run): the quick loop,
# -m "not slow", skips this module.
pytestmark = pytest.mark.slow

TINY = quick("adam_schedules.py", "layer_sizes=784,10,10", "num_steps=5", "batch_size=50",
             "split=300,100,100", "meta_iterations=2", "eval_seeds=2", "grid=1e-3,1e-2")


def jobs(folder):
  return {"tiny": launcher("adam_schedules.py", folder("adam_schedules"), TINY,
                          env=FAST_COMPILE)}


@pytest.fixture(scope="module")
def run(background_jobs):
  out_dir = succeeded(background_jobs.results(jobs)["tiny"])
  return out_dir, read_results(out_dir)


def test_results_hold_the_history_the_learned_schedules_and_the_comparison(run):
  _, results = run
  assert_finite(results)
  # The shared schema: provenance and the resolved config, overrides included.
  assert results["schema"] == "revhyper.experiments.results/2"
  assert {"commit", "jax_version", "backend"} <= set(results["provenance"])
  config = results["config"]
  assert config["split"] == [300, 100, 100] and config["meta_iterations"] == 2
  assert config["grid"] == [1e-3, 1e-2] and results["departures"]
  assert [r["iteration"] for r in results["history"]] == [0, 1]
  learned = results["learned"]
  assert sorted(learned["learning_rate"]) == ["W1", "W2", "b1", "b2"]
  assert all(len(v) == 5 for v in learned["learning_rate"].values())
  assert 0.5 <= learned["b1"] <= 1 and 0.5 <= learned["b2"] <= 1
  comparison = results["comparison"]
  assert {"learned", "optax_adamw_defaults"} <= set(comparison)
  best = [name for name in comparison if name.startswith("best_constant_lr_")]
  assert len(best) == 1
  # warm_start (the default): meta-training starts at the grid's best rate by validation error.
  grid_valid = results["grid_valid_error"]
  best_rate = min(grid_valid, key=grid_valid.get)
  assert config["warm_start"] and best[0] == f"best_constant_lr_{best_rate}"
  assert results["meta_training_start_learning_rate"] == float(best_rate)
  for c in comparison.values():
    assert len(c["test_error"]["per_seed"]) == 2 and 0 <= c["test_error"]["mean"] <= 1


def test_figures_are_written(run):
  out_dir, _ = run
  for name in ("learning_rates", "weight_decays", "meta_learning_curve", "test_error"):
    assert_png(out_dir / f"{name}.png")
