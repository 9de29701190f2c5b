"""``revhyper.sgd``: momentum SGD, with optional decoupled weight decay, as a reversible rule.

The rule (``SGD``) is all that is specific to this optimizer: its one state (the velocity),
its exact additive updates, its rational multiplies (the momentum on ``n / 2**16``, the weight
decay on ``n / 2**31``) and its float update. The engine (``_reversible``) and the methods
(``_training``) are shared with every other optimizer.
"""

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from revhyper import _reversible
from revhyper import _schedules
from revhyper import _training

Stats = _reversible.Stats

VELOCITY = _reversible.Slot("velocity", fractional_bits=48, denominator_bits=16)


class SGDCoefs(NamedTuple):
  """One step's coefficients, per leaf (scalars inside the scan, ``[T]`` arrays outside)."""

  alpha: list  # learning rate
  gamma: list  # momentum n / 2**16
  decay: Optional[list]  # alpha * lambda on the 2**-31 grid, or None without weight decay


@dataclasses.dataclass(frozen=True)
class SGD(_reversible.Rule):
  """Momentum SGD in this library's convention, with optional decoupled weight decay."""

  weight_decay: bool = False

  slots = (VELOCITY,)
  linear_in_gradient = True
  fence_increments = False  # (1 - gamma) * g and alpha * v: one multiplication each

  @property
  def weight_decay_bits(self):
    return _schedules.DECAY_BITS if self.weight_decay else None

  def slot_increments(self, coefs, g):
    # (1 - gamma) is exact for gamma = n / 2**16; one float rounding, recomputed identically.
    return ([-((1 - c) * x.astype(c.dtype)) for c, x in zip(coefs.gamma, g)],)

  def weight_increment(self, coefs, slots):
    return [a * v for a, v in zip(coefs.alpha, slots[0])]

  def update(self, coefs, w, slots, g):
    v = [c * x - (1 - c) * y for x, y, c in zip(slots[0], g, coefs.gamma)]
    if self.weight_decay:
      w = [x - l * x for x, l in zip(w, coefs.decay)]
    return [x + a * y for x, y, a in zip(w, v, coefs.alpha)], (v,)


class SGDResult(NamedTuple):
  """What ``sgd`` returns."""

  params: Any  # final weights w_T, a pytree like params (differentiable)
  velocity: Any  # final velocity v_T, a pytree like params (differentiable)
  stats: Stats  # diagnostics (not differentiable)


def _problem(loss_fn, params, hparams, *, num_steps, learning_rate, momentum, velocity=None,
             weight_decay=0.0):
  num_steps = _training.check_num_steps(loss_fn, num_steps)
  leaves, treedef = _training.flatten_params(params)
  v_leaves = _training.flatten_like(velocity, leaves, treedef, "velocity")
  closed_loss, hparams = _training.close_loss(loss_fn, leaves, treedef, hparams)
  params = jax.tree_util.tree_unflatten(treedef, leaves)
  alphas = _schedules.broadcast(learning_rate, params, num_steps, "learning_rate")
  gammas = _schedules.broadcast(momentum, params, num_steps, "momentum")
  decays = _schedules.broadcast(weight_decay, params, num_steps, "weight_decay")
  _schedules.check_concrete(alphas, gammas)
  invalid = _schedules.runtime_invalid(alphas.arrays, gammas.arrays)
  momenta = _schedules.quantize_momentum(gammas)
  # The step computes in each leaf's compute dtype; n / 2**16 is exact in it.
  compute = _training.compute_dtypes(leaves)
  cast = lambda arrays: [x.astype(d) for x, d in zip(arrays, compute)]
  decay, weight_numerators, bad = _training.quantize_weight_decay(alphas, decays, compute)
  invalid |= bad
  rule = SGD(weight_decay=decay is not None)
  steps = _reversible.Steps(
      t=jnp.arange(num_steps, dtype=jnp.int32),
      coefs=SGDCoefs(alpha=cast(alphas.arrays), gamma=cast(momenta.values), decay=decay),
      numerators=(momenta.numerators,),
      weight_numerators=weight_numerators)
  return _training.Problem(rule, closed_loss, treedef, leaves, (v_leaves,), hparams, steps,
                           invalid, present=lambda slots: slots[0])


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
      ``Reversible(min_momentum=...)``).
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
  problem = _problem(loss_fn, params, hparams, num_steps=num_steps,
                     learning_rate=learning_rate, momentum=momentum, velocity=velocity,
                     weight_decay=weight_decay)
  params_out, (velocity_out,), stats = _training.train(method, problem)
  return SGDResult(params_out, velocity_out, stats)
