"""Broadcasting of learning-rate and momentum schedules, and their validation.

A schedule may be a scalar, a ``[num_steps]`` array, or a pytree shaped like ``params`` whose
leaves are scalars or ``[num_steps]`` arrays (the paper's per-layer, per-iteration schedules).
All forms become one ``[num_steps]`` array per parameter leaf, through ``jnp.broadcast_to`` so
that gradients flow back to whatever the user passed, summed where it was broadcast.

Schedules keep their own precision (at least float32), whatever the dtype of the parameters:
a momentum is rounded to ``n / d`` from the value the user gave, not from that value rounded to
a bfloat16 leaf's dtype; the training step then computes in the leaf's compute dtype.
"""

import warnings
from typing import NamedTuple

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from revhyper import _bitstack


def _is_array_like(x):
  return isinstance(x, (int, float, np.ndarray, np.generic, jax.Array))


def concrete_value(x):
  """``x`` as a numpy array when its value is known at trace time, else ``None``.

  An array spread over devices of other processes is not known here either: its value cannot
  be fetched by this process alone.
  """
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and (
      not x.is_fully_addressable):
    return None
  try:
    return jex.core.concrete_or_error(np.asarray, x)
  except jax.errors.ConcretizationTypeError:
    return None


class Schedule(NamedTuple):
  """One ``[num_steps]`` array per parameter leaf, with its value where known at trace time."""

  arrays: list  # [num_steps] float arrays in the value's own dtype, at least float32
  values: list  # numpy [num_steps] arrays (same dtype), or None where the value is traced


def _schedule_dtype(value_dtype):
  """The float type a schedule is kept in: its own, at least float32 (float32 for ints)."""
  if not jnp.issubdtype(value_dtype, jnp.floating):
    return jnp.dtype(jnp.float32)
  return jnp.promote_types(value_dtype, jnp.float32)


def _leaf_schedule(value, num_steps, name, where):
  known = concrete_value(value)
  value = jnp.asarray(value)
  if not (jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)):
    raise ValueError(f"{name}{where} must be a real number or array, got dtype {value.dtype}.")
  if value.ndim != 0 and value.shape != (num_steps,):
    raise ValueError(
        f"{name}{where} must be a scalar or have shape (num_steps,) = ({num_steps},), "
        f"got shape {value.shape}.")
  dtype = _schedule_dtype(value.dtype)
  if known is not None:
    known = np.broadcast_to(np.asarray(known).astype(dtype), (num_steps,))
  return jnp.broadcast_to(value.astype(dtype), (num_steps,)), known


def broadcast(value, params, num_steps, name):
  """One ``[num_steps]`` schedule per leaf of ``params``, in the value's own float dtype.

  Returns:
    a ``Schedule``.

  Raises:
    ValueError: wrong length, or a pytree that does not match ``params``.
  """
  leaves, treedef = jax.tree_util.tree_flatten(params)
  if _is_array_like(value):
    pairs = [_leaf_schedule(value, num_steps, name, "")] * len(leaves)
  else:
    value_leaves, value_treedef = jax.tree_util.tree_flatten(value)
    if value_treedef != treedef:
      raise ValueError(
          f"{name} must be a scalar, a [num_steps] array, or a pytree with the structure of "
          f"params; got structure {value_treedef}, params has {treedef}.")
    paths = [jax.tree_util.keystr(p)
             for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    pairs = [
        _leaf_schedule(v, num_steps, name, path) for v, path in zip(value_leaves, paths)
    ]
  return Schedule([a for a, _ in pairs], [k for _, k in pairs])


def check_concrete(learning_rate, momentum):
  """Validates the schedule values known at trace time; traced ones are checked at run time.

  Args:
    learning_rate, momentum: ``Schedule``s.
  """
  for value in learning_rate.values:
    if value is not None and not np.all(np.isfinite(value)):
      raise ValueError(f"learning_rate must be finite, got {value[~np.isfinite(value)][:5]}.")
  check_range(momentum, "momentum", 0, 1)


def runtime_invalid(learning_rate, momentum):
  """A bool scalar: some learning rate is non-finite or some momentum is outside [0, 1]."""
  bad = jnp.zeros((), jnp.bool_)
  for alpha in learning_rate:
    bad |= jnp.logical_not(jnp.all(jnp.isfinite(alpha)))
  for gamma in momentum:
    bad |= jnp.logical_not(jnp.all((gamma >= 0) & (gamma <= 1)))
  return bad


class Momentum(NamedTuple):
  """A momentum schedule on the rational grid ``n / d``, derived once for every use."""

  numerators: list  # int32 [num_steps] per leaf: n in [1, d]; the bit stack's bases.
  values: list  # float [num_steps] per leaf: n / d, differentiable (straight through).


def quantize_momentum(schedule):
  """Rounds each leaf's momentum to ``n / 2**16``, ``1 <= n <= 2**16``, in its own precision.

  The numerators are the single source of the momentum that every method runs, that sizes the
  bit stack and that the statistics report. Where the schedule is known at trace time they
  are computed at once (``ensure_compile_time_eval``), so that the capacity is computed from
  the very integers the run will use.
  """
  d = _bitstack.DENOMINATOR
  numerators, values, clipped = [], [], False
  for gamma, known in zip(schedule.arrays, schedule.values):
    n, low = _rounded_multiples(gamma, known, d, 1, d)
    with jax.ensure_compile_time_eval():  # concrete where the value is known
      n = n.astype(jnp.int32)
    numerators.append(n)
    values.append(_round_momentum(gamma, n))
    clipped |= low
  if clipped:
    warnings.warn(
        "momentum below 2**-17 rounds to 0, which would erase the velocity; it is clipped to "
        "2**-16 (16 bits stored per weight per step). The gradient is that of the clipped "
        "dynamics.", stacklevel=3)
  return Momentum(numerators, values)


def _rounded_multiples(x, known, scale, low, high):
  """``round(x * scale)`` clipped to ``[low, high]``, and whether a known value was clipped.

  Computed from the value known at trace time where there is one (at once, so that the
  capacity is computed from the very integers the run uses), else traced. Exact in float32
  and float64: multiplying by a power of two only shifts the exponent; round is half-even.
  """
  with jax.ensure_compile_time_eval():
    rounded = jnp.round((x if known is None else jnp.asarray(known)) * float(scale))
    multiples = jnp.clip(rounded, low, high)
    clipped = known is not None and bool(jnp.any(multiples != rounded))
  return multiples, clipped


@jax.custom_jvp
def _straight_through(x, rounded):
  """``rounded`` (x's rounding, same dtype), differentiated as ``x``.

  The forward value is the rounded one, so every method runs the same dynamics; the gradient
  is that of the dynamics actually run, passed straight through the rounding.
  """
  return rounded


@_straight_through.defjvp
def _straight_through_jvp(primals, tangents):
  return primals[1], tangents[0]


def _round_momentum(gamma, numerators):
  """``numerators / d`` in gamma's dtype, with the gradient of ``gamma``."""
  # Exact: n <= 2**16 and the division is by a power of two.
  return _straight_through(gamma, numerators.astype(gamma.dtype) / _bitstack.DENOMINATOR)


# Rational multiplies close to 1 (Adam's b1 and b2, a weight decay 1 - lr * wd) use the finer
# denominator 2**31: b2 = 0.999 and lr * wd = 1e-5 are then resolved to 2**-31 = 4.7e-10 (on
# 2**-16, b2 would become 0.998993 and (1 - b2) be off by 0.7%). 2**31 is the finest grid whose
# numerators n <= 2**31 fit a uint32 (x64 may be off where they are derived); the bit stack
# codes it with 64-bit products (see ``_bitstack.multiply``).
DECAY_BITS = 31
# The bit stack's blocks are non-empty for n >= 2**(31 - 8): decay factors of at least 2**-8.
_DECAY_FLOOR = 2**(DECAY_BITS - _bitstack.head_bits(DECAY_BITS))


class Decay(NamedTuple):
  """A decay schedule ``x -> (1 - c) x`` on the rational grid ``n / 2**DECAY_BITS``, derived once.

  The amount ``c`` (``1 - b1``, ``1 - b2``, ``learning_rate * weight_decay``) is rounded to a
  multiple of ``2**-31``, not the factor ``1 - c``: in float32 ``1 - 1e-7`` is off by 30%.
  """

  numerators: list  # uint32 [num_steps] per leaf: n = 2**31 - round(c * 2**31), >= 2**23.
  amounts: list  # float [num_steps] per leaf: (2**31 - n) / 2**31, straight-through gradient.


def quantize_decay(amounts, name):
  """Rounds each leaf's amount ``c`` to ``m / 2**31``; ``n = 2**31 - m`` is kept at least
  ``2**23`` (a factor of at least 2**-8, which the bit stack needs), with a warning if clipped.

  Args:
    amounts: a ``Schedule`` of amounts in ``[0, 1]`` (its values known where they are, so that
      the numerators, and the capacity, are computed at trace time).
    name: how the warning names the decay.

  Returns:
    a ``Decay``.
  """
  d = 2**DECAY_BITS
  numerators, values, clipped = [], [], False
  for c, known in zip(amounts.arrays, amounts.values):
    m, high = _rounded_multiples(c, known, d, 0, d - _DECAY_FLOOR)
    with jax.ensure_compile_time_eval():  # concrete where the value is known
      n = jnp.uint32(d) - m.astype(jnp.uint32)
    numerators.append(n)
    values.append(_round_amount(c, n))
    clipped |= high
  if clipped:
    warnings.warn(f"{name} rounds to a factor below 2**-8, which the exact arithmetic cannot "
                  "hold; it is clipped to 2**-8 (8 bits stored per weight per step). The "
                  "gradient is that of the clipped dynamics.", stacklevel=4)
  return Decay(numerators, values)


def combine(op, *schedules):
  """``op`` leaf by leaf on ``Schedule``s: on the arrays, and on the known values alike."""
  arrays = [op(*xs) for xs in zip(*(s.arrays for s in schedules))]
  values = [None if any(v is None for v in vs) else op(*vs)
            for vs in zip(*(s.values for s in schedules))]
  return Schedule(arrays, values)


def _round_amount(c, numerators):
  """``(2**31 - n) / 2**31`` in c's dtype, with the gradient of ``c`` (straight through)."""
  return _straight_through(
      c, (jnp.uint32(2**DECAY_BITS) - numerators).astype(c.dtype) * 2.0**-DECAY_BITS)


def check_range(schedule, name, low, high, what=None):
  """Raises ``ValueError`` if a concrete value of the ``Schedule`` lies outside ``[low, high]``."""
  for value in schedule.values:
    if value is None:
      continue
    bad = ~((value >= low) & (value <= high))
    if np.any(bad):
      raise ValueError(f"{name} must {what or f'lie in [{low}, {high}]'}, got {value[bad][:5]}.")


def outside(arrays, low, high):
  """A bool scalar: some traced value lies outside ``[low, high]`` (or is NaN)."""
  bad = jnp.zeros((), jnp.bool_)
  for x in arrays:
    bad |= jnp.logical_not(jnp.all((x >= low) & (x <= high)))
  return bad
