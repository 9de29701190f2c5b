"""Tests of the small transformer, alone and trained with AdamW and dropout by every method.

Invariants: shapes and dtypes follow the parameters; dropout is a pure function of its key and
off without one; hypergradients of a validation loss with respect to a per-step log learning
rate, the log weight decay, the dropout rate and a log initialisation scale agree between exact
reversal and store-all backprop, and with central differences in float64; the round trip
rebuilds the initial state bit for bit.

The model's program takes long to compile on a CPU (layer norms and softmaxes are many small
reductions), so the hypergradients are compiled at XLA's backend optimisation level 0, about a
fifth of the default's compile time; exact reversal holds there as well.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import revhyper
from revhyper import models
from revhyper import optim

NUM_STEPS = 5
BATCH = 8
NUM_TRAIN, NUM_VAL = 150, 50
# A weight decay large enough to matter in a few steps (and for lr * wd to lie far above the
# 2**-31 grid it is rounded to).
WEIGHT_DECAY = 0.1
FAST_COMPILE = {"xla_backend_optimization_level": 0}
HYPERPARAMETERS = ("log_learning_rate", "log_weight_decay", "dropout_rate", "log_init_scale")


def digits(dtype=jnp.float32):
  """The first bundled digits as 16 tokens of 7x7 patches, labels, in ``dtype``."""
  images, labels = revhyper.datasets.load_mnist()
  images = images[:NUM_TRAIN + NUM_VAL]
  x = revhyper.datasets.preprocess(images, revhyper.datasets.pixel_mean(images[:NUM_TRAIN]))
  return (jnp.asarray(models.image_patches(np.asarray(x, np.float64), 7), dtype),
          jnp.asarray(labels[:NUM_TRAIN + NUM_VAL], jnp.int32))


def problem(dtype=jnp.float32):
  """The meta-objective (validation loss after AdamW training with dropout) and its point."""
  x, y = digits(dtype)
  base = jax.tree.map(lambda a: jnp.asarray(a, dtype), models.transformer_init(
      jax.random.key(0), 16, 49, width=8, depth=1, num_heads=2, dtype=jnp.float32))
  batch_key, dropout_key = jax.random.key(1), jax.random.key(2)

  def loss_fn(params, hparams, t):
    # The minibatch and the dropout masks are pure functions of the step.
    idx = revhyper.datasets.batch_indices(batch_key, t, NUM_TRAIN, BATCH)
    logits = models.transformer_apply(params, x[idx], dropout_rate=hparams["dropout_rate"],
                                      key=jax.random.fold_in(dropout_key, t))
    return models.softmax_cross_entropy(logits, y[idx])

  def objective(hparams, method):
    # Matrices scaled by the initialisation scale; biases and layer norms start as they are.
    scale = jnp.exp(hparams["log_init_scale"])
    params = jax.tree.map(lambda w: scale * w if w.ndim >= 2 else w, base)
    opt = optim.adamw(jnp.exp(hparams["log_learning_rate"]), eps_root=1e-8,
                      weight_decay=jnp.exp(hparams["log_weight_decay"]))
    out = revhyper.train(loss_fn, params, hparams, opt, num_steps=NUM_STEPS, method=method)
    logits = models.transformer_apply(out.params, x[NUM_TRAIN:])
    return models.softmax_cross_entropy(logits, y[NUM_TRAIN:])

  hparams = {"log_learning_rate": jnp.full((NUM_STEPS,), np.log(1e-2), dtype),
             "log_weight_decay": jnp.asarray(np.log(WEIGHT_DECAY), dtype),
             "dropout_rate": jnp.asarray(0.1, dtype),
             "log_init_scale": jnp.asarray(0.0, dtype)}
  return objective, hparams, base, loss_fn


# The learning rate and the weight decay are traced, so their product's decay needs a bound.
REVERSIBLE = revhyper.Reversible(min_decay=0.9)
SMALL = models.transformer_init(jax.random.key(0), 4, 3, width=8, depth=1, num_heads=2)


def fast(f):
  return jax.jit(f, compiler_options=FAST_COMPILE)


def hypergradient(objective, hparams, method):
  grad = fast(jax.grad(lambda h: objective(h, method)))
  return jax.tree.map(lambda g: np.asarray(g, np.float64), grad(hparams))


def flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64))
                         for x in jax.tree_util.tree_leaves(tree)])


def relative_error(a, b):
  a, b = flat(a), flat(b)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_shapes_dtypes_and_patches():
  params = models.transformer_init(jax.random.key(0), 16, 49, width=8, depth=2, num_heads=2,
                                   mlp_width=12, num_classes=3)
  assert sorted(params) == ["block1", "block2", "embed", "final_norm", "head", "position"]
  assert params["embed"]["W"].shape == (49, 8) and params["position"].shape == (16, 8)
  attention = params["block2"]["attention"]
  assert attention["qkv"].shape == (8, 3, 2, 4) and attention["out"].shape == (2, 4, 8)
  assert params["block1"]["mlp"]["W1"].shape == (8, 12)
  assert params["head"]["W"].shape == (8, 3)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))

  images = jnp.arange(2 * 784, dtype=jnp.float32).reshape(2, 784)
  patches = models.image_patches(images)
  assert patches.shape == (2, 16, 49)
  # Token 1 is the second 7x7 patch of the top row: rows 0-6, columns 7-13.
  np.testing.assert_array_equal(patches[0, 1], images[0].reshape(28, 28)[:7, 7:14].ravel())
  rows = models.image_patches(images.reshape(2, 28, 28), (1, 28))
  np.testing.assert_array_equal(rows, images.reshape(2, 28, 28))

  apply = fast(models.transformer_apply)
  with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
    logits = apply(params, patches)
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  # Each sequence is classified on its own: no mixing across the batch in evaluation.
  np.testing.assert_allclose(apply(params, patches[:1]), logits[:1], rtol=1e-5, atol=1e-5)


def test_dropout_is_a_function_of_its_key_and_off_without_one():
  x = jax.random.normal(jax.random.key(1), (5, 4, 3), jnp.float32)

  @fast
  def apply(rate, key):
    # The value and its gradient with respect to the rate, in one program.
    value = lambda r: models.transformer_apply(SMALL, x, dropout_rate=r, key=key)
    logits, pullback = jax.vjp(value, rate)
    return logits, pullback(logits)[0]

  plain = fast(models.transformer_apply)(SMALL, x)
  key = jax.random.key(7)
  np.testing.assert_allclose(apply(0.0, key)[0], plain, rtol=1e-6, atol=1e-6)
  dropped, d_rate = apply(0.3, key)
  np.testing.assert_array_equal(apply(0.3, key)[0], dropped)
  assert float(jnp.max(jnp.abs(dropped - plain))) > 1e-3
  assert float(jnp.max(jnp.abs(apply(0.3, jax.random.key(8))[0] - dropped))) > 1e-3
  # The rate gets a gradient, through the rescaling of the kept units.
  assert np.isfinite(float(d_rate)) and float(d_rate) != 0.0


def test_the_same_masks_in_every_precision():
  x = jax.random.normal(jax.random.key(1), (5, 4, 3), jnp.float32)
  key = jax.random.key(3)
  apply = lambda p, x: models.transformer_apply(p, x, dropout_rate=0.5, key=key)
  low = fast(apply)(SMALL, x)
  with jax.enable_x64(True):
    wide = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (SMALL, x))
    high = fast(apply)(*wide)
    assert high.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(high), np.asarray(low), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("call, error, match", [
    (lambda: models.transformer_init(jax.random.key(0), 4, 3, width=6, num_heads=4),
     ValueError, "divisible"),
    (lambda: models.transformer_init(jax.random.key(0), 0, 3), ValueError, "seq_len"),
    (lambda: models.transformer_init(jax.random.key(0), 4, 3.0), TypeError, "input_dim"),
    (lambda: models.transformer_init(jax.random.key(0), 4, 3, dtype=jnp.int32), TypeError,
     "floating"),
    (lambda: models.transformer_apply(SMALL, jnp.zeros((2, 4, 5))), ValueError, r"\[N, 4, 3\]"),
    (lambda: models.transformer_apply(SMALL, jnp.zeros((2, 4, 3), jnp.int32)), TypeError,
     "floating"),
    (lambda: models.image_patches(jnp.zeros((2, 30))), ValueError, "square"),
    (lambda: models.image_patches(jnp.zeros((2, 784)), 5), ValueError, "tile"),
], ids=["heads", "seq_len", "input_dim", "dtype", "shape", "integer_x", "square", "tiling"])
def test_bad_arguments_are_named(call, error, match):
  with pytest.raises(error, match=match):
    call()



@pytest.mark.slow
def test_reversible_hypergradients_agree_with_unroll():
  objective, hparams, _, _ = problem()
  unroll = hypergradient(objective, hparams, "unroll")
  reversible = hypergradient(objective, hparams, REVERSIBLE)
  # Measured 1.9e-6 (the dropout rate's alone 1.9e-4, where float32 backprop is itself 5e-4
  # from float64); store-all backprop is 1.4e-4 from a float64 unroll here, so reversal is
  # far closer to backprop than backprop is to the exact value.
  assert relative_error(reversible, unroll) <= 1e-5
  for name in HYPERPARAMETERS:
    assert np.all(np.isfinite(reversible[name])) and np.any(reversible[name] != 0), name


# Central-difference steps: learning rate and weight decay are rounded to lr * wd on a 2**-31
# grid by every method (their gradients pass straight through), so their differences need steps
# far above it; the dropout masks are piecewise constant in the rate, so its step stays below
# the gap between the draws and the rate (no draw lies within two steps of it at these seeds).
FD_STEPS = {"log_learning_rate": 1e-3, "log_weight_decay": 1e-3, "dropout_rate": 1e-5,
            "log_init_scale": 1e-5}
# Measured: learning rate up to 2e-5 and weight decay 8e-6 (the rounding's noise), the others
# 2e-8.
FD_RTOL = {"log_learning_rate": 1e-4, "log_weight_decay": 1e-4, "dropout_rate": 1e-6,
           "log_init_scale": 1e-6}


@pytest.mark.slow
def test_round_trip_is_exact():
  _, hparams, params, loss_fn = problem()
  opt = optim.adamw(1e-2, eps_root=1e-8, weight_decay=WEIGHT_DECAY)
  # Under the test's own jit (compiled fast), so checks are read from the statistics here.
  trip = fast(lambda p, h: revhyper.round_trip(
      loss_fn, p, h, optimizer=opt, num_steps=NUM_STEPS,
      method=revhyper.Reversible(checks=False)))(params, hparams)
  assert bool(trip.exact) and bool(trip.buffer_empty)
  for a, b in zip(jax.tree.leaves(trip.initial_params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  stats = trip.stats
  assert not (bool(stats.fixed_point_overflow) or bool(stats.buffer_overflow)
              or bool(stats.non_finite) or bool(stats.invalid_hyperparameters))
  assert 0 < float(stats.bits_stored) <= float(stats.capacity_bits)
