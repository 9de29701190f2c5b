"""Learned learning-rate, momentum and initialisation schedules of a tanh MLP on MNIST.

Reproduces figures 2-7 of Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter
Optimization through Reversible Learning" (ICML 2015), with the settings of the authors' code
(HIPS/hypergrad, experiments/Feb_3_training_schedules): a 784-50-50-50-10 tanh network is
trained by T = 100 steps of momentum SGD (batch 200, drawn with replacement), and
meta-optimisation learns, with exact hypergradients from training run backwards,

* a learning-rate schedule per weight type and step: log alpha, [T] for each of the 8 leaves
  (W and b of 4 layers), starting at alpha = e^-1;
* a momentum schedule laid out the same way: logit gamma, starting at gamma = 0.5;
* one initialisation scale per weight type: w0 = exp(log scale) * N(0, 1), biases included,
  starting at e^-3;

1608 hyperparameters in all. The meta-objective is the training loss after training (on the
whole training split). As in the authors' code, every meta-iteration draws a new seed (initial
noise and minibatches), so the hyperparameters are fitted to the distribution of training
runs, not to one draw, and the meta-optimiser is their Adam variant
(``revhyper.meta.paper_adam``: step 0.04, b1 = 0.1, b2 = 0.01 in the (1 - beta) convention,
eps = 1e-4, first-moment decay lam = 1e-4), 50 meta-iterations; ``--config.meta_optimizer=adam``
uses optax.adam instead.

Held-out evaluation: the initial and the learned hyperparameters each train
``config.eval_seeds`` (20) fresh seeds, never used while meta-training (one ``jax.vmap``), and
are scored on a test split never used for meta-training; results.json, docs/experiments.rst
and the figures report mean ± sd over those seeds. The paper's findings: the top layer's
learning rate grows first, then the lower layers'; all schedules decay towards the end of
training.

Departures from the authors' code (also listed in results.json): the bundled 10,000 digits
split 5000 / 2500 / 2500 instead of 10k / 10k / 10k of full MNIST (``config.mnist_dir`` for the
full data); learned momenta are clipped below at 0.01 (the reversible method sizes its bit
stack from that bound); the initial noise is drawn by JAX's generator, not numpy's.

Outputs in ``--out_dir``: ``results.json`` (the shared schema of experiments/common.py: commit,
JAX version, backend, config, departures; then the meta-loss history, the learned schedules
and scales, and the held-out evaluation before and after), the figures ``learning_rates.png``,
``momenta.png``, ``learning_curves.png`` (figure 3, left: training loss over the T steps
before and after, mean ± sd over held-out seeds), ``meta_learning_curve.png`` and
``init_scales.png``, and ``checkpoints/`` for ``--resume``.

Run from the repository root::

  python experiments/schedules.py --out_dir results/schedules     # the paper's settings, ~3 min
  python experiments/schedules.py --config=experiments/configs/schedules.py:quick \
      --out_dir /tmp/schedules_quick                                # under 40 CPU-seconds
  python experiments/schedules.py --out_dir results/schedules --resume   # continue a run
  python experiments/launch_local.py --num_processes 2 --devices_per_process 1 -- \
      experiments/schedules.py --config=experiments/configs/schedules.py:quick \
      --out_dir /tmp/schedules_2                                    # 2 processes

Several processes (``--coordinator``, ``--num_processes``, ``--process_id`` of
experiments/distributed.py, or ``--coordinator=auto`` on a cluster) each run the whole
meta-optimisation on their own first device: the network is small enough for one, and
``out_dir`` must be a folder they share. Process 0 writes the checkpoints, results.json and
the figures; every process resumes from the checkpoints, and all end with the same
hyperparameters bit for bit.
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
import distributed  # noqa: E402  (--coordinator, --num_processes, --process_id)
import matplotlib.pyplot as plt  # noqa: E402  (common chooses the headless backend first)
import revhyper  # noqa: E402

CONFIG = common.define_config("schedules")
common.define_out_dir("results/schedules")
flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in out_dir/checkpoints.")

FLAGS = flags.FLAGS
DEPARTURES = (
    "Bundled data: 10,000 MNIST digits split 5000/2500/2500 (the paper's code: 10k/10k/10k of "
    "full MNIST).",
    "Learned momenta are clipped below at config.min_momentum = 0.01, the bound the reversible "
    "method sizes its bit stack for.",
    "Initial noise and minibatches are drawn by JAX's generator from per-iteration keys, not by "
    "numpy's RandomState((seed, meta-iteration)).",
)


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


def make_problem(data, c, method):
  """The meta-loss and the held-out evaluation, functions of the hyperparameters and a key.

  A key seeds one training run: its initial-weight noise and its minibatches. Returns
  ``(meta_loss, evaluate)``: ``meta_loss(h, key) -> (final training loss, aux)`` for
  ``revhyper.meta.meta_optimize``, whose aux (that run's validation loss and error, the
  initial scales) lands in the history; ``evaluate(h, keys)``, jitted and vmapped over keys,
  returns per-seed losses and errors after training and the training loss every
  ``c.curve_every`` steps.
  """
  (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = data
  layer_sizes, num_steps, batch_size = tuple(c.layer_sizes), c.num_steps, c.batch_size
  num_train = int(x_train.shape[0])
  names = leaf_names(revhyper.models.mlp_noise(jax.random.key(0), layer_sizes))

  def loss(params, x, y):
    return revhyper.models.softmax_cross_entropy(revhyper.models.mlp_apply(params, x), y)

  def batch_loss_fn(batch_key, offset=0):
    def batch_loss(params, _, t):
      if c.batches == "with_replacement":  # the paper's code: randint per step
        idx = jax.random.randint(jax.random.fold_in(batch_key, t + offset), (batch_size,), 0,
                                 num_train)
      else:
        idx = revhyper.datasets.batch_indices(batch_key, t + offset, num_train, batch_size)
      return loss(params, x_train[idx], y_train[idx])
    return batch_loss

  def schedules(h):
    return (revhyper.hyper.learning_rate_from_log(h["log_learning_rate"]),
            momentum_schedule(h["logit_momentum"], c.min_momentum))

  def initial_params(h, noise_key):
    # exp(log scale) * fixed noise: the initial weights are differentiable in the scales.
    noise = revhyper.models.mlp_noise(noise_key, layer_sizes)
    return revhyper.models.mlp_init_from_noise(noise, h["log_init_scale"])

  def meta_loss(h, key):
    noise_key, batch_key = jax.random.split(key)
    alpha, gamma = schedules(h)
    params = revhyper.sgd(batch_loss_fn(batch_key), initial_params(h, noise_key), None,
                          num_steps=num_steps, learning_rate=alpha, momentum=gamma,
                          method=method).params
    logits = revhyper.models.mlp_apply(params, x_valid)
    # Scalars in aux are recorded per iteration in the history, which survives --resume.
    scales = jax.tree_util.tree_leaves(revhyper.hyper.init_scale_from_log(h["log_init_scale"]))
    aux = {"valid_loss": revhyper.models.softmax_cross_entropy(logits, y_valid),
           "valid_error": revhyper.models.error_rate(logits, y_valid),
           "init_scale": dict(zip(names, scales))}
    return loss(params, x_train, y_train), aux

  def evaluate_one(h, key):
    noise_key, batch_key = jax.random.split(key)
    alpha, gamma = schedules(h)
    params = initial_params(h, noise_key)
    velocity = jax.tree.map(jnp.zeros_like, params)
    curve = [loss(params, x_train, y_train)]
    # Training in segments of curve_every steps records the learning curve on the way; the
    # plain float method, since nothing is differentiated here.
    for lo in range(0, num_steps, c.curve_every):
      hi = min(lo + c.curve_every, num_steps)
      out = revhyper.sgd(batch_loss_fn(batch_key, lo), params, None, num_steps=hi - lo,
                         learning_rate=jax.tree.map(lambda a: a[lo:hi], alpha),
                         momentum=jax.tree.map(lambda g: g[lo:hi], gamma), velocity=velocity,
                         method="unroll")
      params, velocity = out.params, out.velocity
      curve.append(loss(params, x_train, y_train))
    result = {"learning_curve": jnp.stack(curve)}
    for name, x, y in (("train", x_train, y_train), ("valid", x_valid, y_valid),
                       ("test", x_test, y_test)):
      logits = revhyper.models.mlp_apply(params, x)
      result[f"{name}_loss"] = revhyper.models.softmax_cross_entropy(logits, y)
      result[f"{name}_error"] = revhyper.models.error_rate(logits, y)
    return result

  evaluate = jax.jit(jax.vmap(evaluate_one, in_axes=(None, 0)))
  return meta_loss, evaluate


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


def plot_meta_curve(history, held_out):
  """The meta-objective of each meta-iteration's own seed, and the held-out result (figure 4).

  Each point before the last is the final training loss of that meta-iteration's training run
  (a new seed each time); the error bars at the start and the end are the held-out mean ± sd.
  """
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  it = [r["iteration"] for r in history]
  ax.plot(it, [r["meta_loss"] for r in history], "o-", ms=3,
          label="final training loss, this meta-iteration's seed")
  ax.plot(it, [r["aux"]["valid_loss"] for r in history], "s-", ms=3,
          label="validation loss, this meta-iteration's seed")
  for x, when in ((0, "before"), (len(history), "after")):
    for name, colour, marker in (("train_loss", "C0", "o"), ("test_loss", "C3", "D")):
      stats = held_out[when][name]
      ax.errorbar([x], [stats["mean"]], yerr=[stats["sd"]], fmt=marker, color=colour, ms=6,
                  capsize=4, mfc="none",
                  label=(f"held-out {name.replace('_', ' ')} (mean ± sd, {stats['n']} seeds)"
                         if when == "after" else None))
  ax.set_xlabel("meta-iteration")
  ax.set_ylabel("loss after training")
  ax.set_title("Meta-learning curve")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return fig


def plot_learning_curves(steps, before, after):
  """Training loss over the T steps before and after meta-learning (figure 3, left)."""
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  common.band(ax, steps, before, "initial hyperparameters", "0.5", "--")
  common.band(ax, steps, after, "learned hyperparameters", "C0")
  ax.set_yscale("log")
  ax.set_xlabel("training step t")
  ax.set_ylabel("training loss (whole training split)")
  ax.set_title("Learning curves on held-out seeds")
  ax.grid(alpha=0.3, which="both")
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
  process, _ = distributed.initialize_from_flags()  # before anything uses JAX's devices
  start = time.time()
  c = CONFIG.value
  out_dir = common.prepare_out_dir(FLAGS.out_dir)
  data, data_note = common.load_mnist_splits(c.mnist_dir, tuple(c.split), c.seed,
                                             ("train", "valid", "test"))
  logging.info("%s", data_note)
  logging.info("Config:\n%s", c)

  if c.method == "reversible":
    method = revhyper.Reversible(min_momentum=c.min_momentum)
  else:
    method = c.method
  meta_loss, evaluate = make_problem(data, c, method)
  like = revhyper.models.mlp_noise(jax.random.key(0), tuple(c.layer_sizes))
  names = leaf_names(like)
  h0 = initial_hparams(like, c.num_steps, c.log_learning_rate, c.momentum, c.log_init_scale)
  num_hyperparameters = sum(x.size for x in jax.tree_util.tree_leaves(h0))
  if c.meta_optimizer == "paper_adam":
    optimizer = revhyper.meta.paper_adam(c.meta_step)
  elif c.meta_optimizer == "adam":
    optimizer = optax.adam(c.meta_step)
  else:
    raise app.UsageError(f"config.meta_optimizer must be paper_adam or adam, got "
                         f"{c.meta_optimizer!r}")

  train_key = common.meta_training_key(c.seed)
  if c.reseed:
    run_meta, key = meta_loss, train_key
  else:  # one fixed draw for every meta-iteration
    run_meta, key = (lambda h: meta_loss(h, jax.random.fold_in(train_key, 0))), None
  checkpoint_dir = os.path.join(out_dir, "checkpoints")
  latest = revhyper.meta.latest_checkpoint(checkpoint_dir) if FLAGS.resume else None
  resumed_from = int(os.path.basename(latest)[len("ckpt_"):-len(".npz")]) if latest else 0
  result = revhyper.meta.meta_optimize(
      run_meta, h0, num_iterations=c.meta_iterations, optimizer=optimizer,
      checkpoint_dir=checkpoint_dir, checkpoint_every=c.checkpoint_every, resume=FLAGS.resume,
      has_aux=True, key=key)

  eval_keys = common.held_out_keys(c.seed, c.eval_seeds)
  per_seed = {"before": jax.device_get(evaluate(h0, eval_keys)),
              "after": jax.device_get(evaluate(result.hparams, eval_keys))}
  curves = {when: per_seed[when].pop("learning_curve") for when in per_seed}
  held_out = {when: common.summarise_seeds(per_seed[when]) for when in per_seed}
  for when in ("before", "after"):
    logging.info("Held-out %s (%d seeds): training loss %s, test error %s", when, c.eval_seeds,
                 common.format_mean_sd(held_out[when]["train_loss"]),
                 common.format_mean_sd(held_out[when]["test_error"], 100, 2, "%"))

  h = result.hparams
  learned = {
      "learning_rate": by_name(names,
                               revhyper.hyper.learning_rate_from_log(h["log_learning_rate"])),
      "momentum": by_name(names, momentum_schedule(h["logit_momentum"], c.min_momentum)),
      "init_scale": by_name(names, revhyper.hyper.init_scale_from_log(h["log_init_scale"])),
  }
  steps = list(range(0, c.num_steps, c.curve_every)) + [c.num_steps]
  fan_in = {f"W{i + 1}": 1.0 / np.sqrt(n) for i, n in enumerate(c.layer_sizes[:-1])}
  results = dict(
      data=data_note, num_hyperparameters=num_hyperparameters,
      resumed_from_iteration=resumed_from,
      # meta_loss[i]: the final training loss of meta-iteration i's own training run (its own
      # seed), before update i.
      meta_loss=[r["meta_loss"] for r in result.history], history=result.history,
      held_out=held_out,
      learning_curves=dict(steps=steps, before=curves["before"], after=curves["after"]),
      learned=learned, inverse_sqrt_fan_in=fan_in, wall_seconds=time.time() - start)
  if process != 0:  # every process computed the same results; one writes them
    return
  common.write_results(out_dir, "schedules (figures 2-7)", c, results, DEPARTURES)

  iterations = len(result.history)
  initial_alpha, initial_gamma = float(np.exp(c.log_learning_rate)), c.momentum
  common.save_figure(
      plot_schedules(names, learned["learning_rate"], initial_alpha,
                     "learning rate", f"Learned learning rate ({iterations} meta-iterations)"),
      out_dir, "learning_rates.png")
  common.save_figure(
      plot_schedule_grid(names, learned["momentum"], initial_gamma, "momentum",
                         f"Learned momentum schedules ({iterations} meta-iterations)"),
      out_dir, "momenta.png")
  common.save_figure(plot_learning_curves(steps, curves["before"], curves["after"]), out_dir,
                     "learning_curves.png")
  common.save_figure(plot_meta_curve(result.history, held_out), out_dir,
                     "meta_learning_curve.png")
  common.save_figure(plot_init_scales(learned["init_scale"], result.history,
                                      tuple(c.layer_sizes), float(np.exp(c.log_init_scale))),
                     out_dir, "init_scales.png")
  logging.info("Wrote %s (%.1f s)", out_dir, time.time() - start)


if __name__ == "__main__":
  app.run(main)
