"""An optax learning-rate schedule as revhyper.sgd's learning_rate, differentiated end to end."""

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

import revhyper

NUM_STEPS = 50

# Least squares on a fixed data set, the minibatch a pure function of the step t.
key_data, key_target, key_batches = jax.random.split(jax.random.key(0), 3)
x = jax.random.normal(key_data, (512, 16))
y = x @ jax.random.normal(key_target, (16,)) + 0.1 * jnp.sin(jnp.arange(512.0))
x_train, y_train, x_valid, y_valid = x[:384], y[:384], x[384:], y[384:]
params = {"w": jnp.zeros(16), "b": jnp.zeros(())}


def predict(params, x):
  return x @ params["w"] + params["b"]


def train_loss(params, hparams, t):
  del hparams  # this loss has none: the learning rates are the hyperparameters here
  idx = revhyper.datasets.batch_indices(key_batches, t, x_train.shape[0], 64)
  return jnp.mean((predict(params, x_train[idx]) - y_train[idx]) ** 2)


def validation_loss(learning_rate, method="reversible"):
  """The validation loss after training with one learning rate per step, [NUM_STEPS]."""
  out = revhyper.sgd(train_loss, params, None, num_steps=NUM_STEPS,
                     learning_rate=learning_rate, momentum=0.9, method=method)
  return jnp.mean((predict(out.params, x_valid) - y_valid) ** 2)


# An optax schedule is a function of the step; evaluated at every step it is the [T] array
# that revhyper.sgd takes. Its shape (warm-up, then cosine decay, peak 1) stays fixed here and
# a learned scale exp(log_scale) multiplies it.
shape = optax.warmup_cosine_decay_schedule(
    init_value=0.0, peak_value=1.0, warmup_steps=10, decay_steps=NUM_STEPS)(jnp.arange(NUM_STEPS))


def scaled(log_scale, method):
  return validation_loss(jnp.exp(log_scale) * shape, method)


scale_grad = jax.jit(jax.grad(scaled), static_argnums=1)
exact = scale_grad(jnp.log(0.05), "reversible")
backprop = scale_grad(jnp.log(0.05), "unroll")  # stores the whole trajectory
print("d validation loss / d log scale:", float(exact), "unroll:", float(backprop))

# Or every step's learning rate is a hyperparameter, starting from the schedule's values:
# the hypergradient has one entry per step.
per_step_grad = jax.jit(jax.grad(validation_loss), static_argnums=1)
exact_steps = per_step_grad(0.05 * shape, "reversible")
backprop_steps = per_step_grad(0.05 * shape, "unroll")
# By the chain rule the two agree: the scale's gradient is sum_t lr_t * d loss / d lr_t.
chain_rule = float(jnp.sum(0.05 * shape * exact_steps))
print("per-step hypergradient:", exact_steps, "sum_t lr_t * grad_t:", chain_rule)
assert abs(chain_rule - float(exact)) <= 1e-4 * abs(float(exact))


def relative_error(a, b):
  a, b = ravel_pytree(a)[0], ravel_pytree(b)[0]
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


errors = relative_error(exact, backprop), relative_error(exact_steps, backprop_steps)
print("relative errors against unroll:", errors)
assert max(errors) <= 1e-5, errors
