"""How failures that only the values reveal are reported, without host callbacks.

A failed run (fixed-point or bit-stack overflow, invalid hyperparameters, a failed reversal
check) is always recorded in ``Stats``. Where the values are concrete (an eager call), revhyper
raises ``ReversalError`` at once. Inside a trace (``jit``, ``vmap``, ``grad`` under ``jit``) a
Python exception cannot be raised without a host callback, which would cost a round trip per
call (one per element under ``vmap``), abort whole batches, and keep JAX's persistent
compilation cache from storing the program; instead the outputs of a failed run are NaN, so
that nothing computed from them is a wrong number that looks right.
"""

import jax
import jax.numpy as jnp
import numpy as np

from revhyper import _schedules


class ReversalError(RuntimeError):
  """A training run that revhyper cannot differentiate correctly.

  Raised when the values are known (an eager call of ``sgd``, ``round_trip``, or an eager
  ``jax.grad``): fixed-point or bit-stack overflow (a diverging run), invalid hyperparameters
  (a non-finite learning rate, a momentum outside [0, 1]), non-finite results of the float
  methods, or a failed ``Reversible(check_reversal=True)``. Under ``jax.jit`` the same failures
  make the outputs NaN and are recorded in ``result.stats``.
  """


def raise_if(flag, message):
  """Raises ``ReversalError(message)`` if ``flag`` is concrete and holds a True.

  Returns whether ``flag`` was concrete, so that callers know a traced flag still needs to be
  acted on inside the program (see ``poison``).
  """
  value = _schedules.concrete_value(flag)
  if value is None:
    return False
  if np.any(value):
    raise ReversalError(message)
  return True


def poison(flag, tree):
  """NaN in every float leaf of ``tree`` where the bool scalar ``flag`` is True."""

  def leaf(x):
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
      return x
    return jnp.where(flag, jnp.asarray(jnp.nan, jnp.result_type(x)), x)

  return jax.tree_util.tree_map(leaf, tree)


def concrete_or_raise(value, where):
  """``value`` as numpy; a clear error if it is traced."""
  known = _schedules.concrete_value(value)
  if known is None:
    raise ValueError(f"{where} needs concrete values: call it outside jax.jit / jax.vmap, on "
                     "the statistics the jitted function returned.")
  return known
