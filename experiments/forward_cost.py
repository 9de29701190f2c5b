r"""What exact training costs against float training on this machine, and where the time goes.

The problem is the paper's: a tanh MLP trained with momentum SGD (momentum 0.9, learning rate
e**-1, initial scale e**-3) on the bundled MNIST digits, the validation loss after T steps as
the meta-objective, differentiated with respect to a log L2 penalty. In one process, compiled
once each and timed round-robin (so that the load of other processes falls on all alike), the
median of --repeats calls of:

  forward_float  jit(meta) with method="unroll": float training, no gradient
  forward_exact  jit(meta) with method="reversible": training on the integer grid, no gradient
  unroll         jit(grad(meta)) with method="unroll": store-all backprop
  remat          jit(grad(meta)) with method=Checkpoint(segment_length=1): backprop that
                 recomputes each step's gradient from its stored input, as reversal does
  reversible     jit(grad(meta)) with method="reversible": exact reversal
  reversible_unshared  (not timed by default) the same with Reversible(share_gradient=False):
                 the gradient recomputed apart from the Hessian-vector products
  probe_float64_lanes  (not timed by default) a cost probe, not a method: exact training's
                 arithmetic with its integers held in float64 lanes instead of int64 ones
                 (``float64_lane_training``), to see what 53-bit vector float arithmetic, native
                 on CPUs without AVX-512, would save
  probe_state_traffic  (not timed by default) a cost probe: training that moves exact
                 training's state (int64 weights and velocities, uint64 heads) with the
                 cheapest arithmetic (``state_traffic_training``), to see what the state's
                 memory traffic costs before the exact arithmetic

and the ratios exact / float, reversible / unroll, remat / unroll, reversible / remat and
probe / float for each probe. With
--pieces, it also times the per-lane operations of one exact step in isolation, each in a
``lax.scan`` of T steps over arrays shaped like the network's weights: the momentum's rANS
multiply (``_bitstack.multiply``), the conversions to and from the grid
(``_fixed_point.to_fixed``, ``to_float``), an exact addition and a range check, against a float
multiply-add of the same arrays (the floor: one pass).

Writes ``results.json`` to --out_dir (machine, command, per network: weights, median times,
ratios and the pieces) and prints a table.

  # the 2.8M-weight network, batch 100, T = 40:
  python experiments/forward_cost.py --out_dir=/tmp/forward_cost
  # cost against width, 3 hidden layers of 50 (45k weights), 200 (240k) and 800 (1.9M):
  python experiments/forward_cost.py --widths=50,200,800 --out_dir=/tmp/forward_cost_widths
"""

import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

import revhyper
from revhyper import _bitstack
from revhyper import _fixed_point

FLAGS = flags.FLAGS

flags.DEFINE_list("sizes", ["784", "1000", "1000", "1000", "10"], "Layer widths.")
flags.DEFINE_list("widths", None, "Hidden widths to sweep instead of --sizes: each one is the "
                  "network 784-w-w-w-10.")
flags.DEFINE_integer("batch_size", 100, "Minibatch size.")
flags.DEFINE_integer("steps", 40, "Training length T.")
flags.DEFINE_integer("repeats", 7, "Timed calls per method after the warm-up.")
flags.DEFINE_list("methods",
                  ["forward_float", "forward_exact", "unroll", "remat", "reversible"],
                  "Methods to time.")
flags.DEFINE_boolean("pieces", False, "Also time the per-lane operations of an exact step.")
flags.DEFINE_integer("num_train", 9000, "Training digits.")
flags.DEFINE_integer("num_val", 100, "Validation digits of the meta-objective: few, so that "
                     "the final evaluation, alike for every method, does not hide the training.")
flags.DEFINE_string("out_dir", "/tmp/forward_cost", "Where results.json goes.")

METHODS = ("forward_float", "forward_exact", "unroll", "remat", "reversible",
           "reversible_unshared", "probe_float64_lanes", "probe_state_traffic")
MOMENTUM, LEARNING_RATE, INIT_SCALE, L2 = 0.9, math.exp(-1.0), math.exp(-3.0), 1e-4


def build(sizes):
  """The compiled functions of every method for one network, and its weight count."""
  images, labels = revhyper.datasets.load_mnist()
  n_train, n_val, batch = FLAGS.num_train, FLAGS.num_val, FLAGS.batch_size
  mean = revhyper.datasets.pixel_mean(images[:n_train])
  x = jnp.asarray(revhyper.datasets.preprocess(images[:n_train + n_val], mean))
  y = jnp.asarray(labels[:n_train + n_val], jnp.int32)
  key = jax.random.key(0)
  params = revhyper.models.mlp_init(jax.random.fold_in(key, 0), sizes, scale=INIT_SCALE)
  batch_key = jax.random.fold_in(key, 1)

  def train_loss(w, log_l2, t):
    idx = revhyper.datasets.batch_indices(batch_key, t, n_train, batch)
    penalty = sum(jnp.sum(layer["W"] ** 2) for layer in w)
    logits = revhyper.models.mlp_apply(w, x[idx])
    return revhyper.models.softmax_cross_entropy(logits, y[idx]) + jnp.exp(log_l2) * penalty

  def validation_loss(w):
    logits = revhyper.models.mlp_apply(w, x[n_train:])
    return revhyper.models.softmax_cross_entropy(logits, y[n_train:])

  def meta(log_l2, method):
    out = revhyper.sgd(train_loss, params, log_l2, num_steps=FLAGS.steps,
                       learning_rate=LEARNING_RATE, momentum=MOMENTUM, method=method)
    return validation_loss(out.params)

  fns = {
      "forward_float": jax.jit(lambda h: meta(h, "unroll")),
      "forward_exact": jax.jit(lambda h: meta(h, "reversible")),
      "unroll": jax.jit(jax.grad(lambda h: meta(h, "unroll"))),
      "remat": jax.jit(jax.grad(lambda h: meta(h, revhyper.Checkpoint(segment_length=1)))),
      "reversible": jax.jit(jax.grad(lambda h: meta(h, "reversible"))),
      "reversible_unshared": jax.jit(jax.grad(
          lambda h: meta(h, revhyper.Reversible(share_gradient=False)))),
  }
  fns["probe_float64_lanes"] = jax.jit(lambda h: validation_loss(
      float64_lane_training(train_loss, params, h, FLAGS.steps)))
  fns["probe_state_traffic"] = jax.jit(lambda h: validation_loss(
      state_traffic_training(train_loss, params, h, FLAGS.steps)))
  num_weights = sum(int(p.size) for p in jax.tree.leaves(params))
  return fns, params, num_weights


PROBE_FRACTIONAL_BITS = 40  # |w|, |v| < 2**11 on a 2**-40 grid, in the 2**51 a float64 holds


def float64_lane_training(train_loss, params, log_l2, steps):
  """A cost probe: exact momentum-SGD training whose integers live in float64 lanes.

  The arithmetic of ``revhyper.sgd``'s exact forward step (the rANS multiply by the momentum
  ``n / 2**16`` with its head, the rounded increments, a range check) on integers below
  2**51 held in float64, where every operation is a vector instruction on any x86 CPU, instead
  of int64 lanes, whose multiplies and conversions CPUs without AVX-512 emulate. Heads start at
  2**16 and are never spilled, which is exact while ``head * 2**16 + r < 2**53``, i.e. for
  ``steps * log2(2**16 / n) < 21`` (138 steps at momentum 0.9): enough to time a short run, not
  a method. Returns the final weights (NaN where a value left the range).
  """
  n = round(MOMENTUM * 2**16)
  if steps * math.log2(2**16 / n) >= 21:
    raise ValueError(f"probe_float64_lanes spills no head: steps must stay below "
                     f"{21 / math.log2(2**16 / n):.0f} at momentum {MOMENTUM}, got {steps}")
  scale = 2.0**PROBE_FRACTIONAL_BITS
  with jax.enable_x64(True):
    def lane(w, v, head, g):
      quotient = jnp.floor(v * 2.0**-16)  # v = quotient * 2**16 + r, exactly
      s = head * 2.0**16 + (v - quotient * 2.0**16)  # push r: below 2**53, exact
      head = jnp.floor(s * (1.0 / n))  # the floor, or one off: corrected below
      x = s - head * n  # pop x in [0, n)
      head = jnp.where(x < 0, head - 1, jnp.where(x >= n, head + 1, head))
      x = jnp.where(x < 0, x + n, jnp.where(x >= n, x - n, x))
      v = quotient * n + x - jnp.round(g.astype(jnp.float64) * ((1 - MOMENTUM) * scale))
      w = w + jnp.round(LEARNING_RATE * v)
      return w, v, head, (jnp.abs(v) < 2.0**51) & (jnp.abs(w) < 2.0**51)

    def step(carry, t):
      w, v, head, ok = carry
      g = jax.grad(train_loss)(jax.tree.map(
          lambda x: (x * 2.0**-PROBE_FRACTIONAL_BITS).astype(jnp.float32), w), log_l2, t)
      out = jax.tree.map(lane, w, v, head, g)
      parts = [jax.tree.map(lambda o, i=i: o[i], out, is_leaf=lambda o: isinstance(o, tuple))
               for i in range(4)]
      return (*parts[:3], ok & jnp.all(jnp.stack([jnp.all(x)
                                                  for x in jax.tree.leaves(parts[3])]))), None

    # (the barrier keeps XLA from converting the closed-over weights at compile time)
    w = jax.tree.map(lambda x: jnp.round(x.astype(jnp.float64) * scale),
                     jax.lax.optimization_barrier(params))
    init = (w, jax.tree.map(jnp.zeros_like, w),
            jax.tree.map(lambda x: jnp.full_like(x, 2.0**16), w), jnp.bool_(True))
    (w, _, _, ok), _ = jax.lax.scan(step, init, jnp.arange(steps, dtype=jnp.int32))
    return jax.tree.map(lambda x: jnp.where(ok, x * 2.0**-PROBE_FRACTIONAL_BITS, jnp.nan)
                        .astype(jnp.float32), w)


TRAFFIC_FRACTIONAL_BITS = 24  # |w| < 128 on a 2**-24 grid: int32 holds it, so converts cheaply


def state_traffic_training(train_loss, params, log_l2, steps):
  """A cost probe: exact training's state moved as XLA moves it, with almost none of its work.

  Each step reads and writes the arrays that ``revhyper.sgd``'s exact forward step does (an
  int64 weight, an int64 velocity and a uint64 rANS head per weight, the float32 gradient and
  the float32 weights the loss reads), but with the cheapest arithmetic that keeps training
  alive: a 2**-24 grid (the weights convert through int32), the paper's
  ``v <- m v - (1 - m) g, w <- w + lr v`` with a momentum of 0.875 and a learning rate of 0.375
  as shifts, the gradient converted through int32, and the head only incremented. XLA on a CPU
  gives each array a step writes a kernel of its own (float training's velocities and weights
  too), so its time over float training is what the exact state's traffic costs before any of
  the exact arithmetic. Returns the final weights.
  """
  scale = 2.0**TRAFFIC_FRACTIONAL_BITS
  with jax.enable_x64(True):
    def to_float(w):
      return w.astype(jnp.int32).astype(jnp.float32) * (1.0 / scale)

    def lane(w, v, head, g):
      v = v - (v >> 3) - (g * (scale / 8)).astype(jnp.int32).astype(jnp.int64)
      w = w + (v >> 2) + (v >> 3)
      return w, v, head + (v & 7).astype(jnp.uint64)

    def step(carry, t):
      w, v, head = carry
      g = jax.grad(train_loss)(jax.tree.map(to_float, w), log_l2, t)
      out = jax.tree.map(lane, w, v, head, g)
      return tuple(jax.tree.map(lambda o, i=i: o[i], out, is_leaf=lambda o: isinstance(o, tuple))
                   for i in range(3)), None

    # (the barrier keeps XLA from converting the closed-over weights at compile time)
    w = jax.tree.map(lambda x: jnp.round(x * scale).astype(jnp.int64),
                     jax.lax.optimization_barrier(params))
    init = (w, jax.tree.map(jnp.zeros_like, w),
            jax.tree.map(lambda x: jnp.full(x.shape, 2**16, jnp.uint64), w))
    (w, _, _), _ = jax.lax.scan(step, init, jnp.arange(steps, dtype=jnp.int32))
    return jax.tree.map(to_float, w)


def time_round_robin(fns, args, repeats):
  """Median seconds per call of each function, calls alternating between them, each
  function's first output and the seconds of its first call (compilation included)."""
  outputs, first_call = {}, {}
  for name, fn in fns.items():
    start = time.perf_counter()
    outputs[name] = jax.block_until_ready(fn(*args))
    first_call[name] = time.perf_counter() - start
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}, times, (outputs, first_call)


def piece_functions(params, steps):
  """Each per-lane operation of an exact step, run T times over weight-shaped arrays.

  Every function takes and returns int64 lanes (plus what the operation carries), so that XLA
  cannot hoist the work out of the loop.
  """
  leaves = jax.tree.leaves(params)
  shapes = [x.shape for x in leaves]
  n = jnp.uint64(round(MOMENTUM * 2**16))
  min_base = jnp.float64(round(MOMENTUM * 2**16))
  capacity = _bitstack.bucket(sum(x.size for x in leaves)
                              * _bitstack.max_chunks_per_lane([int(n)] * steps) + 1)
  floats = [x.astype(jnp.float32) for x in leaves]

  def scanned(body, init):
    return lambda: jax.lax.scan(lambda c, _: (body(c), None), init(), None, length=steps)[0]

  def ints():
    return [_fixed_point.to_fixed(x)[0] for x in floats]

  def multiply(carry):
    stack, v = carry
    return _bitstack.multiply(stack, v, [n] * len(v), min_base)

  def to_fixed(v):  # float -> grid, with the range check
    return [_fixed_point.to_fixed(x.astype(jnp.float32) * 2.0**-60)[0] + x for x in v]

  def to_float(v):
    return [x + (_fixed_point.to_float(x, jnp.float32) > 0).astype(jnp.int64) for x in v]

  def add(v):
    return [_fixed_point.add(x, f)[0] for x, f in zip(v, floats)]

  def in_range(v):
    return [x + _fixed_point.in_range(f * x.astype(jnp.float32)).astype(jnp.int64)
            for x, f in zip(v, floats)]

  def float_step(v):  # the floor: one float multiply-add pass, in float64 lanes
    return [x * 0.9 + f for x, f in zip(v, floats)]

  return {
      "rans_multiply": scanned(multiply, lambda: (
          _bitstack.empty(shapes, capacity), ints())),
      "to_fixed": scanned(to_fixed, ints),
      "to_float": scanned(to_float, ints),
      "add": scanned(add, ints),
      "in_range": scanned(in_range, ints),
      "float_multiply_add": scanned(float_step, lambda: [x.astype(jnp.float64) for x in floats]),
  }


def measure(sizes):
  fns, params, num_weights = build(sizes)
  fns = {name: fns[name] for name in METHODS if name in FLAGS.methods}
  log_l2 = jnp.float32(math.log(L2))
  medians, all_times, (outputs, first_call) = time_round_robin(fns, (log_l2,), FLAGS.repeats)
  # The validation loss after training, or its hypergradient: alike across the methods of each
  # kind (the exact ones on the integer grid, within float32 rounding of the float ones).
  record = {"sizes": sizes, "num_weights": num_weights, "median_s": medians,
            "times_s": all_times, "first_call_s": first_call,
            "values": {k: float(v) for k, v in outputs.items()}}
  ratios = {}
  if "forward_float" in medians and "forward_exact" in medians:
    ratios["exact_over_float_training"] = medians["forward_exact"] / medians["forward_float"]
  if "unroll" in medians and "reversible" in medians:
    ratios["reversible_over_unroll"] = medians["reversible"] / medians["unroll"]
  if "unroll" in medians and "remat" in medians:
    ratios["remat_over_unroll"] = medians["remat"] / medians["unroll"]
  if "remat" in medians and "reversible" in medians:
    ratios["reversible_over_remat"] = medians["reversible"] / medians["remat"]
  if "forward_float" in medians and "probe_float64_lanes" in medians:
    ratios["probe_over_float_training"] = (medians["probe_float64_lanes"]
                                           / medians["forward_float"])
  if "forward_float" in medians and "probe_state_traffic" in medians:
    ratios["state_traffic_over_float_training"] = (medians["probe_state_traffic"]
                                                   / medians["forward_float"])
  record["ratios"] = ratios
  if FLAGS.pieces:
    with jax.enable_x64(True):
      pieces = {name: jax.jit(fn) for name, fn in piece_functions(params, FLAGS.steps).items()}
      piece_medians, _, _ = time_round_robin(pieces, (), FLAGS.repeats)
    lane_steps = num_weights * FLAGS.steps
    record["pieces_ns_per_lane_step"] = {name: s / lane_steps * 1e9
                                         for name, s in piece_medians.items()}
  return record


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.widths:
    networks = [[784, int(w), int(w), int(w), 10] for w in FLAGS.widths]
  else:
    networks = [[int(s) for s in FLAGS.sizes]]
  results = {
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "command": " ".join(sys.argv), "machine": platform.machine(),
      "processor": platform.processor(), "cpus": os.cpu_count(), "jax": jax.__version__,
      "backend": jax.default_backend(), "revhyper": os.path.dirname(revhyper.__file__),
      "batch_size": FLAGS.batch_size, "steps": FLAGS.steps,
      "repeats": FLAGS.repeats, "networks": [],
  }
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  for sizes in networks:
    load = os.getloadavg()[0]
    record = measure(sizes)
    record["load_average_before"] = load
    results["networks"].append(record)
    with open(os.path.join(FLAGS.out_dir, "results.json"), "w") as f:
      json.dump(results, f, indent=1)
    name = "-".join(map(str, sizes))
    times = "  ".join(f"{m} {s:.3f} s" for m, s in record["median_s"].items())
    ratios = "  ".join(f"{k} {v:.3f}x" for k, v in record["ratios"].items())
    print(f"{name} ({record['num_weights']:,} weights): {times}\n  {ratios}")
    for piece, ns in record.get("pieces_ns_per_lane_step", {}).items():
      print(f"  {piece:20s} {ns:6.2f} ns per lane and step")
  print("results:", os.path.join(FLAGS.out_dir, "results.json"))


if __name__ == "__main__":
  app.run(main)
