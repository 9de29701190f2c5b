"""What revhyper's failure checks cost: hypergradient time with checks on and off, alone and
under ``vmap``, and the compile time of a second process through JAX's persistent cache.

The checks record every failure in ``Stats`` and turn the outputs of a failed run into NaN
inside the compiled program (no host callback), so they should cost next to nothing, batch
per element, and leave programs that the persistent compilation cache can store. This script
measures all three side by side in one run and prints ratios.

  python experiments/benchmark_checks.py                 # about a minute on 2 CPU cores
  python experiments/benchmark_checks.py --batch=32 --steps=50 --repeats=5   # quicker
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

from absl import app
from absl import flags

import jax
import jax.numpy as jnp
import revhyper

_STEPS = flags.DEFINE_integer("steps", 200, "Training steps T of each hypergradient.")
_BATCH = flags.DEFINE_integer("batch", 128, "Hyperparameter settings batched by vmap.")
_REPEATS = flags.DEFINE_integer("repeats", 200, "Timed calls per configuration (median).")
_HIDDEN = flags.DEFINE_integer("hidden", 4, "Hidden units of the toy network (8-H-1).")
_OUT = flags.DEFINE_string("out", None, "Optional path of a JSON file for the results.")

# A small problem by default, where per-call overheads (host callbacks, say) show most, and
# where the per-weight range checks weigh most against the cheap loss.
_LOSS_SOURCE = """
def loss_fn(w, h, t):
  x = jnp.sin(jnp.arange(8.0) + t.astype(jnp.float32))
  pred = jnp.tanh(x @ w["w"]) @ w["v"]
  return (pred - 1.0) ** 2 + h * jnp.sum(w["w"] ** 2)

PARAMS = {"w": 0.1 * jnp.ones((8, HIDDEN)), "v": 0.1 * jnp.ones(HIDDEN)}
"""


def _problem(hidden):
  namespace = {"jnp": jnp, "HIDDEN": hidden}
  exec(_LOSS_SOURCE, namespace)  # pylint: disable=exec-used  (the child process runs it too)
  return namespace["loss_fn"], namespace["PARAMS"]


def _hypergradient(checks, steps, hidden, read_stats):
  """The hypergradient, with the run's statistics as an output when ``read_stats``.

  Statistics that nothing reads are dead code to XLA, which then drops the per-weight range
  tracking too: ``checks=False`` with unread statistics is training with no safety at all.
  """
  loss_fn, params = _problem(hidden)
  method = revhyper.Reversible(min_momentum=0.5, checks=checks)

  def meta(h, lr):
    out = revhyper.sgd(loss_fn, params, h, num_steps=steps, learning_rate=lr, momentum=0.9,
                       method=method)
    return jnp.sum(out.params["v"] ** 2), out.stats if read_stats else None

  return jax.grad(meta, argnums=(0, 1), has_aux=True)


def _measure_pair(fns, args, repeats):
  """Compile times and median run times of several functions, timed round-robin so that a
  change in the machine's load falls on all of them alike."""
  compiled, compile_s = [], []
  for fn in fns:
    start = time.perf_counter()
    compiled.append(jax.jit(fn).lower(*args).compile())
    compile_s.append(time.perf_counter() - start)
    jax.block_until_ready(compiled[-1](*args))
  times = [[] for _ in fns]
  for _ in range(repeats):
    for f, record in zip(compiled, times):
      start = time.perf_counter()
      jax.block_until_ready(f(*args))
      record.append(time.perf_counter() - start)
  return [(c, statistics.median(t)) for c, t in zip(compile_s, times)]


def _second_process_compile(steps, hidden):
  """Compile times of the same hypergradient in two fresh processes sharing a cache dir."""
  script = textwrap.dedent("""
      import sys, time, jax, jax.numpy as jnp, revhyper
      jax.config.update("jax_compilation_cache_dir", sys.argv[1])
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  """) + f"HIDDEN = {hidden}\n" + _LOSS_SOURCE + textwrap.dedent(f"""
      def meta(h, lr):
        out = revhyper.sgd(loss_fn, PARAMS, h, num_steps={steps}, learning_rate=lr,
                           momentum=0.9, method=revhyper.Reversible(min_momentum=0.5))
        return jnp.sum(out.params["v"] ** 2)
      args = (jnp.float32(1e-3), jnp.float32(0.05))
      start = time.perf_counter()
      jax.jit(jax.grad(meta, argnums=(0, 1))).lower(*args).compile()
      print(time.perf_counter() - start)
  """)
  with tempfile.TemporaryDirectory() as cache:
    return [float(subprocess.run([sys.executable, "-c", script, cache], check=True,
                                 capture_output=True, text=True).stdout.split()[-1])
            for _ in range(2)]


def main(argv):
  del argv
  steps, batch = _STEPS.value, _BATCH.value
  h, lr = jnp.float32(1e-3), jnp.float32(0.05)
  lrs = jnp.linspace(0.01, 0.1, batch, dtype=jnp.float32)
  # Checks on (statistics read or not: the checks need them), checks off with the statistics
  # read (what the checks themselves cost), checks off with nothing read (no range tracking).
  configs = {"on": (True, True), "off": (False, True), "bare": (False, False)}
  grads = [_hypergradient(c, steps, _HIDDEN.value, r) for c, r in configs.values()]
  rows = {"single": _measure_pair(grads, (h, lr), _REPEATS.value),
          "vmap": _measure_pair([jax.vmap(g, in_axes=(None, 0)) for g in grads], (h, lrs),
                                max(3, _REPEATS.value // 4))}
  first, second = _second_process_compile(steps, _HIDDEN.value)
  print(f"reversible hypergradient, 8-{_HIDDEN.value}-1 tanh net, T = {steps}, jax "
        f"{jax.__version__} on "
        f"{jax.default_backend()}: median run time (compile time)")
  print(f"{'':>16} {'checks on':>21} {'off, stats read':>21} {'off, nothing read':>21}"
        f" {'on/off':>7} {'on/bare':>8}")
  results = {"steps": steps, "batch": batch, "hidden": _HIDDEN.value, "rows": {}}
  for kind, label in (("single", "one setting"), ("vmap", f"vmap, B = {batch}")):
    (c_on, on), (c_off, off), (c_bare, bare) = rows[kind]
    cells = " ".join(f"{t * 1e3:9.3f} ms ({c:5.2f} s)" for c, t in rows[kind])
    print(f"{label:>16} {cells} {on / off:6.3f}x {on / bare:7.3f}x")
    results["rows"][kind] = {"checks_on_s": on, "checks_off_s": off, "no_stats_s": bare,
                             "compile_s": [c_on, c_off, c_bare]}
  print(f"compile through the persistent cache: first process {first:.2f} s, "
        f"second process {second:.2f} s")
  results["persistent_cache_compile_s"] = [first, second]
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
