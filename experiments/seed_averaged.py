"""Hypergradients of the learning-rate and momentum schedules, averaged over random seeds.

Reproduces figure 5 of Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter
Optimization through Reversible Learning" (ICML 2015), with the settings of the authors' code
(HIPS/hypergrad, experiments/Feb_3_training_schedules/5_initial_gradient): the gradient of the
final training loss with respect to the log learning rate log alpha_t and the logit momentum
logit gamma_t of every training step t and weight type, for the tanh MLP 784-50-50-50-10
trained by T = 100 steps of momentum SGD (batch 200 drawn with replacement, alpha = e^-1,
gamma = 0.5, initial scale e^-3: the starting point of the schedule experiment), averaged over
100 seeds (each with its own initial-weight noise and minibatches). One seed's hypergradient
is noisy in t; the average is a smooth function of t. The figure shows the mean per layer with
a band of one standard error of that mean. The first ``check_seeds`` seeds are recomputed by
plain backprop (``method="unroll"``) and the largest relative difference is recorded.

Departures from the authors' code (also in results.json): 5000 of the bundled digits for
training (the paper's code: 10,000 of full MNIST; ``config.mnist_dir`` for the full data);
noise and minibatches from JAX's generator.

Outputs in ``--out_dir``: ``results.json`` (the shared schema: commit, JAX version, backend,
config, departures; then the mean and standard error per weight type, the per-seed final
losses, the check against backprop) and ``seed_averaged_hypergradients.png``.

Run from the repository root::

  python experiments/seed_averaged.py --out_dir results/seed_averaged    # ~5 min
  python experiments/seed_averaged.py --config=experiments/configs/seed_averaged.py:quick \\
      --out_dir /tmp/seed_averaged_quick                                  # under 40 CPU-seconds
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

CONFIG = common.define_config("seed_averaged")
common.define_out_dir("results/seed_averaged")

FLAGS = flags.FLAGS
DEPARTURES = (
    "5000 of the 10,000 bundled MNIST digits for training (the paper's code: 10,000 of full "
    "MNIST).",
    "Initial noise and minibatches are drawn by JAX's generator from per-seed keys.",
)
KINDS = ("log_learning_rate", "logit_momentum")


def load_train(c):
  """``num_train`` training digits, scaled to [0, 1] and centred with their mean."""
  ((x, y),), note = common.load_mnist_splits(c.mnist_dir, (c.num_train,), c.seed, ("train",))
  return x, y, note


def make_hypergradient(x_train, y_train, c, method):
  """``hypergradient(keys [n], h) -> (loss [n], d loss / d h, one [n] leaf per leaf of h)``.

  Each key seeds one training run's initial-weight noise and minibatches, so one compiled
  function serves every seed.
  """
  num_train, layer_sizes = int(x_train.shape[0]), tuple(c.layer_sizes)

  def loss(params, x, y):
    return revhyper.models.softmax_cross_entropy(revhyper.models.mlp_apply(params, x), y)

  def final_loss(h, key):
    noise_key, batch_key = jax.random.split(key)

    def batch_loss(params, _, t):
      if c.batches == "with_replacement":
        idx = jax.random.randint(jax.random.fold_in(batch_key, t), (c.batch_size,), 0,
                                 num_train)
      else:
        idx = revhyper.datasets.batch_indices(batch_key, t, num_train, c.batch_size)
      return loss(params, x_train[idx], y_train[idx])

    noise = revhyper.models.mlp_noise(noise_key, layer_sizes)
    params = revhyper.models.mlp_init_from_noise(noise, h["log_init_scale"])
    out = revhyper.sgd(batch_loss, params, None, num_steps=c.num_steps,
                       learning_rate=revhyper.hyper.learning_rate_from_log(h["log_learning_rate"]),
                       momentum=revhyper.hyper.momentum_from_logit(h["logit_momentum"]),
                       method=method)
    return loss(out.params, x_train, y_train)

  @jax.jit
  def hypergradient(keys, h):
    return jax.vmap(jax.value_and_grad(final_loss), in_axes=(None, 0))(h, keys)

  return hypergradient


def leaf_names(tree):
  return [f"{path[1].key}{path[0].idx + 1}"
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def plot_hypergradients(names, mean, sem, num_seeds):
  """2 x 2 panels (learning rate, momentum) x (weights, biases): mean over seeds per layer."""
  num_layers = len(names) // 2
  colours = plt.cm.viridis(np.linspace(0.0, 0.85, num_layers))
  fig, axes = plt.subplots(2, 2, figsize=(11, 6.4), sharex=True)
  labels = {"log_learning_rate": r"$\partial L / \partial \log \alpha_t$",
            "logit_momentum": r"$\partial L / \partial\, \mathrm{logit}\, \gamma_t$"}
  for row, kind in enumerate(KINDS):
    for col, part in enumerate(("W", "b")):
      ax = axes[row, col]
      for layer in range(num_layers):
        name = f"{part}{layer + 1}"
        m, e = np.asarray(mean[kind][name]), np.asarray(sem[kind][name])
        t = np.arange(len(m))
        ax.plot(t, m, color=colours[layer], label=f"layer {layer + 1}")
        ax.fill_between(t, m - e, m + e, color=colours[layer], alpha=0.25, lw=0)
      ax.axhline(0.0, color="0.5", lw=0.8)
      ax.grid(alpha=0.3)
      if row == 0:
        ax.set_title(f"{'Weights' if part == 'W' else 'Biases'}: mean ± s.e.m. over "
                     f"{num_seeds} seeds")
      if col == 0:
        ax.set_ylabel(labels[kind])
  for ax in axes[-1]:
    ax.set_xlabel("training step t")
  axes[0, 1].legend(fontsize=8, loc="best")
  return fig


def main(argv):
  del argv
  start = time.time()
  c = CONFIG.value
  out_dir = common.prepare_out_dir(FLAGS.out_dir)
  x_train, y_train, data_note = load_train(c)
  logging.info("%s", data_note)
  logging.info("Config:\n%s", c)

  like = revhyper.models.mlp_noise(jax.random.key(0), tuple(c.layer_sizes))
  names = leaf_names(like)
  h = {"log_learning_rate": revhyper.hyper.constant_schedule(like, c.num_steps,
                                                             c.log_learning_rate),
       "logit_momentum": revhyper.hyper.constant_schedule(
           like, c.num_steps, float(revhyper.hyper.logit(jnp.float32(c.momentum)))),
       "log_init_scale": revhyper.hyper.constant_like(like, c.log_init_scale)}
  # The momentum is traced (it is differentiated), so the bit stack is sized from a bound.
  hypergradient = make_hypergradient(
      x_train, y_train, c, revhyper.Reversible(min_momentum=c.momentum))
  keys = common.meta_training_key(c.seed)
  keys = jax.vmap(lambda i: jax.random.fold_in(keys, i))(jnp.arange(c.num_seeds))

  losses, per_seed = [], {kind: {name: [] for name in names} for kind in KINDS}
  for lo in range(0, c.num_seeds, c.chunk):
    tic = time.time()
    chunk = keys[lo:lo + c.chunk]
    value, grad = jax.device_get(hypergradient(chunk, h))
    losses.extend(np.asarray(value).tolist())
    for kind in KINDS:
      for name, g in zip(names, jax.tree_util.tree_leaves(grad[kind])):
        per_seed[kind][name].extend(np.asarray(g))
    logging.info("seeds %d/%d: %.1f s", lo + len(chunk), c.num_seeds, time.time() - tic)

  # The check: the same hypergradients by plain backprop through the stored trajectory.
  check = make_hypergradient(x_train, y_train, c, "unroll")
  _, reference = jax.device_get(check(keys[:c.check_seeds], h))
  worst = 0.0
  for kind in KINDS:
    for name, g in zip(names, jax.tree_util.tree_leaves(reference[kind])):
      ours = np.asarray(per_seed[kind][name][:c.check_seeds])
      worst = max(worst, float(np.max(np.abs(ours - g)) / max(np.max(np.abs(g)), 1e-30)))
  logging.info("Largest difference from backprop on %d seeds: %.2e of the largest entry",
               c.check_seeds, worst)

  n = c.num_seeds
  mean = {k: {name: np.mean(g, axis=0) for name, g in v.items()} for k, v in per_seed.items()}
  sem = {k: {name: (np.std(g, axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(c.num_steps))
             for name, g in v.items()} for k, v in per_seed.items()}
  results = dict(
      data=data_note, differentiated="final training loss w.r.t. log alpha_t and logit "
      "gamma_t per weight type, at the schedule experiment's starting point",
      final_training_loss=common.mean_sd(losses), mean_hypergradient=mean, standard_error=sem,
      check_against_unroll=dict(seeds=c.check_seeds, max_relative_difference=worst),
      wall_seconds=time.time() - start)
  common.write_results(out_dir, "seed-averaged hypergradients (figure 5)", c, results,
                      DEPARTURES)
  common.save_figure(plot_hypergradients(names, mean, sem, n), out_dir,
                     "seed_averaged_hypergradients.png")
  logging.info("Wrote %s (%.1f s)", out_dir, time.time() - start)


if __name__ == "__main__":
  app.run(main)
