"""Where hypergradients turn chaotic: a sweep over the learning rate, figure 11.

Reproduces figure 11 of Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter
Optimization through Reversible Learning" (ICML 2015). Nothing is learned: for each of N log
learning rates on a grid over [0.5, 2.5], a 784-200-50-10 tanh MLP is trained for T = 50 steps
of momentum SGD (batch 250, gamma = 0.9) on 1000 MNIST digits, and we record the training loss
after training and its exact hypergradient d loss / d log alpha (training run backwards). All
learning rates of a chunk run in one ``jax.vmap``. Central finite differences of the loss over
the grid are the reference: where training is stable the two agree; above the best learning
rate the loss surface turns chaotic, finite differences stop tracking the local slope, and
hypergradients become huge and erratic.

Settings (the paper's, DESIGN.md section 4): 784-200-50-10, 1000 digits, batch 250, T = 50,
gamma = 0.9, initial weights N(0, e^-3) (the paper's MNIST initial scale), the same initial
weights and minibatch order for every learning rate. The paper sweeps 1000 learning rates;
the default here is 200 (``--num_rates``) so that the sweep takes minutes on 2 CPU cores.

A diverging learning rate can leave the fixed-point range of exact training. Such runs are
not errors here: ``revhyper.Reversible(checks=False)`` lets them finish, and each point's
``stats.failed`` and ``stats.fixed_point_overflow`` are recorded in the JSON and marked in the
figure; those points get no finite difference and count as disagreeing.

Chaos criterion: at grid point i, the hypergradient g_i and the central difference d_i
disagree when ``|g_i - d_i| > 0.5 * max(|g_i|, |d_i|, floor)`` (``--rel_tolerance``,
``--abs_floor``: the floor keeps points where both are near zero from counting). The chaos
onset is the smallest log learning rate at which more than half of a sliding window of
``--window`` grid points disagree.

Data: the first 1000 digits of the bundled MNIST subset (``--mnist_dir``: of the full MNIST
training set), scaled to [0, 1] and centred.

Outputs in ``--out_dir``: ``results.json`` (settings, data, per-rate loss, hypergradient,
finite difference, failure flags, the onset and the best learning rate) and ``chaos.png``
(loss vs log alpha on top, hypergradient and finite difference below, like the paper).

Run from the repository root::

  python experiments/chaos.py --out_dir results/chaos          # 200 rates, paper settings
  python experiments/chaos.py --num_rates 1000 --out_dir results/chaos_1000   # the paper's
  python experiments/chaos.py --quick --out_dir results/chaos_quick
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

# Flags left at None take the paper's value (200 rates, not 1000: see the docstring), or the
# --quick value with --quick.
flags.DEFINE_string("out_dir", "results/chaos", "Folder for results and figures.")
flags.DEFINE_bool("quick", False, "A small run that finishes in under a minute on 2 CPU cores.")
flags.DEFINE_integer("num_rates", None, "Grid points in log alpha (paper 1000; default 200, "
                     "quick 24).")
flags.DEFINE_float("log_rate_min", 0.5, "Smallest log learning rate (paper 0.5).")
flags.DEFINE_float("log_rate_max", 2.5, "Largest log learning rate (paper 2.5).")
flags.DEFINE_integer("num_steps", None, "Training steps T (paper 50, quick 20).")
flags.DEFINE_integer("batch_size", None, "Minibatch size (paper 250, quick 50).")
flags.DEFINE_integer("num_train", None, "Training digits (paper 1000, quick 200).")
flags.DEFINE_list("layer_sizes", None, "MLP widths (paper 784,200,50,10, quick 784,50,10).")
flags.DEFINE_float("momentum", 0.9, "Training momentum gamma (paper 0.9).")
flags.DEFINE_float("log_init_scale", -3.0, "Log standard deviation of the initial weights.")
flags.DEFINE_integer("chunk", None, "Learning rates per vmapped call (default 25, quick 24): "
                     "bounds memory and gives progress lines.")
flags.DEFINE_float("rel_tolerance", 0.5, "Relative disagreement that counts as disagreeing.")
flags.DEFINE_float("abs_floor", 1e-4,
                   "Floor of the denominator of the relative disagreement.")
flags.DEFINE_integer("window", None, "Sliding window of the chaos criterion, in grid points "
                     "(default 9, quick 3).")
flags.DEFINE_integer("seed", 0, "Seed of the initial weights, minibatch order and data.")
flags.DEFINE_string("mnist_dir", None,
                    "Folder with the four MNIST IDX files; default: the bundled 10,000 digits.")

FLAGS = flags.FLAGS

PAPER = dict(num_rates=200, num_steps=50, batch_size=250, num_train=1000,
             layer_sizes=(784, 200, 50, 10), chunk=25, window=9)
QUICK = dict(num_rates=24, num_steps=20, batch_size=50, num_train=200,
             layer_sizes=(784, 50, 10), chunk=24, window=3)


def _setting(name):
  return common.setting(FLAGS, name, PAPER, QUICK)


def load_train(mnist_dir, num_train, seed):
  if mnist_dir:
    images, labels = revhyper.datasets.load_mnist_idx(mnist_dir)["train"]
    note = f"Ran on {num_train} digits of full MNIST from {mnist_dir}."
  else:
    images, labels = revhyper.datasets.load_mnist()
    note = (common.BUNDLED_DATA_NOTE
            + f" This sweep uses {num_train} of them, as many as the paper's.")
  (x, y), = revhyper.datasets.split_data(images, labels, (num_train,), seed=seed)
  x = revhyper.datasets.preprocess(x, revhyper.datasets.pixel_mean(x))
  return jnp.asarray(x), jnp.asarray(y, jnp.int32), note


def make_sweep(x, y, layer_sizes, num_steps, batch_size, momentum, log_init_scale, seed):
  """Returns ``sweep(log_rates [n]) -> (loss [n], hypergradient [n], Stats of [n] arrays)``."""
  init_key, batch_key = jax.random.split(jax.random.key(seed))
  params0 = revhyper.models.mlp_init(init_key, layer_sizes, scale=float(np.exp(log_init_scale)))
  num_train = int(x.shape[0])
  # No checks: a diverging learning rate must not stop the sweep; its stats say it failed.
  method = revhyper.Reversible(checks=False)

  def loss(params, xs, ys):
    return revhyper.models.softmax_cross_entropy(revhyper.models.mlp_apply(params, xs), ys)

  def batch_loss(params, _, t):
    idx = revhyper.datasets.batch_indices(batch_key, t, num_train, batch_size)
    return loss(params, x[idx], y[idx])

  def final_loss(log_rate):
    # momentum is a Python float, so the bit stack is sized from it: no min_momentum needed.
    out = revhyper.sgd(batch_loss, params0, None, num_steps=num_steps,
                       learning_rate=jnp.exp(log_rate), momentum=momentum, method=method)
    return loss(out.params, x, y), out.stats

  value_and_grad = jax.value_and_grad(final_loss, has_aux=True)

  @jax.jit
  def sweep(log_rates):
    (values, stats), grads = jax.vmap(value_and_grad)(log_rates)
    return values, grads, stats

  return sweep


def central_differences(log_rates, values, bad):
  """(L[i+1] - L[i-1]) / (a[i+1] - a[i-1]) at interior points; NaN at the ends or near bad."""
  fd = np.full_like(values, np.nan)
  fd[1:-1] = (values[2:] - values[:-2]) / (log_rates[2:] - log_rates[:-2])
  near_bad = bad.copy()
  near_bad[1:] |= bad[:-1]
  near_bad[:-1] |= bad[1:]
  fd[near_bad] = np.nan
  return fd


def chaos_onset(log_rates, disagree, window):
  """The smallest log rate whose window of ``window`` points has a majority disagreeing."""
  valid = np.arange(1, len(log_rates) - 1)  # the ends have no central difference
  flags_inner = disagree[valid]
  for start in range(0, len(valid) - window + 1):
    if flags_inner[start:start + window].sum() * 2 > window:
      return float(log_rates[valid[start]])
  return None


def plot_sweep(log_rates, values, grads, fd, failed, disagree, onset, best):
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6.4), sharex=True)
  ok = ~failed
  top.plot(log_rates[ok], values[ok], ".-", ms=3, lw=0.8, color="C0")
  if failed.any():
    top.plot(log_rates[failed], np.where(np.isfinite(values[failed]), values[failed],
                                         np.nanmax(values[ok]) if ok.any() else 1.0),
             "rx", ms=5, label="fixed-point overflow (run failed)")
    top.legend(fontsize=8)
  top.set_yscale("log")
  top.set_ylabel("training loss after T steps")
  top.set_title("Loss and its hypergradient over learning rates")
  bottom.plot(log_rates, fd, "-", color="C1", lw=1.0, label="central finite difference")
  judged = np.isfinite(fd) | failed  # the ends have no finite difference: no verdict
  bottom.plot(log_rates[ok & ~judged], grads[ok & ~judged], ".", ms=4, color="0.5",
              label="hypergradient (no finite difference)")
  bottom.plot(log_rates[ok & judged & ~disagree], grads[ok & judged & ~disagree], ".", ms=4,
              color="C0", label="hypergradient (agrees)")
  bottom.plot(log_rates[ok & disagree], grads[ok & disagree], ".", ms=4, color="C3",
              label="hypergradient (disagrees)")
  # Chaotic hypergradients span orders of magnitude; symlog keeps the stable part readable.
  finite = np.abs(grads[ok & np.isfinite(grads)])
  small = max(float(np.percentile(finite, 25)) if finite.size else 1e-3, 1e-6)
  # A power of ten, so that the ticks at +-linthresh do not crowd the one at zero.
  bottom.set_yscale("symlog", linthresh=10.0 ** np.floor(np.log10(small)))
  bottom.set_ylabel("d loss / d log alpha")
  bottom.set_xlabel("log learning rate, log alpha")
  for ax in (top, bottom):
    if best is not None:
      ax.axvline(best, color="0.3", ls=":", lw=1)
    if onset is not None:
      ax.axvline(onset, color="C3", ls="--", lw=1)
    ax.grid(alpha=0.3)
  bottom.plot([], [], ":", color="0.3", label="lowest loss")
  bottom.plot([], [], "--", color="C3", label="chaos onset")
  bottom.legend(fontsize=8, loc="best")
  return fig


def main(argv):
  del argv
  start = time.time()
  num_rates, chunk, window = _setting("num_rates"), _setting("chunk"), _setting("window")
  settings = dict(
      num_rates=num_rates, log_rate_range=(FLAGS.log_rate_min, FLAGS.log_rate_max),
      num_steps=_setting("num_steps"), batch_size=_setting("batch_size"),
      num_train=_setting("num_train"), layer_sizes=_setting("layer_sizes"),
      momentum=FLAGS.momentum, log_init_scale=FLAGS.log_init_scale, chunk=chunk,
      method="Reversible(checks=False)", rel_tolerance=FLAGS.rel_tolerance,
      abs_floor=FLAGS.abs_floor, window=window, seed=FLAGS.seed, quick=FLAGS.quick,
      chaos_criterion=(
          "g (hypergradient) and d (central difference) disagree when |g - d| > "
          "rel_tolerance * max(|g|, |d|, abs_floor), or the run failed; onset: the smallest "
          "log alpha whose window of `window` grid points has a majority disagreeing"))
  out_dir = common.prepare_out_dir(FLAGS.out_dir)
  x, y, data_note = load_train(FLAGS.mnist_dir, settings["num_train"], FLAGS.seed)
  logging.info("%s", data_note)
  logging.info("Settings: %s", settings)

  sweep = make_sweep(x, y, settings["layer_sizes"], settings["num_steps"],
                     settings["batch_size"], FLAGS.momentum, FLAGS.log_init_scale, FLAGS.seed)
  log_rates = np.linspace(FLAGS.log_rate_min, FLAGS.log_rate_max, num_rates)
  values, grads, overflow, failed = [], [], [], []
  for lo in range(0, num_rates, chunk):
    tic = time.time()
    part = log_rates[lo:lo + chunk]
    # Pad the last chunk to the same size, so the sweep compiles once.
    padded = np.pad(part, (0, chunk - len(part)), mode="edge").astype(np.float32)
    v, g, stats = jax.device_get(sweep(jnp.asarray(padded)))
    n = len(part)
    values.append(v[:n])
    grads.append(g[:n])
    overflow.append(np.asarray(stats.fixed_point_overflow)[:n])
    failed.append(np.asarray(stats.failed | stats.non_finite)[:n])
    done = lo + n
    left = (time.time() - start) / done * (num_rates - done)
    logging.info("learning rates %d/%d (log alpha up to %.3f): %.1f s for this chunk, about "
                 "%.0f s left", done, num_rates, part[-1], time.time() - tic, left)
  values, grads = np.concatenate(values).astype(np.float64), np.concatenate(grads)
  overflow, failed = np.concatenate(overflow), np.concatenate(failed)
  failed |= ~np.isfinite(values) | ~np.isfinite(grads)

  fd = central_differences(log_rates, values, failed)
  scale = np.maximum(np.maximum(np.abs(grads), np.abs(fd)), FLAGS.abs_floor)
  with np.errstate(invalid="ignore"):
    rel = np.abs(grads - fd) / scale
  # A failed run, or one next to it (no finite difference), counts as disagreeing.
  disagree = failed | ~np.isfinite(rel) | (rel > FLAGS.rel_tolerance)
  disagree[[0, -1]] = False  # the ends have no central difference: no verdict
  onset = chaos_onset(log_rates, disagree, window)
  best = float(log_rates[np.nanargmin(np.where(failed, np.nan, values))]) if (~failed).any() \
      else None
  if onset is None:
    logging.info("Hypergradients agree with finite differences over the whole sweep.")
  else:
    logging.info("Hypergradients stop agreeing with finite differences above log alpha = %.3f "
                 "(alpha = %.3g); the lowest loss is at log alpha = %s", onset, np.exp(onset),
                 best)
  logging.info("%d of %d runs failed (fixed-point overflow at %d)", failed.sum(), num_rates,
               overflow.sum())

  results = dict(
      experiment="chaotic hypergradients (figure 11)", settings=settings, data=data_note,
      log_learning_rates=log_rates, training_loss=values, hypergradient=grads,
      finite_difference=fd, relative_disagreement=rel, disagree=disagree,
      fixed_point_overflow=overflow, failed=failed, num_failed=int(failed.sum()),
      chaos_onset_log_learning_rate=onset,
      chaos_onset_learning_rate=None if onset is None else float(np.exp(onset)),
      best_log_learning_rate=best,
      wall_seconds=time.time() - start)
  common.save_results(out_dir, results)
  common.save_figure(plot_sweep(log_rates, values, grads, fd, failed, disagree, onset, best),
                     out_dir, "chaos.png")
  logging.info("Wrote %s (%.1f s)", out_dir, time.time() - start)


if __name__ == "__main__":
  app.run(main)
