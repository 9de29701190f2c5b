"""Learning the training set itself by hypergradient: figure 9.

Reproduces figure 9 of Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter
Optimization through Reversible Learning" (ICML 2015), with the settings of the authors' code
(HIPS/hypergrad, experiments/Jan_19_optimize_data/9_color_bar): the hyperparameters are the
training data, ten 28x28 images with labels 0-9 (one per class), and a log L2 penalty.
Logistic regression (784-10, ``revhyper.models.mlp_*`` with no hidden layer) is trained on those
ten images only; the meta-objective is its loss on real validation digits, and exact
hypergradients with respect to every pixel (from training run backwards) shape the ten images
into prototypical digits.

Settings (the authors' code):

* hyperparameters: 10 x 784 pixels in the centred input space (zero is the mean digit),
  starting at 0.01 N(0, 1), plus one log L2 penalty on the weights, starting at log 0.01;
* training loss: mean cross-entropy on the ten images + ``exp(log_l2) * sum(w**2)``; T = 20
  full-batch steps, alpha = 1, gamma = 0.9, from one fixed draw w0 = e^-4 N(0, 1);
* meta-objective: the validation loss on real digits; plain gradient descent with step 1,
  40 iterations.

Held-out evaluation: the initial and learned data each train ``config.eval_seeds`` (20) fresh
draws of w0, never used while meta-training (one ``jax.vmap``), scored on test digits never
used for meta-training: mean ± sd in results.json and the figure.

Departures from the authors' code (also in results.json): 9000 validation / 1000 test of the
bundled digits (the paper's code: 10k / 1k of full MNIST; ``config.mnist_dir``); random draws
from JAX's generator. Inputs are scaled to [0, 1] and centred with the validation mean.

Outputs in ``--out_dir``: ``results.json`` (the shared schema: commit, JAX version, backend,
config, departures; then the meta-loss history, held-out losses and errors before and after,
the learned images and penalty), ``learned_images.png`` and ``meta_learning_curve.png``.

Run from the repository root::

  python experiments/learn_data.py --out_dir results/learn_data     # ~1 min
  python experiments/learn_data.py --config=experiments/configs/learn_data.py:quick \
      --out_dir /tmp/learn_data_quick                                 # under 30 CPU-seconds
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

CONFIG = common.define_config("learn_data")
common.define_out_dir("results/learn_data")

FLAGS = flags.FLAGS
DEPARTURES = (
    "Bundled data: 9000 validation / 1000 test of the 10,000 bundled MNIST digits (the paper's "
    "code: 10k / 1k of full MNIST).",
    "Random draws (initial images, w0) come from JAX's generator, not numpy's seed 0.",
)
SIDE = 28  # MNIST images are 28x28
NUM_CLASSES = 10


def make_problem(data, c):
  """Returns ``(meta_loss, evaluate)``: functions of {"images", "log_l2"}.

  ``meta_loss`` trains from the fixed draw w0; ``evaluate(h, keys)`` (jitted, vmapped) from a
  fresh draw per key.
  """
  (x_valid, y_valid), (x_test, y_test) = data
  labels = jnp.arange(NUM_CLASSES, dtype=jnp.int32)  # image i has label i
  shapes = [{"W": (SIDE * SIDE, NUM_CLASSES), "b": (NUM_CLASSES,)}]

  def initial_params(key):
    leaves, tree = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    scale = float(np.exp(c.log_init_scale))
    return jax.tree.unflatten(tree, [scale * jax.random.normal(k, shape, jnp.float32)
                                     for k, shape in zip(jax.random.split(key, len(leaves)),
                                                         leaves)])

  def nll(params, x, y):
    return revhyper.models.softmax_cross_entropy(revhyper.models.mlp_apply(params, x), y)

  def train_loss(params, h, t):
    del t  # full batch: the same ten images at every step
    l2 = jnp.exp(h["log_l2"]) * sum(jnp.sum(w ** 2) for w in jax.tree.leaves(params))
    return nll(params, h["images"], labels) + l2

  def train(h, params0, method="reversible"):
    # Fixed Python-float alpha and gamma: the bit stack is sized from gamma itself.
    return revhyper.sgd(train_loss, params0, h, num_steps=c.num_steps,
                        learning_rate=c.learning_rate, momentum=c.momentum,
                        method=method).params

  fixed_params0 = initial_params(jax.random.fold_in(common.meta_training_key(c.seed), 0))

  def meta_loss(h):
    params = train(h, fixed_params0)
    aux = {"l2": jnp.exp(h["log_l2"]), "valid_error": revhyper.models.error_rate(
        revhyper.models.mlp_apply(params, x_valid), y_valid)}
    return nll(params, x_valid, y_valid), aux

  def evaluate_one(h, key):
    # Nothing is differentiated here: the plain float method, cheaper to compile and run.
    params = train(h, initial_params(key), "unroll")
    out = {}
    for name, x, y in (("valid", x_valid, y_valid), ("test", x_test, y_test)):
      logits = revhyper.models.mlp_apply(params, x)
      out[f"{name}_loss"] = revhyper.models.softmax_cross_entropy(logits, y)
      out[f"{name}_error"] = revhyper.models.error_rate(logits, y)
    return out

  return meta_loss, jax.jit(jax.vmap(evaluate_one, in_axes=(None, 0)))


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


def plot_meta_curve(history, held_out):
  fig, ax = common.meta_learning_curve(history, [r["meta_loss"] for r in history],
                                       held_out["after"]["valid_loss"]["mean"],
                                       "validation loss (meta-objective)")
  for x, when in ((0, "before"), (len(history), "after")):
    stats = held_out[when]["test_loss"]
    ax.errorbar([x], [stats["mean"]], yerr=[stats["sd"]], fmt="D", color="C3", capsize=4,
                mfc="none", label=(f"held-out test loss (mean ± sd, {stats['n']} seeds)"
                                   if when == "after" else None))
  ax.legend(fontsize=8)
  return fig


def main(argv):
  del argv
  start = time.time()
  c = CONFIG.value
  out_dir = common.prepare_out_dir(FLAGS.out_dir)
  # Centred with the validation mean: the first split.
  data, data_note = common.load_mnist_splits(c.mnist_dir, tuple(c.split), c.seed,
                                             ("valid", "test"))
  logging.info("%s", data_note)
  logging.info("Config:\n%s", c)

  meta_loss, evaluate = make_problem(data, c)
  image_key = jax.random.fold_in(common.meta_training_key(c.seed), 1)
  h0 = {"images": c.initial_image_scale * jax.random.normal(
            image_key, (NUM_CLASSES, SIDE * SIDE), jnp.float32),
        "log_l2": jnp.asarray(c.initial_log_l2, jnp.float32)}
  num_hyperparameters = sum(x.size for x in jax.tree.leaves(h0))
  result = revhyper.meta.meta_optimize(
      meta_loss, h0, num_iterations=c.meta_iterations, optimizer=optax.sgd(c.meta_step),
      has_aux=True)
  keys = common.held_out_keys(c.seed, c.eval_seeds)
  held_out = {"before": common.summarise_seeds(evaluate(h0, keys)),
              "after": common.summarise_seeds(evaluate(result.hparams, keys))}
  for when in ("before", "after"):
    logging.info("Held-out %s: validation loss %s, test loss %s, test error %s", when,
                 common.format_mean_sd(held_out[when]["valid_loss"]),
                 common.format_mean_sd(held_out[when]["test_loss"]),
                 common.format_mean_sd(held_out[when]["test_error"], 100, 2, "%"))

  images = np.asarray(result.hparams["images"])
  results = dict(
      data=data_note, num_hyperparameters=num_hyperparameters,
      # meta_loss[i]: the validation loss before update i (the meta-training draw w0).
      meta_loss=[r["meta_loss"] for r in result.history], history=result.history,
      held_out=held_out,
      learned=dict(images=images, labels=list(range(NUM_CLASSES)),
                   l2_penalty=float(np.exp(result.hparams["log_l2"]))),
      wall_seconds=time.time() - start)
  common.write_results(out_dir, "learning the training set (figure 9)", c, results, DEPARTURES)
  common.save_figure(plot_images(images), out_dir, "learned_images.png")
  common.save_figure(plot_meta_curve(result.history, held_out), out_dir,
                     "meta_learning_curve.png")
  logging.info("Wrote %s (%.1f s)", out_dir, time.time() - start)


if __name__ == "__main__":
  app.run(main)
