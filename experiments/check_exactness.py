"""Checks, on whatever backend JAX runs on, that training runs backwards bit for bit.

Exactness rests on the reverse pass recomputing every gradient bit for bit, which depends on
how XLA compiles the gradient on that backend. This launcher trains the paper's tanh MLP on the
bundled MNIST digits, runs training backwards with ``revhyper.round_trip`` for each gradient
form (``Reversible(share_gradient=True)``, the default, and ``False``) and reports whether the
rebuilt initial state is exact, then computes the hypergradient of a short run with
``check_reversal=True`` (the backward pass itself must rebuild the initial state bit for bit)
and compares it with plain backprop (``method="unroll"``).

  python experiments/check_exactness.py --out_dir results/exactness
  python experiments/check_exactness.py --sizes=784,512,512,512,10 --steps=1000,10000
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import revhyper  # noqa: E402

_OUT_DIR = flags.DEFINE_string("out_dir", "results/exactness", "Where results.json goes.")
_SIZES = flags.DEFINE_list("sizes", ["784", "50", "50", "50", "10"], "MLP layer sizes.")
_STEPS = flags.DEFINE_list("steps", ["100", "1000"], "Training lengths T for round trips.")
_GRAD_STEPS = flags.DEFINE_integer("grad_steps", 100, "T of the hypergradient comparison.")
_BATCH = flags.DEFINE_integer("batch", 200, "Minibatch size.")
_MOMENTUM = flags.DEFINE_float("momentum", 0.9, "Momentum.")
_LOG_LR = flags.DEFINE_float("log_learning_rate", -1.0, "Log learning rate.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny sizes, for a smoke test.")


def make_problem(sizes, batch):
  images, labels = revhyper.datasets.load_mnist()
  mean = revhyper.datasets.pixel_mean(images)
  x = jnp.asarray(revhyper.datasets.preprocess(images, mean))
  y = jnp.asarray(labels, jnp.int32)
  key = jax.random.PRNGKey(0)
  params = revhyper.models.mlp_init(key, sizes, scale=float(np.exp(-3)))

  def loss_fn(w, l2, t):
    idx = revhyper.datasets.batch_indices(key, t, x.shape[0], batch)
    nll = revhyper.models.softmax_cross_entropy(revhyper.models.mlp_apply(w, x[idx]), y[idx])
    return nll + l2 * sum(jnp.sum(layer["W"] ** 2) for layer in w)

  return params, loss_fn


def main(argv):
  del argv
  sizes = [int(s) for s in _SIZES.value]
  steps = [int(s) for s in _STEPS.value]
  grad_steps = _GRAD_STEPS.value
  if _QUICK.value:
    sizes, steps, grad_steps = [784, 16, 10], [20, 50], 20
  params, loss_fn = make_problem(sizes, _BATCH.value)
  num_weights = sum(x.size for x in jax.tree_util.tree_leaves(params))
  l2 = jnp.float32(1e-4)
  lr = float(np.exp(_LOG_LR.value))
  report = dict(backend=jax.default_backend(), device=str(jax.devices()[0]),
                jax_version=jax.__version__, sizes=sizes, num_weights=num_weights,
                momentum=_MOMENTUM.value, learning_rate=lr, round_trips=[])
  logging.info("%s, %d weights", report["device"], num_weights)
  for share in (True, False):  # the default is True on a CPU, False on a GPU
    method = revhyper.Reversible(share_gradient=share)
    for num_steps in steps:
      run = jax.jit(lambda p, h, n=num_steps, m=method: revhyper.round_trip(
          loss_fn, p, h, num_steps=n, learning_rate=lr, momentum=_MOMENTUM.value, method=m))
      start = time.perf_counter()
      rt = jax.block_until_ready(run(params, l2))
      seconds = time.perf_counter() - start
      error = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
          jax.tree_util.tree_leaves(rt.initial_params), jax.tree_util.tree_leaves(params)))
      row = dict(share_gradient=share, num_steps=num_steps, exact=bool(rt.exact),
                 max_abs_error=error, seconds_with_compile=seconds,
                 bits_per_weight_per_step=float(rt.stats.bits_per_weight_per_step))
      report["round_trips"].append(row)
      logging.info("round trip %s", row)
      print(row, flush=True)

  def meta(h, method):
    out = revhyper.sgd(loss_fn, params, h, num_steps=grad_steps, learning_rate=lr,
                       momentum=_MOMENTUM.value, method=method)
    return loss_fn(out.params, 0.0, jnp.int32(grad_steps))

  grad = jax.jit(jax.grad(meta), static_argnums=1)
  reference = float(grad(l2, "unroll"))
  report["hypergradient"] = {"unroll": reference}
  # check_reversal verifies the gradient path itself: the backward pass must rebuild w_0 and
  # v_0 bit for bit while it computes the cotangents.
  for name, share in [("reversible_shared", True), ("reversible_unshared", False)]:
    method = revhyper.Reversible(share_gradient=share, check_reversal=True)
    try:
      value = float(jax.block_until_ready(grad(l2, method)))
    except Exception as error:  # ReversalError, raised through the runtime under jit
      logging.error("%s: %s", name, error)
      report["hypergradient"][name + "_exact"] = False
      continue
    report["hypergradient"][name + "_exact"] = True
    report["hypergradient"][name] = value
    report["hypergradient"][name + "_relative_error"] = abs(value - reference) / abs(reference)
  print(report["hypergradient"], flush=True)
  report["all_exact"] = all(r["exact"] for r in report["round_trips"]) and all(
      v for k, v in report["hypergradient"].items() if k.endswith("_exact"))
  path = common.save_results(common.prepare_out_dir(_OUT_DIR.value), report)
  print(f"all exact: {report['all_exact']}; results in {path}")


if __name__ == "__main__":
  app.run(main)
