"""Checks, on whatever backend JAX runs on, that training runs backwards bit for bit.

Exactness rests on the reverse pass recomputing every gradient bit for bit, which depends on
how XLA compiles the gradient on that backend. This launcher trains the paper's tanh MLP on the
bundled MNIST digits, runs training backwards with ``revhyper.round_trip`` for each gradient
form (``Reversible(share_gradient=True)``, the default, and ``False``) and reports whether the
rebuilt initial state is exact, then computes the hypergradient of a short run with
``check_reversal=True`` (the backward pass itself must rebuild the initial state bit for bit)
and compares it with plain backprop (``method="unroll"``). The same checks run for model state:
the network with its first layer batch-normalised, AdamW, and the batch statistics' running
averages (``revhyper.RunningAverage``).

Whether a form is exact depends on how XLA compiles it, so ``--xla_flag_sets`` (repeatable)
reruns the checks under each set of XLA flags, each in a fresh process, and prints one verdict
line per set: the way to find which compiler setting a non-exact form needs on a device.

  python experiments/check_exactness.py --out_dir results/exactness
  python experiments/check_exactness.py --sizes=784,512,512,512,10 --steps=1000,10000
  # which forms are exact under XLA's deterministic-ops and no-autotuning settings:
  python experiments/check_exactness.py --xla_flag_sets= \\
      --xla_flag_sets=--xla_gpu_deterministic_ops=true --xla_flag_sets=--xla_gpu_autotune_level=0
"""

import json
import os
import subprocess
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
_FLAG_SETS = flags.DEFINE_multi_string(
    "xla_flag_sets", None,
    "XLA flags to add to XLA_FLAGS for one run of the checks; repeat the flag to compare "
    "several sets, each run in a fresh process ('' adds nothing), and compare which gradient "
    "forms are exact under each.")


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

  def normalised_loss(w, l2, t):
    # The first hidden layer batch-normalised, BatchNorm-style: its statistics are returned
    # for revhyper.RunningAverage.
    idx = revhyper.datasets.batch_indices(key, t, x.shape[0], batch)
    h = x[idx] @ w[0]["W"]
    mean, var = jnp.mean(h, axis=0), jnp.var(h, axis=0)
    h = jnp.tanh((h - mean) / jnp.sqrt(var + 1e-5) + w[0]["b"])
    logits = revhyper.models.mlp_apply(w[1:], h)
    nll = revhyper.models.softmax_cross_entropy(logits, y[idx])
    return nll + l2 * sum(jnp.sum(layer["W"] ** 2) for layer in w), {"mean": mean, "var": var}

  return params, loss_fn, normalised_loss


def model_state_check(params, normalised_loss, steps, grad_steps):
  """Running averages of batch statistics with AdamW: round trips, and the gradient path with
  ``check_reversal`` against unroll, through a loss that reads the final averages."""
  width = params[0]["W"].shape[1]
  initial = {"mean": jnp.zeros(width), "var": jnp.ones(width)}
  optimizer = revhyper.optim.adamw(1e-3, weight_decay=1e-2)
  state = revhyper.RunningAverage(initial, decay=0.9)
  out = {"round_trips": []}
  for num_steps in steps:
    rt = jax.jit(lambda p, n=num_steps: revhyper.round_trip(
        normalised_loss, p, 1e-4, optimizer=optimizer, num_steps=n, model_state=state))(params)
    out["round_trips"].append(dict(num_steps=num_steps, exact=bool(rt.exact)))

  def meta(l2, method):
    trained = revhyper.train(normalised_loss, params, l2, optimizer, num_steps=grad_steps,
                             model_state=state, method=method)
    return (jnp.sum(trained.model_state["mean"] ** 2) + jnp.sum(trained.model_state["var"])
            + sum(jnp.sum(layer["W"] ** 2) for layer in trained.params))

  grad = jax.jit(jax.grad(meta), static_argnums=1)
  reference = float(grad(jnp.float32(1e-4), "unroll"))
  value = float(grad(jnp.float32(1e-4), revhyper.Reversible(check_reversal=True)))
  out["hypergradient"] = gradient_path_verdict("reversible", value, reference)
  out["all_exact"] = (all(r["exact"] for r in out["round_trips"])
                      and out["hypergradient"]["reversible_exact"])
  return out


def gradient_path_verdict(name, value, reference):
  """The record of one ``check_reversal=True`` hypergradient against unroll's ``reference``.

  Under ``jit`` a failed reversal check cannot raise (that would need a host callback): the
  hypergradient is NaN instead, so a non-finite value is the verdict "not exact".
  """
  exact = bool(np.isfinite(value)) and bool(np.isfinite(reference))
  return {name + "_exact": exact, name: value,
          name + "_relative_error": abs(value - reference) / abs(reference) if exact
          else float("nan")}


def check(sizes, steps, grad_steps):
  """Round trips and gradient paths for both gradient forms; returns the report."""
  params, loss_fn, normalised_loss = make_problem(sizes, _BATCH.value)
  num_weights = sum(x.size for x in jax.tree_util.tree_leaves(params))
  l2 = jnp.float32(1e-4)
  lr = float(np.exp(_LOG_LR.value))
  report = dict(backend=jax.default_backend(), device=str(jax.devices()[0]),
                jax_version=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""),
                sizes=sizes, num_weights=num_weights, momentum=_MOMENTUM.value,
                learning_rate=lr, round_trips=[])
  logging.info("%s, %d weights, XLA_FLAGS=%r", report["device"], num_weights,
               report["xla_flags"])
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
    value = float(jax.block_until_ready(grad(l2, method)))
    report["hypergradient"].update(gradient_path_verdict(name, value, reference))
    if not report["hypergradient"][name + "_exact"]:
      logging.error("%s: the backward pass did not rebuild the initial state (NaN)", name)
  print(report["hypergradient"], flush=True)
  report["model_state"] = model_state_check(params, normalised_loss, steps, grad_steps)
  print("model state:", report["model_state"], flush=True)
  report["all_exact"] = all(r["exact"] for r in report["round_trips"]) and all(
      v for k, v in report["hypergradient"].items() if k.endswith("_exact")) and (
          report["model_state"]["all_exact"])
  return report


def _child_argv(flag_set, out_dir):
  """This launcher's command line for one XLA flag set, every other flag as given."""
  return [sys.executable, os.path.abspath(__file__), f"--out_dir={out_dir}",
          f"--xla_flag_sets={flag_set}", f"--sizes={','.join(_SIZES.value)}",
          f"--steps={','.join(_STEPS.value)}", f"--grad_steps={_GRAD_STEPS.value}",
          f"--batch={_BATCH.value}", f"--momentum={_MOMENTUM.value!r}",
          f"--log_learning_rate={_LOG_LR.value!r}", "--quick" if _QUICK.value else "--noquick"]


def compare_flag_sets(flag_sets, out_dir):
  """Runs the check once per XLA flag set, each in a fresh process (XLA reads its flags once)."""
  runs = []
  for i, flag_set in enumerate(flag_sets):
    child_dir = os.path.join(out_dir, f"flags_{i}")
    env = dict(os.environ, XLA_FLAGS=" ".join(
        f for f in (os.environ.get("XLA_FLAGS", ""), flag_set) if f))
    print(f"XLA flag set {i}: {flag_set or '(none added)'}", flush=True)
    done = subprocess.run(_child_argv(flag_set, child_dir), env=env, check=False)
    path = os.path.join(child_dir, "results.json")
    if done.returncode != 0 or not os.path.exists(path):
      runs.append(dict(added_xla_flags=flag_set, failed_to_run=True, all_exact=False))
      continue
    with open(path) as f:
      run = json.load(f)
    runs.append(dict(run["runs"][0], added_xla_flags=flag_set))
  return runs


def summary(runs):
  """One line per flag set: which forms rebuilt the initial state bit for bit."""
  lines = []
  for run in runs:
    if run.get("failed_to_run"):
      lines.append(f"{run['added_xla_flags'] or '(none added)'}: did not run")
      continue
    forms = []
    for share, name in ((True, "shared"), (False, "unshared")):
      trips = all(r["exact"] for r in run["round_trips"] if r["share_gradient"] == share)
      grad = run["hypergradient"][f"reversible_{name}_exact"]
      forms.append(f"{name}: round trips {'exact' if trips else 'NOT exact'}, gradient path "
                   f"{'exact' if grad else 'NOT exact'}")
    state = run.get("model_state", {}).get("all_exact")
    forms.append(f"running averages (AdamW): {'exact' if state else 'NOT exact'}")
    lines.append(f"{run['added_xla_flags'] or '(none added)'}: " + "; ".join(forms))
  return lines


def main(argv):
  del argv
  sizes = [int(s) for s in _SIZES.value]
  steps = [int(s) for s in _STEPS.value]
  grad_steps = _GRAD_STEPS.value
  if _QUICK.value:
    sizes, steps, grad_steps = [784, 16, 10], [20, 50], 20
  out_dir = common.prepare_out_dir(_OUT_DIR.value)
  flag_sets = _FLAG_SETS.value or [""]
  # XLA reads its flags once per process: a set not in this process's XLA_FLAGS needs a new one.
  if len(flag_sets) == 1 and flag_sets[0] in os.environ.get("XLA_FLAGS", ""):
    runs = [dict(check(sizes, steps, grad_steps), added_xla_flags=flag_sets[0])]
  else:
    runs = compare_flag_sets(flag_sets, out_dir)
  report = dict(runs=runs, all_exact=all(r["all_exact"] for r in runs))
  path = common.save_results(out_dir, report)
  for line in summary(runs):
    print(line, flush=True)
  print(f"all exact: {report['all_exact']}; results in {path}")


if __name__ == "__main__":
  app.run(main)
