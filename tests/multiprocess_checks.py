"""Checks of exact training on several JAX processes, one process each, started together.

``tests/test_multiprocess.py`` starts this script as 2 processes with 4 simulated CPU devices
each (``experiments/launch_local.py``, which adds ``--coordinator``, ``--num_processes`` and
``--process_id``); the processes join with ``jax.distributed.initialize`` and talk over gloo.
Every process writes what it saw to ``--out_dir/process_<index>.json``.

Modes:
  checks  a mesh of the 8 devices of both processes: the MLP's hidden units split over it
          ("model": each process holds half of every split leaf) and the batch split over it
          ("data"); SGD with weight decay and AdamW: round trips (the rebuilt initial weights
          compared with the originals shard by shard, bit for bit; not AdamW on replicated
          weights, which adds nothing to the other three) and hypergradients with the
          in-pass reversal check against this process's one-device run and a float64
          unroll; the bit stack's
          shards (which devices hold them, how many bytes each process holds); a loss that
          is nondeterministic on process 1 only, which every process must see fail.
  meta    ``revhyper.meta.meta_optimize`` on the model-parallel MLP with checkpoints in a
          shared folder; ``--kill_at=I`` makes process ``--kill_process`` kill itself (SIGKILL)
          after meta-iteration I, and ``--resume`` continues from the checkpoints.
"""

import json
import os
import signal
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "experiments"))
import distributed  # noqa: E402  (experiments/distributed.py: the processes' flags)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import revhyper  # noqa: E402
from revhyper import _bitstack  # noqa: E402
from revhyper import _sharding  # noqa: E402
from sharding_checks import float32_errors  # noqa: E402  (the sharded tests' error record)

flags.DEFINE_enum("mode", "checks", ["checks", "meta"], "What to check.")
flags.DEFINE_string("out_dir", None, "Where process_<index>.json goes.", required=True)
flags.DEFINE_string("checkpoint_dir", None, "meta: the shared checkpoint folder.")
flags.DEFINE_integer("num_iterations", 6, "meta: meta-iterations.")
flags.DEFINE_integer("kill_at", None, "meta: the iteration after which a process kills itself.")
flags.DEFINE_integer("kill_process", 1, "meta: which process kills itself.")
flags.DEFINE_bool("resume", False, "meta: continue from the checkpoints.")
FLAGS = flags.FLAGS

NUM_STEPS = 12
WIDTH = 64  # hidden units: 8 per device
BATCH = 32  # 4 examples per device in the data-parallel layout
MODEL_SPECS = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": None}
OPTIMIZERS = {
    "sgd_weight_decay": ("sgd", dict(learning_rate=0.05, momentum=0.9, weight_decay=0.1)),
    "adamw": ("adam", dict(learning_rate=0.01, weight_decay=0.1)),
}


def host_params():
  """The MLP's initial weights as numpy arrays: every process builds the same ones."""
  rng = np.random.default_rng(0)
  return {"w1": (0.3 * rng.standard_normal((16, WIDTH))).astype(np.float32),
          "b1": np.zeros(WIDTH, np.float32),
          "w2": (0.3 * rng.standard_normal((WIDTH, 4))).astype(np.float32),
          "b2": np.zeros(4, np.float32)}


def global_params(mesh, specs):
  """The weights laid out on ``mesh``: each process makes only its own devices' blocks."""
  return {k: jax.make_array_from_callback(v.shape, NamedSharding(mesh, specs[k] or P()),
                                          lambda index, v=v: v[index])
          for k, v in host_params().items()}


def mlp_loss(data_mesh=None):
  def loss(p, l2, t):
    x = jnp.cos(jnp.arange(BATCH, dtype=jnp.float32)[:, None] * 0.37
                + jnp.arange(16, dtype=jnp.float32) * 0.11 + t * 0.01)
    y = jnp.sin(x[:, :4] * 3.0)
    if data_mesh is not None:  # the batch split over "data"
      x, y = jax.lax.with_sharding_constraint((x, y), NamedSharding(data_mesh, P("data")))
    out = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return jnp.mean((out - y) ** 2) + l2 * jnp.sum(p["w1"] ** 2)
  return loss


def local_shards_equal(array, host):
  """This process's shards of a global array equal the host array's blocks, bit for bit."""
  return all(np.array_equal(np.asarray(s.data), host[s.index]) for s in array.addressable_shards)


def hypergradient(loss, optimizer, kwargs, params, method, dtype=jnp.float32):
  """jit(grad) of a validation loss with respect to the L2 penalty and a learning rate per
  leaf."""
  train = getattr(revhyper, optimizer)

  def meta(h, params):
    out = train(loss, params, h["l2"], num_steps=NUM_STEPS,
                **dict(kwargs, learning_rate=h["lr"]), method=method)
    return mlp_loss()(out.params, 0.0, NUM_STEPS + 7)

  h = {"l2": jnp.asarray(1e-3, dtype),
       "lr": {k: jnp.asarray(kwargs["learning_rate"], dtype) for k in host_params()}}
  return jax.device_get(jax.jit(jax.grad(meta))(h, params))


def float64_reference(optimizer, kwargs):
  """The hypergradient by float64 unroll on this process's first device: the yardstick of
  every float32 run (sharded sums add in another order than one device's, and Adam's division
  amplifies the difference to about float32's own error of the hypergradient)."""
  with jax.enable_x64(True):
    params = jax.device_put({k: v.astype(np.float64) for k, v in host_params().items()},
                            jax.local_devices()[0])
    return hypergradient(mlp_loss(), optimizer, kwargs, params, revhyper.Unroll(),
                         dtype=jnp.float64)


def floats(tree):
  """The leaves of a hypergradient as a flat list of Python floats."""
  return [float(x) for x in jax.tree.leaves(tree)]


def layouts(devices):
  """Round trips and hypergradients, model- and data-parallel, against one device."""
  host = host_params()
  one_device = jax.device_put(host, jax.local_devices()[0])
  # The decays are traced under jit (lr * weight_decay): min_momentum bounds them.
  references = {name: hypergradient(mlp_loss(), opt, kw, one_device,
                                    revhyper.Reversible(min_momentum=0.8))
                for name, (opt, kw) in OPTIMIZERS.items()}
  float64 = {name: float64_reference(opt, kw) for name, (opt, kw) in OPTIMIZERS.items()}
  out = {}
  for layout in ("model", "data"):
    mesh = Mesh(devices, (layout,))
    specs = MODEL_SPECS if layout == "model" else {k: None for k in host}
    params = global_params(mesh, specs)
    loss = mlp_loss(mesh if layout == "data" else None)
    method = dict(mesh=mesh, param_specs=specs, min_momentum=0.8)
    for name, (optimizer, kwargs) in OPTIMIZERS.items():
      got = hypergradient(loss, optimizer, kwargs, params,
                          revhyper.Reversible(**method, check_reversal=True))
      out[f"{layout}_{name}"] = result = {
          # Which blocks of w1 this process holds: its devices' columns, or the whole leaf.
          "w1_local_shapes": [list(s.data.shape) for s in params["w1"].addressable_shards],
          "hypergradient": floats(got),
          **float32_errors(got, float64[name], [references[name]]),
      }
      if (layout, name) == ("data", "adamw"):
        continue  # replicated weights: nothing that the other three round trips do not show
      trip = lambda params, optimizer=optimizer, kwargs=kwargs: revhyper.round_trip(
          loss, params, 1e-3, num_steps=NUM_STEPS, optimizer=optimizer,
          method=revhyper.Reversible(**method), **kwargs)
      # Eager adam reads the values of its default second moment, which no process can do
      # when they span several processes; under jit it only checks traced values.
      trip = jax.jit(trip)(params) if optimizer == "adam" else trip(params)
      result["round_trip_exact"] = bool(trip.exact)
      result["initial_params_bitwise"] = all(
          local_shards_equal(trip.initial_params[k], host[k]) for k in host)
  return out


def stack_shards(devices):
  """A sharded bit stack pushed and popped: which shards each process holds, and its bytes."""
  mesh = Mesh(devices, ("x",))
  shapes = ((len(devices) * 96,), (3, len(devices) * 8))
  shards = _sharding.make(mesh, (P("x"), P(None, "x")), shapes)
  rng = np.random.default_rng(0)
  numerators = rng.integers(1, 2**16, size=60).astype(np.uint64)
  numerators[::7] = 1  # 16 bits per lane and step: every lane spills often
  with jax.enable_x64(True):
    host = [rng.integers(-2**62, 2**62, size=s) for s in shapes]
    values = [jax.make_array_from_callback(s, NamedSharding(mesh, spec),
                                           lambda index, v=v: v[index])
              for s, spec, v in zip(shapes, shards.specs, host)]
    capacity = _bitstack.bucket(_bitstack.max_chunks_per_lane(numerators))
    run = lambda shards: jax.jit(lambda values: push_pop(values, numerators, capacity, shards))
    pushed, back, empty = run(shards)(values)
    one_pushed, _, _ = run(None)([jnp.asarray(v) for v in host])
    arrays = [pushed.tail, pushed.ptr, pushed.overflow, pushed.bound, *pushed.head]
    local_devices = {d.id for d in jax.local_devices()}
    return {
        "tail_shape": list(pushed.tail.shape),
        "tail_local_shard_shapes": [list(s.data.shape) for s in pushed.tail.addressable_shards],
        "tail_local_rows": sorted(s.index[0].start for s in pushed.tail.addressable_shards),
        "tail_fully_addressable": pushed.tail.is_fully_addressable,
        "shards_on_local_devices_only": all(s.device.id in local_devices
                                            for a in arrays for s in a.addressable_shards),
        "local_bytes": sum(s.data.nbytes for a in arrays for s in a.addressable_shards),
        "global_bytes": sum(a.nbytes for a in arrays),
        "local_ptr": [int(s.data[0]) for s in pushed.ptr.addressable_shards],
        # Every process's pointers together: the one stack's pointer, split by device.
        "ptr_sum": int(np.sum(multihost_utils.process_allgather(pushed.ptr, tiled=True))),
        "one_stack_ptr": int(one_pushed.ptr),
        "restored": all(local_shards_equal(b, v) for b, v in zip(back, host)),
        "empty": bool(empty),
    }


def push_pop(values, numerators, capacity, shards):
  lanes = _sharding.local_sizes([v.shape for v in values], shards)
  stack = _bitstack.empty([v.shape for v in values], capacity * sum(lanes), shards=shards)
  ns = lambda n: [n.astype(jnp.uint64)] * len(values)

  def forward(carry, n):
    stack, v = carry
    return _bitstack.multiply(stack, v, ns(n), n.astype(jnp.float64), shards=shards), None

  def backward(carry, n):
    stack, v = carry
    return _bitstack.divide(stack, v, ns(n), n.astype(jnp.float64), shards=shards), None

  (pushed, w), _ = jax.lax.scan(forward, (stack, values), numerators)
  (popped, back), _ = jax.lax.scan(
      backward, (_bitstack.for_popping(pushed, shards), w), numerators, reverse=True)
  return pushed, back, _bitstack.is_empty(popped, shards=shards)


def one_process_fails(devices):
  """A loss whose gradient on process 1's devices is noise drawn anew at every evaluation:
  the reverse loop cannot rebuild that process's weights, and every process must see it."""
  mesh = Mesh(devices, ("model",))
  params = global_params(mesh, MODEL_SPECS)
  rng = np.random.default_rng(jax.process_index())

  def noise():  # runs on the host of each device, under shard_map
    return np.float32(rng.standard_normal() * 1e-3 if jax.process_index() == 1 else 0.0)

  def noisy(w1):
    eps = jax.pure_callback(noise, jax.ShapeDtypeStruct((), jnp.float32))
    return jax.lax.psum(eps * jnp.sum(w1), "model")

  noisy = jax.shard_map(noisy, mesh=mesh, in_specs=P(None, "model"), out_specs=P())
  loss = lambda p, l2, t: mlp_loss()(p, l2, t) + noisy(p["w1"])
  opt, kwargs = OPTIMIZERS["sgd_weight_decay"]
  method = revhyper.Reversible(mesh=mesh, param_specs=MODEL_SPECS, min_momentum=0.8,
                               check_reversal=True)
  got = hypergradient(loss, opt, kwargs, params, method)
  trip = revhyper.round_trip(loss, params, 1e-3, num_steps=NUM_STEPS,
                             method=revhyper.Reversible(mesh=mesh, param_specs=MODEL_SPECS),
                             **kwargs)
  return {"hypergradient": floats(got),
          "round_trip_exact": bool(trip.exact)}


def checks():
  devices = np.array(jax.devices())
  out, seconds = {}, {}
  for name, check in (("layouts", layouts), ("stack", stack_shards),
                      ("one_process_fails", one_process_fails)):
    start = time.perf_counter()
    out[name] = check(devices)
    seconds[name] = time.perf_counter() - start
  return dict(out, seconds=seconds)


def meta():
  """A few meta-iterations of a model-parallel MLP's learning rate and L2 penalty, with fresh
  initial weights from each iteration's key; checkpoints every 2 iterations."""
  devices = np.array(jax.devices())
  mesh = Mesh(devices, ("model",))
  layout = {k: NamedSharding(mesh, s or P()) for k, s in MODEL_SPECS.items()}
  method = revhyper.Reversible(mesh=mesh, param_specs=MODEL_SPECS, min_momentum=0.8)
  loss = mlp_loss()

  def meta_loss(h, key):
    shapes = {k: v.shape for k, v in host_params().items()}
    keys = dict(zip(shapes, jax.random.split(key, len(shapes))))
    params = {k: 0.3 * jax.random.normal(keys[k], s) for k, s in shapes.items()}
    params = jax.lax.with_sharding_constraint(params, layout)
    out = revhyper.sgd(loss, params, jnp.exp(h["log_l2"]), num_steps=NUM_STEPS,
                       learning_rate=jnp.exp(h["log_lr"]), momentum=0.9, method=method)
    return loss(out.params, 0.0, NUM_STEPS + 7)

  def callback(step):
    if step.iteration == FLAGS.kill_at and jax.process_index() == FLAGS.kill_process:
      os.kill(os.getpid(), signal.SIGKILL)

  latest = revhyper.meta.latest_checkpoint(FLAGS.checkpoint_dir) if FLAGS.resume else None
  result = revhyper.meta.meta_optimize(
      meta_loss, {"log_lr": jnp.float32(-3.0), "log_l2": jnp.float32(-6.0)},
      num_iterations=FLAGS.num_iterations, checkpoint_dir=FLAGS.checkpoint_dir,
      checkpoint_every=2, resume=FLAGS.resume, key=jax.random.key(7), callback=callback,
      progress=False)
  return {"resumed_from": os.path.basename(latest) if latest else None,
          "meta_loss": [r["meta_loss"] for r in result.history],
          # The bits of the final hyperparameters and optimizer state.
          "final_bits": [np.asarray(x).tobytes().hex()
                         for x in jax.tree.leaves((result.hparams, result.opt_state))]}


def main(argv):
  del argv
  index, count = distributed.initialize_from_flags()
  result = checks() if FLAGS.mode == "checks" else meta()
  result.update(process_index=index, process_count=count, devices=len(jax.devices()),
                local_devices=len(jax.local_devices()))
  path = os.path.join(FLAGS.out_dir, f"process_{index}.json")
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=1)
  os.replace(path + ".tmp", path)


if __name__ == "__main__":
  app.run(main)
