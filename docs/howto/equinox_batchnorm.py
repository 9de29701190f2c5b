"""An Equinox CNN with BatchNorm: its running statistics carried through training by revhyper."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import revhyper
from revhyper import optim

NUM_STEPS = 30
BATCH = 32
MOMENTUM = 0.9  # BatchNorm's decay of its running statistics


class CNN(eqx.Module):
  """A strided convolution, BatchNorm, and a linear read-out of the pooled features."""

  conv: eqx.nn.Conv2d
  norm: eqx.nn.BatchNorm
  head: eqx.nn.Linear

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.conv = eqx.nn.Conv2d(1, 16, 3, stride=2, use_bias=False, key=k1)
    self.norm = eqx.nn.BatchNorm(16, "batch", momentum=MOMENTUM, mode="ema")
    self.head = eqx.nn.Linear(16, 10, key=k2)

  def __call__(self, x, state, inference):
    x, state = self.norm(self.conv(x), state, inference=inference)
    return self.head(jnp.mean(jax.nn.relu(x), axis=(1, 2))), state


def batch_norms(model):
  """The model's BatchNorm layers, wherever they sit in it."""
  is_norm = lambda x: isinstance(x, eqx.nn.BatchNorm)
  return [x for x in jax.tree_util.tree_leaves(model, is_leaf=is_norm) if is_norm(x)]


def apply(model, state, x, inference):
  # Equinox layers see one example; BatchNorm averages over the vmapped axis named "batch".
  return jax.vmap(lambda x, state: model(x, state, inference), axis_name="batch",
                  in_axes=(0, None), out_axes=(0, None))(x, state)


# 256 training and 256 validation digits from the MNIST subset bundled with revhyper.
images, labels = revhyper.datasets.load_mnist()
digits = images[:512].reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
data = {"x_train": digits[:256], "y_train": labels[:256].astype(np.int32),
        "x_valid": digits[256:], "y_valid": labels[256:512].astype(np.int32)}

model, state = eqx.filter_jit(eqx.nn.make_with_state(CNN))(jax.random.key(0))
params, static = eqx.partition(model, eqx.is_inexact_array)
# revhyper carries the running averages, a pytree of (mean, variance) pairs, one per layer,
# starting where flax and PyTorch start them.
initial_stats = [(jnp.zeros(n.input_size), jnp.ones(n.input_size)) for n in batch_norms(model)]
key_batches = jax.random.key(1)


def make_hypergradient(data, state):
  """jit(grad) of the validation loss after training; data's arrays fix the dtype."""

  def train_loss(params, hparams, t):
    # The minibatch is a pure function of the step t, so the backward pass can recompute it.
    idx = revhyper.datasets.batch_indices(key_batches, t, data["x_train"].shape[0], BATCH)
    model = eqx.combine(params, static)
    # A BatchNorm in "ema" mode that sees a state it has never written to (its first step)
    # normalises with this batch's statistics and stores exactly them in the state. Every
    # step hands it that fresh state, so it trains as a standard BatchNorm and what it stores
    # is this step's statistics, which revhyper then averages.
    logits, new_state = apply(model, state, data["x_train"][idx], inference=False)
    statistics = [new_state.get(n.ema_state_index) for n in batch_norms(model)]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, data["y_train"][idx]).mean()
    penalty = sum(jnp.sum(w ** 2) for w in jax.tree_util.tree_leaves(params))
    return loss + jnp.exp(hparams["log_l2"]) * penalty, statistics

  def validation_loss(hparams, params, initial_stats, method):
    out = revhyper.train(
        train_loss, params, hparams, optim.sgd(jnp.exp(hparams["log_lr"]), momentum=0.9),
        num_steps=NUM_STEPS, method=method,
        model_state=revhyper.RunningAverage(initial_stats, decay=hparams["bn_momentum"]))
    # Inference reads the running statistics from the state: put revhyper's there. (set
    # returns a new State and invalidates the old one, so start from a copy.)
    model = eqx.combine(out.params, static)
    eval_state = jax.tree_util.tree_map(lambda x: x, state)
    for norm, running in zip(batch_norms(model), out.model_state):
      eval_state = eval_state.set(norm.ema_state_index, running)
    logits, _ = apply(model, eval_state, data["x_valid"], inference=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, data["y_valid"]).mean()

  return train_loss, jax.jit(jax.grad(validation_loss), static_argnums=3)


def relative_error(a, b):
  # In numpy float64: outside jax.enable_x64, jnp would round a float64 reference to float32.
  a, b = (np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in
                          jax.tree_util.tree_leaves(tree)]) for tree in (a, b))
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# The BatchNorm momentum is a hyperparameter like the others. Under jit it is traced, so the
# exact method needs a static lower bound on every decay to size its bit stacks.
hparams = {"log_lr": jnp.float32(np.log(0.2)), "log_l2": jnp.float32(-6.0),
           "bn_momentum": jnp.float32(MOMENTUM)}
reversible = revhyper.Reversible(min_decay=0.5)
train_loss, hypergradient = make_hypergradient(jax.tree_util.tree_map(jnp.asarray, data), state)
exact = hypergradient(hparams, params, initial_stats, reversible)
backprop = hypergradient(hparams, params, initial_stats, "unroll")  # stores every step

# A float64 reference: the same unroll run with float64 weights, state, data and
# hyperparameters.
with jax.enable_x64(True):
  to64 = lambda tree: jax.tree_util.tree_map(
      lambda x: jnp.asarray(x, jnp.float64 if jnp.issubdtype(x.dtype, jnp.floating)
                            else x.dtype), tree)
  _, hypergradient64 = make_hypergradient(to64(data), to64(state))
  reference = jax.tree_util.tree_map(
      np.asarray, hypergradient64(to64(hparams), to64(params), to64(initial_stats), "unroll"))

error = relative_error(exact, backprop)
error64, error64_unroll = relative_error(exact, reference), relative_error(backprop, reference)
print("hypergradient:", {k: float(v) for k, v in exact.items()})
print("relative error against unroll:", error)
print("relative error against float64: reversible", error64, "unroll", error64_unroll)
assert error <= 1e-5, error
# Both are float32 rounding, whose size moves with how XLA compiles each method: the exact
# method's error is at most twice backprop's, or within 4 float32 epsilons.
assert error64 <= max(2 * error64_unroll, 4 * np.finfo(np.float32).eps), (error64, error64_unroll)

# Training runs backwards bit for bit, the running statistics included.
rt = revhyper.round_trip(train_loss, params, hparams, optimizer=optim.sgd(0.2, momentum=0.9),
                         num_steps=NUM_STEPS,
                         model_state=revhyper.RunningAverage(initial_stats, decay=MOMENTUM))
print("exact round trip:", bool(rt.exact))
assert rt.exact
assert all(bool(jnp.all(a == b)) for a, b in zip(
    jax.tree_util.tree_leaves(rt.initial_model_state), jax.tree_util.tree_leaves(initial_stats)))
