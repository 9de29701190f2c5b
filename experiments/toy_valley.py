"""Meta-learning a learning-rate and momentum schedule on a 2-D valley: the paper's figure 1.

Reproduces the illustration of Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter
Optimization through Reversible Learning" (ICML 2015), figure 1, with the settings of the
authors' code (HIPS/hypergrad, experiments/Jan_25_Figure_1/2): each meta-iteration runs a whole
training run of momentum SGD on two weights w = (w1, w2), takes the exact hypergradient of the
final loss by running training backwards, and steps the hyperparameters, so that the next
training run gets further down the valley.

* loss: ``800 * sigmoid(R(w) / 500)`` with the tilted Rosenbrock function
  ``R(w) = 100 (w2 - w1^2)^2 + (1 - w1)^2 + 200 w1``: a curved valley along w2 = w1^2 that
  keeps descending towards negative w1, squashed by the sigmoid; training starts at
  (1.4, 3.9), up the valley's side, with zero velocity;
* T = 50 steps; hyperparameters: one log learning rate and one logit momentum per step
  (50 + 50), starting at alpha = e^-4.5 and gamma = 0.99;
* meta-objective: the loss after training; meta-optimiser: the authors' momentum gradient
  descent (velocity = 0.9 v - 0.1 g, step 0.01; ``optax.sgd(0.001, momentum=0.9)`` is the same
  update), 3 meta-iterations.

Nothing here is random, so there are no seeds to evaluate over. Departure from the authors'
code: learned momenta are clipped below at 0.01 (the reversible method's bit-stack bound).

Outputs in ``--out_dir``: ``results.json`` (the shared schema: commit, JAX version, backend,
config, departures; then the hyperparameters, trajectory and final loss of every
meta-iteration), ``trajectories.png`` (the training runs in the (w1, w2) plane over the loss
contours, one per meta-iteration, like the paper's figure) and ``schedules.png``.

Run from the repository root::

  python experiments/toy_valley.py --out_dir results/toy_valley     # the paper's run, ~10 s
  python experiments/toy_valley.py --config=experiments/configs/toy_valley.py:quick \
      --out_dir /tmp/toy_valley_quick                       # the same, under 20 CPU-seconds
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

CONFIG = common.define_config("toy_valley")
common.define_out_dir("results/toy_valley")

FLAGS = flags.FLAGS
DEPARTURES = ("Learned momenta are clipped below at config.min_momentum = 0.01, the bound the "
              "reversible method sizes its bit stack for.",)


def valley(w):
  """The authors' toy loss at weights w = [..., 2]: 800 * sigmoid(R(w) / 500)."""
  w1, w2 = w[..., 0], w[..., 1]
  tilted_rosenbrock = 100.0 * (w2 - w1 ** 2) ** 2 + (1.0 - w1) ** 2 + 200.0 * w1
  return 800.0 * jax.nn.sigmoid(tilted_rosenbrock / 500.0)


def make_problem(w0, num_steps, min_momentum):
  """Returns ``(meta_loss, trajectory)``, both functions of the hyperparameters."""
  method = revhyper.Reversible(min_momentum=min_momentum)

  def loss_fn(w, _, t):
    del t  # the toy loss is deterministic: no minibatches
    return valley(w)

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


def plot_trajectories(paths, start):
  """Training runs over loss contours, one per meta-iteration (figure 1)."""
  allpts = np.concatenate(paths)
  lo, hi = allpts.min(0), allpts.max(0)
  pad = 0.25 * np.maximum(hi - lo, 0.5)
  xs = np.linspace(lo[0] - pad[0], hi[0] + pad[0], 300)
  ys = np.linspace(lo[1] - pad[1], hi[1] + pad[1], 300)
  z = np.asarray(valley(jnp.asarray(np.stack(np.meshgrid(xs, ys), axis=-1))))
  fig, ax = plt.subplots(figsize=(6.2, 5.2))
  filled = ax.contourf(xs, ys, z, levels=30, cmap="Blues_r", alpha=0.8)
  ax.contour(xs, ys, z, levels=15, colors="0.35", linewidths=0.4)
  fig.colorbar(filled, ax=ax, label="loss")
  colours = plt.cm.autumn(np.linspace(0.0, 0.8, len(paths)))
  for i, (path, c) in enumerate(zip(paths, colours)):
    ax.plot(path[:, 0], path[:, 1], "-", color=c, lw=1.8, label=f"meta-iteration {i}")
    ax.plot(path[-1, 0], path[-1, 1], "o", color=c, ms=5)
  ax.plot(*start, "k*", ms=11, label="initial weights")
  ax.set_xlabel("weight 1")
  ax.set_ylabel("weight 2")
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
  c = CONFIG.value
  start, num_steps = tuple(float(v) for v in c.start), c.num_steps
  out_dir = common.prepare_out_dir(FLAGS.out_dir)
  logging.info("Config:\n%s", c)

  w0 = jnp.asarray(start, jnp.float32)
  meta_loss, trajectory = make_problem(w0, num_steps, c.min_momentum)
  h0 = {"log_learning_rate": jnp.full((num_steps,), c.log_learning_rate, jnp.float32),
        "logit_momentum": jnp.full((num_steps,), float(revhyper.hyper.logit(c.momentum)),
                                   jnp.float32)}
  visited = []  # the hyperparameters of every meta-iteration, for the figures

  # The authors' meta-step v = mass v - (1 - mass) g, w += step v is optax's heavy-ball
  # momentum with the learning rate scaled by (1 - mass).
  optimizer = optax.sgd(c.meta_step * (1.0 - c.meta_momentum), momentum=c.meta_momentum)
  result = revhyper.meta.meta_optimize(
      meta_loss, h0, num_iterations=c.meta_iterations, optimizer=optimizer, has_aux=True,
      callback=lambda step: visited.append(step.hparams))
  visited.append(result.hparams)
  paths = [np.asarray(trajectory(h)) for h in visited]
  alphas = [np.exp(np.asarray(h["log_learning_rate"])) for h in visited]
  gammas = [np.clip(np.asarray(revhyper.hyper.momentum_from_logit(h["logit_momentum"])),
                    c.min_momentum, 1.0) for h in visited]
  # The last point of each path is the run's final weights, so its loss is the meta-loss.
  final_losses = [float(valley(jnp.asarray(p[-1]))) for p in paths]
  logging.info("Loss after training: %.4g before meta-learning, %.4g after %d meta-iterations",
               final_losses[0], final_losses[-1], c.meta_iterations)
  results = dict(
      data="none: a 2-D analytic loss", loss="800 * sigmoid((100 (w2 - w1^2)^2 + (1 - w1)^2 + "
      "200 w1) / 500)", num_hyperparameters=2 * num_steps,
      meta_optimizer=f"optax.sgd({c.meta_step} * (1 - {c.meta_momentum}), "
      f"momentum={c.meta_momentum})",
      # meta_loss[i]: the loss after the training run of meta-iteration i (i = 0..iterations);
      # the last is after the final update.
      meta_loss=[r["meta_loss"] for r in result.history] + [final_losses[-1]],
      final_loss_per_run=final_losses, history=result.history,
      trajectories=paths, learning_rates=alphas, momenta=gammas,
      wall_seconds=time.time() - start_time)
  common.write_results(out_dir, "toy valley (figure 1)", c, results, DEPARTURES)
  common.save_figure(plot_trajectories(paths, start), out_dir, "trajectories.png")
  common.save_figure(plot_schedules(alphas, gammas), out_dir, "schedules.png")
  logging.info("Wrote %s (%.1f s)", out_dir, time.time() - start_time)


if __name__ == "__main__":
  app.run(main)
