"""revhyper.sgd and revhyper.round_trip: exactness, statistics and errors."""

import contextlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import revhyper


def quartic_loss(w, hparams, t):
  """A non-quadratic loss whose gradient depends on the step, with two leaves."""
  scale = 1.0 + 0.1 * jnp.sin(t.astype(jnp.float32))
  return (scale * jnp.sum((w["a"] - hparams) ** 2) + 0.05 * jnp.sum(w["a"] ** 4)
          + jnp.sum(jnp.tanh(w["b"]) ** 2))


def make_params(shape_a=(5,), shape_b=(2, 3), sign=1.0):
  size = int(np.prod(shape_a))
  return {
      "a": sign * jnp.linspace(-1.5, 2.0, size, dtype=jnp.float32).reshape(shape_a),
      "b": sign * jnp.full(shape_b, 0.7, jnp.float32),
  }


def _on_grid(x):
  return jnp.round(x.astype(jnp.float64) * 2.0**48) * 2.0**-48


@pytest.mark.parametrize("momentum", [0.0, 0.3, 0.9, 0.99, 1.0, "schedule"])
@pytest.mark.parametrize("num_steps", [1, 17, pytest.param(1000, marks=pytest.mark.slow)])
def test_round_trip_is_bit_exact(momentum, num_steps):
  if momentum == "schedule":
    momentum = jnp.linspace(0.5, 1.0, num_steps, dtype=jnp.float32)
  params = make_params()
  # Momentum 0 is clipped to 2**-16, with a warning; every other case must raise none.
  clipped = (pytest.warns(UserWarning, match="clipped")
             if isinstance(momentum, float) and momentum == 0.0 else contextlib.nullcontext())
  with clipped:
    rt = revhyper.round_trip(quartic_loss, params, jnp.float32(0.3), num_steps=num_steps,
                             learning_rate=0.02, momentum=momentum)
  assert bool(rt.exact) and bool(rt.buffer_empty)
  # The rebuilt state equals w_0 as rounded onto the grid (exact for these float32 values).
  chex.assert_trees_all_equal(rt.initial_params, params)
  chex.assert_trees_all_equal(rt.initial_velocity, jax.tree.map(jnp.zeros_like, params))


@pytest.mark.parametrize("shape_a,shape_b,sign", [((), (1,), 1.0), ((3, 4), (7,), -1.0),
                                                  ((1, 1, 6), (2, 2), 1.0)])
def test_round_trip_over_shapes_signs_and_per_leaf_schedules(shape_a, shape_b, sign):
  params = make_params(shape_a, shape_b, sign)
  num_steps = 50
  lr = {"a": jnp.linspace(0.01, 0.05, num_steps, dtype=jnp.float32), "b": 0.1}
  mom = {"a": 0.9, "b": jnp.linspace(0.99, 0.2, num_steps, dtype=jnp.float32)}
  velocity = jax.tree.map(lambda x: 0.25 * jnp.ones_like(x) * sign, params)
  rt = revhyper.round_trip(quartic_loss, params, jnp.float32(-0.2), num_steps=num_steps,
                           learning_rate=lr, momentum=mom, velocity=velocity)
  assert bool(rt.exact)
  chex.assert_trees_all_equal(rt.initial_params, params)
  chex.assert_trees_all_equal(rt.initial_velocity, velocity)


def test_round_trip_with_unshared_gradient_is_exact():
  rt = revhyper.round_trip(quartic_loss, make_params(), jnp.float32(0.3), num_steps=200,
                           learning_rate=0.05, momentum=0.9,
                           method=revhyper.Reversible(share_gradient=False))
  assert bool(rt.exact)


def test_stats_bits_per_weight_per_step_match_the_bound():
  out = revhyper.sgd(quartic_loss, make_params(), jnp.float32(0.3), num_steps=1000,
                     learning_rate=0.02, momentum=0.9)
  bound = np.log2(1 / (round(0.9 * 2**16) / 2**16))
  assert abs(float(out.stats.bits_per_weight_per_step) / bound - 1) < 0.01
  assert abs(float(out.stats.bits_stored) / float(out.stats.information_bound_bits) - 1) < 0.01
  assert float(out.stats.bits_stored) <= float(out.stats.capacity_bits)
  assert not bool(out.stats.failed) and not bool(out.stats.non_finite)


def test_momentum_one_stores_nothing():
  out = revhyper.sgd(quartic_loss, make_params(), jnp.float32(0.3), num_steps=100,
                     learning_rate=0.001, momentum=1.0)
  assert float(out.stats.bits_stored) == 0.0


def test_momentum_zero_is_clipped_with_a_warning():
  with pytest.warns(UserWarning, match="clipped"):
    out = revhyper.sgd(quartic_loss, make_params(), jnp.float32(0.3), num_steps=10,
                       learning_rate=0.1, momentum=0.0)
  assert abs(float(out.stats.bits_per_weight_per_step) / 16 - 1) < 0.01


def test_final_state_agrees_with_float_training():
  kwargs = dict(num_steps=200, learning_rate=0.05, momentum=0.9)
  exact = revhyper.sgd(quartic_loss, make_params(), jnp.float32(0.3), **kwargs)
  plain = revhyper.sgd(quartic_loss, make_params(), jnp.float32(0.3), method="unroll", **kwargs)
  chex.assert_trees_all_close(exact.params, plain.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(exact.velocity, plain.velocity, rtol=1e-4, atol=1e-6)


# --- errors -------------------------------------------------------------------------------

def _sgd(**overrides):
  kwargs = dict(loss_fn=quartic_loss, params=make_params(), hparams=jnp.float32(0.3),
                num_steps=5, learning_rate=0.1, momentum=0.9)
  kwargs.update(overrides)
  loss_fn, params, hparams = kwargs.pop("loss_fn"), kwargs.pop("params"), kwargs.pop("hparams")
  return revhyper.sgd(loss_fn, params, hparams, **kwargs)


@pytest.mark.parametrize("overrides,pattern", [
    (dict(params={"a": jnp.arange(5), "b": jnp.ones((2, 3))}), r"params\['a'\] must be a float"),
    (dict(momentum=1.5), r"momentum must lie in \[0, 1\]"),
    (dict(momentum=-0.1), r"momentum must lie in \[0, 1\]"),
    (dict(momentum=jnp.asarray([0.9, 0.9, np.nan, 0.9, 0.9])), r"momentum must lie in"),
    (dict(learning_rate=np.inf), r"learning_rate must be finite"),
    (dict(learning_rate=jnp.ones(4)), r"learning_rate must be a scalar or have shape"),
    (dict(momentum={"a": 0.9}), r"momentum must be a scalar, a \[num_steps\] array, or a pytree"),
    (dict(learning_rate={"a": 0.1, "b": jnp.ones(3)}), r"learning_rate\['b'\] must be a scalar"),
    (dict(num_steps=0), r"num_steps must be at least 1"),
    (dict(num_steps=2.5), r"num_steps must be a Python int"),
    (dict(velocity={"a": jnp.zeros(5)}), r"velocity must have the structure of params"),
    (dict(velocity={"a": jnp.zeros(4), "b": jnp.zeros((2, 3))}), r"velocity leaves must match"),
    (dict(loss_fn=lambda w, h, t: w["a"]), r"must return a float scalar"),
    (dict(loss_fn="not a function"), r"loss_fn must be callable"),
    (dict(method="adam"), r"method must be one of"),
])
def test_bad_input_raises_a_clear_error(overrides, pattern):
  with pytest.raises(ValueError, match=pattern):
    _sgd(**overrides)


def test_bad_method_configuration_raises():
  with pytest.raises(ValueError, match="min_decay"):
    revhyper.Reversible(min_momentum=2.0)
  with pytest.raises(ValueError, match="segment_length"):
    revhyper.Checkpoint(segment_length=0)
  with pytest.raises(ValueError, match="reversible method"):
    revhyper.round_trip(quartic_loss, make_params(), 0.3, num_steps=3, learning_rate=0.1,
                        momentum=0.9, method="unroll")


def test_traced_momentum_needs_a_static_bound():
  def meta(gamma, method):
    out = _sgd(momentum=gamma, method=method)
    return jnp.sum(out.params["a"])

  with pytest.raises(ValueError, match=re.escape("Reversible(min_decay=...)")):
    jax.jit(meta, static_argnums=1)(0.9, "reversible")
  bounded = revhyper.Reversible(min_momentum=0.5)
  traced = jax.jit(jax.grad(meta), static_argnums=1)(0.9, bounded)
  np.testing.assert_allclose(traced, jax.grad(meta)(0.9, "unroll"), rtol=1e-4)


@pytest.mark.slow
def test_diverging_training_raises_eagerly_and_is_nan_under_jit():
  diverge = dict(loss_fn=lambda w, h, t: jnp.sum(w["a"] ** 2) + jnp.sum(w["b"] ** 2),
                 learning_rate=50.0, momentum=0.5, num_steps=100)
  with pytest.raises(revhyper.ReversalError, match="fixed-point overflow"):
    _sgd(**diverge)

  def meta(lr):
    out = _sgd(**dict(diverge, learning_rate=lr))
    return jnp.sum(out.params["a"]), out.stats

  (value, stats), grad = jax.jit(jax.value_and_grad(meta, has_aux=True))(50.0)
  assert np.isnan(value) and np.isnan(grad)
  assert bool(stats.fixed_point_overflow) and bool(stats.failed)
  with pytest.raises(revhyper.ReversalError, match="fixed-point overflow"):
    stats.raise_if_failed()
  # Eager grad sees concrete values in the forward pass: it raises at once.
  with pytest.raises(revhyper.ReversalError, match="fixed-point overflow"):
    jax.grad(lambda lr: meta(lr)[0])(50.0)
  out = _sgd(**diverge, method=revhyper.Reversible(checks=False))
  assert bool(out.stats.fixed_point_overflow) and bool(out.stats.failed)
  assert np.all(np.isfinite(np.asarray(out.params["a"])))  # unchecked: the clamped values


@pytest.mark.slow
def test_bit_stack_overflow_is_detected_under_jit():
  def run(gamma, checks):
    out = _sgd(momentum=gamma, num_steps=400, learning_rate=0.01,
               method=revhyper.Reversible(min_momentum=0.99, checks=checks))
    return out.params, out.stats

  params, stats = jax.jit(run, static_argnums=1)(0.5, False)
  assert bool(stats.buffer_overflow)
  params, stats = jax.jit(run, static_argnums=1)(0.5, True)
  assert bool(stats.buffer_overflow) and np.all(np.isnan(np.asarray(params["a"])))
  with pytest.raises(revhyper.ReversalError, match="bit-stack overflow.*min_decay"):
    stats.raise_if_failed()
  assert not bool(jax.jit(run, static_argnums=1)(0.995, True)[1].buffer_overflow)


def test_invalid_traced_hyperparameters_are_reported_under_jit():
  def run(lr, gamma):
    return _sgd(learning_rate=lr, momentum=gamma,
                method=revhyper.Reversible(min_momentum=0.5, checks=False)).stats

  stats = jax.jit(run)(jnp.nan, 0.9)
  assert bool(stats.invalid_hyperparameters)
  assert bool(jax.jit(run)(0.1, 1.2).invalid_hyperparameters)
  assert not bool(jax.jit(run)(0.1, 0.9).invalid_hyperparameters)
  params = jax.jit(lambda lr: _sgd(learning_rate=lr).params)(jnp.inf)
  assert np.all(np.isnan(np.asarray(params["a"])))


def test_integer_hparams_leaves_are_allowed():
  labels = jnp.arange(5, dtype=jnp.int32)

  def loss_fn(w, h, t):
    return jnp.sum((w["a"] - h["scale"] * h["labels"].astype(jnp.float32)) ** 2) + jnp.sum(
        w["b"] ** 2)

  def meta(scale, method):
    out = _sgd(loss_fn=loss_fn, hparams={"scale": scale, "labels": labels}, method=method)
    return jnp.sum(out.params["a"])

  np.testing.assert_allclose(jax.grad(meta)(0.5, "reversible"), jax.grad(meta)(0.5, "unroll"),
                             rtol=1e-5)


def test_check_reversal_passes_on_an_exact_run():
  def meta(h):
    out = _sgd(hparams=h, num_steps=50,
               method=revhyper.Reversible(check_reversal=True))
    return jnp.sum(out.params["a"] ** 2)

  assert np.isfinite(jax.jit(jax.grad(meta))(0.3))
