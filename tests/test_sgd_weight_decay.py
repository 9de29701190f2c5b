"""Decoupled weight decay in revhyper.sgd: exact reversal, hypergradients, optax's update."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import revhyper


def loss_fn(w, h, t):
  x = jnp.cos(0.3 * t.astype(jnp.float32) + jnp.arange(5.0))
  return jnp.sum((w["a"] * x - h) ** 2) + 0.1 * jnp.sum(jnp.log(jnp.cosh(w["b"] - x[:3])))


PARAMS = {"a": jnp.linspace(-1.0, 1.5, 5, dtype=jnp.float32), "b": jnp.full((3,), 0.7)}


@pytest.mark.parametrize("weight_decay", [pytest.param(1e-4, marks=pytest.mark.slow), 0.5,
                                          pytest.param("schedule", marks=pytest.mark.slow)])
def test_round_trip_is_bit_exact_where_both_stacks_spill(weight_decay):
  num_steps = 600
  if weight_decay == "schedule":
    weight_decay = {"a": jnp.linspace(0.0, 5.0, num_steps), "b": 0.01}
  # momentum 0.3: 1.7 bits a step; lr * wd up to 0.25: up to 0.4 bits a step more.
  rt = revhyper.round_trip(loss_fn, PARAMS, jnp.float32(0.2), num_steps=num_steps,
                           learning_rate=0.05, momentum=0.3, weight_decay=weight_decay)
  assert bool(rt.exact) and bool(rt.buffer_empty)
  chex.assert_trees_all_equal(rt.initial_params, PARAMS)
  assert float(rt.stats.bits_stored) > 20 * 32 * 8  # > 20 chunks per lane
  np.testing.assert_allclose(rt.stats.bits_stored, rt.stats.information_bound_bits, rtol=0.01)


@pytest.mark.slow
def test_zero_weight_decay_is_todays_run_bit_for_bit():
  kwargs = dict(num_steps=50, learning_rate=0.05, momentum=0.9)
  plain = revhyper.sgd(loss_fn, PARAMS, jnp.float32(0.2), **kwargs)
  zero = revhyper.sgd(loss_fn, PARAMS, jnp.float32(0.2), weight_decay=0.0, **kwargs)
  chex.assert_trees_all_equal(plain, zero)
  tiny = revhyper.sgd(loss_fn, PARAMS, jnp.float32(0.2), weight_decay=1e-3, **kwargs)
  assert float(tiny.stats.information_bound_bits) > float(plain.stats.information_bound_bits)


@pytest.mark.slow
def test_hypergradients_match_unroll():
  def meta(h, lr, mom, wd, method):
    out = revhyper.sgd(loss_fn, PARAMS, h, num_steps=300, learning_rate=lr, momentum=mom,
                       weight_decay=wd, method=method)
    return jnp.sum(out.params["a"] ** 2) + jnp.sum(out.params["b"]) + jnp.sum(out.velocity["a"])

  grad = jax.jit(jax.grad(meta, argnums=(0, 1, 2, 3)), static_argnums=4)
  args = (jnp.float32(0.2), jnp.float32(0.03), jnp.float32(0.8), jnp.float32(0.3))
  got = grad(*args, revhyper.Reversible(min_momentum=0.5, check_reversal=True))
  expected = grad(*args, "unroll")
  np.testing.assert_allclose(got, expected, rtol=1e-4)


@pytest.mark.slow
def test_trajectory_matches_optax_sgd_with_decoupled_weight_decay():
  # This library's v_{t+1} = gamma v_t - (1 - gamma) g_t, w_{t+1} = w_t - alpha lambda w_t +
  # alpha v_{t+1} is optax's trace (m = g + gamma m) scaled by -alpha (1 - gamma), plus the
  # decayed weights -alpha lambda w.
  lr, momentum, wd, num_steps = 0.05, 0.9, 0.2, 500
  gamma = round(momentum * 2**16) / 2**16  # the momentum as run
  optimizer = optax.chain(optax.trace(decay=gamma),
                          optax.add_decayed_weights(wd / (1 - gamma)),
                          optax.scale(-lr * (1 - gamma)))

  @jax.jit
  def reference(params):
    def step(carry, t):
      p, state = carry
      updates, state = optimizer.update(jax.grad(loss_fn)(p, 0.2, t), state, p)
      return (optax.apply_updates(p, updates), state), None
    return jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(num_steps))[0][0]

  out = revhyper.sgd(loss_fn, PARAMS, jnp.float32(0.2), num_steps=num_steps, learning_rate=lr,
                     momentum=momentum, weight_decay=wd)
  chex.assert_trees_all_close(out.params, reference(PARAMS), rtol=1e-5, atol=1e-6)


def test_bad_weight_decay_raises():
  with pytest.raises(ValueError, match=r"learning_rate \* weight_decay must lie in \[0, 1\]"):
    revhyper.sgd(loss_fn, PARAMS, 0.2, num_steps=3, learning_rate=0.1, momentum=0.9,
                 weight_decay=-0.1)
  with pytest.raises(ValueError, match=r"weight_decay must be a scalar or have shape"):
    revhyper.sgd(loss_fn, PARAMS, 0.2, num_steps=3, learning_rate=0.1, momentum=0.9,
                 weight_decay=jnp.ones(2))
