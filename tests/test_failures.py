"""Failures are recorded, raised where values are concrete, and never a quiet wrong number.

Also: the checks cost no host callback (so the persistent compilation cache can store the
programs), report per element under vmap, and the gradient path's reversal check fires.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import revhyper
from revhyper import _bitstack
from revhyper import _reversible
from revhyper import _training


def loss_fn(w, h, t):
  scale = 1.0 + 0.1 * jnp.sin(t.astype(w["a"].dtype))
  return scale * jnp.sum((w["a"] - h) ** 2) + 0.05 * jnp.sum(w["a"] ** 4) + jnp.sum(
      jnp.log(jnp.cosh(w["b"])))


PARAMS = {"a": jnp.linspace(-1.0, 1.5, 5, dtype=jnp.float32), "b": jnp.full((2, 3), 0.7)}


def objective(h, lr, method="reversible", num_steps=60, momentum=0.9):
  out = revhyper.sgd(loss_fn, PARAMS, h, num_steps=num_steps, learning_rate=lr,
                     momentum=momentum, method=method)
  return jnp.sum(out.params["a"] ** 2) + jnp.sum(out.params["b"]), out.stats


@pytest.mark.parametrize("method", [revhyper.Reversible(min_momentum=0.5),
                                    revhyper.Reversible(min_momentum=0.5, check_reversal=True),
                                    "unroll", "checkpoint"], ids=str)
def test_compiled_hypergradients_hold_no_host_callback(method):
  grad = jax.jit(jax.grad(lambda h, lr, m: objective(h, lr, method, momentum=m)[0],
                         argnums=(0, 1, 2)))
  text = grad.lower(jnp.float32(0.3), jnp.float32(0.05), jnp.float32(0.9)).as_text()
  assert "callback" not in text.lower()


def test_reversible_programs_hold_no_host_callback_with_checks():
  def meta(h):
    out = revhyper.sgd(loss_fn, PARAMS, h, num_steps=20, learning_rate=0.05, momentum=0.9,
                       method=revhyper.Reversible(check_reversal=True))
    return jnp.sum(out.params["a"])
  text = jax.jit(jax.value_and_grad(meta)).lower(jnp.float32(0.3)).as_text()
  assert "callback" not in text.lower()


@pytest.mark.slow
def test_persistent_compilation_cache_stores_the_hypergradient(tmp_path):
  # JAX logs each lookup of the persistent cache with the program's name and key: the first
  # process must miss and store the hypergradient's own program, the second load it.
  script = textwrap.dedent(f"""
      import json, logging, jax, jax.numpy as jnp, revhyper
      jax.config.update("jax_compilation_cache_dir", {str(tmp_path)!r})
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
      jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
      lookups = []
      class Lookups(logging.Handler):
        def emit(self, record):
          message = str(record.msg).lower()
          if "persistent compilation cache" in message and len(record.args) == 2:
            lookups.append(["hit" if "hit" in message else "miss", *record.args])
      compiler_log = logging.getLogger("jax._src.compiler")
      compiler_log.setLevel(logging.DEBUG)
      compiler_log.addHandler(Lookups())
      def loss(w, h, t):
        return jnp.sum((w - h) ** 2) + 0.1 * jnp.sum(w ** 4)
      def revhyper_hypergradient(h):
        out = revhyper.sgd(loss, jnp.ones(4), h, num_steps=50, learning_rate=0.05,
                           momentum=0.9, method=revhyper.Reversible(check_reversal=True))
        return jnp.sum(out.params ** 2)
      jax.jit(jax.grad(revhyper_hypergradient)).lower(jnp.float32(0.3)).compile()
      print(json.dumps(lookups))
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  runs = []
  for _ in range(2):
    proc = subprocess.run([sys.executable, "-c", script], check=True, env=env,
                          capture_output=True, text=True)
    lookups = json.loads(proc.stdout.strip().splitlines()[-1])
    runs.append({key: kind for kind, name, key in lookups
                 if name == "jit_revhyper_hypergradient"})
  (key, kind), = runs[0].items()
  assert kind == "miss"
  entries = [f for f in os.listdir(tmp_path) if f.startswith(key)]
  assert entries, f"the persistent cache did not store the hypergradient ({key})"
  assert runs[1] == {key: "hit"}


@pytest.mark.slow
def test_vmap_reports_failures_per_element_and_keeps_the_others_exact():
  lrs = jnp.asarray([0.02, 60.0, 0.05], jnp.float32)
  grad = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)
  h = jnp.float32(0.3)
  (values, stats), grads = jax.jit(jax.vmap(grad, in_axes=(None, 0)))(h, lrs)
  np.testing.assert_array_equal(np.asarray(stats.failed), [False, True, False])
  assert np.isnan(values[1]) and np.isnan(grads[0][1]) and np.isnan(grads[1][1])
  for i in (0, 2):
    (value, _), expected = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
        h, lrs[i], "unroll")
    np.testing.assert_allclose(values[i], value, rtol=1e-5)
    np.testing.assert_allclose(grads[1][i], expected[1], rtol=1e-4)
  with pytest.raises(revhyper.ReversalError, match=r"batch elements \[1\].*fixed-point"):
    stats.raise_if_failed()


@pytest.mark.parametrize("method", ["unroll", "checkpoint"])
def test_float_methods_raise_on_non_finite_results_eagerly_and_are_nan_under_jit(method):
  exploding = lambda w, h, t: jnp.sum(w["a"] ** 2) + jnp.sum(w["b"] ** 2)
  kwargs = dict(num_steps=300, learning_rate=50.0, momentum=0.5, method=method)
  with pytest.raises(revhyper.ReversalError, match="non-finite"):
    revhyper.sgd(exploding, PARAMS, None, **kwargs)
  out = jax.jit(lambda p: revhyper.sgd(exploding, p, None, **kwargs))(PARAMS)
  assert bool(out.stats.non_finite) and bool(out.stats.failed)
  unchecked = revhyper.Unroll(checks=False) if method == "unroll" else revhyper.Checkpoint(
      checks=False)
  out = revhyper.sgd(exploding, PARAMS, None, **dict(kwargs, method=unchecked))
  assert bool(out.stats.non_finite)


def test_stats_raise_if_failed_needs_concrete_values():
  with pytest.raises(ValueError, match="outside jax.jit"):
    jax.jit(lambda h: objective(h, 0.05)[1].raise_if_failed())(jnp.float32(0.3))
  objective(jnp.float32(0.3), 0.05)[1].raise_if_failed()  # a good run: nothing raised


# --- the gradient path's own reversal check ---------------------------------------------

HARD_REGIMES = {
    # momentum 0.3: 1.74 bits per weight per step, a spill every ~18 steps per lane
    "low_momentum": dict(num_steps=300, momentum=0.3),
    "long_run": dict(num_steps=2000, momentum=0.9),
    "per_step_schedule": dict(num_steps=400, momentum=jnp.linspace(0.05, 0.999, 400)),
    "per_leaf_schedule": dict(num_steps=250, momentum={
        "a": jnp.linspace(0.2, 0.95, 250), "b": jnp.linspace(0.99, 0.4, 250)}),
}


@pytest.mark.slow
@pytest.mark.parametrize("regime", sorted(HARD_REGIMES))
def test_gradient_path_reverses_exactly_and_matches_unroll_where_the_stack_spills(regime):
  kwargs = HARD_REGIMES[regime]

  def meta(h, lr, method):
    out = revhyper.sgd(loss_fn, PARAMS, h, learning_rate=lr, method=method, **kwargs)
    return jnp.sum(out.params["a"] ** 2) + jnp.sum(out.params["b"]), out.stats

  grad = jax.jit(jax.grad(meta, argnums=(0, 1), has_aux=True), static_argnums=2)
  checked = revhyper.Reversible(check_reversal=True)
  got, stats = grad(jnp.float32(0.3), jnp.float32(0.02), checked)
  # Many spills in every lane, so that the backward pass refills many times.
  lanes = PARAMS["a"].size + PARAMS["b"].size
  assert float(stats.bits_stored) > 5 * 32 * lanes, float(stats.bits_stored)
  assert np.all(np.isfinite(got))  # the in-pass check passed (a failure gives NaN)
  # Against store-all backprop in float64: at T = 2000 the learning-rate hypergradient is a sum
  # with much cancellation, where float32 unroll itself is off by 0.7% (reversible: 0.01%).
  with jax.enable_x64(True):
    to64 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)

    def meta64(h, lr):
      out = revhyper.sgd(loss_fn, to64(PARAMS), h, learning_rate=lr, method="unroll",
                         **dict(kwargs, momentum=to64(kwargs["momentum"])))
      return jnp.sum(out.params["a"] ** 2) + jnp.sum(out.params["b"])

    expected = jax.jit(jax.grad(meta64, argnums=(0, 1)))(jnp.float64(0.3), jnp.float64(0.02))
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, rtol=2e-4)


def _nondeterministic_loss(w, h, t):
  # A host-side random number: the reverse pass cannot recompute this gradient. Drawn in
  # [1, 2), not from a normal, so that no call's perturbation is too small to matter (a
  # normal draw near 0 let the unchecked gradient below pass for exact about 1 time in 40).
  noise = jax.pure_callback(lambda: np.float32(1.0 + np.random.default_rng().random()),
                            jax.ShapeDtypeStruct((), jnp.float32))
  return jnp.sum((w - h) ** 2) * (1.0 + 1e-3 * noise)


@pytest.mark.slow
def test_reversal_check_fires_on_a_nondeterministic_loss():
  def meta(h, method):
    out = revhyper.sgd(_nondeterministic_loss, jnp.ones(4), h, num_steps=30,
                       learning_rate=0.1, momentum=0.9, method=method)
    return jnp.sum(out.params ** 2)

  checked = revhyper.Reversible(check_reversal=True)
  with pytest.raises(revhyper.ReversalError, match="reversal check failed"):
    jax.grad(meta)(jnp.float32(0.3), checked)  # eager: the rebuilt state is concrete
  assert np.isnan(jax.jit(jax.grad(meta), static_argnums=1)(jnp.float32(0.3), checked))
  # Without the check the gradient is finite and wrong: what the check is for. The noise
  # scales the loss by 1e-3 to 2e-3, which moves the hypergradient by far more than float32
  # rounding from a deterministic loss's.
  unchecked = jax.jit(jax.grad(meta), static_argnums=1)(jnp.float32(0.3), "reversible")
  assert np.isfinite(unchecked)
  deterministic = lambda w, h, t: jnp.sum((w - h) ** 2)
  exact = jax.jit(jax.grad(lambda h: jnp.sum(revhyper.sgd(
      deterministic, jnp.ones(4), h, num_steps=30, learning_rate=0.1, momentum=0.9,
      method="unroll").params ** 2)))(jnp.float32(0.3))
  assert abs(unchecked - exact) > 1e-4 * abs(exact), (unchecked, exact)


def test_round_trip_of_a_nondeterministic_loss_is_not_exact():
  params = jnp.linspace(0.5, 1.5, 4, dtype=jnp.float32)
  trip = revhyper.round_trip(_nondeterministic_loss, params, jnp.float32(0.3), num_steps=30,
                             learning_rate=0.1, momentum=0.9)
  assert not bool(trip.exact)
  # The flag is not all that says so: the rebuilt weights differ from the initial ones.
  assert not np.array_equal(np.asarray(trip.initial_params), np.asarray(params))


@pytest.fixture
def corrupt_refills(monkeypatch):
  """Calling it makes every refill of a bit stack read chunks with their lowest bit flipped: a
  wrong tail, as a compiler or memory fault could leave it. Only programs traced while it
  holds see it: the caches of revhyper's programs are cleared when it starts and when the test
  ends, so that no corrupted program outlives the test and no intact one serves inside it."""
  refill = _bitstack._refill  # pylint: disable=protected-access

  def corrupted(stack, masks):
    return refill(stack._replace(tail=stack.tail ^ jnp.uint32(1)), masks)

  def clear():  # the programs that hold reversals, and with them every refill
    for program in (_reversible._forward_pass, _reversible._backward_pass,
                    _training._run_method_jit, _training._train_and_reverse_jit):
      program.clear_cache()

  def start():
    monkeypatch.setattr(_bitstack, "_refill", corrupted)
    clear()

  yield start
  monkeypatch.undo()
  clear()


@pytest.mark.parametrize("optimizer", ["sgd", pytest.param("adam", marks=pytest.mark.slow)])
def test_reversal_check_fires_on_a_corrupted_bit_stack(corrupt_refills, optimizer):
  # momentum (b1, b2) 0.3: 1.7 bits per lane and step, every lane spills 5 times in 100 steps.
  # Adam's second moment must stay below 2: its loss is scaled down.
  train = {"sgd": lambda **kw: revhyper.sgd(loss_fn=loss_fn, momentum=0.3, **kw),
           "adam": lambda **kw: revhyper.adam(
               loss_fn=lambda w, h, t: 0.1 * loss_fn(w, h, t), b1=0.3, b2=0.3, **kw)}[optimizer]

  def meta(h, check_reversal):
    out = train(params=PARAMS, hparams=h, num_steps=100, learning_rate=0.01,
                method=revhyper.Reversible(check_reversal=check_reversal))
    return jnp.sum(out.params["a"] ** 2) + jnp.sum(out.params["b"])

  h = jnp.float32(0.3)
  intact = jax.jit(jax.grad(meta), static_argnums=1)(h, True)
  assert np.isfinite(intact)
  corrupt_refills()
  with pytest.raises(revhyper.ReversalError, match="reversal check failed"):
    jax.grad(meta)(h, True)
  assert np.isnan(jax.jit(jax.grad(meta), static_argnums=1)(h, True))
  # Unchecked, nothing stops the corrupted state (any int64 value) from giving some number.
  wrong = jax.jit(jax.grad(meta), static_argnums=1)(h, False)
  assert wrong != intact


# --- inputs that used to fail obscurely ---------------------------------------------------

def test_params_of_size_zero_leaves_only_are_rejected_and_mixed_ones_work():
  with pytest.raises(ValueError, match="at least one element"):
    revhyper.sgd(lambda w, h, t: jnp.sum(w["x"]), {"x": jnp.zeros((0,))}, None, num_steps=3,
                 learning_rate=0.1, momentum=0.9)
  params = {"x": jnp.zeros((0, 2)), "y": jnp.ones(3)}
  rt = revhyper.round_trip(lambda w, h, t: jnp.sum(w["y"] ** 2) + jnp.sum(w["x"]), params,
                           None, num_steps=40, learning_rate=0.1, momentum=0.5)
  assert bool(rt.exact)


def test_a_model_object_as_params_gets_partition_advice():
  class Model:
    """Stands in for a module object with static fields (e.g. an activation function)."""

  params = {"W": jnp.ones((2, 2)), "activation": jnp.tanh, "config": Model()}
  with pytest.raises(ValueError, match=r"params\['activation'\] must be a float array.*"
                                       r"eqx.partition"):
    revhyper.sgd(lambda w, h, t: jnp.sum(w["W"]), params, None, num_steps=3,
                 learning_rate=0.1, momentum=0.9)


@pytest.mark.slow  # imports Equinox
def test_a_whole_equinox_module_as_params_gets_partition_advice():
  import equinox as eqx  # pylint: disable=import-outside-toplevel
  model = eqx.nn.MLP(3, 1, 4, 1, key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"must be a float array.*eqx.partition"):
    revhyper.sgd(lambda m, h, t: jnp.sum(m(jnp.ones(3))), model, None, num_steps=3,
                 learning_rate=0.1, momentum=0.9)
  params, static = eqx.partition(model, eqx.is_inexact_array)
  out = revhyper.sgd(lambda p, h, t: jnp.sum(eqx.combine(p, static)(jnp.ones(3)) ** 2), params,
                     None, num_steps=3, learning_rate=0.1, momentum=0.9)
  assert not bool(out.stats.failed)


@pytest.mark.parametrize("call, name", [
    (lambda p: revhyper.sgd(loss_fn, p, 0.3, num_steps=5, learning_rate=0.1, momentum=0.9),
     r"params\['a'\]"),
    (lambda p: revhyper.sgd(loss_fn, PARAMS, 0.3, num_steps=5, learning_rate=0.1, momentum=0.9,
                            velocity=p), r"velocity\['a'\]"),
    (lambda p: revhyper.adam(loss_fn, PARAMS, 0.3, num_steps=5, learning_rate=0.1, nu=p),
     r"nu\['a'\]"),
    (lambda p: revhyper.round_trip(loss_fn, p, 0.3, num_steps=5, learning_rate=0.1,
                                   momentum=0.9), r"params\['a'\]"),
], ids=["params", "velocity", "adam_nu", "round_trip"])
def test_non_finite_initial_values_are_a_value_error_naming_the_argument(call, name):
  bad = dict(PARAMS, a=PARAMS["a"].at[2].set(jnp.inf))
  bad = jax.tree.map(jnp.abs, bad)  # nu must be non-negative
  with pytest.raises(ValueError, match=name + r" must be finite.*NaN or inf.*\[\[2\]\]"):
    call(bad)


@pytest.mark.parametrize("method", ["reversible", "unroll"])
def test_non_finite_initial_values_under_jit_fail_the_run_saying_so(method):
  bad = dict(PARAMS, a=PARAMS["a"].at[0].set(jnp.nan))
  # Eagerly differentiated, the values are still concrete: the same ValueError.
  meta = lambda p: jnp.sum(revhyper.sgd(loss_fn, p, 0.3, num_steps=5, learning_rate=0.1,
                                        momentum=0.9, method=method).params["a"])
  with pytest.raises(ValueError, match=r"params\['a'\] must be finite"):
    jax.grad(meta)(bad)
  out = jax.jit(lambda p: revhyper.sgd(loss_fn, p, 0.3, num_steps=5, learning_rate=0.1,
                                       momentum=0.9, method=method))(bad)
  assert bool(out.stats.invalid_hyperparameters) and bool(out.stats.failed)
  assert np.all(np.isnan(out.params["b"]))
  # The first reason given is the cause, not an overflow or a diverging run.
  with pytest.raises(revhyper.ReversalError,
                     match=r"training run failed: invalid hyperparameters or initial values: "
                           r".*the initial values were not finite: params"):
    out.stats.raise_if_failed()
  if method == "reversible":  # its backward pass poisons every hypergradient of a failed run
    grads = jax.jit(jax.grad(meta))(bad)
    assert np.all(np.isnan(grads["b"]))



@pytest.mark.parametrize("spike", [1e30, np.nan], ids=["huge", "nan"])
def test_a_transient_failure_is_reported_though_the_values_would_come_back(spike):
  # One step's gradient is out of range (or NaN) in one lane only; the following steps would
  # decay that lane's velocity back into range (momentum 0.1) and clip nothing: the lane is
  # frozen out of range at once, so that the final check still finds it. Also under jit.
  def spiky(w, h, t):
    factor = jnp.where(t == 3, jnp.float32(spike), jnp.float32(1.0))
    return jnp.sum((w["a"] - h) ** 2) + factor * w["b"][0, 0] ** 2 + jnp.sum(w["b"] ** 2)

  def run(momentum):
    return revhyper.sgd(spiky, PARAMS, 0.3, num_steps=40, learning_rate=0.01,
                        momentum=momentum, method=revhyper.Reversible(checks=False))

  for out in (run(0.1), jax.jit(lambda: run(0.1))()):
    assert bool(out.stats.fixed_point_overflow) or bool(out.stats.non_finite)
    assert bool(out.stats.failed)
  with pytest.raises(revhyper.ReversalError):
    revhyper.sgd(spiky, PARAMS, 0.3, num_steps=40, learning_rate=0.01, momentum=0.1)
