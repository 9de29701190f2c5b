"""The rANS bit stack: the rational multiply and its exact inverse."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from revhyper import _bitstack

D = _bitstack.DENOMINATOR


def _run(v, numerators, capacity_chunks, groups=1):
  """Multiplies by every n_t in turn, then divides back; returns the states along the way.

  The lanes are cut into ``groups`` groups (like parameter leaves) with numerators n_t,
  n_t - 1, ... (at least 1), so that groups spill at different steps. The numerators are an
  argument of one compiled program per shape, capacity and grouping.
  """
  with jax.enable_x64(True):
    return _round_trip(jnp.asarray(v, jnp.int64), jnp.asarray(numerators, jnp.uint64),
                       capacity_chunks, groups)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _round_trip(v, numerators, capacity_chunks, groups):
  values = jnp.array_split(v, groups)
  stack = _bitstack.empty([x.shape for x in values], capacity_chunks)

  def per_group(n):
    ns = [jnp.maximum(n - k, 1).astype(jnp.uint64) for k in range(groups)]
    return ns, jnp.min(jnp.stack(ns)).astype(jnp.float64)

  def forward(carry, n):
    stack, values = carry
    return _bitstack.multiply(stack, values, *per_group(n)), None

  (stack, w), _ = jax.lax.scan(forward, (stack, values), numerators)
  pushed = stack

  def backward(carry, n):
    stack, values = carry
    return _bitstack.divide(stack, values, *per_group(n)), None

  (popped, back), _ = jax.lax.scan(
      backward, (_bitstack.for_popping(stack), w), numerators, reverse=True)
  return pushed, jnp.concatenate(w), (popped, jnp.concatenate(back))


def _signed_values(seed, size):
  rng = np.random.default_rng(seed)
  v = rng.integers(-2**62, 2**62, size=size, dtype=np.int64)
  v[:8] = [0, 1, -1, D - 1, -D, 2**62 - 1, -(2**62) + 1, 12345]
  return v


@pytest.mark.parametrize("n", [1, 2, 3, 255, 2**15, 58982, D - 1, D])
def test_divide_inverts_multiply_bit_for_bit(n):
  v = _signed_values(n, 257)
  steps = 300
  # Room for the fastest-growing stack (n = 1), so that every case runs one program.
  capacity = v.size * _bitstack.max_chunks_per_lane([1] * steps)
  pushed, w, (stack, back) = _run(v, [n] * steps, capacity)
  with jax.enable_x64(True):
    chex.assert_trees_all_equal(back, jnp.asarray(v))
    assert bool(_bitstack.is_empty(stack))
    assert not bool(pushed.overflow)
    # v' stays within n units of v * (n / d)**T in the first step; overall it only shrinks.
    assert bool(jnp.all(jnp.abs(w) <= jnp.abs(jnp.asarray(v)) + n))


def test_random_momentum_schedule_round_trips_over_several_groups():
  rng = np.random.default_rng(7)
  numerators = rng.integers(4, D + 1, size=500)
  v = _signed_values(3, 64)
  capacity = v.size * _bitstack.max_chunks_per_lane(np.maximum(numerators - 3, 1))
  pushed, _, (stack, back) = _run(v, numerators, capacity, groups=4)
  with jax.enable_x64(True):
    chex.assert_trees_all_equal(back, jnp.asarray(v))
    assert bool(_bitstack.is_empty(stack)) and not bool(pushed.overflow)


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.98])
def test_bits_stored_within_one_percent_of_the_information_bound(gamma):
  n = round(gamma * D)
  steps = 2000
  v = _signed_values(11, 128)
  # Room for the largest of the cases (momentum 0.5): one program for all.
  capacity = v.size * _bitstack.max_chunks_per_lane([D // 2] * steps)
  pushed, _, _ = _run(v, [n] * steps, capacity)
  with jax.enable_x64(True):
    bits = float(_bitstack.stored_bits(pushed))
  bound = v.size * steps * float(_bitstack.information_bits(n))
  assert abs(bits / bound - 1) < 0.01, (bits, bound)


def test_capacity_bound_holds_at_the_worst_momentum_and_overflow_is_flagged():
  steps = 200  # n = 1 stores 16 bits per step: the fastest-growing stack
  v = _signed_values(5, 32)
  per_lane = _bitstack.max_chunks_per_lane([1] * steps)
  pushed, _, (stack, back) = _run(v, [1] * steps, v.size * per_lane)
  with jax.enable_x64(True):
    assert not bool(pushed.overflow)
    assert int(pushed.ptr) <= v.size * per_lane
    chex.assert_trees_all_equal(back, jnp.asarray(v))
  too_small, _, _ = _run(v, [1] * steps, v.size * (per_lane // 2))
  assert bool(too_small.overflow)


def test_floor_divmod_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.integers(-2**62, 2**62, size=4096, dtype=np.int64)
  n = rng.integers(1, D + 1, size=4096, dtype=np.int64)
  with jax.enable_x64(True):
    q, r = _bitstack.floor_divmod(jnp.asarray(x), jnp.asarray(n))
    np.testing.assert_array_equal(np.asarray(q), np.floor_divide(x, n))
    np.testing.assert_array_equal(np.asarray(r), np.mod(x, n))


def test_bucket_rounds_up_monotonically():
  values = [_bitstack.bucket(k) for k in range(200)]
  assert all(b >= k for k, b in enumerate(values))
  assert values == sorted(values)
  assert len(set(values)) < 30  # few distinct capacities: few compiled programs


# --- fine denominators: n / 2**31 -------------------------------------------------------------

FINE = 31


def _run_fine(v, numerators, capacity_chunks):
  with jax.enable_x64(True):
    return _round_trip_fine(jnp.asarray(v, jnp.int64), jnp.asarray(numerators, jnp.uint64),
                            capacity_chunks)


@functools.partial(jax.jit, static_argnums=2)
def _round_trip_fine(v, numerators, capacity_chunks):
  def bases(n):
    return [n], _bitstack.head_bases(n, FINE).astype(jnp.float64)

  stack = _bitstack.empty([v.shape], capacity_chunks)

  def forward(carry, n):
    return _bitstack.multiply(*carry, *bases(n), (FINE,)), None

  (stack, w), _ = jax.lax.scan(forward, (stack, [v]), numerators)

  def backward(carry, n):
    return _bitstack.divide(*carry, *bases(n), (FINE,)), None

  (popped, back), _ = jax.lax.scan(backward, (_bitstack.for_popping(stack), w), numerators,
                                   reverse=True)
  return stack, w[0], popped, back[0]


@pytest.mark.parametrize("factor", [2**-8, 0.5, 0.9, 0.999, 1 - 1e-7, 1.0])
def test_fine_denominator_round_trips_and_stays_within_two_to_the_eight(factor):
  n = max(round(factor * 2**FINE), 2**(FINE - 8))
  v = _signed_values(int(factor * 1000), 257)
  steps = 300
  # Room for the fastest-growing stack (the smallest factor), so that every case runs one
  # program.
  capacity = v.size * _bitstack.max_chunks_per_lane([2**(FINE - 8)] * steps, FINE)
  pushed, _, stack, back = _run_fine(v, [n] * steps, capacity)
  with jax.enable_x64(True):
    chex.assert_trees_all_equal(back, jnp.asarray(v))
    assert bool(_bitstack.is_empty(stack)) and not bool(pushed.overflow)
  # One multiply lands within 2**8 + 1 grid units of v * n / 2**31 (the D = 16 multiply: n).
  # The comparison is exact, in Python integers: |v' * 2**31 - v * n| < (2**8 + 1) * 2**31.
  _, w, _, _ = _run_fine(v, [n], v.size * 2 + 1)
  error = max(abs(int(a) * 2**FINE - int(x) * n) for a, x in zip(np.asarray(w), v))
  assert error < (2**8 + 1) * 2**FINE, error / 2**FINE


@pytest.mark.parametrize("factor", [0.5, 0.9, 0.999])
def test_fine_denominator_stores_the_information_bound(factor):
  n = round(factor * 2**FINE)
  steps = 2000 if factor < 0.99 else 20000
  # Values spread over the grid (not the few tiny ones of _signed_values): a value stuck within
  # 2**31 units of 0 keeps popping one block's base, up to log2(256 / 255) bits a step.
  v = np.random.default_rng(13).integers(-2**62, 2**62, size=64, dtype=np.int64)
  # Room for the largest stack of the cases of this length (factor 0.5): fewer programs.
  pushed, _, _, _ = _run_fine(v, [n] * steps, v.size * _bitstack.max_chunks_per_lane(
      [2**(FINE - 1)] * steps, FINE))
  with jax.enable_x64(True):
    bits = float(_bitstack.stored_bits(pushed))
  bound = v.size * steps * float(_bitstack.information_bits(n, FINE))
  assert abs(bits / bound - 1) < 0.01, (bits, bound)


def test_fine_denominator_schedule_fills_at_most_its_proven_capacity():
  rng = np.random.default_rng(5)
  numerators = rng.integers(2**(FINE - 8), 2**FINE + 1, size=300)
  v = _signed_values(9, 32)
  per_lane = _bitstack.max_chunks_per_lane(numerators, FINE)
  pushed, _, stack, back = _run_fine(v, numerators, v.size * per_lane)
  with jax.enable_x64(True):
    assert not bool(pushed.overflow) and int(pushed.ptr) <= v.size * per_lane
    chex.assert_trees_all_equal(back, jnp.asarray(v))


# --- the divisions, against plain integer division ----------------------------------------------

_BASES = [1, 2, 3, 255, 256, 2**16 - 1, 2**16, 58982, 2**31 - 1, 2**31, 2**32 - 1]


def test_divmod_small_quotient_matches_integer_division():
  rng = np.random.default_rng(0)
  s, base = [], []
  for b in _BASES:  # quotients at and next to the bound 2**50, remainders 0, 1 and base - 1
    for q in [0, 1, 2, 2**16, 2**40 - 1, 2**48 - 1, 2**48, 2**50 - 1]:
      for r in {0, 1 % b, b - 1}:
        if q * b + r < 2**64:
          s.append(q * b + r)
          base.append(b)
    # s just below 2**64, where the quotient bound allows it.
    if 2**64 // b < 2**50:
      s += [2**64 - 1, 2**64 - b, 2**64 - b - 1]
      base += [b] * 3
  # Random: uniform quotients below 2**50 (or 2**64 / base) and random remainders.
  b = rng.choice(_BASES + list(rng.integers(1, 2**32, 50)), 20000).astype(np.uint64)
  q = np.minimum(rng.integers(0, 2**50, 20000, dtype=np.uint64) >> rng.integers(0, 50, 20000)
                 .astype(np.uint64), (np.uint64(2**64 - 1) - b) // b)
  remainders = rng.integers(0, 2**32, 20000, dtype=np.uint64) % b
  s = np.concatenate([np.asarray(s, np.uint64), q * b + remainders])
  base = np.concatenate([np.asarray(base, np.uint64), b])
  with jax.enable_x64(True):
    quotient, remainder = jax.jit(_bitstack.divmod_small_quotient)(jnp.asarray(s),
                                                                   jnp.asarray(base))
    plain = jax.jit(lambda s, b: (s // b, s % b))(jnp.asarray(s), jnp.asarray(base))
    # One base for the whole array (a scalar numerator), as the momentum uses it.
    for b in _BASES:
      lanes = jnp.asarray(s[base == b])
      chex.assert_trees_all_equal(
          jax.jit(_bitstack.divmod_small_quotient)(lanes, jnp.uint64(b)),
          (lanes // jnp.uint64(b), lanes % jnp.uint64(b)))
  np.testing.assert_array_equal(np.asarray(quotient), s // base)
  np.testing.assert_array_equal(np.asarray(remainder), s % base)
  chex.assert_trees_all_equal((quotient, remainder), plain)


def test_floor_divmod_matches_numpy_at_the_int64_extremes():
  rng = np.random.default_rng(1)
  x = [0, 1, -1, 2**62, -2**62, 2**61, -2**61, 2**63 - 1, -2**63, -2**63 + 1, 2**32, -2**32]
  x = np.asarray(x, np.int64)
  x = np.concatenate([x, x + 1, x - 1, rng.integers(-2**63, 2**63 - 1, 5000, dtype=np.int64)])
  n = np.asarray(_BASES, np.int64)
  xs, ns = np.repeat(x, n.size), np.tile(n, x.size)
  with jax.enable_x64(True):
    q, r = jax.jit(_bitstack.floor_divmod)(jnp.asarray(xs), jnp.asarray(ns))
    for b in _BASES:  # a scalar divisor, as in the reverse pass
      qb, rb = jax.jit(_bitstack.floor_divmod)(jnp.asarray(x), jnp.int64(b))
      np.testing.assert_array_equal(np.asarray(qb), np.floor_divide(x, b))
      np.testing.assert_array_equal(np.asarray(rb), np.mod(x, b))
  np.testing.assert_array_equal(np.asarray(q), np.floor_divide(xs, ns))
  np.testing.assert_array_equal(np.asarray(r), np.mod(xs, ns))


def _reference_multiply(heads, tail, values, numerators, denominator_bits):
  """``multiply``'s defining formulas in numpy, with integer division: the lanes' new heads,
  the tail (a list of chunks, the spilled lanes' in lane order) and the values."""
  k = _bitstack.head_bits(denominator_bits)
  heads, out, parts = [h.copy() for h in heads], [], []
  for v, n in zip(values, numerators):
    n = np.uint64(n)
    remainder = (v & (2**denominator_bits - 1)).astype(np.uint64)
    if denominator_bits == k:
      parts.append((v >> denominator_bits, remainder, np.uint64(0), n))
    else:
      shift, up = denominator_bits - k, np.uint64(2**(denominator_bits - k) - 1)
      r_hi = remainder >> np.uint64(k)
      start = (r_hi * n + up) >> np.uint64(shift)
      base = (((r_hi + np.uint64(1)) * n + up) >> np.uint64(shift)) - start
      parts.append((v >> denominator_bits, remainder & np.uint64(2**k - 1), start, base))
  for head, (_, _, _, base) in zip(heads, parts):
    spill = head >= (base << np.uint64(32))
    tail += list((head[spill] & np.uint64(2**32 - 1)).astype(np.uint32))
    head[spill] >>= np.uint64(32)
  for i, (head, (quotient, low, start, base), n) in enumerate(zip(heads, parts, numerators)):
    s = (head << np.uint64(k)) + low
    heads[i] = s // base
    x = s - heads[i] * base + start
    out.append(quotient * np.int64(n) + x.astype(np.int64))
  return heads, tail, out


@pytest.mark.parametrize("denominator_bits,numerators", [
    (16, [1, 2, 3, 58982, D - 1, D]), (16, [40000] * 6), (31, [2**23, 2**30 + 1, 2**31 - 1,
                                                               2**31, 2147482000, 2**23 + 7])])
def test_multiply_matches_the_integer_division_formulas(denominator_bits, numerators):
  """Several steps over lanes of every sign and size, with spills: the same heads, tail and
  values as the defining formulas computed with integer division."""
  v = _signed_values(denominator_bits, 6 * 400)
  groups = np.split(v, len(numerators))
  steps = 40 if denominator_bits == 16 else 12
  capacity = v.size * steps
  k = _bitstack.head_bits(denominator_bits)

  @jax.jit
  def step(stack, values, n, min_base):
    return _bitstack.multiply(stack, values, list(n), min_base,
                              (denominator_bits,) * len(values))

  with jax.enable_x64(True):
    stack = _bitstack.empty([g.shape for g in groups], capacity, k)
    values = [jnp.asarray(g) for g in groups]
    heads, tail = [np.full(g.shape, 2**k, np.uint64) for g in groups], []
    for t in range(steps):
      ns = [max(int(n) - t * 977, 2**(denominator_bits - k)) for n in numerators]
      bases = [_bitstack.head_bases(n, denominator_bits) for n in ns]
      stack, values = step(stack, values, jnp.asarray(ns, jnp.uint64),
                           jnp.float64(min(bases)))
      heads, tail, groups = _reference_multiply(heads, tail, groups, ns, denominator_bits)
    for ours, theirs in zip(stack.head, heads):
      np.testing.assert_array_equal(np.asarray(ours), theirs)
    for ours, theirs in zip(values, groups):
      np.testing.assert_array_equal(np.asarray(ours), theirs)
    assert int(stack.ptr) == len(tail) > 0 and not bool(stack.overflow)
    np.testing.assert_array_equal(np.asarray(stack.tail[:len(tail)]), np.asarray(tail, np.uint32))


def test_exact_float_converts_integers_below_two_to_the_52_exactly():
  with jax.enable_x64(True):
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.integers(0, 2**52, 5000, dtype=np.uint64),
                        np.asarray([0, 1, 2**16, 2**48 - 1, 2**52 - 1], np.uint64)])
    got = jax.jit(_bitstack.exact_float)(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(got), x.astype(np.float64))
