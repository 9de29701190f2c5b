"""The hyperparameter-optimiser benchmark: each contender on a toy problem whose answer is known,
the float steps against revhyper's, the compute accounting, and the launcher end to end."""

import importlib
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import revhyper
from launchers import (EXPERIMENTS, FAST_COMPILE, assert_png, launcher,
                       quick, read_results, succeeded)

sys.path.insert(0, str(EXPERIMENTS))
try:
  hpo = importlib.import_module("hpo_benchmark")
  common = importlib.import_module("common")
  configs = importlib.import_module("configs.hpo_benchmark")
finally:
  sys.path.remove(str(EXPERIMENTS))


def jobs(folder):
  return {"quick": launcher("hpo_benchmark.py", folder("hpo_benchmark"),
                            quick("hpo_benchmark.py"), env=FAST_COMPILE)}


def tiny_config(**overrides):
  c = configs.get_config("quick")
  c.layer_sizes, c.batch_size, c.window = (784, 5, 10), 50, 4
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def data():
  splits, _ = common.load_mnist_splits("", (100, 50, 50), 0, ("train", "valid", "test"))
  return splits


def test_hypergradient_descent_finds_the_best_rate_of_a_quadratic():
  # Loss 2 |w|^2 (curvature 4): the greedy one-step best rate is 1 / 4, from any start.
  grad = lambda w, _, t: 4.0 * w
  step = lambda w, state, g, lr, t: (w - lr * g, state)
  for start in (0.01, 0.45):
    _, rates = hpo.hypergradient_descent_run(grad, step, jnp.ones(3), (), jnp.log(start),
                                             0.05, 200, 10.0)
    assert 0.22 < float(rates[-1]) < 0.28, (start, rates[-5:])


def test_random_search_finds_the_grid_optimum():
  grid = np.linspace(0.0, 1.0, 11)
  objective = lambda p, i: float(abs(np.argmin(abs(grid - p["x"])) - 3))  # 0 at x = 0.3
  *_, (error, _, best) = list(zip(range(60), hpo.search(
      objective, hpo.random_sampler({"x": (0.0, 1.0)}, 0))))[-1]
  assert error == 0.0 and abs(best["x"] - 0.3) <= 0.05


def test_tpe_finds_a_one_dimensional_optimum():
  objective = lambda p, i: (p["x"] - 0.7) ** 2
  *_, (_, _, best) = list(zip(range(40), hpo.search(
      objective, hpo.tpe_sampler({"x": (0.0, 1.0)}, 0, 5))))[-1]
  assert abs(best["x"] - 0.7) < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_float_steps_repeat_revhyper_training(data, optimizer):
  task = hpo.Task(f"mlp:{optimizer}:8", data, tiny_config())
  point = hpo.default_point(task, tiny_config())
  hp = hpo.point_hp(task, point, jnp.linspace(1.0, 0.5, 8))
  # A b1 (momentum) schedule: AdamW's bias correction then needs the running product.
  hp["mom"] = jax.tree.map(lambda _: jnp.linspace(0.9, 0.6, 8), hp["mom"])
  key = jax.random.key(3)
  expected = task.train(hp, key, "unroll")
  noise_key, batch_key = jax.random.split(key)
  w = task.init_params(hp, noise_key)
  state, grad = task.opt_init(w), jax.grad(task.batch_loss_fn(batch_key))
  for t in range(8):
    at = lambda tree: jax.tree.map(lambda s: s[t], tree)
    w, state = task.float_step(w, state, grad(w, None, t), at(hp["lr"]), at(hp["mom"]),
                               at(hp["wd"]), jnp.int32(t))
  for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_truncated_hypergradient_of_one_window_is_the_full_horizon_one(data):
  # One window of all T steps, and a validation batch of the whole split: the truncated
  # hypergradient is then the hypergradient of the validation loss after training.
  c = tiny_config(window=4)
  task = hpo.Task("mlp:sgd:4", data, c)
  theta = hpo.free_theta(task, hpo.default_point(task, c))
  theta["log_lr"] = jax.tree.map(lambda s: s + jnp.linspace(-0.5, 0.5, 4), theta["log_lr"])
  key = jax.random.key(1)
  _, truncated = hpo.make_programs(task, c)["truncated"](theta, key)

  def valid_loss(theta):
    params = task.train(hpo.free_hp(task, theta, c.min_decay), key, "unroll")
    return task.scores(params)["valid_loss"]

  full = jax.grad(valid_loss)(theta)
  for name in ("log_lr", "logit_mom", "log_wd"):
    for a, b in zip(jax.tree.leaves(truncated[name]), jax.tree.leaves(full[name])):
      np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-7)


def noisy_quadratic(noise, seeds):
  """``programs`` with the hypergradients of ``|x - 1 - noise * N(0, 1)|**2`` per seed (the
  minimum at 1), and ``keys_for(i)``, ``seeds`` keys per meta-iteration."""
  def meta_loss(hp, key):
    return jnp.sum((hp["x"] - 1.0 - noise * jax.random.normal(key, (3,))) ** 2)

  programs = {"hypergradients": jax.jit(
      lambda hp, keys: revhyper.meta.per_seed_hypergradients(meta_loss, hp, keys))}
  return programs, lambda i: jax.random.split(jax.random.key(i), seeds)


def test_gradient_learner_finds_the_minimum_of_a_noisy_quadratic_and_records_the_spread():
  programs, keys_for = noisy_quadratic(0.1, 4)
  spread = []
  learner = hpo.gradient_learner(lambda theta: theta, {"x": jnp.zeros(3)}, programs, keys_for,
                                 tiny_config(meta_step=0.05), spread)
  *_, last = list(zip(range(150), learner))[-1]
  np.testing.assert_allclose(last["hp"]["x"], 1.0, atol=0.1)
  assert len(spread) == 150 and spread[0]["signal_to_noise_family"] > 10


def test_compute_is_counted_in_units_and_scored_at_each_fraction():
  steps = hpo.with_cost(({"id": f"c{i}", "kind": "schedule"} for i in range(100)), 3.0)
  scored = []
  curve = hpo.run_contender(steps, 10.0, (0.5, 1.0),
                            lambda cand: scored.append(cand["id"]) or cand["id"])
  assert [p["units"] for p in curve] == [1, 3] and curve[-1]["compute_runs"] == 9.0
  assert scored == ["c0", "c2"]
  # A unit dearer than the budget still runs once, and says what it spent.
  curve = hpo.run_contender(hpo.with_cost(iter([{"id": "a"}] * 5), 30.0), 10.0, (0.5, 1.0),
                            lambda c: 0)
  assert [p["compute_runs"] for p in curve] == [30.0]
  # A warm start: two search trials, then dearer units from the best point.
  first = hpo.with_cost(({"id": f"t{i}", "found": dict.fromkeys(hpo.SPACE, i)}
                         for i in range(100)), 1.0)
  then = lambda point: hpo.with_cost(({"id": f"h{point['log_lr']}.{i}"} for i in range(100)),
                                     3.0)
  curve = hpo.run_contender(hpo.warm_started(first, 2, then), 10.0, (1.0,), lambda c: 0)
  assert curve[-1]["candidate"]["id"] == "h1.1" and curve[-1]["compute_runs"] == 8.0


def test_verdict_compares_at_two_standard_errors():
  stats = lambda mean, sd: {"test_error": {"mean": mean, "sd": sd, "n": 20},
                            "valid_error": {"mean": mean, "sd": sd, "n": 20}}
  contenders = {"hypergradient": stats(0.05, 0.01), "hypergradient_smooth": stats(0.06, 0.01),
                "tpe_constant": stats(0.08, 0.01), "random_constant": stats(0.09, 0.01)}
  verdict = hpo.verdict("toy", contenders)
  assert verdict["outcome"] == "wins" and verdict["best_other"] == "tpe_constant"
  contenders["tpe_constant"] = stats(0.052, 0.01)
  assert hpo.verdict("toy", contenders)["outcome"] == "ties"


def test_warmup_cosine_rises_then_falls_to_near_zero():
  shape = np.asarray(hpo.warmup_cosine_shape(100, 0.1))
  assert np.argmax(shape) == 9 and shape[9] == 1.0 and 0 < shape[-1] < 1e-3
  assert np.all(np.diff(shape[:10]) > 0) and np.all(np.diff(shape[10:]) < 0)


@pytest.mark.slow
def test_convnet_gives_logits_per_digit():
  noise, apply, fan_in = hpo.convnet((4, 6))
  params = noise(jax.random.key(0))
  assert [p["W"].shape for p in params] == [(3, 3, 1, 4), (3, 3, 4, 6), (7 * 7 * 6, 10)]
  assert apply(params, jnp.zeros((5, 784))).shape == (5, 10) and len(fan_in) == 3


@pytest.mark.slow
def test_quick_preset_writes_every_contender_on_every_task(background_jobs):
  done = background_jobs.results(jobs)["quick"]
  out_dir = succeeded(done)
  results = read_results(out_dir)
  assert results["schema"] == "revhyper.experiments.results/2" and results["complete"]
  config = results["config"]
  assert len(results["tasks"]) == len(config["tasks"])
  for name, task in results["tasks"].items():
    assert set(task["contenders"]) == set(hpo.CONTENDERS), name
    for contender, record in task["contenders"].items():
      assert record["compute_runs"] > 0 and record["curve"]
      # Within the budget, or over it by less than one unit of work.
      assert (record["compute_runs"] <= config["budget_runs"] + record["unit_cost_runs"] + 1e-9
              ), (name, contender)
      stats = record["test_error"]
      assert stats["n"] == config["eval_seeds"] and 0 <= stats["mean"] <= 1
      assert math.isfinite(stats["sd"])
    assert task["verdict"]["outcome"] in ("wins", "ties", "loses")
    assert task["cost_runs"]["hypergradient"] > 0
  assert_png(out_dir / "hpo_benchmark.png")


# The digits' side in the quick loop; the smaller sides of the network's later layers in the
# full suite.
@pytest.mark.parametrize("side", [28, pytest.param(14, marks=pytest.mark.slow),
                                  pytest.param(7, marks=pytest.mark.slow)])
def test_convolution_is_lax_conv_same_stride_2(side):
  h = jax.random.normal(jax.random.key(0), (3, side, side, 4))
  w = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))
  expected = jax.lax.conv_general_dilated(h, w, (2, 2), "SAME",
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                          precision=jax.lax.Precision.HIGHEST)
  got = hpo.conv3x3_stride2(h, w)
  assert got.shape == expected.shape
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_meta_step_decays_to_nothing_over_the_affordable_steps():
  programs, keys_for = noisy_quadratic(0.5, 2)
  assert hpo.affordable(150, 11.9) == 12 and hpo.affordable(10, 30) == 1

  def moves(decay):
    learner = hpo.gradient_learner(lambda theta: theta, {"x": jnp.zeros(3)}, programs, keys_for,
                                   tiny_config(meta_step=0.1, meta_step_decay=decay,
                                               keep_best=False),
                                   num_steps=20)
    xs = [np.asarray(step["hp"]["x"]) for _, step in zip(range(20), learner)]
    return [float(np.abs(b - a).max()) for a, b in zip(xs, xs[1:])]

  fixed, decayed = moves(False), moves(True)
  # Adam's steps are about the step size whatever the noise: fixed ones keep moving, decayed
  # ones stop by the last affordable step.
  assert min(fixed[-3:]) > 0.02 and max(decayed[-2:]) < 0.005 and decayed[0] > 0.05


def test_gradient_learner_offers_the_best_point_it_has_evaluated():
  programs, keys_for = noisy_quadratic(0.0, 1)  # the loss of a point is exact: |x - 1|**2
  loss = lambda hp: float(jnp.sum((hp["x"] - 1.0) ** 2))

  def offered(keep_best):
    # A fixed step of 2 from 0 overshoots the minimum at 1 and oscillates about it.
    learner = hpo.gradient_learner(lambda theta: theta, {"x": jnp.zeros(3)}, programs, keys_for,
                                   tiny_config(meta_step=2.0, meta_step_decay=False,
                                               keep_best=keep_best))
    return [step for _, step in zip(range(12), learner)]

  kept, last = offered(True), offered(False)
  # Each kept point is the start or a point stepped to before, and the best loss so far.
  evaluated = [{"x": jnp.zeros(3)}] + [step["hp"] for step in last]
  for i, step in enumerate(kept):
    assert step["id"] == f"point{step['found']['kept_point_meta_steps']}"
    assert loss(step["hp"]) == min(loss(hp) for hp in evaluated[:i + 1])
  assert loss(kept[-1]["hp"]) < 0.5 * loss(last[-1]["hp"])  # the oscillation's last point

  # A start whose loss is not finite (a diverged run) is never kept, nor blocks later points.
  calls = []

  def diverged_first(hp, keys):
    losses, per_seed = programs["hypergradients"](hp, keys)
    calls.append(None)
    return (jnp.full_like(losses, jnp.nan) if len(calls) == 1 else losses), per_seed

  learner = hpo.gradient_learner(lambda theta: theta, {"x": jnp.zeros(3)},
                                 {"hypergradients": diverged_first}, keys_for,
                                 tiny_config(meta_step=2.0, meta_step_decay=False))
  after = [step for _, step in zip(range(12), learner)]
  assert after[0]["id"] == "point1"  # nothing finite evaluated yet: the point stepped to
  assert all(step["id"] != "point0" for step in after)
  assert loss(after[-1]["hp"]) == min(loss(hp) for hp in evaluated[1:12])


def test_contenders_can_be_chosen_and_the_verdict_needs_both_sides():
  assert hpo.selected_contenders(tiny_config()) == list(hpo.CONTENDERS)
  chosen = tiny_config(contenders=("tpe_then_hypergradient", "random_constant"))
  assert hpo.selected_contenders(chosen) == ["random_constant", "tpe_then_hypergradient"]
  with pytest.raises(ValueError, match="config.contenders: unknown \\['optuna'\\]"):
    hpo.selected_contenders(tiny_config(contenders=("optuna",)))
  score = {"test_error": {"mean": 0.1, "sd": 0.01, "n": 20}, "valid_error": {"mean": 0.1}}
  assert hpo.verdict("t", {"random_constant": score})["outcome"] is None
  assert hpo.verdict("t", {"random_constant": score, "hypergradient": score})["outcome"] == "ties"
