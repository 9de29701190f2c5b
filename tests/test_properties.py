"""Property-based tests of the exact arithmetic: whatever the inputs, what is undone is undone.

Hypothesis draws the values; the shapes come from a small fixed set, so that each program is
compiled once and every further example only runs it (compilation, not the arithmetic, is
what costs time here).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import revhyper
from revhyper import _bitstack
from revhyper import _fixed_point

# --- the fixed-point grid -----------------------------------------------------------------------

GRIDS = (_fixed_point.FRACTIONAL_BITS, _fixed_point.FIRST_MOMENT_BITS,
         _fixed_point.SECOND_MOMENT_BITS)
SIZE = 64


@st.composite
def _state_and_increment(draw):
  """A grid, float32 values on it and an increment, both within half the grid's range (so that
  their sum stays in range: the caller checks the state, ``add`` the increment)."""
  bits = draw(st.sampled_from(GRIDS))
  half = _fixed_point.max_abs_value(bits) / 2
  floats = st.floats(-half, half, width=32, allow_subnormal=False)
  x = draw(hnp.arrays(np.float32, SIZE, elements=floats))
  increment = draw(hnp.arrays(np.float32, SIZE, elements=floats))
  return bits, x, increment


@settings(max_examples=60, deadline=None)
@given(_state_and_increment())
def test_fixed_point_subtract_undoes_add(case):
  bits, x, increment = case
  with jax.enable_x64(True):
    state, ok = _fixed_point.to_fixed(jnp.asarray(x), bits)
    assert bool(jnp.all(ok))
    added, ok = _fixed_point.add(state, jnp.asarray(increment), bits)
    assert bool(jnp.all(ok))
    back, ok = _fixed_point.subtract(added, jnp.asarray(increment), bits)
    assert bool(jnp.all(ok))
    np.testing.assert_array_equal(np.asarray(back), np.asarray(state))
    # A grid value read as a float and put back on the grid is itself again.
    as_float = _fixed_point.to_float(state, jnp.float32, bits)
    again, _ = _fixed_point.to_fixed(as_float, bits)
    np.testing.assert_array_equal(np.asarray(_fixed_point.to_float(again, jnp.float32, bits)),
                                  np.asarray(as_float))


# --- the rANS bit stack -------------------------------------------------------------------------

LANES = 16
STEPS = 24
FINE = 31
# The numerators n of a multiply by n / 2**D: momenta on 2**-16 (n >= 1), decays on 2**-31 down
# to 2**-8 (n >= 2**23).
NUMERATORS = {_bitstack.DENOMINATOR_BITS: (1, _bitstack.DENOMINATOR), FINE: (2**(FINE - 8),
                                                                             2**FINE)}
_PROGRAMS = {}


def _capacity(bits):
  """Room for the most any schedule of STEPS multiplies can spill: the smallest numerator's."""
  return LANES * _bitstack.max_chunks_per_lane([NUMERATORS[bits][0]] * STEPS, bits)


def _multiply_then_divide(bits):
  """One compiled program per denominator: multiply by every n_t, then divide back."""
  if bits in _PROGRAMS:
    return _PROGRAMS[bits]

  def bases(n):
    if bits == _bitstack.DENOMINATOR_BITS:
      return [n], n.astype(jnp.float64), None  # the head pops base n itself
    return [n], _bitstack.head_bases(n, bits).astype(jnp.float64), (bits,)

  @jax.jit
  def go(v, numerators):
    stack = _bitstack.empty([v.shape], _capacity(bits), k=_bitstack.head_bits(bits))

    def forward(carry, n):
      return _bitstack.multiply(*carry, *bases(n)), None

    (pushed, w), _ = jax.lax.scan(forward, (stack, [v]), numerators)

    def backward(carry, n):
      return _bitstack.divide(*carry, *bases(n)), None

    (popped, back), _ = jax.lax.scan(
        backward, (_bitstack.for_popping(pushed), w), numerators, reverse=True)
    return pushed, back[0], _bitstack.is_empty(popped, k=_bitstack.head_bits(bits))

  def run(v, numerators):
    with jax.enable_x64(True):
      pushed, back, empty = go(jnp.asarray(v, jnp.int64), jnp.asarray(numerators, jnp.uint64))
      return pushed, np.asarray(back), bool(empty)

  _PROGRAMS[bits] = run
  return run


def _schedules(bits):
  low, high = NUMERATORS[bits]
  return hnp.arrays(np.int64, STEPS, elements=st.integers(low, high))


_VALUES = hnp.arrays(np.int64, LANES, elements=st.integers(-2**62, 2**62 - 1))


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_rans_divide_inverts_multiply(data):
  bits = data.draw(st.sampled_from(sorted(NUMERATORS)), label="denominator bits")
  v = data.draw(_VALUES, label="values")
  numerators = data.draw(_schedules(bits), label="numerators")
  pushed, back, empty = _multiply_then_divide(bits)(v, numerators)
  assert not bool(pushed.overflow)
  np.testing.assert_array_equal(back, v)
  assert empty


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_rans_spills_stay_within_the_capacity_bound(data):
  # Every lane holding the same value spills at the same steps, so the pointer is LANES times
  # one lane's chunks: the bound is checked per lane, not only on average.
  bits = data.draw(st.sampled_from(sorted(NUMERATORS)), label="denominator bits")
  same = data.draw(st.booleans(), label="identical lanes")
  v = data.draw(_VALUES, label="values")
  if same:
    v = np.full(LANES, v[0])
  numerators = data.draw(_schedules(bits), label="numerators")
  pushed, _, _ = _multiply_then_divide(bits)(v, numerators)
  bound = _bitstack.max_chunks_per_lane(numerators, bits)
  with jax.enable_x64(True):
    assert int(pushed.ptr) <= LANES * bound, (int(pushed.ptr), bound)
    assert not bool(pushed.overflow)


# --- round trips of small MLPs ------------------------------------------------------------------

# (layer sizes, number of steps): each pair is one compiled program.
SHAPES = (((3, 4, 2), 7), ((5, 3, 1), 19))
BATCH = 4


def _mlp_loss(params, data, t):
  """Squared error of a tanh MLP on a minibatch that is a pure function of t."""
  x = data["x"] * jnp.cos(t + jnp.arange(BATCH, dtype=jnp.float32))[:, None]
  h = x
  for i, (w, b) in enumerate(params):
    h = h @ w + b
    if i + 1 < len(params):
      h = jnp.tanh(h)
  return jnp.mean((h - data["y"]) ** 2)


@st.composite
def _training_runs(draw):
  sizes, steps = draw(st.sampled_from(SHAPES))
  seed = draw(st.integers(0, 2**31 - 1))
  scale = draw(st.floats(0.05, 1.0))
  rng = np.random.default_rng(seed)
  params = [(np.float32(scale) * rng.standard_normal((m, n), np.float32),
             np.float32(scale) * rng.standard_normal(n, np.float32))
            for m, n in zip(sizes[:-1], sizes[1:])]
  data = {"x": rng.standard_normal((BATCH, sizes[0]), np.float32),
          "y": rng.standard_normal((BATCH, sizes[-1]), np.float32)}
  # A constant momentum or a per-step schedule, from almost no memory kept to none lost.
  momenta = st.floats(MIN_MOMENTUM, 1.0, width=32)
  if draw(st.booleans()):
    momentum = draw(hnp.arrays(np.float32, steps, elements=momenta))
  else:
    momentum = np.full(steps, draw(momenta), np.float32)
  learning_rate = np.float32(draw(st.floats(1e-3, 0.3)))
  return params, data, learning_rate, momentum


# Traced momenta under jit: one program per shape, its bit stack sized for the smallest
# momentum drawn (2**-13, at which 13 bits per weight and step are stored).
MIN_MOMENTUM = 2.0**-13


@jax.jit
def _round_trip(params, data, learning_rate, momentum):
  return revhyper.round_trip(_mlp_loss, params, data, num_steps=momentum.shape[0],
                             learning_rate=learning_rate, momentum=momentum,
                             method=revhyper.Reversible(min_momentum=MIN_MOMENTUM))


@pytest.mark.slow  # the quick loop's round trips: tests/test_sgd.py
@settings(max_examples=8, deadline=None)
@given(_training_runs())
def test_round_trip_is_exact_for_random_small_mlps(run):
  params, data, learning_rate, momentum = run
  rt = _round_trip(params, data, learning_rate, momentum)
  assert not bool(rt.stats.failed)
  assert bool(rt.exact) and bool(rt.buffer_empty)
  for got, want in zip(jax.tree.leaves(rt.initial_params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(got), want)
