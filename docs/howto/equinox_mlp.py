"""An Equinox model trained by revhyper.sgd; hypergradients checked against plain backprop."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

import revhyper

# A small regression problem: 256 training and 128 validation examples of a noisy target.
key_data, key_noise, key_model, key_batches = jax.random.split(jax.random.key(0), 4)
x = jax.random.normal(key_data, (384, 8))
y = jnp.sin(x[:, :1] + x[:, 1:2]) + 0.1 * jax.random.normal(key_noise, (384, 1))
x_train, y_train, x_valid, y_valid = x[:256], y[:256], x[256:], y[256:]

model = eqx.nn.MLP(8, 1, width_size=32, depth=1, activation=jnp.tanh, key=key_model)
# The float arrays are what training changes; everything else (the activation, the layer
# structure) is static. revhyper.sgd takes the arrays as its params pytree; the None
# placeholders that partition leaves in it are empty subtrees, carried through unchanged.
params, static = eqx.partition(model, eqx.is_inexact_array)


def mse(params, x, y):
  model = eqx.combine(params, static)
  return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def train_loss(params, hparams, t):
  # The minibatch is a pure function of the step t, so the backward pass can recompute it.
  idx = revhyper.datasets.batch_indices(key_batches, t, x_train.shape[0], 32)
  l2 = jnp.exp(hparams["log_l2"])
  penalty = sum(jnp.sum(w ** 2) for w in jax.tree_util.tree_leaves(params))
  return mse(params, x_train[idx], y_train[idx]) + l2 * penalty


def validation_loss(hparams, method):
  out = revhyper.sgd(train_loss, params, hparams, num_steps=50,
                     learning_rate=jnp.exp(hparams["log_lr"]), momentum=0.9, method=method)
  return mse(out.params, x_valid, y_valid)


hparams = {"log_l2": jnp.float32(-4.0), "log_lr": jnp.float32(-2.0)}
hypergradient = jax.jit(jax.grad(validation_loss), static_argnums=1)
exact = hypergradient(hparams, "reversible")
backprop = hypergradient(hparams, "unroll")  # stores the whole trajectory


def relative_error(a, b):
  a, b = ravel_pytree(a)[0], ravel_pytree(b)[0]
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


error = relative_error(exact, backprop)
print("hypergradient:", {k: float(v) for k, v in exact.items()})
print("relative error against unroll:", error)
assert error <= 1e-5, error

