"""Learned AdamW schedules for a tanh MLP on MNIST, against optax's defaults and a tuned rate.

A 784-50-50-50-10 tanh network is trained by T = 100 steps of AdamW (batch 200), and
meta-optimisation learns, with exact hypergradients from Adam's training run backwards
(``revhyper.adam``),

* a learning-rate schedule per weight type and step: log lr, [T] for each of the 8 leaves
  (W and b of 4 layers), starting at the best constant rate of the baseline's grid
  (``config.warm_start``; at optax's lr = 1e-3 without it);
* a weight-decay schedule laid out the same way: log wd, starting at wd = 1e-4;
* b1 and b2 (one each, through logits), starting at optax's 0.9 and 0.999;

1602 hyperparameters in all. The meta-objective is the validation loss after training. Each
meta-iteration draws fresh initial weights and a fresh minibatch order (the iteration's seed),
so the schedules are learned for the distribution of runs, not for one. The learned settings
are then evaluated on fresh seeds never used in meta-training, against ``optax.adamw`` with its
defaults (lr 1e-3, b1 0.9, b2 0.999, wd 1e-4) and against the best constant learning rate of a
small grid (chosen by mean validation error, reported on the test set): test error, mean and
standard deviation over the seeds. Every contender trains with ``eps_root = 1e-8`` instead of
optax's 0: the first layer's weights on pixels that are zero in every training digit keep
``nu = 0``, where the square root's derivative would make the hypergradient NaN.

Data: the 10,000 bundled MNIST digits, split 5000 train / 2500 valid / 2500 test
(``config.split``; ``config.mnist_dir`` for the full IDX files, split 10k / 10k / 10k). Inputs
are scaled to [0, 1] and centred. Settings: ``experiments/configs/adam_schedules.py``, presets
"paper" (the settings above) and "quick"; ``--config.<field>=value`` overrides one field.

Outputs in ``--out_dir``: ``results.json`` (the shared schema of experiments/common.py: commit,
JAX version, backend, config, departures; then the meta-loss history, learned schedules,
per-seed test errors of every contender and their mean and sd, wall time) and the figures
``learning_rates.png``, ``weight_decays.png``, ``meta_learning_curve.png`` and
``test_error.png``.

Run from the repository root::

  python experiments/adam_schedules.py --out_dir results/adam_schedules   # ~3 min, 2 CPU cores
  python experiments/adam_schedules.py --config=experiments/configs/adam_schedules.py:quick \
      --out_dir /tmp/adam_schedules_quick                                 # under 40 CPU-seconds
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

CONFIG = common.define_config("adam_schedules")
common.define_out_dir("results/adam_schedules")

FLAGS = flags.FLAGS
# The split where config.split is empty: the bundled digits', or full MNIST's (config.mnist_dir).
BUNDLED_SPLIT = (5000, 2500, 2500)
IDX_SPLIT = (10000, 10000, 10000)
OPTAX_DEFAULTS = dict(learning_rate=1e-3, b1=0.9, b2=0.999, weight_decay=1e-4)
# Not a figure of the paper: these say how the contenders differ from plain optax.adamw.
DEPARTURES = (
    "Every contender trains with eps_root = 1e-8 instead of optax's 0, so that weights whose "
    "gradient is always zero (nu = 0) do not make the hypergradient NaN.",
    "Learned b1, b2 and 1 - lr * wd are clipped below at config.min_decay, the bound the "
    "reversible method sizes its bit stack for; learning rates at 0.1, weight decays at 1.",
)
EPS_ROOT = 1e-8  # see the module docstring
# Learning rates and weight decays are clipped here, so that lr * wd <= 0.1 stays far inside
# the bound that sizes the weights' bit stack (1 - lr * wd >= min_decay).
MAX_LEARNING_RATE, MAX_WEIGHT_DECAY = 0.1, 1.0


def leaf_names(params):
  """'W1', 'b1', 'W2', ... in the order of the parameters' leaves (layers counted from 1)."""
  return [f"{path[1].key}{path[0].idx + 1}"
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def coefficients(h, min_decay):
  """The AdamW coefficients the hyperparameters stand for, clipped to their bounds."""
  return dict(
      learning_rate=jax.tree.map(lambda x: jnp.minimum(jnp.exp(x), MAX_LEARNING_RATE),
                                 h["log_learning_rate"]),
      weight_decay=jax.tree.map(lambda x: jnp.minimum(jnp.exp(x), MAX_WEIGHT_DECAY),
                                h["log_weight_decay"]),
      b1=jnp.clip(jax.nn.sigmoid(h["logit_b1"]), min_decay, 1.0),
      b2=jnp.clip(jax.nn.sigmoid(h["logit_b2"]), min_decay, 1.0))


def make_problem(data, layer_sizes, num_steps, batch_size, method):
  """``train(coefs, seed) -> params`` with revhyper.adam and the losses and errors after it."""
  (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = data
  num_train = int(x_train.shape[0])
  # Each layer starts at scale 1 / sqrt(fan in); the seed draws the noise.
  log_scales = [{"W": jnp.float32(-0.5 * np.log(n)), "b": jnp.float32(-0.5 * np.log(n))}
                for n in layer_sizes[:-1]]

  def loss(params, x, y):
    return revhyper.models.softmax_cross_entropy(revhyper.models.mlp_apply(params, x), y)

  def train(coefs, seed, method=method):
    noise_key, batch_key = jax.random.split(jax.random.key(seed))
    noise = revhyper.models.mlp_noise(noise_key, layer_sizes)
    params = revhyper.models.mlp_init_from_noise(noise, log_scales)

    def batch_loss(w, _, t):
      idx = revhyper.datasets.batch_indices(batch_key, t, num_train, batch_size)
      return loss(w, x_train[idx], y_train[idx])

    return revhyper.adam(batch_loss, params, None, num_steps=num_steps, method=method,
                         eps_root=EPS_ROOT, **coefs).params

  def scores(params):
    out = {}
    for name, x, y in (("valid", x_valid, y_valid), ("test", x_test, y_test)):
      logits = revhyper.models.mlp_apply(params, x)
      out[f"{name}_loss"] = revhyper.models.softmax_cross_entropy(logits, y)
      out[f"{name}_error"] = revhyper.models.error_rate(logits, y)
    return out

  def meta_loss(h, seed, min_decay):
    return scores(train(coefficients(h, min_decay), seed))["valid_loss"]

  @jax.jit
  def evaluate(coefs, seeds):
    # Forward only, in floats: the exact method would give the same training run.
    return jax.vmap(lambda s: scores(train(coefs, s, "unroll")))(seeds)

  return meta_loss, evaluate


def initial_hparams(params_like, num_steps, learning_rate=OPTAX_DEFAULTS["learning_rate"]):
  const = lambda v: jax.tree.map(lambda _: jnp.full((num_steps,), v, jnp.float32), params_like)
  logit = lambda p: jnp.float32(np.log(p / (1 - p)))
  return {"log_learning_rate": const(np.log(learning_rate)),
          "log_weight_decay": const(np.log(OPTAX_DEFAULTS["weight_decay"])),
          "logit_b1": logit(OPTAX_DEFAULTS["b1"]), "logit_b2": logit(OPTAX_DEFAULTS["b2"])}


def summary(errors):
  errors = np.asarray(errors, np.float64)
  return {"per_seed": errors.tolist(), "mean": float(errors.mean()),
          "sd": float(errors.std(ddof=1)) if errors.size > 1 else 0.0}


def plot_schedules(names, schedules, ylabel, title):
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  colours = plt.cm.viridis(np.linspace(0, 0.9, len(names) // 2))
  for i, name in enumerate(names):
    ax.plot(schedules[name], color=colours[i // 2], linestyle="-" if name[0] == "W" else "--",
            label=name)
  ax.set(yscale="log", xlabel="training step", ylabel=ylabel, title=title)
  ax.legend(fontsize=8, ncol=2)
  return fig


def main(argv):
  del argv
  start = time.time()
  # A copy, so that the split resolved below is what results.json's config records.
  c = CONFIG.value.copy_and_resolve_references()
  if c.method not in ("reversible", "unroll", "checkpoint"):
    raise app.UsageError(f"config.method must be reversible, unroll or checkpoint, got "
                         f"{c.method!r}")
  if not c.split:
    c.split = IDX_SPLIT if c.mnist_dir else BUNDLED_SPLIT
  layer_sizes, split = tuple(c.layer_sizes), tuple(c.split)
  num_steps, batch_size = c.num_steps, c.batch_size
  out_dir = common.prepare_out_dir(FLAGS.out_dir)
  data, data_note = common.load_mnist_splits(c.mnist_dir, split, c.seed,
                                             ("train", "valid", "test"))
  method = revhyper.Reversible(min_momentum=c.min_decay) if c.method == "reversible" else c.method
  meta_loss, evaluate = make_problem(data, layer_sizes, num_steps, batch_size, method)
  names = leaf_names(revhyper.models.mlp_noise(jax.random.key(0), layer_sizes))

  # The baseline's grid first: with warm_start, meta-training starts from its best rate.
  seeds = jnp.arange(c.eval_seeds, dtype=jnp.int32) + 10_000
  grid = [float(v) for v in c.grid]
  grid_scores = {}
  for lr in grid:
    coefs = dict(OPTAX_DEFAULTS, learning_rate=lr)
    grid_scores[lr] = evaluate({k: jnp.float32(v) for k, v in coefs.items()}, seeds)
  best = min(grid, key=lambda lr: float(jnp.mean(grid_scores[lr]["valid_error"])))
  start_lr = best if c.warm_start else OPTAX_DEFAULTS["learning_rate"]
  print(f"best constant rate of the grid {best:g}; meta-training starts at {start_lr:g}",
        flush=True)
  h = initial_hparams(revhyper.models.mlp_noise(jax.random.key(0), layer_sizes), num_steps,
                      start_lr)
  optimizer = optax.adam(c.meta_step)
  state = optimizer.init(h)

  @jax.jit
  def meta_step(h, state, seed):
    value, grad = jax.value_and_grad(meta_loss)(h, seed, c.min_decay)
    updates, state = optimizer.update(grad, state, h)
    return optax.apply_updates(h, updates), state, value, optax.global_norm(grad)

  history = []
  for i in range(c.meta_iterations):
    tick = time.time()
    h, state, value, norm = meta_step(h, state, jnp.int32(1 + i))
    history.append({"iteration": i, "valid_loss": float(value), "hypergrad_norm": float(norm),
                    "seconds": time.time() - tick})
    print(f"meta-iteration {i}: validation loss {float(value):.4f}, hypergradient norm "
          f"{float(norm):.3g} ({time.time() - tick:.1f} s)", flush=True)

  learned = coefficients(h, c.min_decay)
  contenders = {"learned": learned,
                "optax_adamw_defaults": {k: jnp.float32(v) for k, v in OPTAX_DEFAULTS.items()}}
  results_scores = {name: evaluate(coefs, seeds) for name, coefs in contenders.items()}
  results_scores[f"best_constant_lr_{best:g}"] = grid_scores[best]
  comparison = {name: {"test_error": summary(s["test_error"]),
                       "valid_error": summary(s["valid_error"])}
                for name, s in results_scores.items()}
  for name, stats in comparison.items():
    print(f"{name}: test error {100 * stats['test_error']['mean']:.2f}% +- "
          f"{100 * stats['test_error']['sd']:.2f}% over {seeds.size} seeds", flush=True)

  schedules = {k: dict(zip(names, (np.asarray(x).tolist() for x in jax.tree.leaves(learned[k]))))
               for k in ("learning_rate", "weight_decay")}
  results = {
      "data": data_note,
      "history": history,
      "learned": {"b1": float(learned["b1"]), "b2": float(learned["b2"]), **schedules},
      "grid_valid_error": {f"{lr:g}": float(jnp.mean(s["valid_error"]))
                           for lr, s in grid_scores.items()},
      "meta_training_start_learning_rate": start_lr,
      "comparison": comparison,
      "wall_time_s": time.time() - start,
  }
  common.write_results(out_dir, "learned AdamW schedules", c, results, DEPARTURES)

  common.save_figure(plot_schedules(names, schedules["learning_rate"], "learning rate",
                                    "Learned AdamW learning rates per layer"), out_dir,
                     "learning_rates.png")
  common.save_figure(plot_schedules(names, schedules["weight_decay"], "weight decay",
                                    "Learned AdamW weight decays per layer"), out_dir,
                     "weight_decays.png")
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  ax.plot([r["valid_loss"] for r in history], marker="o")
  ax.set(xlabel="meta-iteration (a fresh seed each)", ylabel="validation loss after training",
         title="Meta-learning curve")
  common.save_figure(fig, out_dir, "meta_learning_curve.png")
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  labels = list(comparison)
  means = [100 * comparison[k]["test_error"]["mean"] for k in labels]
  sds = [100 * comparison[k]["test_error"]["sd"] for k in labels]
  ax.bar(range(len(labels)), means, yerr=sds, capsize=6, color=["tab:blue", "0.6", "tab:orange"])
  ax.set_xticks(range(len(labels)), labels, fontsize=8)
  ax.set(ylabel="test error (%)", title=f"Test error, mean +- sd over {seeds.size} fresh seeds")
  common.save_figure(fig, out_dir, "test_error.png")
  print(f"wrote {out_dir}/results.json and figures in {time.time() - start:.0f} s")


if __name__ == "__main__":
  app.run(main)
