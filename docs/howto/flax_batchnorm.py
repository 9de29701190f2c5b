"""A Flax CNN with BatchNorm: its running statistics carried through training by revhyper."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import revhyper
from revhyper import optim

NUM_STEPS = 30
BATCH = 32


class CNN(nn.Module):
  """A strided convolution, BatchNorm, and a linear read-out of the pooled features."""

  momentum: float = 0.9  # BatchNorm's decay of its running statistics

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(16, (3, 3), strides=2, use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=self.momentum)(x))
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


# 256 training and 256 validation digits from the MNIST subset bundled with revhyper.
images, labels = revhyper.datasets.load_mnist()
digits = images[:512].reshape(-1, 28, 28, 1).astype(np.float32) / 255.0
data = {"x_train": digits[:256], "y_train": labels[:256].astype(np.int32),
        "x_valid": digits[256:], "y_valid": labels[256:512].astype(np.int32)}

model = CNN()
variables = jax.jit(model.init, static_argnames="train")(jax.random.key(0), data["x_train"][:1],
                                                         train=False)
params, initial_stats = variables["params"], variables["batch_stats"]  # stats: means 0, vars 1
# In training mode a BatchNorm layer returns, in its updated "batch_stats" collection,
# momentum * old + (1 - momentum) * this batch's statistics. With momentum 0 that is exactly
# this batch's statistics (0 * old + 1 * s == s in floating point), so the same model with
# momentum 0 hands the statistics to revhyper, which averages them with the model's momentum.
statistics_model = model.clone(momentum=0.0)
key_batches = jax.random.key(1)


def make_hypergradient(data):
  """jit(grad) of the validation loss after training; data's arrays fix the dtype."""

  def train_loss(params, hparams, t):
    # The minibatch is a pure function of the step t, so the backward pass can recompute it.
    idx = revhyper.datasets.batch_indices(key_batches, t, data["x_train"].shape[0], BATCH)
    logits, updated = statistics_model.apply(
        {"params": params, "batch_stats": initial_stats}, data["x_train"][idx], train=True,
        mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, data["y_train"][idx]).mean()
    penalty = sum(jnp.sum(w ** 2) for w in jax.tree_util.tree_leaves(params))
    return loss + jnp.exp(hparams["log_l2"]) * penalty, updated["batch_stats"]

  def validation_loss(hparams, params, initial_stats, method):
    out = revhyper.train(
        train_loss, params, hparams, optim.sgd(jnp.exp(hparams["log_lr"]), momentum=0.9),
        num_steps=NUM_STEPS, method=method,
        model_state=revhyper.RunningAverage(initial_stats, decay=hparams["bn_momentum"]))
    # Evaluation mode normalises with the running statistics that training produced.
    logits = model.apply({"params": out.params, "batch_stats": out.model_state},
                         data["x_valid"], train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, data["y_valid"]).mean()

  return train_loss, jax.jit(jax.grad(validation_loss), static_argnums=3)


def relative_error(a, b):
  # In numpy float64: outside jax.enable_x64, jnp would round a float64 reference to float32.
  a, b = (np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in
                          jax.tree_util.tree_leaves(tree)]) for tree in (a, b))
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# The BatchNorm momentum is a hyperparameter like the others. Under jit it is traced, so the
# exact method needs a static lower bound on every decay to size its bit stacks.
hparams = {"log_lr": jnp.float32(np.log(0.1)), "log_l2": jnp.float32(-6.0),
           "bn_momentum": jnp.float32(model.momentum)}
reversible = revhyper.Reversible(min_decay=0.5)
train_loss, hypergradient = make_hypergradient(jax.tree_util.tree_map(jnp.asarray, data))
exact = hypergradient(hparams, params, initial_stats, reversible)
backprop = hypergradient(hparams, params, initial_stats, "unroll")  # stores every step

# A float64 reference: the same unroll run with float64 weights, data and hyperparameters.
with jax.enable_x64(True):
  to64 = lambda tree: jax.tree_util.tree_map(
      lambda x: jnp.asarray(x, jnp.float64 if jnp.issubdtype(x.dtype, jnp.floating)
                            else x.dtype), tree)
  _, hypergradient64 = make_hypergradient(to64(data))
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
state = revhyper.RunningAverage(initial_stats, decay=model.momentum)
rt = revhyper.round_trip(train_loss, params, hparams, optimizer=optim.sgd(0.1, momentum=0.9),
                         num_steps=NUM_STEPS, model_state=state)
print("exact round trip:", bool(rt.exact))
assert rt.exact
assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
    lambda a, b: bool(jnp.all(a == b)), rt.initial_model_state, initial_stats)))
