"""``revhyper.sgd``: momentum SGD in the paper's convention, with optional decoupled weight
decay: ``revhyper.optim.heavy_ball`` run by the shared engine, behind the signature it has had
since the first release.
"""

from typing import Any, NamedTuple

from revhyper import _optim
from revhyper import _reversible
from revhyper import _training

Stats = _reversible.Stats


class SGDResult(NamedTuple):
  """What ``sgd`` returns."""

  params: Any  # final weights w_T, a pytree like params (differentiable)
  velocity: Any  # final velocity v_T, a pytree like params (differentiable)
  stats: Stats  # diagnostics (not differentiable)


def _problem(loss_fn, params, hparams, *, num_steps, learning_rate, momentum, velocity=None,
             weight_decay=0.0, precision="highest"):
  problem = _training.optimizer_problem(
      loss_fn, params, hparams, _optim.heavy_ball(learning_rate, momentum, weight_decay),
      num_steps=num_steps, opt_state=None if velocity is None else {"velocity": velocity},
      state_label=lambda name: name, precision=precision)
  return problem._replace(present=lambda slots: slots[0])


_training.OPTIMIZERS["sgd"] = _problem


def sgd(loss_fn, params, hparams, *, num_steps, learning_rate, momentum, velocity=None,
        weight_decay=0.0, method="reversible"):
  r"""Runs momentum SGD for ``num_steps`` steps, differentiably in every input.

  The update, at step ``t = 0 .. num_steps - 1`` (the reference implementation's order)::

      g_t     = grad_w loss_fn(w_t, hparams, t)
      v_{t+1} = gamma_t * v_t - (1 - gamma_t) * g_t
      w_{t+1} = w_t - alpha_t * lambda_t * w_t + alpha_t * v_{t+1}

  with ``lambda_t`` the (decoupled) ``weight_decay``, 0 by default.

  ``jax.grad`` of any function of ``result.params`` or ``result.velocity`` gives gradients
  with respect to ``params``, ``velocity``, ``hparams``, ``learning_rate`` and ``momentum``.
  With the default ``method="reversible"`` the backward pass runs training backwards exactly
  instead of storing it (Maclaurin, Duvenaud & Adams, ICML 2015).

  Momenta are rounded to multiples of ``2**-16`` (the exact arithmetic needs a rational
  momentum), from the values given (at least float32, whatever the leaves' dtype), by every
  method alike; gradients pass straight through the rounding. A momentum below ``2**-17`` is
  clipped to ``2**-16`` with a warning. A weight decay makes the weights' decay
  ``1 - alpha_t * lambda_t`` a rational multiply too, on the finer grid ``n / 2**31``: the
  product ``alpha_t * lambda_t`` is rounded to a multiple of ``2**-31`` (4.7e-10; 1e-5 is
  then off by at most 0.002%), and reversed exactly by the bit stack, which stores
  ``log2(1 / (1 - alpha_t * lambda_t))`` more bits per weight per step.

  Precision: every method carries the state at least in float32 (``Reversible``: on a 2**-48
  grid; ``Unroll``/``Checkpoint``: in the leaf's dtype widened to float32) and computes the
  updates in that precision; ``loss_fn`` sees the weights in the leaves' own dtypes, and the
  results come back in them.

  Transformations: ``jit``, ``vmap`` and first-order reverse mode (``jax.grad``, ``jax.vjp``,
  ``jax.jacrev``) work with every method. Forward mode and higher-order derivatives
  (``jax.jvp``, ``jax.hessian``, grad of grad) need ``method="unroll"`` or ``"checkpoint"``;
  through ``Reversible`` they raise a ``TypeError`` that says so.

  Failures (a diverging run, bit-stack overflow, invalid hyperparameters, non-finite results)
  are recorded in ``result.stats``. Called eagerly, ``sgd`` raises ``ReversalError``; inside
  ``jit`` (where raising would need a host callback) the outputs, and any hypergradient, are
  NaN instead: call ``stats.raise_if_failed()`` on statistics returned from ``jit``.

  Args:
    loss_fn: ``loss_fn(params, hparams, t) -> scalar`` training loss at step ``t`` (an int32
      scalar); the minibatch must be a pure function of ``t``. It may close over arrays: they
      are differentiated like ``hparams``.
    params: a pytree of float arrays, the initial weights ``w_0``.
    hparams: any pytree that ``loss_fn`` reads (penalties, data, ...); integer leaves get no
      gradient.
    num_steps: the number of steps ``T`` (a static Python int, at least 1).
    learning_rate: ``alpha``: a scalar, a ``[T]`` array, or a pytree like ``params`` whose
      leaves are scalars or ``[T]`` arrays (per-layer, per-step schedules). Must be finite.
    momentum: ``gamma``, in the same forms, values in ``[0, 1]``.
    velocity: the initial velocity ``v_0``, a pytree like ``params``; zeros by default.
    weight_decay: ``lambda``, decoupled weight decay, in the forms of ``learning_rate``, with
      ``learning_rate * weight_decay`` in ``[0, 1]``. The default 0 adds nothing to the run.
    method: ``"reversible"``, ``"unroll"``, ``"checkpoint"``, or a configured
      ``Reversible(...)``, ``Unroll()`` or ``Checkpoint(...)``.

  Returns:
    ``SGDResult(params, velocity, stats)``: final weights and velocity, pytrees like
    ``params``, and ``Stats`` (bits stored, capacity, overflow flags).

  Raises:
    ValueError: bad arguments (non-float params, wrong schedule shape or structure, momentum
      or ``learning_rate * weight_decay`` outside [0, 1], non-finite learning rate,
      ``num_steps < 1``, traced momentum or weight decay without
      ``Reversible(min_decay=...)``).
    ReversalError: when the values are concrete (an eager call, or an eager ``jax.grad``),
      and the training leaves the fixed-point range (a diverging run), overflows the bit
      stack, has invalid hyperparameters or non-finite results. Under ``jit``: NaN outputs.
    TypeError: forward-mode or higher-order differentiation through ``Reversible``.

  Example::

    >>> import jax, jax.numpy as jnp, revhyper
    >>> def loss_fn(w, l2, t):
    ...   return jnp.sum((w - 1.0) ** 2) + l2 * jnp.sum(w ** 2)
    >>> def meta(l2):
    ...   out = revhyper.sgd(loss_fn, jnp.zeros(3), l2, num_steps=20,
    ...                      learning_rate=0.1, momentum=0.9)
    ...   return jnp.sum((out.params - 0.5) ** 2)
    >>> hypergradient = jax.grad(meta)(0.1)
  """
  method = _training.resolve_method(method)
  problem = _problem(loss_fn, params, hparams, num_steps=num_steps, precision=method.precision,
                     learning_rate=learning_rate, momentum=momentum, velocity=velocity,
                     weight_decay=weight_decay)
  params_out, (velocity_out,), _, stats = _training.run(method, problem)
  return SGDResult(params_out, velocity_out, stats)
