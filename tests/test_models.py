"""Tests of the MLP, its initialisation and its losses."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from revhyper import _hyper
from revhyper import _models

SIZES = (12, 5, 4, 3)


def test_mlp_noise_shapes_and_dtypes():
  noise = _models.mlp_noise(jax.random.key(0), SIZES)
  assert [(p["W"].shape, p["b"].shape) for p in noise] == [
      ((12, 5), (5,)),
      ((5, 4), (4,)),
      ((4, 3), (3,)),
  ]
  leaves = jax.tree.leaves(noise)
  assert all(x.dtype == jnp.float32 for x in leaves)
  assert len({float(x.ravel()[0]) for x in leaves}) == len(leaves)  # independent draws
  everything = np.concatenate([np.asarray(x).ravel() for x in leaves])
  # 104 standard normal draws: both bounds are about four standard errors.
  assert abs(everything.mean()) < 0.4 and abs(everything.std() - 1) < 0.3


def test_mlp_init_from_noise_is_scaled_noise_and_differentiable():
  noise = _models.mlp_noise(jax.random.key(0), SIZES)
  log_scales = _hyper.constant_like(noise, -3.0)
  log_scales[0]["W"] = jnp.float32(-1.0)
  params = _models.mlp_init_from_noise(noise, log_scales)
  np.testing.assert_allclose(params[0]["W"], np.exp(-1.0) * noise[0]["W"], rtol=1e-6)
  np.testing.assert_allclose(params[2]["b"], np.exp(-3.0) * noise[2]["b"], rtol=1e-6)

  # d/ds sum(exp(s) * n) = exp(s) * sum(n), one scale per weight type.
  def total(s):
    return sum(jnp.sum(x) for x in jax.tree.leaves(_models.mlp_init_from_noise(noise, s)))

  grads = jax.jit(jax.grad(total))(log_scales)
  np.testing.assert_allclose(grads[1]["W"], np.exp(-3.0) * np.sum(noise[1]["W"]), rtol=1e-5)
  with pytest.raises(ValueError, match="log_scales"):
    _models.mlp_init_from_noise(noise, log_scales[:2])


def test_mlp_init_scale():
  params = _models.mlp_init(jax.random.key(0), SIZES, scale=0.5)
  noise = _models.mlp_noise(jax.random.key(0), SIZES)
  chex.assert_trees_all_close(params, jax.tree.map(lambda n: 0.5 * n, noise))


@pytest.mark.parametrize("x64", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_mlp_forward_and_gradients(x64):
  with jax.enable_x64(x64):
    params = _models.mlp_init(jax.random.key(0), SIZES, scale=0.3)
    x = jax.random.normal(jax.random.key(1), (7, 12), jnp.float32)
    labels = jnp.arange(7, dtype=jnp.int32) % 3
    logits = jax.jit(_models.mlp_apply)(params, x)
    assert logits.shape == (7, 3) and logits.dtype == jnp.float32

    def loss(p):
      return _models.softmax_cross_entropy(_models.mlp_apply(p, x), labels)

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert value.dtype == jnp.float32 and value.shape == ()
    chex.assert_trees_all_equal_dtypes(grads, params)
    chex.assert_tree_all_finite(grads)
    assert _models.error_rate(logits, labels).dtype == jnp.float32


def test_mlp_float64_matches_numpy():
  with jax.enable_x64(True):
    params = _models.mlp_init(jax.random.key(0), SIZES, scale=0.3, dtype=jnp.float64)
    x = np.random.default_rng(0).normal(size=(2, 6, 12))
    logits = _models.mlp_apply(params, x)
    assert logits.dtype == jnp.float64 and logits.shape == (2, 6, 3)
    h = x
    for i, p in enumerate(params):
      h = h @ np.asarray(p["W"]) + np.asarray(p["b"])
      h = np.tanh(h) if i < len(params) - 1 else h
    np.testing.assert_allclose(logits, h, rtol=1e-12)


def test_logistic_regression_and_strict_promotion():
  # No hidden layer; also runs under the strictest numpy promotion settings.
  with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
    noise = _models.mlp_noise(jax.random.key(0), (784, 10))
    params = _models.mlp_init_from_noise(noise, _hyper.constant_like(noise, -2.0))
    x = jnp.ones((5, 784), jnp.float32)
    labels = jnp.array([0, 1, 2, 3, 9], jnp.uint8)

    def loss(p):
      return _models.softmax_cross_entropy(_models.mlp_apply(p, x), labels)

    chex.assert_tree_all_finite(jax.jit(jax.grad(loss))(params))
    _models.error_rate(_models.mlp_apply(params, x), labels)
    np.testing.assert_allclose(
        _models.mlp_apply(params, x), x @ params[0]["W"] + params[0]["b"][None], rtol=1e-6)


def test_softmax_cross_entropy_and_error_rate():
  logits = jnp.array(
      [[2.0, 0.0, -1.0], [0.0, 3.0, 0.0], [1.0, 1.0, 5.0], [0.5, 0.2, 0.1]], jnp.float32)
  labels = jnp.array([0, 2, 2, 1])
  log_probs = np.asarray(logits) - np.log(np.exp(np.asarray(logits)).sum(-1, keepdims=True))
  expected = -np.mean(log_probs[np.arange(4), np.asarray(labels)])
  np.testing.assert_allclose(_models.softmax_cross_entropy(logits, labels), expected, rtol=1e-6)
  uniform = _models.softmax_cross_entropy(jnp.zeros((3, 10), jnp.float32), jnp.arange(3))
  np.testing.assert_allclose(uniform, np.log(10), rtol=1e-6)
  assert float(_models.error_rate(logits, labels)) == 0.5


def test_errors():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="layer_sizes"):
    _models.mlp_noise(key, (784,))
  with pytest.raises(ValueError, match="layer_sizes"):
    _models.mlp_noise(key, (784, 0, 10))
  with pytest.raises(TypeError, match="layer_sizes"):
    _models.mlp_noise(key, (784, 5.0))
  with pytest.raises(TypeError, match="dtype"):
    _models.mlp_noise(key, (4, 2), dtype=jnp.int32)
  params = _models.mlp_init(key, (4, 2), scale=1.0)
  with pytest.raises(ValueError, match="x must have shape"):
    _models.mlp_apply(params, jnp.zeros((3, 5), jnp.float32))
  with pytest.raises(TypeError, match="x must be floating"):
    _models.mlp_apply(params, jnp.zeros((3, 4), jnp.uint8))
  with pytest.raises(ValueError, match="params"):
    _models.mlp_apply([], jnp.zeros((3, 4), jnp.float32))
  logits = jnp.zeros((3, 2), jnp.float32)
  with pytest.raises(TypeError, match="labels"):
    _models.softmax_cross_entropy(logits, jnp.zeros(3, jnp.float32))
  with pytest.raises(ValueError, match="labels must have shape"):
    _models.softmax_cross_entropy(logits, jnp.zeros(4, jnp.int32))
  with pytest.raises(TypeError, match="logits"):
    _models.error_rate(jnp.zeros((3, 2), jnp.int32), jnp.zeros(3, jnp.int32))
