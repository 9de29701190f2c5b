"""Dropout and a learned augmentation strength: randomness as a pure function of the step."""

import jax
import jax.numpy as jnp
import numpy as np

import revhyper
from revhyper import optim

NUM_STEPS = 40
BATCH = 32
DROPOUT = 0.2

# 128 training and 512 validation digits from the bundled MNIST subset, 14x14 pixels: a
# training set small enough to overfit, which is where augmentation helps.
images, labels = revhyper.datasets.load_mnist()
digits = images[:640].reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4)).reshape(-1, 196) / 255.0
x_train, x_valid = jnp.asarray(digits[:128], jnp.float32), jnp.asarray(digits[128:], jnp.float32)
y_train, y_valid = jnp.asarray(labels[:128], jnp.int32), jnp.asarray(labels[128:640], jnp.int32)

key_init, key_batches, key_dropout, key_noise = jax.random.split(jax.random.key(0), 4)
k1, k2 = jax.random.split(key_init)
params = {"w1": jax.random.normal(k1, (196, 64)) / 14.0, "b1": jnp.zeros(64),
          "w2": jax.random.normal(k2, (64, 10)) / 8.0, "b2": jnp.zeros(10)}


def cross_entropy(params, x, y, dropout_key=None):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  if dropout_key is not None:
    keep = jax.random.bernoulli(dropout_key, 1.0 - DROPOUT, h.shape)
    h = jnp.where(keep, h / (1.0 - DROPOUT), 0.0)
  logits = h @ params["w2"] + params["b2"]
  return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(
      logits, y[:, None], axis=1)[:, 0])


def train_loss(params, hparams, t):
  # Everything random is a pure function of the step t (the minibatch, the dropout mask, the
  # noise), so the backward pass, which recomputes step t from the rebuilt weights, draws
  # exactly what the forward pass drew.
  idx = revhyper.datasets.batch_indices(key_batches, t, x_train.shape[0], BATCH)
  noise = jax.random.normal(jax.random.fold_in(key_noise, t), (BATCH, 196))
  # The augmentation: additive Gaussian noise whose strength is a learned hyperparameter.
  # It enters differentiably (a scale times a fixed draw), so it gets a hypergradient.
  x = x_train[idx] + jnp.exp(hparams["log_sigma"]) * noise
  return cross_entropy(params, x, y_train[idx], jax.random.fold_in(key_dropout, t))


optimizer = optim.sgd(0.2, momentum=0.9)


def validation_loss(hparams, method):
  out = revhyper.train(train_loss, params, hparams, optimizer, num_steps=NUM_STEPS,
                       method=method)
  return cross_entropy(out.params, x_valid, y_valid)  # no dropout, no noise


meta_step = jax.jit(jax.value_and_grad(validation_loss), static_argnums=1)
hparams = {"log_sigma": jnp.float32(np.log(0.05))}

exact = meta_step(hparams, "reversible")[1]["log_sigma"]
backprop = meta_step(hparams, "unroll")[1]["log_sigma"]  # stores every step
error = float(jnp.abs(exact - backprop) / jnp.abs(backprop))
print("hypergradient of the noise strength:", float(exact))
print("relative error against unroll:", error)
assert error <= 1e-5, error

# Training runs backwards bit for bit: every random draw was reproduced in reverse.
rt = revhyper.round_trip(train_loss, params, hparams, optimizer=optimizer, num_steps=NUM_STEPS)
print("exact round trip:", bool(rt.exact))
assert rt.exact

# A few steps of hypergradient descent on the (log) noise strength.
losses, sigmas = [], []
for _ in range(6):
  loss, grad = meta_step(hparams, "reversible")
  losses.append(float(loss))
  sigmas.append(float(jnp.exp(hparams["log_sigma"])))
  hparams = {"log_sigma": hparams["log_sigma"] - 20.0 * grad["log_sigma"]}
print("noise strength per meta-step:", np.round(sigmas, 4))
print("validation loss per meta-step:", np.round(losses, 4))
# The strength moved the way the first hypergradient pointed, and that helped.
assert np.sign(sigmas[-1] - sigmas[0]) == -np.sign(float(exact)), (sigmas, float(exact))
assert losses[-1] < losses[0], losses
