"""One L2 penalty per weight of logistic regression, learned by hypergradient: figure 8.

Reproduces figure 8 of Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter
Optimization through Reversible Learning" (ICML 2015): logistic regression on MNIST (a
784-10 softmax layer, ``revhyper.models.mlp_*`` with no hidden layer) is trained with a separate L2
penalty on each of its 7850 weights and biases, and meta-optimisation tunes all 7850 penalties
on the validation loss with exact hypergradients from training run backwards. The learned
penalties of each class's 784 input weights, drawn as 28x28 images, show which pixels the
model is allowed to use (an ARD-like pattern: weak penalties where digits vary, strong ones
on the border, where pixels carry no information).

Settings (the paper's, DESIGN.md section 4):

* training loss at step t: mean cross-entropy of minibatch t + ``sum_i lambda_i * w_i**2``;
  weights start at zero; T = 50 steps of batch 200, alpha = 1, gamma = 0.9 (fixed);
* hyperparameters: ``log lambda_i``, one per weight (our parameterisation: the log keeps
  every penalty positive, so no step can make the training loss unbounded below), starting
  at ``lambda = e^-4``;
* meta-objective: the validation loss after training; meta-optimiser: plain gradient descent
  (``optax.sgd``) with step 1000, 50 iterations.

Data: the paper uses 10k training / 10k validation digits. By default this runs on the
10,000 bundled digits split 5000 / 5000; with ``--mnist_dir`` it takes 10k / 10k from the full
MNIST IDX files. Inputs are scaled to [0, 1] and centred with the training mean.

Baselines: no penalty, and the best single penalty shared by all weights (a grid of log
penalties from -10 to -3, chosen by validation loss).

Outputs in ``--out_dir``: ``results.json`` (settings, data, meta-loss history, losses and
errors before and after and for the baselines, the learned penalties), ``penalty_maps.png``
(10 panels, one 28x28 map of log10 lambda per class), ``meta_learning_curve.png``.

Run from the repository root::

  python experiments/l2_per_weight.py --out_dir results/l2_per_weight          # paper settings
  python experiments/l2_per_weight.py --quick --out_dir results/l2_per_weight_quick
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

# Flags left at None take the paper's value, or the --quick value with --quick.
flags.DEFINE_string("out_dir", "results/l2_per_weight", "Folder for results and figures.")
flags.DEFINE_bool("quick", False, "A small run that finishes in under a minute on 2 CPU cores.")
flags.DEFINE_integer("meta_iterations", None, "Meta-iterations (paper 50, quick 10).")
flags.DEFINE_integer("num_steps", None, "Training steps T (paper 50, quick 20).")
flags.DEFINE_integer("batch_size", 200, "Minibatch size (paper 200).")
flags.DEFINE_list("split", None,
                  "train,valid sizes (bundled data 5000,5000; --mnist_dir 10000,10000; "
                  "quick 1000,1000).")
flags.DEFINE_float("learning_rate", 1.0, "Training learning rate alpha (paper 1).")
flags.DEFINE_float("momentum", 0.9, "Training momentum gamma (paper 0.9).")
flags.DEFINE_float("meta_step", 1000.0, "Step of the meta-level gradient descent (paper 1000).")
flags.DEFINE_float("log_penalty", -4.0, "Initial log L2 penalty of every weight.")
flags.DEFINE_integer("seed", 0, "Seed of the minibatch order and the data split.")
flags.DEFINE_string("mnist_dir", None,
                    "Folder with the four MNIST IDX files; default: the bundled 10,000 digits.")

FLAGS = flags.FLAGS

PAPER = dict(meta_iterations=50, num_steps=50)
QUICK = dict(meta_iterations=10, num_steps=20)
BUNDLED_SPLIT = (5000, 5000)
IDX_SPLIT = (10000, 10000)  # the paper's
QUICK_SPLIT = (1000, 1000)
UNIFORM_GRID = (-10.0, -9.0, -8.0, -7.0, -6.0, -5.0, -4.0, -3.0)  # log penalties
SIDE = 28  # MNIST images are 28x28
NUM_CLASSES = 10


def _setting(name):
  return common.setting(FLAGS, name, PAPER, QUICK)


def make_problem(data, num_steps, batch_size, learning_rate, momentum, seed):
  """Returns ``(meta_loss, evaluate, params0)``: functions of the log penalties."""
  (x_train, y_train), (x_valid, y_valid) = data
  batch_key = jax.random.key(seed)
  num_train = int(x_train.shape[0])
  params0 = [{"W": jnp.zeros((SIDE * SIDE, NUM_CLASSES), jnp.float32),
              "b": jnp.zeros((NUM_CLASSES,), jnp.float32)}]

  def nll(params, x, y):
    return revhyper.models.softmax_cross_entropy(revhyper.models.mlp_apply(params, x), y)

  def train_loss(params, log_penalty, t):
    idx = revhyper.datasets.batch_indices(batch_key, t, num_train, batch_size)
    penalties = jax.tree.map(lambda w, lp: jnp.sum(jnp.exp(lp) * w ** 2), params, log_penalty)
    return nll(params, x_train[idx], y_train[idx]) + sum(jax.tree.leaves(penalties))

  def train(log_penalty):
    # alpha and gamma are Python floats, so the reversible method sizes its bit stack from
    # gamma itself and needs no min_momentum.
    return revhyper.sgd(train_loss, params0, log_penalty, num_steps=num_steps,
                        learning_rate=learning_rate, momentum=momentum).params

  def meta_loss(log_penalty):
    params = train(log_penalty)
    aux = {"train_loss": nll(params, x_train, y_train)}
    return nll(params, x_valid, y_valid), aux

  @jax.jit
  def evaluate(log_penalty):
    params = train(log_penalty)
    out = {}
    for name, x, y in (("train", x_train, y_train), ("valid", x_valid, y_valid)):
      logits = revhyper.models.mlp_apply(params, x)
      out[f"{name}_loss"] = revhyper.models.softmax_cross_entropy(logits, y)
      out[f"{name}_error"] = revhyper.models.error_rate(logits, y)
    return out

  return meta_loss, evaluate, params0


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


def plot_meta_curve(history, final, best_uniform):
  fig, ax = common.meta_learning_curve(history, [r["meta_loss"] for r in history],
                                       final["valid_loss"], "validation loss (meta-objective)")
  ax.plot([r["iteration"] for r in history] + [len(history)],
          [r["aux"]["train_loss"] for r in history] + [final["train_loss"]], "s-", ms=3,
          label="training loss")
  ax.axhline(best_uniform["valid_loss"], color="0.4", ls="--", lw=1,
             label=f"validation loss, best uniform penalty (e^{best_uniform['log_penalty']:g})")
  ax.legend(fontsize=8)
  return fig


def main(argv):
  del argv
  start = time.time()
  settings = dict(
      meta_iterations=_setting("meta_iterations"), num_steps=_setting("num_steps"),
      batch_size=FLAGS.batch_size, layer_sizes=(SIDE * SIDE, NUM_CLASSES),
      learning_rate=FLAGS.learning_rate, momentum=FLAGS.momentum,
      meta_optimizer=f"sgd({FLAGS.meta_step})", meta_objective="validation loss",
      parameterisation="log L2 penalty per weight: penalty = sum_i exp(h_i) * w_i^2",
      initial_log_penalty=FLAGS.log_penalty, seed=FLAGS.seed, quick=FLAGS.quick)
  split = common.split_sizes(FLAGS.split, FLAGS.quick, FLAGS.mnist_dir, bundled=BUNDLED_SPLIT,
                             idx=IDX_SPLIT, quick_sizes=QUICK_SPLIT)
  settings["split"] = split
  out_dir = common.prepare_out_dir(FLAGS.out_dir)
  data, data_note = common.load_mnist_splits(FLAGS.mnist_dir, split, FLAGS.seed,
                                             ("train", "valid"))
  logging.info("%s", data_note)
  logging.info("Settings: %s", settings)

  meta_loss, evaluate, params0 = make_problem(
      data, settings["num_steps"], FLAGS.batch_size, FLAGS.learning_rate, FLAGS.momentum,
      FLAGS.seed)
  h0 = jax.tree.map(lambda w: jnp.full(w.shape, FLAGS.log_penalty, jnp.float32), params0)
  settings["num_hyperparameters"] = sum(x.size for x in jax.tree.leaves(h0))

  before = {k: float(v) for k, v in evaluate(h0).items()}
  logging.info("Before: %s", before)
  # Baselines for the learned penalties: none at all, and the best single penalty shared by
  # every weight (chosen on the validation loss, like the learned ones).
  no_penalty = {k: float(v) for k, v in evaluate(
      jax.tree.map(lambda h: jnp.full_like(h, -jnp.inf), h0)).items()}
  uniform_search = []
  for value in UNIFORM_GRID:
    out = evaluate(jax.tree.map(lambda h: jnp.full_like(h, value), h0))
    uniform_search.append(dict(log_penalty=value, **{k: float(v) for k, v in out.items()}))
  best_uniform = min(uniform_search, key=lambda r: r["valid_loss"])
  logging.info("Validation loss without penalty %.4f; best uniform penalty e^%g: %.4f",
               no_penalty["valid_loss"], best_uniform["log_penalty"], best_uniform["valid_loss"])
  result = revhyper.meta.meta_optimize(
      meta_loss, h0, num_iterations=settings["meta_iterations"],
      optimizer=optax.sgd(FLAGS.meta_step), has_aux=True)
  after = {k: float(v) for k, v in evaluate(result.hparams).items()}
  logging.info("After: %s", after)
  logging.info("Validation loss (meta-objective): %.4f before, %.4f after (no penalty %.4f, "
               "best uniform penalty %.4f)", before["valid_loss"], after["valid_loss"],
               no_penalty["valid_loss"], best_uniform["valid_loss"])

  log_penalty = result.hparams[0]
  w_log = np.asarray(log_penalty["W"])
  results = dict(
      experiment="L2 penalty per weight (figure 8)", settings=settings, data=data_note,
      # meta_loss[i] is the validation loss before update i; after the last update it is
      # after["valid_loss"].
      meta_loss=[r["meta_loss"] for r in result.history], history=result.history,
      before=before, after=after, no_penalty=no_penalty, best_uniform_penalty=best_uniform,
      uniform_search=uniform_search,
      learned=dict(
          log_penalty_W=w_log,  # [784, 10]: pixel x class
          log_penalty_b=np.asarray(log_penalty["b"]),
          summary=dict(min=float(w_log.min()), max=float(w_log.max()),
                       median=float(np.median(w_log)))),
      wall_seconds=time.time() - start)
  common.save_results(out_dir, results)
  common.save_figure(plot_penalty_maps(w_log, FLAGS.log_penalty), out_dir, "penalty_maps.png")
  common.save_figure(plot_meta_curve(result.history, after, best_uniform), out_dir,
                     "meta_learning_curve.png")
  logging.info("Wrote %s (%.1f s)", out_dir, time.time() - start)


if __name__ == "__main__":
  app.run(main)
