"""``revhyper.adam``: Adam and AdamW (optax's update rule): ``revhyper.optim.adam``/``adamw``
run by the shared engine, behind the signature it has had since its first release.

Both moment decays are rational multiplies on the grid ``n / 2**31`` (bit-stack push/pop, as
for the momentum), the moments' increments ``(1 - b1) g`` and ``(1 - b2) g**2`` are exact
fixed-point additions, and the weights' increment, computed in floats from the new moments, is
an exact addition too; a weight decay is one more rational multiply, of the weights.
"""

from typing import Any, NamedTuple

from revhyper import _optim
from revhyper import _reversible
from revhyper import _training

Stats = _reversible.Stats


class AdamResult(NamedTuple):
  """What ``adam`` returns."""

  params: Any  # final weights w_T, a pytree like params (differentiable)
  mu: Any  # final first moment, a pytree like params (differentiable)
  nu: Any  # final second moment, a pytree like params (differentiable)
  stats: Stats  # diagnostics (not differentiable)


def _problem(loss_fn, params, hparams, *, num_steps, learning_rate, b1=0.9, b2=0.999, eps=1e-8,
             eps_root=0.0, weight_decay=0.0, mu=None, nu=None, precision="highest"):
  optimizer = _optim.adamw(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                           weight_decay=weight_decay)
  states = {name: x for name, x in (("mu", mu), ("nu", nu)) if x is not None}
  problem = _training.optimizer_problem(loss_fn, params, hparams, optimizer,
                                        num_steps=num_steps, opt_state=states,
                                        state_label=lambda name: name, precision=precision)
  return problem._replace(present=tuple)


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
      ``Reversible(...)`` (``min_decay`` bounds ``b1``, ``b2`` and
      ``1 - learning_rate * weight_decay`` from below when they are traced), ``Unroll()`` or
      ``Checkpoint(...)``.

  Returns:
    ``AdamResult(params, mu, nu, stats)``: final weights and moments, pytrees like ``params``,
    and ``Stats``.

  Raises:
    ValueError: bad arguments, naming the argument (non-float params, wrong schedule shape or
      structure, ``b1`` or ``b2`` outside [0, 1], a non-finite learning rate, negative ``eps``
      or ``nu``, ``learning_rate * weight_decay`` outside [0, 1], ``num_steps < 1``, traced
      decays without ``Reversible(min_decay=...)``).
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
  method = _training.resolve_method(method)
  problem = _problem(loss_fn, params, hparams, num_steps=num_steps, precision=method.precision,
                     learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                     weight_decay=weight_decay, mu=mu, nu=nu)
  params_out, (mu_out, nu_out), _, stats = _training.run(method, problem)
  return AdamResult(params_out, mu_out, nu_out, stats)
