"""Learned learning-rate, momentum and initialisation schedules of a tanh MLP on MNIST.

Reproduces figures 2-7 of Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter
Optimization through Reversible Learning" (ICML 2015): a 784-50-50-50-10 tanh network is
trained by T = 100 steps of momentum SGD (batch 200), and meta-optimisation learns, with
exact hypergradients from training run backwards,

* a learning-rate schedule per weight type and step: log alpha, [T] for each of the 8 leaves
  (W and b of 4 layers), starting at alpha = e^-1;
* a momentum schedule laid out the same way: logit gamma, starting at gamma = 0.5;
* one initialisation scale per weight type: log scale, starting at e^-3;

1608 hyperparameters in all. The meta-objective is the final training loss (the paper's), and
the meta-optimiser Adam with step 0.04 for 50 meta-iterations. Validation loss and test error
are reported before and after. The paper's findings: the top layer's learning rate grows first,
then the lower layers'; all schedules decay towards the end of training; the learned scale of
the first layer's weights lands near 1/sqrt(784) ~ 0.036.

Data: the 10,000 bundled MNIST digits by default, split 5000 train / 2500 valid / 2500 test;
with ``--mnist_dir`` the full IDX files and the paper's 10k / 10k / 10k. Inputs are scaled to
[0, 1] and centred with the training mean.

Outputs in ``--out_dir``: ``results.json`` (settings, which data, meta-loss history, learned
schedules and scales per layer, losses and errors before and after, wall time), the figures
``learning_rates.png``, ``momenta.png``, ``meta_learning_curve.png`` and ``init_scales.png``,
and ``checkpoints/`` for ``--resume``.

Run from the repository root::

  python experiments/schedules.py --out_dir results/schedules          # paper settings
  python experiments/schedules.py --quick --out_dir results/schedules_quick   # < 1 minute
  python experiments/schedules.py --out_dir results/schedules --resume  # continue a run
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
flags.DEFINE_string("out_dir", "results/schedules", "Folder for results, figures, checkpoints.")
flags.DEFINE_bool("quick", False, "A small run that finishes in under a minute on 2 CPU cores.")
flags.DEFINE_integer("meta_iterations", None, "Meta-iterations (paper 50, quick 10).")
flags.DEFINE_integer("num_steps", None, "Training steps T (paper 100, quick 20).")
flags.DEFINE_integer("batch_size", None, "Minibatch size (paper 200, quick 100).")
flags.DEFINE_list("layer_sizes", None, "MLP widths (paper 784,50,50,50,10, quick 784,50,50,10).")
flags.DEFINE_list("split", None,
                  "train,valid,test sizes (bundled data 5000,2500,2500; --mnist_dir "
                  "10000,10000,10000; quick 1000,500,500).")
flags.DEFINE_integer("seed", 0,
                     "Seed of the data split, the initial-weight noise and the minibatch order.")
flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in out_dir/checkpoints.")
flags.DEFINE_enum("method", "reversible", ["reversible", "unroll", "checkpoint"],
                  "How the hypergradient is computed (all give the same gradients).")
flags.DEFINE_float("min_momentum", 0.01,
                   "Lower bound on every momentum: sizes the reversible method's bit stack; "
                   "learned momenta are clipped to it.")
flags.DEFINE_float("meta_step", 0.04, "Adam step size of the meta-optimiser (paper 0.04).")
flags.DEFINE_float("log_learning_rate", -1.0, "Initial log learning rate (paper -1).")
flags.DEFINE_float("momentum", 0.5, "Initial momentum (paper 0.5).")
flags.DEFINE_float("log_init_scale", -3.0, "Initial log initialisation scale (paper -3).")
flags.DEFINE_integer("checkpoint_every", 5, "Write a checkpoint every this many meta-iterations.")
flags.DEFINE_string("mnist_dir", None,
                    "Folder with the four MNIST IDX files; default: the bundled 10,000 digits.")

FLAGS = flags.FLAGS

# The paper's settings (section 3.1) and the --quick ones.
PAPER = dict(meta_iterations=50, num_steps=100, batch_size=200, layer_sizes=(784, 50, 50, 50, 10))
QUICK = dict(meta_iterations=10, num_steps=20, batch_size=100, layer_sizes=(784, 50, 50, 10))
BUNDLED_SPLIT = (5000, 2500, 2500)  # 10,000 bundled digits
IDX_SPLIT = (10000, 10000, 10000)  # the paper's split of full MNIST
QUICK_SPLIT = (1000, 500, 500)


def _setting(name):
  return common.setting(FLAGS, name, PAPER, QUICK)


def leaf_names(params):
  """'W1', 'b1', 'W2', ... in the order of the parameters' leaves (layers counted from 1)."""
  names = []
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    layer, kind = path[0].idx, path[1].key
    names.append(f"{kind}{layer + 1}")
  return names


def by_name(names, tree):
  return dict(zip(names, (np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(tree))))


def momentum_schedule(logit_momentum, min_momentum):
  """sigmoid(logit gamma), clipped below at ``min_momentum``.

  The reversible method sizes its bit stack for momenta of at least ``min_momentum`` (about
  log2(1 / min_momentum) bits per weight and step); a smaller one would overflow it. The clip
  holds a learned momentum at the bound instead (its gradient is zero below it).
  """
  return jax.tree.map(lambda g: jnp.clip(g, min_momentum, 1.0),
                      revhyper.hyper.momentum_from_logit(logit_momentum))


def make_problem(data, layer_sizes, num_steps, batch_size, seed, method, min_momentum):
  """The meta-loss and an evaluation function of the hyperparameters.

  Returns ``(meta_loss, evaluate, noise)``: ``meta_loss(h) -> (final training loss, aux)`` for
  ``revhyper.meta.meta_optimize``, whose aux (validation loss and error, initial scales) lands in
  the history; ``evaluate(h) -> dict`` of losses and errors after training; the fixed noise
  of the initial weights.
  """
  (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = data
  noise_key, batch_key = jax.random.split(jax.random.key(seed))
  # Fixed noise makes the initial weights exp(log scale) * noise a differentiable function
  # of the scales (the paper's parameterisation).
  noise = revhyper.models.mlp_noise(noise_key, layer_sizes)
  num_train = int(x_train.shape[0])

  def loss(params, x, y):
    return revhyper.models.softmax_cross_entropy(revhyper.models.mlp_apply(params, x), y)

  def batch_loss(params, _, t):
    idx = revhyper.datasets.batch_indices(batch_key, t, num_train, batch_size)
    return loss(params, x_train[idx], y_train[idx])

  def train(h):
    gamma = momentum_schedule(h["logit_momentum"], min_momentum)
    out = revhyper.sgd(batch_loss, revhyper.models.mlp_init_from_noise(noise, h["log_init_scale"]),
                       None, num_steps=num_steps,
                       learning_rate=revhyper.hyper.learning_rate_from_log(h["log_learning_rate"]),
                       momentum=gamma, method=method)
    return out.params

  names = leaf_names(noise)

  def meta_loss(h):
    params = train(h)
    logits = revhyper.models.mlp_apply(params, x_valid)
    # Scalars in aux are recorded per iteration in the history, which survives --resume.
    scales = jax.tree_util.tree_leaves(revhyper.hyper.init_scale_from_log(h["log_init_scale"]))
    aux = {"valid_loss": revhyper.models.softmax_cross_entropy(logits, y_valid),
           "valid_error": revhyper.models.error_rate(logits, y_valid),
           "init_scale": dict(zip(names, scales))}
    return loss(params, x_train, y_train), aux

  @jax.jit
  def evaluate(h):
    params = train(h)
    out = {}
    for name, x, y in (("train", x_train, y_train), ("valid", x_valid, y_valid),
                       ("test", x_test, y_test)):
      logits = revhyper.models.mlp_apply(params, x)
      out[f"{name}_loss"] = revhyper.models.softmax_cross_entropy(logits, y)
      out[f"{name}_error"] = revhyper.models.error_rate(logits, y)
    return out

  return meta_loss, evaluate, noise


def initial_hparams(noise, num_steps, log_learning_rate, momentum, log_init_scale):
  """The 2 x 8 schedules of [num_steps] and the 8 scales, all constant (the paper's start)."""
  return {
      "log_learning_rate": revhyper.hyper.constant_schedule(noise, num_steps, log_learning_rate),
      "logit_momentum": revhyper.hyper.constant_schedule(
          noise, num_steps, float(revhyper.hyper.logit(jnp.float32(momentum)))),
      "log_init_scale": revhyper.hyper.constant_like(noise, log_init_scale),
  }


def _layer_colours(num_layers):
  return plt.cm.viridis(np.linspace(0.0, 0.85, num_layers))


def plot_schedules(names, schedules, initial, ylabel, title):
  """Two panels (weights, biases), one curve per layer over training steps t (figures 2-3)."""
  num_layers = len(names) // 2
  colours = _layer_colours(num_layers)
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
  for ax, kind in zip(axes, ("W", "b")):
    for layer in range(num_layers):
      name = f"{kind}{layer + 1}"
      ax.plot(np.arange(len(schedules[name])), schedules[name], color=colours[layer], lw=1.3,
              label=f"layer {layer + 1}")
    ax.axhline(initial, color="0.5", ls="--", lw=1, label="initial")
    ax.set_title("weights" if kind == "W" else "biases")
    ax.set_xlabel("training step t")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(ylabel)
  axes[0].legend(fontsize=8, loc="best")
  fig.suptitle(title, y=1.02)
  return fig


def plot_schedule_grid(names, schedules, initial, ylabel, title):
  """One small panel per weight type (rows: weights, biases; columns: layers)."""
  num_layers = len(names) // 2
  colours = _layer_colours(num_layers)
  fig, axes = plt.subplots(2, num_layers, figsize=(2.6 * num_layers, 4.6), sharex=True,
                           sharey=True, squeeze=False)
  for row, kind in enumerate(("W", "b")):
    for layer in range(num_layers):
      ax = axes[row, layer]
      ax.plot(schedules[f"{kind}{layer + 1}"], color=colours[layer], lw=1.1)
      ax.axhline(initial, color="0.5", ls="--", lw=1)
      ax.set_title(f"layer {layer + 1} {'weights' if kind == 'W' else 'biases'}", fontsize=9)
      ax.grid(alpha=0.3)
    axes[row, 0].set_ylabel(ylabel)
  for ax in axes[-1]:
    ax.set_xlabel("training step t")
  fig.suptitle(f"{title}; dashed: initial")
  return fig


def plot_meta_curve(history, final_train_loss):
  """Losses after training against meta-iterations (figure 4)."""
  fig, ax = common.meta_learning_curve(history, [r["meta_loss"] for r in history],
                                       final_train_loss, "final training loss (meta-objective)")
  ax.plot([r["iteration"] for r in history], [r["aux"]["valid_loss"] for r in history], "s-",
          ms=3, label="validation loss")
  ax.legend(fontsize=8)
  return fig


def plot_init_scales(scales, history, layer_sizes, initial):
  """Learned initial scales per layer against 1/sqrt(fan-in), and their path (figures 6-7)."""
  num_layers = len(layer_sizes) - 1
  layers = np.arange(1, num_layers + 1)
  inv_sqrt_fan_in = 1.0 / np.sqrt(layer_sizes[:-1])
  colours = _layer_colours(num_layers)
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
  left.plot(layers, [scales[f"W{i}"] for i in layers], "o-", label="learned, weights")
  left.plot(layers, [scales[f"b{i}"] for i in layers], "s-", label="learned, biases")
  left.plot(layers, inv_sqrt_fan_in, "k^--", label="1/sqrt(fan-in)")
  left.axhline(initial, color="0.5", ls=":", label="initial")
  left.set_xticks(layers)
  left.set_xticklabels([f"{i}\n({a}->{b})" for i, a, b in
                        zip(layers, layer_sizes[:-1], layer_sizes[1:])])
  left.set_xlabel("layer")
  left.set_ylabel("initial scale")
  left.set_title("Learned initial scales")
  it = [r["iteration"] for r in history]
  for i in layers:
    c = colours[i - 1]
    right.plot(it, [r["aux"][f"init_scale/W{i}"] for r in history], "-", color=c,
               label=f"layer {i} weights")
    right.plot(it, [r["aux"][f"init_scale/b{i}"] for r in history], "--", color=c,
               label=f"layer {i} biases")
    right.axhline(inv_sqrt_fan_in[i - 1], color=c, ls=":", lw=1)
  right.set_xlabel("meta-iteration")
  right.set_title("During meta-learning (dotted: 1/sqrt(fan-in))")
  right.legend(fontsize=7, ncol=2, loc="best")
  for ax in (left, right):
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
  left.legend(fontsize=8)
  return fig


def main(argv):
  del argv
  start = time.time()
  settings = dict(
      meta_iterations=_setting("meta_iterations"), num_steps=_setting("num_steps"),
      batch_size=_setting("batch_size"), layer_sizes=_setting("layer_sizes"),
      seed=FLAGS.seed, method=FLAGS.method, min_momentum=FLAGS.min_momentum,
      meta_optimizer=f"adam({FLAGS.meta_step})", meta_objective="final training loss",
      initial_learning_rate=float(np.exp(FLAGS.log_learning_rate)),
      initial_momentum=FLAGS.momentum, initial_init_scale=float(np.exp(FLAGS.log_init_scale)),
      quick=FLAGS.quick)
  split = common.split_sizes(FLAGS.split, FLAGS.quick, FLAGS.mnist_dir, bundled=BUNDLED_SPLIT,
                             idx=IDX_SPLIT, quick_sizes=QUICK_SPLIT)
  settings["split"] = split
  out_dir = common.prepare_out_dir(FLAGS.out_dir)
  data, data_note = common.load_mnist_splits(FLAGS.mnist_dir, split, FLAGS.seed,
                                             ("train", "valid", "test"))
  logging.info("%s", data_note)
  logging.info("Settings: %s", settings)

  if FLAGS.method == "reversible":
    method = revhyper.Reversible(min_momentum=FLAGS.min_momentum)
  else:
    method = FLAGS.method
  num_steps = settings["num_steps"]
  meta_loss, evaluate, noise = make_problem(
      data, settings["layer_sizes"], num_steps, settings["batch_size"], FLAGS.seed, method,
      FLAGS.min_momentum)
  names = leaf_names(noise)
  h0 = initial_hparams(noise, num_steps, FLAGS.log_learning_rate, FLAGS.momentum,
                       FLAGS.log_init_scale)
  settings["num_hyperparameters"] = sum(x.size for x in jax.tree_util.tree_leaves(h0))

  before = {k: float(v) for k, v in evaluate(h0).items()}
  logging.info("Before: %s", before)
  checkpoint_dir = os.path.join(out_dir, "checkpoints")
  latest = revhyper.meta.latest_checkpoint(checkpoint_dir) if FLAGS.resume else None
  resumed_from = int(os.path.basename(latest)[len("ckpt_"):-len(".npz")]) if latest else 0
  if latest:
    logging.info("Resuming from %s", latest)
  result = revhyper.meta.meta_optimize(
      meta_loss, h0, num_iterations=settings["meta_iterations"],
      optimizer=optax.adam(FLAGS.meta_step), checkpoint_dir=checkpoint_dir,
      checkpoint_every=FLAGS.checkpoint_every, resume=FLAGS.resume, has_aux=True)
  after = {k: float(v) for k, v in evaluate(result.hparams).items()}
  logging.info("After: %s", after)

  h = result.hparams
  gamma = momentum_schedule(h["logit_momentum"], FLAGS.min_momentum)
  learned = {
      "learning_rate": by_name(names, revhyper.hyper.learning_rate_from_log(h["log_learning_rate"])),
      "momentum": by_name(names, gamma),
      "init_scale": by_name(names, revhyper.hyper.init_scale_from_log(h["log_init_scale"])),
  }
  fan_in = {f"W{i + 1}": 1.0 / np.sqrt(n) for i, n in enumerate(settings["layer_sizes"][:-1])}
  meta_loss_history = [r["meta_loss"] for r in result.history]
  results = dict(
      experiment="schedules (figures 2-7)", settings=settings, data=data_note,
      resumed_from_iteration=resumed_from,
      # meta_loss[i] is the meta-objective before update i; after the last update it is
      # after["train_loss"].
      meta_loss=meta_loss_history, history=result.history, before=before, after=after,
      learned=learned, inverse_sqrt_fan_in=fan_in, wall_seconds=time.time() - start)
  common.save_results(out_dir, results)

  iterations = len(result.history)
  common.save_figure(
      plot_schedules(names, learned["learning_rate"], settings["initial_learning_rate"],
                     "learning rate", f"Learned learning rate ({iterations} meta-iterations)"),
      out_dir, "learning_rates.png")
  common.save_figure(
      plot_schedule_grid(names, learned["momentum"], settings["initial_momentum"], "momentum",
                         f"Learned momentum schedules ({iterations} meta-iterations)"),
      out_dir, "momenta.png")
  common.save_figure(plot_meta_curve(result.history, after["train_loss"]), out_dir,
                     "meta_learning_curve.png")
  common.save_figure(plot_init_scales(learned["init_scale"], result.history,
                                      settings["layer_sizes"], settings["initial_init_scale"]),
                     out_dir, "init_scales.png")
  logging.info("Wrote %s (%.1f s)", out_dir, time.time() - start)


if __name__ == "__main__":
  app.run(main)
