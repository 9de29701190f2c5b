"""The fixed-point grid: conversions and exact additive updates."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from revhyper import _fixed_point


def _values(seed, size=1000):
  rng = np.random.default_rng(seed)
  return rng.standard_normal(size) * np.logspace(-12, 3, size) * rng.choice([-1, 1], size)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_grid_values_round_trip_exactly(dtype):
  with jax.enable_x64(True):
    x = jnp.asarray(_values(0), dtype)
    ints, ok = _fixed_point.to_fixed(x)
    assert ints.dtype == jnp.int64 and bool(jnp.all(ok))
    back = _fixed_point.to_float(ints, dtype)
    assert back.dtype == dtype
    # A float whose last place is at least the grid step 2**-48 lies on the grid: it survives
    # the round trip bit for bit. (float32: |x| >= 2**-25; the half types: larger still.)
    on_grid = np.abs(np.asarray(x, np.float64)) >= 2.0**-25
    assert on_grid.sum() > 500
    np.testing.assert_array_equal(np.asarray(back)[on_grid], np.asarray(x)[on_grid])
    # Below that, the grid point is the nearest one: within half a grid step.
    error = np.abs(np.asarray(ints, np.float64) * 2.0**-48 - np.asarray(x, np.float64))
    assert np.all(error <= 2.0**-49), error.max()
    # And whatever the value, a grid point converted back is itself again: a fixed point.
    again, _ = _fixed_point.to_fixed(back)
    chex.assert_trees_all_equal(_fixed_point.to_float(again, dtype), back)


def test_add_then_subtract_is_identity_bit_for_bit():
  with jax.enable_x64(True):
    x, _ = _fixed_point.to_fixed(jnp.asarray(_values(1), jnp.float32))
    increment = jnp.asarray(_values(2), jnp.float32)
    y, ok = _fixed_point.add(x, increment)
    assert bool(jnp.all(ok))
    z, ok = _fixed_point.subtract(y, increment)
    assert bool(jnp.all(ok))
    chex.assert_trees_all_equal(z, x)


def test_out_of_range_and_non_finite_values_are_flagged():
  with jax.enable_x64(True):
    limit = _fixed_point.MAX_ABS_VALUE
    x = jnp.asarray([0.5, limit * 0.99, limit * 1.01, -limit * 2, np.inf, np.nan], jnp.float32)
    _, ok = _fixed_point.to_fixed(x)
    np.testing.assert_array_equal(np.asarray(ok), [True, True, False, False, False, False])
    np.testing.assert_array_equal(np.asarray(_fixed_point.in_range(x)), np.asarray(ok))


def test_in_range_states_and_increments_cannot_wrap():
  with jax.enable_x64(True):
    limit = _fixed_point.MAX_ABS_VALUE
    below = np.nextafter(np.float32(limit), np.float32(0))
    x, ok = _fixed_point.to_fixed(jnp.asarray([below, -below], jnp.float32))
    assert bool(jnp.all(ok))
    y, ok = _fixed_point.add(x, jnp.asarray([below, -below], jnp.float32))
    assert bool(jnp.all(ok))
    # The largest in-range state plus the largest in-range increment keeps its sign: no wrap.
    np.testing.assert_array_equal(np.sign(np.asarray(y)), [1, -1])
    assert not bool(jnp.any(_fixed_point.in_range(_fixed_point.to_float(y, jnp.float32))))


def _reference_to_fixed(x, fractional_bits):
  """``to_fixed``'s integers as plain rounding would give them: ``round(x * 2**R)``."""
  scaled = x.astype(jnp.promote_types(x.dtype, jnp.float64)) * 2.0**fractional_bits
  return jnp.round(scaled).astype(jnp.int64)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.float16])
def test_to_fixed_rounds_half_to_even_like_plain_rounding(dtype, jit):
  # The two-halves conversion must give the very integers of round(x * 2**R), also compiled:
  # XLA folds (y + c) - c to y, which an earlier form of it relied on not happening.
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(20000) * np.logspace(-16, 3.5, 20000)
    ties = np.asarray([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 2**30 + 0.5]) * 2.0**-48
    x = jnp.asarray(np.concatenate([x, ties, -x[:100]]), dtype)
    for bits in (40, 48, 56, 60):
      convert = jax.jit(_fixed_point.to_fixed, static_argnums=1) if jit else _fixed_point.to_fixed
      ints, ok = convert(x, bits)
      expected = _reference_to_fixed(x, bits)
      np.testing.assert_array_equal(np.asarray(ints)[np.asarray(ok)],
                                    np.asarray(expected)[np.asarray(ok)])


def test_values_out_of_range_become_values_out_of_range():
  # Out of range or not finite -> +-2**62 (+ for NaN): added to any state in range, the sum
  # cannot wrap and is out of range itself, so that the failure reaches the final check.
  with jax.enable_x64(True):
    limit = _fixed_point.MAX_ABS_VALUE
    x = jnp.asarray([limit * 1.01, -limit * 3, np.inf, -np.inf, np.nan, 1e30], jnp.float32)
    ints, ok = _fixed_point.to_fixed(x)
    assert not bool(jnp.any(ok))
    np.testing.assert_array_equal(np.asarray(ints), [2**62, -2**62, 2**62, -2**62, 2**62, 2**62])
    for state in (2**61 - 1, -2**61, 0):
      total = np.asarray(jnp.int64(state) + ints)
      assert not np.any(np.asarray(_fixed_point.in_range_int(jnp.asarray(total))))
      np.testing.assert_array_equal(np.sign(total), np.sign(np.asarray(ints)))


def test_in_range_int_is_the_half_open_range_of_the_grid():
  with jax.enable_x64(True):
    x = jnp.asarray([0, 1, -1, 2**61 - 1, -2**61, 2**61, -2**61 - 1, 2**62, -2**62,
                     2**63 - 1, -2**63], jnp.int64)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(_fixed_point.in_range_int)(x)),
        [True, True, True, True, True, False, False, False, False, False, False])
    # It agrees with the float check wherever the float value is not rounded onto the edge.
    ints, _ = _fixed_point.to_fixed(jnp.asarray(_values(4), jnp.float32))
    np.testing.assert_array_equal(
        np.asarray(_fixed_point.in_range_int(ints)),
        np.asarray(_fixed_point.in_range(_fixed_point.to_float(ints, jnp.float32))))
