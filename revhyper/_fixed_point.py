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

import jax
import jax.numpy as jnp
import numpy as np

# 2**-48 resolution leaves |x| < 2**13 = 8192 for weights and velocities (see _MAX_ABS_INT): ample for neural
# network weights, finer than float32's 2**-24 relative resolution for |x| > 2**-24, and the
# resolution at which reversal was measured exact on CPUs and GPUs.
FRACTIONAL_BITS = 48

# Every state entering a step is checked to lie in [-2**61, 2**61) (``in_range_int``), and every
# increment is rounded into [-2**62, 2**62] (``to_fixed``), so that their sum cannot wrap an
# int64; a lane whose state is out of range keeps it (the training step freezes it), so that a
# check of the final state finds every failure.
_MAX_ABS_INT = 2**61
_OUT_OF_RANGE = 2.0**62  # what ``to_fixed`` makes of a value out of range
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
  value becomes ``+-2**62`` (``+`` for NaN): well defined, and far enough out that adding it to
  a state in range (``in_range_int``) cannot wrap an int64 and lands out of range, so that the
  failure survives to the final check; the caller reports the run as failed rather than
  continuing silently.

  The scaled value ``y = x * 2**R`` (exact, in float64) is rounded half to even, like
  ``jnp.round(y).astype(jnp.int64)``, in two halves of 32 bits read from float bit patterns
  (``_round_to_int``): CPUs without AVX-512 have no vector float-to-int64 conversion, and
  this step runs on every weight at every training step.
  """
  scaled = x.astype(jnp.promote_types(x.dtype, jnp.float64)) * (2.0**fractional_bits)
  ok = jnp.abs(scaled) < _MAX_ABS_INT  # False for NaN too
  clamped = jnp.where(ok, scaled, jnp.where(scaled < 0, -_OUT_OF_RANGE, _OUT_OF_RANGE))
  # y = high * 2**32 + low exactly, high the nearest integer to y / 2**32 and |low| <= 2**31;
  # rounding low half to even rounds y so, high * 2**32 being even.
  high = _round_to_int(clamped * 2.0**-32)  # |high| <= 2**30
  low = _round_to_int(clamped - high.astype(jnp.int32).astype(jnp.float64) * 2.0**32)
  return (high << 32) + low, ok


# Adding 1.5 * 2**52 to a float64 |y| < 2**51 rounds it half to even to an integer and leaves
# that integer in the low bits of the sum's bit pattern.
_ROUNDER = 1.5 * 2.0**52
_ROUNDER_BITS = int(np.float64(_ROUNDER).view(np.int64))


def _round_to_int(y):
  """``round(y)`` as int64 for float64 ``|y| < 2**51``, half to even.

  (Not ``(y + 1.5 * 2**52) - 1.5 * 2**52`` for the rounded float: XLA folds that to ``y``.)
  """
  return jax.lax.bitcast_convert_type(y + _ROUNDER, jnp.int64) - _ROUNDER_BITS


def in_range_int(x_int):
  """Per element: a grid integer lies in ``[-2**61, 2**61)``, where sums of two cannot wrap.

  Integer-only (an add, a logical shift and a compare, all vector instructions on x86 CPUs):
  checks a state entering a step without converting it to a float.
  """
  return ((x_int + _MAX_ABS_INT).astype(jnp.uint64) >> 62) == 0


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
