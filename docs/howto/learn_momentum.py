"""Learning a per-step momentum schedule under jax.jit, with Reversible(min_decay=...)."""

import jax
import jax.numpy as jnp
import numpy as np

import revhyper

NUM_STEPS = 40
MIN_MOMENTUM = 0.5

# A badly conditioned quadratic: curvatures from 0.01 to 1, minibatch noise a function of t.
curvature = jnp.logspace(-2, 0, 20)
target = jnp.linspace(-1.0, 1.0, 20)
params = jnp.zeros(20)


def train_loss(w, hparams, t):
  del hparams
  noise = 0.05 * jnp.sin(37.0 * t + jnp.arange(20.0))  # deterministic in t
  return 0.5 * jnp.sum(curvature * (w - target - noise) ** 2)


def momentum_schedule(logits):
  # Every momentum lies in [MIN_MOMENTUM, 1] whatever the logits, so the bit stack sized
  # from MIN_MOMENTUM can never overflow, however far meta-training moves the logits.
  return MIN_MOMENTUM + (1 - MIN_MOMENTUM) * revhyper.hyper.momentum_from_logit(logits)


def final_loss(logits, method):
  out = revhyper.sgd(train_loss, params, None, num_steps=NUM_STEPS, learning_rate=0.5,
                     momentum=momentum_schedule(logits), method=method)
  return 0.5 * jnp.sum(curvature * (out.params - target) ** 2)


meta_step = jax.jit(jax.value_and_grad(final_loss), static_argnums=1)
# Every step starts at momentum 0.9 = MIN_MOMENTUM + (1 - MIN_MOMENTUM) * sigmoid(logit(0.8)).
logits = jnp.full(NUM_STEPS, float(revhyper.hyper.logit(jnp.float32(0.8))))

# Under jit the momentum is traced: its values are unknown when the bit stack is sized, so
# the reversible method needs a static lower bound on it, and says so without one.
try:
  meta_step(logits, "reversible")
except ValueError as missing_bound:
  print("without min_momentum:", missing_bound)
else:
  raise AssertionError("a traced momentum without min_momentum should raise ValueError")
method = revhyper.Reversible(min_decay=MIN_MOMENTUM)

exact = meta_step(logits, method)[1]
backprop = meta_step(logits, "unroll")[1]  # stores the whole trajectory
error = float(jnp.linalg.norm(exact - backprop) / jnp.linalg.norm(backprop))
print("relative error of the hypergradient against unroll:", error)
assert error <= 1e-5, error

losses = []
for _ in range(20):
  loss, grad = meta_step(logits, method)
  losses.append(float(loss))
  logits = logits - 100.0 * grad
print("final training loss per meta-step:", np.round(losses, 4))
print("learned momenta:", np.round(np.asarray(momentum_schedule(logits)), 3))
assert losses[-1] < 0.7 * losses[0]
