r"""Benchmark: time and memory of exact reversal against store-all backprop and checkpointing.

One problem, the paper's: a tanh MLP (784-50-50-50-10 by default) trained on the bundled MNIST
digits (inputs / 255, mean-subtracted) with momentum SGD, batch 200, momentum 0.9, learning rate
e**-1. The meta-objective is the validation loss after T training steps; its hypergradient is
taken with respect to a hyperparameter pytree: one log learning rate and one log
initialisation scale per weight type (W and b of every layer) and a log L2 penalty (and,
with --tune_momentum, the momentum's logit).

For every T in --steps, side by side in one process, each method is traced, compiled and run:

  reversible       jit(grad(meta)) with revhyper.sgd(method=Reversible(...)): exact reversal
  unroll           jit(grad(meta)) with Unroll(): store-all backprop, the reference
  checkpoint_sqrt  jit(grad(meta)) with Checkpoint(): ceil(sqrt(T))-step segments
  remat            jit(grad(meta)) with Checkpoint(segment_length=1): per-step remat
  forward_float    jit(meta) with "unroll": plain float training, no gradient (the floor)
  forward_exact    jit(meta) with "reversible": exact training on the integer grid, no gradient
  adam_unroll      jit(grad(meta)) with revhyper.adam(method=Unroll()): Adam's reference
  adam_reversible  jit(grad(meta)) with revhyper.adam(method=Reversible()): Adam, exact
  <opt>_unroll, <opt>_reversible   the same pair for the optimizers of revhyper.optim, run by
                   revhyper.train: sgdtrace (optax's sgd, momentum --momentum), rmsprop
                   (momentum --momentum, decay 0.9), adabelief, clipadamw (clip_by_global_norm
                   then adamw)

The Adam rows train the same network with revhyper.adam (b1 0.9, b2 0.999, learning rates
the SGD ones scaled to --adam_learning_rate, --adam_weight_decay), and are compared with
adam_unroll rather than unroll; every optimizer pair likewise with its own unroll. The
adaptive optimizers use --adam_learning_rate; sgdtrace uses the SGD rates times
(1 - momentum), the same steps in optax's convention.

and measured:

  * wall time: the median over --repeats calls of the compiled function, after one warm-up
    call; repeats go round-robin over the methods, so that load from other processes on a
    shared machine falls on all of them alike (ratios are the robust numbers);
  * trace and compile time, apart (``jit(f).lower(h)`` and ``.compile()``);
  * XLA's memory plan, ``compiled.memory_analysis()``: temporaries, arguments, outputs;
  * with --measure_rss, the peak resident memory of a fresh process that compiles and runs
    just that method once (this script again, with --rss_child);
  * bits stored by the exact method per weight per step, against the information bound
    log2(2**16 / n) for the momentum rounded to n / 2**16 (Adam: the sum over its decays
    of log2(1 / factor), from the run's statistics);
  * the relative L2 error of each hypergradient against unroll's (or, where unroll does not
    fit, against the first float method that does).

A method whose memory plan (temporaries + arguments + outputs) exceeds --memory_limit_gb is
compiled but not run: it is reported as not fitting, with its planned memory, and its time is
estimated by scaling its largest measured T linearly (marked as an estimate).

Writes to --out_dir: ``results.json`` (machine, command line, every number; rewritten after
each T, so an interrupted run keeps what it finished), ``time.png`` (time against T, log-log,
and time relative to unroll) and ``memory.png`` (XLA temporaries against T and, if measured,
peak RSS), one line per method, and prints a table of ratios against unroll.

Only ratios within one T are comparable on a shared machine: the load of other processes
moves absolute times between T (the load average is recorded per T).

Run:

  # CPU, 784-50-50-50-10, T = 100, 300, 1000, 3000 (about 30 minutes on 2 cores):
  python experiments/benchmark.py --out_dir=/tmp/revhyper_benchmark
  # smoke run, under a minute (compiled at XLA optimisation level 0: times mean nothing):
  python experiments/benchmark.py --quick --out_dir=/tmp/revhyper_benchmark_quick
  # one GPU (H100 80 GB), 784-512-512-512-10 (0.93M weights), T = 1000, 3000, 10000:
  python experiments/benchmark.py --device --out_dir=/tmp/revhyper_benchmark_gpu
  # the device configuration, tiny, on a CPU (check it before a GPU run):
  python experiments/benchmark.py --device --sizes=784,32,10 --steps=20,40 --out_dir=/tmp/b
"""

import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for common.py

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402  (common.py has chosen the headless backend)
import numpy as np  # noqa: E402

import revhyper  # noqa: E402

FLAGS = flags.FLAGS

flags.DEFINE_string("out_dir", "/tmp/revhyper_benchmark", "Where results.json and figures go.")
flags.DEFINE_boolean("quick", False, "Tiny configuration (784-16-10, T = 10, 20, one repeat, "
                     "no peak-RSS processes): a smoke run in under a minute.")
flags.DEFINE_boolean("device", False, "Configuration sized for one GPU (H100, 80 GB): "
                     "784-512-512-512-10, T = 1000, 3000, 10000, no peak-RSS processes.")
flags.DEFINE_list("sizes", None, "Layer widths; default 784,50,50,50,10 (--device: "
                  "784,512,512,512,10; --quick: 784,16,10).")
flags.DEFINE_list("steps", None, "Training lengths T; default 100,300,1000,3000 (--device: "
                  "1000,3000,10000; --quick: 10,20).")
flags.DEFINE_list("methods", ["forward_float", "forward_exact", "unroll", "remat",
                              "checkpoint_sqrt", "reversible", "adam_unroll",
                              "adam_reversible", "sgdtrace_unroll", "sgdtrace_reversible",
                              "rmsprop_unroll", "rmsprop_reversible", "adabelief_unroll",
                              "adabelief_reversible", "clipadamw_unroll",
                              "clipadamw_reversible"], "Methods to measure.")
flags.DEFINE_integer("batch_size", 200, "Minibatch size.")
flags.DEFINE_float("learning_rate", math.exp(-1.0), "Learning rate of every layer (e**-1).")
flags.DEFINE_float("momentum", 0.9, "Momentum gamma.")
flags.DEFINE_float("adam_learning_rate", 1e-3, "Learning rate of every layer in the Adam rows.")
flags.DEFINE_float("adam_weight_decay", 0.0, "Decoupled weight decay of the Adam rows. The "
                   "learning rate is a traced hyperparameter, so a nonzero value sizes the "
                   "weights' bit stack from Reversible(min_decay=0.9).")
flags.DEFINE_float("init_scale", math.exp(-3.0), "Initial weight scale (the paper's e**-3).")
flags.DEFINE_float("l2", 1e-4, "L2 penalty on the weights.")
flags.DEFINE_boolean("tune_momentum", False, "Also differentiate with respect to the "
                     "momentum's logit (traced under jit: needs Reversible(min_decay)).")
flags.DEFINE_integer("num_train", 9000, "Training digits (the rest of the 10,000 bundled "
                     "digits, up to --num_val, are the validation set).")
flags.DEFINE_integer("num_val", 1000, "Validation digits for the meta-objective.")
flags.DEFINE_integer("seed", 0, "Seed of the initial-weight noise and of the minibatch order.")
flags.DEFINE_integer("repeats", None, "Timed calls per method after the warm-up; default 5 "
                     "(--device: 3, --quick: 1).")
flags.DEFINE_float("memory_limit_gb", None, "Methods whose XLA memory plan exceeds this are "
                   "compiled but not run. Default: 90% of the accelerator's memory limit, or "
                   "on a CPU 16 GB (at most 70% of physical memory).")
flags.DEFINE_boolean("measure_rss", None, "Measure each method's peak resident memory in a "
                     "fresh process (costs one compile and one run more per method). Default "
                     "on, off with --quick or --device.")
flags.DEFINE_string("rss_child", None, "Internal: 'method,T' makes this process compile and "
                    "run that one method once and print its peak resident memory.")

# Momenta are rounded to multiples of 2**-16 by revhyper.sgd (its docstring); the exact
# method's information bound is log2(2**16 / n) bits per weight per step for gamma = n / 2**16.
MOMENTUM_GRID = 2**16

# Optimizers measured in pairs, each reversible row against its own unroll: "<name>_unroll"
# and "<name>_reversible".
FAMILIES = ("adam", "sgdtrace", "rmsprop", "adabelief", "clipadamw")
PAIRED_METHODS = tuple(f"{f}_{m}" for f in FAMILIES for m in ("unroll", "reversible"))
HYPERGRADIENT_METHODS = ("unroll", "remat", "checkpoint_sqrt", "reversible") + PAIRED_METHODS
EXACT_METHODS = ("reversible", "forward_exact") + tuple(f"{f}_reversible" for f in FAMILIES)


def own_unroll(name):
  """The store-all reference of a method: its optimizer's unroll."""
  return name.rsplit("_", 1)[0] + "_unroll" if name in PAIRED_METHODS else "unroll"

FORWARD_METHODS = ("forward_float", "forward_exact")
ALL_METHODS = FORWARD_METHODS + HYPERGRADIENT_METHODS
# Reference for hypergradient errors: store-all backprop, else the float method that fits.
REFERENCE_ORDER = ("unroll", "remat", "checkpoint_sqrt")
RSS_MARKER = "RSS_RESULT "
ISSUE_SIZES = [784, 50, 50, 50, 10]  # the configuration the issue's targets are stated for

PRESETS = {
    # Five repeats: on a shared 2-core machine single calls vary by up to 3x.
    "default": dict(sizes="784,50,50,50,10", steps="100,300,1000,3000", repeats=5, rss=True,
                    compiler_options=None),
    "device": dict(sizes="784,512,512,512,10", steps="1000,3000,10000", repeats=3, rss=False,
                   compiler_options=None),
    # A smoke run's times mean nothing, and its 12 compiles dominate it: XLA's backend
    # optimisation level 0 compiles about 1.6x faster on a CPU (measured at 784-16-10).
    "quick": dict(sizes="784,16,10", steps="10,20", repeats=1, rss=False,
                  compiler_options={"xla_backend_optimization_level": 0}),
}

STYLE = {  # one colour and line per method, the same in both figures
    "forward_float": dict(color="0.55", linestyle="--", marker="o"),
    "forward_exact": dict(color="tab:green", linestyle="--", marker="s"),
    "unroll": dict(color="tab:red", linestyle="-", marker="o"),
    "remat": dict(color="tab:orange", linestyle="-", marker="^"),
    "checkpoint_sqrt": dict(color="tab:purple", linestyle="-", marker="v"),
    "reversible": dict(color="tab:blue", linestyle="-", marker="D", linewidth=2.2),
    "adam_unroll": dict(color="tab:brown", linestyle=":", marker="o"),
    "adam_reversible": dict(color="tab:cyan", linestyle=":", marker="D", linewidth=2.2),
    "sgdtrace_unroll": dict(color="tab:olive", linestyle="-.", marker="o"),
    "sgdtrace_reversible": dict(color="tab:olive", linestyle="-.", marker="D"),
    "rmsprop_unroll": dict(color="tab:pink", linestyle="-.", marker="o"),
    "rmsprop_reversible": dict(color="tab:pink", linestyle="-.", marker="D"),
    "adabelief_unroll": dict(color="tab:gray", linestyle="-.", marker="o"),
    "adabelief_reversible": dict(color="tab:gray", linestyle="-.", marker="D"),
    "clipadamw_unroll": dict(color="black", linestyle="-.", marker="o"),
    "clipadamw_reversible": dict(color="black", linestyle="-.", marker="D"),
}


def config_from_flags():
  """Resolves the mode presets and explicit flags into one plain dict."""
  if FLAGS.quick and FLAGS.device:
    raise app.UsageError("--quick and --device are exclusive.")
  preset = PRESETS["quick" if FLAGS.quick else "device" if FLAGS.device else "default"]
  sizes = [int(s) for s in (FLAGS.sizes or preset["sizes"].split(","))]
  steps = sorted(int(s) for s in (FLAGS.steps or preset["steps"].split(",")))
  unknown = set(FLAGS.methods) - set(ALL_METHODS)
  if unknown:
    raise app.UsageError(f"unknown methods {sorted(unknown)}; choose from {ALL_METHODS}.")
  if sizes[0] != 784:
    raise app.UsageError("the first layer must have 784 inputs (MNIST pixels).")
  if FLAGS.num_train + FLAGS.num_val > 10000:
    raise app.UsageError("--num_train + --num_val must be at most 10,000 (bundled digits).")
  return dict(
      mode="quick" if FLAGS.quick else "device" if FLAGS.device else "default",
      sizes=sizes,
      steps=steps,
      methods=[m for m in ALL_METHODS if m in FLAGS.methods],
      batch_size=FLAGS.batch_size,
      learning_rate=FLAGS.learning_rate,
      momentum=FLAGS.momentum,
      adam_learning_rate=FLAGS.adam_learning_rate,
      adam_weight_decay=FLAGS.adam_weight_decay,
      init_scale=FLAGS.init_scale,
      l2=FLAGS.l2,
      tune_momentum=FLAGS.tune_momentum,
      num_train=FLAGS.num_train,
      num_val=FLAGS.num_val,
      seed=FLAGS.seed,
      repeats=preset["repeats"] if FLAGS.repeats is None else FLAGS.repeats,
      measure_rss=preset["rss"] if FLAGS.measure_rss is None else FLAGS.measure_rss,
      memory_limit_bytes=common.memory_limit_bytes(FLAGS.memory_limit_gb),
      compiler_options=preset["compiler_options"],
  )


class Problem:
  """The training problem and the meta-objective, built once per process."""

  def __init__(self, cfg):
    self.cfg = cfg
    images, labels = revhyper.datasets.load_mnist()
    n_train, n_val = cfg["num_train"], cfg["num_val"]
    mean = revhyper.datasets.pixel_mean(images[:n_train])
    # Closed over by the losses, so the data are constants of every compiled program alike;
    # each minibatch is a pure function of the step (revhyper.datasets.batch_indices).
    self.x_train = jnp.asarray(revhyper.datasets.preprocess(images[:n_train], mean))
    self.y_train = jnp.asarray(labels[:n_train], jnp.int32)
    self.x_val = jnp.asarray(revhyper.datasets.preprocess(images[n_train:n_train + n_val], mean))
    self.y_val = jnp.asarray(labels[n_train:n_train + n_val], jnp.int32)
    key = jax.random.key(cfg["seed"])
    self.noise = revhyper.models.mlp_noise(jax.random.fold_in(key, 0), cfg["sizes"])
    self.batch_key = jax.random.fold_in(key, 1)
    self.num_weights = sum(int(x.size) for x in jax.tree.leaves(self.noise))
    self.hparams = {
        "log_learning_rate": revhyper.hyper.constant_like(
            self.noise, math.log(cfg["learning_rate"]), jnp.float32),
        "log_init_scale": revhyper.hyper.constant_like(
            self.noise, math.log(cfg["init_scale"]), jnp.float32),
        "log_l2": jnp.float32(math.log(cfg["l2"])),
    }
    if cfg["tune_momentum"]:
      self.hparams["logit_momentum"] = jnp.float32(revhyper.hyper.logit(cfg["momentum"]))
    self.momentum_numerator = round(cfg["momentum"] * MOMENTUM_GRID)
    self.bound_bits = math.log2(MOMENTUM_GRID / self.momentum_numerator)

  def train_loss(self, params, log_l2, t):
    idx = revhyper.datasets.batch_indices(self.batch_key, t, self.cfg["num_train"],
                                 self.cfg["batch_size"])
    logits = revhyper.models.mlp_apply(params, self.x_train[idx])
    penalty = sum(jnp.sum(layer["W"] ** 2) for layer in params)
    return revhyper.models.softmax_cross_entropy(logits, self.y_train[idx]) + jnp.exp(log_l2) * penalty

  def sgd_method(self, name):
    if name in PAIRED_METHODS and name.endswith("_unroll"):
      return revhyper.Unroll()
    if name == "adam_reversible":
      return revhyper.Reversible(min_decay=0.9 if self.cfg["adam_weight_decay"] else None)
    if name == "clipadamw_reversible":  # lr * weight_decay is traced: bound the decay
      return revhyper.Reversible(min_decay=0.9)
    if name in PAIRED_METHODS:
      return revhyper.Reversible()
    if name in ("unroll", "forward_float"):
      return revhyper.Unroll()
    if name == "checkpoint_sqrt":
      return revhyper.Checkpoint()
    if name == "remat":
      return revhyper.Checkpoint(segment_length=1)
    if self.cfg["tune_momentum"]:
      # The momentum is traced under jit, so the bit stack is sized from a static lower
      # bound: one grid step below the momentum, in case its float32 sigmoid rounds down.
      return revhyper.Reversible(min_decay=(self.momentum_numerator - 1) / MOMENTUM_GRID)
    return revhyper.Reversible()

  def meta(self, hparams, name, num_steps):
    """Validation loss after num_steps of training, and the run's statistics."""
    params = revhyper.models.mlp_init_from_noise(self.noise, hparams["log_init_scale"])
    if "logit_momentum" in hparams:
      momentum = revhyper.hyper.momentum_from_logit(hparams["logit_momentum"])
    else:
      momentum = self.cfg["momentum"]
    learning_rate = revhyper.hyper.learning_rate_from_log(hparams["log_learning_rate"])
    if name in PAIRED_METHODS and not name.startswith("adam_"):
      out = revhyper.train(self.train_loss, params, hparams["log_l2"],
                           self.optimizer(name.rsplit("_", 1)[0], learning_rate, momentum),
                           num_steps=num_steps, method=self.sgd_method(name))
    elif name in PAIRED_METHODS:
      scale = self.cfg["adam_learning_rate"] / self.cfg["learning_rate"]
      out = revhyper.adam(
          self.train_loss, params, hparams["log_l2"], num_steps=num_steps,
          learning_rate=jax.tree.map(lambda lr: lr * scale, learning_rate),
          weight_decay=self.cfg["adam_weight_decay"], method=self.sgd_method(name))
    else:
      out = revhyper.sgd(
          self.train_loss, params, hparams["log_l2"], num_steps=num_steps,
          learning_rate=learning_rate, momentum=momentum, method=self.sgd_method(name))
    logits = revhyper.models.mlp_apply(out.params, self.x_val)
    return revhyper.models.softmax_cross_entropy(logits, self.y_val), out.stats

  def optimizer(self, family, learning_rate, momentum):
    """A revhyper.optim optimizer of the benchmark's rates (per-layer pytrees)."""
    optim = revhyper.optim
    scale = self.cfg["adam_learning_rate"] / self.cfg["learning_rate"]
    adaptive = jax.tree.map(lambda lr: lr * scale, learning_rate)
    if family == "sgdtrace":
      return optim.sgd(jax.tree.map(lambda lr: lr * (1 - momentum), learning_rate),
                       momentum=momentum)
    if family == "rmsprop":
      return optim.rmsprop(adaptive, decay=0.9, momentum=momentum)
    if family == "adabelief":
      return optim.adabelief(adaptive)
    return optim.chain(optim.clip_by_global_norm(1.0),
                       optim.adamw(adaptive, weight_decay=1e-2))

  def function(self, name, num_steps):
    """The jitted function measured for a method: a hypergradient, or training alone."""
    meta = lambda h: self.meta(h, name, num_steps)
    if name in FORWARD_METHODS:
      return jax.jit(meta)
    return jax.jit(jax.grad(meta, has_aux=True))


def compile_method(problem, name, num_steps):
  return common.compile_with_plan(problem.function(name, num_steps), (problem.hparams,),
                                  problem.cfg["compiler_options"])


format_bytes = common.format_bytes


def relative_errors(got, reference):
  """Global relative L2 error over all leaves, and the largest per-leaf one."""
  got = [np.asarray(x, np.float64) for x in jax.tree.leaves(got)]
  ref = [np.asarray(x, np.float64) for x in jax.tree.leaves(reference)]
  diff = math.sqrt(sum(float(np.sum((g - r) ** 2)) for g, r in zip(got, ref)))
  norm = math.sqrt(sum(float(np.sum(r ** 2)) for r in ref))
  per_leaf = [float(np.linalg.norm(g - r)) / max(float(np.linalg.norm(r)), 1e-30)
              for g, r in zip(got, ref)]
  return {"global": diff / max(norm, 1e-30), "max_per_leaf": max(per_leaf)}


def stats_record(problem, stats, num_steps, adam=False):
  bits = float(stats.bits_per_weight_per_step)
  bound = float(stats.information_bound_bits) / (problem.num_weights * num_steps)
  # Adam's bound is a sum over its decays, which the statistics compute from the numerators.
  reference = bound if adam else problem.bound_bits
  return {
      "bits_per_weight_per_step": bits,
      "bound_bits_per_weight_per_step": reference,
      "bound_from_stats": bound,
      "bits_over_bound": bits / reference,
      "bits_stored": float(stats.bits_stored),
      "bytes_stored": float(stats.bits_stored) / 8,
      "capacity_bits": float(stats.capacity_bits),
      "fixed_point_overflow": bool(stats.fixed_point_overflow),
      "buffer_overflow": bool(stats.buffer_overflow),
      "non_finite": bool(stats.non_finite),
  }


def measure_rss(name, num_steps):
  """Runs this script in a fresh process for one method; returns its memory record."""
  command = [sys.executable, os.path.abspath(__file__)] + sys.argv[1:] + [
      f"--rss_child={name},{num_steps}"]
  # On a GPU, a second process can only allocate what the first left unreserved: run the
  # parent with XLA_PYTHON_CLIENT_PREALLOCATE=false too when measuring there.
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  proc = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
  for line in proc.stdout.splitlines():
    if line.startswith(RSS_MARKER):
      return json.loads(line[len(RSS_MARKER):])
  return {"error": f"exit status {proc.returncode}: {proc.stderr.strip()[-2000:]}"}


def peak_rss_bytes():
  """This process's peak resident memory: VmHWM where /proc has it, else ru_maxrss.

  ru_maxrss is not enough on Linux: a process started by fork (or vfork) and exec inherits
  the parent's high-water mark through exec (measured: every child reported exactly its
  parent's peak). VmHWM belongs to the address space that exec creates, so it is the child's.
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024  # reported in kB
  except OSError:
    pass
  return ru_maxrss_bytes()


def ru_maxrss_bytes():
  # ru_maxrss is in kilobytes on Linux, bytes on macOS.
  scale = 1 if sys.platform == "darwin" else 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def rss_child(cfg, spec):
  """Compiles and runs one method once, then prints the process's peak resident memory."""
  name, num_steps = spec.split(",")
  problem = Problem(cfg)
  jax.block_until_ready(problem.hparams)
  record = {"baseline_bytes": peak_rss_bytes()}  # interpreter, JAX, data and constants
  compiled, _ = compile_method(problem, name, int(num_steps))
  record["after_compile_bytes"] = peak_rss_bytes()
  jax.block_until_ready(compiled(problem.hparams))
  record["peak_bytes"] = peak_rss_bytes()
  record["peak_over_baseline_bytes"] = record["peak_bytes"] - record["baseline_bytes"]
  # The compiler's own peak can exceed the run's at small T; this is what running added.
  record["run_over_compile_bytes"] = record["peak_bytes"] - record["after_compile_bytes"]
  record["ru_maxrss_bytes"] = ru_maxrss_bytes()  # see peak_rss_bytes: may be the parent's
  device_stats = jax.devices()[0].memory_stats()
  if device_stats and "peak_bytes_in_use" in device_stats:
    record["device_peak_bytes"] = int(device_stats["peak_bytes_in_use"])
  print(RSS_MARKER + json.dumps(record), flush=True)


_START = time.perf_counter()


def progress(message):
  print(f"[{time.perf_counter() - _START:6.0f} s] {message}", flush=True)


def measure_steps(problem, num_steps, earlier):
  """Every method at one T, side by side; ``earlier`` holds the smaller T's records."""
  cfg = problem.cfg
  records, compiled = {}, {}
  for name in cfg["methods"]:
    progress(f"T={num_steps} {name}: compiling")
    try:
      compiled[name], records[name] = compile_method(problem, name, num_steps)
    except Exception as e:  # noqa: BLE001  (a failing method is reported, the rest still run)
      records[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
      progress(f"T={num_steps} {name}: {records[name]['error']}")
      continue
  common.drop_unfitting(compiled, records, cfg["memory_limit_bytes"], f"T={num_steps}", progress)
  outputs, _ = common.time_round_robin(compiled, records, (problem.hparams,), cfg["repeats"],
                                       num_steps, f"T={num_steps}", progress)
  del compiled

  for name, (value, stats) in outputs.items():
    if name in EXACT_METHODS:
      records[name]["stats"] = stats_record(problem, stats, num_steps, name in PAIRED_METHODS)
    if name in FORWARD_METHODS:
      records[name]["meta_objective"] = float(value)
  for name in HYPERGRADIENT_METHODS:
    reference = next((m for m in REFERENCE_ORDER if m in outputs), None)
    if name in PAIRED_METHODS:
      reference = own_unroll(name) if own_unroll(name) in outputs else None
    if name in outputs and reference is not None:
      records[name]["error_reference"] = reference
      records[name]["relative_error"] = relative_errors(outputs[name][0], outputs[reference][0])

  for name, record in records.items():
    if "time_s" not in record:
      scaled = [(t, r[name]["time_s"]) for t, r in earlier.items() if "time_s" in r.get(name, {})]
      if scaled:
        t_known, s_known = max(scaled)
        record["time_estimate_s"] = s_known * num_steps / t_known
        record["time_estimate_from_steps"] = t_known
    if cfg["measure_rss"] and "time_s" in record:
      progress(f"T={num_steps} {name}: peak RSS in a fresh process")
      record["rss"] = measure_rss(name, num_steps)
  return records


def ratio(a, b):
  return a / b if a is not None and b else None


def value(records, name, *keys):
  x = records.get(name, {})
  for k in keys:
    x = x.get(k) if isinstance(x, dict) else None
  return x


def table(results):
  """Rows of per-method numbers and ratios against unroll, for printing."""
  lines = []
  head = (f"{'method':<22}{'time s':>9}{'x unroll':>9}{'ms/step':>9}{'compile s':>10}"
          f"{'XLA temp MB':>13}{'x unroll':>10}{'peak RSS MB':>12}{'bits/w/step':>12}"
          f"{'rel err':>10}")
  for key, records in results["steps"].items():
    load = results.get("load_average", {}).get(key)
    load = f"  (load average {load[0]:.1f} before, {load[1]:.1f} after)" if load else ""
    lines += ["", f"T = {key}{load}", head]
    for name, r in records.items():
      ref = own_unroll(name)  # each against its own unroll
      t_ref = value(records, ref, "time_s") or value(records, ref, "time_estimate_s")
      m_ref = value(records, ref, "memory", "temp_bytes")
      t = r.get("time_s")
      estimated = t is None and r.get("time_estimate_s") is not None
      t = r.get("time_estimate_s") if estimated else t
      temp = value(records, name, "memory", "temp_bytes")
      rss = value(records, name, "rss", "peak_bytes")
      bits = value(records, name, "stats", "bits_per_weight_per_step")
      err = value(records, name, "relative_error", "global")
      cells = [
          f"{name:<22}",
          (f"{'~' + format(t, '.3g'):>9}" if estimated else f"{t:>9.3g}") if t else
          f"{'error' if 'error' in r else '-':>9}",
          f"{ratio(t, t_ref):>9.3f}" if ratio(t, t_ref) else f"{'-':>9}",
          f"{1e3 * t / int(key):>9.3f}" if t else f"{'-':>9}",
          f"{r['compile_s']:>10.1f}" if "compile_s" in r else f"{'-':>10}",
          f"{temp / 1e6:>13.2f}" if temp is not None else f"{'-':>13}",
          f"{ratio(temp, m_ref):>10.4f}" if temp is not None and m_ref else f"{'-':>10}",
          f"{rss / 1e6:>12.0f}" if rss else f"{'-':>12}",
          f"{bits:>12.5f}" if bits is not None else f"{'-':>12}",
          f"{err:>10.2e}" if err is not None else f"{'-':>10}",
      ]
      note = "  (not run: " + r["not_run"] + ")" if "not_run" in r else ""
      note += "  (" + r["error"][:120] + ")" if "error" in r else ""
      reference = r.get("error_reference", ref)
      note += f"  (rel err against {reference})" if reference != ref else ""
      if name in PAIRED_METHODS and name.endswith("_reversible"):
        note += f"  (ratios and rel err against {ref})"
      note += "  (time estimated)" if estimated else ""
      lines.append("".join(cells) + note)
  lines.append("")
  lines.append(f"bound: log2(2**16 / {round(results['config']['momentum'] * MOMENTUM_GRID)}) "
               f"= {results['bound_bits_per_weight_per_step']:.5f} bits per weight per step; "
               "~ marks a time estimated by scaling a smaller T; rel err is the global "
               "relative L2 error of the hypergradient against unroll's (or the first float "
               "method that ran).")
  return "\n".join(lines)


def targets(results):
  """The issue's targets (CPU, 784-50-50-50-10, gamma 0.9), where this run measured them."""
  out = []
  cfg = results["config"]
  if not (cfg["sizes"] == ISSUE_SIZES and cfg["momentum"] == 0.9
          and results["machine"]["platform"] == "cpu"):
    return out

  def add(what, num_steps, measured, limit, met):
    out.append({"target": what, "steps": num_steps, "measured": measured, "limit": limit,
                "met": bool(met)})

  for key, records in results["steps"].items():
    t_rev, t_unroll = value(records, "reversible", "time_s"), value(records, "unroll", "time_s")
    t_sqrt = value(records, "checkpoint_sqrt", "time_s")
    m_rev = value(records, "reversible", "memory", "temp_bytes")
    m_unroll = value(records, "unroll", "memory", "temp_bytes")
    f_exact = value(records, "forward_exact", "time_s")
    f_float = value(records, "forward_float", "time_s")
    bits = value(records, "reversible", "stats", "bits_over_bound")
    if key == "1000":
      if t_rev and t_unroll:
        add("reversible hypergradient time / unroll", 1000, t_rev / t_unroll, 1.5,
            t_rev <= 1.5 * t_unroll)
      if m_rev is not None and m_unroll:
        add("reversible XLA temporaries / unroll", 1000, m_rev / m_unroll, 0.01,
            m_rev <= 0.01 * m_unroll)
      if bits is not None:
        add("bits per weight per step / bound", 1000, bits, 1.01, abs(bits - 1) <= 0.01)
    if key == "3000" and t_rev and t_sqrt:
      add("reversible time / checkpoint_sqrt", 3000, t_rev / t_sqrt, 1.0, t_rev <= t_sqrt)
    if f_exact and f_float:
      add("exact forward / float forward", int(key), f_exact / f_float, 1.2,
          f_exact <= 1.2 * f_float)
  return out


def plot(results, out_dir):
  steps = [int(k) for k in results["steps"]]
  device = results["machine"]
  device = device["cpu"] if device["platform"] == "cpu" else device["device_kind"]
  label = (f"{device}, MLP {'-'.join(map(str, results['config']['sizes']))}, "
           f"gamma {results['config']['momentum']}")

  def finish(ax, title, ylabel, yscale="log"):
    ax.set(xscale="log", yscale=yscale, xlabel="training steps T", ylabel=ylabel, title=title)
    ax.set_xticks(steps, [str(t) for t in steps])  # the measured T, in plain numbers
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    plain = matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}")
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    # Less than about a decade shows one major tick or none: label the minor ones too.
    short = yscale == "log" and high / low < 20
    ax.yaxis.set_minor_formatter(plain if short else matplotlib.ticker.NullFormatter())
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)

  def series(name, get):
    xs, ys = [], []
    for t in steps:
      r = results["steps"][str(t)].get(name)
      y = get(r) if r else None
      if y:
        xs.append(t)
        ys.append(y)
    return xs, ys

  # Absolute times move with the load on a shared machine from one T to the next; ratios
  # measured side by side at the same T do not, so they get their own panel.
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
  for name in results["config"]["methods"]:
    kind = "hypergradient" if name in HYPERGRADIENT_METHODS else "training only"
    xs, ys = series(name, lambda r: r.get("time_s"))
    if xs:
      axes[0].plot(xs, ys, label=f"{name} ({kind})", **STYLE[name])
    xs, ys = series(name, lambda r: r.get("time_s"))
    units = [(x, y / results["steps"][str(x)]["unroll"]["time_s"]) for x, y in zip(xs, ys)
             if value(results["steps"][str(x)], "unroll", "time_s")]
    if units:
      axes[1].plot(*zip(*units), label=name, **STYLE[name])
  finish(axes[0], f"Time, compile excluded (median)\n{label}", "wall time (s)")
  finish(axes[1], "Time relative to unroll's hypergradient\n(measured side by side at each T)",
         "time / unroll", yscale="linear")
  axes[1].axhline(1.0, color="k", linewidth=0.6)
  common.save_figure(fig, out_dir, "time.png")

  has_rss = any(value(r, n, "rss", "peak_bytes") for r in results["steps"].values() for n in r)
  fig, axes = plt.subplots(1, 2 if has_rss else 1, figsize=(12 if has_rss else 6.4, 4.6),
                           squeeze=False)
  ax = axes[0, 0]
  for name in results["config"]["methods"]:
    xs, ys = series(name, lambda r: r.get("memory", {}).get("temp_bytes", 0) / 1e6)
    if xs:
      ax.plot(xs, ys, label=name, **STYLE[name])
    xs, ys = series(name, lambda r: r["memory"]["temp_bytes"] / 1e6 if "not_run" in r else 0)
    if xs:  # planned but not run: a ring around the point
      ax.plot(xs, ys, linestyle="none", marker=STYLE[name]["marker"], markersize=11,
              markerfacecolor="none", markeredgecolor=STYLE[name]["color"])
  limit = results["config"]["memory_limit_bytes"] / 1e6
  if any("not_run" in r for records in results["steps"].values() for r in records.values()):
    ax.axhline(limit, color="k", linewidth=0.8, linestyle=":")
    ax.text(steps[0], limit, " memory limit (ringed: planned, not run)", va="bottom",
            fontsize=8)
  finish(ax, f"XLA temporary memory (memory_analysis)\n{label}", "MB")
  if has_rss:
    ax = axes[0, 1]
    for name in results["config"]["methods"]:
      xs, ys = series(name, lambda r: (r.get("rss") or {}).get("peak_bytes", 0) / 1e6)
      if xs:
        ax.plot(xs, ys, label=name, **STYLE[name])
    finish(ax, "Peak resident memory of a fresh process\n(includes JAX, data and compiler)",
           "MB")
  common.save_figure(fig, out_dir, "memory.png")


def cpu_name():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine():
  device = jax.devices()[0]
  return {
      "platform": device.platform,
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "cpu": cpu_name(),
      "cpu_count": os.cpu_count(),
      "os": platform.platform(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "revhyper": revhyper.__version__,
      "revhyper_file": revhyper.__file__,
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "load_average_at_start": list(os.getloadavg()),
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = config_from_flags()
  if FLAGS.rss_child:
    rss_child(cfg, FLAGS.rss_child)
    return
  out_dir = common.prepare_out_dir(FLAGS.out_dir)
  problem = Problem(cfg)
  results = {
      "description": "Hypergradient (jit(grad(meta))) and training-only (jit(meta)) time and "
                     "memory of revhyper.sgd's methods, measured side by side in one process.",
      "command": " ".join([sys.executable] + sys.argv),
      "machine": machine(),
      "config": cfg,
      "num_weights": problem.num_weights,
      "hyperparameters": sorted(problem.hparams),
      "bound_bits_per_weight_per_step": problem.bound_bits,
      "steps": {},
      "load_average": {},  # one-minute load average before and after each T
      "complete": False,
  }
  print(f"{problem.num_weights} weights, T = {cfg['steps']}, methods {cfg['methods']}, "
        f"{results['machine']['device_kind']}", flush=True)
  start = time.perf_counter()
  for num_steps in cfg["steps"]:
    earlier = {int(k): v for k, v in results["steps"].items()}
    load_before = os.getloadavg()[0]
    results["steps"][str(num_steps)] = measure_steps(problem, num_steps, earlier)
    # Other processes' load explains most of the spread in absolute times between T.
    results["load_average"][str(num_steps)] = [load_before, os.getloadavg()[0]]
    results["elapsed_s"] = time.perf_counter() - start
    common.save_results(out_dir, results)  # keep finished T if a later one is interrupted
  results["targets"] = targets(results)
  results["machine"]["load_average_at_end"] = list(os.getloadavg())
  results["complete"] = True
  common.save_results(out_dir, results)
  plot(results, out_dir)
  print(table(results))
  for t in results["targets"]:
    print(f"target T={t['steps']}: {t['target']} = {t['measured']:.4g} (limit {t['limit']}): "
          f"{'met' if t['met'] else 'NOT met'}")
  print(f"wrote {out_dir}/results.json, time.png, memory.png in {results['elapsed_s']:.0f} s")


if __name__ == "__main__":
  app.run(main)
