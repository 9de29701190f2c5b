"""Checks of the sharded exact state, run in a fresh process with simulated CPU devices.

The number of host devices is fixed when JAX starts, and the test process has one, so
``tests/test_sharding.py`` runs this script as ``python sharding_checks.py MODE DEVICES`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=DEVICES`` and reads the JSON it prints last.

Modes (each also checks the bit stack alone: sharded, its heads and values equal the unsharded
stack's bit for bit, and it pops back to empty):
  model   weights split over DEVICES devices: an exact round trip, and a hypergradient (with the
          in-pass reversal check) that agrees with the single-device run and is as close to a
          float64 unroll, also under vmap;
          the same for AdamW and for SGD with weight decay.
  data    the batch split over DEVICES devices, weights replicated: the same hypergradient; a
          round trip on a 2 x DEVICES / 2 mesh ("data", "model"); and parameters on a mesh
          with Explicit axes.
  spilling  compiled at XLA's default optimisation, in runs where every lane of every stack
          spills at least 5 chunks: SGD at momentum 0.3 model- and data-parallel, and AdamW with
          low b1 and b2 and a weight decay whose own stack spills, model-parallel; the
          hypergradients (with the in-pass reversal check) against one device, and round
          trips that rebuild the initial weights bit for bit.
  layout  compile only: per-device temporaries of exact training on meshes of 1 ... DEVICES
          devices, and the collectives in the compiled hypergradient programs.
"""

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import revhyper
from revhyper import _bitstack
from revhyper import _sharding

NUM_STEPS = 20
LEARNING_RATE = 0.05
WIDTH = 64  # hidden units: splits evenly over 1, 2, 4 and 8 devices
BATCH = 32


def mesh_of(shape, names):
  devices = np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape)
  return Mesh(devices, names)


def mlp_params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w1": 0.3 * jax.random.normal(k1, (16, WIDTH)), "b1": jnp.zeros(WIDTH),
          "w2": 0.3 * jax.random.normal(k2, (WIDTH, 4)), "b2": jnp.zeros(4)}


# Megatron-style model parallelism: the hidden layer's units are split over "model".
MODEL_SPECS = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": None}


def batch(t, data_mesh=None):
  """A deterministic minibatch per step; with ``data_mesh`` it is split over "data"."""
  x = jnp.cos(jnp.arange(BATCH, dtype=jnp.float32)[:, None] * 0.37
              + jnp.arange(16, dtype=jnp.float32) * 0.11 + t * 0.01)
  y = jnp.sin(x[:, :4] * 3.0)
  if data_mesh is not None:
    x = jax.lax.with_sharding_constraint(x, NamedSharding(data_mesh, P("data")))
    y = jax.lax.with_sharding_constraint(y, NamedSharding(data_mesh, P("data")))
  return x, y


def mlp_loss(data_mesh=None):
  def loss(p, l2, t):
    x, y = batch(t, data_mesh)
    out = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return jnp.mean((out - y) ** 2) + l2 * jnp.sum(p["w1"] ** 2)
  return loss


def hypergradient(loss, method, check_reversal, dtype=jnp.float32, params=None):
  """grad of a validation loss with respect to the L2 penalty and per-leaf lr schedules."""
  params = jax.tree.map(lambda x: x.astype(dtype), mlp_params() if params is None else params)
  if isinstance(method, dict):
    method = revhyper.Reversible(**method, check_reversal=check_reversal)

  def meta(h):
    out = revhyper.sgd(loss, params, h["l2"], num_steps=NUM_STEPS, learning_rate=h["lr"],
                       momentum=0.9, method=method)
    return mlp_loss()(out.params, 0.0, NUM_STEPS + 7)

  h = {"l2": jnp.asarray(1e-3, dtype),
       "lr": jax.tree_util.tree_map(lambda _: jnp.full(NUM_STEPS, LEARNING_RATE, dtype), params)}
  return jax.jit(jax.grad(meta))(h)


def float32_errors(sharded, float64, one_device_runs):
  """A sharded float32 hypergradient against one device's (the first of ``one_device_runs``)
  and against float64 unroll, with each one-device run's error: what
  ``assert_within_float32_error`` judges."""
  return {"hypergradient_error": relative_error(sharded, one_device_runs[0]),
          "float64_error": relative_error(sharded, float64),
          "one_device_float64_errors": [relative_error(run, float64) for run in one_device_runs]}


def assert_within_float32_error(result):
  """The sharded float32 hypergradient is as close to float64 unroll as float32 gets.

  The sharded reductions add partial sums in another order than one device, and each float32
  run's error is a draw of rounding that moves with the order and the CPU's vector
  instructions: one device's reversible and unroll runs of these problems measured 1.7e-7 to
  9.3e-6 from float64, and a sharded and a one-device AdamW run 2.6e-6 apart on an AVX-512
  Xeon. So the bound is four times the largest error of one device's runs, and at least 5e-6
  (about 40 float32 epsilons); a reverse pass that missed a bit fails the in-pass check
  (NaN), and a wrong gradient is off by far more. The runs' agreement is a coarse check.
  """
  bound = max(4 * max(result["one_device_float64_errors"]), 5e-6)
  assert result["float64_error"] <= bound, result
  assert result["hypergradient_error"] <= 1e-5, result


def sgd_errors(loss, layout):
  """``hypergradient`` sharded (with the in-pass reversal check) against one device and
  float64 unroll."""
  params = mlp_params()  # drawn in float32: the x64 mode would draw other numbers
  with jax.enable_x64(True):
    float64 = jax.device_get(
        hypergradient(mlp_loss(), revhyper.Unroll(), False, jnp.float64, params))
  return float32_errors(hypergradient(loss, layout, check_reversal=True), float64,
                        [hypergradient(mlp_loss(), {}, check_reversal=False),
                         hypergradient(mlp_loss(), revhyper.Unroll(), False)])


def relative_error(got, want):
  """Relative L2 error over the whole hypergradient (a leaf near zero has no relative scale)."""
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float64))
                                      for x in jax.tree_util.tree_leaves(tree)])
  return float(np.linalg.norm(flat(got) - flat(want)) / np.linalg.norm(flat(want)))


def rebuilt_bit_for_bit(trip, params):
  """The round trip rebuilt the initial weights bit for bit (not only its ``exact`` flag)."""
  pairs = zip(jax.tree_util.tree_leaves(trip.initial_params), jax.tree_util.tree_leaves(params))
  return all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs)


def stack_round_trip(devices):
  """The sharded stack against one stack: heads and values bit for bit, tails per device."""
  mesh = mesh_of((devices,), ("x",))
  shards = _sharding.make(mesh, (P("x"), P(None, "x")), ((devices * 96,), (3, devices * 8)))
  rng = np.random.default_rng(0)
  numerators = rng.integers(1, 2**16, size=300).astype(np.uint64)
  numerators[::7] = 1  # 16 bits per lane and step: every lane spills often

  with jax.enable_x64(True):
    values = [jnp.asarray(rng.integers(-2**62, 2**62, size=s), jnp.int64)
              for s in ((devices * 96,), (3, devices * 8))]

    def run(shards):
      # The second group's numerators are the smaller: they bound both groups' chunks.
      capacity = _bitstack.bucket(_bitstack.max_chunks_per_lane(np.maximum(numerators, 4) - 3))
      lanes = _sharding.local_sizes([v.shape for v in values], shards)
      stack = _bitstack.empty([v.shape for v in values], capacity * sum(lanes), shards=shards)

      def step(n, k):  # the second group's numerator differs, so groups spill apart
        ns = [n.astype(jnp.uint64), (jnp.maximum(n, k + 1) - k).astype(jnp.uint64)]
        return ns, jnp.min(jnp.stack(ns)).astype(jnp.float64)

      def forward(carry, n):
        stack, v = carry
        return _bitstack.multiply(stack, v, *step(n, 3), shards=shards), None

      def backward(carry, n):
        stack, v = carry
        return _bitstack.divide(stack, v, *step(n, 3), shards=shards), None

      (pushed, w), _ = jax.lax.scan(forward, (stack, values), numerators)
      (popped, back), _ = jax.lax.scan(
          backward, (_bitstack.for_popping(pushed, shards), w), numerators, reverse=True)
      return (pushed, w, back, _bitstack.stored_bits(pushed, shards=shards),
              _bitstack.is_empty(popped, shards=shards))

    one = jax.jit(lambda: run(None))()
    many = jax.jit(lambda: run(shards))()
    same = lambda a, b: all(bool(jnp.all(x == y)) for x, y in zip(a, b))
    return {
        "heads_equal": same(one[0].head, many[0].head),
        "values_equal": same(one[1], many[1]),
        "restored": same(many[2], values) and same(one[2], values),
        "ptr_sum_equal": int(jnp.sum(many[0].ptr)) == int(one[0].ptr),
        "ptr_per_device": [int(p) for p in many[0].ptr],
        "tail_sharding": str(many[0].tail.sharding.spec),
        # The tail's bits are counted exactly; the heads' log2 sums in another order.
        "stored_bits": [float(one[3]), float(many[3])],
        "empty": bool(many[4]),
    }


def model_parallel(devices):
  """The hidden units split over "model": the bit stack, a round trip, a hypergradient."""
  out = {"devices": len(jax.devices()), "stack": stack_round_trip(devices)}
  model = mesh_of((devices,), ("model",))
  method = revhyper.Reversible(mesh=model, param_specs=MODEL_SPECS)
  trip = revhyper.round_trip(mlp_loss(), mlp_params(), 1e-3, num_steps=NUM_STEPS,
                             learning_rate=LEARNING_RATE, momentum=0.9, method=method)
  out["round_trip_exact"] = bool(trip.exact)
  out["round_trip_rebuilt"] = rebuilt_bit_for_bit(trip, mlp_params())
  out["bits_per_weight_per_step"] = float(trip.stats.bits_per_weight_per_step)
  out["buffer_overflow"] = bool(trip.stats.buffer_overflow)
  out.update(sgd_errors(mlp_loss(), dict(mesh=model, param_specs=MODEL_SPECS)))
  out["vmap_hypergradient_error"] = vmapped_hypergradient_error(model)
  out["optimizers"] = other_optimizers(model)
  out["model_state"] = model_state(model)
  return out


def normalised_loss(p, l2, t):
  """The MLP with its hidden layer batch-normalised: returns the batch statistics too."""
  x, y = batch(t)
  h = x @ p["w1"]
  mean, var = jnp.mean(h, axis=0), jnp.var(h, axis=0)
  h = (h - mean) / jnp.sqrt(var + 1e-5) + p["b1"]
  out = jnp.tanh(h) @ p["w2"] + p["b2"]
  return jnp.mean((out - y) ** 2) + l2 * jnp.sum(p["w1"] ** 2), {"mean": mean, "var": var}


def model_state(model):
  """Running averages of batch statistics (per hidden unit, replicated) beside model-parallel
  weights and AdamW: an exact round trip, and the hypergradient of a loss that reads the final
  averages, with the in-pass check, against one device."""
  params = mlp_params()
  initial = {"mean": jnp.zeros(WIDTH), "var": jnp.ones(WIDTH)}
  running = revhyper.RunningAverage(initial, decay=0.7)
  sharded = revhyper.Reversible(mesh=model, param_specs=MODEL_SPECS, check_reversal=True)
  optimizer = revhyper.optim.adamw(0.01, weight_decay=0.1)
  trip = revhyper.round_trip(normalised_loss, params, 1e-3, optimizer=optimizer,
                             num_steps=NUM_STEPS, model_state=running, method=sharded)
  rebuilt = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
      jax.tree_util.tree_leaves(trip.initial_model_state), jax.tree_util.tree_leaves(initial)))

  def meta(h, method):
    out = revhyper.train(normalised_loss, params, h["l2"],
                         revhyper.optim.adamw(h["lr"], weight_decay=0.1), num_steps=NUM_STEPS,
                         model_state=revhyper.RunningAverage(initial, decay=h["decay"]),
                         method=method)
    return jnp.sum(out.model_state["mean"] ** 2) + jnp.sum(out.model_state["var"])

  h = {"l2": jnp.float32(1e-3), "lr": jnp.float32(0.01), "decay": jnp.float32(0.7)}
  one = jax.jit(jax.grad(lambda h: meta(h, revhyper.Reversible(min_decay=0.5))))(h)
  many = jax.jit(jax.grad(lambda h: meta(h, revhyper.Reversible(
      mesh=model, param_specs=MODEL_SPECS, min_decay=0.5, check_reversal=True))))(h)
  return {"round_trip_exact": bool(trip.exact), "round_trip_rebuilt": rebuilt,
          "bits_over_bound": float(trip.stats.bits_stored / trip.stats.information_bound_bits),
          "hypergradient_error": relative_error(many, one)}


def other_optimizers(model):
  """AdamW (two moments, the weights' decay stack) and SGD with weight decay, model-parallel:
  exact round trips, and hypergradients with the in-pass check against one device."""
  params = mlp_params()
  # The decays are traced under jit (lr * weight_decay): min_momentum bounds them.
  sharded = dict(mesh=model, param_specs=MODEL_SPECS, min_momentum=0.8)
  runs = {"adamw": (revhyper.adam, dict(learning_rate=0.01, weight_decay=0.1)),
          "sgd_weight_decay": (revhyper.sgd, dict(learning_rate=LEARNING_RATE, momentum=0.9,
                                                   weight_decay=0.1))}
  out = {}
  for name, (train, kwargs) in runs.items():
    trip = revhyper.round_trip(mlp_loss(), params, 1e-3, num_steps=NUM_STEPS,
                               optimizer="adam" if train is revhyper.adam else "sgd",
                               method=revhyper.Reversible(**sharded), **kwargs)

    def meta(h, method, dtype=jnp.float32, train=train, kwargs=kwargs):
      start = jax.tree.map(lambda x: x.astype(dtype), params)
      out = train(mlp_loss(), start, h["l2"], num_steps=NUM_STEPS,
                  **dict(kwargs, learning_rate=h["lr"]), method=method)
      return mlp_loss()(out.params, 0.0, NUM_STEPS + 7)

    h = {"l2": jnp.float32(1e-3), "lr": jnp.float32(kwargs["learning_rate"])}
    one = jax.jit(jax.grad(lambda h: meta(h, revhyper.Reversible(min_momentum=0.8))))(h)
    many = jax.jit(jax.grad(lambda h: meta(
        h, revhyper.Reversible(**sharded, check_reversal=True))))(h)
    unroll = jax.jit(jax.grad(lambda h: meta(h, revhyper.Unroll())))(h)
    with jax.enable_x64(True):
      h64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), h)
      float64 = jax.device_get(jax.jit(jax.grad(
          lambda h: meta(h, revhyper.Unroll(), jnp.float64)))(h64))
    out[name] = {"round_trip_exact": bool(trip.exact),
                 "round_trip_rebuilt": rebuilt_bit_for_bit(trip, params),
                 **float32_errors(many, float64, [one, unroll])}
  return out


def vmapped_hypergradient_error(model):
  """``vmap`` over learning rates of the sharded hypergradient against one device's, per rate."""
  params = mlp_params()

  def meta(lr, method):
    out = revhyper.sgd(mlp_loss(), params, 1e-3, num_steps=NUM_STEPS, learning_rate=lr,
                       momentum=0.9, method=method)
    return mlp_loss()(out.params, 0.0, NUM_STEPS + 7)

  sharded = revhyper.Reversible(mesh=model, param_specs=MODEL_SPECS, check_reversal=True)
  rates = jnp.array([0.01, 0.05, 0.1])
  got = jax.jit(jax.vmap(jax.grad(lambda lr: meta(lr, sharded))))(rates)
  one_device = jax.jit(jax.grad(lambda lr: meta(lr, "reversible")))
  want = jnp.stack([one_device(r) for r in rates])
  return float(jnp.max(jnp.abs(got - want) / jnp.abs(want)))


def data_parallel(devices):
  """The batch split over "data", the weights replicated; then both kinds of parallelism."""
  out = {"devices": len(jax.devices()), "stack": stack_round_trip(devices)}
  data = mesh_of((devices,), ("data",))
  out.update(sgd_errors(mlp_loss(data), dict(mesh=data)))
  # 2 replicas of a model split over D / 2 devices; b2 has a copy on every device.
  both = mesh_of((2, devices // 2), ("data", "model"))
  trip = revhyper.round_trip(
      mlp_loss(both), mlp_params(), 1e-3, num_steps=NUM_STEPS, learning_rate=LEARNING_RATE,
      momentum=0.9, method=revhyper.Reversible(mesh=both, param_specs=MODEL_SPECS))
  out["data_and_model_round_trip_exact"] = bool(trip.exact)
  out["data_and_model_round_trip_rebuilt"] = rebuilt_bit_for_bit(trip, mlp_params())
  out["explicit"] = explicit_axes(devices)
  return out


def explicit_axes(devices):
  """Parameters laid out on a mesh with Explicit axes (``jax.make_mesh``'s default): every
  method, with the layout taken from the parameters' types or given; no mesh context."""
  mesh = jax.make_mesh((devices,), ("model",))
  assert all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
  params = jax.device_put(mlp_params(), {
      k: NamedSharding(mesh, P() if s is None else s) for k, s in MODEL_SPECS.items()})

  def loss(p, l2, t):
    # A product over the split hidden units is summed explicitly: with Explicit axes, a
    # matrix product over a sharded dimension needs its output layout named (out_sharding).
    x, y = batch(t)
    hidden = jnp.tanh(x @ p["w1"] + p["b1"])
    out = jnp.sum(hidden[:, :, None] * p["w2"], axis=1) + p["b2"]
    return jnp.mean((out - y) ** 2) + l2 * jnp.sum(p["w1"] ** 2)

  # The parameters are arguments, so that jit takes its devices from them (closed over, they
  # would need the mesh as context: jax.set_mesh).
  def meta(h, params, method, optimizer):
    kwargs = dict(momentum=0.9) if optimizer == "sgd" else {}
    out = getattr(revhyper, optimizer)(loss, params, h["l2"], num_steps=NUM_STEPS,
                                       learning_rate=h["lr"], method=method, **kwargs)
    return loss(out.params, 0.0, NUM_STEPS + 7), out.params["w1"]

  h = {"l2": jnp.float32(1e-3), "lr": jnp.float32(0.01)}
  given = revhyper.Reversible(mesh=mesh, param_specs=MODEL_SPECS, check_reversal=True)
  out = {}
  for optimizer, methods in [("sgd", {"typed": "reversible", "given": given}),
                             ("adam", {"given": given})]:
    grad = jax.jit(jax.grad(meta, has_aux=True), static_argnums=(2, 3))
    want, _ = grad(h, params, "unroll", optimizer)
    for name, method in methods.items():
      got, w1 = grad(h, params, method, optimizer)
      out[f"{optimizer}_{name}_error"] = relative_error(got, want)
      out[f"{optimizer}_{name}_w1_type"] = str(jax.typeof(w1))
  trip = revhyper.round_trip(loss, params, 1e-3, num_steps=NUM_STEPS,
                             learning_rate=LEARNING_RATE, momentum=0.9)
  out["round_trip_exact"] = bool(trip.exact)
  out["round_trip_rebuilt"] = rebuilt_bit_for_bit(trip, params)
  return out


SPILLING = {
    # log2(1 / 0.3) = 1.74 bits per lane and step.
    "sgd": (revhyper.sgd, "sgd", dict(learning_rate=0.05, momentum=0.3), [0.3], 100),
    # mu, nu and the weights' decay 1 - lr * wd = 0.5: 1 bit per lane and step each. A large
    # eps keeps weights whose gradients vanish (the decay holds them near a minimum) from
    # taking unit steps in the direction of float32's rounding, which another order of the
    # sums (sharded) flips: with eps = 1e-3 the hypergradients differed by 5e-4.
    "adamw": (revhyper.adam, "adam",
              dict(learning_rate=0.002, b1=0.5, b2=0.5, weight_decay=250.0, eps=0.1),
              [0.5, 0.5, 0.5], 170),
}


def spilling(devices):
  """Runs where every stack spills, at the default optimisation, against one device."""
  out = {"devices": len(jax.devices())}
  model = mesh_of((devices,), ("model",))
  data = mesh_of((devices,), ("data",))
  params = mlp_params()
  cases = {"sgd_model": ("sgd", mlp_loss(), dict(mesh=model, param_specs=MODEL_SPECS)),
           "sgd_data": ("sgd", mlp_loss(data), dict(mesh=data)),
           "adamw_model": ("adamw", mlp_loss(), dict(mesh=model, param_specs=MODEL_SPECS))}
  for name, (optimizer, loss, layout) in cases.items():
    train, trip_name, kwargs, decays, num_steps = SPILLING[optimizer]
    # Traced learning rates (and so traced decays with a weight decay): min_momentum.
    bound = dict(min_momentum=min(decays) - 0.05)

    def meta(h, method, loss=loss, train=train, kwargs=kwargs, num_steps=num_steps):
      out = train(loss, params, h["l2"], num_steps=num_steps,
                  **dict(kwargs, learning_rate=h["lr"]), method=method)
      return mlp_loss()(out.params, 0.0, num_steps + 7), out.stats

    h = {"l2": jnp.float32(1e-3), "lr": jnp.float32(kwargs["learning_rate"])}
    one, _ = jax.jit(jax.grad(lambda h: meta(h, revhyper.Reversible(**bound)),
                              has_aux=True))(h)
    many, stats = jax.jit(jax.grad(lambda h: meta(h, revhyper.Reversible(
        **layout, **bound, check_reversal=True)), has_aux=True))(h)
    trip = revhyper.round_trip(loss, params, 1e-3, optimizer=trip_name, num_steps=num_steps,
                               method=revhyper.Reversible(**layout), **kwargs)
    # The fewest chunks a lane spills (the stack holding the least), if the stacks hold the
    # information bound: checked against the statistics, which count every device's lanes.
    fewest = min(num_steps * np.log2(1 / f) for f in decays) / _bitstack.CHUNK_BITS
    out[name] = {"hypergradient_error": relative_error(many, one),
                 "finite": bool(all(np.all(np.isfinite(x)) for x in jax.tree.leaves(many))),
                 "stored_over_bound": float(stats.bits_stored / stats.information_bound_bits),
                 "failed": bool(stats.failed),
                 "fewest_spills_per_lane": float(fewest),
                 "round_trip_exact": bool(trip.exact),
                 "round_trip_rebuilt": rebuilt_bit_for_bit(trip, params)}
  return out


# The result type may be a tuple, "(f32[64]{0}, f32[4]{0})": everything up to the op's name.
COLLECTIVE = re.compile(
    r"=\s*(.+?)\s+(all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)"
    r"(-start)?\(")


def collectives(compiled):
  """``(result type, op)`` of every collective in a compiled program's HLO."""
  return sorted({(m.group(1), m.group(2)) for m in COLLECTIVE.finditer(compiled.as_text())})


def layout(devices):
  # A tail that dominates the state: momentum 0.01 stores log2(1 / 0.01) = 6.6 bits per weight
  # per step, 256 chunks per lane over 1000 steps. Compiled only, never run.
  steps, width = 1000, 8192
  params = {"a": jnp.zeros((8, width)), "b": jnp.zeros(width)}
  specs = {"a": P(None, "x"), "b": P("x")}
  target = jnp.linspace(-1.0, 1.0, width)
  loss = lambda p, h, t: jnp.sum((p["a"] - target) ** 2) + jnp.sum((p["b"] - h) ** 2)
  memory = {}
  for n in sorted({1, 2, 4, devices}):
    method = revhyper.Reversible(mesh=mesh_of((n,), ("x",)), param_specs=specs)
    # The hypergradient's program: there the tail lives from the forward to the reverse loop
    # (training alone never reads it back, and XLA drops what is never read).
    meta = lambda h, m=method: jnp.sum(revhyper.sgd(
        loss, params, h, num_steps=steps, learning_rate=0.01, momentum=0.01, method=m).params["b"])
    analysis = jax.jit(jax.grad(meta)).lower(0.5).compile().memory_analysis()
    memory[n] = int(analysis.temp_size_in_bytes)
  tail_bytes = 4 * 256 * 9 * width  # uint32 chunks: 256 per lane, 9 * width lanes

  model = mesh_of((devices,), ("model",))
  data = mesh_of((devices,), ("data",))
  programs = {}
  for name, loss, method in [
      ("model", mlp_loss(), dict(mesh=model, param_specs=MODEL_SPECS)),
      ("data", mlp_loss(data), dict(mesh=data))]:
    params = mlp_params()
    method = revhyper.Reversible(**method)

    def meta(h, loss=loss, method=method, params=params):
      out = revhyper.sgd(loss, params, h, num_steps=NUM_STEPS, learning_rate=LEARNING_RATE,
                         momentum=0.9,
                         method=method)
      return mlp_loss()(out.params, 0.0, NUM_STEPS)

    programs[name] = collectives(jax.jit(jax.grad(meta)).lower(1e-3).compile())
  return {"devices": len(jax.devices()), "temp_bytes": memory, "tail_bytes": tail_bytes,
          "collectives": programs}


if __name__ == "__main__":
  mode, devices = sys.argv[1], int(sys.argv[2])
  modes = {"model": model_parallel, "data": data_parallel, "spilling": spilling,
           "layout": layout}
  result = modes[mode](devices)
  print(json.dumps(result))
