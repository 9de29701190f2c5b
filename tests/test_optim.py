"""revhyper.optim and revhyper.train: optax's optimizers, run backwards exactly.

For every reversible optimizer, on a small MLP at T = 1000: final weights against optax's own
transformation, hypergradients of a validation loss (with respect to a per-step learning-rate
schedule and an L2 penalty) against a float64 reference, no further from it than float32
unroll is, and bits stored against the information bound. Decays are exact on their grids
(0.875 = 1 - 2**-3, 0.9990234375 = 1 - 2**-10), so that the comparison with optax sees only
float rounding.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import revhyper
from revhyper import optim

_RNG = np.random.default_rng(0)
X = jnp.asarray(_RNG.standard_normal((64, 6)), jnp.float32)
Y = jnp.asarray(_RNG.standard_normal((64, 2)), jnp.float32)
PARAMS = {"w1": (0.5 * _RNG.standard_normal((6, 8))).astype(np.float32),
          "b1": np.zeros(8, np.float32),
          "w2": (0.5 * _RNG.standard_normal((8, 2))).astype(np.float32)}


def loss_fn(p, l2, t):
  rows = (jnp.arange(16) + 16 * (t % 4)) % 64  # the minibatch: a pure function of t
  h = jnp.tanh(X[rows] @ p["w1"] + p["b1"])
  return jnp.mean((h @ p["w2"] - Y[rows]) ** 2) + l2 * jnp.sum(p["w1"] ** 2)


def validation(p):
  return jnp.mean((jnp.tanh(X @ p["w1"] + p["b1"]) @ p["w2"] - Y) ** 2)


B1, B2 = 0.875, 0.9990234375

# name -> (revhyper optimizer of a learning rate, optax's, learning rate, adaptive)
REVERSIBLE = {
    "sgd": (lambda lr: optim.sgd(lr, momentum=B1), lambda lr: optax.sgd(lr, momentum=B1), 0.01,
            False),
    "adam": (lambda lr: optim.adam(lr, b1=B1, b2=B2), lambda lr: optax.adam(lr, b1=B1, b2=B2),
             0.01, True),
    "adamw": (lambda lr: optim.adamw(lr, b1=B1, b2=B2, weight_decay=0.01),
              lambda lr: optax.adamw(lr, b1=B1, b2=B2, weight_decay=0.01), 0.01, True),
    "rmsprop": (lambda lr: optim.rmsprop(lr, decay=B1, momentum=B1),
                lambda lr: optax.rmsprop(lr, decay=B1, momentum=B1), 0.003, True),
    # eps 1e-4: the centered variance nu - mg**2 cancels, and with eps 1e-8 its float32
    # rounding (in every method alike) dominates the comparison.
    "rmsprop_centered": (lambda lr: optim.rmsprop(lr, decay=B1, eps=1e-4, momentum=B1,
                                                  centered=True),
                         lambda lr: optax.rmsprop(lr, decay=B1, eps=1e-4, momentum=B1,
                                                  centered=True),
                         0.003, True),
    "adabelief": (lambda lr: optim.adabelief(lr, b1=B1, b2=B2),
                  lambda lr: optax.adabelief(lr, b1=B1, b2=B2), 0.01, True),
    # Clipping active on most steps (asserted below): the threshold is below most gradients'.
    "clip_by_global_norm+adam": (
        lambda lr: optim.chain(optim.clip_by_global_norm(0.05), optim.adam(lr, b1=B1, b2=B2)),
        lambda lr: optax.chain(optax.clip_by_global_norm(0.05), optax.adam(lr, b1=B1, b2=B2)),
        0.01, True),
    "clip+sgd": (lambda lr: optim.chain(optim.clip(0.01), optim.sgd(lr, momentum=B1)),
                 lambda lr: optax.chain(optax.clip(0.01), optax.sgd(lr, momentum=B1)), 0.05,
                 False),
    "add_decayed_weights+sgd": (
        lambda lr: optim.chain(optim.add_decayed_weights(0.01), optim.sgd(lr, momentum=B1)),
        lambda lr: optax.chain(optax.add_decayed_weights(0.01), optax.sgd(lr, momentum=B1)),
        0.01, False),
}
# Every cell runs in the full suite (the quick loop's budget goes to the exactness checks).
QUICK = ()
NUM_STEPS = 1000


def _optax_run(tx, num_steps, l2=1e-3):
  """optax's own loop; returns the final params and each step's gradient norm."""
  def step(carry, t):
    p, s = carry
    g = jax.grad(loss_fn)(p, l2, t)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), optax.tree.norm(g)

  params = jax.tree.map(jnp.asarray, PARAMS)
  (p, _), norms = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)),
                                                  jnp.arange(num_steps)))(params)
  return p, norms


def _relative(a, b):
  a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
  b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _hypergradients(make, lr, method, dtype, num_steps):
  """Value and gradient of the validation loss wrt a [T] learning-rate schedule and L2."""
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), PARAMS)

  def meta(lrs, l2):
    out = revhyper.train(loss_fn, params, l2, make(lrs), num_steps=num_steps, method=method)
    return validation(out.params), out

  lrs = jnp.full((num_steps,), lr, dtype)
  (_, out), grads = jax.jit(jax.value_and_grad(meta, argnums=(0, 1), has_aux=True))(
      lrs, jnp.asarray(1e-3, dtype))
  return out, grads


def _marks(name):
  return () if name in QUICK else (pytest.mark.slow,)


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in REVERSIBLE])
def test_reversible_optimizer_matches_optax_float64_and_the_bound(name):
  make, make_optax, lr, adaptive = REVERSIBLE[name]
  # The learning rate is traced (a [T] schedule), and so is learning_rate * weight_decay.
  method = revhyper.Reversible(min_decay=0.5, check_reversal=True)
  out, got = _hypergradients(make, lr, method, jnp.float32, NUM_STEPS)
  assert not bool(out.stats.failed)

  reference, norms = _optax_run(make_optax(lr), NUM_STEPS)
  assert _relative(out.params, reference) < (1e-4 if adaptive else 1e-5)
  if name.startswith("clip"):
    # Active on most steps: the norm exceeds the global threshold, or the root mean square
    # element exceeds the elementwise one (then the largest element does too).
    lanes = sum(x.size for x in jax.tree.leaves(PARAMS))
    threshold = 0.05 if "global" in name else 0.01 * np.sqrt(lanes)
    assert float(jnp.mean(norms > threshold)) > 0.5, "clipping must be active on most steps"
  np.testing.assert_allclose(out.stats.bits_stored, out.stats.information_bound_bits, rtol=0.01)

  _, unroll = _hypergradients(make, lr, "unroll", jnp.float32, NUM_STEPS)
  with jax.enable_x64(True):
    _, exact = _hypergradients(make, lr, "unroll", jnp.float64, NUM_STEPS)
  # The hypergradient with respect to (schedule, penalty) as one vector: a single scalar's
  # float32 error is too noisy a yardstick for "twice unroll's".
  assert _relative(got, exact) <= max(2 * _relative(unroll, exact), 1e-5), (
      name, _relative(got, exact), _relative(unroll, exact))


@pytest.mark.slow
def test_heavy_ball_is_revhyper_sgd_bit_for_bit():
  out = revhyper.train(loss_fn, PARAMS, jnp.float32(1e-3), optim.heavy_ball(0.05, 0.9, 0.01),
                       num_steps=50)
  ref = revhyper.sgd(loss_fn, PARAMS, jnp.float32(1e-3), num_steps=50, learning_rate=0.05,
                     momentum=0.9, weight_decay=0.01)
  chex.assert_trees_all_equal(out.params, ref.params)
  chex.assert_trees_all_equal(out.opt_state["velocity"], ref.velocity)


# name -> (revhyper optimizer, optax's)
FLOAT_ONLY = {
    "sgd": (optim.sgd(0.05), optax.sgd(0.05)),
    "sgd_nesterov": (optim.sgd(0.02, momentum=B1, nesterov=True),
                     optax.sgd(0.02, momentum=B1, nesterov=True)),
    "lion": (optim.lion(1e-3, b1=B1, b2=0.984375, weight_decay=1e-3),
             optax.lion(1e-3, b1=B1, b2=0.984375, weight_decay=1e-3)),
    "rmsprop": (optim.rmsprop(0.003, decay=B1), optax.rmsprop(0.003, decay=B1)),
}


# Two in the quick loop (a momentum that reads the gradient, and a sign); the rest in the full
# suite.
@pytest.mark.parametrize("name", [
    name if name in ("sgd", "lion") else pytest.param(name, marks=pytest.mark.slow)
    for name in FLOAT_ONLY])
def test_optimizers_whose_step_reads_the_gradient_run_with_float_methods_only(name):
  ours, theirs = FLOAT_ONLY[name]
  with pytest.raises(ValueError, match=r"reads the gradient g_t.*Checkpoint\(\)|no state"):
    revhyper.train(loss_fn, PARAMS, jnp.float32(1e-3), ours, num_steps=10)
  with pytest.raises(ValueError, match="Checkpoint"):
    revhyper.round_trip(loss_fn, PARAMS, jnp.float32(1e-3), optimizer=ours, num_steps=10)
  reference, _ = _optax_run(theirs, 300)
  for method in ("unroll", "checkpoint"):
    out = revhyper.train(loss_fn, PARAMS, jnp.float32(1e-3), ours, num_steps=300,
                         method=method)
    assert _relative(out.params, reference) < 1e-5, method


@pytest.mark.slow
def test_round_trip_of_a_chain_is_bit_exact_and_spills():
  opt = optim.chain(optim.clip_by_global_norm(0.05), optim.adamw(0.01, b1=0.5, b2=0.75,
                                                                  weight_decay=0.5))
  rt = revhyper.round_trip(loss_fn, PARAMS, jnp.float32(1e-3), optimizer=opt, num_steps=300)
  assert bool(rt.exact)
  chex.assert_trees_all_equal(rt.initial_params, jax.tree.map(jnp.asarray, PARAMS))
  lanes = sum(x.size for x in jax.tree.leaves(PARAMS))
  # Three decays (b1, b2, the weights'): at least 0.41 + 1 bit per lane and step.
  assert float(rt.stats.bits_stored) / (32 * lanes) > 5


@pytest.mark.slow
def test_optax_schedule_function_as_a_coefficient_and_its_gradient():
  schedule = lambda peak: optax.cosine_decay_schedule(peak, 100)  # noqa: E731

  def meta(peak, method):
    out = revhyper.train(loss_fn, PARAMS, jnp.float32(1e-3), optim.adam(schedule(peak)),
                         num_steps=100, method=method)
    return validation(out.params)

  grad = jax.jit(jax.grad(meta), static_argnums=1)
  got, want = grad(0.01, "reversible"), grad(0.01, "unroll")
  np.testing.assert_allclose(got, want, rtol=1e-5)
  out = revhyper.train(loss_fn, PARAMS, jnp.float32(1e-3), optim.adam(schedule(0.01)),
                       num_steps=100)
  reference, _ = _optax_run(optax.adam(schedule(0.01)), 100)
  assert _relative(out.params, reference) < 1e-5


@pytest.mark.slow
def test_train_under_jit_and_vmap_over_learning_rates():
  def meta(lr):
    out = revhyper.train(loss_fn, PARAMS, jnp.float32(1e-3), optim.adamw(lr, b1=B1, b2=B2),
                         num_steps=40, method=revhyper.Reversible(min_decay=0.5))
    return validation(out.params)

  lrs = jnp.array([0.003, 0.01, 0.03])
  got = jax.jit(jax.vmap(jax.grad(meta)))(lrs)
  one = jax.jit(jax.grad(meta))
  for lr, g in zip(lrs, got):
    np.testing.assert_allclose(g, one(lr), rtol=1e-5)


# --- check_rule -----------------------------------------------------------------------------

@pytest.mark.parametrize("opt", [
    pytest.param(optim.adabelief(0.01, b1=B1, b2=B2), marks=pytest.mark.slow),
    pytest.param(optim.sgd(0.05, momentum=0.9), marks=pytest.mark.slow),
    pytest.param(optim.chain(optim.clip_by_global_norm(0.1), optim.rmsprop(0.01, momentum=0.9)),
                 marks=pytest.mark.slow),
], ids=["adabelief", "sgd", "clip+rmsprop"])
def test_check_rule_passes_the_built_in_rules(opt):
  check = optim.check_rule(opt)
  assert check.ok, check
  assert check.round_trip_exact
  assert abs(check.bits_over_bound - 1) < 0.01


@dataclasses.dataclass(frozen=True)
class WronglyLinearAdam(optim.Adam):
  """A broken rule: Adam's step is not linear in the gradient, but it says so."""

  linear_in_gradient = True


@pytest.mark.slow
def test_check_rule_catches_a_rule_that_claims_linearity_it_lacks():
  broken = optim.Optimizer((WronglyLinearAdam(),), optim.adam(0.01).values)
  check = optim.check_rule(broken)
  # The round trip does not use the claim; the hypergradients do (on the CPU, whose default
  # shares the gradient pass when a rule says it is linear).
  assert check.round_trip_exact
  assert not check.ok
  assert max(check.relative_errors.values()) > 1e-3, check


@dataclasses.dataclass(frozen=True)
class SelfReading(optim.Rule):
  """Not reversible: the increment reads its own state."""

  coefficients = (optim.Coefficient("learning_rate"), optim.Coefficient("b", "decay"))
  states = (optim.State("m", "b"),)

  def increment(self, name, c, g, s):
    return g * s.m

  def weight_step(self, c, s, g, previous):
    return -c.learning_rate * s.m


def test_a_rule_whose_increment_reads_its_own_state_is_refused_when_built():
  opt = optim.Optimizer((SelfReading(),), ({"learning_rate": 0.1, "b": 0.9},))
  with pytest.raises(ValueError, match="increment of state 'm' reads 'm' itself"):
    revhyper.train(loss_fn, PARAMS, 0.0, opt, num_steps=5)
  # The float methods run it (their backprop stores the trajectory).
  revhyper.train(loss_fn, PARAMS, 0.0, opt, num_steps=5, method="unroll")


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("opt, match", [
    (lambda: optim.adam(0.01, b1=1.5), r"b1 must lie in \[0, 1\]"),
    (lambda: optim.sgd(0.01, momentum=-0.1), r"momentum must lie in \[0, 1\]"),
    (lambda: optim.rmsprop(0.01, decay=2.0, momentum=0.9), r"decay must lie in \[0, 1\]"),
    (lambda: optim.adam(jnp.ones(7)), r"learning_rate must be a scalar or have shape"),
    (lambda: optim.adam(jnp.inf), "learning_rate must be finite"),
    (lambda: optim.adam(0.01, eps=-1.0), "eps must be finite and at least 0"),
    (lambda: optim.chain(optim.clip_by_global_norm(-1.0), optim.adam(0.01)),
     "ClipByGlobalNorm: max_norm must be finite and at least 0"),
    (lambda: optim.adamw(0.5, weight_decay=4.0), r"learning_rate \* weight_decay must lie"),
])
def test_bad_coefficients_raise_naming_them(opt, match):
  with pytest.raises(ValueError, match=match):
    revhyper.train(loss_fn, PARAMS, 0.0, opt(), num_steps=5)


def test_bad_chains_params_and_states_raise():
  with pytest.raises(ValueError, match="must come last"):
    optim.chain(optim.adam(0.01), optim.clip(1.0))
  with pytest.raises(ValueError, match="needs an optimizer"):
    optim.chain(optim.clip(1.0))
  with pytest.raises(ValueError, match="optimizer must be a revhyper.optim optimizer"):
    revhyper.train(loss_fn, PARAMS, 0.0, optax.adam(0.01), num_steps=5)
  with pytest.raises(ValueError, match="must be a float array"):
    revhyper.train(loss_fn, {"w": jnp.arange(3)}, 0.0, optim.adam(0.01), num_steps=5)
  with pytest.raises(ValueError, match="opt_state must be a dict with keys among"):
    revhyper.train(loss_fn, PARAMS, 0.0, optim.adam(0.01), num_steps=5, opt_state={"m": 1})
  nu = jax.tree.map(lambda x: -np.ones_like(x), PARAMS)
  with pytest.raises(ValueError, match=r"opt_state\['nu'\] must be non-negative"):
    revhyper.train(loss_fn, PARAMS, 0.0, optim.adam(0.01), num_steps=5, opt_state={"nu": nu})
  with pytest.raises(ValueError, match="schedule function"):
    revhyper.train(loss_fn, PARAMS, 0.0, optim.adam(lambda t: jnp.ones(2)), num_steps=5)


def test_opt_state_in_and_out():
  mu = jax.tree.map(lambda x: 0.01 * np.ones_like(x), PARAMS)
  out = revhyper.train(loss_fn, PARAMS, 0.0, optim.adam(0.01), num_steps=20,
                       opt_state={"mu": mu})
  assert set(out.opt_state) == {"mu", "nu"}
  ref = revhyper.adam(loss_fn, PARAMS, 0.0, num_steps=20, learning_rate=0.01, mu=mu)
  chex.assert_trees_all_equal((out.params, out.opt_state["mu"], out.opt_state["nu"]),
                              (ref.params, ref.mu, ref.nu))
