"""Sharded exact state: one bit stack per device, on 4 and 8 simulated CPU devices.

JAX fixes its device count at start-up and this process has one device (conftest.py), so the
multi-device checks run in fresh processes (``tests/sharding_checks.py``), beside the other
tests (tests/background.py), and are read back as JSON. The checks that one device can make
(configuration errors, a one-device mesh giving the unsharded run's bits) run here.
"""

import json
import math
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import revhyper
from background import Job
from sharding_checks import assert_within_float32_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "sharding_checks.py")
# log2(2**16 / 58982): the information bound for momentum 0.9 rounded to 58982 / 2**16.
BOUND_BITS = 16 - math.log2(58982)
CHECKS = {"model": 4, "data": 8, "spilling": 4, "layout": 8}
# Exact code compiles at XLA's backend level 0 too (the same program runs in both loops), in
# half the time; the memory plan is measured as a user would compile it, and the spilling runs
# are checked as a user would compile them.
FAST_COMPILE = {"model": True, "data": True, "spilling": False, "layout": False}


def jobs(folder):
  """Every mode of sharding_checks.py, each in its own process, and the documented example."""
  del folder  # these jobs write nothing but their output
  specs = {}
  for mode, devices in CHECKS.items():
    flags = f"--xla_force_host_platform_device_count={devices}"
    if FAST_COMPILE[mode]:
      flags += " --xla_backend_optimization_level=0"
    env = {"XLA_FLAGS": flags, "PYTHONPATH": ROOT}
    specs[mode] = Job([sys.executable, SCRIPT, mode, str(devices)], env=env, timeout=300)
  specs["example"] = Job([sys.executable, "-c", scaling_example()], timeout=300, env={
      "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
      "PYTHONPATH": ROOT})
  return specs


def scaling_example():
  """The example of docs/scaling.rst, then a line printing its sharded and one-device results."""
  page = pathlib.Path(ROOT, "docs", "scaling.rst").read_text()
  block = page[page.index(".. code-block:: python\n") + len(".. code-block:: python\n"):]
  lines = []
  for line in block.splitlines()[1:]:  # after the blank line that opens the block
    if line and not line.startswith("   "):
      break
    lines.append(line[3:])
  code = "\n".join(lines)
  code += "\nassert len(jax.devices()) == 8\nprint('RESULT', float(hypergrad(1e-3, sharded)), "
  code += "float(hypergrad(1e-3, revhyper.Reversible())))\n"
  return code


@pytest.fixture(scope="module")
def checks(background_jobs):
  """What every mode of sharding_checks.py printed last, as JSON."""
  results = {}
  for mode, proc in background_jobs.results(jobs).items():
    if mode in CHECKS:
      assert proc.returncode == 0, proc.stderr[-4000:]
      results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
      assert results[mode]["devices"] == CHECKS[mode]
  return results


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["model", "data"])
def test_sharded_bit_stack_matches_one_stack_bit_for_bit(checks, mode):
  stack = checks[mode]["stack"]
  assert stack["heads_equal"] and stack["values_equal"]
  assert stack["restored"] and stack["empty"]
  # Each device's pointer counts its own lanes' chunks; together they are the one stack's.
  assert stack["ptr_sum_equal"]
  assert len(stack["ptr_per_device"]) == CHECKS[mode]
  assert stack["tail_sharding"] == "P('x',)"
  one, many = stack["stored_bits"]
  assert many == pytest.approx(one, rel=1e-12)


@pytest.mark.slow
def test_model_parallel_round_trip_is_exact_and_stores_the_bound(checks):
  result = checks["model"]
  assert result["round_trip_exact"] and not result["buffer_overflow"]
  assert result["round_trip_rebuilt"]  # the initial weights, bit for bit
  assert result["bits_per_weight_per_step"] == pytest.approx(BOUND_BITS, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["model", "data"])
def test_sharded_hypergradient_agrees_with_one_device(checks, mode):
  # With the in-pass reversal check: a reverse loop that missed a bit gives NaN here.
  assert_within_float32_error(checks[mode])


@pytest.mark.slow
def test_vmap_of_the_sharded_hypergradient_agrees_with_one_device(checks):
  # vmap over learning rates around a jitted, model-parallel hypergradient with the in-pass
  # reversal check: each rate's hypergradient is the one-device run's.
  assert checks["model"]["vmap_hypergradient_error"] <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "sgd_weight_decay"])
def test_other_optimizers_reverse_exactly_and_agree_with_one_device(checks, optimizer):
  # Adam's two moments share one stack and AdamW's weight decay has a second: every stack is
  # laid out per device, and the hypergradient's in-pass check passes.
  result = checks["model"]["optimizers"][optimizer]
  assert result["round_trip_exact"] and result["round_trip_rebuilt"]
  assert_within_float32_error(result)


@pytest.mark.slow
def test_running_averages_beside_sharded_weights_reverse_exactly(checks):
  # BatchNorm-like statistics per hidden unit, replicated on every device with a bit stack of
  # their own on each: the round trip rebuilds them bit for bit, and the hypergradient through
  # them (with the in-pass reversal check) is the one-device run's.
  result = checks["model"]["model_state"]
  assert result["round_trip_exact"] and result["round_trip_rebuilt"]
  assert abs(result["bits_over_bound"] - 1) <= 0.01
  assert result["hypergradient_error"] <= 2e-6


@pytest.mark.slow
@pytest.mark.parametrize("run", ["sgd_typed", "sgd_given", "adam_given"])
def test_parameters_on_explicit_axes_work_with_every_method(checks, run):
  # jax.make_mesh's default axes are Explicit: the layout is in the arrays' types. Reversible
  # takes it from the parameters ("typed") or from mesh and param_specs ("given", with the
  # in-pass reversal check); both agree with unroll and keep the weights' layout.
  explicit = checks["data"]["explicit"]
  assert explicit[f"{run}_error"] <= 1e-5
  assert explicit[f"{run}_w1_type"] == "float32[16,64@model]"


@pytest.mark.slow
def test_explicit_axes_round_trip_is_exact(checks):
  explicit = checks["data"]["explicit"]
  assert explicit["round_trip_exact"] and explicit["round_trip_rebuilt"]


@pytest.mark.slow
def test_data_and_model_parallel_round_trip_is_exact(checks):
  assert checks["data"]["data_and_model_round_trip_exact"]
  assert checks["data"]["data_and_model_round_trip_rebuilt"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["sgd_model", "sgd_data", "adamw_model"])
def test_sharded_runs_whose_stacks_spill_agree_with_one_device(checks, case):
  # Compiled at the default optimisation; every lane of every stack spills at least 5 chunks
  # (the stacks hold the information bound), so the backward pass refills on every device.
  result = checks["spilling"][case]
  assert not result["failed"]
  assert result["fewest_spills_per_lane"] >= 5
  assert result["stored_over_bound"] == pytest.approx(1.0, rel=0.01)
  # The in-pass reversal check passed (NaN otherwise), and the sums are float32's alone.
  assert result["finite"]
  assert result["hypergradient_error"] <= 1e-5
  assert result["round_trip_exact"] and result["round_trip_rebuilt"]


@pytest.mark.slow
def test_per_device_memory_falls_as_one_over_devices(checks):
  temp = {int(k): v for k, v in checks["layout"]["temp_bytes"].items()}
  assert checks["layout"]["tail_bytes"] <= temp[1]  # the stack is what the plan holds
  for devices, per_device in temp.items():
    assert per_device == pytest.approx(temp[1] / devices, rel=0.05), (devices, temp)


@pytest.mark.slow
@pytest.mark.parametrize("program", ["model", "data"])
def test_no_collective_touches_the_bit_stack(checks, program):
  # The stack's arrays are uint32 (tail) and uint64 (heads), its pointers int64; the only
  # collectives are the loss's own float reductions and the final failure flags.
  found = checks["layout"]["collectives"][program]
  for result_type, op in found:
    for dtype in ("u32[", "u64[", "s64["):
      assert dtype not in result_type, (op, result_type)
  if program == "data":  # weights replicated, batch split: the gradient is all-reduced
    assert any("f32[64,16]" in t for t, _ in found)


def _problem():
  params = {"a": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(4)}
  loss = lambda p, h, t: jnp.sum((p["a"] - h) ** 2 * (1 + t)) + jnp.sum(jnp.sin(p["b"]))
  return loss, params


@pytest.mark.slow
def test_one_device_mesh_gives_the_unsharded_run_bit_for_bit():
  loss, params = _problem()
  mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
  kw = dict(num_steps=15, learning_rate=0.05, momentum=0.8)
  sharded = revhyper.Reversible(mesh=mesh, param_specs={"a": P(None, "x"), "b": P("x")})
  meta = lambda h, m: jnp.sum(revhyper.sgd(loss, params, h, method=m, **kw).params["a"])
  one = jax.grad(meta)(0.3, revhyper.Reversible())
  many = jax.grad(meta)(0.3, sharded)
  assert one == many
  trip = revhyper.round_trip(loss, params, 0.3, method=sharded, **kw)
  assert bool(trip.exact)


def test_methods_with_equal_layouts_are_equal_and_hash_alike():
  mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
  a = revhyper.Reversible(mesh=mesh, param_specs={"a": P("x"), "b": None})
  b = revhyper.Reversible(mesh=mesh, param_specs={"a": P("x"), "b": None})
  assert a == b and hash(a) == hash(b)
  assert a != revhyper.Reversible(mesh=mesh, param_specs={"a": None, "b": None})


@pytest.mark.parametrize("make, pattern", [
    (lambda mesh: revhyper.Reversible(param_specs=P("x")), "needs a mesh"),
    (lambda mesh: revhyper.Reversible(mesh="x"), "must be a jax.sharding.Mesh"),
    (lambda mesh: revhyper.Reversible(mesh=jax.make_mesh(
        (1, 1), ("x", "y"), axis_types=(AxisType.Auto, AxisType.Explicit))),
     "all Auto or all Explicit"),
])
def test_bad_layout_raises_at_construction(make, pattern):
  mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
  with pytest.raises(ValueError, match=pattern):
    make(mesh)


@pytest.mark.parametrize("specs, pattern", [
    ({"a": P("y"), "b": None}, "distinct axes of the mesh"),
    ({"a": P("x", "x"), "b": None}, "distinct axes of the mesh"),
    ({"a": P(None, None, "x"), "b": None}, "more entries"),
    ({"a": P("x")}, "a pytree like params"),
    ({"a": "x", "b": None}, "PartitionSpec or None"),
])
def test_bad_param_specs_raise_a_clear_error(specs, pattern):
  loss, params = _problem()
  mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
  with pytest.raises(ValueError, match=pattern):
    revhyper.sgd(loss, params, 0.3, num_steps=3, learning_rate=0.1, momentum=0.9,
                 method=revhyper.Reversible(mesh=mesh, param_specs=specs))


def test_explicitly_laid_out_params_with_an_auto_mesh_raise_a_clear_error():
  loss, params = _problem()
  explicit = jax.make_mesh((1,), ("x",), axis_types=(AxisType.Explicit,))
  params = jax.device_put(params, NamedSharding(explicit, P()))
  auto = Mesh(np.array(jax.devices()[:1]), ("x",))
  with pytest.raises(ValueError, match="Explicit axes, but Reversible's mesh has Auto"):
    revhyper.sgd(loss, params, 0.3, num_steps=3, learning_rate=0.1, momentum=0.9,
                 method=revhyper.Reversible(mesh=auto))


@pytest.mark.slow
def test_documented_scaling_example_runs_on_eight_devices(background_jobs):
  proc = background_jobs.results(jobs)["example"]
  assert proc.returncode == 0, proc.stderr[-4000:]
  sharded, one = map(float, proc.stdout.split("RESULT")[1].split())
  assert sharded == pytest.approx(one, rel=1e-6)
