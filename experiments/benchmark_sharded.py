r"""Benchmark: exact hypergradients of a wide MLP whose weights are split over several devices.

A tanh MLP (1024-2048-2048-2048-10 by default: 10.5M weights) learns a synthetic task (inputs
drawn from N(0, 1) per step, labels from a fixed random linear teacher; nothing is downloaded)
with momentum SGD, batch 64, momentum 0.9. The meta-objective is the validation loss after T
steps; its hypergradient is taken with respect to per-layer learning-rate schedules (one log
learning rate per step for every W and every b: 8 schedules of length T).

The weights are split Megatron-style over a one-axis mesh "model" of --devices devices: the
first of each pair of matrices by columns, the second by rows, so that every hidden unit's
weights live on one device; the biases of row-split layers are replicated.

Side by side in one process, each method is traced and compiled, then (if --run) the methods
are run round-robin:

  reversible      jit(grad(meta)) with Reversible(mesh=..., param_specs=...): one bit stack
                  per device
  reversible_one  the same with Reversible() on one device: the same total work
  checkpoint      Checkpoint() (ceil(sqrt(T))-step segments) on the sharded weights
  unroll          Unroll(): store-all backprop on the sharded weights; compiled, and run only
                  where it is small (--quick)

and measured: XLA's memory plan per device (``compiled.memory_analysis()``: temporaries,
arguments, outputs), the median time of --repeats calls after a warm-up, the relative L2
error of each hypergradient against an independent reference (store-all backprop, Unroll, where
it runs, as in --quick; else Checkpoint), and the plan against a lower bound on the exact state
per device (``state_bound_bytes``).

On a CPU the devices are simulated (``--xla_force_host_platform_device_count``): they share the
machine's cores, so the time ratio against one device measures overhead, not a speed-up. This
script sets XLA_FLAGS to 8 simulated devices before JAX starts, unless XLA_FLAGS already sets a
device count.

Writes --out_dir/results.json (every number, the command line, the machine) and prints a table.

Run:

  # CPU, 8 simulated devices, 10.5M weights, T = 1000 (long on 2 cores: see docs/scaling.rst):
  python experiments/benchmark_sharded.py --out_dir=/tmp/revhyper_sharded
  # smoke run, under a minute (compiled at XLA optimisation level 0: times mean nothing):
  python experiments/benchmark_sharded.py --quick --out_dir=/tmp/revhyper_sharded_quick
  # the one-GPU configuration, 4096-6144-6144-6144-10 (100.7M weights), T = 10,000; on a CPU
  # add --norun to check its memory plans without running it:
  python experiments/benchmark_sharded.py --device --out_dir=/tmp/revhyper_sharded_gpu
  # 2 processes of 4 simulated devices each, the mesh over all 8 (experiments/launch_local.py;
  # on a cluster, start one process per host with --coordinator=auto or HOST:PORT):
  python experiments/launch_local.py --num_processes 2 --devices_per_process 4 -- \
      experiments/benchmark_sharded.py --quick --out_dir=/tmp/revhyper_sharded_2x4

With several processes (experiments/distributed.py) the mesh spans every process's devices,
each process builds only its own blocks of the weights, reversible_one runs on each process's
first device, and process 0 writes results.json, with every process's peak memory.
"""

import datetime
import math
import os
import platform
import re
import resource
import sys
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  # Before JAX starts: the number of simulated CPU devices is fixed when it does.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for common.py

import common  # noqa: E402
import distributed  # noqa: E402  (--coordinator, --num_processes, --process_id)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import revhyper  # noqa: E402

FLAGS = flags.FLAGS

flags.DEFINE_string("out_dir", "/tmp/revhyper_sharded", "Where results.json goes.")
flags.DEFINE_boolean("quick", False, "Tiny configuration (64-64-64-10, T = 20, one repeat, "
                     "XLA optimisation level 0): a smoke run.")
flags.DEFINE_boolean("device", False, "Configuration for one GPU (80 GB, a 40 GB plan): "
                     "4096-6144-6144-6144-10 (100.7M weights), T = 10,000, reversible on one "
                     "device against Unroll's plan.")
flags.DEFINE_list("sizes", None, "Layer widths; hidden widths must split evenly over the "
                  "devices. Default 1024,2048,2048,2048,10 (--quick: 64,64,64,10; --device: "
                  "4096,6144,6144,6144,10).")
flags.DEFINE_integer("steps", None, "Training length T; default 1000 (--quick: 20; "
                     "--device: 10000).")
flags.DEFINE_integer("devices", None, "Devices in the mesh; default all of them (8 simulated "
                     "CPU devices; --device: 1).")
flags.DEFINE_list("methods", None, "Methods to measure; default reversible,reversible_one,"
                  "checkpoint,unroll (--device: reversible,unroll).")
flags.DEFINE_list("compile_only", None, "Methods that are compiled and planned, never run; "
                  "default unroll (its plan is T states and activations; --quick runs it: it "
                  "is the reference of the errors).")
flags.DEFINE_boolean("run", True, "Run the methods (off: memory plans only).")
flags.DEFINE_integer("batch_size", 64, "Minibatch size.")
flags.DEFINE_integer("num_val", 512, "Validation examples.")
flags.DEFINE_float("learning_rate", 0.05, "Initial learning rate of every layer and step.")
flags.DEFINE_float("momentum", 0.9, "Momentum gamma.")
flags.DEFINE_integer("repeats", None, "Timed calls per method after the warm-up; default 1.")
flags.DEFINE_boolean("warmup", True, "Call each method once before timing it (off: the first "
                     "call is timed, which at full size halves the run's length).")
flags.DEFINE_integer("seed", 0, "Seed of the weights and the synthetic data.")

# Unroll first: it is only planned, so an interrupted long run still has its plan.
ALL_METHODS = ("unroll", "reversible", "reversible_one", "checkpoint")
PRESETS = {
    "default": dict(sizes="1024,2048,2048,2048,10", steps=1000, devices=None,
                    methods=ALL_METHODS, compile_only=("unroll",), compiler_options=None),
    # A smoke run's times mean nothing; XLA's backend level 0 halves its compiles.
    "quick": dict(sizes="64,64,64,10", steps=20, devices=None, methods=ALL_METHODS,
                  compile_only=(), compiler_options={"xla_backend_optimization_level": 0}),
    "device": dict(sizes="4096,6144,6144,6144,10", steps=10000, devices=1,
                   methods=("reversible", "unroll"), compile_only=("unroll",),
                   compiler_options=None),
}
# The plan that the --device configuration must fit: half an 80 GB GPU.
DEVICE_PLAN_LIMIT_BYTES = 40 * 2**30
MOMENTUM_GRID = 2**16  # momenta are rounded to n / 2**16 (revhyper.sgd)


def config_from_flags():
  if FLAGS.quick and FLAGS.device:
    raise app.UsageError("--quick and --device are exclusive.")
  mode = "quick" if FLAGS.quick else "device" if FLAGS.device else "default"
  preset = PRESETS[mode]
  devices = FLAGS.devices or preset["devices"] or len(jax.devices())
  if devices > len(jax.devices()):
    raise app.UsageError(f"--devices={devices}, but JAX has {len(jax.devices())} devices.")
  methods = FLAGS.methods or preset["methods"]
  unknown = set(methods) - set(ALL_METHODS)
  if unknown:
    raise app.UsageError(f"unknown methods {sorted(unknown)}; choose from {ALL_METHODS}.")
  sizes = [int(s) for s in (FLAGS.sizes or preset["sizes"].split(","))]
  if any(s % devices for s in sizes[1:-1]):
    raise app.UsageError(f"hidden widths {sizes[1:-1]} must split evenly over {devices} "
                         "devices.")
  return dict(mode=mode, sizes=sizes, steps=FLAGS.steps or preset["steps"], devices=devices,
              methods=[m for m in ALL_METHODS if m in methods],
              compile_only=list(FLAGS.compile_only if FLAGS.compile_only is not None
                                else preset["compile_only"]), run=FLAGS.run,
              batch_size=FLAGS.batch_size, num_val=FLAGS.num_val,
              learning_rate=FLAGS.learning_rate, momentum=FLAGS.momentum,
              repeats=FLAGS.repeats or 1, warmup=FLAGS.warmup, seed=FLAGS.seed,
              compiler_options=preset["compiler_options"])


def model_specs(num_layers):
  """Megatron-style: even layers split by columns (and their biases), odd layers by rows."""
  specs = []
  for i in range(num_layers):
    if i % 2 == 0 and i < num_layers - 1:
      specs.append({"W": P(None, "model"), "b": P("model")})
    else:  # rows: the output is summed over the devices, and the bias replicated
      specs.append({"W": P("model", None), "b": P()})
  return specs


def synthetic_batch(seed, t, batch_size, sizes):
  """Inputs from N(0, 1) and a fixed random linear teacher's labels: a pure function of t.

  Generated inside the loss from a literal seed, so the data are neither stored nor
  hyperparameters (closed-over float arrays would be differentiated like hparams).
  """
  teacher_key, data_key = jax.random.split(jax.random.key(seed))
  teacher = jax.random.normal(teacher_key, (sizes[0], sizes[-1]))
  x = jax.random.normal(jax.random.fold_in(data_key, t), (batch_size, sizes[0]))
  return x, jnp.argmax(x @ teacher, axis=-1)


class Problem:
  """The network, its layout, the training loss and the meta-objective."""

  def __init__(self, cfg):
    self.cfg = cfg
    sizes = cfg["sizes"]
    rng = np.random.default_rng(cfg["seed"])
    # Glorot-like scale 1 / sqrt(fan_in), drawn on the host: no device holds the whole model.
    self.host_params = [
        {"W": (rng.standard_normal((a, b), np.float32) / np.float32(math.sqrt(a))),
         "b": np.zeros(b, np.float32)} for a, b in zip(sizes[:-1], sizes[1:])]
    self.num_weights = sum(x.size for x in jax.tree.leaves(self.host_params))
    self.specs = model_specs(len(sizes) - 1)
    self.mesh = Mesh(np.array(jax.devices()[:cfg["devices"]]), ("model",))
    # A device of this process: with several processes, each runs the one-device reference.
    self.one = Mesh(np.array(jax.local_devices()[:1]), ("model",))
    self.numerator = round(cfg["momentum"] * MOMENTUM_GRID)
    steps = cfg["steps"]
    self.hparams = [{"W": jnp.full(steps, math.log(cfg["learning_rate"]), jnp.float32),
                     "b": jnp.full(steps, math.log(cfg["learning_rate"]), jnp.float32)}
                    for _ in self.host_params]

  def placed(self, mesh):
    """The initial weights laid out on ``mesh`` by the specs (whole on a one-device mesh);
    each process makes only the blocks of its own devices."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, NamedSharding(mesh, s),
                                                  lambda index: x[index]),
        self.host_params, self.specs)

  def train_loss(self, params, hparams, t):
    del hparams
    x, y = synthetic_batch(self.cfg["seed"], t, self.cfg["batch_size"], self.cfg["sizes"])
    return revhyper.models.softmax_cross_entropy(revhyper.models.mlp_apply(params, x), y)

  def method(self, name):
    if name == "reversible":
      return revhyper.Reversible(mesh=self.mesh, param_specs=self.specs)
    if name == "reversible_one":
      return revhyper.Reversible()
    return revhyper.Checkpoint() if name == "checkpoint" else revhyper.Unroll()

  def meta(self, log_learning_rates, params, name):
    out = revhyper.sgd(self.train_loss, params, None, num_steps=self.cfg["steps"],
                       learning_rate=jax.tree.map(jnp.exp, log_learning_rates),
                       momentum=self.cfg["momentum"], method=self.method(name))
    x, y = synthetic_batch(self.cfg["seed"] + 1, 0, self.cfg["num_val"], self.cfg["sizes"])
    return revhyper.models.softmax_cross_entropy(revhyper.models.mlp_apply(out.params, x), y)

  def state_bound_bytes(self, devices):
    """A lower bound on the exact state one device holds: per weight of its shard, w and v
    (int64), a head (uint64), and the information bound T * log2(2**16 / n) bits of tail.
    revhyper rounds each lane's capacity up (docs/scaling.rst), and the plan adds the
    cotangents and the loss's temporaries."""
    tail_bytes = self.cfg["steps"] * math.log2(MOMENTUM_GRID / self.numerator) / 8
    lanes = 0
    for layer, spec in zip(self.host_params, self.specs):
      for name in ("W", "b"):
        lanes += layer[name].size // (devices if "model" in tuple(spec[name]) else 1)
    return int(lanes * (8 + 8 + 8 + tail_bytes))


def compile_method(problem, name):
  """Lowers and compiles jit(grad(meta)) for one method; returns the compiled function."""
  mesh = problem.one if name == "reversible_one" else problem.mesh
  params = problem.placed(mesh)
  hypergradient = jax.jit(jax.grad(lambda h, p: problem.meta(h, p, name)))
  start = time.perf_counter()
  lowered = hypergradient.lower(problem.hparams, params)
  trace_s = time.perf_counter() - start
  start = time.perf_counter()
  options = problem.cfg["compiler_options"]
  compiled = lowered.compile(options) if options else lowered.compile()
  compile_s = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  memory = dict(temp_bytes=int(analysis.temp_size_in_bytes),
                argument_bytes=int(analysis.argument_size_in_bytes),
                output_bytes=int(analysis.output_size_in_bytes))
  memory["planned_bytes"] = sum(memory.values())
  memory["loop_carry_bytes"] = loop_carry_bytes(compiled.as_text())
  return compiled, params, dict(trace_s=trace_s, compile_s=compile_s, memory=memory)


HLO_ARRAY = re.compile(r"\b(pred|[suf](?:8|16|32|64)|bf16)\[([0-9,]*)\]")
HLO_BITS = {"pred": 8, "bf16": 16}


def loop_carry_bytes(hlo_text):
  """Bytes of the largest ``while`` loop's carry, per device: for the exact method, the state
  (weights, velocities, bit stack) and the cotangents that the reverse loop carries; the
  loss's temporaries inside the loop are not part of it."""
  largest = 0
  for line in hlo_text.splitlines():
    if " while(" not in line or "=" not in line:
      continue
    result_type = line.split("=", 1)[1].split(" while(", 1)[0]
    total = 0
    for dtype, dims in HLO_ARRAY.findall(result_type):
      bits = HLO_BITS.get(dtype) or int(dtype[1:])
      total += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
    largest = max(largest, total)
  return largest


def relative_error(got, want):
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float64))
                                      for x in jax.tree.leaves(tree)])
  got, want = flat(got), flat(want)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def format_bytes(n):
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def table(results):
  records, devices = results["methods"], results["config"]["devices"]
  lines = [f"{results['num_weights']:,} weights, T = {results['config']['steps']}, "
           f"{devices} device(s) ({results['machine']['device_kind']}); memory per device "
           "(XLA plan: temporaries + arguments + outputs)"]
  lines.append(f"{'method':<16}{'time':>10}{'planned':>14}{'temps':>14}{'loop state':>14}"
               f"{'error':>10}")
  for name, r in records.items():
    time_s = f"{r['time_s']:.1f} s" if "time_s" in r else "-"
    error = f"{r['error']:.1e}" if "error" in r else "-"
    lines.append(f"{name:<16}{time_s:>10}{format_bytes(r['memory']['planned_bytes']):>14}"
                 f"{format_bytes(r['memory']['temp_bytes']):>14}"
                 f"{format_bytes(r['memory']['loop_carry_bytes']):>14}{error:>10}")
  for key, value in results["ratios"].items():
    lines.append(f"{key}: {value:.3g}")
  return "\n".join(lines)


def ratios(results):
  records, devices = results["methods"], results["config"]["devices"]
  out = {}
  plan = lambda name: records[name]["memory"]["planned_bytes"]
  if "reversible" in records and "reversible_one" in records:
    out["reversible per-device plan / (one-device plan / devices)"] = (
        plan("reversible") / (plan("reversible_one") / devices))
    carry = lambda name: records[name]["memory"]["loop_carry_bytes"]
    out["reversible per-device state / (one-device state / devices)"] = (
        carry("reversible") / (carry("reversible_one") / devices))
    if "time_s" in records["reversible"] and "time_s" in records["reversible_one"]:
      out["reversible time, sharded / one device"] = (
          records["reversible"]["time_s"] / records["reversible_one"]["time_s"])
  if "reversible" in records:
    out["reversible plan / state bound"] = (
        plan("reversible") / results["state_bound_bytes_per_device"])
    for other in ("checkpoint", "unroll"):
      if other in records:
        out[f"{other} plan / reversible plan (per device)"] = plan(other) / plan("reversible")
    if "checkpoint" in records and "time_s" in records["checkpoint"] \
        and "time_s" in records["reversible"]:
      out["reversible time / checkpoint time"] = (
          records["reversible"]["time_s"] / records["checkpoint"]["time_s"])
  return out


def peak_memory_per_process():
  """Every process's peak resident memory in bytes (Linux reports kilobytes), by process."""
  peak = np.int64(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
  if jax.process_count() == 1:
    return [int(peak)]
  return [int(x) for x in multihost_utils.process_allgather(peak)]


def main(argv):
  del argv
  process, num_processes = distributed.initialize_from_flags()
  cfg = config_from_flags()
  writes = process == 0  # every process runs the same program; one writes the results
  out_dir = common.prepare_out_dir(FLAGS.out_dir) if writes else FLAGS.out_dir
  problem = Problem(cfg)
  results = dict(
      command=" ".join(sys.argv), config=cfg, num_weights=problem.num_weights,
      machine=dict(platform=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
                   num_devices=len(jax.devices()), num_processes=num_processes,
                   devices_per_process=len(jax.local_devices()),
                   cpu=platform.processor() or platform.machine(),
                   cpu_count=os.cpu_count(), jax=jax.__version__,
                   date=datetime.datetime.now().isoformat(timespec="seconds"),
                   load_average=list(os.getloadavg())),
      state_bound_bytes_per_device=problem.state_bound_bytes(cfg["devices"]),
      methods={}, complete=False)
  print(f"{problem.num_weights:,} weights, T = {cfg['steps']}, mesh of {cfg['devices']} "
        f"{jax.devices()[0].device_kind} device(s)", flush=True)
  save = (lambda record: common.save_results(out_dir, record)) if writes else (lambda _: None)
  start_all = time.perf_counter()
  runnable = {}
  for name in cfg["methods"]:
    compiled, params, record = compile_method(problem, name)
    print(f"  {name}: compiled in {record['compile_s']:.1f} s, plan "
          f"{format_bytes(record['memory']['planned_bytes'])} per device", flush=True)
    results["methods"][name] = record
    if cfg["run"] and name not in cfg["compile_only"]:
      runnable[name] = (compiled, params)
    save(_without_arrays(results))
  # Repeats go round-robin over the methods, so that the load of other processes on a shared
  # machine falls on all of them alike: the ratios are the robust numbers.
  outputs = {}
  for repeat in range(cfg["repeats"] + cfg["warmup"]):
    for name, (compiled, params) in runnable.items():
      start = time.perf_counter()
      outputs[name] = jax.block_until_ready(compiled(problem.hparams, params))
      elapsed = time.perf_counter() - start
      if cfg["warmup"] and repeat == 0:
        continue
      record = results["methods"][name]
      record.setdefault("times_s", []).append(elapsed)
      record["time_s"] = float(np.median(record["times_s"]))
      record["time_per_step_s"] = record["time_s"] / cfg["steps"]
      print(f"  {name}: {elapsed:.1f} s", flush=True)
      save(_without_arrays(results))
  for name, out in outputs.items():
    results["methods"][name]["hypergradient"] = out
  # The reference is another algorithm (float backprop), so that an exact method that went
  # wrong on every layout alike still shows an error.
  reference = next((name for name in ("unroll", "checkpoint") if name in outputs), None)
  results["error_reference"] = reference
  if reference is not None:
    for name, record in results["methods"].items():
      if "hypergradient" in record and name != reference:
        record["error"] = relative_error(record["hypergradient"], outputs[reference])
  for record in results["methods"].values():
    record.pop("hypergradient", None)
  results["ratios"] = ratios(results)
  if cfg["mode"] == "device":
    results["device_plan_limit_bytes"] = DEVICE_PLAN_LIMIT_BYTES
    results["fits_device_plan"] = {
        name: r["memory"]["planned_bytes"] <= DEVICE_PLAN_LIMIT_BYTES
        for name, r in results["methods"].items()}
  results["elapsed_s"] = time.perf_counter() - start_all
  results["machine"]["load_average_at_end"] = list(os.getloadavg())
  results["complete"] = True
  # Collective: every process reports its peak, process 0 writes them all.
  results["peak_memory_per_process_bytes"] = peak_memory_per_process()
  save(results)
  if writes:
    print(table(results))
    print(f"wrote {out_dir}/results.json in {results['elapsed_s']:.0f} s")


def _without_arrays(results):
  """The results so far, without the hypergradients kept for the final comparison."""
  return dict(results, methods={k: {n: v for n, v in r.items() if n != "hypergradient"}
                                for k, r in results["methods"].items()})


if __name__ == "__main__":
  app.run(main)
