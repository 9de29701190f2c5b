"""Learning how ten tasks share their weights: task-mixing matrices per layer, figure 10.

Reproduces figure 10 of Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter
Optimization through Reversible Learning" (ICML 2015), with the settings of the authors' code
(HIPS/hypergrad, experiments/Feb_4_augmented_omniglot/2_rotated_90): ten classification tasks
(5 alphabets and their 90-degree rotations), one tanh network per task. Task k's layer-l
weights (and biases) are a learned mixture of free weights, ``theta_{l,k} = sum_j T_l[k, j]
z_{l,j}``, with an L2 penalty exp(-4) ||z||^2 on the free ones; the mixing matrices T_l, one
10x10 per layer (300 numbers), are the hyperparameters, tuned on the tasks' validation NLL
with exact hypergradients from training run backwards. T_l = I keeps the tasks separate; a
row of 1/10 makes every task use the mean of the free weights.

Settings (the authors' code): T = 50 full-batch steps, alpha = 1, gamma = 0.9; training loss:
the sum over tasks of each task's mean cross-entropy, plus the penalty; z0 = e^-2 N(0, 1),
drawn anew at every meta-iteration; every meta-iteration also redraws which drawings of the
training pool are training and which validation (10 and 2 per character); meta-objective: the
validation NLL averaged over tasks; plain gradient descent with step 0.2, 20 iterations, from
T_l = 0.5 I + 0.5 / 10 on every layer (the stand-in below uses step 5: at 0.2 its mixing
does not move). Baselines, as the paper's: separate nets (T = I) and
tied (the first layer shared by all tasks, T_1 = 1/10 everywhere, the other layers separate);
here each baseline's L2 is tuned (the best of a grid by validation NLL), so the learned
mixing has to beat tuned baselines, not untuned ones.

Held-out evaluation, for each of separate, tied and learned: ``config.eval_seeds`` (20) fresh
initial draws (and train/valid redraws), none seen in meta-training, give the validation NLL
(mean ± sd); the same seeds trained on the whole training pool give the test NLL and error on
test drawings never used in meta-training.

Data. With ``config.omniglot_dir`` (the standard Omniglot archives): the paper's setup, 5
alphabets and their rotations, drawings per character split 10 / 2 / 3 (train, valid, test),
784-400-200-C networks with C the most characters of one alphabet (55 in the paper). Without
it, a clearly labelled stand-in built from the bundled MNIST digits: 5 "alphabets" of 4
digits each, the overlapping groups {0,1,2,3}, {2,3,4,5}, {4,5,6,7}, {6,7,8,9}, {8,9,0,1}
(labels 0-3 in that order; no image in two groups), plus their 90-degree rotations: 10 tasks
of 4 classes, 25 / 5 / 50 digits per class and task, and smaller 784-100-50-4 networks so that
a run takes minutes on 2 CPU cores. Inputs are scaled to [0, 1] and centred with the mean of
the training pools.

Outputs in ``--out_dir``: ``results.json`` (the shared schema: commit, JAX version, backend,
config, departures; then the meta-loss history, the baselines' L2 search, validation and test
NLL and error of separate / tied / learned as mean ± sd over held-out seeds, the learned
mixing matrices), ``coupling.png`` (the task correlations T_l T_l^T of the learned mixing per
layer, like the paper's figure) and ``comparison.png`` (validation and test NLL, mean ± sd).

Run from the repository root::

  python experiments/multitask.py --out_dir results/multitask             # MNIST stand-in
  python experiments/multitask.py --config.omniglot_dir=$HOME/data/omniglot \\
      --out_dir results/multitask_omniglot
  python experiments/multitask.py --config=experiments/configs/multitask.py:quick \\
      --out_dir /tmp/multitask_quick                                       # under 80 CPU-seconds
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

CONFIG = common.define_config("multitask")
common.define_out_dir("results/multitask")

FLAGS = flags.FLAGS
NUM_ALPHABETS = 5  # the paper's 5 alphabets, each also rotated: 10 tasks
SIDE = 28
OMNIGLOT_HIDDEN = (400, 200)  # the paper's 784-400-200-55
# The MNIST stand-in's "alphabets": overlapping groups of 4 digits.
DIGIT_GROUPS = ((0, 1, 2, 3), (2, 3, 4, 5), (4, 5, 6, 7), (6, 7, 8, 9), (8, 9, 0, 1))


def rotate(images):
  """Rotates flat 28x28 images by 90 degrees (counter-clockwise); any leading axes."""
  shape = images.shape
  square = images.reshape(shape[:-1] + (SIDE, SIDE))
  return np.rot90(square, k=1, axes=(-2, -1)).reshape(shape)


def mnist_tasks(per_class, seed):
  """The stand-in: 5 groups of 4 digits; per group ``(pool [4, P, 784], test [4, Q, 784])``."""
  images, labels = revhyper.datasets.load_mnist()
  rng = np.random.default_rng(seed)
  pools = {d: list(rng.permutation(np.flatnonzero(labels == d))) for d in range(10)}
  pool_size, test_size = per_class[0] + per_class[1], per_class[2]
  tasks, names = [], []
  for group in DIGIT_GROUPS:
    pool, test = [], []
    for digit in group:
      take = [pools[digit].pop() for _ in range(pool_size + test_size)]  # no image twice
      pool.append(images[take[:pool_size]])
      test.append(images[take[pool_size:]])
    tasks.append((np.stack(pool), np.stack(test)))
    names.append("digits " + "".join(str(d) for d in group))
  description = (
      "MNIST stand-in for Omniglot (no config.omniglot_dir): 10 tasks = 5 'alphabets' of 4 "
      "bundled MNIST digits each, the overlapping groups " + ", ".join(
          "{" + ",".join(map(str, g)) + "}" for g in DIGIT_GROUPS)
      + " (labels 0-3 in that order), and the same 5 tasks rotated by 90 degrees; "
      f"train/valid/test {tuple(per_class)} digits per class and task (train and valid "
      "redrawn from their pool every meta-iteration), no image in two groups. Images from the "
      "10,000 MNIST digits bundled with revhyper (revhyper.datasets.load_mnist()).")
  return tasks, names, description


def omniglot_tasks(c):
  """Omniglot alphabets; per alphabet ``(pool [C, P, 784], test [C, Q, 784])``."""
  per = tuple(c.omniglot_split)
  data = revhyper.datasets.load_omniglot(c.omniglot_dir, archives=tuple(c.omniglot_archives),
                                         alphabets=tuple(c.alphabets) or None)
  names = list(data)[:NUM_ALPHABETS] if not c.alphabets else list(c.alphabets)
  tasks = []
  for name in names:
    images, labels = data[name]
    chars = [images[labels == k] for k in np.unique(labels)]
    pool = np.stack([x[:per[0] + per[1]] for x in chars])
    test = np.stack([x[per[0] + per[1]:sum(per)] for x in chars])
    tasks.append((pool, test))
  description = (f"Omniglot from {c.omniglot_dir}: alphabets {names} and their 90-degree "
                 f"rotations (10 tasks); drawings per character train/valid/test {per}.")
  return tasks, names, description


def stack_tasks(tasks):
  """Pads the tasks to the most classes: pool [K, C, P, 784], test [K, C, Q, 784] (centred
  with the pools' mean) and the mask [K, C] of real classes."""
  num_classes = max(pool.shape[0] for pool, _ in tasks)
  mean = revhyper.datasets.pixel_mean(np.concatenate([p.reshape(-1, p.shape[-1])
                                                      for p, _ in tasks]))
  def centred(x):
    return revhyper.datasets.preprocess(x.reshape(-1, x.shape[-1]), mean).reshape(x.shape)

  pools, tests, masks = [], [], []
  for pool, test in tasks:
    pad = num_classes - pool.shape[0]
    pools.append(np.pad(centred(pool), ((0, pad), (0, 0), (0, 0))))
    tests.append(np.pad(centred(test), ((0, pad), (0, 0), (0, 0))))
    masks.append(np.arange(num_classes) < pool.shape[0])
  return (jnp.asarray(np.stack(pools), jnp.float32), jnp.asarray(np.stack(tests), jnp.float32),
          jnp.asarray(np.stack(masks), jnp.float32))


def flatten_split(x, mask):
  """[K, C, n, 784] -> (x [K, C*n, 784], labels [C*n], weights [K, C*n]): each task's real
  examples weigh 1 / (its number of real examples), so sums are per-task means."""
  k, num_classes, n, d = x.shape
  labels = jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), n)
  weights = jnp.repeat(mask, n, axis=1) / (n * jnp.sum(mask, axis=1, keepdims=True))
  return x.reshape(k, num_classes * n, d), labels, weights


def mixing(num_layers, num_tasks, sharing):
  """T_l = (1 - s_l) I + s_l / K per layer: [L, K, K]."""
  eye = np.eye(num_tasks, dtype=np.float32)
  full = np.full((num_tasks, num_tasks), 1.0 / num_tasks, np.float32)
  return jnp.asarray(np.stack([(1 - s) * eye + s * full for s in sharing]))


def make_problem(pool, test, mask, c, layer_sizes):
  """Returns ``(valid_nll, evaluate)``, functions of the mixing T [L, K, K] and a key.

  ``valid_nll(T, key, log_l2) -> (mean validation NLL over tasks, aux)``: a fresh z0 and a
  fresh train/valid split of the pools from the key. ``evaluate(T, keys, log_l2)`` (jitted,
  vmapped over keys): the validation NLL as above, and, trained on the whole pools from the
  same z0, test NLL and error per task.
  """
  num_tasks, _, pool_size, _ = pool.shape
  num_train = pool_size - (c.omniglot_split[1] if c.omniglot_dir else c.mnist_split[1])
  like = jax.vmap(lambda k: revhyper.models.mlp_init(k, layer_sizes, 1.0))(
      jax.random.split(jax.random.key(0), num_tasks))

  def mix(t_matrices, z):
    return [jax.tree.map(lambda leaf, t=t: jnp.einsum("kj,j...->k...", t, leaf), layer)
            for t, layer in zip(t_matrices, z)]

  def task_scores(params, x, labels, weights):
    logits = jax.vmap(revhyper.models.mlp_apply)(params, x)  # [K, n, C]
    log_p = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_p, labels[None, :, None], axis=-1)[..., 0]
    wrong = (jnp.argmax(logits, axis=-1) != labels[None]).astype(jnp.float32)
    return -jnp.sum(weights * picked, axis=-1), jnp.sum(weights * wrong, axis=-1)

  def initial_z(key):
    leaves, tree = jax.tree.flatten(like)
    scale = float(np.exp(c.log_init_scale))
    return jax.tree.unflatten(tree, [scale * jax.random.normal(k, w.shape, w.dtype)
                                     for k, w in zip(jax.random.split(key, len(leaves)), leaves)])

  def train(t_matrices, z0, split, log_l2, method="reversible"):
    def train_loss(z, hp, t):
      del t  # full batch
      t_matrices, (x, labels, weights), log_l2 = hp
      nll, _ = task_scores(mix(t_matrices, z), x, labels, weights)
      return jnp.sum(nll) + jnp.exp(log_l2) * sum(jnp.sum(w ** 2) for w in jax.tree.leaves(z))
    # Python-float alpha and gamma: the bit stack is sized from gamma, no min_momentum.
    z = revhyper.sgd(train_loss, z0, (t_matrices, split, log_l2), num_steps=c.num_steps,
                     learning_rate=c.learning_rate, momentum=c.momentum, method=method).params
    return mix(t_matrices, z)

  def redraw(key):
    """A fresh train/valid split of every class's pool."""
    order = jnp.argsort(jax.random.uniform(key, pool.shape[:3]), axis=-1)
    shuffled = jnp.take_along_axis(pool, order[..., None], axis=2)
    return (flatten_split(shuffled[:, :, :num_train], mask),
            flatten_split(shuffled[:, :, num_train:], mask))

  def valid_nll(t_matrices, key, log_l2, method="reversible"):
    init_key, split_key = jax.random.split(key)
    train_split, valid_split = redraw(split_key)
    params = train(t_matrices, initial_z(init_key), train_split, log_l2, method)
    nll, err = task_scores(params, *valid_split)
    return jnp.mean(nll), {"valid_error": jnp.mean(err),
                           "train_nll": jnp.mean(task_scores(params, *train_split)[0])}

  def evaluate_one(t_matrices, key, log_l2):
    # Nothing is differentiated here: the plain float method, cheaper to compile and run.
    valid, aux = valid_nll(t_matrices, key, log_l2, "unroll")
    init_key, _ = jax.random.split(key)
    params = train(t_matrices, initial_z(init_key), flatten_split(pool, mask), log_l2,
                   "unroll")
    nll, err = task_scores(params, *flatten_split(test, mask))
    return {"valid_nll": valid, "valid_error": aux["valid_error"], "test_nll": jnp.mean(nll),
            "test_error": jnp.mean(err), "test_nll_per_task": nll}

  evaluate = jax.jit(jax.vmap(evaluate_one, in_axes=(None, 0, None)))
  return valid_nll, evaluate


def correlations(t_matrices):
  """corr(T_l T_l^T) per layer: how alike two tasks' weights are under the mixing."""
  cov = np.einsum("lij,lkj->lik", t_matrices, t_matrices)
  sd = np.sqrt(np.einsum("lii->li", cov))
  return cov / (sd[:, :, None] * sd[:, None, :])


def plot_coupling(corr, task_names):
  """Task correlations of the learned mixing, one panel per layer (figure 10)."""
  num_layers = corr.shape[0]
  fig, axes = plt.subplots(1, num_layers, figsize=(4.0 * num_layers + 1.0, 4.6))
  fig.subplots_adjust(left=0.04, right=0.86, bottom=0.2, top=0.84, wspace=0.25)
  titles = ["input weights", "middle weights", "output weights"] if num_layers == 3 else [
      f"layer {l + 1}" for l in range(num_layers)]
  k = corr.shape[-1]
  for l, ax in enumerate(np.atleast_1d(axes)):
    im = ax.imshow(corr[l], cmap="binary", vmin=0.0, vmax=1.0)
    ax.set_title(titles[l])
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.axhline(k / 2 - 0.5, color="C3", lw=0.6)
    ax.axvline(k / 2 - 0.5, color="C3", lw=0.6)
  cax = fig.add_axes([0.885, 0.25, 0.015, 0.55])
  fig.colorbar(im, cax=cax, label="correlation of the tasks' weights")
  half = (len(task_names) + 1) // 2
  legend = ["; ".join(f"{i}: {n}" for i, n in enumerate(task_names) if i < half),
            "; ".join(f"{i}: {n}" for i, n in enumerate(task_names) if i >= half)]
  fig.text(0.45, 0.04, "tasks " + "\n".join(legend), fontsize=8, ha="center")
  return fig


def plot_comparison(held_out):
  """Validation and test NLL of separate / tied / learned, mean ± sd over held-out seeds."""
  names = ("separate", "tied", "learned")
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
  for ax, metric in zip(axes, ("valid_nll", "test_nll")):
    means = [held_out[n][metric]["mean"] for n in names]
    sds = [held_out[n][metric]["sd"] for n in names]
    ax.bar(names, means, yerr=sds, capsize=4, color=["C3", "C2", "C0"])
    low = min(m - s for m, s in zip(means, sds))
    ax.set_ylim(0.9 * low, None)
    n = held_out["learned"][metric]["n"]
    ax.set_title(f"{'validation' if metric == 'valid_nll' else 'test'} NLL "
                 f"(mean ± sd, {n} held-out seeds)")
    ax.grid(alpha=0.3, axis="y")
  return fig


def main(argv):
  del argv
  start = time.time()
  c = CONFIG.value
  out_dir = common.prepare_out_dir(FLAGS.out_dir)
  if c.omniglot_dir:
    tasks, names, description = omniglot_tasks(c)
    hidden = OMNIGLOT_HIDDEN if tuple(c.hidden) == (100, 50) else tuple(c.hidden)
  else:
    tasks, names, description = mnist_tasks(tuple(c.mnist_split), c.seed)
    hidden = tuple(c.hidden)
  tasks = tasks + [(rotate(pool), rotate(test)) for pool, test in tasks]
  names = names + [n + " (rotated)" for n in names]
  pool, test, mask = stack_tasks(tasks)
  num_tasks, num_classes = mask.shape
  layer_sizes = (SIDE * SIDE,) + hidden + (num_classes,)
  num_layers = len(layer_sizes) - 1
  logging.info("Data: %s", description)
  logging.info("Config:\n%s", c)
  departures = [] if c.omniglot_dir else [
      "MNIST stand-in for Omniglot (5 groups of 4 digits and their rotations) and "
      f"{layer_sizes} networks instead of 784-400-200-55."]
  if c.meta_step != 0.2:
    departures.append(f"Meta-step {c.meta_step} instead of the authors' 0.2 (on the MNIST "
                      "stand-in the hypergradient's norm is 0.05-0.15 over 300 entries, and "
                      "0.2 leaves the mixing where it started).")
  departures += [
      "Both baselines get their L2 tuned on a grid by validation NLL; the paper's code uses "
      "exp(-4) for all three.",
      "Random draws (z0, train/valid splits) come from JAX's generator."]

  valid_nll, evaluate = make_problem(pool, test, mask, c, layer_sizes)
  train_key = common.meta_training_key(c.seed)
  result = revhyper.meta.meta_optimize(
      lambda t, key: valid_nll(t, key, c.log_l2),
      mixing(num_layers, num_tasks, [c.initial_sharing] * num_layers),
      num_iterations=c.meta_iterations, optimizer=optax.sgd(c.meta_step), has_aux=True,
      key=train_key)

  eval_keys = common.held_out_keys(c.seed, c.eval_seeds)

  def scores(t_matrices, log_l2):
    per_seed = jax.device_get(evaluate(t_matrices, eval_keys, jnp.float32(log_l2)))
    per_task = np.asarray(per_seed.pop("test_nll_per_task")).mean(axis=0)
    return dict(common.summarise_seeds(per_seed), test_nll_per_task=per_task, log_l2=log_l2)

  baselines = {"separate": mixing(num_layers, num_tasks, [0.0] * num_layers),
               "tied": mixing(num_layers, num_tasks, [1.0] + [0.0] * (num_layers - 1))}
  search, held_out = {}, {}
  for name, t_matrices in baselines.items():
    # Tuned on the held-out seeds' validation NLL, never on the test split.
    search[name] = [dict(log_l2=v, valid_nll=scores(t_matrices, v)["valid_nll"]["mean"])
                    for v in c.baseline_log_l2_grid]
    best = min(search[name], key=lambda r: r["valid_nll"])["log_l2"]
    held_out[name] = scores(t_matrices, best)
  held_out["learned"] = scores(result.hparams, c.log_l2)
  held_out["initial"] = scores(
      mixing(num_layers, num_tasks, [c.initial_sharing] * num_layers), c.log_l2)
  for name, r in held_out.items():
    logging.info("%s (log L2 %g): validation NLL %s, test NLL %s, test error %s", name,
                 r["log_l2"], common.format_mean_sd(r["valid_nll"]),
                 common.format_mean_sd(r["test_nll"]),
                 common.format_mean_sd(r["test_error"], 100, 2, "%"))

  t_learned = np.asarray(result.hparams)
  corr = correlations(t_learned)
  results = dict(
      data=description, substitute=not c.omniglot_dir, task_names=names,
      layer_sizes=layer_sizes, meta_objective="validation NLL, mean over tasks",
      # meta_loss[i]: the validation NLL of meta-iteration i's own draw, before update i.
      meta_loss=[r["meta_loss"] for r in result.history], history=result.history,
      held_out=held_out, baseline_l2_search=search,
      test_nll={n: held_out[n]["test_nll"]["mean"] for n in ("separate", "tied", "learned")},
      learned_mixing=t_learned, learned_correlations=corr, wall_seconds=time.time() - start)
  common.write_results(out_dir, "multitask mixing (figure 10)", c, results, departures)
  fig = plot_coupling(corr, names)
  data_title = ("MNIST stand-in for Omniglot: 5 digit groups + their rotations"
                if not c.omniglot_dir else "Omniglot: 5 alphabets + their rotations")
  fig.suptitle(f"Learned task sharing per layer ({data_title})\ntest NLL (held-out mean): "
               + ", ".join(f"{n} {held_out[n]['test_nll']['mean']:.3f}"
                           for n in ("separate", "tied", "learned")))
  common.save_figure(fig, out_dir, "coupling.png")
  common.save_figure(plot_comparison(held_out), out_dir, "comparison.png")
  logging.info("Wrote %s (%.1f s)", out_dir, time.time() - start)


if __name__ == "__main__":
  app.run(main)
