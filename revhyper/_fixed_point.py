"""Fixed-point arithmetic: the exact integer grid that weights and velocities live on.

A real number x is stored as the int64 ``round(x * 2**FRACTIONAL_BITS)``. After the single
rounding at the start of training, every update is an integer operation, so it can be undone
exactly:

* additive updates ``x += round(f(y) * 2**R)`` are undone by the same subtraction, because the
  reverse pass recomputes the same float increment ``f(y)`` from the same integers ``y``;
* the multiplication by the rational momentum ``n / 2**16`` is the one lossy map; it lives in
  ``_bitstack`` because it stores what it would lose.

Every function here must be called with 64-bit types enabled (``jax.enable_x64(True)``); the
callers in ``_reversible`` do so in a scoped context so that users never need the global flag.

Each state may have its own grid, ``2**-fractional_bits`` (the weights and velocities use
``FRACTIONAL_BITS``; Adam's second moment, a sum of squared gradients, a finer one), with the
range ``|x| < 2**(61 - fractional_bits)`` that keeps every sum inside an int64.
"""

import jax.numpy as jnp

# 2**-48 resolution leaves |x| < 2**13 = 8192 for weights and velocities (see _MAX_ABS_INT): ample for neural
# network weights, finer than float32's 2**-24 relative resolution for |x| > 2**-24, and the
# resolution at which reversal was measured exact on CPUs and GPUs.
FRACTIONAL_BITS = 48

# Every state entering a step is checked to satisfy |x| < 2**61 (from its float value, which
# the step computes anyway), and so is every increment, so that their sum, |x| < 2**62, cannot
# wrap an int64: no integer is ever inspected twice.
_MAX_ABS_INT = 2**61
MAX_ABS_VALUE = float(2 ** (61 - FRACTIONAL_BITS))


# Adam's moments have their own grids. The first, an average of gradients, is resolved to
# 2**-56 (|mu| < 32), so that the at most 2**8 + 1 grid units a decay moves it by (2**-48) stay
# far below any gradient that matters. The second, an average of squared gradients, spans another
# range: 2**-60 resolves (1 - b2) g**2 = 1e-9 (g = 1e-3, b2 = 0.999) as 2**30 grid units, at
# the price of the range 0 <= nu < 2, checked like the others.
FIRST_MOMENT_BITS = 56
SECOND_MOMENT_BITS = 60


def max_abs_value(fractional_bits=FRACTIONAL_BITS):
  """The exact range of a grid: ``|x| < 2**(61 - fractional_bits)``."""
  return float(2.0 ** (61 - fractional_bits))


def compute_dtype(dtype):
  """The float type increments are computed in: the leaf's own, widened to at least float32.

  float16 cannot represent 2**-48, the grid step, so narrower leaves compute in float32.
  """
  return jnp.promote_types(dtype, jnp.float32)


def to_fixed(x, fractional_bits=FRACTIONAL_BITS):
  """Rounds floats onto the grid; returns ``(int64 array, in_range bool array)``.

  ``in_range`` is False per element where the value is out of range or not finite. Such a
  value is clamped, so that the integers stay well defined; the caller reports the run as
  failed rather than continuing silently.
  """
  scaled = x.astype(compute_dtype(x.dtype)) * (2.0**fractional_bits)
  in_range = jnp.abs(scaled) < _MAX_ABS_INT  # False for NaN too
  # 2**61 is exactly representable in float32 and float64, so the clamp itself is exact.
  clamped = jnp.clip(scaled, -float(_MAX_ABS_INT), float(_MAX_ABS_INT))
  return jnp.round(clamped).astype(jnp.int64), in_range


def in_range(x, fractional_bits=FRACTIONAL_BITS):
  """Per element: the float value of a state lies in the exact range (False for NaN)."""
  return jnp.abs(x) < max_abs_value(fractional_bits)


def to_float(x_int, dtype, fractional_bits=FRACTIONAL_BITS):
  """The float value of grid integers, in ``dtype`` (computed at least in float32)."""
  wide = compute_dtype(dtype)
  # int64 -> float rounds to nearest; the scaling by a power of two is then exact.
  return (x_int.astype(wide) * jnp.asarray(2.0**-fractional_bits, wide)).astype(dtype)


def add(x_int, increment, fractional_bits=FRACTIONAL_BITS):
  """Exact ``x + round(increment * 2**R)``; returns ``(int64 array, in_range bool array)``.

  ``in_range`` covers the increment; with ``in_range(x)`` checked by the caller the sum cannot
  wrap. Per element only (no reduction), so that a training loop can accumulate the checks
  cheaply and reduce once at the end.
  """
  delta, ok = to_fixed(increment, fractional_bits)
  return x_int + delta, ok


def subtract(x_int, increment, fractional_bits=FRACTIONAL_BITS):
  """Exact inverse of ``add(x_int, increment)`` for the same float ``increment``."""
  delta, ok = to_fixed(increment, fractional_bits)
  return x_int - delta, ok
