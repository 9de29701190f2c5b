"""Learning the training set itself by hypergradient: figure 9.

Reproduces figure 9 of Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter
Optimization through Reversible Learning" (ICML 2015): the hyperparameters are the training
data, ten 28x28 images with labels 0-9 (one per class). Logistic regression (784-10,
``revhyper.models.mlp_*`` with no hidden layer) is trained on those ten images only; the
meta-objective is its loss on real validation digits, and exact hypergradients with respect to
every pixel (from training run backwards) shape the ten images into prototypical digits.

Settings (the paper's, DESIGN.md section 4):

* hyperparameters: 10 x 784 pixels (in the centred input space, so zero is the mean digit;
  they start at zero) plus one log L2 penalty on the weights (starts at -4);
* training loss: mean cross-entropy on the ten images + ``exp(log_l2) * sum(w**2)``; weights
  start at zero; T = 20 steps, batch 10 (the whole set), alpha = 1, gamma = 0.9;
* meta-objective: the validation loss on real digits; meta-optimiser: plain gradient descent
  (``optax.sgd``) with step 1, 40 iterations.

Data: validation and test digits come from the 10,000 bundled digits (5000 / 5000) by
default, from the full MNIST IDX files with ``--mnist_dir`` (10k / 10k). Inputs are scaled to
[0, 1] and centred with the validation mean. The test split is never used for learning; its
loss shows how much of the improvement is not fitted to the validation digits.

Outputs in ``--out_dir``: ``results.json`` (settings, data, meta-loss history, losses and
errors before and after, the learned images and penalty), ``learned_images.png`` (the ten
learned training images), ``meta_learning_curve.png``.

Run from the repository root::

  python experiments/learn_data.py --out_dir results/learn_data          # paper settings
  python experiments/learn_data.py --quick --out_dir results/learn_data_quick
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
flags.DEFINE_string("out_dir", "results/learn_data", "Folder for results and figures.")
flags.DEFINE_bool("quick", False, "A small run that finishes in under a minute on 2 CPU cores.")
flags.DEFINE_integer("meta_iterations", None, "Meta-iterations (paper 40, quick 10).")
flags.DEFINE_integer("num_steps", 20, "Training steps T (paper 20).")
flags.DEFINE_list("split", None,
                  "valid,test sizes (bundled data 5000,5000; --mnist_dir 10000,10000; "
                  "quick 1000,1000).")
flags.DEFINE_float("learning_rate", 1.0, "Training learning rate alpha (paper 1).")
flags.DEFINE_float("momentum", 0.9, "Training momentum gamma (paper 0.9).")
flags.DEFINE_float("meta_step", 1.0, "Step of the meta-level gradient descent (paper 1).")
flags.DEFINE_float("log_l2", -4.0, "Initial log L2 penalty on the weights.")
flags.DEFINE_integer("seed", 0, "Seed of the data split.")
flags.DEFINE_string("mnist_dir", None,
                    "Folder with the four MNIST IDX files; default: the bundled 10,000 digits.")

FLAGS = flags.FLAGS

PAPER = dict(meta_iterations=40)
QUICK = dict(meta_iterations=10)
BUNDLED_SPLIT = (5000, 5000)
IDX_SPLIT = (10000, 10000)
QUICK_SPLIT = (1000, 1000)
SIDE = 28  # MNIST images are 28x28
NUM_CLASSES = 10


def _setting(name):
  return common.setting(FLAGS, name, PAPER, QUICK)


def make_problem(data, num_steps, learning_rate, momentum):
  """Returns ``(meta_loss, evaluate)``: functions of {"images", "log_l2"}."""
  (x_valid, y_valid), (x_test, y_test) = data
  labels = jnp.arange(NUM_CLASSES, dtype=jnp.int32)  # image i has label i
  params0 = [{"W": jnp.zeros((SIDE * SIDE, NUM_CLASSES), jnp.float32),
              "b": jnp.zeros((NUM_CLASSES,), jnp.float32)}]

  def nll(params, x, y):
    return revhyper.models.softmax_cross_entropy(revhyper.models.mlp_apply(params, x), y)

  def train_loss(params, h, t):
    del t  # full batch: the same ten images at every step
    l2 = jnp.exp(h["log_l2"]) * sum(jnp.sum(w ** 2) for w in jax.tree.leaves(params))
    return nll(params, h["images"], labels) + l2

  def train(h):
    # Fixed Python-float alpha and gamma: the bit stack is sized from gamma itself.
    return revhyper.sgd(train_loss, params0, h, num_steps=num_steps,
                        learning_rate=learning_rate, momentum=momentum).params

  def meta_loss(h):
    params = train(h)
    aux = {"l2": jnp.exp(h["log_l2"]),
           "valid_error": revhyper.models.error_rate(revhyper.models.mlp_apply(params, x_valid), y_valid)}
    return nll(params, x_valid, y_valid), aux

  @jax.jit
  def evaluate(h):
    params = train(h)
    out = {}
    for name, x, y in (("valid", x_valid, y_valid), ("test", x_test, y_test)):
      logits = revhyper.models.mlp_apply(params, x)
      out[f"{name}_loss"] = revhyper.models.softmax_cross_entropy(logits, y)
      out[f"{name}_error"] = revhyper.models.error_rate(logits, y)
    return out

  return meta_loss, evaluate


def plot_images(images):
  """The ten learned training images, one per class (figure 9)."""
  images = np.asarray(images).reshape(NUM_CLASSES, SIDE, SIDE)
  fig, axes = plt.subplots(2, 5, figsize=(10, 4.6))
  # One symmetric grey scale for all ten: zero (the mean digit) is mid-grey.
  limit = max(np.max(np.abs(images)), 1e-6)
  for digit, ax in enumerate(axes.flat):
    im = ax.imshow(images[digit], cmap="gray", vmin=-limit, vmax=limit)
    ax.set_title(f"label {digit}", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.colorbar(im, ax=axes, shrink=0.85, label="pixel value minus the mean digit")
  fig.suptitle("Learned training set: one image per class")
  return fig


def plot_meta_curve(history, after):
  fig, ax = common.meta_learning_curve(history, [r["meta_loss"] for r in history],
                                       after["valid_loss"], "validation loss (meta-objective)")
  ax.axhline(after["test_loss"], color="C1", ls="--", lw=1, label="test loss after learning")
  ax.legend(fontsize=8)
  return fig


def main(argv):
  del argv
  start = time.time()
  settings = dict(
      meta_iterations=_setting("meta_iterations"), num_steps=FLAGS.num_steps,
      batch_size=NUM_CLASSES, layer_sizes=(SIDE * SIDE, NUM_CLASSES),
      learning_rate=FLAGS.learning_rate, momentum=FLAGS.momentum,
      meta_optimizer=f"sgd({FLAGS.meta_step})", meta_objective="validation loss",
      initial_images="zeros (the mean digit)", initial_log_l2=FLAGS.log_l2,
      seed=FLAGS.seed, quick=FLAGS.quick)
  split = common.split_sizes(FLAGS.split, FLAGS.quick, FLAGS.mnist_dir, bundled=BUNDLED_SPLIT,
                             idx=IDX_SPLIT, quick_sizes=QUICK_SPLIT)
  settings["split"] = split
  out_dir = common.prepare_out_dir(FLAGS.out_dir)
  # Centred with the validation mean: the first split.
  data, data_note = common.load_mnist_splits(FLAGS.mnist_dir, split, FLAGS.seed,
                                             ("valid", "test"))
  logging.info("%s", data_note)
  logging.info("Settings: %s", settings)

  meta_loss, evaluate = make_problem(data, FLAGS.num_steps, FLAGS.learning_rate, FLAGS.momentum)
  h0 = {"images": jnp.zeros((NUM_CLASSES, SIDE * SIDE), jnp.float32),
        "log_l2": jnp.asarray(FLAGS.log_l2, jnp.float32)}
  settings["num_hyperparameters"] = sum(x.size for x in jax.tree.leaves(h0))

  before = {k: float(v) for k, v in evaluate(h0).items()}
  logging.info("Before: %s", before)
  result = revhyper.meta.meta_optimize(
      meta_loss, h0, num_iterations=settings["meta_iterations"],
      optimizer=optax.sgd(FLAGS.meta_step), has_aux=True)
  after = {k: float(v) for k, v in evaluate(result.hparams).items()}
  logging.info("After: %s", after)
  logging.info("Validation loss (meta-objective): %.4f before, %.4f after; test %.4f -> %.4f",
               before["valid_loss"], after["valid_loss"], before["test_loss"],
               after["test_loss"])

  images = np.asarray(result.hparams["images"])
  results = dict(
      experiment="learning the training set (figure 9)", settings=settings, data=data_note,
      # meta_loss[i] is the validation loss before update i; after the last update it is
      # after["valid_loss"].
      meta_loss=[r["meta_loss"] for r in result.history], history=result.history,
      before=before, after=after,
      learned=dict(images=images, labels=list(range(NUM_CLASSES)),
                   l2_penalty=float(np.exp(result.hparams["log_l2"]))),
      wall_seconds=time.time() - start)
  common.save_results(out_dir, results)
  common.save_figure(plot_images(images), out_dir, "learned_images.png")
  common.save_figure(plot_meta_curve(result.history, after), out_dir, "meta_learning_curve.png")
  logging.info("Wrote %s (%.1f s)", out_dir, time.time() - start)


if __name__ == "__main__":
  app.run(main)
