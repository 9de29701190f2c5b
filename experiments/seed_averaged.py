"""Hypergradients of the learning-rate schedule, averaged over random seeds.

Reproduces figure 5 of Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter
Optimization through Reversible Learning" (ICML 2015): the gradient of the final training loss
with respect to the learning rate alpha_t of every training step t and weight type, for the
tanh MLP 784-50-50-50-10 trained by T = 100 steps of momentum SGD (batch 200, alpha = e^-1,
gamma = 0.5, initial scale e^-3: the starting point of the schedule experiment). One seed's
hypergradient is noisy in t; averaged over seeds (each with its own initial-weight noise and
minibatch order) it is a smooth function of t. The figure shows the mean over seeds per layer,
with a band of one standard error of that mean.

Data: the 10,000 bundled MNIST digits by default (5000 of them for training); with
``--mnist_dir`` the full IDX files (10,000 training digits, as in the paper).

Outputs in ``--out_dir``: ``results.json`` (settings, which data, per-seed and mean
hypergradients per weight type) and ``seed_averaged_hypergradients.png``.

Run from the repository root::

  python experiments/seed_averaged.py --out_dir results/seed_averaged
  python experiments/seed_averaged.py --quick --out_dir results/seed_averaged_quick  # < 1 min
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

# `common` sits beside this script; make it importable when run from the repository root.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (needs the path above)
import matplotlib.pyplot as plt  # noqa: E402  (common chooses the headless backend first)
import revhyper  # noqa: E402

# Flags left at None take the paper's value, or the --quick value with --quick.
flags.DEFINE_string("out_dir", "results/seed_averaged", "Folder for results and figures.")
flags.DEFINE_bool("quick", False, "A small run that finishes in under a minute on 2 CPU cores.")
flags.DEFINE_integer("num_seeds", None, "Seeds to average over (default 10, quick 3).")
flags.DEFINE_integer("num_steps", None, "Training steps T (paper 100, quick 20).")
flags.DEFINE_integer("batch_size", None, "Minibatch size (paper 200, quick 100).")
flags.DEFINE_list("layer_sizes", None, "MLP widths (paper 784,50,50,50,10, quick 784,50,50,10).")
flags.DEFINE_integer("num_train", None,
                     "Training digits (bundled data 5000, --mnist_dir 10000, quick 1000).")
flags.DEFINE_integer("seed", 0, "First seed; seeds seed .. seed + num_seeds - 1 are used.")
flags.DEFINE_float("log_learning_rate", -1.0, "Log learning rate of every step (paper -1).")
flags.DEFINE_float("momentum", 0.5, "Momentum of every step (paper 0.5).")
flags.DEFINE_float("log_init_scale", -3.0, "Log initialisation scale (paper -3).")
flags.DEFINE_string("mnist_dir", None,
                    "Folder with the four MNIST IDX files; default: the bundled 10,000 digits.")

FLAGS = flags.FLAGS

PAPER = dict(num_seeds=10, num_steps=100, batch_size=200, layer_sizes=(784, 50, 50, 50, 10))
QUICK = dict(num_seeds=3, num_steps=20, batch_size=100, layer_sizes=(784, 50, 50, 10))
BUNDLED_TRAIN, IDX_TRAIN, QUICK_TRAIN = 5000, 10000, 1000


def _setting(name):
  return common.setting(FLAGS, name, PAPER, QUICK)


def load_train(mnist_dir, num_train):
  """The first ``num_train`` training digits, scaled to [0, 1] and centred with their mean."""
  if mnist_dir:
    images, labels = revhyper.datasets.load_mnist_idx(mnist_dir)["train"]
    note = f"Ran on full MNIST from {mnist_dir} ({num_train} training digits)."
  else:
    images, labels = revhyper.datasets.load_mnist()
    note = common.BUNDLED_DATA_NOTE + f" {num_train} training digits."
  ((x, y),) = revhyper.datasets.split_data(images, labels, (num_train,))
  x = revhyper.datasets.preprocess(x, revhyper.datasets.pixel_mean(x))
  return jnp.asarray(x), jnp.asarray(y, jnp.int32), note


def make_hypergradient(x_train, y_train, layer_sizes, num_steps, batch_size, momentum):
  """``hypergradient(key, alpha, log_scale) -> (loss, d loss / d alpha)``, jitted.

  The key seeds both the initial-weight noise and the minibatch order, so one compiled
  function serves every seed.
  """
  num_train = int(x_train.shape[0])

  def loss(params, x, y):
    return revhyper.models.softmax_cross_entropy(revhyper.models.mlp_apply(params, x), y)

  @jax.jit
  def hypergradient(key, alpha, log_scale):
    noise_key, batch_key = jax.random.split(key)
    noise = revhyper.models.mlp_noise(noise_key, layer_sizes)

    def batch_loss(params, _, t):
      idx = revhyper.datasets.batch_indices(batch_key, t, num_train, batch_size)
      return loss(params, x_train[idx], y_train[idx])

    def final_loss(alpha):
      params = revhyper.models.mlp_init_from_noise(noise, log_scale)
      # The momentum is a concrete Python float, not a traced argument, so the bit stack is
      # sized from its value and no min_momentum bound is needed.
      out = revhyper.sgd(batch_loss, params, None, num_steps=num_steps, learning_rate=alpha,
                         momentum=momentum)
      return loss(out.params, x_train, y_train)

    return jax.value_and_grad(final_loss)(alpha)

  return hypergradient


def plot_hypergradients(names, per_seed, num_seeds):
  """Two panels (weights, biases): mean hypergradient per layer over t, +- one standard error."""
  num_layers = len(names) // 2
  colours = plt.cm.viridis(np.linspace(0.0, 0.85, num_layers))
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for ax, kind in zip(axes, ("W", "b")):
    for layer in range(num_layers):
      g = np.asarray(per_seed[f"{kind}{layer + 1}"])  # [seeds, T]
      mean = g.mean(axis=0)
      sem = g.std(axis=0, ddof=1) / np.sqrt(num_seeds) if num_seeds > 1 else np.zeros_like(mean)
      t = np.arange(g.shape[1])
      ax.plot(t, mean, color=colours[layer], label=f"layer {layer + 1}")
      ax.fill_between(t, mean - sem, mean + sem, color=colours[layer], alpha=0.25, lw=0)
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set_title(f"{'Weights' if kind == 'W' else 'Biases'}: mean over {num_seeds} seeds")
    ax.set_xlabel("training step t")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(r"$\partial$ final training loss / $\partial \alpha_t$")
  axes[1].legend(fontsize=8, loc="best")
  return fig


def main(argv):
  del argv
  start = time.time()
  num_seeds, num_steps = _setting("num_seeds"), _setting("num_steps")
  layer_sizes, batch_size = _setting("layer_sizes"), _setting("batch_size")
  if FLAGS.num_train is not None:
    num_train = FLAGS.num_train
  elif FLAGS.quick:
    num_train = QUICK_TRAIN
  else:
    num_train = IDX_TRAIN if FLAGS.mnist_dir else BUNDLED_TRAIN
  settings = dict(num_seeds=num_seeds, num_steps=num_steps, batch_size=batch_size,
                  layer_sizes=layer_sizes, num_train=num_train, first_seed=FLAGS.seed,
                  learning_rate=float(np.exp(FLAGS.log_learning_rate)),
                  momentum=FLAGS.momentum, init_scale=float(np.exp(FLAGS.log_init_scale)),
                  quick=FLAGS.quick, method="reversible",
                  differentiated="final training loss w.r.t. alpha_t per weight type")
  out_dir = common.prepare_out_dir(FLAGS.out_dir)
  x_train, y_train, data_note = load_train(FLAGS.mnist_dir, num_train)
  logging.info("%s", data_note)
  logging.info("Settings: %s", settings)

  hypergradient = make_hypergradient(x_train, y_train, layer_sizes, num_steps, batch_size,
                                     FLAGS.momentum)
  like = revhyper.models.mlp_noise(jax.random.key(0), layer_sizes)  # only for the tree structure
  names = [f"{path[1].key}{path[0].idx + 1}"
           for path, _ in jax.tree_util.tree_flatten_with_path(like)[0]]
  alpha = revhyper.hyper.learning_rate_from_log(
      revhyper.hyper.constant_schedule(like, num_steps, FLAGS.log_learning_rate))
  log_scale = revhyper.hyper.constant_like(like, FLAGS.log_init_scale)

  losses, per_seed = [], {name: [] for name in names}
  for i in range(num_seeds):
    tic = time.time()
    value, grad = hypergradient(jax.random.key(FLAGS.seed + i), alpha, log_scale)
    losses.append(float(value))
    for name, g in zip(names, jax.tree_util.tree_leaves(grad)):
      per_seed[name].append(np.asarray(g))
    logging.info("seed %d/%d: final training loss %.4f, %.2f s", i + 1, num_seeds, value,
                 time.time() - tic)

  mean = {name: np.mean(g, axis=0) for name, g in per_seed.items()}
  sem = {name: (np.std(g, axis=0, ddof=1) / np.sqrt(num_seeds) if num_seeds > 1
                else np.zeros(num_steps)) for name, g in per_seed.items()}
  results = dict(experiment="seed-averaged hypergradients (figure 5)", settings=settings,
                 data=data_note, final_training_loss=losses, mean_hypergradient=mean,
                 standard_error=sem, per_seed_hypergradient=per_seed,
                 wall_seconds=time.time() - start)
  common.save_results(out_dir, results)
  common.save_figure(plot_hypergradients(names, per_seed, num_seeds), out_dir,
                     "seed_averaged_hypergradients.png")
  logging.info("Wrote %s (%.1f s)", out_dir, time.time() - start)


if __name__ == "__main__":
  app.run(main)
