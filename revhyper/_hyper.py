"""Hyperparameter parameterisations and schedules, as in the paper (section 3).

Meta-optimisation works on unconstrained values: the learning rate is exp(log alpha), the
momentum sigmoid(logit gamma), each initialisation scale exp(log scale). Schedules hold one
value per weight type (one per leaf of the parameters) and per training step.

Every function maps over pytrees, so a whole schedule converts in one call::

    log_alpha = constant_schedule(params, num_steps=100, value=-1.0)
    logit_gamma = constant_schedule(params, num_steps=100, value=float(logit(0.5)))
    alpha, gamma = learning_rate_from_log(log_alpha), momentum_from_logit(logit_gamma)
"""

import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def learning_rate_from_log(log_alpha: Any) -> Any:
  """Learning rates exp(log_alpha), leaf by leaf.

  Args:
    log_alpha: a pytree of floating arrays or scalars.

  Returns:
    A pytree of the same structure, of positive learning rates.

  Example:
    >>> float(learning_rate_from_log(jnp.float32(-1.0)))  # the paper's starting value, e**-1
    0.36787...
  """
  return jax.tree.map(jnp.exp, log_alpha)


def momentum_from_logit(logit_gamma: Any) -> Any:
  """Momenta sigmoid(logit_gamma), in (0, 1), leaf by leaf.

  Args:
    logit_gamma: a pytree of floating arrays or scalars.

  Returns:
    A pytree of the same structure.

  Example:
    >>> float(momentum_from_logit(jnp.float32(0.0)))  # the paper's starting value
    0.5
  """
  return jax.tree.map(jax.nn.sigmoid, logit_gamma)


def init_scale_from_log(log_scale: Any) -> Any:
  """Initialisation scales exp(log_scale), leaf by leaf (see ``mlp_init_from_noise``).

  Args:
    log_scale: a pytree of floating arrays or scalars.

  Returns:
    A pytree of the same structure, of positive scales.

  Example:
    >>> float(init_scale_from_log(jnp.float32(-3.0)))
    0.04978...
  """
  return jax.tree.map(jnp.exp, log_scale)


def logit(p: Any) -> Any:
  """The inverse of the sigmoid, log(p / (1 - p)), leaf by leaf: ``momentum_from_logit(logit(g)) == g``.

  Args:
    p: a pytree of floating values in (0, 1); traced values at or beyond the ends give
      infinities or NaN.

  Returns:
    A pytree of the same structure.

  Raises:
    ValueError: a concrete (non-traced) value lies outside (0, 1).

  Example:
    >>> float(logit(jnp.float32(0.9)))
    2.19722...
  """

  def one(q):
    if not isinstance(q, jax.core.Tracer):
      values = np.asarray(q)
      if values.size and not np.all((values > 0) & (values < 1)):
        raise ValueError(f"p must lie in (0, 1), got {q!r}")
    return jnp.log(q) - jnp.log1p(-q)

  return jax.tree.map(one, p)


def constant_like(params_like: Any, value: float, dtype=None) -> Any:
  """One scalar per leaf of ``params_like``, all equal to ``value``: one value per weight type.

  Args:
    params_like: a pytree of arrays (or ``jax.ShapeDtypeStruct``), e.g. MLP parameters.
    value: the value of every leaf.
    dtype: the dtype of the scalars; None takes each leaf's own floating dtype.

  Returns:
    A pytree with the structure of ``params_like`` and 0-d leaves.

  Raises:
    TypeError: ``dtype`` is None and a leaf has no floating dtype.

  Example:
    >>> params = [{"W": jnp.zeros((3, 2)), "b": jnp.zeros(2)}]
    >>> log_scales = constant_like(params, -3.0)
    >>> log_scales[0]["W"].shape
    ()
  """
  return jax.tree.map(lambda leaf: jnp.full((), value, _leaf_dtype(leaf, dtype)), params_like)


def constant_schedule(params_like: Any, num_steps: int, value: float, dtype=None) -> Any:
  """A per-weight-type, per-step schedule: one [num_steps] array per leaf, all ``value``.

  This is the paper's hyperparameter layout for learning rates and momenta (e.g. 100 steps x 8
  weight types for a 784-50-50-50-10 MLP); meta-optimisation then shapes it freely. The result
  is a valid ``learning_rate`` or ``momentum`` argument of ``revhyper.sgd`` once mapped through
  ``learning_rate_from_log`` or ``momentum_from_logit`` above.

  Args:
    params_like: a pytree of arrays (or ``jax.ShapeDtypeStruct``), e.g. MLP parameters.
    num_steps: the number of training steps T, a positive Python int.
    value: the value of every entry (e.g. a log learning rate).
    dtype: the dtype of the schedules; None takes each leaf's own floating dtype.

  Returns:
    A pytree with the structure of ``params_like`` and [num_steps] leaves.

  Raises:
    TypeError: ``num_steps`` is not an int, or ``dtype`` is None and a leaf is not floating.
    ValueError: ``num_steps`` is not positive.

  Example:
    >>> params = [{"W": jnp.zeros((3, 2)), "b": jnp.zeros(2)}]
    >>> log_alpha = constant_schedule(params, num_steps=100, value=-1.0)
    >>> log_alpha[0]["b"].shape
    (100,)
  """
  try:
    num_steps = operator.index(num_steps)
  except TypeError:
    raise TypeError(f"num_steps must be a Python int, got {num_steps!r}") from None
  if num_steps < 1:
    raise ValueError(f"num_steps must be positive, got {num_steps}")
  return jax.tree.map(
      lambda leaf: jnp.full((num_steps,), value, _leaf_dtype(leaf, dtype)), params_like)


def _leaf_dtype(leaf, dtype):
  if dtype is not None:
    return jnp.dtype(dtype)
  leaf_dtype = getattr(leaf, "dtype", None)
  if leaf_dtype is None or not jnp.issubdtype(leaf_dtype, jnp.floating):
    raise TypeError(
        f"cannot take the dtype from a leaf of type {type(leaf).__name__} "
        f"(dtype {leaf_dtype}); pass dtype explicitly")
  return leaf_dtype
