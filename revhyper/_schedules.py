"""Broadcasting of learning-rate and momentum schedules, and their validation.

A schedule may be a scalar, a ``[num_steps]`` array, or a pytree shaped like ``params`` whose
leaves are scalars or ``[num_steps]`` arrays (the paper's per-layer, per-iteration schedules).
All forms become one ``[num_steps]`` array per parameter leaf, through ``jnp.broadcast_to`` so
that gradients flow back to whatever the user passed, summed where it was broadcast.
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

  arrays: list  # [num_steps] arrays in each leaf's float dtype (differentiable)
  values: list  # numpy [num_steps] float64 arrays, or None where the value is traced


def _leaf_schedule(value, num_steps, dtype, name, where):
  known = concrete_value(value)
  value = jnp.asarray(value)
  if not (jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)):
    raise ValueError(f"{name}{where} must be a real number or array, got dtype {value.dtype}.")
  if value.ndim != 0 and value.shape != (num_steps,):
    raise ValueError(
        f"{name}{where} must be a scalar or have shape (num_steps,) = ({num_steps},), "
        f"got shape {value.shape}.")
  if known is not None:
    known = np.broadcast_to(np.asarray(known, np.float64), (num_steps,))
  return jnp.broadcast_to(value.astype(dtype), (num_steps,)), known


def broadcast(value, params, num_steps, name):
  """One ``[num_steps]`` schedule per leaf of ``params``, in that leaf's float dtype.

  Returns:
    a ``Schedule``.

  Raises:
    ValueError: wrong length, or a pytree that does not match ``params``.
  """
  leaves, treedef = jax.tree_util.tree_flatten(params)
  dtypes = [jnp.result_type(leaf) for leaf in leaves]
  if _is_array_like(value):
    pairs = [_leaf_schedule(value, num_steps, dtype, name, "") for dtype in dtypes]
  else:
    value_leaves, value_treedef = jax.tree_util.tree_flatten(value)
    if value_treedef != treedef:
      raise ValueError(
          f"{name} must be a scalar, a [num_steps] array, or a pytree with the structure of "
          f"params; got structure {value_treedef}, params has {treedef}.")
    paths = [jax.tree_util.keystr(p)
             for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    pairs = [
        _leaf_schedule(v, num_steps, dtype, name, path)
        for v, dtype, path in zip(value_leaves, dtypes, paths)
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


@jax.custom_jvp
def quantize_momentum(gamma):
  """Rounds a momentum schedule to the rationals ``n / 2**16``, ``1 <= n <= 2**16``.

  The forward value is the rounded one, so every method runs the same dynamics; the gradient
  passes straight through the rounding (it is the gradient of the dynamics actually run).
  """
  d = _bitstack.DENOMINATOR
  # Exact in float32 and float64: n <= 2**16 and the division is by a power of two.
  return (jnp.clip(jnp.round(gamma * d), 1, d) / d).astype(gamma.dtype)


@quantize_momentum.defjvp
def _quantize_momentum_jvp(primals, tangents):
  (gamma,), (tangent,) = primals, tangents
  return quantize_momentum(gamma), tangent
