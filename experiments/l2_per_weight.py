"""One L2 penalty per weight of logistic regression, learned by hypergradient: figure 8.

Reproduces figure 8 of Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter
Optimization through Reversible Learning" (ICML 2015), with the settings of the authors' code
(HIPS/hypergrad, experiments/Jan_21_nn_ard/2): logistic regression on MNIST (a 784-10 softmax
layer, ``revhyper.models.mlp_*`` with no hidden layer) is trained with a separate L2 penalty on
each of its 7850 weights and biases, and meta-optimisation tunes all 7850 penalties with exact
hypergradients from training run backwards. The learned penalties of each class's 784 input
weights, drawn as 28x28 images, show which pixels the model is allowed to use (an ARD-like
pattern: weak penalties where digits vary, strong ones on the border).

Settings (the authors' code):

* training loss at step t: mean cross-entropy of minibatch t (consecutive slices of 200, in
  order) + ``sum_i exp(h_i) * w_i**2``; T = 50 steps, alpha = 1, gamma = 0.9; the weights start
  at one fixed draw ``w0 = e^-4 * N(0, 1)``;
* hyperparameters: ``h_i``, the log penalty of each weight, starting at log(0.01) + 1 ~ -3.6;
* meta-objective: validation NLL + 0.01 * ||exp(h)||^2; meta-optimiser: plain gradient descent
  with step 1000, 50 iterations.

Held-out evaluation: the initial, learned and baseline penalties each train
``config.eval_seeds`` (20) fresh initial draws and minibatch orders (a permutation of the
training split per seed, never used in meta-training; one ``jax.vmap``), scored on a test
split never used for meta-training: mean ± sd in results.json and the figures. Baselines: no
penalty, and the best single penalty shared by all weights (a grid, chosen by validation loss).

Departures from the authors' code (also in results.json): the bundled digits split
5000 / 4000 / 1000 (the paper's code: 10k / 10k / 1k of full MNIST; ``config.mnist_dir``); the
initial draw from JAX's generator. Inputs are scaled to [0, 1] and centred, as the authors'.

Outputs in ``--out_dir``: ``results.json`` (the shared schema: commit, JAX version, backend,
config, departures; then the meta-loss history, held-out losses and errors of every setting,
the learned penalties), ``penalty_maps.png`` (10 panels, one 28x28 map of log10 penalty per
class) and ``meta_learning_curve.png`` (with the held-out test loss, mean ± sd).

Run from the repository root::

  python experiments/l2_per_weight.py --out_dir results/l2_per_weight     # ~1 min
  python experiments/l2_per_weight.py --config=experiments/configs/l2_per_weight.py:quick \
      --out_dir /tmp/l2_quick                                               # under 30 CPU-seconds
"""

import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

# `common` sits beside this script; make it importable when run from the repository root.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (needs the path above)
import matplotlib.pyplot as plt  # noqa: E402  (common chooses the headless backend first)
import revhyper  # noqa: E402

CONFIG = common.define_config("l2_per_weight")
common.define_out_dir("results/l2_per_weight")

FLAGS = flags.FLAGS
DEPARTURES = (
    "Bundled data: 10,000 MNIST digits split 5000/4000/1000 (the paper's code: 10k/10k/1k of "
    "full MNIST).",
    "The initial weights are one draw of JAX's generator, not numpy's seed 0.",
)
SIDE = 28  # MNIST images are 28x28
NUM_CLASSES = 10


def make_problem(data, c):
  """Returns ``(meta_loss, evaluate, like)``: functions of the log penalties ``h``.

  ``meta_loss(h) -> (validation NLL + meta_l2 ||exp(h)||^2, aux)`` trains from the fixed draw
  in the data's order; ``evaluate(h, keys)`` (jitted, vmapped over keys) trains from a fresh
  draw and a fresh order of the training split per key and returns per-seed losses and errors.
  """
  (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = data
  num_train, batch_size = int(x_train.shape[0]), c.batch_size
  num_batches = num_train // batch_size
  like = [{"W": jnp.zeros((SIDE * SIDE, NUM_CLASSES), jnp.float32),
           "b": jnp.zeros((NUM_CLASSES,), jnp.float32)}]

  def nll(params, x, y):
    return revhyper.models.softmax_cross_entropy(revhyper.models.mlp_apply(params, x), y)

  def initial_params(key):
    leaves, tree = jax.tree.flatten(like)
    scale = float(np.exp(c.log_init_scale))
    return jax.tree.unflatten(tree, [scale * jax.random.normal(k, w.shape, w.dtype)
                                     for k, w in zip(jax.random.split(key, len(leaves)), leaves)])

  def train(log_penalty, params0, order, method="reversible"):
    def train_loss(params, log_penalty, t):
      # Consecutive slices of the (possibly permuted) training split, cycled in order.
      idx = jax.lax.dynamic_slice_in_dim(order, (t % num_batches) * batch_size, batch_size)
      penalties = jax.tree.map(lambda w, lp: jnp.sum(jnp.exp(lp) * w ** 2), params, log_penalty)
      return nll(params, x_train[idx], y_train[idx]) + sum(jax.tree.leaves(penalties))
    # alpha and gamma are Python floats, so the reversible method sizes its bit stack from
    # gamma itself and needs no min_momentum.
    return revhyper.sgd(train_loss, params0, log_penalty, num_steps=c.num_steps,
                        learning_rate=c.learning_rate, momentum=c.momentum,
                        method=method).params

  fixed_params0 = initial_params(jax.random.fold_in(common.meta_training_key(c.seed), 0))
  in_order = jnp.arange(num_train, dtype=jnp.int32)

  def meta_regulariser(log_penalty):
    return c.meta_l2 * sum(jnp.sum(jnp.exp(2.0 * lp)) for lp in jax.tree.leaves(log_penalty))

  def meta_loss(log_penalty):
    params = train(log_penalty, fixed_params0, in_order)
    valid = nll(params, x_valid, y_valid)
    aux = {"valid_nll": valid, "train_nll": nll(params, x_train, y_train)}
    return valid + meta_regulariser(log_penalty), aux

  def evaluate_one(log_penalty, key):
    init_key, order_key = jax.random.split(key)
    order = jax.random.permutation(order_key, num_train).astype(jnp.int32)
    # Nothing is differentiated here: the plain float method, cheaper to compile and run.
    params = train(log_penalty, initial_params(init_key), order, "unroll")
    out = {}
    for name, x, y in (("train", x_train, y_train), ("valid", x_valid, y_valid),
                       ("test", x_test, y_test)):
      logits = revhyper.models.mlp_apply(params, x)
      out[f"{name}_loss"] = revhyper.models.softmax_cross_entropy(logits, y)
      out[f"{name}_error"] = revhyper.models.error_rate(logits, y)
    return out

  evaluate = jax.jit(jax.vmap(evaluate_one, in_axes=(None, 0)))
  return meta_loss, evaluate, like


def plot_penalty_maps(log_penalty_w, initial):
  """One 28x28 map of log10 lambda per class (figure 8)."""
  maps = np.asarray(log_penalty_w).T.reshape(NUM_CLASSES, SIDE, SIDE) / np.log(10.0)
  fig, axes = plt.subplots(2, 5, figsize=(11, 4.9))
  # A colour scale centred on the initial value: blue = penalty lowered, red = raised.
  spread = max(np.max(np.abs(maps - initial / np.log(10.0))), 1e-6)
  centre = initial / np.log(10.0)
  for digit, ax in enumerate(axes.flat):
    im = ax.imshow(maps[digit], cmap="RdBu_r", vmin=centre - spread, vmax=centre + spread)
    ax.set_title(f"class {digit}", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.colorbar(im, ax=axes, shrink=0.85, label="log10 L2 penalty")
  fig.suptitle("Learned L2 penalty of each input weight, by class")
  return fig


def plot_meta_curve(history, held_out):
  """Validation NLL per meta-iteration, and held-out test NLL (mean ± sd) of every setting."""
  fig, ax = plt.subplots(figsize=(6, 3.8))
  it = [r["iteration"] for r in history]
  ax.plot(it, [r["aux"]["valid_nll"] for r in history], "o-", ms=3,
          label="validation NLL (meta-training draw)")
  ax.plot(it, [r["aux"]["train_nll"] for r in history], "s-", ms=3,
          label="training NLL (meta-training draw)")
  end = len(history)
  marks = (("initial", 0, "0.4"), ("learned", end, "C3"), ("best_uniform", end, "C2"),
           ("no_penalty", end, "C4"))
  for offset, (name, x, colour) in enumerate(marks):
    stats = held_out[name]["test_loss"]
    ax.errorbar([x + 0.6 * (offset - 1.5) * (name != "initial")], [stats["mean"]],
                yerr=[stats["sd"]], fmt="D", color=colour, capsize=4, mfc="none",
                label=f"test NLL, {name.replace('_', ' ')} (held-out, {stats['n']} seeds)")
  ax.set_xlabel("meta-iteration")
  ax.set_ylabel("negative log-likelihood")
  ax.set_title("L2 penalty per weight: meta-learning curve")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return fig


def main(argv):
  del argv
  start = time.time()
  c = CONFIG.value
  out_dir = common.prepare_out_dir(FLAGS.out_dir)
  data, data_note = common.load_mnist_splits(c.mnist_dir, tuple(c.split), c.seed,
                                             ("train", "valid", "test"))
  logging.info("%s", data_note)
  logging.info("Config:\n%s", c)

  meta_loss, evaluate, like = make_problem(data, c)
  h0 = jax.tree.map(lambda w: jnp.full(w.shape, c.initial_log_penalty, jnp.float32), like)
  num_hyperparameters = sum(x.size for x in jax.tree.leaves(h0))
  result = revhyper.meta.meta_optimize(
      meta_loss, h0, num_iterations=c.meta_iterations, optimizer=optax.sgd(c.meta_step),
      has_aux=True)

  keys = common.held_out_keys(c.seed, c.eval_seeds)

  def held_out(log_penalty):
    return common.summarise_seeds(evaluate(log_penalty, keys))

  def uniform(value):
    return jax.tree.map(lambda h: jnp.full_like(h, value), h0)

  # The uniform baseline is chosen like the learned penalties: by validation loss (held-out
  # seeds' mean), never by the test split.
  uniform_search = [dict(log_penalty=v, **held_out(uniform(v))) for v in c.uniform_grid]
  best = min(uniform_search, key=lambda r: r["valid_loss"]["mean"])
  results_held_out = {
      "initial": held_out(h0), "learned": held_out(result.hparams),
      "best_uniform": {k: v for k, v in best.items() if k != "log_penalty"},
      "no_penalty": held_out(uniform(-jnp.inf))}
  for name, r in results_held_out.items():
    logging.info("Held-out %s: test NLL %s, test error %s", name,
                 common.format_mean_sd(r["test_loss"]),
                 common.format_mean_sd(r["test_error"], 100, 2, "%"))

  log_penalty = result.hparams[0]
  w_log = np.asarray(log_penalty["W"])
  results = dict(
      data=data_note, num_hyperparameters=num_hyperparameters,
      parameterisation="L2 penalty per weight: sum_i exp(h_i) * w_i^2",
      meta_objective=f"validation NLL + {c.meta_l2} * ||exp(h)||^2",
      # meta_loss[i]: the meta-objective before update i, on the meta-training draw.
      meta_loss=[r["meta_loss"] for r in result.history], history=result.history,
      held_out=results_held_out, best_uniform_log_penalty=best["log_penalty"],
      uniform_search=[{"log_penalty": r["log_penalty"], "valid_loss": r["valid_loss"]["mean"],
                       "test_loss": r["test_loss"]["mean"]} for r in uniform_search],
      learned=dict(
          log_penalty_W=w_log,  # [784, 10]: pixel x class
          log_penalty_b=np.asarray(log_penalty["b"]),
          summary=dict(min=float(w_log.min()), max=float(w_log.max()),
                       median=float(np.median(w_log)))),
      wall_seconds=time.time() - start)
  common.write_results(out_dir, "L2 penalty per weight (figure 8)", c, results, DEPARTURES)
  common.save_figure(plot_penalty_maps(w_log, c.initial_log_penalty), out_dir,
                     "penalty_maps.png")
  common.save_figure(plot_meta_curve(result.history, results_held_out), out_dir,
                     "meta_learning_curve.png")
  logging.info("Wrote %s (%.1f s)", out_dir, time.time() - start)


if __name__ == "__main__":
  app.run(main)
