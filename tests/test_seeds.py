"""Seed-averaged hypergradients, their spread across seeds, and the meta-gradient transforms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import revhyper
from revhyper import meta


def _quadratic_meta_loss(log_lr, key, method="unroll"):
  """The loss after 5 steps of momentum SGD on a quadratic whose minimum the key draws."""
  target = jax.random.normal(key, (3,))

  def loss_fn(w, _, t):
    return jnp.sum((w - target) ** 2)

  out = revhyper.sgd(loss_fn, jnp.zeros(3), None, num_steps=5,
                     learning_rate=jnp.exp(log_lr), momentum=0.5, method=method)
  return jnp.sum((out.params - target) ** 2) + 0.1 * jnp.sum(out.params ** 2)


KEYS = jax.random.split(jax.random.key(0), 4)
LOG_LR = jnp.full((5,), -2.0)


def _reversible_meta_loss(log_lr, key):
  return _quadratic_meta_loss(log_lr, key, "reversible")


@pytest.mark.slow
def test_averaged_hypergradient_is_the_mean_of_the_per_seed_ones():
  # Through the reversible method: vmap runs the seeds' training backwards side by side.
  loss, grad = meta.seed_averaged_hypergradient(_reversible_meta_loss, LOG_LR, KEYS)
  one_by_one = [jax.value_and_grad(_quadratic_meta_loss)(LOG_LR, k) for k in KEYS]
  np.testing.assert_allclose(loss, np.mean([v for v, _ in one_by_one]), rtol=1e-6)
  np.testing.assert_allclose(grad, np.mean([g for _, g in one_by_one], axis=0), rtol=1e-5,
                             atol=1e-7)
  losses, grads = meta.per_seed_hypergradients(_reversible_meta_loss, LOG_LR, KEYS)
  assert losses.shape == (4,) and grads.shape == (4, 5)
  np.testing.assert_allclose(grads[2], one_by_one[2][1], rtol=1e-5, atol=1e-7)


def test_aux_keeps_its_seed_axis():
  def with_aux(h, key):
    value = _quadratic_meta_loss(h, key)
    return value, {"twice": 2 * value}

  (loss, aux), _ = meta.seed_averaged_hypergradient(with_aux, LOG_LR, KEYS, has_aux=True)
  assert aux["twice"].shape == (4,)
  np.testing.assert_allclose(jnp.mean(aux["twice"]), 2 * loss, rtol=1e-6)


def test_variance_is_zero_for_identical_seeds_and_positive_for_different_ones():
  same = jnp.stack([KEYS[0]] * 3)
  _, grads = meta.per_seed_hypergradients(_quadratic_meta_loss, LOG_LR, same)
  spread = meta.hypergradient_variance({"log_lr": grads})
  assert float(jnp.max(spread.variance["log_lr"])) == 0.0
  assert float(spread.signal_to_noise) == np.inf
  np.testing.assert_allclose(spread.mean_cosine, 1.0, rtol=1e-6)

  _, grads = meta.per_seed_hypergradients(_quadratic_meta_loss, LOG_LR, KEYS)
  spread = meta.hypergradient_variance({"log_lr": grads})
  np.testing.assert_allclose(spread.variance["log_lr"], np.var(grads, axis=0, ddof=1),
                             rtol=1e-5)
  assert 0 < float(spread.signal_to_noise) < np.inf
  assert -1 <= float(spread.mean_cosine) <= 1 + 1e-6


def test_variance_needs_two_seeds_on_one_axis():
  with pytest.raises(ValueError, match="at least two"):
    meta.hypergradient_variance(jnp.ones((1, 3)))
  with pytest.raises(ValueError, match="same leading"):
    meta.hypergradient_variance({"a": jnp.ones((2, 3)), "b": jnp.ones((3,))})


def test_clipping_bounds_the_norm_and_drops_non_finite_hypergradients():
  clip = meta.clip_hypergradient(0.5)
  state = clip.init(None)
  for scale in (1e-3, 1.0, 1e6):
    grads = {"a": scale * jnp.arange(1.0, 4.0), "b": scale * jnp.ones((2, 2))}
    updates, _ = clip.update(grads, state)
    norm = float(optax.tree.norm(updates))
    assert norm <= 0.5 * (1 + 1e-6)
    if float(optax.tree.norm(grads)) <= 0.5:  # small ones pass unchanged
      np.testing.assert_array_equal(updates["a"], grads["a"])
  updates, _ = clip.update({"a": jnp.array([1.0, jnp.nan])}, state)
  np.testing.assert_array_equal(updates["a"], [0.0, 0.0])
  with pytest.raises(ValueError, match="positive"):
    meta.clip_hypergradient(0.0)


def test_normalising_gives_unit_norm_and_chains_before_adam():
  norm = meta.normalize_hypergradient()
  updates, _ = norm.update({"a": jnp.array([3.0, 4.0])}, norm.init(None))
  np.testing.assert_allclose(updates["a"], [0.6, 0.8], rtol=1e-6)
  updates, _ = norm.update({"a": jnp.zeros(2)}, norm.init(None))
  np.testing.assert_array_equal(updates["a"], [0.0, 0.0])
  updates, _ = norm.update({"a": jnp.array([jnp.inf, 1.0])}, norm.init(None))
  np.testing.assert_array_equal(updates["a"], [0.0, 0.0])
  # Chained before a meta-optimizer, it still minimises a quadratic.
  opt = optax.chain(meta.clip_hypergradient(1.0), optax.sgd(0.1))
  h = jnp.array([5.0, -5.0])
  state = opt.init(h)
  for _ in range(100):
    updates, state = opt.update(2 * h, state)
    h = optax.apply_updates(h, updates)
  assert float(jnp.max(jnp.abs(h))) < 0.1
