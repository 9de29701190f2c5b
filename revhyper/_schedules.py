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
  """``x`` as a numpy array when its value is known at trace time, else ``None``."""
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

  Returns:
    bool: whether some momentum rounds below ``1 / d`` and will be clipped to it.
  """
  for value in learning_rate.values:
    if value is not None and not np.all(np.isfinite(value)):
      raise ValueError(f"learning_rate must be finite, got {value[~np.isfinite(value)][:5]}.")
  clipped = False
  for value in momentum.values:
    if value is None:
      continue
    bad = ~((value >= 0) & (value <= 1))
    if np.any(bad):
      raise ValueError(f"momentum must lie in [0, 1], got {value[bad][:5]}.")
    clipped |= bool(np.any(np.round(value * _bitstack.DENOMINATOR) < 1))
  if clipped:
    warnings.warn(
        "momentum below 2**-17 rounds to 0, which would erase the velocity; it is clipped to "
        "2**-16 (16 bits stored per weight per step). The gradient is that of the clipped "
        "dynamics.", stacklevel=3)
  return clipped


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
  numerators, values = [], []
  for gamma, known in zip(schedule.arrays, schedule.values):
    with jax.ensure_compile_time_eval():
      n = _numerators(gamma if known is None else jnp.asarray(known))
    numerators.append(n)
    values.append(_round_momentum(gamma, n))
  return Momentum(numerators, values)


def _numerators(gamma):
  d = _bitstack.DENOMINATOR
  # Exact in float32 and float64: gamma * 2**16 only shifts the exponent; round is half-even.
  return jnp.clip(jnp.round(gamma * d), 1, d).astype(jnp.int32)


@jax.custom_jvp
def _round_momentum(gamma, numerators):
  """``numerators / d`` in gamma's dtype, with the gradient of ``gamma`` (straight through).

  The forward value is the rounded one, so every method runs the same dynamics; the gradient
  is that of the dynamics actually run, passed straight through the rounding.
  """
  # Exact: n <= 2**16 and the division is by a power of two.
  return numerators.astype(gamma.dtype) / _bitstack.DENOMINATOR


@_round_momentum.defjvp
def _round_momentum_jvp(primals, tangents):
  gamma, numerators = primals
  return _round_momentum(gamma, numerators), tangents[0]
