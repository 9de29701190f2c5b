"""Exactly reversible momentum SGD as a ``jax.custom_vjp`` over ``lax.scan``.

Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter Optimization through Reversible
Learning", ICML 2015, Algorithms 1 and 2. The forward pass trains on an integer grid::

    g_t     = grad_w L(w_t, hparams, t)
    v_{t+1} = gamma_t * v_t - (1 - gamma_t) * g_t      # rational multiply (bit stack), exact add
    w_{t+1} = w_t + alpha_t * v_{t+1}                  # exact add

and keeps only ``(w_T, v_T)`` and the bit stack. The backward pass runs the same steps in
reverse, rebuilding every ``(w_t, v_t)`` bit for bit, and takes the cotangents of each step at
the rebuilt state from ``jax.vjp`` (and ``jax.linear_transpose``) of the float update and from
a forward-mode Hessian-vector product of the gradient: the paper's Algorithm 2 without
hand-derived formulas. Memory is O(weights + stored bits).

Bit-exactness needs the reverse to recompute each gradient ``g_t`` bit for bit. The gradient
subgraph is therefore fenced with ``lax.optimization_barrier`` on all its inputs and outputs,
so that XLA compiles it identically in both loops. With ``share_gradient`` the fenced subgraph
is the forward-over-reverse pass itself, whose primal output is ``g_t`` and whose tangents are
the Hessian-vector products, so the backward pass computes the gradient once per step.

Precision: the state lives on the 2**-48 grid whatever the leaves' dtype; the loss sees the
weights rounded to each leaf's dtype, and the increments are computed in the leaf's compute
dtype (at least float32), as the float methods do with their float32-or-wider state.

Only first-order reverse mode is supported: the backward pass reads the integer state, whose
derivative is zero, so differentiating it (``jax.hessian``, grad of grad) or the forward pass
(``jax.jvp``) would silently give wrong numbers. Both passes are guarded and raise instead.
"""

import dataclasses
import enum
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from revhyper import _bitstack
from revhyper import _errors
from revhyper import _fixed_point
from revhyper import _sharding


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static description of the parameter leaves: their shapes and dtypes."""

  treedef: Any
  shapes: tuple
  dtypes: tuple

  @classmethod
  def of(cls, params):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return cls(treedef, tuple(jnp.shape(x) for x in leaves),
               tuple(jnp.result_type(x) for x in leaves))

  @property
  def sizes(self):
    return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

  @property
  def num_lanes(self):
    return sum(self.sizes)


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything static about one reversible run (hashable: a custom_vjp nondiff argument)."""

  loss_fn: Callable  # loss_fn(param_leaves: list, hparams, t) -> scalar; closure-free, hashable.
  layout: Layout
  num_steps: int
  capacity_chunks: int
  share_gradient: bool
  checks: bool
  check_reversal: bool
  min_momentum: Any  # the bound the user gave for a traced momentum (for messages), or None
  # The caller's x64 setting: the loss runs under it, not under the scoped x64 that the
  # integer arithmetic needs, so that unannotated arrays in loss_fn keep the caller's dtypes.
  user_x64: bool
  # _sharding.Shards: the mesh and per-leaf specs the state is laid out by (one bit stack per
  # device, capacity_chunks per device), or None for one device.
  shards: Any = None


class State(NamedTuple):
  """The exact training state."""

  w: list  # int64 arrays shaped like the parameter leaves: weights on the 2**-48 grid.
  v: list  # int64 arrays likewise: velocities on the same grid.
  stack: _bitstack.BitStack  # one group of lanes per parameter leaf
  in_range: list  # bool arrays likewise, sticky: False once a weight left the exact range.


class Steps(NamedTuple):
  """Per-step inputs of the scans (leading axis: steps)."""

  t: jax.Array  # int32 [T]
  alpha: list  # one [T] float array per leaf, in the leaf's compute dtype
  gamma: list  # one [T] float array per leaf, in the leaf's compute dtype: n / 2**16
  numerator: list  # one int32 [T] array per leaf: n, the momentum's numerator in [1, 2**16]


def _barrier(tree):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return jax.tree_util.tree_unflatten(treedef, jax.lax.optimization_barrier(leaves))


def _differentiable(hparams):
  """Splits hparams into its inexact leaves (differentiated) and a function to merge them back."""
  leaves, treedef = jax.tree_util.tree_flatten(hparams)
  is_float = [jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in leaves]
  floats = [x for x, f in zip(leaves, is_float) if f]

  def merge(new_floats):
    it = iter(new_floats)
    return jax.tree_util.tree_unflatten(
        treedef, [next(it) if f else x for x, f in zip(leaves, is_float)])

  return floats, merge


class Gradient(enum.Enum):
  """How a step's gradient is computed; the forward and reverse loops must use the same form."""

  PLAIN = "plain"  # grad alone, unfenced: training that is never reversed.
  FENCED = "fenced"  # grad alone, between optimization barriers.
  LINEARIZED = "linearized"  # grad and its Hessian-vector product (jvp), between barriers.


def _gradient(config, w_leaves, hparams, t, form, tangent=None):
  """``g_t`` and, for ``LINEARIZED``, the Hessian-vector products with ``tangent``.

  The Hessian-vector products are the tangents of ``(grad_w L, grad_h L)`` along
  ``(tangent, 0)``: by symmetry of second derivatives they are the cotangents that the vjp of
  ``g_t`` sends to ``w_t`` and to the float hparams. Forward mode over reverse mode costs
  about 1.6 gradients here, against 2.6 for recomputing the gradient and then taking the vjp.

  ``FENCED`` and ``LINEARIZED`` put ``lax.optimization_barrier`` on the subgraph's inputs and
  all its outputs, so that XLA compiles it identically in the forward and the reverse loop, a
  condition of bit-exact reversal. The forward loop of ``LINEARIZED``
  passes an opaque zero tangent: it computes and discards the products, so that its program is
  the reverse loop's.

  Returns:
    ``(g, (hvp_w, hvp_h))``, the products ``None`` unless ``form`` is ``LINEARIZED``.
  """
  with jax.enable_x64(config.user_x64):
    if form is Gradient.PLAIN:
      return jax.grad(config.loss_fn)(w_leaves, hparams, t), None
    # Every input crosses the fence, the step index and the tangent too: otherwise XLA can
    # fuse what produces them (t is i in the forward loop, T - 1 - i in the reverse one; the
    # forward tangent is a known zero) into the gradient's kernels, compile or autotune them
    # differently in the two loops, and change the gradient's last bits. On a GPU it did.
    if form is Gradient.FENCED:
      w_leaves, hparams, t = _barrier((w_leaves, hparams, t))
      return _barrier(jax.grad(config.loss_fn)(w_leaves, hparams, t)), None
    if tangent is None:
      tangent = [jnp.zeros_like(x) for x in w_leaves]
    w_leaves, hparams, t, tangent = _barrier((w_leaves, hparams, t, tangent))
    h_floats, merge = _differentiable(hparams)
    gradients = jax.grad(lambda w, h: config.loss_fn(w, merge(h), t), argnums=(0, 1))
    (g, _), products = jax.jvp(lambda w: gradients(w, h_floats), (w_leaves,), (tangent,))
    return _barrier((g, products))


def _hessian_vector(config, w_leaves, hparams, t, tangent):
  """The Hessian-vector products of ``_gradient``, without its fence (share_gradient=False)."""
  with jax.enable_x64(config.user_x64):
    h_floats, merge = _differentiable(hparams)
    gradients = jax.grad(lambda w, h: config.loss_fn(w, merge(h), t), argnums=(0, 1))
    return jax.jvp(lambda w: gradients(w, h_floats), (w_leaves,), (tangent,))[1]


def _velocity_increment(gamma, g):
  # (1 - gamma) is exact for gamma = n / 2**16; one float rounding, recomputed identically.
  return [(1 - c) * x.astype(_fixed_point.compute_dtype(x.dtype)) for c, x in zip(gamma, g)]


def _weight_increment(alpha, v_leaves):
  return [a * x.astype(_fixed_point.compute_dtype(x.dtype)) for a, x in zip(alpha, v_leaves)]


def _numerators(numerator):
  """The step's numerators as uint64 scalars, one per leaf, and their minimum (float64)."""
  return ([n.astype(jnp.uint64) for n in numerator],
          jnp.min(jnp.stack(numerator)).astype(jnp.float64))


def _float_leaves(config, x):
  """The grid values in each leaf's own dtype: what the loss sees."""
  return [_fixed_point.to_float(x, dtype) for x, dtype in zip(x, config.layout.dtypes)]


def _compute_leaves(config, x):
  """The grid values in each leaf's compute dtype: what the updates are computed from."""
  return [_fixed_point.to_float(x, _fixed_point.compute_dtype(dtype))
          for x, dtype in zip(x, config.layout.dtypes)]


def _add(x, increments):
  """``_fixed_point.add`` leaf by leaf; returns ``(ints, in_range masks)``."""
  pairs = [_fixed_point.add(a, b) for a, b in zip(x, increments)]
  return [a for a, _ in pairs], [ok for _, ok in pairs]


def _subtract(x, increments):
  pairs = [_fixed_point.subtract(a, b) for a, b in zip(x, increments)]
  return [a for a, _ in pairs], [ok for _, ok in pairs]


def _and(*masks):
  return [functools.reduce(jnp.logical_and, group) for group in zip(*masks)]


def _forward_step(config, hparams, form, state, step):
  t, alpha, gamma, numerator = step
  w_leaves = _float_leaves(config, state.w)
  g, _ = _gradient(config, w_leaves, hparams, t, form)
  stack, v = _bitstack.multiply(state.stack, state.v, *_numerators(numerator), config.shards)
  v, v_ok = _subtract(v, _velocity_increment(gamma, g))
  v_leaves = _compute_leaves(config, v)
  w, w_ok = _add(state.w, _weight_increment(alpha, v_leaves))
  # The states entering the two additions are in range and so are the increments: no sum
  # wrapped. (The multiply only shrinks |v|.) The final state is checked after the loop.
  states_ok = [_fixed_point.in_range(x) & _fixed_point.in_range(y)
               for x, y in zip(w_leaves, v_leaves)]
  return State(w, v, stack, _and(state.in_range, v_ok, w_ok, states_ok))


def _undo_position(config, state, alpha):
  """Undoes ``w_{t+1} = w_t + alpha_t * v_{t+1}``; returns ``(w_t int, w_t, v_{t+1})``.

  ``w_t`` comes in the leaves' dtypes (the loss's input), ``v_{t+1}`` in the compute dtypes.
  """
  v_next = _compute_leaves(config, state.v)
  w, _ = _subtract(state.w, _weight_increment(alpha, v_next))
  return w, _float_leaves(config, w), v_next


def _undo_velocity(config, state, w, g, gamma, numerator):
  """Undoes ``v_{t+1} = gamma_t * v_t - (1 - gamma_t) * g_t`` given the recomputed ``g_t``."""
  v, _ = _add(state.v, _velocity_increment(gamma, g))
  stack, v = _bitstack.divide(state.stack, v, *_numerators(numerator), config.shards)
  return State(w, v, stack, state.in_range)


def _reverse_step(config, hparams, form, state, step):
  """Undoes ``_forward_step`` exactly."""
  t, alpha, gamma, numerator = step
  w, w_leaves, _ = _undo_position(config, state, alpha)
  g, _ = _gradient(config, w_leaves, hparams, t, form)
  return _undo_velocity(config, state, w, g, gamma, numerator)


def position_update(w, v_next, alpha):
  """``w_{t+1} = w_t + alpha_t * v_{t+1}``, per leaf."""
  return [x + a * y for x, y, a in zip(w, v_next, alpha)]


def velocity_update(v, g, gamma):
  """``v_{t+1} = gamma_t * v_t - (1 - gamma_t) * g_t``, per leaf."""
  return [c * x - (1 - c) * y for x, y, c in zip(v, g, gamma)]


def _initial_state(config, params, velocity):
  w_parts = [_fixed_point.to_fixed(x) for x in params]
  v_parts = [_fixed_point.to_fixed(x) for x in velocity]
  return State(
      w=_sharding.constrain([x for x, _ in w_parts], config.shards),
      v=_sharding.constrain([x for x, _ in v_parts], config.shards),
      stack=_bitstack.empty(config.layout.shapes, config.capacity_chunks, config.shards),
      in_range=[a & b for (_, a), (_, b) in zip(w_parts, v_parts)],
  )


class Stats(NamedTuple):
  """Diagnostics of one training run (not differentiable).

  Under ``jax.vmap`` every field has the batch axis: each element reports its own run.
  """

  bits_stored: jax.Array  # float32 [], information held in the bit stack after training.
  information_bound_bits: jax.Array  # float32 [], sum over weights and steps of log2(d / n_t).
  capacity_bits: jax.Array  # float32 [], what the preallocated stack can hold.
  bits_per_weight_per_step: jax.Array  # float32 [], bits_stored / (weights * steps).
  fixed_point_overflow: jax.Array  # bool [], a value left the exact range |x| < 2**13.
  buffer_overflow: jax.Array  # bool [], the bit stack ran out of capacity.
  invalid_hyperparameters: jax.Array  # bool [], non-finite learning rate or momentum not in [0, 1].
  non_finite: jax.Array  # bool [], final weights or velocities not finite.

  @property
  def failed(self):
    """bool: the run cannot be trusted (overflow of the grid or the stack, bad hyperparameters
    or non-finite results); with checks on (the default) its outputs are then NaN."""
    return (self.fixed_point_overflow | self.buffer_overflow | self.invalid_hyperparameters
            | self.non_finite)

  def raise_if_failed(self):
    """Raises ``ReversalError`` naming the failures recorded here; call it outside ``jit``.

    For statistics returned from a jitted function (or batched by ``vmap``: then it raises if
    any element failed, and names the failed elements).
    """
    failed = np.asarray(_errors.concrete_or_raise(self.failed, "Stats.raise_if_failed"))
    if not failed.any():
      return
    where = "" if failed.ndim == 0 else f" (batch elements {np.flatnonzero(failed).tolist()})"
    reasons = [message for flag, message in failure_messages(self, min_momentum=...)
               if np.any(np.asarray(flag))]
    raise _errors.ReversalError(f"training run failed{where}: " + " ".join(reasons))


def any_non_finite(*trees):
  """A bool scalar: some leaf of the trees holds a NaN or an infinity."""
  bad = jnp.zeros((), jnp.bool_)
  for x in jax.tree_util.tree_leaves(trees):
    bad |= jnp.logical_not(jnp.all(jnp.isfinite(x)))
  return bad


INVALID_HYPERPARAMETERS = (
    "invalid hyperparameters: a learning rate is not finite or a momentum is outside [0, 1].")
NON_FINITE = (
    "non-finite training: the final weights or velocities are NaN or infinite; the training run "
    "diverged, e.g. from too large a learning rate.")


def _stats(config, state, numerator, invalid, params_out, velocity_out):
  layout = config.layout
  bound = jnp.zeros((), jnp.float64)
  sizes = _sharding.held_sizes(layout.shapes, config.shards)  # replicated lanes: every copy
  for size, n in zip(sizes, numerator):
    # Momentum 1 (n = d) stores exactly nothing, whatever the rounding of a fused log2.
    bits = jnp.where(n == _bitstack.DENOMINATOR, 0.0,
                     _bitstack.DENOMINATOR_BITS - jnp.log2(n.astype(jnp.float64)))
    bound += size * jnp.sum(bits)
  stored = _bitstack.stored_bits(state.stack, config.shards)
  lanes_steps = max(sum(sizes) * config.num_steps, 1)
  capacity = _bitstack.CHUNK_BITS * (state.stack.tail.size + sum(sizes))
  return Stats(
      bits_stored=stored.astype(jnp.float32),
      information_bound_bits=bound.astype(jnp.float32),
      capacity_bits=jnp.asarray(capacity, jnp.float32),
      bits_per_weight_per_step=(stored / lanes_steps).astype(jnp.float32),
      fixed_point_overflow=jnp.logical_not(_all_equal(state.in_range, [True] * len(state.w))),
      buffer_overflow=jnp.any(state.stack.overflow),
      invalid_hyperparameters=invalid,
      non_finite=any_non_finite(params_out, velocity_out),
  )


def failure_messages(stats, min_momentum=None):
  """``(flag, message)`` for every kind of failure that ``stats`` records, most specific first."""
  if min_momentum is ...:  # not known where the statistics are read
    stack_hint = ("a momentum fell below the min_momentum given to revhyper.Reversible for a "
                  "traced momentum; lower min_momentum")
  elif min_momentum is None:
    # The capacity was computed from the momenta themselves, with a proven bound.
    stack_hint = ("the capacity computed from the momentum schedule was too small, which "
                  "should not happen; please report it")
  else:
    stack_hint = (f"a momentum fell below the min_momentum={min_momentum} given to "
                  "revhyper.Reversible; lower min_momentum")
  return [
      (stats.invalid_hyperparameters, INVALID_HYPERPARAMETERS),
      (stats.fixed_point_overflow,
       "fixed-point overflow: a weight, velocity or update left the exact range "
       f"|x| < {_fixed_point.MAX_ABS_VALUE:g} (or was not finite); the training run diverged, "
       "e.g. from too large a learning rate. Exact reversal is impossible."),
      (stats.buffer_overflow, f"bit-stack overflow: the information buffer ran out of "
       f"capacity: {stack_hint}."),
      (stats.non_finite, NON_FINITE),
  ]


def check(stats, checks, min_momentum=None):
  """Raises ``ReversalError`` for a failed run whose stats are concrete (eager calls).

  Returns the bool scalar to poison the outputs with: ``stats.failed`` where the checks are
  on and the values are traced, else False.
  """
  if not checks:
    return jnp.zeros((), jnp.bool_)
  concrete = True
  for flag, message in failure_messages(stats, min_momentum):
    concrete &= _errors.raise_if(flag, message)
  return jnp.zeros((), jnp.bool_) if concrete else stats.failed


def _reversal_form(config):
  return Gradient.LINEARIZED if config.share_gradient else Gradient.FENCED


@jax.custom_jvp
def _first_order_only(tree):
  """The identity, whose derivative raises: marks code that must not be differentiated."""
  return tree


@_first_order_only.defjvp
def _first_order_only_jvp(primals, tangents):
  raise TypeError(HIGHER_ORDER)


HIGHER_ORDER = (
    "revhyper: the reversible method supports first-order reverse mode (jax.grad, jax.vjp, "
    "jax.jacrev) only. Its backward pass runs on the integer training state, whose derivative "
    "is zero, so forward mode (jax.jvp, jax.jacfwd) and higher-order derivatives (jax.hessian, "
    "grad of grad, Hessian-vector products) of it would be wrong. Use method='unroll' or "
    "method='checkpoint' (revhyper.Checkpoint(...)) for these; they give exact higher-order "
    "derivatives of the same dynamics.")


def _guard(tree):
  """``_first_order_only`` on the float leaves of ``tree`` (others have no tangent)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  floats = [i for i, x in enumerate(leaves) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  guarded = _first_order_only([leaves[i] for i in floats])
  for i, x in zip(floats, guarded):
    leaves[i] = x
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _forward(config, params, velocity, hparams, steps, invalid, form):
  with jax.enable_x64(True):
    state = _initial_state(config, params, velocity)
    step_fn = lambda s, x: (_forward_step(config, hparams, form, s, x), None)
    state, _ = jax.lax.scan(step_fn, state, tuple(steps))
    params_out = _float_leaves(config, state.w)
    velocity_out = _float_leaves(config, state.v)
    final_ok = [_fixed_point.in_range(x) & _fixed_point.in_range(y)
                for x, y in zip(params_out, velocity_out)]
    state = state._replace(in_range=_and(state.in_range, final_ok))
    stats = _stats(config, state, steps.numerator, invalid, params_out, velocity_out)
  failed = check(stats, config.checks, config.min_momentum)
  params_out, velocity_out = _errors.poison(failed, (params_out, velocity_out))
  return params_out, velocity_out, stats, state, failed


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _run(config, params, velocity, hparams, steps, invalid):
  # Not differentiated, so never reversed: the cheapest gradient form.
  params_out, velocity_out, stats, _, _ = _forward(
      config, params, velocity, hparams, steps, invalid, Gradient.PLAIN)
  return params_out, velocity_out, stats


def _run_fwd(config, params, velocity, hparams, steps, invalid):
  params, velocity, hparams, steps = _guard((params, velocity, hparams, steps))
  params_out, velocity_out, stats, state, failed = _forward(
      config, params, velocity, hparams, steps, invalid, _reversal_form(config))
  initial = (params, velocity) if config.check_reversal else None
  return (params_out, velocity_out, stats), (state, hparams, steps, initial, failed)


def _zero_cotangent(x):
  dtype = jnp.result_type(x)
  if jnp.issubdtype(dtype, jnp.inexact):
    return jnp.zeros(jnp.shape(x), dtype)
  return np.zeros(jnp.shape(x), jax.dtypes.float0)


def _run_bwd(config, residuals, cotangents):
  """Algorithm 2 of the paper: undo each step exactly, then pull its cotangents back."""
  residuals, cotangents = _guard((residuals, cotangents))
  state, hparams, steps, initial, failed = residuals
  dparams, dvelocity, _ = cotangents
  h_floats, merge = _differentiable(hparams)
  form = _reversal_form(config)
  compute_dtypes = [_fixed_point.compute_dtype(d) for d in config.layout.dtypes]

  def body(carry, step):
    state, dw, dv, dh = carry
    t, alpha, gamma, numerator = step
    w, w_leaves, v_next = _undo_position(config, state, alpha)
    w_compute = [x.astype(d) for x, d in zip(w_leaves, compute_dtypes)]
    _, position_pullback = jax.vjp(position_update, w_compute, v_next, alpha)
    dw, dv_from_w, dalpha = position_pullback(dw)
    dv = [a + b for a, b in zip(dv, dv_from_w)]
    # The velocity update is linear in (v_t, g_t): its transpose needs neither, so the
    # cotangent of g_t is known before g_t is recomputed, and one forward-over-reverse pass
    # yields g_t (to rebuild v_t) together with its Hessian-vector products.
    velocity_transpose = jax.linear_transpose(
        lambda v, g: velocity_update(v, g, gamma), w_compute, w_compute)
    dv_prev, dg = velocity_transpose(dv)
    dg = [x.astype(y.dtype) for x, y in zip(dg, w_leaves)]  # g_t has the leaves' dtypes
    if form is Gradient.LINEARIZED:
      g, (hvp_w, hvp_h) = _gradient(config, w_leaves, hparams, t, form, tangent=dg)
    else:
      g, _ = _gradient(config, w_leaves, hparams, t, form)
      hvp_w, hvp_h = _hessian_vector(config, w_leaves, hparams, t, dg)
    state = _undo_velocity(config, state, w, g, gamma, numerator)
    v_leaves = _compute_leaves(config, state.v)
    g_compute = [x.astype(d) for x, d in zip(g, compute_dtypes)]
    _, gamma_pullback = jax.vjp(lambda c: velocity_update(v_leaves, g_compute, c), gamma)
    (dgamma,) = gamma_pullback(dv)
    dw = [a + b.astype(a.dtype) for a, b in zip(dw, hvp_w)]
    dh = [a + b.astype(a.dtype) for a, b in zip(dh, hvp_h)]
    return (state, dw, dv_prev, dh), ([jnp.sum(x) for x in dalpha], [jnp.sum(x) for x in dgamma])

  dh = [jnp.zeros_like(x) for x in h_floats]
  # The cotangents are carried in the compute dtypes, like the state they belong to.
  # Laid out like the weights: a cotangent that is a symbolic zero would otherwise be replicated.
  dparams = _sharding.constrain([x.astype(d) for x, d in zip(dparams, compute_dtypes)],
                                config.shards)
  dvelocity = _sharding.constrain([x.astype(d) for x, d in zip(dvelocity, compute_dtypes)],
                                  config.shards)
  with jax.enable_x64(True):
    state = state._replace(stack=_bitstack.for_popping(state.stack, config.shards))
    carry = (state, dparams, dvelocity, dh)
    (state, dw, dv, dh), (dalpha, dgamma) = jax.lax.scan(body, carry, tuple(steps),
                                                          reverse=True)
  if config.check_reversal:
    failed |= _check_reconstruction(config, state, initial)
  dw = [x.astype(d) for x, d in zip(dw, config.layout.dtypes)]
  dv = [x.astype(d) for x, d in zip(dv, config.layout.dtypes)]
  dh_floats = iter(dh)
  dhparams = jax.tree_util.tree_map(
      lambda x: next(dh_floats) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
      else _zero_cotangent(x), hparams)
  dsteps = type(steps)(np.zeros(steps.t.shape, jax.dtypes.float0), dalpha, dgamma,
                       [np.zeros(n.shape, jax.dtypes.float0) for n in steps.numerator])
  # A failed run has no trustworthy gradient: NaN rather than a wrong number.
  return _errors.poison(failed, (dw, dv, dhparams, dsteps, np.zeros((), jax.dtypes.float0)))


def _all_equal(xs, ys):
  """A bool scalar: the two lists of arrays are equal element for element."""
  return functools.reduce(jnp.logical_and, [jnp.all(x == y) for x, y in zip(xs, ys)],
                          jnp.ones((), jnp.bool_))


REVERSAL_CHECK_FAILED = (
    "reversal check failed: the reverse pass did not rebuild the initial weights, velocity and "
    "an empty bit stack bit for bit. A gradient was not recomputed identically (a "
    "non-deterministic loss_fn or compiler); please report this with your loss_fn.")


def _check_reconstruction(config, state, initial):
  """Raises if the rebuilt state is concrete and wrong; returns the flag to poison with."""
  with jax.enable_x64(True):
    reference = _initial_state(config, *initial)
    exact = (_all_equal(state.w, reference.w) & _all_equal(state.v, reference.v)
             & _bitstack.is_empty(state.stack, config.shards))
  mismatch = jnp.logical_not(exact)
  if _errors.raise_if(mismatch, REVERSAL_CHECK_FAILED):
    return jnp.zeros((), jnp.bool_)
  return mismatch


_run.defvjp(_run_fwd, _run_bwd)


def run(config, params, velocity, hparams, steps, invalid):
  """Trains exactly; differentiable in params, velocity, hparams and the schedules."""
  try:
    return _run(config, params, velocity, hparams, steps, invalid)
  except TypeError as e:
    # JAX's own message for jvp of a custom_vjp says what, not what to do instead.
    if "custom_vjp" in str(e) and "jvp" in str(e):
      raise TypeError(HIGHER_ORDER) from e
    raise


class Reconstruction(NamedTuple):
  params: list  # the reconstructed initial weights, leaves as floats
  velocity: list  # the reconstructed initial velocity
  exact: jax.Array  # bool []: integer states equal the initial ones and the stack is empty
  buffer_empty: jax.Array  # bool []


def train_and_reverse(config, params, velocity, hparams, steps, invalid):
  """Trains forward, then runs the exact reversal with no gradients.

  Both loops use the gradient form of the differentiated path, so this checks what
  ``jax.grad`` relies on. The forward outputs are returned as computed (no NaN), so that the
  caller can raise with the statistics.
  """
  form = _reversal_form(config)
  unchecked = dataclasses.replace(config, checks=False)
  params_out, velocity_out, stats, state, _ = _forward(
      unchecked, params, velocity, hparams, steps, invalid, form)

  def body(state, step):
    return _reverse_step(config, hparams, form, state, step), None

  with jax.enable_x64(True):
    initial = _initial_state(config, params, velocity)
    state = state._replace(stack=_bitstack.for_popping(state.stack, config.shards))
    rebuilt, _ = jax.lax.scan(body, state, tuple(steps), reverse=True)
    empty = _bitstack.is_empty(rebuilt.stack, config.shards)
    exact = _all_equal(rebuilt.w, initial.w) & _all_equal(rebuilt.v, initial.v) & empty
    reconstruction = Reconstruction(
        params=_float_leaves(config, rebuilt.w),
        velocity=_float_leaves(config, rebuilt.v),
        exact=exact,
        buffer_empty=empty,
    )
  return params_out, velocity_out, stats, reconstruction
