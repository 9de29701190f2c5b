"""Every way a JAX user calls revhyper.sgd either works or raises a clear error.

Higher-order and forward-mode derivatives, every float dtype, vmap against unroll, and
compilation reuse of eager calls.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import revhyper

TARGET = jnp.arange(3.0, dtype=jnp.float32)


def quadratic(w, l2, t):
  return jnp.sum((w - TARGET) ** 2) + l2 * jnp.sum(w ** 2)


def meta(l2, method="reversible", w0=None):
  w0 = jnp.ones(3, jnp.float32) if w0 is None else w0
  out = revhyper.sgd(quadratic, w0, l2, num_steps=20, learning_rate=0.1, momentum=0.9,
                     method=method)
  return jnp.sum(out.params ** 2)


HIGHER_ORDER = re.escape("method='unroll'")


@pytest.mark.parametrize("transform", [
    lambda: jax.hessian(meta)(0.5),
    lambda: jax.grad(jax.grad(meta))(0.5),
    lambda: jax.jit(jax.hessian(meta))(0.5),
    lambda: jax.jvp(meta, (0.5,), (1.0,)),
    lambda: jax.jacfwd(meta)(0.5),
    # A Hessian-vector product with respect to the initial weights, forward over reverse.
    lambda: jax.jvp(jax.grad(lambda w: meta(0.5, w0=w)), (jnp.ones(3),), (jnp.ones(3),)),
], ids=["hessian", "grad_of_grad", "jit_hessian", "jvp", "jacfwd", "hvp_initial_weights"])
def test_higher_order_and_forward_mode_through_reversible_raise(transform):
  with pytest.raises(TypeError, match=HIGHER_ORDER):
    transform()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["unroll", "checkpoint"])
def test_higher_order_derivatives_of_the_float_methods_match_finite_differences(method):
  second = float(jax.grad(jax.grad(meta))(0.5, method))
  np.testing.assert_allclose(float(jax.hessian(meta)(0.5, method)), second, rtol=1e-6)
  with jax.enable_x64(True):
    def first(l2):
      w0 = jnp.ones(3, jnp.float64)
      out = revhyper.sgd(lambda w, h, t: jnp.sum((w - jnp.arange(3.0)) ** 2) + h * jnp.sum(
          w ** 2), w0, l2, num_steps=20, learning_rate=0.1, momentum=0.9, method="unroll")
      return jnp.sum(out.params ** 2)
    step = 1e-4
    fd = (float(jax.grad(first)(0.5 + step)) - float(jax.grad(first)(0.5 - step))) / (2 * step)
  np.testing.assert_allclose(second, fd, rtol=1e-4)


# --- dtypes ---------------------------------------------------------------------------------

def _upcasting_loss(w, h, t):
  """Computes in float32 whatever the leaves' dtype: only the weights are rounded to it."""
  x = jnp.sin(jnp.arange(8.0, dtype=jnp.float32) + t.astype(jnp.float32))
  a, b = w["a"].astype(jnp.float32), w["b"].astype(jnp.float32)
  return (jnp.tanh(x @ a) @ b - 1.0) ** 2 + h.astype(jnp.float32) * jnp.sum(a ** 2)


def _native_loss(w, h, t):
  """Computes in the leaves' dtype: its rounding depends on how XLA compiles it."""
  dtype = w["a"].dtype
  x = jnp.sin(jnp.arange(8.0, dtype=jnp.float32) + t.astype(jnp.float32)).astype(dtype)
  out = (jnp.tanh(x @ w["a"]) @ w["b"] - 1.0) ** 2 + h.astype(dtype) * jnp.sum(w["a"] ** 2)
  return out.astype(jnp.float32)


def _dtype_grads(dtype, loss, method):
  params = {"a": jnp.full((8, 4), 0.1, dtype), "b": jnp.full((4,), 0.1, dtype)}

  def objective(h, lr, mom):
    out = revhyper.sgd(loss, params, h, num_steps=100, learning_rate=lr, momentum=mom,
                       method=method)
    return jnp.sum(out.params["b"].astype(jnp.float32) ** 2), out.stats

  grad = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True))
  (value, stats), grads = grad(jnp.float32(1e-3), jnp.float32(0.05), jnp.float32(0.9))
  assert not bool(stats.failed)
  return np.asarray([value] + [float(g) for g in grads])


# Tolerances of the agreement between methods (relative error of value and hypergradients),
# stated in docs/rules.rst: the state is carried at float32 or finer by every method, so a loss
# computed in float32 agrees closely whatever the leaves' dtype; a loss computed in the leaves'
# own half precision rounds differently as XLA fuses it differently in each method.
DTYPE_TOLERANCE = [
    (jnp.float16, _upcasting_loss, 1e-3), (jnp.bfloat16, _upcasting_loss, 1e-2),
    (jnp.float32, _upcasting_loss, 1e-4),
    (jnp.float16, _native_loss, 1e-2), (jnp.bfloat16, _native_loss, 1e-1),
]
# Each case compiles every method again: the quick loop leaves them to the full suite (the
# methods' agreement in float32 is checked by tests/test_hypergradients.py).
DTYPE_CASES = [pytest.param(*case, marks=pytest.mark.slow) for case in DTYPE_TOLERANCE]


@pytest.mark.parametrize("dtype,loss,tolerance", DTYPE_CASES,
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_methods_agree_for_every_float_dtype(dtype, loss, tolerance):
  expected = _dtype_grads(dtype, loss, "unroll")
  assert np.all(np.isfinite(expected))
  for method in ["checkpoint", revhyper.Reversible(min_momentum=0.5)]:
    got = _dtype_grads(dtype, loss, method)
    np.testing.assert_allclose(got, expected, rtol=tolerance, err_msg=str(method))


@pytest.mark.slow
def test_float64_leaves_agree_with_unroll():
  with jax.enable_x64(True):
    expected = _dtype_grads(jnp.float64, _native_loss, "unroll")
    got = _dtype_grads(jnp.float64, _native_loss, revhyper.Reversible(min_momentum=0.5))
  np.testing.assert_allclose(got, expected, rtol=1e-7)


@pytest.mark.parametrize("method", ["reversible", "unroll", "checkpoint"])
def test_float16_leaves_train(method):
  """Momentum quantisation used to overflow float16 (0.9 * 65536 > 65504) to inf."""
  out = revhyper.sgd(_upcasting_loss, {"a": jnp.full((8, 4), 0.1, jnp.float16),
                                       "b": jnp.full((4,), 0.1, jnp.float16)},
                     jnp.float32(0.0), num_steps=50, learning_rate=0.05, momentum=0.9,
                     method=method)
  assert out.params["a"].dtype == jnp.float16
  assert np.all(np.isfinite(np.asarray(out.params["a"], np.float32)))
  assert not bool(out.stats.failed)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_leaves_size_the_bit_stack_from_the_momentum_actually_run(dtype):
  # bf16(0.9) = 0.8984375 would give n = 58880 < 58982: more bits than a stack sized for 0.9.
  out = revhyper.sgd(lambda w, h, t: jnp.sum(w.astype(jnp.float32) ** 2), jnp.zeros(4, dtype),
                     None, num_steps=1050, learning_rate=0.1, momentum=0.9)
  assert not bool(out.stats.buffer_overflow)
  bound = 4 * 1050 * np.log2(2**16 / round(0.9 * 2**16))
  np.testing.assert_allclose(float(out.stats.information_bound_bits), bound, rtol=1e-6)
  assert float(out.stats.bits_stored) <= float(out.stats.capacity_bits)


# --- vmap against unroll --------------------------------------------------------------------

@pytest.mark.slow
def test_vmap_matches_unroll_per_element_in_a_regime_that_spills():
  params = {"a": jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32), "b": jnp.full((3,), 0.5)}

  def loss(w, h, t):
    scale = 1.0 + 0.1 * jnp.sin(t.astype(jnp.float32))
    return scale * jnp.sum((w["a"] - h) ** 2) + jnp.sum(jnp.log(jnp.cosh(w["b"])))

  def objective(h, lr, method):
    # Momentum 0.3 stores 1.7 bits per weight per step: a spill every ~19 steps per lane.
    out = revhyper.sgd(loss, params, h, num_steps=200, learning_rate=lr, momentum=0.3,
                       method=method)
    return jnp.sum(out.params["a"] ** 2) + jnp.sum(out.params["b"]), out.stats

  lrs = jnp.asarray([0.01, 0.05, 0.2, 0.4], jnp.float32)
  h = jnp.float32(0.25)
  grad = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)
  (values, stats), grads = jax.jit(jax.vmap(grad, in_axes=(None, 0, None)),
                                   static_argnums=2)(h, lrs, "reversible")
  assert stats.bits_stored.shape == (4,)
  assert np.all(np.asarray(stats.bits_stored) > 9 * 32 * 9)  # > 9 spills in each of 9 lanes
  (expected_values, _), expected = jax.jit(jax.vmap(grad, in_axes=(None, 0, None)),
                                           static_argnums=2)(h, lrs, "unroll")
  np.testing.assert_allclose(values, expected_values, rtol=1e-5)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


# --- compilation reuse ----------------------------------------------------------------------

def _count_compiles(fn, names=("_run_method", "train_and_reverse")):
  """How many programs running training ``fn()`` compiles (tiny eager ops aside): those whose
  name holds one of ``names`` (every program with ``names=None``)."""
  from jax._src import monitoring
  events = []

  def listener(event, duration, **kwargs):
    del duration
    if event == "/jax/core/compile/backend_compile_duration" and (names is None or any(
        name in str(kwargs.get("fun_name")) for name in names)):
      events.append(kwargs)

  monitoring.register_event_duration_secs_listener(listener)
  try:
    jax.block_until_ready(fn())
  finally:
    monitoring.unregister_event_duration_listener(listener)
  return len(events)


def test_compile_counter_sees_a_compilation():
  assert _count_compiles(lambda: revhyper.sgd(quadratic, jnp.ones(3), 0.5, num_steps=31,
                                              learning_rate=0.1, momentum=0.9).params) == 1


@pytest.mark.parametrize("call", ["sgd", "round_trip", "unroll"])
def test_identical_eager_calls_reuse_their_compiled_program(call):
  def run(w0):
    if call == "round_trip":
      return revhyper.round_trip(quadratic, w0, 0.5, num_steps=30, learning_rate=0.1,
                                 momentum=0.9).exact
    method = "unroll" if call == "unroll" else "reversible"
    return revhyper.sgd(quadratic, w0, 0.5, num_steps=30, learning_rate=0.1, momentum=0.9,
                        method=method).params

  first, again, other = jnp.ones(3), jnp.ones(3), jnp.full(3, 2.0)
  run(first)
  assert _count_compiles(lambda: run(again)) == 0
  assert _count_compiles(lambda: run(other)) == 0  # new values, same program


@pytest.mark.parametrize("method", ["reversible", "unroll", "checkpoint"])
def test_an_eager_hypergradient_is_compiled_once(method):
  # jax.grad outside jit calls the custom_vjp's rules with concrete values: without programs of
  # their own they would run op by op, hundreds of small compilations on the first call. The
  # float methods' derivative programs were traced anew, and compiled again, on every call.
  def meta(h):
    return jnp.sum(revhyper.sgd(quadratic, jnp.ones((7, 3)), h, num_steps=30, learning_rate=0.1,
                                momentum=0.9, method=method).params)

  passes = ("_forward_pass", "_backward_pass", "_float_scan")
  # One program forward, one backward (the float methods': the jvp and its transpose).
  assert _count_compiles(lambda: jax.grad(meta)(jnp.float32(0.5)), passes) == 2
  assert _count_compiles(lambda: jax.grad(meta)(jnp.float32(0.7)), None) == 0


def test_reused_program_reads_new_closed_over_values():
  data = {"target": jnp.zeros(3)}

  def loss(w, h, t):
    return jnp.sum((w - data["target"]) ** 2)

  kwargs = dict(num_steps=50, learning_rate=0.1, momentum=0.5)
  first = revhyper.sgd(loss, jnp.ones(3), None, **kwargs).params
  data["target"] = jnp.full(3, 4.0)
  second = revhyper.sgd(loss, jnp.ones(3), None, **kwargs).params
  assert float(jnp.max(jnp.abs(first))) < 0.1 and float(jnp.min(second)) > 3.9


# --- eager or traced ----------------------------------------------------------------------------

def _traced_in(transform):
  """What ``_at_top_level`` says inside ``transform``, for an argument and without one."""
  from revhyper import _training
  seen = {}

  def probe(x):
    seen["argument"] = _training._at_top_level((x,))
    seen["constants"] = _training._at_top_level((np.ones(2, np.float32),))
    return x * 0.0

  transform(probe)
  return seen


@pytest.mark.parametrize("name,transform", [
    ("jit", lambda f: jax.jit(f)(1.0)),
    ("eval_shape", lambda f: jax.eval_shape(f, 1.0)),
    ("make_jaxpr", lambda f: jax.make_jaxpr(f)(1.0)),
    ("scan", lambda f: jax.lax.scan(lambda c, _: (f(c), None), 1.0, None, length=2)),
    ("checkpoint", lambda f: jax.checkpoint(f)(1.0)),
])
def test_staging_transformations_are_seen_whatever_the_arguments(name, transform):
  # _at_top_level relies on public JAX behaviour alone: an operation on constants inside a
  # staging transformation gives a jax.core.Tracer. If a JAX release stops that, eager calls
  # inside jit would take the eager path and fail; this test names the cause.
  seen = _traced_in(transform)
  assert seen == {"argument": False, "constants": False}, (
      f"under {name}, revhyper._training._at_top_level no longer sees the trace ({seen}): "
      "JAX changed how constants are traced; update _at_top_level")


@pytest.mark.parametrize("name,transform", [
    ("vmap", lambda f: jax.vmap(f)(jnp.ones(2))),
    ("grad", lambda f: jax.grad(lambda x: f(x).sum())(1.0)),
    ("jvp", lambda f: jax.jvp(f, (1.0,), (1.0,))),
])
def test_transformed_arguments_are_seen(name, transform):
  # vmap, grad and jvp wrap only what depends on their inputs: a tracer among the arguments
  # is how _at_top_level sees them.
  assert _traced_in(transform)["argument"] is False, (
      f"under {name}, a transformed argument is no longer a jax.core.Tracer; "
      "update revhyper._training._at_top_level")


def test_eager_calls_are_seen_as_eager():
  from revhyper import _training
  assert _training._at_top_level((jnp.ones(3), np.float32(2.0), None))


def test_jit_without_traced_arguments_runs_the_traced_path():
  # Everything the call receives is a constant, yet it runs inside jit: the eager path's
  # checks, which read concrete statistics, must not run there.
  eager = meta(jnp.float32(0.5))
  jitted = jax.jit(lambda: meta(jnp.float32(0.5)))()
  np.testing.assert_allclose(jitted, eager, rtol=1e-6)


def test_weights_closed_over_by_jit_are_not_folded_onto_the_grid_at_compile_time():
  # Closed over by a jitted function, the initial weights are constants of the program; XLA's
  # constant folder would convert them onto the integer grid at compile time, element by
  # element (seconds per million weights). The compiled programs must hold them as given:
  # momentum SGD's hypergradient, and Adam's training (its moments on grids of their own).
  params = {"W": jnp.asarray(np.random.RandomState(0).randn(40, 30), jnp.float32)}
  loss = lambda w, h, t: h * jnp.sum(jnp.tanh(w["W"]) ** 2)
  sgd = lambda h: jnp.sum(revhyper.sgd(loss, params, h, num_steps=3, learning_rate=0.1,
                                       momentum=0.9).params["W"])
  adam = lambda h: revhyper.adam(loss, params, h, num_steps=3, learning_rate=0.1).params
  for fn in (jax.grad(sgd), adam):
    text = jax.jit(fn).lower(jnp.float32(0.1)).compile().as_text()
    folded = re.findall(r"[su]64\[40,30\]\S* constant\(", text)
    assert not folded, folded


def test_non_finite_weights_closed_over_by_jit_are_a_value_error_at_trace_time():
  bad = {"W": jnp.array([1.0, jnp.nan, 2.0])}
  run = lambda h: revhyper.sgd(lambda w, h, t: h * jnp.sum(w["W"] ** 2), bad, h, num_steps=2,
                               learning_rate=0.1, momentum=0.9).params
  with pytest.raises(ValueError, match=r"params\['W'\] must be finite.*\[\[1\]\]"):
    jax.jit(run)(jnp.float32(0.1))
