r"""A jax.profiler trace of one reversible hypergradient, for TensorBoard or Perfetto.

The problem is the benchmark's (the paper's tanh MLP on the bundled MNIST digits, momentum SGD,
batch --batch_size, the validation loss after T steps differentiated with respect to an L2
penalty). The jitted hypergradient is compiled and run once outside the trace, so that the trace
holds one call of the compiled program alone: training forward on the integer grid, then
backwards, step by step.

Writes the trace under --out_dir (``plugins/profile/<run>/*.xplane.pb``, with a Perfetto
``*.trace.json.gz`` where the profiler writes one) and ``profile.json`` (machine, configuration,
the call's wall time, the hypergradient).

  # one GPU: 784-512-512-512-10, T = 100
  python experiments/profile_reversible.py --out_dir=results/profile_reversible
  # tiny, on a CPU:
  python experiments/profile_reversible.py --sizes=784,16,10 --steps=10 --out_dir=/tmp/profile
"""

import json
import math
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

import revhyper

_OUT_DIR = flags.DEFINE_string("out_dir", "results/profile_reversible",
                               "Where the trace and profile.json go.")
_SIZES = flags.DEFINE_list("sizes", ["784", "512", "512", "512", "10"], "Layer widths.")
_STEPS = flags.DEFINE_integer("steps", 100, "Training length T.")
_BATCH = flags.DEFINE_integer("batch_size", 200, "Minibatch size.")
_PRECISION = flags.DEFINE_string("precision", "highest", "Matrix-product precision of the loss.")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 9000, "Training digits.")
_NUM_VAL = flags.DEFINE_integer("num_val", 1000, "Validation digits.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  sizes = [int(width) for width in _SIZES.value]
  n_train, n_val, batch = _NUM_TRAIN.value, _NUM_VAL.value, _BATCH.value
  images, labels = revhyper.datasets.load_mnist()
  mean = revhyper.datasets.pixel_mean(images[:n_train])
  x = jnp.asarray(revhyper.datasets.preprocess(images[:n_train + n_val], mean))
  y = jnp.asarray(labels[:n_train + n_val], jnp.int32)
  key = jax.random.key(0)
  params = revhyper.models.mlp_init(jax.random.fold_in(key, 0), sizes, scale=math.exp(-3.0))
  batch_key = jax.random.fold_in(key, 1)

  def train_loss(w, log_l2, t):
    idx = revhyper.datasets.batch_indices(batch_key, t, n_train, batch)
    penalty = sum(jnp.sum(layer["W"] ** 2) for layer in w)
    logits = revhyper.models.mlp_apply(w, x[idx])
    return revhyper.models.softmax_cross_entropy(logits, y[idx]) + jnp.exp(log_l2) * penalty

  def meta(log_l2):
    out = revhyper.sgd(train_loss, params, log_l2, num_steps=_STEPS.value,
                       learning_rate=math.exp(-1.0), momentum=0.9,
                       method=revhyper.Reversible(precision=_PRECISION.value))
    logits = revhyper.models.mlp_apply(out.params, x[n_train:])
    return revhyper.models.softmax_cross_entropy(logits, y[n_train:])

  hypergradient = jax.jit(jax.grad(meta))
  log_l2 = jnp.float32(math.log(1e-4))
  start = time.perf_counter()
  jax.block_until_ready(hypergradient(log_l2))  # compiles: kept out of the trace
  first_s = time.perf_counter() - start
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  with jax.profiler.trace(_OUT_DIR.value):
    start = time.perf_counter()
    value = jax.block_until_ready(hypergradient(log_l2))
    traced_s = time.perf_counter() - start
  device = jax.devices()[0]
  record = {"backend": jax.default_backend(), "device_kind": device.device_kind,
            "jax": jax.__version__, "command": " ".join(sys.argv), "sizes": sizes,
            "steps": _STEPS.value, "batch_size": batch, "precision": _PRECISION.value,
            "first_call_s": first_s, "traced_call_s": traced_s,
            "hypergradient": float(value)}
  with open(os.path.join(_OUT_DIR.value, "profile.json"), "w") as f:
    json.dump(record, f, indent=1)
  traces = [os.path.join(root, name) for root, _, names in os.walk(_OUT_DIR.value)
            for name in names if ".xplane.pb" in name or ".trace.json" in name]
  print(json.dumps(record))
  print("trace files:", *traces, sep="\n  ")
  if not traces:
    raise SystemExit("the profiler wrote no trace")


if __name__ == "__main__":
  app.run(main)
