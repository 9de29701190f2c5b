"""Where hypergradients turn chaotic: a sweep over the learning rate, figure 11.

Reproduces figure 11 of Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter
Optimization through Reversible Learning" (ICML 2015), with the settings of the authors' code
(HIPS/hypergrad, experiments/Jan_14_learning_rate_wiggliness). Nothing is learned: for each of
1000 log learning rates on a grid over [0.5, 2.5], a 784-200-50-10 tanh MLP is trained for
T = 50 steps of momentum SGD (gamma = 0.9) on the first 1000 MNIST digits, in batches of 250
taken as consecutive slices cycled in order, and we record the training loss on all 1000
digits after training and its exact hypergradient d loss / d log alpha (training run
backwards). As in that code, the inputs are raw pixel values / 255 with no mean subtraction,
and the initial weights one N(0, 1) * e^-2 draw on every parameter (biases too), the same for
every learning rate. All learning rates of a chunk run in one ``jax.vmap``.

Central finite differences of the loss over the grid are the reference. Where training is
stable the two agree; past the best learning rate the loss surface turns chaotic: finite
differences stop tracking the local slope, and hypergradients become huge and erratic. Two
landmarks are reported and drawn: the chaos onset (hypergradient and finite difference stop
agreeing: at grid point i they disagree when ``|g_i - d_i| > rel_tolerance * max(|g_i|,
|d_i|, abs_floor)``, and the onset is the smallest log alpha whose window of ``window`` grid
points has a majority disagreeing) and the first log alpha where ``|g|`` passes
``magnitude_threshold`` (1e3). Centring the inputs (``--config.centre_inputs=True``) moves the
whole picture to larger learning rates.

A diverging learning rate can leave the fixed-point range of exact training. Such runs are
flagged, not fatal: ``revhyper.Reversible(checks=False)`` lets them finish, each point's
failure flags are recorded in results.json and marked on the figure, and those points get no
finite difference and count as disagreeing.

Departures from the authors' code (also in results.json): the bundled digits' first 1000
(``config.mnist_dir``: the first 1000 of full MNIST), the initial draw from JAX's generator.

Outputs in ``--out_dir``: ``results.json`` (the shared schema: commit, JAX version, backend,
config, departures; then per-rate loss, hypergradient, finite difference, failure flags, the
onset, the magnitude landmark and the best learning rate) and ``chaos.png`` (loss against log
alpha on top, hypergradient and finite difference below, like the paper).

Run from the repository root::

  python experiments/chaos.py --out_dir results/chaos      # the paper's settings, ~30 min
  python experiments/chaos.py --config=experiments/configs/chaos.py:quick \
      --out_dir /tmp/chaos_quick                               # under 30 CPU-seconds
  python experiments/chaos.py --config.centre_inputs=True --out_dir results/chaos_centred
  python experiments/chaos.py --replot --out_dir results/chaos   # redraw chaos.png only
"""

import json
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

CONFIG = common.define_config("chaos")
common.define_out_dir("results/chaos")
flags.DEFINE_bool("replot", False, "Only redraw chaos.png from the results.json in out_dir.")

FLAGS = flags.FLAGS
# Chaotic hypergradients reach 1e40; the plot clips them at this magnitude (marked) so that
# the stable part stays readable.
PLOT_LIMIT = 1e8
DEPARTURES = (
    "The first 1000 of the 10,000 bundled MNIST digits (the paper's code: the first 1000 of the "
    "full training set).",
    "The initial weights are one draw of JAX's generator, not numpy's seed 0.",
)


def load_train(c):
  """The first ``num_train`` digits, x/255, centred only with ``centre_inputs``."""
  if c.mnist_dir:
    images, labels = revhyper.datasets.load_mnist_idx(c.mnist_dir)["train"]
    note = f"Ran on the first {c.num_train} digits of full MNIST from {c.mnist_dir}."
  else:
    images, labels = revhyper.datasets.load_mnist()
    note = (common.BUNDLED_DATA_NOTE
            + f" This sweep uses the first {c.num_train} of them, as many as the paper's.")
  x, y = images[:c.num_train], labels[:c.num_train]
  mean = revhyper.datasets.pixel_mean(x)
  if not c.centre_inputs:
    mean = np.zeros_like(mean)
  note += " Inputs: pixel / 255, " + ("centred." if c.centre_inputs else "not centred.")
  return jnp.asarray(revhyper.datasets.preprocess(x, mean)), jnp.asarray(y, jnp.int32), note


def make_sweep(x, y, c):
  """Returns ``sweep(log_rates [n]) -> (loss [n], hypergradient [n], Stats of [n] arrays)``."""
  init_key, batch_key = jax.random.split(jax.random.key(c.seed))
  params0 = revhyper.models.mlp_init(init_key, tuple(c.layer_sizes),
                                     scale=float(np.exp(c.log_init_scale)))
  num_train, batch_size = int(x.shape[0]), c.batch_size
  num_batches = -(-num_train // batch_size)
  # No checks: a diverging learning rate must not stop the sweep; its stats say it failed.
  method = revhyper.Reversible(checks=False)

  def loss(params, xs, ys):
    return revhyper.models.softmax_cross_entropy(revhyper.models.mlp_apply(params, xs), ys)

  def batch_loss(params, _, t):
    if c.batches == "consecutive":  # slice t mod (number of batches), as the paper's code
      start = (t % num_batches) * batch_size
      xs = jax.lax.dynamic_slice_in_dim(x, start, batch_size)
      ys = jax.lax.dynamic_slice_in_dim(y, start, batch_size)
      return loss(params, xs, ys)
    idx = revhyper.datasets.batch_indices(batch_key, t, num_train, batch_size)
    return loss(params, x[idx], y[idx])

  def final_loss(log_rate):
    # momentum is a Python float, so the bit stack is sized from it: no min_momentum needed.
    out = revhyper.sgd(batch_loss, params0, None, num_steps=c.num_steps,
                       learning_rate=jnp.exp(log_rate), momentum=c.momentum, method=method)
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


def plot_sweep(log_rates, values, grads, fd, failed, disagree, onset, best, exploded,
               threshold):
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6.4), sharex=True)
  ok = ~failed
  top.plot(log_rates[ok], values[ok], ".-", ms=3, lw=0.8, color="C0")
  if failed.any():
    top.plot(log_rates[failed], np.where(np.isfinite(values[failed]), values[failed],
                                         np.nanmax(values[ok]) if ok.any() else 1.0),
             "rx", ms=5, label="diverged (run failed, flagged)")
    top.legend(fontsize=8)
  top.set_yscale("log")
  top.set_ylabel("training loss after T steps")
  top.set_title("Loss and its hypergradient over learning rates")
  bottom.plot(log_rates, np.clip(fd, -PLOT_LIMIT, PLOT_LIMIT), "-", color="C1", lw=1.0,
              label="central finite difference")
  judged = np.isfinite(fd) | failed  # the ends have no finite difference: no verdict
  shown = np.clip(grads, -PLOT_LIMIT, PLOT_LIMIT)
  bottom.plot(log_rates[ok & ~judged], shown[ok & ~judged], ".", ms=4, color="0.5",
              label="hypergradient (no finite difference)")
  bottom.plot(log_rates[ok & judged & ~disagree], shown[ok & judged & ~disagree], ".", ms=4,
              color="C0", label="hypergradient (agrees)")
  bottom.plot(log_rates[ok & disagree], shown[ok & disagree], ".", ms=4, color="C3",
              label="hypergradient (disagrees)")
  clipped = ok & (np.abs(grads) > PLOT_LIMIT)
  if clipped.any():
    bottom.plot(log_rates[clipped], shown[clipped], "^", ms=4, mfc="none", color="C3",
                label=f"hypergradient beyond ±{PLOT_LIMIT:.0e} (clipped)")
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
    if exploded is not None:
      ax.axvline(exploded, color="C4", ls="-.", lw=1)
    ax.grid(alpha=0.3)
  bottom.axhline(threshold, color="C4", ls=":", lw=0.8)
  bottom.axhline(-threshold, color="C4", ls=":", lw=0.8)
  bottom.plot([], [], ":", color="0.3", label="lowest loss")
  bottom.plot([], [], "--", color="C3", label="stops agreeing with finite differences")
  bottom.plot([], [], "-.", color="C4", label=f"|hypergradient| first > {threshold:g}")
  bottom.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  return fig


def first_above(log_rates, values, threshold):
  """The smallest log rate where |values| > threshold (a non-finite value counts), or None."""
  with np.errstate(invalid="ignore"):
    above = ~np.isfinite(values) | (np.abs(values) > threshold)
  return float(log_rates[np.argmax(above)]) if above.any() else None


def replot(out_dir):
  """Redraws chaos.png from a finished sweep's results.json (its own config, not --config)."""
  with open(os.path.join(out_dir, "results.json")) as f:
    r = json.load(f)
  arrays = {k: np.asarray(r[k], dtype=float) for k in (
      "log_learning_rates", "training_loss", "hypergradient", "finite_difference")}
  common.save_figure(plot_sweep(
      arrays["log_learning_rates"], arrays["training_loss"], arrays["hypergradient"],
      arrays["finite_difference"], np.asarray(r["failed"], bool), np.asarray(r["disagree"], bool),
      r["chaos_onset_log_learning_rate"], r["best_log_learning_rate"],
      r["hypergradient_exceeds_threshold_log_learning_rate"],
      r["config"]["magnitude_threshold"]), out_dir, "chaos.png")


def main(argv):
  del argv
  start = time.time()
  c = CONFIG.value
  if FLAGS.replot:
    replot(FLAGS.out_dir)
    return
  if c.batches == "consecutive" and c.num_train % c.batch_size:
    raise app.UsageError("consecutive batches need batch_size to divide num_train")
  out_dir = common.prepare_out_dir(FLAGS.out_dir)
  x, y, data_note = load_train(c)
  logging.info("%s", data_note)
  logging.info("Config:\n%s", c)

  sweep = make_sweep(x, y, c)
  num_rates, chunk = c.num_rates, c.chunk
  log_rates = np.linspace(c.log_rate_min, c.log_rate_max, num_rates)
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
  scale = np.maximum(np.maximum(np.abs(grads), np.abs(fd)), c.abs_floor)
  with np.errstate(invalid="ignore"):
    rel = np.abs(grads - fd) / scale
  # A failed run, or one next to it (no finite difference), counts as disagreeing.
  disagree = failed | ~np.isfinite(rel) | (rel > c.rel_tolerance)
  disagree[[0, -1]] = False  # the ends have no central difference: no verdict
  onset = chaos_onset(log_rates, disagree, c.window)
  exploded = first_above(log_rates, np.where(failed, np.nan, grads), c.magnitude_threshold)
  first_failed = float(log_rates[np.argmax(failed)]) if failed.any() else None
  best = float(log_rates[np.nanargmin(np.where(failed, np.nan, values))]) if (~failed).any() \
      else None
  logging.info("Hypergradients stop agreeing with finite differences at log alpha = %s; "
               "|hypergradient| first passes %g at %s; first failed run at %s; lowest loss at "
               "%s", onset, c.magnitude_threshold, exploded, first_failed, best)
  logging.info("%d of %d runs failed (fixed-point overflow at %d)", failed.sum(), num_rates,
               overflow.sum())

  results = dict(
      data=data_note, log_learning_rates=log_rates, training_loss=values, hypergradient=grads,
      finite_difference=fd, relative_disagreement=rel, disagree=disagree,
      fixed_point_overflow=overflow, failed=failed, num_failed=int(failed.sum()),
      chaos_onset_log_learning_rate=onset,
      chaos_onset_learning_rate=None if onset is None else float(np.exp(onset)),
      hypergradient_exceeds_threshold_log_learning_rate=exploded,
      first_failed_log_learning_rate=first_failed,
      best_log_learning_rate=best, best_training_loss=None if best is None else float(
          np.nanmin(np.where(failed, np.nan, values))),
      method="Reversible(checks=False)", wall_seconds=time.time() - start)
  common.write_results(out_dir, "chaotic hypergradients (figure 11)", c, results, DEPARTURES)
  common.save_figure(plot_sweep(log_rates, values, grads, fd, failed, disagree, onset, best,
                                exploded, c.magnitude_threshold), out_dir, "chaos.png")
  logging.info("Wrote %s (%.1f s)", out_dir, time.time() - start)


if __name__ == "__main__":
  app.run(main)
