"""Errors that only the values reveal, raised also under ``jit``."""

import jax
import numpy as np

from revhyper import _schedules


class ReversalError(RuntimeError):
  """Exact reversal is impossible or failed: fixed-point or bit-stack overflow, bad values."""


def _raise(message, flag):
  if np.any(flag):  # under vmap, flag holds one entry per batch element
    raise ReversalError(message)


def raise_if(flag, message):
  """Raises ``ReversalError(message)`` when the bool array ``flag`` holds a True.

  Eagerly the error is raised at once. Under ``jit`` a host callback raises it when the
  program runs; JAX then reports it as a runtime error whose text contains ``message``.
  """
  value = _schedules.concrete_value(flag)
  if value is not None:
    _raise(message, value)
  else:
    jax.debug.callback(lambda f: _raise(message, f), flag)
