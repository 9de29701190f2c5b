"""Learned AdamW schedules and augmentation for a BatchNorm convnet on MNIST.

A small residual convnet with BatchNorm (``revhyper.models.resnet_init``: a stride-2 3x3 stem
with 8 channels, a residual block at 14x14 with 8 and one at 7x7 with 16, global average
pooling, a linear head) is trained by T = 100 steps of AdamW (batch 32) while
``revhyper.RunningAverage`` keeps the running averages of every BN layer's batch means and
variances (decay 0.9). The meta-objective is the validation loss of the trained network in
evaluation mode, which normalises with those running averages, so the hypergradient flows
through them too. Meta-optimisation learns, with exact hypergradients from training run
backwards,

* a learning-rate schedule per layer (a convolution and the BN after it count as one layer;
  stem, each block's two convolutions and its strided skip projection, head): the log
  learning rate is linear between 4 evenly spaced knots over the T steps (4 numbers a layer, a
  smooth schedule instead of T free values, which a fresh seed per meta-iteration would make
  noisy), starting at the best constant rate of the baseline's grid (``config.warm_start``;
  optax's lr = 1e-3 without it: then 30 meta-steps cannot move the rates the factor of about
  30 that separates 1e-3 from the grid's best);
* a weight-decay schedule laid out the same way, starting at optax's wd = 1e-4;
* the strength of a data augmentation: every training image is shifted by a random sub-pixel
  translation, ``exp(log_shift) * z`` pixels with z ~ N(0, 1) per example and axis (bilinear
  interpolation, so the loss is differentiable in the shift), z drawn from a key folded with
  the step; starting at 0.5 pixels;

57 hyperparameters for the default network. Each meta-iteration draws a fresh seed (initial
weights, minibatch order, augmentation draws), so the settings are learned for the
distribution of runs, not for one. The learned settings are then evaluated on fresh seeds never
used in meta-training, against the same network with optax's AdamW defaults (lr 1e-3, wd 1e-4,
no augmentation) and against the best constant learning rate of a small grid (optax's other
defaults, no augmentation; chosen by mean validation error, reported on the test set), and the
learned schedules without their augmentation show what each part brings: test error (a split
never read while meta-training), mean and standard deviation over the seeds.

The optimiser sees each layer's weights as one vector (its convolution and BN parameters
concatenated), so that per-layer schedules are per-leaf schedules and the exact method carries
a handful of leaves, which compiles in about half the time of one per array. Every contender
trains with ``eps_root = 1e-8`` instead of optax's 0, which keeps the hypergradient finite if a
weight's gradient is always zero (a dead channel).

Data: the 10,000 bundled MNIST digits, split 5000 train / 1000 valid / 2500 test
(``config.split``; ``config.mnist_dir`` for the full IDX files). Inputs are scaled to [0, 1]
and centred. Settings: ``experiments/configs/batchnorm_schedules.py``, presets "paper" (the
settings above) and "quick"; ``--config.<field>=value`` overrides one field.

Outputs in ``--out_dir``: ``results.json`` (the shared schema of experiments/common.py; then
the meta-loss history, the learned schedules and shift, per-seed test errors of every
contender with their mean and sd, the grid's validation errors, wall time) and the figures
``learning_rates.png``, ``weight_decays.png``, ``meta_learning_curve.png`` and
``test_error.png``.

Run from the repository root::

  python experiments/batchnorm_schedules.py --out_dir results/batchnorm_schedules  # ~24 min
  python experiments/batchnorm_schedules.py \
      --config=experiments/configs/batchnorm_schedules.py:quick \
      --out_dir /tmp/batchnorm_schedules_quick                 # under 40 CPU-seconds
"""

import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

# `common` sits beside this script; make it importable when run from the repository root.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (needs the path above)
import matplotlib.pyplot as plt  # noqa: E402  (common chooses the headless backend first)
import revhyper  # noqa: E402
from revhyper import models  # noqa: E402
from revhyper import optim  # noqa: E402

CONFIG = common.define_config("batchnorm_schedules")
common.define_out_dir("results/batchnorm_schedules")

FLAGS = flags.FLAGS
OPTAX_DEFAULTS = dict(learning_rate=1e-3, weight_decay=1e-4)
EPS_ROOT = 1e-8  # see the module docstring
# Learning rates and weight decays are clipped here, so that lr * wd <= 0.1 stays far inside
# the bound that sizes the weights' bit stack (1 - lr * wd >= min_decay).
MAX_LEARNING_RATE, MAX_WEIGHT_DECAY = 0.1, 1.0
SIDE = 28  # the digits are 28x28
DEPARTURES = (
    "Every contender trains with eps_root = 1e-8 instead of optax's 0, so that a weight whose "
    "gradient is always zero (nu = 0) cannot make the hypergradient NaN.",
    "Learning rates are clipped at 0.1 and weight decays at 1, so that 1 - lr * wd stays "
    "above config.min_decay, the bound the reversible method sizes its bit stack for.",
    "BN running variances average the biased batch variance (PyTorch averages the unbiased "
    "one); evaluation normalises with the running averages.",
)


class Layers:
  """The network's parameters grouped by layer, each group packed into one vector.

  A layer is the stem, one convolution of a block with the BN after it, a block's skip
  projection, or the head. ``pack`` and ``unpack`` convert between ``resnet_init``'s nested
  parameters and ``{layer name: float32 vector}``.
  """

  def __init__(self, params):
    paths, self._treedef = jax.tree_util.tree_flatten_with_path(params)
    self._shapes = [leaf.shape for _, leaf in paths]
    by_layer = {}
    for i, (path, _) in enumerate(paths):
      by_layer.setdefault(self.layer_of(path), []).append(i)
    self._members = by_layer
    blocks = sorted((k for k in params if k.startswith("block")), key=lambda k: int(k[5:]))
    order = ["stem"] + [f"{b}.{c}" for b in blocks for c in ("conv1", "conv2", "proj")] + ["head"]
    self.names = [n for n in order if n in by_layer]  # in the order the network runs

  @staticmethod
  def layer_of(path):
    top = path[0].key
    if top in ("stem", "head"):
      return top
    sub = path[1].key
    return f"{top}.{ {'bn1': 'conv1', 'bn2': 'conv2'}.get(sub, sub) }"

  def pack(self, params):
    leaves = jax.tree.leaves(params)
    return {name: jnp.concatenate([leaves[i].reshape(-1) for i in members])
            for name, members in self._members.items()}

  def unpack(self, packed):
    leaves = [None] * len(self._shapes)
    for name, members in self._members.items():
      start = 0
      for i in members:
        size = int(np.prod(self._shapes[i]))
        leaves[i] = packed[name][start:start + size].reshape(self._shapes[i])
        start += size
    return jax.tree_util.tree_unflatten(self._treedef, leaves)


def knot_basis(num_steps, num_knots):
  """[T, K]: a schedule's values at K evenly spaced knots -> its T values, linear between."""
  if num_knots == 1:
    return jnp.ones((num_steps, 1), jnp.float32)
  position = np.linspace(0, num_knots - 1, num_steps)
  basis = np.maximum(0, 1 - np.abs(position[:, None] - np.arange(num_knots)[None, :]))
  return jnp.asarray(basis, jnp.float32)


def coefficients(h, basis):
  """The training settings the hyperparameters stand for, clipped to their bounds."""
  schedule = lambda knots, top: jnp.minimum(jnp.exp(basis @ knots), top)
  return {"learning_rate": {k: schedule(v, MAX_LEARNING_RATE) for k, v in h["log_lr"].items()},
          "weight_decay": {k: schedule(v, MAX_WEIGHT_DECAY) for k, v in h["log_wd"].items()},
          "shift": jnp.exp(h["log_shift"])}


def constant_settings(names, num_steps, learning_rate, weight_decay, shift):
  """Settings shaped like ``coefficients``' (one compiled evaluation serves every contender)."""
  full = lambda v: {k: jnp.full((num_steps,), v, jnp.float32) for k in names}
  return {"learning_rate": full(learning_rate), "weight_decay": full(weight_decay),
          "shift": jnp.float32(shift)}


def shift_images(images, shifts):
  """Translates each image [B, H, W] by ``shifts`` [B, 2] pixels (rows, columns), bilinearly,
  with zeros shifted in; differentiable in the shifts, the identity at 0."""
  grid = jnp.arange(images.shape[1], dtype=images.dtype)

  def tent(d):  # out[i] = sum_j tent[i, j] in[j] = in[i - d], interpolated linearly
    return jax.nn.relu(1 - jnp.abs(grid[:, None] - d - grid[None, :]))

  rows, cols = jax.vmap(tent)(shifts[:, 0]), jax.vmap(tent)(shifts[:, 1])
  return jnp.einsum("bij,bjk,blk->bil", rows, images, cols)


def make_problem(data, c, layers, method):
  """``meta_loss(h, key)`` and ``evaluate(settings, keys)`` for the network of config ``c``."""
  (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = data
  num_train, batch, num_steps = int(x_train.shape[0]), c.batch_size, c.num_steps
  optimizer = lambda s: optim.adamw(s["learning_rate"], eps_root=EPS_ROOT,
                                    weight_decay=s["weight_decay"])

  def train(settings, key, method=method):
    init_key, batch_key, augment_key = jax.random.split(key, 3)
    params = models.resnet_init(init_key, tuple(c.channels), c.blocks_per_stage)

    def batch_loss(w, shift, t):
      idx = revhyper.datasets.batch_indices(batch_key, t, num_train, batch)
      z = jax.random.normal(jax.random.fold_in(augment_key, t), (batch, 2), jnp.float32)
      images = shift_images(x_train[idx].reshape(batch, SIDE, SIDE), shift * z)
      logits, stats = models.resnet_apply(layers.unpack(w), images[..., None])
      return models.softmax_cross_entropy(logits, y_train[idx]), stats

    running = revhyper.RunningAverage(models.resnet_batchnorm_init(params), decay=c.bn_decay)
    out = revhyper.train(batch_loss, layers.pack(params), settings["shift"],
                         optimizer(settings), num_steps=num_steps, method=method,
                         model_state=running)
    return layers.unpack(out.params), out.model_state

  def scores(params, running):
    out = {}
    for name, x, y in (("valid", x_valid, y_valid), ("test", x_test, y_test)):
      logits, _ = models.resnet_apply(params, x, running, train=False)
      out[f"{name}_loss"] = models.softmax_cross_entropy(logits, y)
      out[f"{name}_error"] = models.error_rate(logits, y)
    return out

  basis = knot_basis(num_steps, c.knots)

  def meta_loss(h, key):
    params, running = train(coefficients(h, basis), key)
    logits, _ = models.resnet_apply(params, x_valid, running, train=False)
    return models.softmax_cross_entropy(logits, y_valid)

  def evaluate(settings, keys):
    # Forward only, in floats: the exact method would give the same training run. One seed
    # at a time (lax.map), which keeps memory at one run's.
    return jax.lax.map(lambda k: scores(*train(settings, k, "unroll")), keys)

  return meta_loss, evaluate, basis


def compile_options(c):
  return {"xla_backend_optimization_level": 0} if c.fast_compile else None


def plot_schedules(names, schedules, ylabel, title):
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  colours = plt.cm.viridis(np.linspace(0, 0.9, len(names)))
  for colour, name in zip(colours, names):
    ax.plot(schedules[name], color=colour, label=name)
  ax.set(yscale="log", xlabel="training step", ylabel=ylabel, title=title)
  ax.legend(fontsize=8, ncol=2)
  return fig


def main(argv):
  del argv
  start = time.time()
  c = CONFIG.value.copy_and_resolve_references()
  if c.method not in ("reversible", "unroll", "checkpoint"):
    raise app.UsageError(f"config.method must be reversible, unroll or checkpoint, got "
                         f"{c.method!r}")
  if c.knots < 1 or c.meta_iterations < 1 or c.eval_seeds < 1:
    raise app.UsageError("config.knots, meta_iterations and eval_seeds must be positive")
  out_dir = common.prepare_out_dir(FLAGS.out_dir)
  data, data_note = common.load_mnist_splits(c.mnist_dir, tuple(c.split), c.seed,
                                             ("train", "valid", "test"))
  method = revhyper.Reversible(min_decay=c.min_decay) if c.method == "reversible" else c.method
  layers = Layers(models.resnet_init(jax.random.key(0), tuple(c.channels), c.blocks_per_stage))
  meta_loss, evaluate, basis = make_problem(data, c, layers, method)

  # The baseline's grid first: with warm_start, meta-training starts from its best rate.
  keys = common.held_out_keys(c.seed, c.eval_seeds)
  defaults = constant_settings(layers.names, c.num_steps, shift=0.0, **OPTAX_DEFAULTS)
  evaluate = jax.jit(evaluate).lower(defaults, keys).compile(compile_options(c))
  tick = time.time()
  grid = [float(v) for v in c.grid]
  grid_scores = {lr: evaluate(constant_settings(layers.names, c.num_steps, lr,
                                                OPTAX_DEFAULTS["weight_decay"], 0.0), keys)
                 for lr in grid}
  best = min(grid, key=lambda lr: float(jnp.mean(grid_scores[lr]["valid_error"])))
  grid_seconds = time.time() - tick
  start_lr = best if c.warm_start else OPTAX_DEFAULTS["learning_rate"]
  print(f"grid evaluated in {grid_seconds:.0f} s; best constant rate {best:g}; meta-training "
        f"starts at {start_lr:g}", flush=True)

  knots = lambda v: {k: jnp.full((c.knots,), np.log(v), jnp.float32) for k in layers.names}
  h = {"log_lr": knots(start_lr),
       "log_wd": knots(OPTAX_DEFAULTS["weight_decay"]),
       "log_shift": jnp.float32(np.log(c.initial_shift))}
  optimizer = optax.adam(c.meta_step)
  state = optimizer.init(h)

  def meta_step(h, state, key):
    value, grad = jax.value_and_grad(meta_loss)(h, key)
    updates, state = optimizer.update(grad, state, h)
    return optax.apply_updates(h, updates), state, value, optax.global_norm(grad)

  train_key = common.meta_training_key(c.seed)
  key0 = jax.random.fold_in(train_key, 0)
  meta_step = jax.jit(meta_step).lower(h, state, key0).compile(compile_options(c))
  print(f"compiled the meta-step in {time.time() - start:.0f} s", flush=True)
  history = []
  for i in range(c.meta_iterations):
    tick = time.time()
    shift = float(jnp.exp(h["log_shift"]))
    h, state, value, norm = meta_step(h, state, jax.random.fold_in(train_key, i))
    history.append({"iteration": i, "valid_loss": float(value), "hypergrad_norm": float(norm),
                    "shift": shift, "seconds": time.time() - tick})
    print(f"meta-iteration {i}: validation loss {float(value):.4f}, hypergradient norm "
          f"{float(norm):.3g}, shift {shift:.3f} px ({time.time() - tick:.1f} s)", flush=True)

  learned = jax.tree.map(np.asarray, coefficients(h, basis))
  tick = time.time()
  no_augmentation = dict(learned, shift=np.float32(0))
  all_scores = {
      "learned": evaluate(learned, keys),
      "learned_schedules_without_augmentation": evaluate(no_augmentation, keys),
      "optax_adamw_defaults": (grid_scores[OPTAX_DEFAULTS["learning_rate"]]
                               if OPTAX_DEFAULTS["learning_rate"] in grid_scores
                               else evaluate(defaults, keys)),
      f"best_constant_lr_{best:g}": grid_scores[best],
  }
  comparison = {name: {k: common.mean_sd(s[k]) for k in ("test_error", "valid_error",
                                                        "test_loss")}
                for name, s in all_scores.items()}
  for name, stats in comparison.items():
    print(f"{name}: test error "
          f"{common.format_mean_sd(stats['test_error'], 100, 2, '%')} over {c.eval_seeds} "
          f"seeds", flush=True)
  print(f"held-out evaluation took {grid_seconds + time.time() - tick:.0f} s", flush=True)

  schedules = {name: {k: np.asarray(v).tolist() for k, v in learned[name].items()}
               for name in ("learning_rate", "weight_decay")}
  results = {
      "data": data_note,
      "layers": layers.names,
      "num_hyperparameters": int(sum(np.size(x) for x in jax.tree.leaves(h))),
      "history": history,
      "meta_training_start_lr": start_lr,
      "learned": {"shift_pixels": float(learned["shift"]), **schedules,
                  "knots": jax.tree.map(lambda x: np.asarray(x).tolist(), h)},
      "grid_valid_error": {f"{lr:g}": float(jnp.mean(s["valid_error"]))
                           for lr, s in grid_scores.items()},
      "comparison": comparison,
      "wall_time_s": time.time() - start,
  }
  common.write_results(out_dir, "learned AdamW schedules and augmentation, BatchNorm convnet",
                       c, results, DEPARTURES)

  common.save_figure(plot_schedules(layers.names, schedules["learning_rate"], "learning rate",
                                    "Learned AdamW learning rates per layer"), out_dir,
                     "learning_rates.png")
  common.save_figure(plot_schedules(layers.names, schedules["weight_decay"], "weight decay",
                                    "Learned AdamW weight decays per layer"), out_dir,
                     "weight_decays.png")
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  ax.plot([r["valid_loss"] for r in history], marker="o", label="validation loss")
  ax.set(xlabel="meta-iteration (a fresh seed each)", ylabel="validation loss after training",
         title="Meta-learning curve")
  twin = ax.twinx()
  twin.plot([r["shift"] for r in history], color="tab:orange", label="shift sd (px)")
  twin.set_ylabel("augmentation shift sd (pixels)")
  fig.legend(fontsize=8, loc="upper right")
  common.save_figure(fig, out_dir, "meta_learning_curve.png")
  fig, ax = plt.subplots(figsize=(7.2, 4.2))
  labels = list(comparison)
  means = [100 * comparison[k]["test_error"]["mean"] for k in labels]
  sds = [100 * comparison[k]["test_error"]["sd"] for k in labels]
  ax.bar(range(len(labels)), means, yerr=sds, capsize=6,
         color=["tab:blue", "tab:cyan", "0.6", "tab:orange"])
  ax.set_xticks(range(len(labels)), [k.replace("_", " ") for k in labels], fontsize=7,
                rotation=12)
  ax.set(ylabel="test error (%)",
         title=f"Test error, mean ± sd over {c.eval_seeds} fresh seeds")
  common.save_figure(fig, out_dir, "test_error.png")
  print(f"wrote {out_dir}/results.json and figures in {time.time() - start:.0f} s")


if __name__ == "__main__":
  app.run(main)
