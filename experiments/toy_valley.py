"""Meta-learning a learning-rate and momentum schedule on a 2-D valley: the paper's figure 1.

Reproduces the illustration of Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter
Optimization through Reversible Learning" (ICML 2015), figure 1: each meta-iteration runs a
whole training run of momentum SGD on two weights (x, y), takes the exact hypergradient of the
final loss by running training backwards, and steps the hyperparameters, so that the next
training run gets further along the valley.

Settings (the paper's, DESIGN.md section 4):

* loss: a scaled Rosenbrock-like valley ``L(x, y) = s * ((1 - x)**2 + b * (y - x**2)**2)``
  with ``s = 5``, ``b = 10`` (a curved valley along ``y = x**2``, minimum at (1, 1)); training
  starts at (-1.5, 2.5), just off the valley floor, with zero velocity;
* T = 50 steps; hyperparameters: one log learning rate and one logit momentum per step
  (50 + 50), starting at alpha = e^-4.5 and gamma = 0.99;
* meta-objective: the loss after training; meta-optimiser: plain gradient descent
  (``optax.sgd``, step 0.5, our choice: the paper gives none), 3 meta-iterations.

Outputs in ``--out_dir``: ``results.json`` (settings, the hyperparameters, trajectory and
final loss of every meta-iteration, meta-loss history), ``trajectories.png`` (the training
runs in the (x, y) plane over the loss contours, one per meta-iteration, like the paper's
figure) and ``schedules.png`` (learning rate and momentum per step, per meta-iteration).

Run from the repository root::

  python experiments/toy_valley.py --out_dir results/toy_valley          # paper settings
  python experiments/toy_valley.py --quick --out_dir results/toy_valley_quick
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

flags.DEFINE_string("out_dir", "results/toy_valley", "Folder for results and figures.")
flags.DEFINE_bool("quick", False, "Same run (it already takes seconds); kept for a uniform CLI.")
flags.DEFINE_integer("meta_iterations", 3, "Meta-iterations (paper 3).")
flags.DEFINE_integer("num_steps", 50, "Training steps T (paper 50).")
flags.DEFINE_float("log_learning_rate", -4.5, "Initial log learning rate (paper -4.5).")
flags.DEFINE_float("momentum", 0.99, "Initial momentum (paper 0.99).")
flags.DEFINE_float("meta_step", 0.5, "Step of the meta-level gradient descent.")
flags.DEFINE_float("valley_scale", 5.0, "s in L = s((1-x)^2 + b(y-x^2)^2).")
flags.DEFINE_float("valley_steepness", 10.0, "b in L = s((1-x)^2 + b(y-x^2)^2).")
flags.DEFINE_list("start", ["-1.5", "2.5"], "Initial weights x,y.")
flags.DEFINE_float("min_momentum", 0.01,
                   "Lower bound on the momentum: sizes the reversible method's bit stack "
                   "(momentum is traced); learned momenta are clipped to it.")

FLAGS = flags.FLAGS


def valley(w, scale, steepness):
  """The toy loss at weights w = [x, y]: a curved valley along y = x**2, minimum at (1, 1)."""
  x, y = w[..., 0], w[..., 1]
  return scale * ((1.0 - x) ** 2 + steepness * (y - x ** 2) ** 2)


def make_problem(w0, num_steps, scale, steepness, min_momentum):
  """Returns ``(meta_loss, trajectory)``, both functions of the hyperparameters."""
  method = revhyper.Reversible(min_momentum=min_momentum)

  def loss_fn(w, _, t):
    del t  # the toy loss is deterministic: no minibatches
    return valley(w, scale, steepness)

  def schedules(h):
    # The clip keeps a learned momentum inside the range the bit stack was sized for.
    gamma = jnp.clip(revhyper.hyper.momentum_from_logit(h["logit_momentum"]), min_momentum, 1.0)
    return revhyper.hyper.learning_rate_from_log(h["log_learning_rate"]), gamma

  def train(h, active_steps):
    alpha, gamma = schedules(h)
    # A zero learning rate from step `active_steps` on freezes the weights there, so this is
    # the weight after `active_steps` steps of the very same run.
    alpha = jnp.where(jnp.arange(num_steps) < active_steps, alpha, 0.0)
    return revhyper.sgd(loss_fn, w0, None, num_steps=num_steps, learning_rate=alpha,
                        momentum=gamma, method=method)

  def meta_loss(h):
    out = train(h, num_steps)
    return loss_fn(out.params, None, 0), {"x": out.params[0], "y": out.params[1]}

  @jax.jit
  def trajectory(h):
    """Weights after 0, 1, ..., T steps: [T + 1, 2]."""
    return jax.vmap(lambda k: train(h, k).params)(jnp.arange(num_steps + 1))

  return meta_loss, trajectory


def plot_trajectories(paths, scale, steepness, start):
  """Training runs over loss contours, one per meta-iteration (figure 1)."""
  allpts = np.concatenate(paths + [np.array([[1.0, 1.0]])])
  lo, hi = allpts.min(0), allpts.max(0)
  pad = 0.25 * np.maximum(hi - lo, 0.5)
  xs = np.linspace(lo[0] - pad[0], hi[0] + pad[0], 300)
  ys = np.linspace(lo[1] - pad[1], hi[1] + pad[1], 300)
  grid = np.stack(np.meshgrid(xs, ys), axis=-1)
  z = np.asarray(valley(grid, scale, steepness))
  fig, ax = plt.subplots(figsize=(6.2, 5.2))
  # Contours of log L: the valley floor is orders of magnitude below its walls.
  log_z = np.log10(np.maximum(z, 1e-3))
  filled = ax.contourf(xs, ys, log_z, levels=30, cmap="Blues_r", alpha=0.8)
  ax.contour(xs, ys, log_z, levels=15, colors="0.35", linewidths=0.4)
  fig.colorbar(filled, ax=ax, label="log10 loss")
  colours = plt.cm.autumn(np.linspace(0.0, 0.8, len(paths)))
  for i, (path, c) in enumerate(zip(paths, colours)):
    ax.plot(path[:, 0], path[:, 1], "-", color=c, lw=1.8, label=f"meta-iteration {i}")
    ax.plot(path[-1, 0], path[-1, 1], "o", color=c, ms=5)
  ax.plot(*start, "k*", ms=11, label="initial weights")
  ax.plot(1.0, 1.0, "kx", ms=8, label="minimum")
  ax.set_xlabel("weight 1 (x)")
  ax.set_ylabel("weight 2 (y)")
  ax.set_title("Training runs over meta-iterations")
  ax.legend(fontsize=8, loc="best")
  return fig


def plot_schedules(alphas, gammas):
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
  colours = plt.cm.viridis(np.linspace(0.0, 0.85, len(alphas)))
  for i, (a, g, c) in enumerate(zip(alphas, gammas, colours)):
    top.plot(a, color=c, label=f"meta-iteration {i}")
    bottom.plot(g, color=c)
  top.set_ylabel("learning rate")
  bottom.set_ylabel("momentum")
  bottom.set_xlabel("training step t")
  top.set_title("Schedules over meta-iterations")
  top.legend(fontsize=8)
  for ax in (top, bottom):
    ax.grid(alpha=0.3)
  return fig


def main(argv):
  del argv
  start_time = time.time()
  start = tuple(float(v) for v in FLAGS.start)
  num_steps = FLAGS.num_steps
  settings = dict(
      meta_iterations=FLAGS.meta_iterations, num_steps=num_steps,
      initial_learning_rate=float(np.exp(FLAGS.log_learning_rate)),
      initial_momentum=FLAGS.momentum, meta_optimizer=f"sgd({FLAGS.meta_step})",
      meta_objective="loss after training", valley_scale=FLAGS.valley_scale,
      valley_steepness=FLAGS.valley_steepness, start=start, min_momentum=FLAGS.min_momentum,
      loss="s*((1-x)^2 + b*(y-x^2)^2)", quick=FLAGS.quick)
  out_dir = common.prepare_out_dir(FLAGS.out_dir)
  logging.info("Settings: %s", settings)

  w0 = jnp.asarray(start, jnp.float32)
  meta_loss, trajectory = make_problem(w0, num_steps, FLAGS.valley_scale,
                                       FLAGS.valley_steepness, FLAGS.min_momentum)
  h0 = {"log_learning_rate": jnp.full((num_steps,), FLAGS.log_learning_rate, jnp.float32),
        "logit_momentum": jnp.full((num_steps,), float(revhyper.hyper.logit(FLAGS.momentum)),
                                   jnp.float32)}
  visited = []  # the hyperparameters of every meta-iteration, for the figures

  result = revhyper.meta.meta_optimize(
      meta_loss, h0, num_iterations=FLAGS.meta_iterations,
      optimizer=optax.sgd(FLAGS.meta_step), has_aux=True,
      callback=lambda step: visited.append(step.hparams))
  visited.append(result.hparams)
  paths = [np.asarray(trajectory(h)) for h in visited]
  alphas = [np.exp(np.asarray(h["log_learning_rate"])) for h in visited]
  gammas = [np.clip(np.asarray(revhyper.hyper.momentum_from_logit(h["logit_momentum"])),
                    FLAGS.min_momentum, 1.0) for h in visited]
  # The last point of each path is the run's final weights, so its loss is the meta-loss.
  final_losses = [float(valley(p[-1], FLAGS.valley_scale, FLAGS.valley_steepness))
                  for p in paths]
  final_loss = final_losses[-1]
  logging.info("Loss after training: %.4g before meta-learning, %.4g after %d meta-iterations",
               final_losses[0], final_loss, FLAGS.meta_iterations)
  results = dict(
      experiment="toy valley (figure 1)", settings=settings,
      data="none: a 2-D analytic loss",
      num_hyperparameters=2 * num_steps,
      # meta_loss[i]: the loss after the training run of meta-iteration i (i = 0..iterations);
      # the last is after the final update.
      meta_loss=[r["meta_loss"] for r in result.history] + [final_loss],
      final_loss_per_run=final_losses, history=result.history,
      trajectories=paths, learning_rates=alphas, momenta=gammas,
      wall_seconds=time.time() - start_time)
  common.save_results(out_dir, results)
  common.save_figure(plot_trajectories(paths, FLAGS.valley_scale, FLAGS.valley_steepness, start),
                     out_dir, "trajectories.png")
  common.save_figure(plot_schedules(alphas, gammas), out_dir, "schedules.png")
  logging.info("Wrote %s (%.1f s)", out_dir, time.time() - start_time)


if __name__ == "__main__":
  app.run(main)
