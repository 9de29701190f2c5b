"""Model state: running averages of the loss's per-step statistics (BatchNorm's) through training.

Invariants: every method computes the same averages and the same hypergradients through them
(reversible no further from a float64 reference than twice float32 backprop), finite
differences agree, exact reversal rebuilds the initial averages bit for bit with bits at the
information bound also where every lane spills many times, and bad input or a failed run gets
the failure semantics of the rest of the library.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import revhyper
from revhyper import optim

WIDTH = 6
X = np.asarray(jax.random.normal(jax.random.key(0), (48, 4)), np.float64)
Y = np.sin(X @ np.arange(1.0, 5.0))
PARAMS = {"w1": 0.5 * np.asarray(jax.random.normal(jax.random.key(1), (4, WIDTH))),
          "scale": np.ones(WIDTH), "shift": np.zeros(WIDTH),
          "w2": 0.5 * np.asarray(jax.random.normal(jax.random.key(2), (WIDTH,)))}
INITIAL = {"mean": np.zeros(WIDTH), "var": np.ones(WIDTH)}


def cast(tree, dtype):
  return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), tree)


def forward(p, x, mean, var):
  h = (x @ p["w1"] - mean) / jnp.sqrt(var + 1e-5) * p["scale"] + p["shift"]
  return jnp.tanh(h) @ p["w2"]


def make_loss(dtype=jnp.float32, in_loss=False, batch=12):
  """A batch-normalised regression loss returning its batch statistics; with ``in_loss`` it also
  reads the running averages (a penalty pulling the shift to the running mean)."""
  x_all, y_all = jnp.asarray(X, dtype), jnp.asarray(Y, dtype)

  def loss_fn(p, l2, t, *running):
    idx = (jnp.arange(batch) + batch * t) % x_all.shape[0]
    x, y = x_all[idx], y_all[idx]
    h = x @ p["w1"]
    mean, var = jnp.mean(h, axis=0), jnp.var(h, axis=0)
    loss = jnp.mean((forward(p, x, mean, var) - y) ** 2)
    loss += l2 * sum(jnp.sum(w ** 2) for w in jax.tree_util.tree_leaves(p))
    if running:
      loss += 0.1 * jnp.sum((p["shift"] - running[0]["mean"]) ** 2)
    return loss, {"mean": mean, "var": var}

  return loss_fn


def evaluate(params, running, dtype=jnp.float32):
  """The validation loss of the network in evaluation mode: it reads the running averages."""
  pred = forward(params, jnp.asarray(X, dtype), running["mean"], running["var"])
  return jnp.mean((pred - jnp.asarray(Y, dtype)) ** 2)


def optimizer(name, lr):
  if name == "sgd":
    return optim.heavy_ball(lr, 0.9)
  return optim.adamw(lr, weight_decay=0.01) if name == "adamw" else optim.adam(lr)


def meta(name, in_loss, num_steps=30, dtype=jnp.float32):
  """The validation loss after training, as a function of everything differentiable."""
  loss_fn = make_loss(dtype, in_loss)

  def objective(params, l2, lr, decay, initial, method):
    out = revhyper.train(loss_fn, params, l2, optimizer(name, lr), num_steps=num_steps,
                         method=method, model_state=revhyper.RunningAverage(
                             initial, decay=decay, in_loss=in_loss))
    return evaluate(out.params, out.model_state, dtype)

  return objective


def arguments(name, dtype):
  lr = 0.05 if name == "sgd" else 0.01
  return (cast(PARAMS, dtype), jnp.asarray(0.01, dtype), jnp.asarray(lr, dtype),
          jnp.asarray(0.8, dtype), cast(INITIAL, dtype))


def flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64))
                         for x in jax.tree_util.tree_leaves(tree)])


def relative_error(a, b):
  a, b = flat(a), flat(b)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def hypergradients(name, in_loss, method, dtype=jnp.float32):
  grad = jax.grad(meta(name, in_loss, dtype=dtype), argnums=(0, 1, 2, 3, 4))
  return grad(*arguments(name, dtype), method)


# The full suite runs every case (the quick loop checks the round trips and the errors).
@pytest.mark.parametrize("name, in_loss", [
    pytest.param("sgd", False, id="sgd-statistics", marks=pytest.mark.slow),
    pytest.param("adamw", True, id="adamw-read_by_loss", marks=pytest.mark.slow),
])
def test_methods_agree_and_reversal_is_as_accurate_as_backprop(name, in_loss):
  # With respect to the initial weights, the L2 penalty, the learning rate, the averages'
  # decay and their initial values, through a validation loss that reads the final averages.
  unroll = hypergradients(name, in_loss, "unroll")
  reversible = hypergradients(name, in_loss, "reversible")
  with jax.enable_x64(True):
    reference = hypergradients(name, in_loss, "unroll", jnp.float64)
  assert relative_error(reversible, unroll) <= 1e-5
  assert relative_error(reversible, reference) <= 2 * relative_error(unroll, reference)
  # Every input gets a gradient: the decay and the initial averages too.
  assert all(np.any(flat(g) != 0) for g in reversible)


@pytest.mark.slow
def test_checkpointing_agrees_with_unroll():
  unroll = hypergradients("adamw", True, "unroll")
  checkpoint = hypergradients("adamw", True, revhyper.Checkpoint(segment_length=4))
  assert relative_error(checkpoint, unroll) <= 1e-6


@pytest.mark.slow
def test_reversible_hypergradient_matches_finite_differences():
  # In float64: the decay and the L2 penalty, by central differences of the validation loss,
  # through AdamW (its decoupled decay off: lr * wd is rounded, a staircase to differences).
  with jax.enable_x64(True):
    objective = meta("adam", in_loss=True, num_steps=15, dtype=jnp.float64)
    params, l2, lr, decay, initial = arguments("adam", jnp.float64)
    f = lambda l2, decay: objective(params, l2, lr, decay, initial, "reversible")
    grads = jax.grad(f, argnums=(0, 1))(l2, decay)
    eps = 1e-5
    fd_l2 = (f(l2 + eps, decay) - f(l2 - eps, decay)) / (2 * eps)
    fd_decay = (f(l2, decay + eps) - f(l2, decay - eps)) / (2 * eps)
  # The decay is rounded to n / 2**31 with a straight-through gradient: exact to ~1e-9 here.
  np.testing.assert_allclose(float(grads[0]), float(fd_l2), rtol=1e-5)
  np.testing.assert_allclose(float(grads[1]), float(fd_decay), rtol=1e-4)


def spilling_run(name, num_steps, in_loss=False):
  """Low, per-step decays: every average's lane stores ~1-3 bits a step and spills often."""
  decay = np.linspace(0.2, 0.6, num_steps).astype(np.float32)
  return revhyper.round_trip(make_loss(in_loss=in_loss), cast(PARAMS, jnp.float32), 0.01,
                             optimizer=optimizer(name, 0.02), num_steps=num_steps,
                             model_state=revhyper.RunningAverage(cast(INITIAL, jnp.float32),
                                                                 decay=decay, in_loss=in_loss))


@pytest.mark.parametrize("name", ["sgd", pytest.param("adamw", marks=pytest.mark.slow)])
def test_round_trip_rebuilds_the_averages_bit_for_bit_through_many_spills(name):
  trip = spilling_run(name, 200)
  assert bool(trip.exact) and bool(trip.buffer_empty)
  for a, b in zip(jax.tree_util.tree_leaves(trip.initial_model_state),
                  jax.tree_util.tree_leaves(cast(INITIAL, jnp.float32))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  stats = trip.stats
  # ~2 bits a step on 12 lanes for 200 steps: far more than the 40-bit heads hold.
  assert float(stats.bits_stored) > 12 * 40 * 5
  assert abs(float(stats.bits_stored) / float(stats.information_bound_bits) - 1) <= 0.01


@pytest.mark.slow
def test_round_trip_with_averages_read_by_the_loss():
  trip = spilling_run("adamw", 60, in_loss=True)
  assert bool(trip.exact)


@pytest.mark.slow
def test_gradient_path_reverses_exactly_through_many_spills():
  # The in-pass check compares the rebuilt initial state (averages included) bit for bit: a
  # reverse loop that missed one bit would make every hypergradient NaN.
  decay = jnp.linspace(0.2, 0.6, 150)

  def objective(l2, method):
    out = revhyper.train(make_loss(in_loss=True), cast(PARAMS, jnp.float32), l2,
                         optimizer("adamw", 0.02), num_steps=150, method=method,
                         model_state=revhyper.RunningAverage(cast(INITIAL, jnp.float32),
                                                             decay=decay, in_loss=True))
    return evaluate(out.params, out.model_state)

  checked = jax.grad(objective)(jnp.float32(0.01), revhyper.Reversible(check_reversal=True))
  unroll = jax.grad(objective)(jnp.float32(0.01), "unroll")
  assert np.isfinite(float(checked))
  np.testing.assert_allclose(float(checked), float(unroll), rtol=1e-4)


@pytest.mark.slow
def test_under_jit_and_vmap():
  loss_fn = make_loss()
  params, initial = cast(PARAMS, jnp.float32), cast(INITIAL, jnp.float32)

  def objective(decay):
    out = revhyper.train(loss_fn, params, 0.01, optim.heavy_ball(0.05, 0.9), num_steps=20,
                         method=revhyper.Reversible(min_decay=0.5),
                         model_state=revhyper.RunningAverage(initial, decay=decay))
    return evaluate(out.params, out.model_state)

  decays = jnp.asarray([0.6, 0.8, 0.95])
  batched = jax.jit(jax.vmap(jax.value_and_grad(objective)))(decays)
  for i, decay in enumerate(decays):
    value, grad = jax.jit(jax.value_and_grad(objective))(decay)
    np.testing.assert_allclose(np.asarray(batched[0][i]), np.asarray(value), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(batched[1][i]), np.asarray(grad), rtol=1e-5)


def test_a_traced_decay_needs_min_decay():
  def objective(decay):
    return revhyper.train(make_loss(), cast(PARAMS, jnp.float32), 0.01,
                          optim.heavy_ball(0.05, 0.9), num_steps=5,
                          model_state=revhyper.RunningAverage(cast(INITIAL, jnp.float32),
                                                              decay=decay)).params["w2"][0]

  with pytest.raises(ValueError, match="min_decay"):
    jax.jit(objective)(0.9)


@pytest.mark.slow
def test_final_averages_are_the_float_recursion():
  # Unroll's averages are decay * r + (1 - decay) * s with the statistics of each step's
  # weights, the decay rounded to n / 2**31 (exactly representable here: 0.75).
  loss_fn = make_loss()
  out = revhyper.train(loss_fn, cast(PARAMS, jnp.float32), 0.0, optim.heavy_ball(0.0, 0.5),
                       num_steps=3, method="unroll",
                       model_state=revhyper.RunningAverage(cast(INITIAL, jnp.float32), 0.75))
  running = cast(INITIAL, jnp.float32)
  for t in range(3):
    _, statistics = loss_fn(cast(PARAMS, jnp.float32), 0.0, t)
    running = jax.tree_util.tree_map(lambda r, s: 0.75 * r + 0.25 * s, running, statistics)
  for a, b in zip(jax.tree_util.tree_leaves(out.model_state),
                  jax.tree_util.tree_leaves(running)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  exact = revhyper.train(loss_fn, cast(PARAMS, jnp.float32), 0.0, optim.heavy_ball(0.0, 0.5),
                         num_steps=3,
                         model_state=revhyper.RunningAverage(cast(INITIAL, jnp.float32), 0.75))
  for a, b in zip(jax.tree_util.tree_leaves(exact.model_state),
                  jax.tree_util.tree_leaves(running)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


@pytest.mark.slow
def test_a_jitted_loss_that_reads_the_averages_is_reversible():
  # The statistics' independence of the averages is followed through the jit's inner program.
  loss_fn = jax.jit(make_loss(in_loss=True))
  trip = revhyper.round_trip(lambda p, h, t, r: loss_fn(p, h, t, r), cast(PARAMS, jnp.float32),
                             0.01, optimizer=optim.heavy_ball(0.05, 0.9), num_steps=10,
                             model_state=revhyper.RunningAverage(cast(INITIAL, jnp.float32),
                                                                 decay=0.9, in_loss=True))
  assert bool(trip.exact)


def train(loss_fn, model_state, method="reversible", num_steps=5):
  return revhyper.train(loss_fn, cast(PARAMS, jnp.float32), 0.01, optim.heavy_ball(0.05, 0.9),
                        num_steps=num_steps, method=method, model_state=model_state)


def running(decay=0.9, **kwargs):
  return revhyper.RunningAverage(cast(INITIAL, jnp.float32), decay=decay, **kwargs)


def test_decay_as_a_schedule_function_or_per_leaf():
  constant = train(make_loss(), running(0.75), method="unroll")
  as_function = train(make_loss(), running(lambda t: 0.75 + 0.0 * t), method="unroll")
  per_leaf = train(make_loss(), running({"mean": 0.75, "var": jnp.full(5, 0.75)}),
                   method="unroll")
  for out in (as_function, per_leaf):
    for a, b in zip(jax.tree_util.tree_leaves(out.model_state),
                    jax.tree_util.tree_leaves(constant.model_state)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("decay", [1.5, -0.1, np.nan])
def test_a_decay_outside_the_unit_interval_is_refused(decay):
  with pytest.raises(ValueError, match=r"model_state\.decay must lie in \[0, 1\]"):
    train(make_loss(), running(decay))


def test_a_traced_invalid_decay_fails_the_run_under_jit():
  def objective(decay):
    out = train(make_loss(), running(decay), method=revhyper.Reversible(min_decay=0.5))
    return out.model_state["mean"], out.stats.invalid_hyperparameters

  mean, invalid = jax.jit(objective)(1.5)
  assert bool(invalid) and np.all(np.isnan(np.asarray(mean)))


def test_statistics_must_keep_the_shape_of_their_averages():
  def loss_fn(p, l2, t):
    loss, statistics = make_loss()(p, l2, t)
    return loss, {"mean": statistics["mean"][:3], "var": statistics["var"]}

  with pytest.raises(ValueError, match=r"statistics\['mean'\].*shape \(3,\).*shape \(6,\)"):
    train(loss_fn, running())


def test_statistics_must_have_the_structure_of_the_averages():
  def loss_fn(p, l2, t):
    loss, statistics = make_loss()(p, l2, t)
    return loss, statistics["mean"]

  with pytest.raises(ValueError, match="structure of model_state.initial"):
    train(loss_fn, running())


def test_statistics_without_model_state_say_what_to_pass():
  with pytest.raises(ValueError, match="model_state=revhyper.RunningAverage"):
    train(make_loss(), None)


def test_model_state_needs_a_loss_that_returns_statistics():
  loss_fn = lambda p, l2, t: make_loss()(p, l2, t)[0]
  with pytest.raises(ValueError, match=r"must return \(loss, statistics\)"):
    train(loss_fn, running())


def test_round_trip_with_model_state_needs_an_optimizer_object():
  with pytest.raises(ValueError, match="model_state needs a revhyper.optim optimizer"):
    revhyper.round_trip(make_loss(), cast(PARAMS, jnp.float32), 0.01, num_steps=3,
                        learning_rate=0.1, momentum=0.9, model_state=running())


def test_model_state_must_be_a_running_average():
  with pytest.raises(ValueError, match="model_state must be a revhyper.RunningAverage"):
    train(make_loss(), cast(INITIAL, jnp.float32))


@pytest.mark.parametrize("kwargs, match", [
    (dict(in_loss=1), "in_loss must be a bool"),
    (dict(fractional_bits=70), "fractional_bits must be an int in"),
])
def test_bad_settings_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    running(**kwargs)


def test_initial_averages_must_be_finite_floats():
  with pytest.raises(ValueError, match=r"model_state\.initial\['var'\] must be finite"):
    train(make_loss(), revhyper.RunningAverage({"mean": jnp.zeros(WIDTH),
                                                "var": jnp.full(WIDTH, jnp.nan)}))
  with pytest.raises(ValueError, match=r"model_state\.initial\['mean'\] must be a float"):
    train(make_loss(), revhyper.RunningAverage({"mean": jnp.zeros(WIDTH, jnp.int32),
                                                "var": jnp.ones(WIDTH)}))


def test_statistics_that_read_the_averages_cannot_run_backwards():
  def loss_fn(p, l2, t, r):
    loss, statistics = make_loss()(p, l2, t)
    return loss, {"mean": statistics["mean"] + 0.1 * r["mean"], "var": statistics["var"]}

  with pytest.raises(ValueError, match="depend on the running averages.*Checkpoint"):
    train(loss_fn, running(in_loss=True))
  # The float methods differentiate that recursion like any other.
  out = train(loss_fn, running(in_loss=True), method="unroll")
  assert np.all(np.isfinite(np.asarray(out.model_state["mean"])))


def huge_statistics(p, l2, t):
  loss, statistics = make_loss()(p, l2, t)
  return loss, {"mean": statistics["mean"], "var": statistics["var"] + 1e7}


@pytest.mark.slow
def test_averages_outside_their_range_raise_eagerly():
  # 1e7 is beyond the default grid's range 2**21: exact reversal is impossible.
  with pytest.raises(revhyper.ReversalError, match="fixed-point overflow"):
    train(huge_statistics, running())
  # A coarser grid holds them.
  out = train(huge_statistics, running(fractional_bits=30))
  assert float(out.model_state["var"][0]) > 1e6


@pytest.mark.slow
def test_averages_outside_their_range_give_nan_under_jit():
  out = jax.jit(lambda: train(huge_statistics, running()))()
  assert bool(out.stats.fixed_point_overflow)
  assert np.all(np.isnan(np.asarray(out.model_state["var"])))
  assert np.all(np.isnan(np.asarray(out.params["w1"])))
