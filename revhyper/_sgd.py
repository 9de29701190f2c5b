"""``revhyper.sgd``: momentum SGD whose whole training run is differentiable.

One function, three memory strategies that give the same gradients:

* ``Reversible()``: exact reversal (Maclaurin et al. 2015); memory O(weights + bits stored).
* ``Unroll()``: plain backprop through the float ``lax.scan``; memory O(steps x activations).
* ``Checkpoint(segment_length)``: the float scan, rematerialised in segments of
  ``segment_length`` steps (``sqrt(T)`` by default; 1 recomputes every step).
"""

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from revhyper import _bitstack
from revhyper import _errors
from revhyper import _reversible
from revhyper import _schedules

Stats = _reversible.Stats


@dataclasses.dataclass(frozen=True)
class Reversible:
  """Exact reversal: train on an integer grid, run training backwards in the backward pass.

  Attributes:
    min_momentum: a lower bound on every momentum, needed only when the momentum is traced
      (e.g. a meta-objective under ``jax.jit``), since the bit stack's size must be static:
      it holds about ``num_steps * log2(1 / min_momentum)`` bits per weight. With a concrete
      momentum the capacity comes from its values.
    share_gradient: take the recomputed gradient from the same forward-over-reverse pass that
      gives the Hessian-vector products, instead of computing it separately (about 1.6 instead
      of 2.6 gradient evaluations per backward step). ``None`` (default) chooses by backend:
      on the CPU sharing is bit-exact; on a GPU the shared pass was measured not to be (XLA
      compiles its primal part differently in the two loops), so it is off there.
    checks: raise ``ReversalError`` (also under ``jit``) on fixed-point or bit-stack overflow
      and invalid hyperparameters. Either way the flags are in ``result.stats``.
    check_reversal: in the backward pass, compare the rebuilt initial state with the original
      bit for bit and raise ``ReversalError`` if they differ (keeps a copy of the initial state).
      This checks the gradient path itself; use it once on a new problem or backend.
  """

  min_momentum: Optional[float] = None
  share_gradient: Optional[bool] = None
  checks: bool = True
  check_reversal: bool = False

  def __post_init__(self):
    if self.min_momentum is not None and not 0 <= self.min_momentum <= 1:
      raise ValueError(f"min_momentum must lie in [0, 1], got {self.min_momentum}.")


@dataclasses.dataclass(frozen=True)
class Unroll:
  """Store-all backprop through the float training scan: the reference method."""

  checks: bool = True


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """Backprop through the float scan, recomputing each segment of steps in the backward pass.

  Attributes:
    segment_length: steps per checkpointed segment; ``None`` gives ``ceil(sqrt(num_steps))``
      (memory O(sqrt(T))), 1 recomputes every step from its stored input (memory O(T)).
  """

  segment_length: Optional[int] = None
  checks: bool = True

  def __post_init__(self):
    if self.segment_length is not None and (
        not isinstance(self.segment_length, int) or self.segment_length < 1):
      raise ValueError(f"segment_length must be a positive int, got {self.segment_length!r}.")


_METHODS = {"reversible": Reversible, "unroll": Unroll, "checkpoint": Checkpoint}


class SGDResult(NamedTuple):
  """What ``sgd`` returns."""

  params: Any  # final weights w_T, a pytree like params (differentiable)
  velocity: Any  # final velocity v_T, a pytree like params (differentiable)
  stats: Stats  # diagnostics (not differentiable)


class RoundTrip(NamedTuple):
  """What ``round_trip`` returns."""

  params: Any  # final weights w_T
  velocity: Any  # final velocity v_T
  initial_params: Any  # w_0 rebuilt by running training backwards
  initial_velocity: Any  # v_0 rebuilt likewise
  exact: jax.Array  # bool []: rebuilt integer state equals w_0, v_0 and the stack is empty
  buffer_empty: jax.Array  # bool []
  stats: Stats


def _method(method):
  if isinstance(method, str):
    if method not in _METHODS:
      raise ValueError(f"method must be one of {sorted(_METHODS)} or a method object, "
                       f"got {method!r}.")
    return _METHODS[method]()
  if not isinstance(method, (Reversible, Unroll, Checkpoint)):
    raise ValueError(f"method must be one of {sorted(_METHODS)}, revhyper.Reversible(...), "
                     f"revhyper.Unroll() or revhyper.Checkpoint(...); got {method!r}.")
  return method


def _check_float_tree(tree, name):
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"{name}{jax.tree_util.keystr(path)} must be a float array, got dtype "
                       f"{dtype}.")


class _Problem(NamedTuple):
  """Validated, flattened inputs shared by every method."""

  loss_fn: Any  # loss_fn(param_leaves, hparams, t)
  treedef: Any
  params: list
  velocity: list
  hparams: Any
  steps: _reversible.Steps
  invalid: jax.Array
  momentum_values: list  # numpy [T] per leaf where known at trace time, else None


def _prepare(loss_fn, params, hparams, num_steps, learning_rate, momentum, velocity):
  if not callable(loss_fn):
    raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
    raise ValueError(f"num_steps must be a Python int (it is static), got {num_steps!r}.")
  if num_steps < 1:
    raise ValueError(f"num_steps must be at least 1, got {num_steps}.")
  num_steps = int(num_steps)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  if not leaves:
    raise ValueError("params must contain at least one array.")
  _check_float_tree(params, "params")
  if velocity is None:
    velocity = jax.tree_util.tree_map(jnp.zeros_like, params)
  velocity = jax.tree_util.tree_map(jnp.asarray, velocity)
  v_leaves, v_treedef = jax.tree_util.tree_flatten(velocity)
  if v_treedef != treedef:
    raise ValueError(f"velocity must have the structure of params ({treedef}), got {v_treedef}.")
  for p, v in zip(leaves, v_leaves):
    if jnp.shape(p) != jnp.shape(v) or jnp.result_type(p) != jnp.result_type(v):
      raise ValueError(f"velocity leaves must match params in shape and dtype: got "
                       f"{jnp.shape(v)} {jnp.result_type(v)} for {jnp.shape(p)} "
                       f"{jnp.result_type(p)}.")
  hparams = jax.tree_util.tree_map(jnp.asarray, hparams)

  def loss_on_leaves(w_leaves, h, t):
    return loss_fn(jax.tree_util.tree_unflatten(treedef, w_leaves), h, t)

  t0 = jnp.zeros((), jnp.int32)
  out = jax.eval_shape(loss_on_leaves, leaves, hparams, t0)
  if not (isinstance(out, jax.ShapeDtypeStruct) and out.shape == ()
          and jnp.issubdtype(out.dtype, jnp.floating)):
    raise ValueError(f"loss_fn(params, hparams, t) must return a float scalar, got {out}.")

  alphas = _schedules.broadcast(learning_rate, params, num_steps, "learning_rate")
  gammas = _schedules.broadcast(momentum, params, num_steps, "momentum")
  _schedules.check_concrete(alphas, gammas)
  invalid = _schedules.runtime_invalid(alphas.arrays, gammas.arrays)
  quantized = [_schedules.quantize_momentum(g) for g in gammas.arrays]
  steps = _reversible.Steps(jnp.arange(num_steps, dtype=jnp.int32), alphas.arrays, quantized)
  return _Problem(loss_on_leaves, treedef, leaves, v_leaves, hparams, steps, invalid,
                  gammas.values)


def _capacity_chunks(method, problem, layout):
  """Static size of the bit stack's tail, from concrete momenta or ``min_momentum``."""
  chunks = 0
  for size, value in zip(layout.sizes, problem.momentum_values):
    if value is None:
      if method.min_momentum is None:
        raise ValueError(
            "momentum is traced (e.g. a hyperparameter under jax.jit), so the size of the bit "
            "stack cannot be computed from its values. Pass a static lower bound: "
            "method=revhyper.Reversible(min_momentum=...).")
      n_min = max(1, round(method.min_momentum * _bitstack.DENOMINATOR))
      value = np.full(problem.steps.t.shape, n_min / _bitstack.DENOMINATOR)
    numerators = np.clip(np.round(value * _bitstack.DENOMINATOR), 1, _bitstack.DENOMINATOR)
    chunks += size * _bitstack.bucket(_bitstack.max_chunks_per_lane(numerators))
  return max(chunks, 1)  # a zero-size tail would make even the skipped gather ill-formed


def _reversible_config(method, problem):
  # Arrays that loss_fn closes over are hoisted into explicit inputs, so that they receive
  # gradients through the custom_vjp (which cannot see closed-over tracers).
  loss_fn, consts = jax.closure_convert(
      problem.loss_fn, problem.params, problem.hparams, problem.steps.t[0])
  hparams = (problem.hparams, tuple(consts))

  def loss_with_consts(w_leaves, h, t):
    return loss_fn(w_leaves, h[0], t, *h[1])

  layout = _reversible.Layout.of(problem.params)
  config = _reversible.Config(
      loss_fn=loss_with_consts,
      layout=layout,
      num_steps=int(problem.steps.t.shape[0]),
      capacity_chunks=_capacity_chunks(method, problem, layout),
      share_gradient=(jax.default_backend() == "cpu" if method.share_gradient is None
                      else method.share_gradient),
      checks=method.checks,
      check_reversal=method.check_reversal,
      user_x64=bool(jax.config.jax_enable_x64),
  )
  return config, hparams


def _float_scan(method, problem):
  """Momentum SGD in floats, differentiated by JAX (store-all or checkpointed)."""
  loss_grad = jax.grad(problem.loss_fn)

  def step(carry, s):
    w, v = carry
    t, alpha, gamma = s
    g = loss_grad(w, problem.hparams, t)
    v = _reversible.velocity_update(v, g, gamma)
    return (_reversible.position_update(w, v, alpha), v), None

  carry = (problem.params, problem.velocity)
  steps = tuple(problem.steps)
  num_steps = problem.steps.t.shape[0]
  if isinstance(method, Unroll):
    return jax.lax.scan(step, carry, steps)[0]
  k = method.segment_length or math.ceil(math.sqrt(num_steps))
  if k == 1:
    return jax.lax.scan(jax.checkpoint(step), carry, steps)[0]

  @jax.checkpoint
  def segment(carry, segment_steps):
    return jax.lax.scan(step, carry, segment_steps)[0], None

  whole = num_steps // k * k
  head = jax.tree_util.tree_map(lambda x: x[:whole].reshape((-1, k) + x.shape[1:]), steps)
  carry = jax.lax.scan(segment, carry, head)[0]
  if whole < num_steps:
    carry = segment(carry, jax.tree_util.tree_map(lambda x: x[whole:], steps))[0]
  return carry


def _float_stats(problem, params_out, velocity_out):
  zero = jnp.zeros((), jnp.float32)
  false = jnp.zeros((), jnp.bool_)
  return Stats(zero, zero, zero, zero, false, false, problem.invalid,
               _reversible.any_non_finite(params_out, velocity_out))


def sgd(loss_fn, params, hparams, *, num_steps, learning_rate, momentum, velocity=None,
        method="reversible"):
  r"""Runs momentum SGD for ``num_steps`` steps, differentiably in every input.

  The update, at step ``t = 0 .. num_steps - 1`` (the reference implementation's order)::

      g_t     = grad_w loss_fn(w_t, hparams, t)
      v_{t+1} = gamma_t * v_t - (1 - gamma_t) * g_t
      w_{t+1} = w_t + alpha_t * v_{t+1}

  ``jax.grad`` of any function of ``result.params`` or ``result.velocity`` gives gradients
  with respect to ``params``, ``velocity``, ``hparams``, ``learning_rate`` and ``momentum``.
  With the default ``method="reversible"`` the backward pass runs training backwards exactly
  instead of storing it (Maclaurin, Duvenaud & Adams, ICML 2015).

  Momenta are rounded to multiples of ``2**-16`` (the exact arithmetic needs a rational
  momentum), by every method alike; gradients pass straight through the rounding. A momentum
  below ``2**-17`` is clipped to ``2**-16`` with a warning.

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
    method: ``"reversible"``, ``"unroll"``, ``"checkpoint"``, or a configured
      ``Reversible(...)``, ``Unroll()`` or ``Checkpoint(...)``.

  Returns:
    ``SGDResult(params, velocity, stats)``: final weights and velocity, pytrees like
    ``params``, and ``Stats`` (bits stored, capacity, overflow flags).

  Raises:
    ValueError: bad arguments (non-float params, wrong schedule shape or structure, momentum
      outside [0, 1], non-finite learning rate, ``num_steps < 1``, traced momentum without
      ``Reversible(min_momentum=...)``).
    ReversalError: at run time (also under ``jit``), when the exact training leaves the
      fixed-point range (a diverging run) or overflows the bit stack.

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
  method = _method(method)
  problem = _prepare(loss_fn, params, hparams, num_steps, learning_rate, momentum, velocity)
  unflatten = lambda leaves: jax.tree_util.tree_unflatten(problem.treedef, leaves)
  if isinstance(method, Reversible):
    config, hparams_all = _reversible_config(method, problem)
    params_out, velocity_out, stats = _reversible.run(
        config, problem.params, problem.velocity, hparams_all, problem.steps, problem.invalid)
  else:
    params_out, velocity_out = _float_scan(method, problem)
    stats = _float_stats(problem, params_out, velocity_out)
    if method.checks:
      _errors.raise_if(problem.invalid, _reversible.INVALID_HYPERPARAMETERS)
  stats = jax.tree_util.tree_map(jax.lax.stop_gradient, stats)
  return SGDResult(unflatten(params_out), unflatten(velocity_out), stats)


def round_trip(loss_fn, params, hparams, *, num_steps, learning_rate, momentum, velocity=None,
               method="reversible"):
  """Trains exactly, then runs training backwards without gradients: a check of exactness.

  Takes the arguments of ``sgd``. Use it to verify on your own problem that the reverse pass
  rebuilds the initial state bit for bit (``result.exact``), e.g. after changing ``loss_fn``.

  Returns:
    ``RoundTrip``: final state, the rebuilt initial state, ``exact`` (a bool scalar array:
    integer weights and velocities equal the initial ones and the bit stack is empty) and the
    forward ``Stats``.

  Example::

    >>> import jax.numpy as jnp, revhyper
    >>> rt = revhyper.round_trip(lambda w, h, t: jnp.sum(w ** 4), jnp.ones(5), None,
    ...                          num_steps=50, learning_rate=0.01, momentum=0.9)
    >>> bool(rt.exact)
    True
  """
  method = _method(method)
  if not isinstance(method, Reversible):
    raise ValueError(f"round_trip needs a reversible method, got {method!r}.")
  problem = _prepare(loss_fn, params, hparams, num_steps, learning_rate, momentum, velocity)
  config, hparams_all = _reversible_config(method, problem)
  # Compiled as one program, so that a call outside jit does not dispatch op by op.
  params_out, velocity_out, stats, rebuilt = jax.jit(
      _reversible.train_and_reverse, static_argnums=0)(
          config, problem.params, problem.velocity, hparams_all, problem.steps, problem.invalid)
  unflatten = lambda leaves: jax.tree_util.tree_unflatten(problem.treedef, leaves)
  return RoundTrip(
      params=unflatten(params_out),
      velocity=unflatten(velocity_out),
      initial_params=unflatten(rebuilt.params),
      initial_velocity=unflatten(rebuilt.velocity),
      exact=rebuilt.exact,
      buffer_empty=rebuilt.buffer_empty,
      stats=stats,
  )
