"""Exactly reversible momentum SGD as a ``jax.custom_vjp`` over ``lax.scan``.

Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter Optimization through Reversible
Learning", ICML 2015, Algorithms 1 and 2. The forward pass trains on an integer grid::

    g_t     = grad_w L(w_t, hparams, t)
    v_{t+1} = gamma_t * v_t - (1 - gamma_t) * g_t      # rational multiply (bit stack), exact add
    w_{t+1} = w_t + alpha_t * v_{t+1}                  # exact add

and keeps only ``(w_T, v_T)`` and the bit stack. The backward pass runs the same steps in
reverse, rebuilding every ``(w_t, v_t)`` bit for bit, and takes the cotangents of each step from
``jax.vjp`` of the float step evaluated at the rebuilt state: the paper's Algorithm 2, Hessian-
vector products included, without hand-derived formulas. Memory is O(weights + stored bits).

Bit-exactness needs the reverse to recompute each gradient ``g_t`` bit for bit. The gradient
subgraph is therefore fenced with ``lax.optimization_barrier`` on its inputs and outputs, so
that XLA compiles it identically in both loops. With ``share_gradient=True`` that subgraph is
the linearisation of the gradient (``jax.vjp``), whose residuals the backward pass reuses for the
Hessian-vector product instead of computing the gradient a second time.
"""

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from revhyper import _bitstack
from revhyper import _errors
from revhyper import _fixed_point


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static description of the parameter pytree, flattened into one vector of lanes."""

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

  def split(self, flat):
    """Static slices of a flat vector, reshaped like the parameter leaves."""
    out, start = [], 0
    for size, shape in zip(self.sizes, self.shapes):
      out.append(flat[start:start + size].reshape(shape))
      start += size
    return out

  def concat(self, leaves):
    return jnp.concatenate([jnp.ravel(x) for x in leaves]) if leaves else jnp.zeros((0,))

  def per_lane(self, leaf_values, dtype):
    """Broadcasts one scalar per leaf to every lane of that leaf."""
    return jnp.concatenate(
        [jnp.full((size,), value, dtype) for size, value in zip(self.sizes, leaf_values)])


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything static about one reversible run (hashable: a custom_vjp nondiff argument)."""

  loss_fn: Callable  # loss_fn(param_leaves: list, hparams, t) -> scalar; closure-free.
  layout: Layout
  num_steps: int
  capacity_chunks: int
  share_gradient: bool
  checks: bool
  check_reversal: bool
  # The caller's x64 setting: the loss runs under it, not under the scoped x64 that the
  # integer arithmetic needs, so that unannotated arrays in loss_fn keep the caller's dtypes.
  user_x64: bool


class State(NamedTuple):
  """The exact training state."""

  w: jax.Array  # int64 [num_lanes], weights on the 2**-48 grid.
  v: jax.Array  # int64 [num_lanes], velocities on the same grid.
  stack: _bitstack.BitStack
  fixed_point_overflow: jax.Array  # bool [], sticky.


class Steps(NamedTuple):
  """Per-step inputs of the scans (leading axis: steps)."""

  t: jax.Array  # int32 [T]
  alpha: list  # one [T] float array per leaf
  gamma: list  # one [T] float array per leaf, values n / 2**16


def _barrier(tree):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return jax.tree_util.tree_unflatten(treedef, jax.lax.optimization_barrier(leaves))


def _gradient(config, w_leaves, hparams, t):
  """``(g_t, vjp of g_t)``, fenced so that both loops compile it identically.

  With ``share_gradient`` the linearisation is computed once and its residuals feed the
  Hessian-vector product; otherwise the returned pullback recomputes the gradient.
  """
  w_leaves, hparams = _barrier((w_leaves, hparams))

  def gradient_fn(w, h):
    return jax.grad(config.loss_fn)(w, h, t)

  def user_dtypes(fn):
    def wrapped(*args):
      with jax.enable_x64(config.user_x64):
        return fn(*args)
    return wrapped

  if config.share_gradient:
    g, pullback = user_dtypes(jax.vjp)(gradient_fn, w_leaves, hparams)
    g, pullback = _barrier((g, pullback))
    return g, user_dtypes(pullback)
  g = _barrier(user_dtypes(gradient_fn)(w_leaves, hparams))
  return g, user_dtypes(lambda dg: jax.vjp(gradient_fn, w_leaves, hparams)[1](dg))


def _velocity_increment(gamma, g):
  # (1 - gamma) is exact for gamma = n / 2**16; one float rounding, recomputed identically.
  return [(1 - c) * x.astype(_fixed_point.compute_dtype(x.dtype)) for c, x in zip(gamma, g)]


def _weight_increment(alpha, v_leaves):
  return [a * x.astype(_fixed_point.compute_dtype(x.dtype)) for a, x in zip(alpha, v_leaves)]


def _numerators(config, gamma):
  n = [jnp.round(c.astype(jnp.float64) * _bitstack.DENOMINATOR) for c in gamma]
  return config.layout.per_lane(n, jnp.uint64)


def _float_leaves(config, x):
  return [_fixed_point.to_float(x, dtype)
          for x, dtype in zip(config.layout.split(x), config.layout.dtypes)]


def _forward_step(config, hparams, state, step):
  t, alpha, gamma = step
  layout = config.layout
  w_leaves = _float_leaves(config, state.w)
  g, _ = _gradient(config, w_leaves, hparams, t)
  stack, v = _bitstack.multiply(state.stack, state.v, _numerators(config, gamma))
  v, overflow_v = _fixed_point.subtract(v, layout.concat(_velocity_increment(gamma, g)))
  v_leaves = _float_leaves(config, v)
  w, overflow_w = _fixed_point.add(state.w, layout.concat(_weight_increment(alpha, v_leaves)))
  overflow = state.fixed_point_overflow | overflow_v | overflow_w
  return State(w, v, stack, overflow)


def _reverse_step(config, hparams, state, step):
  """Undoes ``_forward_step`` exactly; also returns the float step's inputs and pullback."""
  t, alpha, gamma = step
  layout = config.layout
  v_next_leaves = _float_leaves(config, state.v)
  w, _ = _fixed_point.subtract(state.w, layout.concat(_weight_increment(alpha, v_next_leaves)))
  w_leaves = _float_leaves(config, w)
  g, pullback = _gradient(config, w_leaves, hparams, t)
  v, _ = _fixed_point.add(state.v, layout.concat(_velocity_increment(gamma, g)))
  stack, v = _bitstack.divide(state.stack, v, _numerators(config, gamma))
  new_state = State(w, v, stack, state.fixed_point_overflow)
  return new_state, (w_leaves, g, pullback)


def float_update(w, v, g, alpha, gamma):
  """The float step given the gradient: the map whose vjp gives each step's cotangents."""
  v_next = [c * x - (1 - c) * y for x, y, c in zip(v, g, gamma)]
  w_next = [x + a * y for x, y, a in zip(w, v_next, alpha)]
  return w_next, v_next


def _initial_state(config, params, velocity):
  layout = config.layout
  w_parts = [_fixed_point.to_fixed(x) for x in params]
  v_parts = [_fixed_point.to_fixed(x) for x in velocity]
  overflow = jnp.zeros((), jnp.bool_)
  for _, flag in w_parts + v_parts:
    overflow |= flag
  return State(
      w=layout.concat([x for x, _ in w_parts]).astype(jnp.int64),
      v=layout.concat([x for x, _ in v_parts]).astype(jnp.int64),
      stack=_bitstack.empty(layout.num_lanes, config.capacity_chunks),
      fixed_point_overflow=overflow,
  )


class Stats(NamedTuple):
  """Diagnostics of one training run (not differentiable)."""

  bits_stored: jax.Array  # float32 [], information held in the bit stack after training.
  information_bound_bits: jax.Array  # float32 [], sum over weights and steps of log2(d / n_t).
  capacity_bits: jax.Array  # float32 [], what the preallocated stack can hold.
  bits_per_weight_per_step: jax.Array  # float32 [], bits_stored / (weights * steps).
  fixed_point_overflow: jax.Array  # bool [], a value left the exact range |x| < 2**14.
  buffer_overflow: jax.Array  # bool [], the bit stack ran out of capacity.
  invalid_hyperparameters: jax.Array  # bool [], non-finite learning rate or momentum not in [0, 1].
  non_finite: jax.Array  # bool [], final weights or velocities not finite.

  @property
  def failed(self):
    return self.fixed_point_overflow | self.buffer_overflow | self.invalid_hyperparameters


def _stats(config, state, gamma, invalid, params_out, velocity_out):
  layout = config.layout
  bound = jnp.zeros((), jnp.float64)
  for size, c in zip(layout.sizes, gamma):
    n = jnp.round(c.astype(jnp.float64) * _bitstack.DENOMINATOR)
    bound += size * jnp.sum(_bitstack.DENOMINATOR_BITS - jnp.log2(n))
  stored = _bitstack.stored_bits(state.stack)
  lanes_steps = max(layout.num_lanes * config.num_steps, 1)
  capacity = _bitstack.CHUNK_BITS * (config.capacity_chunks + layout.num_lanes)
  finite = jnp.ones((), jnp.bool_)
  for x in list(params_out) + list(velocity_out):
    finite &= jnp.all(jnp.isfinite(x))
  return Stats(
      bits_stored=stored.astype(jnp.float32),
      information_bound_bits=bound.astype(jnp.float32),
      capacity_bits=jnp.asarray(capacity, jnp.float32),
      bits_per_weight_per_step=(stored / lanes_steps).astype(jnp.float32),
      fixed_point_overflow=state.fixed_point_overflow,
      buffer_overflow=state.stack.overflow,
      invalid_hyperparameters=invalid,
      non_finite=jnp.logical_not(finite),
  )


def _check(config, stats):
  if not config.checks:
    return
  _errors.raise_if(
      stats.fixed_point_overflow,
      "fixed-point overflow: a weight, velocity or update left the exact range "
      f"|x| < {_fixed_point.MAX_ABS_VALUE:g} (or was not finite); the training run diverged, "
      "e.g. from too large a learning rate. Exact reversal is impossible.")
  _errors.raise_if(
      stats.buffer_overflow,
      "bit-stack overflow: the information buffer ran out of capacity; the momentum fell "
      "below the min_momentum given to revhyper.Reversible. Lower min_momentum.")
  _errors.raise_if(
      stats.invalid_hyperparameters,
      "invalid hyperparameters: a learning rate is not finite or a momentum is outside [0, 1].")


def _forward(config, params, velocity, hparams, steps, invalid):
  with jax.enable_x64(True):
    state = _initial_state(config, params, velocity)
    step_fn = lambda s, x: (_forward_step(config, hparams, s, x), None)
    state, _ = jax.lax.scan(step_fn, state, tuple(steps))
    params_out = _float_leaves(config, state.w)
    velocity_out = _float_leaves(config, state.v)
    stats = _stats(config, state, steps.gamma, invalid, params_out, velocity_out)
  _check(config, stats)
  return params_out, velocity_out, stats, state


def _reverse(config, state, hparams, steps, body):
  """Runs ``body`` over the steps in reverse order, after undoing each one."""
  with jax.enable_x64(True):
    return jax.lax.scan(body, state, tuple(steps), reverse=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _run(config, params, velocity, hparams, steps, invalid):
  params_out, velocity_out, stats, _ = _forward(config, params, velocity, hparams, steps, invalid)
  return params_out, velocity_out, stats


def _run_fwd(config, params, velocity, hparams, steps, invalid):
  params_out, velocity_out, stats, state = _forward(
      config, params, velocity, hparams, steps, invalid)
  initial = (params, velocity) if config.check_reversal else None
  return (params_out, velocity_out, stats), (state, hparams, steps, initial)


def _zero_cotangent(x):
  dtype = jnp.result_type(x)
  if jnp.issubdtype(dtype, jnp.inexact):
    return jnp.zeros(jnp.shape(x), dtype)
  return np.zeros(jnp.shape(x), jax.dtypes.float0)


def _run_bwd(config, residuals, cotangents):
  state, hparams, steps, initial = residuals
  dparams, dvelocity, _ = cotangents
  dhparams = jax.tree_util.tree_map(_zero_cotangent, hparams)

  def body(carry, step):
    state, dw, dv, dh = carry
    state, (w_leaves, g, pullback) = _reverse_step(config, hparams, state, step)
    v_leaves = _float_leaves(config, state.v)
    _, alpha, gamma = step
    _, step_pullback = jax.vjp(float_update, w_leaves, v_leaves, g, alpha, gamma)
    dw_local, dv, dg, dalpha, dgamma = step_pullback((dw, dv))
    dw_grad, dh_grad = pullback(dg)
    dw = [a + b for a, b in zip(dw_local, dw_grad)]
    dh = jax.tree_util.tree_map(_accumulate, dh, dh_grad)
    return (state, dw, dv, dh), ([jnp.sum(x) for x in dalpha], [jnp.sum(x) for x in dgamma])

  carry = (state, list(dparams), list(dvelocity), dhparams)
  (state, dw, dv, dh), (dalpha, dgamma) = _reverse(config, carry, hparams, steps, body)
  if config.check_reversal:
    _check_reconstruction(config, state, initial)
  dsteps = type(steps)(np.zeros(steps.t.shape, jax.dtypes.float0), dalpha, dgamma)
  return dw, dv, dh, dsteps, np.zeros((), jax.dtypes.float0)


def _accumulate(total, new):
  if total.dtype == jax.dtypes.float0:
    return total
  return total + new.astype(total.dtype)


def _check_reconstruction(config, state, initial):
  with jax.enable_x64(True):
    reference = _initial_state(config, *initial)
    exact = (jnp.all(state.w == reference.w) & jnp.all(state.v == reference.v)
             & _bitstack.is_empty(state.stack))
  _errors.raise_if(
      jnp.logical_not(exact),
      "reversal check failed: the reverse pass did not rebuild the initial weights, velocity "
      "and an empty bit stack bit for bit. A gradient was not recomputed identically "
      "(non-deterministic loss_fn or compiler); please report this with your loss_fn.")


_run.defvjp(_run_fwd, _run_bwd)


def run(config, params, velocity, hparams, steps, invalid):
  """Trains exactly; differentiable in params, velocity, hparams and the schedules."""
  return _run(config, params, velocity, hparams, steps, invalid)


class Reconstruction(NamedTuple):
  params: list  # the reconstructed initial weights, leaves as floats
  velocity: list  # the reconstructed initial velocity
  exact: jax.Array  # bool []: integer states equal the initial ones and the stack is empty
  buffer_empty: jax.Array  # bool []


def train_and_reverse(config, params, velocity, hparams, steps, invalid):
  """Trains forward, then runs the exact reversal with no gradients."""
  params_out, velocity_out, stats, state = _forward(
      config, params, velocity, hparams, steps, invalid)

  def body(state, step):
    return _reverse_step(config, hparams, state, step)[0], None

  with jax.enable_x64(True):
    initial = _initial_state(config, params, velocity)
    rebuilt, _ = _reverse(config, state, hparams, steps, body)
    empty = _bitstack.is_empty(rebuilt.stack)
    exact = jnp.all(rebuilt.w == initial.w) & jnp.all(rebuilt.v == initial.v) & empty
    reconstruction = Reconstruction(
        params=_float_leaves(config, rebuilt.w),
        velocity=_float_leaves(config, rebuilt.v),
        exact=exact,
        buffer_empty=empty,
    )
  return params_out, velocity_out, stats, reconstruction
