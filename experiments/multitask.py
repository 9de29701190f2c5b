"""Learning how strongly ten tasks share their weights: task-coupling matrices, figure 10.

Reproduces figure 10 of Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter
Optimization through Reversible Learning" (ICML 2015): ten classification tasks, one tanh
network per task, trained together under an L2 penalty that couples the tasks' weights layer
by layer. The coupling strengths, one 10x10 matrix per layer, are hyperparameters, tuned on
the tasks' validation NLL with exact hypergradients from training run backwards. Test NLL is
reported for separate networks (no coupling), tied ones (one uniform coupling, where the
learned run starts) and the learned coupling.

The penalty (our form; the paper describes a learned regulariser coupling the tasks' weights
per layer). For layer l, with theta_{l,i} the weights and biases of task i's layer l:

    penalty_l = sum_i lambda_{l,i} ||theta_{l,i}||^2
              + sum_{i<j} c_{l,ij} ||theta_{l,i} - theta_{l,j}||^2

with lambda_{l,i} = exp(H_l[i, i]) (each task's own L2) and c_{l,ij} = exp((H_l[i, j] +
H_l[j, i]) / 2) (the coupling of tasks i and j). The hyperparameters are the three 10x10 log
matrices H_l (300 numbers). The penalty equals sum over weight positions of theta^T (diag
lambda + Laplacian(c)) theta, so it is computed from the 10x10 Gram matrix of the tasks'
weights. Separate: c = 0; tied: every c_{l,ij} equal, the best of a grid of log couplings
(``--tied_grid``) by validation NLL; both with lambda = exp(--log_l2). The learned run starts
from the tied setting, so it has to beat the best uniform coupling, not a poor one.

Settings (the paper's, DESIGN.md section 4): T = 50 steps, full batch, alpha = 1, gamma = 0.9;
training loss: the sum over tasks of each task's mean cross-entropy, plus the penalty;
weights start as independent N(0, e^-3) draws per task; meta-objective: the validation NLL
summed over every example of every task (the mean's gradient is about 1e-3 on the log
matrices, too small for the step below); meta-optimiser: plain gradient descent
(``optax.sgd``) with step 0.2 on the log matrices H, 20 iterations.

Data. With ``--omniglot_dir`` (the standard Omniglot archives): the paper's setup, 5 alphabets
(``--alphabets``, default the first 5 of images_background) and their 90-degree rotations,
the drawings of each character split between train, valid and test, and the paper's
784-400-200-C networks (C, the most characters in one of the alphabets, is 55 in the paper).
Without it, a clearly labelled substitute built from the bundled MNIST digits, which are what
this repository ships: 5 "alphabets" of 4 digits each, the
overlapping groups {0,1,2,3}, {2,3,4,5}, {4,5,6,7}, {6,7,8,9}, {8,9,0,1} (labels 0-3 in that
order; neighbouring groups share two digits, not their labels; no image is in two of the
five groups), plus their 90-degree rotations: 10 tasks of 4 classes. Each task has few
training examples (``--train_per_class``, default 20) so that sharing can help. The networks
are reduced to 784-100-50-4 so that a run takes minutes on 2 CPU cores (``--layer_sizes``).
The rotated tasks hold the same images as the unrotated ones, rotated, as in the paper.

Outputs in ``--out_dir``: ``results.json`` (settings, data description, meta-loss history,
validation and test NLL and error per task for separate / tied / learned, the learned
coupling and L2 matrices) and ``coupling.png`` (the three learned coupling matrices, like the
paper), ``meta_learning_curve.png``.

Run from the repository root::

  python experiments/multitask.py --out_dir results/multitask          # MNIST substitute
  python experiments/multitask.py --omniglot_dir ~/data/omniglot --out_dir results/multitask
  python experiments/multitask.py --quick --out_dir results/multitask_quick
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

# Flags left at None take the default of the data set in use, or the --quick value.
flags.DEFINE_string("out_dir", "results/multitask", "Folder for results and figures.")
flags.DEFINE_bool("quick", False, "A small run that finishes in under a minute on 2 CPU cores.")
flags.DEFINE_integer("meta_iterations", None, "Meta-iterations (paper 20, quick 5).")
flags.DEFINE_integer("num_steps", None, "Training steps T (paper 50, quick 20).")
flags.DEFINE_list("layer_sizes", None,
                  "Widths of each task's net; default 784,H1,H2,C with C the most classes of "
                  "any task (55 with the paper's alphabets, 4 in the MNIST substitute) and "
                  "H1,H2 = 400,200 with Omniglot (the paper's), 100,50 for the MNIST "
                  "substitute (reduced for 2 CPU cores), 20,10 with --quick.")
flags.DEFINE_float("learning_rate", 1.0, "Training learning rate alpha (paper 1).")
flags.DEFINE_float("momentum", 0.9, "Training momentum gamma (paper 0.9).")
flags.DEFINE_float("meta_step", 0.2, "Step of the meta-level gradient descent (paper 0.2).")
flags.DEFINE_float("log_l2", -6.0, "Initial log L2 penalty of each task's own weights.")
flags.DEFINE_list("tied_grid", ["-10", "-9", "-8", "-7", "-6", "-5", "-4", "-3"],
                  "Log couplings tried for the tied baseline (one value: no search); the best "
                  "by validation NLL is the tied baseline and the learned run's start.")
flags.DEFINE_float("log_init_scale", -3.0, "Log standard deviation of the initial weights.")
flags.DEFINE_integer("train_per_class", None,
                     "MNIST substitute: training digits per class and task (default 20, quick 10).")
flags.DEFINE_integer("valid_per_class", None,
                     "MNIST substitute: validation digits per class and task (default 20, quick "
                     "10).")
flags.DEFINE_integer("test_per_class", None,
                     "MNIST substitute: test digits per class and task (default 100, quick 20).")
flags.DEFINE_string("omniglot_dir", None,
                    "Folder with the Omniglot archives; default: the MNIST substitute.")
flags.DEFINE_list("alphabets", None,
                  "Omniglot alphabets to use (default: the first 5 of the archives read).")
flags.DEFINE_list("omniglot_archives", ["images_background", "images_evaluation"],
                  "Omniglot archives to read.")
flags.DEFINE_list("omniglot_split", ["10", "5", "5"],
                  "Omniglot: drawings per character for train, valid, test (of 20).")
flags.DEFINE_integer("seed", 0, "Seed of the initial weights and of the data selection.")

FLAGS = flags.FLAGS

NUM_ALPHABETS = 5  # the paper's 5 alphabets, each also rotated: 10 tasks
SIDE = 28
# The MNIST substitute's "alphabets": overlapping groups of 4 digits.
DIGIT_GROUPS = ((0, 1, 2, 3), (2, 3, 4, 5), (4, 5, 6, 7), (6, 7, 8, 9), (8, 9, 0, 1))
DEFAULTS = dict(meta_iterations=20, num_steps=50, train_per_class=20, valid_per_class=20,
                test_per_class=100)
QUICK = dict(meta_iterations=5, num_steps=20, train_per_class=10, valid_per_class=10,
             test_per_class=20)
OMNIGLOT_HIDDEN = (400, 200)  # the paper's 784-400-200-55
MNIST_HIDDEN = (100, 50)  # reduced for 2 CPU cores
QUICK_HIDDEN = (20, 10)


def _setting(name):
  return common.setting(FLAGS, name, DEFAULTS, QUICK)


def default_layer_sizes(num_classes):
  if FLAGS.quick:
    hidden = QUICK_HIDDEN
  else:
    hidden = OMNIGLOT_HIDDEN if FLAGS.omniglot_dir else MNIST_HIDDEN
  return (SIDE * SIDE,) + hidden + (num_classes,)


def rotate(images):
  """Rotates flat 28x28 images by 90 degrees (counter-clockwise)."""
  return np.rot90(images.reshape(-1, SIDE, SIDE), k=1, axes=(1, 2)).reshape(-1, SIDE * SIDE)


def mnist_tasks(per_class, seed):
  """The substitute: 5 groups of 4 digits, each task's images disjoint from all others'."""
  images, labels = revhyper.datasets.load_mnist()
  rng = np.random.default_rng(seed)
  pools = {d: list(rng.permutation(np.flatnonzero(labels == d))) for d in range(10)}
  need = sum(per_class)
  tasks, names = [], []
  for group in DIGIT_GROUPS:
    splits = [([], []) for _ in per_class]
    for label, digit in enumerate(group):
      take = [pools[digit].pop() for _ in range(need)]  # pop: no image is used twice
      bounds = np.cumsum([0] + list(per_class))
      for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        splits[s][0].append(images[take[a:b]])
        splits[s][1].append(np.full(b - a, label, np.int32))
    tasks.append([(np.concatenate(x), np.concatenate(y)) for x, y in splits])
    names.append("digits " + "".join(str(d) for d in group))
  description = (
      "MNIST substitute for Omniglot (no --omniglot_dir): 10 tasks = 5 'alphabets' of 4 "
      "bundled MNIST digits each, the overlapping groups " + ", ".join(
          "{" + ",".join(map(str, g)) + "}" for g in DIGIT_GROUPS)
      + " (labels 0-3 in that order), and the same 5 tasks rotated by 90 degrees; "
      f"train/valid/test {per_class} digits per class and task, no image in two groups. "
      "Images from the 10,000 MNIST digits bundled with revhyper (revhyper.datasets.load_mnist()).")
  return tasks, names, description


def omniglot_tasks(folder, archives, alphabets, per_character):
  data = revhyper.datasets.load_omniglot(folder, archives=archives, alphabets=alphabets)
  names = list(data)[:NUM_ALPHABETS] if alphabets is None else list(alphabets)
  tasks = []
  bounds = np.cumsum([0] + list(per_character))
  for name in names:
    images, labels = data[name]
    splits = [([], []) for _ in per_character]
    for c in np.unique(labels):
      idx = np.flatnonzero(labels == c)
      for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        splits[s][0].append(images[idx[a:b]])
        splits[s][1].append(labels[idx[a:b]].astype(np.int32))
    tasks.append([(np.concatenate(x), np.concatenate(y)) for x, y in splits])
  description = (f"Omniglot from {folder}: alphabets {names} and their 90-degree rotations "
                 f"(10 tasks); drawings per character train/valid/test {per_character}.")
  return tasks, names, description


def add_rotations(tasks, names):
  """The paper's 10 tasks: each alphabet, then each alphabet rotated by 90 degrees."""
  rotated = [[(rotate(x), y) for x, y in task] for task in tasks]
  return tasks + rotated, names + [n + " (rotated)" for n in names]


def stack_splits(tasks):
  """Per split, x float32 [tasks, n, 784] centred with the train mean, y int32 [tasks, n].

  Tasks are padded to the same n with blank examples of weight zero, so that all tasks train
  in one vmapped call; returns (x, y, weight) per split, weight 1/n_k on task k's real
  examples.
  """
  mean = revhyper.datasets.pixel_mean(np.concatenate([t[0][0] for t in tasks]))
  out = []
  for s in range(3):
    n = max(t[s][0].shape[0] for t in tasks)
    xs, ys, ws = [], [], []
    for t in tasks:
      x, y = t[s]
      pad = n - x.shape[0]
      xs.append(np.concatenate([revhyper.datasets.preprocess(x, mean), np.zeros((pad, x.shape[1]),
                                                                       np.float32)]))
      ys.append(np.concatenate([y, np.zeros(pad, np.int32)]))
      ws.append(np.concatenate([np.full(x.shape[0], 1.0 / x.shape[0], np.float32),
                                np.zeros(pad, np.float32)]))
    out.append(tuple(jnp.asarray(np.stack(a)) for a in (xs, ys, ws)))
  return out


def coupling_from_log(h):
  """(lambda [L, K], c [L, K, K]) from the log matrices h [L, K, K]: diag -> own L2, rest ->
  symmetric coupling (zero diagonal)."""
  k = h.shape[-1]
  eye = jnp.eye(k, dtype=h.dtype)
  lam = jnp.exp(jnp.diagonal(h, axis1=-2, axis2=-1))
  c = jnp.exp(0.5 * (h + jnp.swapaxes(h, -1, -2))) * (1.0 - eye)
  return lam, c


def penalty(params, lam, c):
  """sum_l [sum_i lam_li |theta_li|^2 + sum_{i<j} c_lij |theta_li - theta_lj|^2]."""
  total = 0.0
  for l, layer in enumerate(params):
    # Gram matrix of the tasks' layer-l weights and biases: [K, K].
    gram = sum(jnp.einsum("i...,j...->ij", leaf, leaf) for leaf in jax.tree.leaves(layer))
    sq = jnp.diagonal(gram)
    # sum_{i<j} c_ij |a_i - a_j|^2 = 1/2 sum_ij c_ij (G_ii + G_jj - 2 G_ij), c symmetric.
    coupled = 0.5 * jnp.sum(c[l] * (sq[:, None] + sq[None, :] - 2.0 * gram))
    total = total + jnp.sum(lam[l] * sq) + coupled
  return total


def make_problem(data, layer_sizes, num_tasks, num_steps, learning_rate, momentum,
                 log_init_scale, seed):
  """Returns ``(meta_loss, evaluate)``: meta_loss of the log matrices, evaluate of (lam, c)."""
  train, valid, test = data
  keys = jax.random.split(jax.random.key(seed), num_tasks)
  scale = float(np.exp(log_init_scale))
  params0 = jax.vmap(lambda k: revhyper.models.mlp_init(k, layer_sizes, scale))(keys)

  def task_losses(params, split):
    x, y, w = split
    logits = jax.vmap(revhyper.models.mlp_apply)(params, x)  # [K, n, C]
    log_p = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_p, y[..., None], axis=-1)[..., 0]
    # Weighted by 1/n_k on real examples and 0 on padding: each task's mean NLL.
    nll = -jnp.sum(w * picked, axis=-1)
    wrong = (jnp.argmax(logits, axis=-1) != y).astype(jnp.float32)
    return nll, jnp.sum(w * wrong, axis=-1)

  def train_loss(params, coupling, t):
    del t  # full batch
    lam, c = coupling
    return jnp.sum(task_losses(params, train)[0]) + penalty(params, lam, c)

  def fit(lam, c):
    # Python-float alpha and gamma: the bit stack is sized from gamma, no min_momentum.
    return revhyper.sgd(train_loss, params0, (lam, c), num_steps=num_steps,
                        learning_rate=learning_rate, momentum=momentum).params

  # The meta-objective is the validation NLL summed over every example of every task, the
  # negative log-likelihood of the validation set: the mean's gradient times the number of
  # examples, a scale at which the paper's meta-step of 0.2 moves the log matrices.
  num_valid = jnp.sum(valid[2] > 0, axis=-1).astype(jnp.float32)  # [K]

  def meta_loss(h):
    params = fit(*coupling_from_log(h))
    nll, err = task_losses(params, valid)
    return jnp.sum(num_valid * nll), {
        "valid_nll": jnp.mean(nll), "valid_error": jnp.mean(err),
        "train_nll": jnp.mean(task_losses(params, train)[0])}

  @jax.jit
  def evaluate(lam, c):
    params = fit(lam, c)
    out = {}
    for name, split in (("train", train), ("valid", valid), ("test", test)):
      nll, err = task_losses(params, split)
      out[f"{name}_nll"], out[f"{name}_error"] = nll, err
    return out

  return meta_loss, evaluate


def summarise(per_task):
  per_task = {k: np.asarray(v) for k, v in per_task.items()}
  return dict(per_task={k: v.tolist() for k, v in per_task.items()},
              **{f"mean_{k}": float(v.mean()) for k, v in per_task.items()})


def plot_coupling(lam, c, task_names, initial_coupling):
  """The learned coupling matrices, one per layer (figure 10); own L2 on the diagonal."""
  num_layers = c.shape[0]
  fig, axes = plt.subplots(1, num_layers, figsize=(4.2 * num_layers + 1.2, 4.9))
  fig.subplots_adjust(left=0.04, right=0.86, bottom=0.2, top=0.84, wspace=0.25)
  titles = ["input weights", "middle weights", "output weights"] if num_layers == 3 else [
      f"layer {l + 1}" for l in range(num_layers)]
  logc = np.log10(np.where(c > 0, c, np.nan))
  spread = max(np.nanmax(np.abs(logc - np.log10(initial_coupling))), 1e-3)
  centre = np.log10(initial_coupling)
  k = c.shape[-1]
  short = [f"{i}" for i in range(k)]
  for l, ax in enumerate(np.atleast_1d(axes)):
    im = ax.imshow(logc[l], cmap="RdBu_r", vmin=centre - spread, vmax=centre + spread)
    for i in range(k):
      ax.text(i, i, f"{np.log10(lam[l, i]):.1f}", ha="center", va="center", fontsize=6,
              color="0.3")
    ax.set_title(f"{titles[l]}")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(short, fontsize=7)
    ax.set_yticklabels(short, fontsize=7)
    ax.axhline(k / 2 - 0.5, color="k", lw=0.6)
    ax.axvline(k / 2 - 0.5, color="k", lw=0.6)
  cax = fig.add_axes([0.885, 0.25, 0.015, 0.55])
  fig.colorbar(im, cax=cax, label="log10 coupling (numbers: log10 own L2)")
  half = (len(task_names) + 1) // 2
  legend = ["; ".join(f"{i}: {n}" for i, n in enumerate(task_names) if i < half),
            "; ".join(f"{i}: {n}" for i, n in enumerate(task_names) if i >= half)]
  fig.text(0.45, 0.04, "tasks " + "\n".join(legend), fontsize=8, ha="center")
  return fig


def plot_meta_curve(history, learned, tied, separate):
  fig, ax = common.meta_learning_curve(
      history, [r["aux"]["valid_nll"] for r in history], learned["mean_valid_nll"],
      "validation NLL (the meta-objective / examples)", ylabel="mean NLL over tasks")
  ax.axhline(separate["mean_test_nll"], color="C3", ls=":", label="test NLL, separate")
  ax.axhline(tied["mean_test_nll"], color="C2", ls="--", label="test NLL, tied")
  ax.axhline(learned["mean_test_nll"], color="C1", ls="-.", label="test NLL, learned")
  ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
  ax.legend(fontsize=8)
  return fig


def main(argv):
  del argv
  start = time.time()
  if FLAGS.omniglot_dir:
    per = tuple(int(v) for v in FLAGS.omniglot_split)
    tasks, names, description = omniglot_tasks(FLAGS.omniglot_dir, FLAGS.omniglot_archives,
                                               FLAGS.alphabets, per)
  else:
    per = (_setting("train_per_class"), _setting("valid_per_class"), _setting("test_per_class"))
    tasks, names, description = mnist_tasks(per, FLAGS.seed)
  tasks, names = add_rotations(tasks, names)
  num_classes = max(int(t[s][1].max()) + 1 for t in tasks for s in range(3))
  if FLAGS.layer_sizes:
    layer_sizes = tuple(int(v) for v in FLAGS.layer_sizes)
  else:
    layer_sizes = default_layer_sizes(num_classes)
  if layer_sizes[-1] < num_classes:
    raise app.UsageError(f"--layer_sizes must end with at least {num_classes} outputs")
  num_tasks = len(tasks)
  settings = dict(
      meta_iterations=_setting("meta_iterations"), num_steps=_setting("num_steps"),
      layer_sizes=layer_sizes, num_tasks=num_tasks, batch="full",
      learning_rate=FLAGS.learning_rate, momentum=FLAGS.momentum,
      meta_optimizer=f"sgd({FLAGS.meta_step})",
      meta_objective="validation NLL summed over all tasks' examples",
      penalty=("sum_l [sum_i exp(H_l[i,i]) |theta_li|^2 + sum_{i<j} "
               "exp((H_l[i,j] + H_l[j,i])/2) |theta_li - theta_lj|^2]"),
      initial_log_l2=FLAGS.log_l2, tied_grid=[float(v) for v in FLAGS.tied_grid],
      log_init_scale=FLAGS.log_init_scale, examples_per_class=per, seed=FLAGS.seed,
      quick=FLAGS.quick,
      net_note=("the paper's 784-400-200-C" if tuple(layer_sizes[1:-1]) == OMNIGLOT_HIDDEN
                else f"reduced from the paper's 784-400-200-C to {layer_sizes} for 2 CPU "
                "cores"))
  out_dir = common.prepare_out_dir(FLAGS.out_dir)
  logging.info("Data: %s", description)
  logging.info("Settings: %s", settings)
  data = stack_splits(tasks)

  meta_loss, evaluate = make_problem(
      data, layer_sizes, num_tasks, settings["num_steps"], FLAGS.learning_rate,
      FLAGS.momentum, FLAGS.log_init_scale, FLAGS.seed)
  num_layers = len(layer_sizes) - 1
  eye = np.eye(num_tasks, dtype=np.float32)

  def uniform(log_coupling):
    return jnp.asarray(np.where(eye > 0, FLAGS.log_l2, log_coupling)[None].repeat(
        num_layers, axis=0).astype(np.float32))

  lam0, _ = coupling_from_log(uniform(0.0))
  separate = summarise(evaluate(lam0, jnp.zeros((num_layers, num_tasks, num_tasks))))
  logging.info("Separate: validation NLL %.4f, test NLL %.4f", separate["mean_valid_nll"],
               separate["mean_test_nll"])
  tied_search = []
  for log_coupling in (float(v) for v in FLAGS.tied_grid):
    tied = summarise(evaluate(*coupling_from_log(uniform(log_coupling))))
    tied_search.append(dict(log_coupling=log_coupling, valid_nll=tied["mean_valid_nll"],
                            test_nll=tied["mean_test_nll"], result=tied))
    logging.info("Tied, log coupling %g: validation NLL %.4f, test NLL %.4f", log_coupling,
                 tied["mean_valid_nll"], tied["mean_test_nll"])
  best = min(tied_search, key=lambda r: r["valid_nll"])
  tied, tied_log_coupling = best["result"], best["log_coupling"]
  logging.info("Tied baseline: log coupling %g (best validation NLL)", tied_log_coupling)
  h0 = uniform(tied_log_coupling)

  result = revhyper.meta.meta_optimize(
      meta_loss, h0, num_iterations=settings["meta_iterations"],
      optimizer=optax.sgd(FLAGS.meta_step), has_aux=True)
  lam, c = coupling_from_log(result.hparams)
  learned = summarise(evaluate(lam, c))
  logging.info("Test NLL: separate %.4f, tied %.4f, learned %.4f (validation NLL, the "
               "meta-objective: %.4f, %.4f, %.4f)", separate["mean_test_nll"],
               tied["mean_test_nll"], learned["mean_test_nll"], separate["mean_valid_nll"],
               tied["mean_valid_nll"], learned["mean_valid_nll"])

  results = dict(
      experiment="multitask coupling (figure 10)", settings=settings, data=description,
      substitute=not FLAGS.omniglot_dir, task_names=names,
      meta_loss=[r["meta_loss"] for r in result.history], history=result.history,
      test_nll=dict(separate=separate["mean_test_nll"], tied=tied["mean_test_nll"],
                    learned=learned["mean_test_nll"]),
      separate=separate, tied=tied, learned=learned, tied_log_coupling=tied_log_coupling,
      tied_search=[{k: v for k, v in r.items() if k != "result"} for r in tied_search],
      learned_coupling=np.asarray(c), learned_l2=np.asarray(lam),
      learned_log_matrices=np.asarray(result.hparams), wall_seconds=time.time() - start)
  common.save_results(out_dir, results)
  fig = plot_coupling(np.asarray(lam), np.asarray(c), names, float(np.exp(tied_log_coupling)))
  data_title = ("MNIST substitute for Omniglot: 5 digit groups + their rotations"
                if not FLAGS.omniglot_dir else "Omniglot: 5 alphabets + their rotations")
  fig.suptitle(f"Learned task coupling per layer ({data_title})\n"
               f"test NLL: separate {separate['mean_test_nll']:.3f}, tied "
               f"{tied['mean_test_nll']:.3f}, learned {learned['mean_test_nll']:.3f}")
  common.save_figure(fig, out_dir, "coupling.png")
  common.save_figure(plot_meta_curve(result.history, learned, tied, separate), out_dir,
                     "meta_learning_curve.png")
  logging.info("Wrote %s (%.1f s)", out_dir, time.time() - start)


if __name__ == "__main__":
  app.run(main)
