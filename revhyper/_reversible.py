"""The exact engine: a reversible optimizer as a ``jax.custom_vjp`` over ``lax.scan``.

Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter Optimization through Reversible
Learning", ICML 2015, Algorithms 1 and 2, for any optimizer whose step is made of two kinds of
exactly invertible pieces on an integer grid (described by an ``_optim.Program``):

* rational multiplications ``x -> x * n / d`` (the states' decays, a decoupled weight decay),
  made bijective by the bit stack (``_bitstack``), which stores what they lose;
* additions ``x += round(f(y) * 2**R)`` of a float increment computed from *other* variables
  (``_fixed_point``), undone by subtracting the same increment, recomputed from the same
  integers.

Every step has the same shape::

    g_t     = transform(grad_w L(w_t, hparams, t), w_t)           # e.g. clipping
    s_{t+1} = decay(s_t) + increments(coefs_t, g_t, s)            # the states, in order
    w_{t+1} = decay(w_t) + weight_increment(coefs_t, s_{t+1})     # decay only with weight decay

and the forward pass keeps only ``(w_T, s_T)`` and the bit stacks. The backward pass runs the
steps in reverse, rebuilding every ``(w_t, s_t)`` bit for bit (the weights first, since their
increment reads only ``s_{t+1}``; then ``g_t`` at ``w_t``; then the slots), and takes the
cotangents of each step at the rebuilt state from ``jax.vjp`` of the rule's float update and
from a forward-mode Hessian-vector product of the gradient: the paper's Algorithm 2 without
hand-derived formulas. Memory is O(weights + stored bits).

Bit-exactness needs the reverse to recompute each gradient ``g_t`` bit for bit. The gradient
subgraph is therefore fenced with ``lax.optimization_barrier`` on all its inputs and outputs,
so that XLA compiles it identically in both loops. With ``share_gradient``, for a rule whose
update is linear in the gradient (momentum SGD), the fenced subgraph is the forward-over-reverse
pass itself, whose primal output is ``g_t`` and whose tangents are the Hessian-vector products,
so the backward pass computes the gradient once per step.

Precision: each state lives on its own grid (``Slot.fractional_bits``) whatever the leaves'
dtype; the loss sees the weights rounded to each leaf's dtype, and the increments are computed
in the leaf's compute dtype (at least float32), as the float methods do with their
float32-or-wider state.

Only first-order reverse mode is supported: the backward pass reads the integer state, whose
derivative is zero, so differentiating it (``jax.hessian``, grad of grad) or the forward pass
(``jax.jvp``) would silently give wrong numbers. Both passes are guarded and raise instead.
"""

import dataclasses
import enum
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from revhyper import _bitstack
from revhyper import _errors
from revhyper import _fixed_point
from revhyper import _schedules
from revhyper import _sharding


@dataclasses.dataclass(frozen=True)
class Slot:
  """One optimizer state beside the weights, per parameter leaf: its grid and its decay's."""

  name: str
  fractional_bits: int  # its grid 2**-R; range |x| < 2**(61 - R)
  denominator_bits: int  # D of its decay x -> x * n / 2**D


# The engine runs a ``_optim.Program`` (the "rule" of a ``Config``): a hashable description
# of one optimizer step that it reads through these attributes and methods alone, on lists
# with one entry per parameter leaf (``coefs``: one dict of per-leaf values per component):
#
#   slots                      tuple of Slot: the states, in the order of their increments
#   weight_decay_bits          D of the weights' own decay, or None (no decoupled decay)
#   linear_in_gradient         the step is linear in g with a Jacobian free of (s_t, g_t)
#   fence_increments           compute the increments between optimization barriers
#   has_transforms             the gradient is transformed before the states read it
#   reads                      per state, the indices of the states its increment reads
#   transform_gradient(coefs, w, g)      -> g (clipping, coupled L2)
#   slot_increment(i, coefs, g, slots)   -> state i's float increment after the decays
#   weight_increment(coefs, slots)       -> the weights' float increment from the new states
#   update(coefs, w, slots, g)           -> (w', slots'): the same step in floats
#
# The integer engine runs, per step: every state s_i <- s_i * n_i / 2**D (one batched rANS
# multiply); then s_i += slot_increment(i) in order; then w <- w * n_w / 2**D_w (a decoupled
# weight decay) and w += weight_increment. It knows nothing of what the states mean.


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
  rule: Any  # the optimizer step: an _optim.Program (see the interface above)
  layout: Layout
  num_steps: int
  capacity_chunks: tuple  # one per bit stack: (slots' decays, weights' decay if any)
  share_gradient: bool
  checks: bool
  check_reversal: bool
  min_decay: Any  # the bound the user gave for a traced decay (for messages), or None
  # The caller's x64 setting: the loss runs under it, not under the scoped x64 that the
  # integer arithmetic needs, so that unannotated arrays in loss_fn keep the caller's dtypes.
  user_x64: bool
  # _sharding.Shards: the mesh and per-leaf specs the state is laid out by (one bit stack per
  # device, capacity_chunks per device), or None for one device.
  shards: Any = None
  # RunningLayout: the model state's running averages (see _model_state), or None.
  running: Any = None


@dataclasses.dataclass(frozen=True)
class RunningLayout:
  """Static description of the running averages that the loss's statistics update."""

  layout: Layout  # their leaves' shapes and dtypes
  fractional_bits: int  # their grid 2**-R
  in_loss: bool  # loss_fn reads them: loss_fn(w, hparams, t, running) -> (loss, statistics)


class State(NamedTuple):
  """The exact training state."""

  w: list  # int64 arrays shaped like the parameter leaves: weights on the 2**-48 grid.
  slots: tuple  # per Slot, int64 arrays likewise, each on its slot's grid.
  stacks: tuple  # BitStacks: the slots' decays (one group per slot and leaf), the weights' if any
  # int64 arrays shaped like the running averages (model state), on their grid; () without.
  running: tuple = ()


class Steps(NamedTuple):
  """Per-step inputs of the scans (leading axis: steps)."""

  t: jax.Array  # int32 [T]
  coefs: Any  # the rule's NamedTuple of per-leaf [T] float arrays, in the leaves' compute dtypes
  # Per Slot, one integer [T] array per leaf: n, the decay's numerator over 2**D (derived once,
  # in _schedules); int32 for D = 16, uint32 for D = 31.
  numerators: tuple
  weight_numerators: Optional[list]  # likewise for the weights' decay, or None
  running: Any = None  # RunningSteps of the model state's running averages, or None


class RunningSteps(NamedTuple):
  """Per-step coefficients of the running averages, one [T] array per average's leaf."""

  decay: list  # factors 1 - amount, in the leaves' compute dtypes (differentiable)
  one_minus_decay: list  # the statistics' weights, likewise (differentiable)
  numerators: list  # uint32: the factors as n / 2**31


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


def _loss_and_statistics(config):
  """The loss as ``f(w_leaves, (hparams, running), t) -> (loss, statistics)``.

  ``running`` is the running averages' float values where the loss reads them, else ``()``;
  ``statistics`` is ``[]`` without model state.
  """
  def f(w_leaves, inputs, t):
    hparams, running = inputs
    if config.running is None:
      return config.loss_fn(w_leaves, hparams, t), []
    return config.loss_fn(w_leaves, hparams, t, running)
  return f


def _gradient(config, w_leaves, inputs, t, form, tangent=None):
  """``g_t``, the step's statistics and, for ``LINEARIZED``, the Hessian-vector products.

  ``inputs`` is ``(hparams, running)`` (see ``_loss_inputs``). The Hessian-vector products are
  the tangents of ``(grad_w L, grad_h L)`` along ``(tangent, 0)``, ``h`` every float leaf of
  ``inputs``: by symmetry of second derivatives they are the cotangents that the vjp of
  ``g_t`` sends to ``w_t``, to the float hparams and to running averages that the loss reads.
  Forward mode over reverse mode costs about 1.6 gradients here, against 2.6 for recomputing
  the gradient and then taking the vjp.

  ``FENCED`` and ``LINEARIZED`` put ``lax.optimization_barrier`` on the subgraph's inputs and
  all its outputs, so that XLA compiles it identically in the forward and the reverse loop, a
  condition of bit-exact reversal. The forward loop of ``LINEARIZED`` computes and discards the
  products, so that its program is the reverse loop's; its tangent is a value of the state (the
  first state), not a zero, so that no compiler pass can fold it away
  even where the fence is lowered early, and the two copies stay alike.

  Returns:
    ``(g, statistics, (hvp_w, hvp_h))``, the products ``None`` unless ``form`` is
    ``LINEARIZED``.
  """
  f = _loss_and_statistics(config)
  with jax.enable_x64(config.user_x64):
    if form is Gradient.PLAIN:
      # The fence makes the gradient read the float weights as stored, rather than convert
      # the integers again in the step's kernels.
      g, statistics = jax.grad(f, has_aux=True)(_barrier(w_leaves), inputs, t)
      return g, statistics, None
    # Every input crosses the fence, the step index and the tangent too: otherwise XLA can
    # fuse what produces them (t is i in the forward loop, T - 1 - i in the reverse one; the
    # forward tangent is discarded) into the gradient's kernels, compile or autotune them
    # differently in the two loops, and change the gradient's last bits. On a GPU it did.
    if form is Gradient.FENCED:
      w_leaves, inputs, t = _barrier((w_leaves, inputs, t))
      g, statistics = _barrier(jax.grad(f, has_aux=True)(w_leaves, inputs, t))
      return g, statistics, None
    w_leaves, inputs, t, tangent = _barrier((w_leaves, inputs, t, tangent))
    h_floats, merge = _differentiable(inputs)
    gradients = jax.grad(lambda w, h: f(w, merge(h), t), argnums=(0, 1), has_aux=True)
    ((g, _), statistics), (products, _) = jax.jvp(
        lambda w: gradients(w, h_floats), (w_leaves,), (tangent,))
    return _barrier((g, statistics, products))


def _hessian_vector(config, w_leaves, inputs, t, tangent):
  """The Hessian-vector products of ``_gradient``, without its fence (share_gradient=False)."""
  f = _loss_and_statistics(config)
  with jax.enable_x64(config.user_x64):
    h_floats, merge = _differentiable(inputs)
    gradients = jax.grad(lambda w, h: f(w, merge(h), t), argnums=(0, 1), has_aux=True)
    return jax.jvp(lambda w: gradients(w, h_floats), (w_leaves,), (tangent,))[1][0]


def _statistics(config, w_leaves, inputs, t):
  """The step's statistics alone, fenced like the gradient: for a loss that reads the running
  averages, whose reverse pass needs the statistics before it has rebuilt the averages (the
  statistics do not depend on them, which ``_training`` checks from the loss's data flow)."""
  f = _loss_and_statistics(config)
  with jax.enable_x64(config.user_x64):
    w_leaves, inputs, t = _barrier((w_leaves, inputs, t))
    return _barrier(f(w_leaves, inputs, t)[1])


def _statistics_vjp(config, w_leaves, inputs, t, dstatistics):
  """The cotangents that the statistics send to ``w_t`` and to the float leaves of inputs."""
  f = _loss_and_statistics(config)
  with jax.enable_x64(config.user_x64):
    h_floats, merge = _differentiable(inputs)
    _, pullback = jax.vjp(lambda w, h: f(w, merge(h), t)[1], w_leaves, h_floats)
    return pullback(dstatistics)


def _reads_running(config):
  return config.running is not None and config.running.in_loss


def _running_floats(config, running):
  """The running averages' grid values in their leaves' dtypes, what the loss reads."""
  return [_fixed_point.to_float(x, dtype, config.running.fractional_bits)
          for x, dtype in zip(running, config.running.layout.dtypes)]


def _running_compute(config, running):
  """The running averages' grid values in their compute dtypes."""
  return [_fixed_point.to_float(x, _fixed_point.compute_dtype(dtype),
                                config.running.fractional_bits)
          for x, dtype in zip(running, config.running.layout.dtypes)]


def _loss_inputs(config, hparams, running):
  """What the loss reads besides the weights: ``(hparams, running averages or ())``."""
  return (hparams, _running_floats(config, running) if _reads_running(config) else ())


def running_update(decay, one_minus_decay, running, statistics):
  """The running averages' step in floats: ``decay * r + (1 - decay) * s``, leaf by leaf."""
  return [d * r + a * s.astype(a.dtype)
          for d, a, r, s in zip(decay, one_minus_decay, running, statistics)]


def _running_increment(config, step, statistics):
  """``(1 - decay_t) * s_t`` per leaf, fenced: the reverse pass subtracts the same floats."""
  one_minus, statistics = _barrier((list(step.running.one_minus_decay), statistics))
  return _barrier([a * s.astype(a.dtype) for a, s in zip(one_minus, statistics)])


def _float_leaves(config, x):
  """The grid values in each leaf's own dtype: what the loss sees."""
  return [_fixed_point.to_float(x, dtype) for x, dtype in zip(x, config.layout.dtypes)]


def _compute_leaves(config, x, fractional_bits=_fixed_point.FRACTIONAL_BITS):
  """The grid values in each leaf's compute dtype: what the updates are computed from."""
  return [_fixed_point.to_float(x, _fixed_point.compute_dtype(dtype), fractional_bits)
          for x, dtype in zip(x, config.layout.dtypes)]


def _slot_floats(config, slots):
  return tuple(_compute_leaves(config, x, slot.fractional_bits)
               for x, slot in zip(slots, config.rule.slots))


def _add(x, increments, fractional_bits=_fixed_point.FRACTIONAL_BITS, sign=1):
  """``_fixed_point.add`` (or ``subtract``) leaf by leaf. Its range masks are not needed: an
  increment out of range makes a sum out of range, which the forward step freezes."""
  op = _fixed_point.add if sign > 0 else _fixed_point.subtract
  return [op(a, b, fractional_bits)[0] for a, b in zip(x, increments)]


def _and(*masks):
  return [functools.reduce(jnp.logical_and, group) for group in zip(*masks)]


def _flat(slots):
  return [x for leaves in slots for x in leaves]


def _unflat(flat, num_slots):
  size = len(flat) // max(num_slots, 1)
  return tuple(flat[i * size:(i + 1) * size] for i in range(num_slots))


class Stage(NamedTuple):
  """One bit stack: the rational multiplies of one point of the step, all groups at once.

  A group is one leaf's lanes in one decayed quantity: ``copies`` groups per parameter leaf
  for the optimizer's states and the weights, one per leaf of the running averages.
  """

  name: str  # "states" (every state's decay), "weights" (a decoupled weight decay), "running"
  bits: tuple  # static D of each group: multiplies by n / 2**D
  copies: int  # groups per leaf
  shapes: tuple  # each group's shape (a whole leaf's)

  @property
  def head_bits(self):
    return _bitstack.head_bits(self.bits[0])


def stages(rule, shapes, running=None):
  """The bit stacks of a rule's step (``shapes``: the parameter leaves'; ``running``: the
  ``RunningLayout`` of the model state, or None), in the order of the state's ``stacks``."""
  out = []
  if rule.slots:
    out.append(Stage("states", tuple(s.denominator_bits for s in rule.slots
                                     for _ in shapes), len(rule.slots),
                     tuple(shapes) * len(rule.slots)))
  if rule.weight_decay_bits is not None:
    out.append(Stage("weights", (rule.weight_decay_bits,) * len(shapes), 1, tuple(shapes)))
  if running is not None:
    shapes = running.layout.shapes
    out.append(Stage("running", (_schedules.DECAY_BITS,) * len(shapes), 1, tuple(shapes)))
  return tuple(out)


def stage_numerators(stage, steps):
  """The per-group numerator schedules of a stage (``Steps`` or one step of them)."""
  if stage.name == "states":
    return _flat(steps.numerators)
  if stage.name == "running":
    return list(steps.running.numerators)
  return list(steps.weight_numerators)


def _stages(config):
  return stages(config.rule, config.layout.shapes, config.running)


def stage_shards(shards, stage):
  """The layout of a stage's groups, or None: a parameter leaf's groups are laid out like the
  leaf; the running averages (small, read by every device's loss) are replicated."""
  if shards is None:
    return None
  if stage.name == "running":
    return dataclasses.replace(shards, specs=(PartitionSpec(),) * len(stage.shapes))
  return dataclasses.replace(shards, specs=shards.specs * stage.copies)


def _stage_shards(config, stage):
  return stage_shards(config.shards, stage)


def _bases(numerators, bits):
  """The numerators as uint64 (one per group) and the smallest head base, float64."""
  numerators = [n.astype(jnp.uint64) for n in numerators]
  bases = [_bitstack.head_bases(n, b) for n, b in zip(numerators, bits)]
  return numerators, jnp.min(jnp.stack(bases)).astype(jnp.float64)


def _decay(config, stage, stacks, values, step, inverse=False):
  """The rational multiplies of one stage, all groups at once (one renormalisation)."""
  index = _stages(config).index(stage)
  op = _bitstack.divide if inverse else _bitstack.multiply
  numerators, min_base = _bases(stage_numerators(stage, step), stage.bits)
  stack, values = op(stacks[index], values, numerators, min_base, stage.bits,
                     shards=_stage_shards(config, stage))
  return stacks[:index] + (stack,) + stacks[index + 1:], values


def _stage(config, name):
  return next(st for st in _stages(config) if st.name == name)


def _fenced(config, fn, *args):
  """``fn(*args)`` between optimization barriers when the rule asks for it.

  Reversal subtracts the very float the forward step added, so an increment must be computed
  bit for bit alike in both loops; without the fence XLA fuses it with its neighbours (the
  backward pass's vjp of the same expressions) and, for Adam's divisions and square root,
  measurably did not round alike.
  """
  if not config.rule.fence_increments:
    return fn(*args)
  return _barrier(fn(*_barrier(args)))


def _transformed_gradient(config, coefs, w_int, g):
  """``g_t`` in the compute dtypes, through the chain's gradient transforms (if any)."""
  g = _cast(g, [_fixed_point.compute_dtype(d) for d in config.layout.dtypes])
  if not config.rule.has_transforms:
    return g
  w = _compute_leaves(config, w_int)
  return _fenced(config, config.rule.transform_gradient, coefs, w, g)


def _add_increments(config, coefs, g, slots, sign):
  """Adds (``sign`` 1) or subtracts (-1, in the reverse order) every state's increment.

  Each increment reads the gradient and the states it declared, as they are at its turn; the
  reverse order meets them in the same values.
  """
  rule = config.rule
  slots = list(slots)
  order = range(len(rule.slots)) if sign > 0 else reversed(range(len(rule.slots)))
  for i in order:
    reads = tuple(_compute_leaves(config, slots[j], rule.slots[j].fractional_bits)
                  if j in rule.reads[i] else None for j in range(len(slots)))
    inc = _fenced(config, functools.partial(rule.slot_increment, i), coefs, g, reads)
    slots[i] = _add(slots[i], inc, rule.slots[i].fractional_bits, sign)
  return tuple(slots)


def _weight_increment(config, coefs, slots):
  """The rule's weight increment from the new states, fenced (see ``_fenced``)."""
  return _fenced(config, config.rule.weight_increment, coefs, slots)


def _discarded_tangent(config, state, form):
  """The tangent of a ``LINEARIZED`` gradient whose products are discarded (see ``_gradient``)."""
  if form is not Gradient.LINEARIZED:
    return None
  slot = config.rule.slots[0]
  return _cast(_compute_leaves(config, state.slots[0], slot.fractional_bits),
               config.layout.dtypes)


def _advance_running(config, stacks, running, statistics, step):
  """``r <- decay(r) + (1 - decay) * s_t`` exactly; returns ``(stacks, running)``."""
  if config.running is None:
    return stacks, running
  stacks, running = _decay(config, _stage(config, "running"), stacks, list(running), step)
  running = _add(running, _running_increment(config, step, statistics),
                 config.running.fractional_bits)
  return stacks, tuple(running)


def _undo_running(config, state, statistics, step):
  """Undoes ``_advance_running`` given the recomputed statistics ``s_t``."""
  running = _add(list(state.running), _running_increment(config, step, statistics),
                    config.running.fractional_bits, sign=-1)
  stacks, running = _decay(config, _stage(config, "running"), state.stacks, running, step,
                           inverse=True)
  return state._replace(running=tuple(running), stacks=stacks)


def _in_range(x_ints):
  return [_fixed_point.in_range_int(x) for x in x_ints]


def _frozen(ok, new, old):
  """``new`` where the lane entered the step in range, else ``old``: a value that leaves its
  range stays out of it (and is found by the final check) instead of wrapping or coming back."""
  return [jnp.where(o, a, b) for o, a, b in zip(ok, new, old)]


def _forward_step(config, hparams, form, state, step):
  rule = config.rule
  w_leaves = _float_leaves(config, state.w)
  inputs = _loss_inputs(config, hparams, state.running)
  g, statistics, _ = _gradient(config, w_leaves, inputs, step.t, form,
                               _discarded_tangent(config, state, form))
  if _reads_running(config) and form is not Gradient.PLAIN:
    # The reverse pass computes them alone, before it has the averages back: so does this one.
    statistics = _statistics(config, w_leaves, inputs, step.t)
  g = _transformed_gradient(config, step.coefs, state.w, g)
  stacks, slots = _decay(config, _stage(config, "states"), state.stacks, _flat(state.slots),
                         step)
  slots = _add_increments(config, step.coefs, g, _unflat(slots, len(rule.slots)), 1)
  # Range checks without a pass of their own: a state entering the step in range,
  # |x| < 2**61, plus an increment, which ``to_fixed`` rounds into [-2**62, 2**62] and pushes
  # to +-2**62 when it is out of range or not finite, cannot wrap, and lands out of range
  # exactly when something left its range; a lane out of range is frozen from then on
  # (``_frozen``), so the check of the final state after the loop finds it. (A decay moves a
  # value by at most 2**16 + 1 grid units beyond |x| n / d.)
  slots = tuple(_frozen(_in_range(old), new, old) for new, old in zip(slots, state.slots))
  # The weights' increment reads the new states as stored: without the fence XLA recomputes
  # them (the whole rANS multiply) inside the weights' kernel.
  slots = _barrier(slots)
  slot_floats = _slot_floats(config, slots)
  stacks, running = _advance_running(config, stacks, state.running, statistics, step)
  if config.running is not None:
    running = tuple(_frozen(_in_range(state.running), running, state.running))
  w = state.w
  if rule.weight_decay_bits is not None:
    stacks, w = _decay(config, _stage(config, "weights"), stacks, w, step)
  w = _add(w, _weight_increment(config, step.coefs, slot_floats))
  w = _frozen(_in_range(state.w), w, state.w)
  return State(w, slots, stacks, running)


def _undo_weights(config, state, step):
  """Undoes ``w_{t+1} = decay(w_t) + weight_increment(s_{t+1})``; returns the state with
  ``w_t`` and the new slots' floats ``s_{t+1}`` (compute dtypes)."""
  slots_next = _slot_floats(config, state.slots)
  w = _add(state.w, _weight_increment(config, step.coefs, slots_next), sign=-1)
  stacks = state.stacks
  if config.rule.weight_decay_bits is not None:
    stacks, w = _decay(config, _stage(config, "weights"), stacks, w, step, inverse=True)
  return state._replace(w=w, stacks=stacks), slots_next


def _undo_slots(config, state, g, step):
  """Undoes ``s_{t+1} = decay(s_t) + increments(g_t)`` given the recomputed ``g_t``."""
  g = _transformed_gradient(config, step.coefs, state.w, g)
  slots = _add_increments(config, step.coefs, g, state.slots, -1)
  stacks, slots = _decay(config, _stage(config, "states"), state.stacks, _flat(slots), step,
                         inverse=True)
  return state._replace(slots=_unflat(slots, len(config.rule.slots)), stacks=stacks)


def _undo_running_first(config, hparams, state, w_leaves, step):
  """For a loss that reads the running averages: rebuilds ``r_t`` from the statistics at
  ``w_t``, which do not read them, before ``g_t`` (which does) can be recomputed. Returns the
  state and the statistics (None otherwise)."""
  if not _reads_running(config):
    return state, None
  statistics = _statistics(config, w_leaves, _loss_inputs(config, hparams, state.running),
                           step.t)
  return _undo_running(config, state, statistics, step), statistics


def _reverse_step(config, hparams, form, state, step):
  """Undoes ``_forward_step`` exactly."""
  state, _ = _undo_weights(config, state, step)
  w_leaves = _float_leaves(config, state.w)
  state, statistics = _undo_running_first(config, hparams, state, w_leaves, step)
  g, from_gradient, _ = _gradient(config, w_leaves, _loss_inputs(config, hparams, state.running),
                                  step.t, form, _discarded_tangent(config, state, form))
  if config.running is not None and statistics is None:
    state = _undo_running(config, state, from_gradient, step)
  return _undo_slots(config, state, g, step)


def _initial_state(config, params, slots, running):
  # A value out of range (or not finite) becomes one out of range (see ``_forward_step``).
  w_parts = [_fixed_point.to_fixed(x) for x in params]
  slot_parts = [[_fixed_point.to_fixed(x, slot.fractional_bits) for x in leaves]
                for leaves, slot in zip(slots, config.rule.slots)]
  running_ints = ()
  if config.running is not None:
    running_parts = [_fixed_point.to_fixed(x, config.running.fractional_bits) for x in running]
    running_ints = tuple(_sharding.constrain(
        [x for x, _ in running_parts], _running_shards(config)))
  stacks = tuple(
      _bitstack.empty(stage.shapes, chunks, stage.head_bits, _stage_shards(config, stage))
      for stage, chunks in zip(_stages(config), config.capacity_chunks))
  return State(
      w=_sharding.constrain([x for x, _ in w_parts], config.shards),
      slots=tuple(_sharding.constrain([x for x, _ in parts], config.shards)
                  for parts in slot_parts),
      stacks=stacks,
      running=running_ints,
  )


def _running_shards(config):
  """The running averages' layout: replicated on the mesh (None without one)."""
  if config.shards is None or config.running is None:
    return None
  return dataclasses.replace(config.shards,
                             specs=(PartitionSpec(),) * len(config.running.layout.shapes))


class Stats(NamedTuple):
  """Diagnostics of one training run (not differentiable).

  Under ``jax.vmap`` every field has the batch axis: each element reports its own run.
  """

  bits_stored: jax.Array  # float32 [], information held in the bit stack after training.
  information_bound_bits: jax.Array  # float32 [], sum over weights and steps of log2(d / n_t).
  capacity_bits: jax.Array  # float32 [], what the preallocated stack can hold.
  bits_per_weight_per_step: jax.Array  # float32 [], bits_stored / (weights * steps).
  # bool [], a value left its exact range: |x| < 2**(61 - R) on a grid 2**-R (weights and
  # momenta |x| < 8192, first moments |mu| < 32, second moments 0 <= nu < 2).
  fixed_point_overflow: jax.Array
  buffer_overflow: jax.Array  # bool [], the bit stack ran out of capacity.
  # bool [], a non-finite learning rate, or a decay coefficient (momentum, b1, b2,
  # learning_rate * weight_decay) outside [0, 1], or a negative or non-finite eps; or traced
  # initial weights or optimizer states that are NaN or inf.
  invalid_hyperparameters: jax.Array
  non_finite: jax.Array  # bool [], final weights or optimizer states not finite.

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
    reasons = [message for flag, message in failure_messages(self, min_decay=...)
               if np.any(np.asarray(flag))]
    raise _errors.ReversalError(f"training run failed{where}: " + " ".join(reasons))


def any_non_finite(*trees):
  """A bool scalar: some leaf of the trees holds a NaN or an infinity."""
  bad = jnp.zeros((), jnp.bool_)
  for x in jax.tree_util.tree_leaves(trees):
    bad |= jnp.logical_not(jnp.all(jnp.isfinite(x)))
  return bad


INVALID_HYPERPARAMETERS = (
    "invalid hyperparameters or initial values: a learning rate (or another coefficient) is "
    "not finite, a decay (momentum, b1, b2, learning_rate * weight_decay, ...) is outside "
    "[0, 1], a non-negative coefficient (eps, eps_root, a clipping threshold) is negative, or "
    "the initial values were not finite: params or the initial optimizer states hold NaN or "
    "inf.")
NON_FINITE = (
    "non-finite training: the final weights or velocities are NaN or infinite; the training run "
    "diverged, e.g. from too large a learning rate.")


def _stats(config, state, steps, invalid, in_range, params_out, slots_out, running_out):
  # Sharded, a replicated leaf's lanes are held (and count) once per device that holds them.
  sizes = _sharding.held_sizes(config.layout.shapes, config.shards)
  bound = jnp.zeros((), jnp.float64)
  stored = jnp.zeros((), jnp.float64)
  lanes = 0
  for stage, stack in zip(_stages(config), state.stacks):
    group_sizes = _sharding.held_sizes(stage.shapes, _stage_shards(config, stage))
    lanes += sum(group_sizes)
    for size, n, bits in zip(group_sizes, stage_numerators(stage, steps), stage.bits):
      # A factor of 1 (n = d) stores exactly nothing, whatever the rounding of a fused log2.
      n = n.astype(jnp.float64)
      bound += size * jnp.sum(jnp.where(n == 2.0**bits, 0.0, bits - jnp.log2(n)))
    stored += _bitstack.stored_bits(stack, stage.head_bits, _stage_shards(config, stage))
  lanes_steps = max(sum(sizes) * config.num_steps, 1)
  capacity = _bitstack.CHUNK_BITS * (sum(st.tail.size for st in state.stacks) + lanes)
  return Stats(
      bits_stored=stored.astype(jnp.float32),
      information_bound_bits=bound.astype(jnp.float32),
      capacity_bits=jnp.asarray(capacity, jnp.float32),
      bits_per_weight_per_step=(stored / lanes_steps).astype(jnp.float32),
      fixed_point_overflow=jnp.logical_not(_all_equal(in_range, [True] * len(in_range))),
      buffer_overflow=functools.reduce(jnp.logical_or,
                                       [jnp.any(st.overflow) for st in state.stacks]),
      invalid_hyperparameters=invalid,
      non_finite=any_non_finite(params_out, slots_out, running_out),
  )


def failure_messages(stats, min_decay=None):
  """``(flag, message)`` for every kind of failure that ``stats`` records, most specific first."""
  if min_decay is ...:  # not known where the statistics are read
    stack_hint = ("a decay (momentum, b1, b2, ...) fell below the min_decay given to "
                  "revhyper.Reversible for a traced decay; lower min_decay")
  elif min_decay is None:
    # The capacity was computed from the decays themselves, with a proven bound.
    stack_hint = ("the capacity computed from the decay schedules was too small, which "
                  "should not happen; please report it")
  else:
    stack_hint = (f"a decay (momentum, b1, b2, ...) fell below the min_decay={min_decay} "
                  "given to revhyper.Reversible; lower min_decay")
  return [
      (stats.invalid_hyperparameters, INVALID_HYPERPARAMETERS),
      (stats.fixed_point_overflow,
       "fixed-point overflow: a weight, optimizer state or update left its exact range "
       f"(weights and momenta |x| < {_fixed_point.MAX_ABS_VALUE:g}; first moments "
       f"|mu| < {_fixed_point.max_abs_value(_fixed_point.FIRST_MOMENT_BITS):g}, second "
       f"moments 0 <= nu < {_fixed_point.max_abs_value(_fixed_point.SECOND_MOMENT_BITS):g}: "
       "scale the loss down), or was not finite; the training run diverged, e.g. from too large a "
       "learning rate. Exact reversal is impossible."),
      (stats.buffer_overflow, f"bit-stack overflow: the information buffer ran out of "
       f"capacity: {stack_hint}."),
      (stats.non_finite, NON_FINITE),
  ]


def check(stats, checks, min_decay=None):
  """Raises ``ReversalError`` for a failed run whose stats are concrete (eager calls).

  Returns the bool scalar to poison the outputs with: ``stats.failed`` where the checks are
  on and the values are traced, else False.
  """
  if not checks:
    return jnp.zeros((), jnp.bool_)
  concrete = True
  for flag, message in failure_messages(stats, min_decay):
    concrete &= _errors.raise_if(flag, message)
  return jnp.zeros((), jnp.bool_) if concrete else stats.failed


def _reversal_form(config):
  if config.share_gradient and config.rule.linear_in_gradient:
    return Gradient.LINEARIZED
  return Gradient.FENCED


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


def _outputs(config, state):
  """The final weights, slots and running averages in the leaves' dtypes, and per leaf whether
  every value is in range (a lane that left it was frozen out of it by ``_forward_step``)."""
  params_out = _float_leaves(config, state.w)
  in_range = _and(_in_range(state.w), [_fixed_point.in_range(x) for x in params_out])
  slots_out = []
  for x, slot in zip(state.slots, config.rule.slots):
    slots_out.append([_fixed_point.to_float(y, dtype, slot.fractional_bits)
                      for y, dtype in zip(x, config.layout.dtypes)])
    in_range = _and(in_range, _in_range(x), [_fixed_point.in_range(y, slot.fractional_bits)
                                             for y in slots_out[-1]])
  running_out = []
  if config.running is not None:
    running_out = _running_floats(config, state.running)
    in_range += _and(_in_range(state.running), [
        _fixed_point.in_range(x, config.running.fractional_bits)
        for x in _running_compute(config, state.running)])
  return params_out, tuple(slots_out), running_out, in_range


# The forward and backward passes are each compiled whole: an eager ``jax.grad`` calls the
# custom_vjp's rules with concrete values, which would otherwise run op by op (some 200 small
# compilations, seconds, before the first hypergradient). Under an outer ``jit`` they are
# inlined. The failure checks stay outside, where concrete flags can raise. Called with 64-bit
# types enabled, so that the integer state passes in and out as it is.


@functools.partial(jax.jit, static_argnums=(0, 7))
def _forward_pass(config, params, slots, running, hparams, steps, invalid, form):
  state = _initial_state(config, params, slots, running)
  step_fn = lambda s, x: (_forward_step(config, hparams, form, s, x), None)
  state, _ = jax.lax.scan(step_fn, state, steps)
  params_out, slots_out, running_out, in_range = _outputs(config, state)
  stats = _stats(config, state, steps, invalid, in_range, params_out, slots_out, running_out)
  return (params_out, slots_out, running_out), stats, state


def _forward(config, params, slots, running, hparams, steps, invalid, form):
  with jax.enable_x64(True):
    outputs, stats, state = _forward_pass(config, params, slots, running, hparams, steps,
                                          invalid, form)
  failed = check(stats, config.checks, config.min_decay)
  outputs = _errors.poison(failed, outputs)
  return outputs, stats, state, failed


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _run(config, params, slots, running, hparams, steps, invalid):
  # Not differentiated, so never reversed: the cheapest gradient form.
  outputs, stats, _, _ = _forward(
      config, params, slots, running, hparams, steps, invalid, Gradient.PLAIN)
  return (*outputs, stats)


def _run_fwd(config, params, slots, running, hparams, steps, invalid):
  params, slots, running, hparams, steps = _guard((params, slots, running, hparams, steps))
  outputs, stats, state, failed = _forward(
      config, params, slots, running, hparams, steps, invalid, _reversal_form(config))
  initial = (params, slots, running) if config.check_reversal else None
  return (*outputs, stats), (state, hparams, steps, initial, failed)


def _zero_cotangent(x):
  dtype = jnp.result_type(x)
  if jnp.issubdtype(dtype, jnp.inexact):
    return jnp.zeros(jnp.shape(x), dtype)
  return np.zeros(jnp.shape(x), jax.dtypes.float0)


def _cast(tree, dtypes):
  return [x.astype(d) for x, d in zip(tree, dtypes)]


class _Backward(NamedTuple):
  """The carry of the backward scan: the state being rebuilt and the cotangents so far."""

  state: State  # (w_{t+1}, s_{t+1}, r_{t+1}) and the bit stacks, on the way back to step 0
  dw: list  # cotangent of w_{t+1}, per leaf, compute dtypes
  dslots: tuple  # cotangents of s_{t+1}, per state a list of leaves
  dh: list  # cotangents of the float hparams accumulated over steps t+1 .. T-1
  drunning: list  # cotangents of the running averages r_{t+1}, compute dtypes ([] without)


def _gradient_and_products(config, inputs, carry, w_leaves, slots_next, step):
  """``g_t`` and its Hessian-vector products with ``dg_t`` for the ``LINEARIZED`` form.

  An update linear in ``g_t``, with a Jacobian that reads neither ``g_t`` nor ``s_t``: the
  cotangent of ``g_t`` is known before ``g_t`` is recomputed (here at stand-ins for both), so
  that one forward-over-reverse pass yields ``g_t`` (to rebuild ``s_t``) and its products.
  """
  w_compute = _cast(w_leaves, _compute_dtypes(config))
  zeros = [jnp.zeros_like(x) for x in w_compute]
  _, pullback = jax.vjp(lambda g: config.rule.update(step.coefs, w_compute, slots_next, g),
                        zeros)
  (dg,) = pullback((carry.dw, carry.dslots))
  return _gradient(config, w_leaves, inputs, step.t, Gradient.LINEARIZED,
                   tangent=_cast(dg, config.layout.dtypes))


def _backward_step(config, hparams, carry, step):
  """Undoes step t exactly, then pulls its cotangents back through it (the paper's
  Algorithm 2): returns the carry at t and the cotangents of the step's coefficients."""
  form = _reversal_form(config)
  compute_dtypes = _compute_dtypes(config)
  # The weights' increment reads only the new slots s_{t+1}, so w_t comes back first, and
  # with it g_t, which the slots' increments need.
  state, slots_next = _undo_weights(config, carry.state, step)
  w_leaves = _float_leaves(config, state.w)
  state, statistics = _undo_running_first(config, hparams, state, w_leaves, step)
  inputs = _loss_inputs(config, hparams, state.running)
  if form is Gradient.LINEARIZED:
    g, from_gradient, (hvp_w, hvp_h) = _gradient_and_products(
        config, inputs, carry, w_leaves, slots_next, step)
  else:
    g, from_gradient, _ = _gradient(config, w_leaves, inputs, step.t, form)
  if config.running is not None and statistics is None:
    statistics = from_gradient
    state = _undo_running(config, state, statistics, step)
  state = _undo_slots(config, state, g, step)
  # The step's own cotangents, at the rebuilt (w_t, s_t, g_t).
  _, pullback = jax.vjp(config.rule.update, step.coefs, _cast(w_leaves, compute_dtypes),
                        _slot_floats(config, state.slots), _cast(g, compute_dtypes))
  dcoefs, dw, dslots, dg = pullback((carry.dw, carry.dslots))
  if form is not Gradient.LINEARIZED:
    hvp_w, hvp_h = _hessian_vector(config, w_leaves, inputs, step.t,
                                   _cast(dg, config.layout.dtypes))
  num_h = len(carry.dh)
  dw = [a + b.astype(a.dtype) for a, b in zip(dw, hvp_w)]
  dh = [a + b.astype(a.dtype) for a, b in zip(carry.dh, hvp_h[:num_h])]
  drunning, drunning_coefs = [], None
  if config.running is not None:
    dw, dh, drunning, drunning_coefs = _running_cotangents(
        config, carry, state, inputs, w_leaves, statistics, hvp_h[num_h:], dw, dh, step)
  return _Backward(state, dw, dslots, dh, drunning), (dcoefs, drunning_coefs)


def _running_cotangents(config, carry, state, inputs, w_leaves, statistics, hvp_running, dw,
                        dh, step):
  """Pulls the running averages' cotangents back through ``r_{t+1} = decay r_t + (1 - decay)
  s_t(w_t)`` at the rebuilt ``r_t``: to ``r_t`` (with, when the loss reads them, what the
  gradient's dependence on them sends), to the coefficients, and through the statistics to
  ``w_t`` and the hparams."""
  running = _running_compute(config, state.running)
  _, pullback = jax.vjp(running_update, list(step.running.decay),
                        list(step.running.one_minus_decay), running, statistics)
  ddecay, done_minus, drunning, dstatistics = pullback(carry.drunning)
  if _reads_running(config):
    drunning = [a + b.astype(a.dtype) for a, b in zip(drunning, hvp_running)]
  sw, sh = _statistics_vjp(config, w_leaves, inputs, step.t,
                           [d.astype(jnp.result_type(s)) for d, s in zip(dstatistics,
                                                                         statistics)])
  dw = [a + b.astype(a.dtype) for a, b in zip(dw, sw)]
  dh = [a + b.astype(a.dtype) for a, b in zip(dh, sh[:len(dh)])]
  return dw, dh, drunning, (ddecay, done_minus)


def _compute_dtypes(config):
  return [_fixed_point.compute_dtype(d) for d in config.layout.dtypes]


def _backward_carry(config, state, hparams, cotangents):
  """The carry at step T: the final state, ready to pop, and the output cotangents."""
  dparams, dslots, drunning = cotangents
  compute_dtypes = _compute_dtypes(config)
  # The cotangents are carried in the compute dtypes, like the state they belong to, and laid
  # out like the weights: a cotangent that is a symbolic zero would otherwise be replicated.
  lay_out = lambda x: _sharding.constrain(_cast(x, compute_dtypes), config.shards)
  state = state._replace(stacks=tuple(
      _bitstack.for_popping(st, _stage_shards(config, stage))
      for st, stage in zip(state.stacks, _stages(config))))
  h_floats, _ = _differentiable(hparams)
  if config.running is not None:
    drunning = _sharding.constrain(
        _cast(drunning, [_fixed_point.compute_dtype(d) for d in config.running.layout.dtypes]),
        _running_shards(config))
  return _Backward(state, lay_out(dparams), tuple(lay_out(x) for x in dslots),
                   [jnp.zeros_like(x) for x in h_floats], list(drunning))


def _input_cotangents(config, hparams, steps, carry, dcoefs):
  """The cotangents of ``_run``'s inputs from the carry at step 0."""
  dcoefs, drunning_coefs = dcoefs
  dtypes = config.layout.dtypes
  dh_floats = iter(carry.dh)
  dhparams = jax.tree_util.tree_map(
      lambda x: next(dh_floats) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
      else _zero_cotangent(x), hparams)
  no_tangent = lambda x: np.zeros(x.shape, jax.dtypes.float0)
  drunning_steps = None
  drunning = []
  if config.running is not None:
    drunning_steps = RunningSteps(*drunning_coefs,
                                  jax.tree_util.tree_map(no_tangent, steps.running.numerators))
    drunning = _cast(carry.drunning, config.running.layout.dtypes)
  dsteps = Steps(no_tangent(steps.t), dcoefs, jax.tree_util.tree_map(no_tangent, steps.numerators),
                 jax.tree_util.tree_map(no_tangent, steps.weight_numerators), drunning_steps)
  return (_cast(carry.dw, dtypes), tuple(_cast(x, dtypes) for x in carry.dslots), drunning,
          dhparams, dsteps, np.zeros((), jax.dtypes.float0))


@functools.partial(jax.jit, static_argnums=0)
def _backward_pass(config, state, hparams, steps, initial, cotangents):
  """The backward scan from the final state; with ``initial``, whether it rebuilt it exactly."""
  carry = _backward_carry(config, state, hparams, cotangents)
  carry, dcoefs = jax.lax.scan(functools.partial(_backward_step, config, hparams), carry,
                               steps, reverse=True)
  exact = None
  if initial is not None:
    exact = _exact(config, carry.state, _initial_state(config, *initial))
  return carry, dcoefs, exact


def _run_bwd(config, residuals, cotangents):
  """Algorithm 2 of the paper: undo each step exactly, then pull its cotangents back."""
  residuals, cotangents = _guard((residuals, cotangents))
  state, hparams, steps, initial, failed = residuals
  dparams, dslots, drunning, _ = cotangents  # the statistics' cotangents are not read
  with jax.enable_x64(True):
    carry, dcoefs, exact = _backward_pass(config, state, hparams, steps,
                                          initial if config.check_reversal else None,
                                          (dparams, dslots, drunning))
  if config.check_reversal:
    failed |= _reconstruction_failed(exact)
  # A failed run has no trustworthy gradient: NaN rather than a wrong number.
  return _errors.poison(failed, _input_cotangents(config, hparams, steps, carry, dcoefs))


def _all_equal(xs, ys):
  """A bool scalar: the two lists of arrays are equal element for element."""
  return functools.reduce(jnp.logical_and, [jnp.all(x == y) for x, y in zip(xs, ys)],
                          jnp.ones((), jnp.bool_))


REVERSAL_CHECK_FAILED = (
    "reversal check failed: the reverse pass did not rebuild the initial weights, optimizer "
    "states, running averages and an empty bit stack bit for bit. A gradient or a statistic "
    "was not recomputed identically (a non-deterministic loss_fn or compiler); please report "
    "this with your loss_fn.")


def _reconstruction_failed(exact):
  """Raises if the reconstruction is concrete and not exact; returns the flag to poison with."""
  mismatch = jnp.logical_not(exact)
  if _errors.raise_if(mismatch, REVERSAL_CHECK_FAILED):
    return jnp.zeros((), jnp.bool_)
  return mismatch


def _exact(config, state, reference):
  """The rebuilt integer state equals the reference and every bit stack is empty."""
  exact = _all_equal(state.w, reference.w)
  for x, y in zip(state.slots, reference.slots):
    exact &= _all_equal(x, y)
  exact &= _all_equal(state.running, reference.running)
  return exact & _all_empty(config, state)


def _all_empty(config, state):
  return functools.reduce(jnp.logical_and, [
      _bitstack.is_empty(st, stage.head_bits, _stage_shards(config, stage))
      for st, stage in zip(state.stacks, _stages(config))])


_run.defvjp(_run_fwd, _run_bwd)


def run(config, params, slots, running, hparams, steps, invalid):
  """Trains exactly; differentiable in params, slots, running averages, hparams and the
  schedules. Returns ``(params, slots, running, stats)`` (``running`` is ``[]`` without model
  state)."""
  # Laid out as the state will be, outside the custom_vjp: its cotangents come back in this
  # layout (with Explicit mesh axes they must have their primals' types).
  params = _sharding.constrain(params, config.shards)
  slots = tuple(_sharding.constrain(x, config.shards) for x in slots)
  running = _sharding.constrain(list(running), _running_shards(config))
  try:
    return _run(config, params, slots, running, hparams, steps, invalid)
  except TypeError as e:
    # JAX's own message for jvp of a custom_vjp says what, not what to do instead.
    if "custom_vjp" in str(e) and "jvp" in str(e):
      raise TypeError(HIGHER_ORDER) from e
    raise


class Reconstruction(NamedTuple):
  params: list  # the reconstructed initial weights, leaves as floats
  slots: tuple  # the reconstructed initial slots, per slot a list of leaves
  exact: jax.Array  # bool []: integer states equal the initial ones and the stacks are empty
  buffer_empty: jax.Array  # bool []
  running: list = []  # the reconstructed initial running averages ([] without model state)


def train_and_reverse(config, params, slots, running, hparams, steps, invalid):
  """Trains forward, then runs the exact reversal with no gradients.

  Both loops use the gradient form of the differentiated path, so this checks what
  ``jax.grad`` relies on. The forward outputs are returned as computed (no NaN), so that the
  caller can raise with the statistics.
  """
  form = _reversal_form(config)
  unchecked = dataclasses.replace(config, checks=False)
  outputs, stats, state, _ = _forward(
      unchecked, params, slots, running, hparams, steps, invalid, form)

  def body(state, step):
    return _reverse_step(config, hparams, form, state, step), None

  with jax.enable_x64(True):
    initial = _initial_state(config, params, slots, running)
    state = state._replace(stacks=tuple(
        _bitstack.for_popping(st, _stage_shards(config, stage))
        for st, stage in zip(state.stacks, _stages(config))))
    rebuilt, _ = jax.lax.scan(body, state, steps, reverse=True)
    rebuilt_params, rebuilt_slots, rebuilt_running, _ = _outputs(config, rebuilt)
    reconstruction = Reconstruction(
        params=rebuilt_params,
        slots=rebuilt_slots,
        exact=_exact(config, rebuilt, initial),
        buffer_empty=_all_empty(config, rebuilt),
        running=rebuilt_running,
    )
  return outputs, stats, reconstruction
