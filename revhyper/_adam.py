"""``revhyper.adam``: Adam and AdamW (optax's update rule) as a reversible rule.

Both moment decays are rational multiplies on the grid ``n / 2**31`` (bit-stack push/pop, as
for the momentum), the moments' increments ``(1 - b1) g`` and ``(1 - b2) g**2`` are exact
fixed-point additions, and the weights' increment, computed in floats from the new moments, is
an exact addition too; a weight decay is one more rational multiply, of the weights. The
engine (``_reversible``) and the methods (``_training``) are shared with ``sgd``.
"""

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from revhyper import _fixed_point
from revhyper import _reversible
from revhyper import _schedules
from revhyper import _training

Stats = _reversible.Stats

MU = _reversible.Slot("mu", _fixed_point.FIRST_MOMENT_BITS, _schedules.DECAY_BITS)
NU = _reversible.Slot("nu", _fixed_point.SECOND_MOMENT_BITS, _schedules.DECAY_BITS)


class AdamCoefs(NamedTuple):
  """One step's coefficients, per leaf (scalars inside the scan, ``[T]`` arrays outside)."""

  learning_rate: list
  decay1: list  # 1 - b1, on the 2**-31 grid
  decay2: list  # 1 - b2, on the 2**-31 grid
  correction1: list  # 1 - prod_{s <= t} b1_s (optax: 1 - b1**(t + 1))
  correction2: list  # 1 - prod_{s <= t} b2_s
  eps: list
  eps_root: list
  weight_decay: Optional[list]  # learning_rate * weight_decay on the 2**-31 grid, or None


@dataclasses.dataclass(frozen=True)
class Adam(_reversible.Rule):
  """Adam with bias correction, and AdamW's decoupled weight decay when ``weight_decay``."""

  weight_decay: bool = False

  slots = (MU, NU)
  linear_in_gradient = False  # g**2

  @property
  def weight_decay_bits(self):
    return _schedules.DECAY_BITS if self.weight_decay else None

  def slot_increments(self, coefs, g):
    g = [x.astype(c.dtype) for x, c in zip(g, coefs.decay1)]
    return ([c * x for c, x in zip(coefs.decay1, g)],
            [c * (x * x) for c, x in zip(coefs.decay2, g)])

  def weight_increment(self, coefs, slots):
    c = coefs
    return [-lr * (mu / c1) / (jnp.sqrt(nu / c2 + root) + eps) for lr, mu, nu, c1, c2, eps, root
            in zip(c.learning_rate, *slots, c.correction1, c.correction2, c.eps, c.eps_root)]

  def update(self, coefs, w, slots, g):
    mu = [(1 - c) * m + c * x for m, x, c in zip(slots[0], g, coefs.decay1)]
    nu = [(1 - c) * v + c * (x * x) for v, x, c in zip(slots[1], g, coefs.decay2)]
    if self.weight_decay:
      w = [x - l * x for x, l in zip(w, coefs.weight_decay)]
    return [x + y for x, y in zip(w, self.weight_increment(coefs, (mu, nu)))], (mu, nu)


class AdamResult(NamedTuple):
  """What ``adam`` returns."""

  params: Any  # final weights w_T, a pytree like params (differentiable)
  mu: Any  # final first moment, a pytree like params (differentiable)
  nu: Any  # final second moment, a pytree like params (differentiable)
  stats: Stats  # diagnostics (not differentiable)


def _check_finite(schedule, name, low=-np.inf):
  for value in schedule.values:
    if value is not None and not np.all(np.isfinite(value) & (value >= low)):
      bad = value[~(np.isfinite(value) & (value >= low))]
      rule = "finite" if low == -np.inf else f"finite and at least {low}"
      raise ValueError(f"{name} must be {rule}, got {bad[:5]}.")


def _bias_correction(amounts):
  """``1 - prod_{s <= t} (1 - c_s)``, accurately for ``c`` near 0 (``b`` near 1)."""
  return -jnp.expm1(jnp.cumsum(jnp.log1p(-amounts)))


def _problem(loss_fn, params, hparams, *, num_steps, learning_rate, b1=0.9, b2=0.999, eps=1e-8,
             eps_root=0.0, weight_decay=0.0, mu=None, nu=None):
  num_steps = _training.check_num_steps(loss_fn, num_steps)
  leaves, treedef = _training.flatten_params(params)
  mu_leaves = _training.flatten_like(mu, leaves, treedef, "mu")
  nu_leaves = _training.flatten_like(nu, leaves, treedef, "nu")
  for x in nu_leaves:
    known = _schedules.concrete_value(x)
    if known is not None and np.any(known < 0):
      raise ValueError(f"nu must be non-negative (a second moment), got {known[known < 0][:5]}.")
  closed_loss, hparams = _training.close_loss(loss_fn, leaves, treedef, hparams)
  params = jax.tree_util.tree_unflatten(treedef, leaves)
  schedule = lambda value, name: _schedules.broadcast(value, params, num_steps, name)
  lrs, b1s, b2s = schedule(learning_rate, "learning_rate"), schedule(b1, "b1"), schedule(b2, "b2")
  epss, roots = schedule(eps, "eps"), schedule(eps_root, "eps_root")
  decays = schedule(weight_decay, "weight_decay")
  _check_finite(lrs, "learning_rate")
  _schedules.check_range(b1s, "b1", 0, 1)
  _schedules.check_range(b2s, "b2", 0, 1)
  _check_finite(epss, "eps", 0)
  _check_finite(roots, "eps_root", 0)
  invalid = (_schedules.runtime_invalid(lrs.arrays, [])
             | _schedules.outside(b1s.arrays + b2s.arrays, 0, 1)
             | _schedules.outside(epss.arrays + roots.arrays, 0, np.finfo(np.float32).max))
  # The decays are quantized as amounts 1 - b, exact in floats for b in [1/2, 1].
  amounts1 = _schedules.quantize_decay(_schedules.combine(lambda b: 1 - b, b1s), "b1")
  amounts2 = _schedules.quantize_decay(_schedules.combine(lambda b: 1 - b, b2s), "b2")
  compute = _training.compute_dtypes(leaves)
  cast = lambda arrays: [x.astype(d) for x, d in zip(arrays, compute)]
  weight_amounts, weight_numerators, bad = _training.quantize_weight_decay(lrs, decays, compute)
  invalid |= bad
  rule = Adam(weight_decay=weight_amounts is not None)
  coefs = AdamCoefs(
      learning_rate=cast(lrs.arrays),
      decay1=cast(amounts1.amounts),
      decay2=cast(amounts2.amounts),
      correction1=cast([_bias_correction(c) for c in amounts1.amounts]),
      correction2=cast([_bias_correction(c) for c in amounts2.amounts]),
      eps=cast(epss.arrays),
      eps_root=cast(roots.arrays),
      weight_decay=weight_amounts)
  steps = _reversible.Steps(
      t=jnp.arange(num_steps, dtype=jnp.int32),
      coefs=coefs,
      numerators=(amounts1.numerators, amounts2.numerators),
      weight_numerators=weight_numerators)
  return _training.Problem(rule, closed_loss, treedef, leaves, (mu_leaves, nu_leaves), hparams,
                           steps, invalid, present=tuple)


_training.OPTIMIZERS["adam"] = _problem


def adam(loss_fn, params, hparams, *, num_steps, learning_rate, b1=0.9, b2=0.999, eps=1e-8,
         eps_root=0.0, weight_decay=0.0, mu=None, nu=None, method="reversible"):
  r"""Runs Adam (AdamW with ``weight_decay``) for ``num_steps`` steps, differentiably.

  optax's update (``optax.adamw``, ``optax.adam`` without weight decay), at step
  ``t = 0 .. num_steps - 1``::

      g_t      = grad_w loss_fn(w_t, hparams, t)
      mu_{t+1} = b1_t * mu_t + (1 - b1_t) * g_t
      nu_{t+1} = b2_t * nu_t + (1 - b2_t) * g_t**2
      u_t      = (mu_{t+1} / c1_t) / (sqrt(nu_{t+1} / c2_t + eps_root_t) + eps_t)
      w_{t+1}  = w_t - lr_t * (u_t + weight_decay_t * w_t)

  with the bias corrections ``c1_t = 1 - prod_{s <= t} b1_s`` (``1 - b1**(t + 1)`` for a
  constant ``b1``, optax's count from 1) and likewise ``c2_t``. Every coefficient takes a
  scalar, a ``[T]`` array, or a pytree like ``params`` with scalar or ``[T]`` leaves, and
  ``jax.grad`` of anything computed from the result gives gradients with respect to all of
  them, ``params``, ``mu``, ``nu`` and ``hparams``.

  Exactness (``method="reversible"``): ``b1``, ``b2`` and ``learning_rate * weight_decay`` are
  rounded, by every method alike, to the grid ``n / 2**31`` (``1 - b`` and ``lr * wd`` to
  multiples of 2**-31 = 4.7e-10: ``b2 = 0.999`` is kept to 1e-9 relative in ``1 - b2``, and
  ``lr * wd = 1e-5`` to 0.005%), with gradients passed straight through; a factor below 2**-8
  is clipped to it with a warning. The decays are reversed by the bit stack, which stores
  ``log2(1 / b1) + log2(1 / b2) + log2(1 / (1 - lr * wd))`` bits per weight per step (0.154
  for the defaults). The weights live on the 2**-48 grid (``|w| < 8192``), ``mu`` on 2**-56
  (``|mu| < 32``), ``nu`` on 2**-60 (``0 <= nu < 2``: squared gradients of order 1 or more need
  the loss scaled down); leaving a range is a failure like a diverging ``sgd`` run
  (``stats.fixed_point_overflow``). Each decay moves its state by at most 2**8 + 1 grid units
  beyond the exact product (2**-52 for nu), far below float32's rounding of the state.

  Transformations, precision and failures: as for ``sgd``. Through ``Reversible`` the
  backward pass recomputes each gradient and then takes a Hessian-vector product (the update
  is not linear in the gradient, so they are not shared): about 2.6 gradient evaluations per
  step. With ``eps_root = 0`` (optax's default), ``nu = 0`` for a weight whose gradient is
  always 0 makes every method's hypergradient NaN (the derivative of the square root at 0),
  as differentiating optax does; set ``eps_root`` to a tiny positive value (1e-8) when
  differentiating through such weights.

  Args:
    loss_fn: ``loss_fn(params, hparams, t) -> scalar`` training loss at step ``t``; the
      minibatch must be a pure function of ``t``.
    params: a pytree of float arrays, the initial weights ``w_0``.
    hparams: any pytree that ``loss_fn`` reads; integer leaves get no gradient.
    num_steps: the number of steps ``T`` (a static Python int, at least 1).
    learning_rate: ``lr``, finite.
    b1, b2: the moments' decays, in ``[0, 1]``.
    eps, eps_root: non-negative and finite.
    weight_decay: decoupled weight decay, with ``learning_rate * weight_decay`` in ``[0, 1]``;
      the default 0 adds nothing to the run.
    mu, nu: the initial moments, pytrees like ``params`` (``nu >= 0``); zeros by default. The
      bias correction counts from the first step of this call whatever they are, as optax's
      does from a fresh state.
    method: ``"reversible"``, ``"unroll"``, ``"checkpoint"``, or a configured
      ``Reversible(...)`` (``min_momentum`` bounds ``b1``, ``b2`` and
      ``1 - learning_rate * weight_decay`` from below when they are traced), ``Unroll()`` or
      ``Checkpoint(...)``.

  Returns:
    ``AdamResult(params, mu, nu, stats)``: final weights and moments, pytrees like ``params``,
    and ``Stats``.

  Raises:
    ValueError: bad arguments, naming the argument (non-float params, wrong schedule shape or
      structure, ``b1`` or ``b2`` outside [0, 1], a non-finite learning rate, negative ``eps``
      or ``nu``, ``learning_rate * weight_decay`` outside [0, 1], ``num_steps < 1``, traced
      decays without ``Reversible(min_momentum=...)``).
    ReversalError: as for ``sgd`` (eager calls); under ``jit``: NaN outputs.
    TypeError: forward-mode or higher-order differentiation through ``Reversible``.

  Example::

    >>> import jax, jax.numpy as jnp, revhyper
    >>> def loss_fn(w, l2, t):
    ...   return jnp.sum((w - 1.0) ** 2) + l2 * jnp.sum(w ** 2)
    >>> def meta(l2, log_lr):
    ...   out = revhyper.adam(loss_fn, jnp.zeros(3), l2, num_steps=20,
    ...                       learning_rate=jnp.exp(log_lr), weight_decay=1e-2)
    ...   return jnp.sum((out.params - 0.5) ** 2)
    >>> d_l2, d_log_lr = jax.grad(meta, argnums=(0, 1))(0.1, jnp.log(0.01))
  """
  problem = _problem(loss_fn, params, hparams, num_steps=num_steps,
                     learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                     weight_decay=weight_decay, mu=mu, nu=nu)
  params_out, (mu_out, nu_out), stats = _training.train(method, problem)
  return AdamResult(params_out, mu_out, nu_out, stats)
