"""Tests of the residual convnet with BatchNorm, alone and trained with running statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import revhyper
from revhyper import models
from revhyper import optim

NUM_STEPS = 4
BATCH = 8


def test_shapes_dtypes_and_the_statistics_tree():
  params = models.resnet_init(jax.random.key(0), channels=(2, 3), blocks_per_stage=2)
  assert sorted(params) == ["block1", "block2", "block3", "block4", "head", "stem"]
  # Only the first block of the second stage changes width and resolution.
  assert [("proj" in params[f"block{i}"]) for i in range(1, 5)] == [False, False, True, False]
  assert params["block3"]["conv1"].shape == (3, 3, 2, 3)
  assert params["block3"]["proj"].shape == (1, 1, 2, 3)
  assert params["head"]["W"].shape == (3, 10)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  running = models.resnet_batchnorm_init(params)
  assert sorted(running["block3"]) == ["bn1", "bn2"] and sorted(running["stem"]) == ["bn"]
  assert float(running["block4"]["bn2"]["var"].sum()) == 3.0

  x = jax.random.normal(jax.random.key(1), (3, 64), jnp.float32)  # flattened 8x8 images

  @jax.jit
  def both(params, x):  # one compiled program: eager convolutions compile one by one
    return models.resnet_apply(params, x), models.resnet_apply(params, x.reshape(3, 8, 8, 1))

  (logits, stats), (images, _) = both(params, x)
  assert logits.shape == (3, 10) and logits.dtype == jnp.float32
  assert jax.tree.structure(stats) == jax.tree.structure(running)
  assert jax.tree.map(jnp.shape, stats) == jax.tree.map(jnp.shape, running)
  # Flattened and NHWC images are the same images.
  np.testing.assert_allclose(images, logits, rtol=1e-6, atol=1e-6)


def test_batchnorm_uses_batch_statistics_in_training_and_running_ones_in_evaluation():
  params = models.resnet_init(jax.random.key(0), channels=(4,))
  x = jax.random.normal(jax.random.key(1), (6, 8, 8, 1), jnp.float32)

  @jax.jit
  def outputs(params, x):
    logits, stats = models.resnet_apply(params, x, stem_stride=1)
    stem = jax.lax.conv_general_dilated(x, params["stem"]["conv"], (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    evaluate = lambda running, x: models.resnet_apply(params, x, running, train=False,
                                                      stem_stride=1)[0]
    initial = models.resnet_batchnorm_init(params)
    return (logits, stats, stem, evaluate(stats, x), evaluate(initial, x),
            evaluate(stats, x[:1]))

  logits, stats, stem, same, other, alone = outputs(params, x)
  np.testing.assert_allclose(stats["stem"]["bn"]["mean"], stem.mean(axis=(0, 1, 2)), atol=1e-6)
  np.testing.assert_allclose(stats["stem"]["bn"]["var"], stem.var(axis=(0, 1, 2)), rtol=1e-5)
  # Evaluation with the batch's own statistics as the running ones is training mode's output;
  # with the initial averages (mean 0, variance 1) it is not.
  np.testing.assert_allclose(same, logits, rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(other - logits))) > 1e-3
  # One example's logits in evaluation do not depend on the rest of the batch.
  np.testing.assert_allclose(alone, same[:1], rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_named():
  # Shapes and dtypes suffice: every check runs before any arithmetic.
  params = jax.eval_shape(lambda: models.resnet_init(jax.random.key(0), channels=(2,)))
  with pytest.raises(ValueError, match="running"):
    models.resnet_apply(params, np.zeros((1, 784), np.float32), train=False)
  with pytest.raises(TypeError, match="floating"):
    models.resnet_apply(params, np.zeros((1, 784), np.int32))
  with pytest.raises(ValueError, match="square"):
    models.resnet_apply(params, np.zeros((1, 783), np.float32))
  with pytest.raises(ValueError, match="channels"):
    models.resnet_init(jax.random.key(0), channels=())
  with pytest.raises(TypeError, match="dtype"):
    models.resnet_init(jax.random.key(0), dtype=jnp.int32)


def _problem(dtype, weight_decay=True):
  """A tiny BN convnet (one block: 11 leaves keep the compiles short) on 8x8 noise images
  trained by AdamW with running BN statistics, and ``meta(h, method)``: the loss of held-out
  images evaluated with the final running averages.

  Without ``weight_decay`` the weights' decay is exactly 1: every method trains with decays
  rounded to a grid (1 - lr * wd to multiples of 2**-16), a staircase that finite differences
  see and derivatives do not.
  """
  params = models.resnet_init(jax.random.key(0), channels=(2,), dtype=dtype)
  x = jax.random.normal(jax.random.key(1), (16, 8, 8, 1), dtype)
  y = jnp.arange(16, dtype=jnp.int32) % 10
  x_valid = jax.random.normal(jax.random.key(2), (16, 8, 8, 1), dtype)
  batch_key = jax.random.key(3)

  def loss_fn(w, h, t):
    idx = revhyper.datasets.batch_indices(batch_key, t, 16, BATCH)
    logits, stats = models.resnet_apply(w, x[idx], stem_stride=1)
    return models.softmax_cross_entropy(logits, y[idx]) + h["l2"] * jnp.sum(
        w["head"]["W"] ** 2), stats

  def model_state(h):
    return revhyper.RunningAverage(models.resnet_batchnorm_init(params), decay=h["bn_decay"])

  def optimizer(h):
    return optim.adamw(jnp.exp(h["log_lr"]),
                       weight_decay=jnp.exp(h["log_wd"]) if weight_decay else 0.0)

  def meta(h, method):
    out = revhyper.train(loss_fn, params, h, optimizer(h), num_steps=NUM_STEPS, method=method,
                         model_state=model_state(h))
    logits, _ = models.resnet_apply(out.params, x_valid, out.model_state, train=False,
                                    stem_stride=1)
    return models.softmax_cross_entropy(logits, y)

  h = {"log_lr": jnp.log(jnp.linspace(0.02, 0.01, NUM_STEPS, dtype=dtype)),
       "log_wd": jnp.asarray(np.log(0.05), dtype), "l2": jnp.asarray(1e-3, dtype),
       "bn_decay": jnp.asarray(0.8, dtype)}
  return params, loss_fn, model_state, optimizer, meta, h


def _relative_error(a, b):
  a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in (a, b))
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.slow
def test_hypergradient_through_running_statistics_matches_unroll():
  _, _, _, _, meta, h = _problem(jnp.float32)
  exact = revhyper.Reversible(min_decay=0.5)  # the decays are traced: bound them
  reversible = jax.jit(jax.grad(lambda h: meta(h, exact)))(h)
  unroll = jax.jit(jax.grad(lambda h: meta(h, "unroll")))(h)
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(unroll))
  assert _relative_error(reversible, unroll) <= 1e-5


@pytest.mark.slow
def test_round_trip_rebuilds_weights_moments_and_running_statistics():
  params, loss_fn, model_state, optimizer, _, h = _problem(jnp.float32)
  trip = revhyper.round_trip(loss_fn, params, h, optimizer=optimizer(h), num_steps=NUM_STEPS,
                             model_state=model_state(h))
  assert bool(trip.exact)
  for rebuilt, initial in ((trip.initial_params, params),
                           (trip.initial_model_state, models.resnet_batchnorm_init(params))):
    for a, b in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(initial)):
      np.testing.assert_array_equal(a, b)
  # Training moved the running statistics away from where they started.
  assert float(jnp.abs(trip.model_state["stem"]["bn"]["mean"]).max()) > 1e-3
