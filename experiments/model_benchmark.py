r"""Benchmark: hypergradients of a BatchNorm resnet and a dropout transformer, by every method.

Two models with more than weights in their training step, both trained with AdamW (b1 0.9, b2
0.999, eps_root 1e-8, which keeps the hypergradient finite where a second moment is zero; the
training loss scaled by --loss_scale, which keeps the second moments in their grid's range) on
the bundled MNIST digits (inputs / 255, mean-subtracted), minibatches a pure function of the
step:

  resnet       revhyper.models.resnet_*: a residual convnet whose BatchNorm layers' running
               averages are carried through training by revhyper.RunningAverage (decay
               --bn_decay); the validation loss normalises with the final averages.
  transformer  revhyper.models.transformer_*: a pre-LN transformer reading each digit as 16
               tokens of 7x7 patches, with dropout whose masks are folded from the step.

The meta-objective is the validation loss after T steps; its hypergradient is taken with
respect to a per-step log learning rate ([T]), the log weight decay, a log initialisation scale
(multiplying every weight matrix and convolution kernel) and, for the transformer, the dropout
rate. For each model, side by side in one process, each method is traced, compiled and run:

  unroll      jit(grad(meta)) with "unroll": store-all backprop, the reference
  checkpoint  jit(grad(meta)) with Checkpoint(): ceil(sqrt(T))-step segments
  reversible  jit(grad(meta)) with Reversible(min_decay=--min_decay): exact reversal

and measured as experiments/benchmark.py does: the median wall time over --repeats calls of
the compiled function after a warm-up call (round-robin over the methods, so that other
processes' load falls on all alike: the ratios are the robust numbers), trace and compile time,
and XLA's memory plan (compiled.memory_analysis(): temporaries, arguments, outputs). Each
hypergradient's relative L2 error is taken against unroll's (or checkpoint's where unroll did
not run). Then revhyper.round_trip trains the model exactly and runs training backwards: it
must rebuild the initial weights, optimizer states and running averages bit for bit.

Store-all backprop's temporaries grow linearly in T. With --estimate_steps (the --device
preset), unroll is first compiled at those two small T and its temporaries are extrapolated
linearly to T and printed; where the estimate exceeds --memory_limit_gb, unroll is neither
compiled nor run at T. Any method whose compiled plan exceeds the limit is compiled, not run.

Writes --out_dir/results.json (the launchers' shared schema, experiments/common.py; rewritten
after each model) and prints a table.

Run:

  # CPU, both models, T = 1000 (about 15 minutes on 2 shared cores):
  python experiments/model_benchmark.py --out_dir=/tmp/revhyper_model_benchmark
  # one GPU, T = 10,000, models whose store-all backprop needs hundreds of GB (estimated):
  python experiments/model_benchmark.py --device --out_dir=/tmp/revhyper_model_benchmark_gpu
  # the device configuration's estimate of unroll's memory on a CPU (compiles, runs nothing):
  python experiments/model_benchmark.py --device --methods=unroll --noround_trip \
      --memory_limit_gb=80 --out_dir=/tmp/m
  # smoke run (T = 5, tiny widths, compiled at XLA optimisation level 0: times mean nothing):
  python experiments/model_benchmark.py --quick --out_dir=/tmp/revhyper_model_benchmark_quick
"""

import math
import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for common.py

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import revhyper  # noqa: E402
from revhyper import models  # noqa: E402
from revhyper import optim  # noqa: E402

FLAGS = flags.FLAGS

MODELS = ("resnet", "transformer")
METHODS = ("unroll", "checkpoint", "reversible")
# Errors are taken against store-all backprop, else against checkpointing.
REFERENCE_ORDER = ("unroll", "checkpoint")

flags.DEFINE_string("out_dir", "/tmp/revhyper_model_benchmark", "Where results.json goes.")
flags.DEFINE_enum("model", "both", MODELS + ("both",), "Which model(s) to benchmark.")
flags.DEFINE_boolean("device", False, "Configuration sized for one GPU: T = 10,000 and models "
                     "whose store-all backprop would need far more than 80 GB (estimated "
                     "from --estimate_steps, not run).")
flags.DEFINE_boolean("quick", False, "Smoke run: T = 5, tiny widths, one repeat, compiled at "
                     "XLA's optimisation level 0 (times mean nothing).")
flags.DEFINE_list("methods", list(METHODS), "Hypergradient methods to measure.")
flags.DEFINE_boolean("round_trip", True, "Also check the exact round trip of each model.")
flags.DEFINE_integer("steps", None, "Training steps T (default 1000; --device: 10,000; "
                     "--quick: 5).")
flags.DEFINE_list("estimate_steps", None, "Two small T at which unroll is compiled to "
                  "extrapolate its memory plan linearly to T (--device: 20,40).")
flags.DEFINE_integer("batch_size", None, "Minibatch size (default 16; --device: 128; "
                     "--quick: 4).")
flags.DEFINE_integer("repeats", None, "Timed calls per method after the warm-up (default 2; "
                     "--device and --quick: 1).")
flags.DEFINE_list("resnet_channels", None, "Widths of the resnet's stages (default 4,8; "
                  "--device: 32,64; --quick: 4).")
flags.DEFINE_integer("resnet_blocks", None, "Residual blocks per stage (default 1).")
flags.DEFINE_integer("transformer_width", None, "Transformer width (default 16; --device: "
                     "128; --quick: 8).")
flags.DEFINE_integer("transformer_depth", None, "Transformer blocks (default 2; --device: "
                     "4; --quick: 1).")
flags.DEFINE_integer("transformer_heads", None, "Attention heads (default 2; --device: 4).")
flags.DEFINE_float("learning_rate", 1e-3, "AdamW's learning rate at every step.")
flags.DEFINE_float("weight_decay", 1e-2, "AdamW's decoupled weight decay.")
flags.DEFINE_float("min_decay", 0.999, "Reversible(min_decay): a lower bound on the traced "
                   "weight-decay factor 1 - learning_rate * weight_decay, which sizes the bit "
                   "stack.")
flags.DEFINE_float("loss_scale", 0.25, "The training loss is multiplied by this: AdamW is "
                   "invariant to it (but for eps), and it keeps the second moments inside the "
                   "range of their fixed-point grid, [0, 2) (at 1 the transformer's reach 3.6 "
                   "by T = 1000, and the reversible method reports fixed_point_overflow).")
flags.DEFINE_float("dropout_rate", 0.1, "The transformer's dropout rate (a hyperparameter).")
flags.DEFINE_float("bn_decay", 0.9, "Decay of the resnet's running BatchNorm averages.")
flags.DEFINE_integer("num_train", 9000, "Training digits (of the 10,000 bundled).")
flags.DEFINE_integer("num_val", 1000, "Validation digits, after the training ones.")
flags.DEFINE_integer("seed", 0, "Seed of the initial weights, minibatches and dropout masks.")
flags.DEFINE_float("memory_limit_gb", None, "Methods whose XLA memory plan (or, for unroll "
                   "with --estimate_steps, its linear estimate) exceeds this are not run. "
                   "Default: 90% of the accelerator's memory limit, or on a CPU 16 GB (at "
                   "most 70% of physical memory).")

PRESETS = {
    # Sized for about 15 minutes on 2 shared CPU cores: compiling the three hypergradients and
    # the round trip takes about half of it (a few minutes per model).
    "default": dict(steps=1000, estimate_steps=None, batch_size=16, repeats=2,
                    resnet_channels=[4, 8], resnet_blocks=1, transformer_width=16,
                    transformer_depth=2, transformer_heads=2, compiler_options=None),
    # Per step, store-all backprop keeps tens of MB of activations of each model: hundreds of
    # GB at T = 10,000, which the estimate prints.
    "device": dict(steps=10_000, estimate_steps=[20, 40], batch_size=128, repeats=1,
                   resnet_channels=[32, 64], resnet_blocks=1, transformer_width=128,
                   transformer_depth=4, transformer_heads=4, compiler_options=None),
    # The smoke run's compiles dominate it; XLA's backend optimisation level 0 compiles these
    # models several times faster on a CPU.
    "quick": dict(steps=5, estimate_steps=None, batch_size=4, repeats=1, resnet_channels=[4],
                  resnet_blocks=1, transformer_width=8, transformer_depth=1, transformer_heads=2,
                  compiler_options={"xla_backend_optimization_level": 0}),
}
PATCH = 7  # 7x7 patches: 16 tokens of 49 pixels per digit


def config_from_flags():
  """Resolves the presets and explicit flags into one plain dict."""
  if FLAGS.quick and FLAGS.device:
    raise app.UsageError("--quick and --device are exclusive.")
  mode = "quick" if FLAGS.quick else "device" if FLAGS.device else "default"
  preset = PRESETS[mode]
  pick = lambda name: preset[name] if getattr(FLAGS, name) is None else getattr(FLAGS, name)
  unknown = set(FLAGS.methods) - set(METHODS)
  if unknown:
    raise app.UsageError(f"unknown methods {sorted(unknown)}; choose from {METHODS}.")
  if FLAGS.num_train + FLAGS.num_val > 10000:
    raise app.UsageError("--num_train + --num_val must be at most 10,000 (bundled digits).")
  estimate = pick("estimate_steps")
  estimate = sorted(int(t) for t in estimate) if estimate else None
  if estimate is not None and (len(estimate) != 2 or estimate[0] == estimate[1]):
    raise app.UsageError("--estimate_steps needs two different T.")
  return dict(
      mode=mode,
      models=list(MODELS) if FLAGS.model == "both" else [FLAGS.model],
      methods=[m for m in METHODS if m in FLAGS.methods],
      round_trip=FLAGS.round_trip,
      steps=int(pick("steps")),
      estimate_steps=estimate,
      batch_size=int(pick("batch_size")),
      repeats=int(pick("repeats")),
      resnet_channels=[int(c) for c in pick("resnet_channels")],
      resnet_blocks=int(pick("resnet_blocks")),
      transformer_width=int(pick("transformer_width")),
      transformer_depth=int(pick("transformer_depth")),
      transformer_heads=int(pick("transformer_heads")),
      patch=PATCH,
      learning_rate=FLAGS.learning_rate,
      weight_decay=FLAGS.weight_decay,
      min_decay=FLAGS.min_decay,
      loss_scale=FLAGS.loss_scale,
      dropout_rate=FLAGS.dropout_rate,
      bn_decay=FLAGS.bn_decay,
      num_train=FLAGS.num_train,
      num_val=FLAGS.num_val,
      seed=FLAGS.seed,
      memory_limit_bytes=common.memory_limit_bytes(FLAGS.memory_limit_gb),
      compiler_options=preset["compiler_options"],
  )


class Problem:
  """One model's training problem and meta-objective, built once per process."""

  def __init__(self, name, cfg):
    self.name, self.cfg = name, cfg
    images, labels = revhyper.datasets.load_mnist()
    n_train, n_val = cfg["num_train"], cfg["num_val"]
    mean = revhyper.datasets.pixel_mean(images[:n_train])
    x = revhyper.datasets.preprocess(images[:n_train + n_val], mean)
    if name == "transformer":
      x = models.image_patches(x, cfg["patch"])
    # Closed over by the losses, so the data are constants of every compiled program alike.
    self.x_train, self.x_val = jnp.asarray(x[:n_train]), jnp.asarray(x[n_train:])
    self.y_train = jnp.asarray(labels[:n_train], jnp.int32)
    self.y_val = jnp.asarray(labels[n_train:n_train + n_val], jnp.int32)
    key = jax.random.key(cfg["seed"])
    self.batch_key, self.dropout_key = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)
    if name == "resnet":
      self.params = models.resnet_init(jax.random.fold_in(key, 0), cfg["resnet_channels"],
                                       cfg["resnet_blocks"])
      self.initial_running = models.resnet_batchnorm_init(self.params)
    else:
      self.params = models.transformer_init(
          jax.random.fold_in(key, 0), self.x_train.shape[1], self.x_train.shape[2],
          width=cfg["transformer_width"], depth=cfg["transformer_depth"],
          num_heads=cfg["transformer_heads"])
      self.initial_running = None
    self.num_weights = sum(int(a.size) for a in jax.tree.leaves(self.params))
    self.hparams = {
        "log_learning_rate": jnp.full((cfg["steps"],), math.log(cfg["learning_rate"]),
                                      jnp.float32),
        "log_weight_decay": jnp.float32(math.log(cfg["weight_decay"])),
        "log_init_scale": jnp.float32(0.0),
    }
    if name == "transformer":
      self.hparams["dropout_rate"] = jnp.float32(cfg["dropout_rate"])

  def with_steps(self, hparams, num_steps):
    """The hyperparameters of a run of ``num_steps`` steps (the schedule cut or extended)."""
    schedule = hparams["log_learning_rate"]
    schedule = jnp.full((num_steps,), schedule[0], schedule.dtype)
    return dict(hparams, log_learning_rate=schedule)

  def train_loss(self, params, hparams, t):
    idx = revhyper.datasets.batch_indices(self.batch_key, t, self.cfg["num_train"],
                                          self.cfg["batch_size"])
    x, y = self.x_train[idx], self.y_train[idx]
    if self.name == "resnet":
      logits, statistics = models.resnet_apply(params, x)
      return self.scaled(models.softmax_cross_entropy(logits, y)), statistics
    # The dropout masks are a pure function of the step, as exact reversal needs.
    logits = models.transformer_apply(params, x, dropout_rate=hparams["dropout_rate"],
                                      key=jax.random.fold_in(self.dropout_key, t))
    return self.scaled(models.softmax_cross_entropy(logits, y))

  def scaled(self, loss):
    return jnp.asarray(self.cfg["loss_scale"], loss.dtype) * loss

  def initial(self, hparams):
    """Initial weights: every matrix and kernel times the initialisation scale."""
    scale = jnp.exp(hparams["log_init_scale"])
    return jax.tree.map(lambda w: scale * w if w.ndim >= 2 else w, self.params)

  def optimizer(self, hparams):
    return optim.adamw(jnp.exp(hparams["log_learning_rate"]), eps_root=1e-8,
                       weight_decay=jnp.exp(hparams["log_weight_decay"]))

  def model_state(self):
    if self.initial_running is None:
      return None
    return revhyper.RunningAverage(self.initial_running, decay=self.cfg["bn_decay"])

  def method(self, name):
    if name == "unroll":
      return revhyper.Unroll()
    if name == "checkpoint":
      return revhyper.Checkpoint()
    # The weight-decay factor is traced (learning rate and decay are hyperparameters), so
    # its bit stack is sized from a static lower bound.
    return revhyper.Reversible(min_decay=self.cfg["min_decay"])

  def meta(self, hparams, method, num_steps):
    """The validation loss after ``num_steps`` steps of AdamW."""
    out = revhyper.train(self.train_loss, self.initial(hparams), hparams,
                         self.optimizer(hparams), num_steps=num_steps,
                         method=self.method(method), model_state=self.model_state())
    if self.name == "resnet":
      logits, _ = models.resnet_apply(out.params, self.x_val, out.model_state, train=False)
    else:
      logits = models.transformer_apply(out.params, self.x_val)
    return models.softmax_cross_entropy(logits, self.y_val)

  def hypergradient(self, method, num_steps):
    return jax.jit(jax.grad(lambda h: self.meta(h, method, num_steps)))

  def round_trip(self, hparams):
    """Exact training and its reversal; ``.exact`` says whether every bit came back.

    Traced inside the caller's jit (compiled like the hypergradients), so the run's failure
    flags are read from its statistics rather than raised.
    """
    return revhyper.round_trip(
        self.train_loss, self.initial(hparams), hparams, optimizer=self.optimizer(hparams),
        num_steps=self.cfg["steps"],
        method=revhyper.Reversible(min_decay=self.cfg["min_decay"], checks=False),
        model_state=self.model_state())


compile_function = common.compile_with_plan


def relative_errors(got, reference):
  """Global relative L2 error over all hyperparameters, and each one's."""
  got = {k: np.asarray(v, np.float64) for k, v in got.items()}
  ref = {k: np.asarray(v, np.float64) for k, v in reference.items()}
  diff = math.sqrt(sum(float(np.sum((got[k] - ref[k]) ** 2)) for k in ref))
  norm = math.sqrt(sum(float(np.sum(ref[k] ** 2)) for k in ref))
  per = {k: float(np.linalg.norm(got[k] - ref[k])) / max(float(np.linalg.norm(ref[k])), 1e-30)
         for k in ref}
  return {"global": diff / max(norm, 1e-30), "per_hyperparameter": per}


def format_bytes(n):
  return common.format_bytes(n, digits=2)


def estimate_unroll(problem):
  """Unroll's memory plan at two small T, extrapolated linearly to the configured T."""
  cfg = problem.cfg
  planned = {}
  for t in cfg["estimate_steps"]:
    progress(f"{problem.name} unroll at T={t}: compiling for the memory estimate")
    _, record = compile_function(problem.hypergradient("unroll", t),
                                 (problem.with_steps(problem.hparams, t),),
                                 cfg["compiler_options"])
    planned[t] = record["memory"]
  (t1, m1), (t2, m2) = sorted(planned.items())
  out = {"from_steps": [t1, t2], "plans": {str(t): m for t, m in planned.items()}}
  for key in ("temp_bytes", "planned_bytes"):
    slope = (m2[key] - m1[key]) / (t2 - t1)
    out[key] = int(m1[key] + slope * (cfg["steps"] - t1))
    out[key.replace("bytes", "bytes_per_step")] = slope
  return out


def measure_model(name, cfg):
  """Every method's hypergradient side by side, then the round trip, for one model."""
  problem = Problem(name, cfg)
  num_steps, limit = cfg["steps"], cfg["memory_limit_bytes"]
  record = {"num_weights": problem.num_weights, "hyperparameters": sorted(problem.hparams),
            "methods": {}}
  progress(f"{name}: {problem.num_weights} weights, T = {num_steps}")
  methods, compiled = record["methods"], {}
  if "unroll" in cfg["methods"] and cfg["estimate_steps"]:
    estimate = record["unroll_estimate"] = estimate_unroll(problem)
    progress(f"{name} unroll at T={num_steps}: estimated {format_bytes(estimate['temp_bytes'])} "
             f"of temporaries ({format_bytes(estimate['temp_bytes_per_step'])} per step), "
             f"{format_bytes(estimate['planned_bytes'])} planned in all, from T = "
             f"{estimate['from_steps']}; limit {format_bytes(limit)}")
  for method in cfg["methods"]:
    estimate = record.get("unroll_estimate") if method == "unroll" else None
    if estimate and estimate["planned_bytes"] > limit:
      methods[method] = {"fits": False, "not_run": (
          f"estimated {format_bytes(estimate['planned_bytes'])} by scaling its memory plan at "
          f"T = {estimate['from_steps']} linearly, over the {format_bytes(limit)} limit: not "
          "compiled or run")}
      progress(f"{name} {method}: {methods[method]['not_run']}")
      continue
    progress(f"{name} {method}: compiling")
    try:
      compiled[method], methods[method] = compile_function(
          problem.hypergradient(method, num_steps), (problem.hparams,), cfg["compiler_options"])
    except Exception as e:  # noqa: BLE001  (a failing method is reported, the rest still run)
      methods[method] = {"error": f"{type(e).__name__}: {e}"[:2000]}
      progress(f"{name} {method}: {methods[method]['error']}")
      continue
  common.drop_unfitting(compiled, methods, limit, name, progress, digits=2)
  outputs, record["load_average"] = common.time_round_robin(
      compiled, methods, (problem.hparams,), cfg["repeats"], num_steps, name, progress)
  del compiled

  reference = next((m for m in REFERENCE_ORDER if m in outputs), None)
  for method, grads in outputs.items():
    finite = all(bool(np.all(np.isfinite(np.asarray(g)))) for g in grads.values())
    methods[method]["finite"] = finite
    if reference is not None:
      methods[method]["error_reference"] = reference
      methods[method]["relative_error"] = relative_errors(grads, outputs[reference])
  for method in METHODS:
    for other in ("unroll", "checkpoint"):
      if other == method:
        continue
      t, t_other = (methods.get(m, {}).get("time_s") for m in (method, other))
      if t and t_other:
        methods[method][f"time_over_{other}"] = t / t_other
      m, m_other = (methods.get(x, {}).get("memory", {}).get("temp_bytes")
                    for x in (method, other))
      if m is not None and m_other:
        methods[method][f"temp_over_{other}"] = m / m_other

  if cfg["round_trip"]:
    progress(f"{name}: round trip (exact training, then backwards)")
    try:
      compiled_trip, trip_record = compile_function(jax.jit(problem.round_trip),
                                                    (problem.hparams,), cfg["compiler_options"])
      seconds, trip = common.timed_call(compiled_trip, problem.hparams)
      stats = trip.stats
      failed = {flag: bool(getattr(stats, flag)) for flag in (
          "fixed_point_overflow", "buffer_overflow", "invalid_hyperparameters", "non_finite")}
      record["round_trip"] = dict(
          trip_record, time_s=seconds, exact=bool(trip.exact) and not any(failed.values()),
          rebuilt_bit_for_bit=bool(trip.exact), buffer_empty=bool(trip.buffer_empty),
          bits_per_weight_per_step=float(stats.bits_per_weight_per_step),
          bits_stored=float(stats.bits_stored),
          information_bound_bits=float(stats.information_bound_bits), **failed)
    except Exception as e:  # noqa: BLE001  (a failed reversal is a result, reported)
      record["round_trip"] = {"exact": False, "error": f"{type(e).__name__}: {e}"[:2000]}
    progress(f"{name}: round trip exact = {record['round_trip']['exact']}")
  return record


def table(results, cfg):
  """Per model and method: time, ratios, XLA temporaries and the hypergradient's error."""
  lines = []
  head = (f"{'method':<12}{'time s':>9}{'ms/step':>9}{'x unroll':>10}{'x checkpt':>10}"
          f"{'compile s':>10}{'XLA temp MB':>13}{'x unroll':>10}{'rel err':>10}")
  for name, record in results["models"].items():
    load = record.get("load_average")
    load = f", load average {load[0]:.1f} before, {load[1]:.1f} after" if load else ""
    lines += ["", f"{name}: {record['num_weights']} weights, T = {cfg['steps']}"
              f"{load}", head]
    for method, r in record["methods"].items():
      t, temp = r.get("time_s"), r.get("memory", {}).get("temp_bytes")
      err = r.get("relative_error", {}).get("global")
      cells = [
          f"{method:<12}",
          f"{t:>9.3g}" if t else f"{'error' if 'error' in r else '-':>9}",
          f"{1e3 * t / cfg['steps']:>9.3f}" if t else f"{'-':>9}",
          f"{r['time_over_unroll']:>10.3f}" if "time_over_unroll" in r else f"{'-':>10}",
          f"{r['time_over_checkpoint']:>10.3f}" if "time_over_checkpoint" in r else f"{'-':>10}",
          f"{r['compile_s']:>10.1f}" if "compile_s" in r else f"{'-':>10}",
          f"{temp / 1e6:>13.2f}" if temp is not None else f"{'-':>13}",
          f"{r['temp_over_unroll']:>10.4f}" if "temp_over_unroll" in r else f"{'-':>10}",
          f"{err:>10.2e}" if err is not None else f"{'-':>10}",
      ]
      note = f"  (not run: {r['not_run']})" if "not_run" in r else ""
      note += f"  ({r['error'][:120]})" if "error" in r else ""
      if r.get("error_reference", "unroll") != "unroll":
        note += f"  (rel err against {r['error_reference']})"
      lines.append("".join(cells) + note)
    if "unroll_estimate" in record:
      e = record["unroll_estimate"]
      lines.append(f"unroll estimate at T = {cfg['steps']}: "
                   f"{e['temp_bytes'] / 1e6:.0f} MB of temporaries, {e['planned_bytes'] / 1e6:.0f}"
                   f" MB planned (linear in T from T = {e['from_steps']})")
    trip = record.get("round_trip")
    if trip:
      detail = (f"{trip['bits_per_weight_per_step']:.5f} bits per weight per step"
                if "bits_per_weight_per_step" in trip else trip.get("error", "")[:200])
      lines.append(f"round trip: exact = {trip['exact']}, {detail}")
  lines.append("")
  lines.append("rel err: the global relative L2 error of the hypergradient against unroll's "
               "(or checkpoint's where unroll did not run); x unroll, x checkpt: time ratios "
               "measured side by side.")
  return "\n".join(lines)


_START = time.perf_counter()


def progress(message):
  print(f"[{time.perf_counter() - _START:6.0f} s] {message}", flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = config_from_flags()
  out_dir = common.prepare_out_dir(FLAGS.out_dir)
  device = jax.devices()[0]
  results = {
      "description": "Hypergradient time and XLA memory of revhyper's methods on a BatchNorm "
                     "resnet and a dropout transformer trained with AdamW, measured side by "
                     "side in one process, and each model's exact round trip.",
      "command": " ".join([sys.executable] + sys.argv),
      "machine": {"platform": device.platform, "device_kind": device.device_kind,
                  "cpu_count": os.cpu_count(),
                  "load_average_at_start": list(os.getloadavg())},
      "models": {},
      "complete": False,
  }
  departures = [
      "Neither model is in the paper, which trains MLPs with momentum SGD: these measure the "
      "library on BatchNorm's running averages and on dropout, trained with AdamW.",
      common.BUNDLED_DATA_NOTE,
  ]
  start = time.perf_counter()
  for name in cfg["models"]:
    results["models"][name] = measure_model(name, cfg)
    results["elapsed_s"] = time.perf_counter() - start
    # Rewritten after each model, so an interrupted run keeps what it finished.
    common.write_results(out_dir, "model_benchmark", cfg, results, departures)
  results["complete"] = True
  results["machine"]["load_average_at_end"] = list(os.getloadavg())
  path = common.write_results(out_dir, "model_benchmark", cfg, results, departures)
  print(table(results, cfg))
  print(f"wrote {path} in {results['elapsed_s']:.0f} s")


if __name__ == "__main__":
  app.run(main)
