r"""Accuracy of float32 hypergradients against a float64 reference, per matrix-product precision.

The problem is the benchmark's: the paper's tanh MLP trained on the bundled MNIST digits
(inputs / 255, mean-subtracted), batch --batch_size, for T steps; the meta-objective is the
validation loss after training, differentiated with respect to one log learning rate and one
log initialisation scale per weight type (W and b of every layer) and a log L2 penalty.

For each optimizer (``revhyper.sgd`` with momentum --momentum at learning rate
--sgd_learning_rate; ``revhyper.adam`` with b1 0.9, b2 0.999 at --adam_learning_rate), each
network in --sizes and each precision in --precisions, the hypergradient is computed in float32
by ``Reversible(precision=p)``, ``Checkpoint(precision=p)`` and ``Unroll(precision=p)``, and
compared with ``Unroll()`` in float64 (under ``jax.enable_x64``: float64 data, weights and
hyperparameters) on the same problem (``--reference=checkpoint``: ``Checkpoint()`` in float64,
where float64 unroll would not fit). Reported per row: the relative L2 error of the whole
hypergradient, the worst of its three groups (learning rates, initialisation scales, L2
penalty), and reversible's distance from unroll at the same precision.

On a CPU, XLA computes float32 matrix products in float32 whatever the precision, so both
precisions give the same numbers (the summary says whether they did). On an NVIDIA GPU,
``"default"`` multiplies in TF32 (10-bit mantissas), which is what the table measures there.

Writes ``results.json`` to --out_dir (machine, configuration, every row; rewritten after each
row, so a run cut short keeps what it finished) and prints a table.

  # CPU, 784-50-10, 784-256-256-10, 784-512-512-512-10, T = 100:
  python experiments/accuracy.py --out_dir=results/accuracy
  # smoke run, about a minute on 2 cores (mostly compilation):
  python experiments/accuracy.py --quick --out_dir=/tmp/accuracy_quick
  # one GPU: the same networks at T = 1000:
  python experiments/accuracy.py --device --out_dir=results/accuracy_gpu
"""

import datetime
import json
import math
import os
import platform
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import revhyper

_OUT_DIR = flags.DEFINE_string("out_dir", "results/accuracy", "Where results.json goes.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny configuration (784-16-10, "
                           "T = 10, batch 50, 500 validation digits, XLA optimisation level 0): a smoke "
                           "run.")
_DEVICE = flags.DEFINE_bool("device", False, "Configuration for one GPU: the default "
                            "networks at T = 1000.")
_SIZES = flags.DEFINE_multi_string(
    "sizes", None, "Layer widths of one network, comma-separated; repeat the flag for several. "
    "Default 784,50,10 784,256,256,10 784,512,512,512,10 (--quick: 784,16,10).")
_STEPS = flags.DEFINE_integer("steps", None, "Training length T; default 100 (--device: 1000, "
                              "--quick: 10).")
_OPTIMIZERS = flags.DEFINE_list("optimizers", ["sgd", "adam"],
                                 "Optimizers: sgd, adam, rmsprop (momentum 0.9, decay 0.9).")
_RMSPROP_EPS = flags.DEFINE_float("rmsprop_eps", 1e-8, "RMSProp's eps.")
_PRECISIONS = flags.DEFINE_list("precisions", ["default", "highest"],
                                "Matrix-product precisions of the float32 methods.")
_METHODS = flags.DEFINE_list("methods", ["reversible", "checkpoint", "unroll"],
                             "Float32 methods compared with the float64 reference.")
_REFERENCE = flags.DEFINE_enum(
    "reference", "unroll", ["unroll", "checkpoint"], "The float64 reference's method: unroll, "
    "or checkpoint (sqrt(T) segments, the same gradient to float64 rounding) where float64 "
    "unroll's stored trajectory would not fit in memory (784-512-512-512-10 at T = 1000 on a "
    "24 GB machine).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Minibatch size; default 200 (--quick: 50).")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 9000, "Training digits.")
_NUM_VAL = flags.DEFINE_integer("num_val", None, "Validation digits, after the training ones; "
                                "default 1000 (--quick: 500).")
_SGD_LR = flags.DEFINE_float("sgd_learning_rate", math.exp(-1.0), "SGD's learning rate (e**-1).")
_MOMENTUM = flags.DEFINE_float("momentum", 0.9, "SGD's momentum.")
_ADAM_LR = flags.DEFINE_float("adam_learning_rate", 1e-3, "Adam's learning rate.")
_EPS_ROOT = flags.DEFINE_float(
    "eps_root", 1e-8, "Adam's eps_root: pixels that are 0 in every digit leave their weights' "
    "second moment at 0, where the square root's derivative makes the hypergradient NaN.")
_INIT_SCALE = flags.DEFINE_float("init_scale", math.exp(-3.0), "Initial weight scale (e**-3).")
_L2 = flags.DEFINE_float("l2", 1e-4, "L2 penalty on the weights.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initial noise and the minibatch order.")

DEFAULT_SIZES = ["784,50,10", "784,256,256,10", "784,512,512,512,10"]
QUICK_SIZES = ["784,16,10"]
GROUPS = ("log_learning_rate", "log_init_scale", "log_l2")


def config_from_flags():
  quick = _QUICK.value
  sizes = _SIZES.value or (QUICK_SIZES if quick else DEFAULT_SIZES)
  steps = _STEPS.value or (10 if quick else 1000 if _DEVICE.value else 100)
  return {
      "sizes": [[int(width) for width in entry.split(",")] for entry in sizes],
      "steps": steps,
      "optimizers": list(_OPTIMIZERS.value),
      "rmsprop_eps": _RMSPROP_EPS.value,
      "precisions": list(_PRECISIONS.value),
      "methods": list(_METHODS.value),
      "reference": _REFERENCE.value,
      "batch_size": _BATCH.value or (50 if quick else 200),
      "num_train": _NUM_TRAIN.value,
      "num_val": _NUM_VAL.value or (500 if quick else 1000),
      "sgd_learning_rate": _SGD_LR.value,
      "momentum": _MOMENTUM.value,
      "adam_learning_rate": _ADAM_LR.value,
      "eps_root": _EPS_ROOT.value,
      "init_scale": _INIT_SCALE.value,
      "l2": _L2.value,
      "seed": _SEED.value,
      "quick": quick,
      # The smoke run's time is compilation: XLA's backend optimisations cost more than they
      # save on a tiny network.
      "compiler_options": {"xla_backend_optimization_level": 0} if quick else None,
      "device": _DEVICE.value,
  }


def draw(cfg, sizes):
  """The problem's numbers in float64 numpy arrays, drawn once outside the x64 mode.

  Both dtypes' problems are made from them, so that the float32 problem is the float64 one
  rounded once: the same digits, initial noise and minibatches (drawn here, as a [T, batch]
  table, because JAX's random bits depend on its integer widths, which the x64 mode changes).
  """
  images, labels = revhyper.datasets.load_mnist()
  n_train, n_val = cfg["num_train"], cfg["num_val"]
  mean = revhyper.datasets.pixel_mean(images[:n_train])
  x = np.asarray(revhyper.datasets.preprocess(images[:n_train + n_val], mean), np.float64)
  key = jax.random.key(cfg["seed"])
  noise = revhyper.models.mlp_noise(jax.random.fold_in(key, 0), sizes)
  batch_key = jax.random.fold_in(key, 1)
  batches = jax.jit(jax.vmap(lambda t: revhyper.datasets.batch_indices(
      batch_key, t, n_train, cfg["batch_size"])))(jnp.arange(cfg["steps"]))
  return {"x_train": x[:n_train], "y_train": np.asarray(labels[:n_train], np.int32),
          "x_val": x[n_train:], "y_val": np.asarray(labels[n_train:n_train + n_val], np.int32),
          "noise": jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), noise),
          "batches": np.asarray(batches, np.int32)}


class Problem:
  """The training problem and the meta-objective of one network, in one float dtype."""

  def __init__(self, cfg, numbers, dtype):
    self.cfg = cfg
    self.x_train = jnp.asarray(numbers["x_train"], dtype)
    self.y_train = jnp.asarray(numbers["y_train"])
    self.x_val = jnp.asarray(numbers["x_val"], dtype)
    self.y_val = jnp.asarray(numbers["y_val"])
    self.batches = jnp.asarray(numbers["batches"])
    self.noise = jax.tree.map(lambda leaf: jnp.asarray(leaf, dtype), numbers["noise"])
    self.num_weights = sum(int(leaf.size) for leaf in jax.tree.leaves(self.noise))
    constant = lambda value: jax.tree.map(lambda _: jnp.asarray(value, dtype), self.noise)
    self.hparams = {
        "log_learning_rate": constant(0.0),  # relative to the optimizer's base rate
        "log_init_scale": constant(math.log(cfg["init_scale"])),
        "log_l2": jnp.asarray(math.log(cfg["l2"]), dtype),
    }

  def train_loss(self, params, log_l2, t):
    idx = self.batches[t]
    logits = revhyper.models.mlp_apply(params, self.x_train[idx])
    penalty = sum(jnp.sum(layer["W"] ** 2) for layer in params)
    return (revhyper.models.softmax_cross_entropy(logits, self.y_train[idx])
            + jnp.exp(log_l2) * penalty)

  def meta(self, hparams, optimizer, method):
    """The validation loss after training."""
    params = revhyper.models.mlp_init_from_noise(self.noise, hparams["log_init_scale"])
    relative = jax.tree.map(jnp.exp, hparams["log_learning_rate"])
    cfg = self.cfg
    if optimizer == "sgd":
      out = revhyper.sgd(self.train_loss, params, hparams["log_l2"], num_steps=cfg["steps"],
                         learning_rate=jax.tree.map(lambda r: r * cfg["sgd_learning_rate"],
                                                    relative),
                         momentum=cfg["momentum"], method=method)
    elif optimizer == "adam":
      out = revhyper.adam(self.train_loss, params, hparams["log_l2"], num_steps=cfg["steps"],
                          learning_rate=jax.tree.map(lambda r: r * cfg["adam_learning_rate"],
                                                     relative),
                          eps_root=cfg["eps_root"], method=method)
    elif optimizer == "rmsprop":
      # momentum 0.9 (reversible), at Adam's rates; eps --rmsprop_eps (optax's 1e-8 makes long
      # runs' hypergradients chaotic for every float32 method: docs/optimizers.rst).
      learning_rate = jax.tree.map(lambda r: r * cfg["adam_learning_rate"], relative)
      out = revhyper.train(self.train_loss, params, hparams["log_l2"], revhyper.optim.rmsprop(
          learning_rate, decay=0.9, eps=cfg["rmsprop_eps"], momentum=0.9),
                           num_steps=cfg["steps"], method=method)
    else:
      raise ValueError(f"unknown optimizer {optimizer!r}")
    # The validation loss at full precision, so that only training's products differ.
    with jax.default_matmul_precision("highest"):
      logits = revhyper.models.mlp_apply(out.params, self.x_val)
    return revhyper.models.softmax_cross_entropy(logits, self.y_val)

  def hypergradient(self, optimizer, method):
    grad = jax.jit(jax.grad(lambda h: self.meta(h, optimizer, method))).lower(
        self.hparams).compile(compiler_options=self.cfg["compiler_options"])
    start = time.perf_counter()
    value = jax.block_until_ready(grad(self.hparams))
    seconds = time.perf_counter() - start
    return jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), value), seconds


def make_method(name, precision):
  if name == "reversible":
    return revhyper.Reversible(precision=precision)
  if name == "checkpoint":
    return revhyper.Checkpoint(precision=precision)
  if name == "unroll":
    return revhyper.Unroll(precision=precision)
  raise ValueError(f"unknown method {name!r}")


def relative_error(value, reference):
  """Relative L2 error of pytree ``value`` against ``reference``."""
  difference = [np.ravel(a - b) for a, b in zip(jax.tree.leaves(value),
                                                 jax.tree.leaves(reference))]
  norm = np.linalg.norm(np.concatenate([np.ravel(b) for b in jax.tree.leaves(reference)]))
  return float(np.linalg.norm(np.concatenate(difference)) / norm)


def errors(value, reference):
  """The global relative error, each group's and the worst group's."""
  groups = {name: relative_error(value[name], reference[name]) for name in GROUPS}
  worst = max(groups, key=groups.get)
  return {"global": relative_error(value, reference), "groups": groups,
          "worst_group": worst, "worst_group_error": groups[worst]}


def machine():
  device = jax.devices()[0]
  return {
      "backend": jax.default_backend(),
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "jax": jax.__version__,
      "revhyper": revhyper.__version__,
      "python": platform.python_version(),
      "os": platform.platform(),
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
  }


def finite(tree):
  return all(bool(np.all(np.isfinite(leaf))) for leaf in jax.tree.leaves(tree))


def run_network(cfg, sizes, optimizer):
  """Rows of one (optimizer, network): the float64 reference, then every float32 method."""
  numbers = draw(cfg, sizes)
  with jax.enable_x64(True):
    reference, reference_s = Problem(cfg, numbers, jnp.float64).hypergradient(
        optimizer, make_method(cfg["reference"], "highest"))
  problem = Problem(cfg, numbers, jnp.float32)
  rows = []
  for precision in cfg["precisions"]:
    values = {}
    for name in cfg["methods"]:
      value, seconds = problem.hypergradient(optimizer, make_method(name, precision))
      values[name] = value
      row = {"optimizer": optimizer, "sizes": sizes, "num_weights": problem.num_weights,
             "precision": precision, "method": name, "seconds": seconds,
             "finite": finite(value), "vs_float64": errors(value, reference)}
      rows.append(row)
    if "reversible" in values and "unroll" in values:
      for row in rows:
        if row["precision"] == precision and row["method"] == "reversible":
          row["vs_unroll"] = errors(values["reversible"], values["unroll"])
  return rows, {"optimizer": optimizer, "sizes": sizes, "method": cfg["reference"],
                "seconds": reference_s,
                "norm": float(np.linalg.norm(np.concatenate(
                    [np.ravel(leaf) for leaf in jax.tree.leaves(reference)])))}


def precisions_agree(rows):
  """Whether every method gave the same errors at every precision (to 1e-12)."""
  keyed = {}
  for row in rows:
    key = (row["optimizer"], tuple(row["sizes"]), row["method"])
    keyed.setdefault(key, []).append(row["vs_float64"]["global"])
  return all(max(v) - min(v) <= 1e-12 for v in keyed.values() if len(v) > 1)


def table(rows):
  lines = [f"{'optimizer':<9} {'network':<20} {'precision':<9} {'method':<11} "
           f"{'vs float64':>10} {'worst group':>26} {'vs unroll':>10}"]
  for row in rows:
    error = row["vs_float64"]
    worst = f"{error['worst_group_error']:.2e} ({error['worst_group']})"
    unroll = f"{row['vs_unroll']['global']:.2e}" if "vs_unroll" in row else ""
    lines.append(f"{row['optimizer']:<9} {'-'.join(map(str, row['sizes'])):<20} "
                 f"{row['precision']:<9} {row['method']:<11} {error['global']:>10.2e} "
                 f"{worst:>26} {unroll:>10}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = config_from_flags()
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  results = {"machine": machine(), "command": " ".join(sys.argv), "config": cfg,
             "rows": [], "references": [], "complete": False}
  path = os.path.join(_OUT_DIR.value, "results.json")
  start = time.perf_counter()
  # Networks outermost, in the order given, so that a run cut short has both optimizers on
  # the networks it finished.
  for sizes in cfg["sizes"]:
    for optimizer in cfg["optimizers"]:
      rows, reference = run_network(cfg, sizes, optimizer)
      results["rows"] += rows
      results["references"].append(reference)
      results["precisions_agree"] = precisions_agree(results["rows"])
      with open(path, "w") as f:
        json.dump(results, f, indent=1)
      print(table(rows), flush=True)
  results["complete"] = True
  results["seconds"] = time.perf_counter() - start
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
  m = results["machine"]
  print(f"\n{m['backend']} ({m['device_kind']}), JAX {m['jax']}, T = {cfg['steps']}; "
        f"relative L2 errors of float32 hypergradients against float64 {cfg['reference']}")
  print(table(results["rows"]))
  if len(cfg["precisions"]) > 1:
    if results["precisions_agree"]:
      print("Every precision gave the same numbers (float32 products are float32 either way "
            "on this backend).")
    else:
      print("The precisions gave different numbers.")
  print(f"results in {path} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
  app.run(main)
