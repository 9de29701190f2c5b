"""What every optimizer shares: the methods, the loss and argument checks, the float scan, the
cached eager program, and ``round_trip``.

One call, three memory strategies that give the same gradients:

* ``Reversible()``: exact reversal (Maclaurin et al. 2015); memory O(weights + bits stored).
* ``Unroll()``: plain backprop through the float ``lax.scan``; memory O(steps x activations).
* ``Checkpoint(segment_length)``: the float scan, rematerialised in segments of
  ``segment_length`` steps (``sqrt(T)`` by default; 1 recomputes every step).

An optimizer (``revhyper.optim``) is validated into a ``Problem`` (``optimizer_problem``), whose
``rule`` is the optimizer compiled for the engine (an ``_optim.Program``); ``run`` runs it with
any method, ``train`` is the public entry point.
"""

import contextlib
import dataclasses
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from revhyper import _bitstack
from revhyper import _errors
from revhyper import _fixed_point
from revhyper import _model_state
from revhyper import _optim
from revhyper import _reversible
from revhyper import _schedules
from revhyper import _sharding

Stats = _reversible.Stats


@dataclasses.dataclass(frozen=True)
class Reversible:
  """Exact reversal: train on an integer grid, run training backwards in the backward pass.

  Attributes:
    min_decay: a lower bound on every decay factor (momentum, ``b1``, ``b2``, ``1 -
      learning_rate * weight_decay``, ...), needed only when a decay is traced (e.g. a
      meta-objective under ``jax.jit``), since the bit stack's size must be static: it holds
      about ``num_steps * log2(1 / min_decay)`` bits per weight and decay. With concrete
      decays the capacity comes from their values.
    min_momentum: the former name of ``min_decay``, kept as an alias.
    share_gradient: take the recomputed gradient from the same forward-over-reverse pass that
      gives the Hessian-vector products, instead of computing it separately (about 1.6 instead
      of 2.6 gradient evaluations per backward step). ``None`` (default) chooses by backend:
      on the CPU sharing is bit-exact; on a GPU the shared pass was measured not to be (XLA
      compiles its primal part differently in the two loops), so it is off there.
    checks: act on fixed-point or bit-stack overflow and invalid hyperparameters: raise
      ``ReversalError`` where the values are concrete (eager calls), and make the outputs (and
      hypergradients) NaN inside ``jit``. Either way the flags are in ``result.stats``.
    check_reversal: in the backward pass, compare the rebuilt initial state with the original
      bit for bit (keeps a copy of the initial state); on a mismatch, raise ``ReversalError``
      in an eager ``jax.grad`` and make every hypergradient NaN under ``jit``. This checks the
      gradient path itself; use it once on a new problem or backend.
    precision: the precision of the loss's matrix products (``jax.default_matmul_precision``)
      in every pass: ``"highest"`` (the default: full float32 products, so that a GPU's
      hypergradients agree with float32 backprop and with the CPU), ``"high"``,
      ``"default"`` (the backend's fastest, TF32 on recent NVIDIA GPUs), or ``None`` (whatever
      the caller's ``jax.default_matmul_precision`` says). Every method takes it, and two
      methods agree to float32 accuracy only at the same precision. The loss is traced under
      it, so a product that names its own ``precision=`` keeps it.
    mesh: a ``jax.sharding.Mesh`` to lay the exact state out on (see README, "Scaling"); each
      device keeps the lanes of the weights it holds and a bit stack of its own, sized for them.
      Its axes may be ``Auto`` or ``Explicit`` (``jax.make_mesh``'s default). Parameters laid
      out on a mesh with ``Explicit`` axes carry their layout in their types: without ``mesh``
      the state is then laid out like them.
    param_specs: with ``mesh``, how the parameters are split: one ``PartitionSpec`` for every
      leaf, or a pytree like ``params`` of ``PartitionSpec`` (``None`` leaves: replicated).
      Default: every leaf replicated (data parallelism). Each sharded dimension must split
      evenly.
  """

  min_decay: Optional[float] = None
  share_gradient: Optional[bool] = None
  checks: bool = True
  check_reversal: bool = False
  mesh: Any = None
  param_specs: Any = dataclasses.field(default=None, compare=False)
  # param_specs as (treedef, leaves): hashable, since the method is part of a static config.
  _spec_leaves: Any = dataclasses.field(default=None, init=False, repr=False)

  # The former name of min_decay; not compared, since min_decay holds its value.
  min_momentum: Optional[float] = dataclasses.field(default=None, compare=False)
  precision: Optional[str] = "highest"

  def __post_init__(self):
    _check_precision(self.precision)
    if self.min_momentum is not None:
      if self.min_decay is not None and self.min_decay != self.min_momentum:
        raise ValueError("min_momentum is the former name of min_decay: give one of them.")
      object.__setattr__(self, "min_decay", self.min_momentum)
    if self.min_decay is not None and not 0 <= self.min_decay <= 1:
      raise ValueError(f"min_decay must lie in [0, 1], got {self.min_decay}.")
    if self.mesh is None:
      if self.param_specs is not None:
        raise ValueError("param_specs needs a mesh: Reversible(mesh=..., param_specs=...).")
      return
    if not isinstance(self.mesh, jax.sharding.Mesh):
      raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(self.mesh).__name__}.")
    if len(set(self.mesh.axis_types)) > 1:
      raise ValueError(f"mesh axes must be all Auto or all Explicit, got "
                       f"{self.mesh.axis_types}.")
    is_spec = lambda x: x is None or isinstance(x, jax.sharding.PartitionSpec)
    leaves, treedef = jax.tree_util.tree_flatten(self.param_specs, is_leaf=is_spec)
    object.__setattr__(self, "_spec_leaves", (treedef, tuple(leaves)))


@dataclasses.dataclass(frozen=True)
class Unroll:
  """Store-all backprop through the float training scan: the reference method.

  Attributes:
    checks: act on invalid hyperparameters and non-finite results as ``Reversible`` does.
    precision: of the loss's matrix products, as for ``Reversible``.
  """

  checks: bool = True
  precision: Optional[str] = "highest"

  def __post_init__(self):
    _check_precision(self.precision)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """Backprop through the float scan, recomputing each segment of steps in the backward pass.

  Attributes:
    segment_length: steps per checkpointed segment; ``None`` gives ``ceil(sqrt(num_steps))``
      (memory O(sqrt(T))), 1 recomputes every step from its stored input (memory O(T)).
    checks: as for ``Unroll``.
    precision: of the loss's matrix products, as for ``Reversible``.
  """

  segment_length: Optional[int] = None
  checks: bool = True
  precision: Optional[str] = "highest"

  def __post_init__(self):
    _check_precision(self.precision)
    if self.segment_length is not None and (
        not isinstance(self.segment_length, int) or self.segment_length < 1):
      raise ValueError(f"segment_length must be a positive int, got {self.segment_length!r}.")


_METHODS = {"reversible": Reversible, "unroll": Unroll, "checkpoint": Checkpoint}
# The names jax.default_matmul_precision takes.
PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32",
              "bfloat16_3x", "bfloat16_6x", "bfloat16_9x", "tensorfloat32_3x")


def _check_precision(precision):
  if precision is not None and precision not in PRECISIONS:
    raise ValueError(f"precision must be None or one of {PRECISIONS}, got {precision!r}.")


@contextlib.contextmanager
def matmul_precision(precision):
  """``jax.default_matmul_precision(precision)``, or nothing for ``None``."""
  if precision is None:
    yield
  else:
    with jax.default_matmul_precision(precision):
      yield


class RoundTrip(NamedTuple):
  """What ``round_trip`` returns."""

  params: Any  # final weights w_T
  velocity: Any  # final optimizer state: sgd's velocity v_T; adam's (mu_T, nu_T)
  initial_params: Any  # w_0 rebuilt by running training backwards
  initial_velocity: Any  # the initial optimizer state rebuilt likewise
  exact: jax.Array  # bool []: rebuilt integer state equals the initial one, stacks empty
  buffer_empty: jax.Array  # bool []: the bit stack is empty after the reversal
  stats: Stats  # the training run's diagnostics
  model_state: Any = None  # final running averages (with model_state=RunningAverage(...))
  initial_model_state: Any = None  # the initial running averages rebuilt likewise


def resolve_method(method):
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
    where = f"{name}{jax.tree_util.keystr(path)}"
    if not isinstance(leaf, (jax.Array, np.ndarray, np.generic, float, int, complex)):
      raise ValueError(
          f"{where} must be a float array, got {type(leaf).__name__} ({leaf!r:.60}). Pass only "
          "the arrays to train: split a model object into arrays and static parts first (e.g. "
          "equinox: params, static = eqx.partition(model, eqx.is_inexact_array), then "
          "eqx.combine(params, static) inside loss_fn; flax nnx: nnx.split(model)).")
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"{where} must be a float array, got dtype {dtype}.")


@dataclasses.dataclass(frozen=True, eq=False)
class _ClosedLoss:
  """``loss_fn`` as a jaxpr whose closed-over arrays are explicit inputs.

  Equal (and hashing alike) when the jaxprs print alike, so that a repeated call with the same
  loss reuses the compiled program, while a loss that closes over other arrays of the same
  shapes still does, reading the new values: they are arguments, never baked-in constants.
  """

  jaxpr: Any  # jax.core.Jaxpr: inputs are the consts, then the flattened (w, hparams, t[, r]).
  in_tree: Any
  key: str  # the jaxpr's text
  # With model state, the loss also returns the step's statistics, and reads the running
  # averages r where it was told to: __call__(w, hparams, t, r) -> (loss, statistics list).
  with_statistics: bool = False
  # The statistics read the running averages (then the reversible method cannot run it).
  statistics_read_running: bool = False

  def __call__(self, w_leaves, hparams, t, running=()):
    (h, consts) = hparams
    args = jax.tree_util.tree_leaves((w_leaves, h, t, list(running)))
    out = jax.core.eval_jaxpr(self.jaxpr, list(consts), *args)
    return (out[0], out[1:]) if self.with_statistics else out[0]

  def __eq__(self, other):
    return (isinstance(other, _ClosedLoss) and self.key == other.key
            and self.in_tree == other.in_tree and self.with_statistics == other.with_statistics)

  def __hash__(self):
    return hash((self.key, self.in_tree, self.with_statistics))


def _is_float_scalar(aval):
  return aval.shape == () and jnp.issubdtype(aval.dtype, jnp.floating)


def _close_loss(loss_on_leaves, leaves, hparams, running=None):
  """Traces the loss once: its output is checked and its closed-over arrays are hoisted.

  With ``running`` (a ``_model_state.Running``), the loss returns ``(loss, statistics)`` and,
  if ``running.in_loss``, reads the running averages as a fourth argument.
  """
  t0 = jnp.zeros((), jnp.int32)
  averages = list(running.leaves) if running is not None and running.in_loss else []
  signature = ("loss_fn(params, hparams, t, running)" if averages
               else "loss_fn(params, hparams, t)")
  out_tree = []

  def traced(w_leaves, h, t, r):
    out = loss_on_leaves(w_leaves, h, t, r)
    if running is None:
      return out
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
      raise ValueError(f"with model_state, {signature} must return (loss, statistics), "
                       f"got {type(out).__name__}.")
    statistics, tree = jax.tree_util.tree_flatten(out[1])
    out_tree.append(tree)
    return (out[0], *statistics)

  try:
    closed = jax.make_jaxpr(traced)(leaves, hparams, t0, averages)
  except TypeError as e:
    raise ValueError(f"{signature} could not be traced: {e}") from e
  out = closed.out_avals
  if running is None:
    if not (len(out) == 1 and _is_float_scalar(out[0])):
      hint = (" To carry statistics such as BatchNorm's through training, return (loss, "
              "statistics) and pass model_state=revhyper.RunningAverage(...)."
              if len(out) > 1 else "")
      raise ValueError(f"{signature} must return a float scalar, got {out}.{hint}")
  else:
    if not _is_float_scalar(out[0]):
      raise ValueError(f"the loss that {signature} returns (the first element of (loss, "
                       f"statistics)) must be a float scalar, got {out[0]}.")
    _model_state.check_statistics(out_tree[0], out[1:], running)
  jaxpr = closed.jaxpr
  # The running averages are the last inputs: a statistic that reads them would make a step's
  # average unrecoverable from the next one.
  read_running = bool(averages) and _optim.reads_any(
      jaxpr, jaxpr.invars[len(jaxpr.invars) - len(averages):], jaxpr.outvars[1:])
  in_tree = jax.tree_util.tree_structure((leaves, hparams, t0, averages))
  loss = _ClosedLoss(closed.jaxpr, in_tree, str(closed.jaxpr), running is not None,
                     read_running)
  return loss, tuple(closed.consts)


class Problem(NamedTuple):
  """Validated, flattened inputs of one training run, for any method."""

  rule: Any  # the optimizer's _optim.Program
  loss_fn: Any  # _ClosedLoss: loss_fn(param_leaves, (hparams, consts), t)
  treedef: Any
  params: list
  slots: tuple  # per Slot of the rule, a list of leaves like params
  hparams: Any  # (the user's hparams, the loss's closed-over arrays)
  steps: _reversible.Steps
  invalid: jax.Array  # bool []: a traced hyperparameter is invalid
  present: Any  # slots (tuple of pytrees like params) -> the optimizer's public state
  running: Any = None  # _model_state.Running: the model state's running averages, or None


def optimizer_problem(loss_fn, params, hparams, optimizer, *, num_steps, opt_state=None,
                      state_label=lambda name: f"opt_state[{name!r}]", precision="highest",
                      model_state=None):
  """Validates a run of a ``revhyper.optim`` optimizer into a ``Problem``.

  Args:
    opt_state: None (every state starts at 0) or a dict from state names to pytrees like
      ``params`` (missing names start at 0).
    state_label: how errors name a state's initial value.
    precision: the matrix-product precision the loss is traced under (the method's).
    model_state: a ``RunningAverage`` (``loss_fn`` then returns ``(loss, statistics)``) or
      None.
  """
  num_steps = check_num_steps(loss_fn, num_steps)
  if not isinstance(optimizer, _optim.Optimizer):
    raise ValueError(f"optimizer must be a revhyper.optim optimizer (e.g. "
                     f"revhyper.optim.adam(1e-3)), got {type(optimizer).__name__}.")
  leaves, treedef = flatten_params(params)
  rule = optimizer.rule
  names = [st.name for st in rule.states]
  opt_state = {} if opt_state is None else opt_state
  if not isinstance(opt_state, dict) or set(opt_state) - set(names):
    got = sorted(opt_state) if isinstance(opt_state, dict) else opt_state
    raise ValueError(f"opt_state must be a dict with keys among the optimizer's states "
                     f"{names}, got {got}.")
  slots = []
  for st in rule.states:
    state_leaves = flatten_like(opt_state.get(st.name), leaves, treedef, state_label(st.name))
    if st.nonnegative:
      for x in state_leaves:
        known = _schedules.concrete_value(x)
        if known is not None and np.any(known < 0):
          raise ValueError(f"{state_label(st.name)} must be non-negative (a second moment), "
                           f"got {known[known < 0][:5]}.")
    slots.append(state_leaves)
  running = _model_state.prepare(model_state, num_steps, _checked_leaves,
                                 _fixed_point.compute_dtype)
  closed_loss, hparams = close_loss(loss_fn, leaves, treedef, hparams, precision, running)
  prepared = _optim.prepare(optimizer, jax.tree_util.tree_unflatten(treedef, leaves), leaves,
                            num_steps)
  steps = _reversible.Steps(
      t=jnp.arange(num_steps, dtype=jnp.int32),
      coefs=prepared.coefs,
      numerators=prepared.numerators,
      weight_numerators=prepared.weight_numerators,
      running=None if running is None else _reversible.RunningSteps(
          running.decay, running.one_minus_decay, running.numerators))
  invalid = prepared.invalid if running is None else prepared.invalid | running.invalid
  return Problem(_optim.program(optimizer, prepared.weight_decay_on), closed_loss, treedef,
                 leaves, tuple(slots), hparams, steps, invalid,
                 present=lambda slots: dict(zip(names, slots)), running=running)


def _checked_leaves(tree, name):
  """The leaves of a pytree of float arrays, strongly typed, finite where concrete."""
  _check_float_tree(tree, name)
  tree = jax.tree_util.tree_map(_strong, tree)
  _check_finite_tree(tree, name)
  return jax.tree_util.tree_flatten(tree)


def check_num_steps(loss_fn, num_steps):
  """Validates ``loss_fn`` and ``num_steps``; returns ``num_steps`` as an int."""
  if not callable(loss_fn):
    raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
    raise ValueError(f"num_steps must be a Python int (it is static), got {num_steps!r}.")
  if num_steps < 1:
    raise ValueError(f"num_steps must be at least 1, got {num_steps}.")
  return int(num_steps)


def _strong(x):
  # Strongly typed, so that a weakly typed input (a Python float, or an array computed from
  # one) neither changes the loss's dtype promotion nor the compiled program's key.
  return jnp.asarray(x, dtype=jnp.result_type(x))


def _check_finite_tree(tree, name):
  """Raises a ``ValueError`` naming the leaf where a concrete initial value is NaN or inf.

  Traced values are checked inside the program instead (``initial_values_not_finite``).
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    # Reduced where the values are (one scalar comes back), concrete also under an eager grad
    # and, for a value closed over by a jitted function, at trace time.
    with jax.ensure_compile_time_eval():
      finite = jnp.isfinite(leaf)
      all_finite = _schedules.concrete_value(jnp.all(finite))
    if all_finite == np.bool_(False):
      where = np.argwhere(~_schedules.concrete_value(finite))[:3].tolist()
      raise ValueError(f"{name}{jax.tree_util.keystr(path)} must be finite: it holds NaN or "
                       f"inf (at indices {where}); training from it cannot be reversed.")


def initial_values_not_finite(problem):
  """A bool scalar: an initial weight or optimizer state is NaN or inf (traced values; concrete
  ones were rejected by ``flatten_params`` and ``flatten_like``)."""
  running = [] if problem.running is None else problem.running.leaves
  return _reversible.any_non_finite(problem.params, problem.slots, running)


def flatten_params(params):
  """The parameter leaves (strongly typed) and their treedef; raises for bad params."""
  _check_float_tree(params, "params")
  params = jax.tree_util.tree_map(_strong, params)
  _check_finite_tree(params, "params")
  leaves, treedef = jax.tree_util.tree_flatten(params)
  if not leaves:
    raise ValueError("params must contain at least one array.")
  if not any(x.size for x in leaves):
    raise ValueError(f"params must hold at least one element; every leaf has size 0 "
                     f"({[x.shape for x in leaves]}).")
  return leaves, treedef


def flatten_like(tree, leaves, treedef, name):
  """An optimizer state ``tree`` (zeros if None) as leaves matching the parameter leaves."""
  if tree is None:
    return [_sharding.like(jnp.zeros_like(x), x) for x in leaves]
  _check_float_tree(tree, name)
  tree = jax.tree_util.tree_map(_strong, tree)
  _check_finite_tree(tree, name)
  state_leaves, state_treedef = jax.tree_util.tree_flatten(tree)
  if state_treedef != treedef:
    raise ValueError(f"{name} must have the structure of params ({treedef}), got "
                     f"{state_treedef}.")
  for p, v in zip(leaves, state_leaves):
    if jnp.shape(p) != jnp.shape(v) or jnp.result_type(p) != jnp.result_type(v):
      raise ValueError(f"{name} leaves must match params in shape and dtype: got "
                       f"{jnp.shape(v)} {jnp.result_type(v)} for {jnp.shape(p)} "
                       f"{jnp.result_type(p)}.")
  return [_sharding.like(v, p) for v, p in zip(state_leaves, leaves)]


def close_loss(loss_fn, leaves, treedef, hparams, precision="highest", running=None):
  """The loss on parameter leaves, traced once under the matrix-product ``precision``, which
  its products (and their derivatives) then keep; returns ``(_ClosedLoss, (hparams,
  consts))``. With ``running`` (a ``_model_state.Running``), see ``_close_loss``."""
  hparams = jax.tree_util.tree_map(jnp.asarray, hparams)

  def loss_on_leaves(w_leaves, h, t, r):
    params = jax.tree_util.tree_unflatten(treedef, w_leaves)
    if running is not None and running.in_loss:
      return loss_fn(params, h, t, jax.tree_util.tree_unflatten(running.treedef, r))
    return loss_fn(params, h, t)

  with matmul_precision(precision):
    closed_loss, consts = _close_loss(loss_on_leaves, leaves, hparams, running)
  return closed_loss, (hparams, consts)


def compute_dtypes(leaves):
  """Each leaf's compute dtype: the step computes in it (at least float32)."""
  return [_fixed_point.compute_dtype(jnp.result_type(x)) for x in leaves]


def _capacity_chunks(method, problem, layout, shards=None):
  """Static sizes of the bit stacks' tails (each device's), one per stage, from the numerators
  or ``min_decay``."""
  capacities = []
  for stage in _reversible.stages(problem.rule, layout.shapes, _running_layout(problem)):
    chunks = 0
    numerators = _reversible.stage_numerators(stage, problem.steps)
    sizes = _sharding.local_sizes(stage.shapes, _reversible.stage_shards(shards, stage))
    for size, n, bits in zip(sizes, numerators, stage.bits):
      known = _schedules.concrete_value(n)
      if known is None:
        if method.min_decay is None:
          raise ValueError(
              "a decay (momentum, b1, b2, learning_rate * weight_decay, ...) is traced (e.g. a "
              "hyperparameter under jax.jit), so the size of the bit stack cannot be computed "
              "from its values. Pass a static lower bound: "
              "method=revhyper.Reversible(min_decay=...).")
        floor = 2**(bits - _bitstack.head_bits(bits))
        n_min = max(floor, round(method.min_decay * 2**bits))
        known = np.full(problem.steps.t.shape, n_min)
      chunks += size * _bitstack.bucket(_bitstack.max_chunks_per_lane(known, bits))
    # A zero-size tail would make even the skipped gather ill-formed.
    capacities.append(max(chunks, 1))
  return tuple(capacities)


def _running_layout(problem):
  """The engine's static description of the problem's running averages, or None."""
  running = problem.running
  if running is None:
    return None
  return _reversible.RunningLayout(
      _reversible.Layout.of(jax.tree_util.tree_unflatten(running.treedef, running.leaves)),
      running.fractional_bits, running.in_loss)


def _shards(method, problem, layout):
  """The method's mesh and specs, one spec per parameter leaf, checked; None without a mesh."""
  typed = _sharding.from_types(problem.params, layout.shapes)
  if method.mesh is None:
    return typed
  if typed is not None and not _sharding.is_explicit(method.mesh):
    raise ValueError("params are laid out on a mesh with Explicit axes, but Reversible's mesh "
                     "has Auto axes; give it the params' mesh (or no mesh: the state is then "
                     "laid out like the params).")
  treedef, specs = method._spec_leaves  # pylint: disable=protected-access
  if treedef.num_leaves == 1 and treedef.num_nodes == 1:  # one spec (or None) for every leaf
    specs = specs * len(layout.shapes)
  elif treedef != problem.treedef:
    raise ValueError(f"param_specs must be one PartitionSpec or a pytree like params "
                     f"({problem.treedef}), got {treedef}.")
  return _sharding.make(method.mesh, specs, layout.shapes)


def _reversible_config(method, problem):
  layout = _reversible.Layout.of(problem.params)
  shards = _shards(method, problem, layout)
  numerators = jax.tree_util.tree_leaves((problem.steps.numerators,
                                          problem.steps.weight_numerators))
  traced = any(_schedules.concrete_value(n) is None for n in numerators)
  return _reversible.Config(
      loss_fn=problem.loss_fn,
      rule=problem.rule,
      layout=layout,
      num_steps=int(problem.steps.t.shape[0]),
      capacity_chunks=_capacity_chunks(method, problem, layout, shards),
      share_gradient=(jax.default_backend() == "cpu" if method.share_gradient is None
                      else method.share_gradient),
      checks=method.checks,
      check_reversal=method.check_reversal,
      min_decay=method.min_decay if traced else None,
      user_x64=bool(jax.config.jax_enable_x64),
      shards=shards,
      running=_running_layout(problem),
  )


@dataclasses.dataclass(frozen=True)
class _FloatConfig:
  """Everything static about one float-method run (hashable: a jit static argument)."""

  loss_fn: Any
  rule: Any
  dtypes: tuple  # the parameter leaves' dtypes
  method: Any  # Unroll or Checkpoint
  user_x64: bool
  running: Any = None  # the RunningLayout of the model state, or None


def _float_scan(config, params, slots, running, hparams, steps):
  """The rule's update in floats, differentiated by JAX (store-all or checkpointed).

  The state is carried in each leaf's compute dtype (at least float32), as the reversible
  method carries it on its fine grids; the loss sees the weights in the leaves' own dtypes.
  The running averages of the model state, if any, likewise.
  """
  cast = lambda leaves, dtypes: [x.astype(d) for x, d in zip(leaves, dtypes)]
  running_dtypes = () if config.running is None else config.running.layout.dtypes

  def loss_grad(w, r, t):
    with jax.enable_x64(config.user_x64):
      w_leaves = cast(w, config.dtypes)
      if config.running is None:
        g, statistics = jax.grad(config.loss_fn)(w_leaves, hparams, t), []
      else:
        reads = cast(r, running_dtypes) if config.running.in_loss else ()
        g, statistics = jax.grad(config.loss_fn, has_aux=True)(w_leaves, hparams, t, reads)
    return [x.astype(y.dtype) for x, y in zip(g, w)], statistics

  def step(carry, s):
    w, slots, r = carry
    g, statistics = loss_grad(w, r, s.t)
    w, slots = config.rule.update(s.coefs, w, slots, g)
    if config.running is not None:
      r = _reversible.running_update(s.running.decay, s.running.one_minus_decay, r, statistics)
    return (w, slots, r), None

  compute = [_fixed_point.compute_dtype(d) for d in config.dtypes]
  running_compute = [_fixed_point.compute_dtype(d) for d in running_dtypes]
  carry = (cast(params, compute), tuple(cast(x, compute) for x in slots),
           cast(running, running_compute))
  num_steps = steps.t.shape[0]
  method = config.method
  if isinstance(method, Unroll):
    w, slots, running = jax.lax.scan(step, carry, steps)[0]
  else:
    k = method.segment_length or math.ceil(math.sqrt(num_steps))
    if k == 1:
      w, slots, running = jax.lax.scan(jax.checkpoint(step), carry, steps)[0]
    else:
      @jax.checkpoint
      def segment(carry, segment_steps):
        return jax.lax.scan(step, carry, segment_steps)[0], None

      whole = num_steps // k * k
      head = jax.tree_util.tree_map(lambda x: x[:whole].reshape((-1, k) + x.shape[1:]), steps)
      carry = jax.lax.scan(segment, carry, head)[0]
      if whole < num_steps:
        carry = segment(carry, jax.tree_util.tree_map(lambda x: x[whole:], steps))[0]
      w, slots, running = carry
  return (cast(w, config.dtypes), tuple(cast(x, config.dtypes) for x in slots),
          cast(running, running_dtypes))


# One program per configuration, also where an eager jax.grad differentiates through it: its
# derivative programs are then cached with it, rather than retraced from a new scan body and
# compiled again on every call. Inlined under an outer jit.
_float_scan_jit = jax.jit(_float_scan, static_argnums=0)


def _run_float(config, params, slots, running, hparams, steps, invalid):
  outputs = _float_scan_jit(config, params, slots, running, hparams, steps)
  zero = jnp.zeros((), jnp.float32)
  false = jnp.zeros((), jnp.bool_)
  stats = Stats(zero, zero, zero, zero, false, false, invalid,
                _reversible.any_non_finite(outputs))
  failed = _reversible.check(stats, config.method.checks)
  return (*_errors.poison(failed, outputs), stats)


def _run_method(config, params, slots, running, hparams, steps, invalid):
  if isinstance(config, _reversible.Config):
    return _reversible.run(config, params, slots, running, hparams, steps, invalid)
  return _run_float(config, params, slots, running, hparams, steps, invalid)


# Eager calls go through one jitted program per static configuration, so that an identical
# call reuses it (the configs hash by value, the loss by its jaxpr).
_run_method_jit = jax.jit(_run_method, static_argnums=0)


def _at_top_level(args):
  """Whether no JAX transformation traces the call that receives ``args`` (eager values).

  JAX has no public query for the current trace, so this asks two public questions: whether
  an argument is a tracer (``vmap``, ``grad``, ``jvp`` and staging wrap what they trace), and
  whether a new constant becomes one (staging, i.e. ``jit``, ``eval_shape``, ``scan``, records
  every operation, even one on constants). A ``vmap`` or ``grad`` that none of the arguments
  depends on counts as eager: the call's values are concrete then. The probe's behaviour is
  checked against each transformation by ``tests/test_api.py``, so that a JAX release that
  changes it fails there.
  """
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(args)):
    return False
  return not isinstance(jnp.zeros((), jnp.int32), jax.core.Tracer)


STATISTICS_READ_RUNNING = (
    "the statistics that loss_fn(params, hparams, t, running) returns depend on the running "
    "averages it reads; then a step's average cannot be recovered from the next one, so the "
    "reversible method cannot run it. Compute the statistics from the weights and the batch "
    "alone (as BatchNorm does in training), or use method=revhyper.Checkpoint() (or 'unroll'), "
    "which differentiate the same run by storing (part of) its trajectory.")


def _check_reversible(problem):
  if problem.loss_fn.statistics_read_running:
    raise ValueError(STATISTICS_READ_RUNNING)
  if not problem.rule.reversible:
    raise ValueError(f"{problem.rule.why_not}. Use method=revhyper.Checkpoint() (or "
                     "'unroll'), which differentiate the same run by storing (part of) its "
                     "trajectory.")


def _with_initial_values_checked(problem):
  # Under jit, NaN or inf initial values fail the run as invalid inputs (named in the message),
  # before the fixed-point conversion reports them as an overflow.
  return problem._replace(invalid=problem.invalid | initial_values_not_finite(problem))


def _running_leaves(problem):
  return [] if problem.running is None else list(problem.running.leaves)


def _unflatten_running(problem, leaves):
  if problem.running is None:
    return None
  return jax.tree_util.tree_unflatten(problem.running.treedef, leaves)


def _opaque(x):
  return jax.lax.optimization_barrier(x) if not isinstance(x, jax.core.Tracer) else x


def _with_opaque_constants(problem):
  """The problem with concrete initial values passed through an optimization barrier.

  Inside a traced function (``jit``) a concrete initial value (weights or optimizer states
  closed over) is a constant of the program, and XLA evaluates at compile time whatever
  depends on constants alone: the finiteness check and, for exact methods, the conversion onto
  the integer grid, which its constant folder runs element by element (seconds per million
  weights). Nothing is gained by folding them: each runs once per call.
  """
  running = problem.running
  if running is not None:
    running = running._replace(leaves=[_opaque(x) for x in running.leaves])
  return problem._replace(params=[_opaque(x) for x in problem.params],
                          slots=tuple([_opaque(x) for x in s] for s in problem.slots),
                          running=running)


def run(method, problem):
  """Runs ``problem`` with ``method``; returns ``(params, slots, running, stats)`` as pytrees
  (``running``, the final running averages of the model state, is None without one)."""
  method = resolve_method(method)
  if not _at_top_level((problem.params, problem.slots, _running_leaves(problem))):
    problem = _with_opaque_constants(problem)
  problem = _with_initial_values_checked(problem)
  if isinstance(method, Reversible):
    _check_reversible(problem)
    config = _reversible_config(method, problem)
  else:
    config = _FloatConfig(problem.loss_fn, problem.rule,
                          tuple(jnp.result_type(x) for x in problem.params), method,
                          bool(jax.config.jax_enable_x64), _running_layout(problem))
  args = (problem.params, problem.slots, _running_leaves(problem), problem.hparams,
          problem.steps, problem.invalid)
  if _at_top_level(args):
    params_out, slots_out, running_out, stats = _run_method_jit(config, *args)
    if method.checks:
      _reversible.check(stats, True, getattr(config, "min_decay", None))
  else:
    params_out, slots_out, running_out, stats = _run_method(config, *args)
  stats = jax.tree_util.tree_map(jax.lax.stop_gradient, stats)
  unflatten = lambda leaves: jax.tree_util.tree_unflatten(problem.treedef, leaves)
  return (unflatten(params_out), tuple(unflatten(x) for x in slots_out),
          _unflatten_running(problem, running_out), stats)


# How round_trip builds each optimizer's Problem from its keyword arguments: filled in by the
# optimizer modules (name -> build(loss_fn, params, hparams, **kwargs) -> Problem).
OPTIMIZERS = {}


# Compiled as one program, so that a call outside jit does not dispatch op by op; cached like
# _run_method_jit.
_train_and_reverse_jit = jax.jit(_reversible.train_and_reverse, static_argnums=0)


def round_trip(loss_fn, params, hparams, *, optimizer="sgd", method="reversible", **kwargs):
  """Trains exactly, then runs training backwards without gradients: a check of exactness.

  Takes the arguments of ``sgd`` (or, with ``optimizer="adam"``, those of ``adam``; or, with
  a ``revhyper.optim`` optimizer, those of ``train``: ``num_steps``, ``opt_state``,
  ``model_state``). Use it to verify on your own problem that the reverse pass rebuilds the
  initial state bit for bit (``result.exact``), e.g. after changing ``loss_fn``. Identical
  calls reuse one compiled program. A run that fails (see ``sgd``) raises ``ReversalError``
  unless the method has ``checks=False``.

  Returns:
    ``RoundTrip``: final state, the rebuilt initial state (``velocity`` and
    ``initial_velocity`` hold the optimizer's state: sgd's velocity, adam's ``(mu, nu)``, a
    ``revhyper.optim`` optimizer's states by name; ``model_state`` and
    ``initial_model_state`` the running averages, with ``model_state``), ``exact`` (a bool
    scalar array: integer weights, optimizer states and running averages equal the initial
    ones and the bit stacks are empty) and the forward ``Stats``.

  Raises:
    ValueError: an unknown ``optimizer``, a method that is not reversible, or the optimizer's
      own argument errors.

  Example::

    >>> import jax.numpy as jnp, revhyper
    >>> rt = revhyper.round_trip(lambda w, h, t: jnp.sum(w ** 4), jnp.ones(5), None,
    ...                          num_steps=50, learning_rate=0.01, momentum=0.9)
    >>> bool(rt.exact)
    True
  """
  method = resolve_method(method)
  if not isinstance(method, Reversible):
    raise ValueError(f"round_trip needs a reversible method, got {method!r}.")
  if isinstance(optimizer, _optim.Optimizer):
    problem = optimizer_problem(loss_fn, params, hparams, optimizer,
                                precision=method.precision, **kwargs)
  elif isinstance(optimizer, str) and optimizer in OPTIMIZERS:
    if kwargs.get("model_state") is not None:
      raise ValueError(f"model_state needs a revhyper.optim optimizer (e.g. optimizer="
                       f"revhyper.optim.heavy_ball(...)), not optimizer={optimizer!r}.")
    kwargs.pop("model_state", None)
    problem = OPTIMIZERS[optimizer](loss_fn, params, hparams, precision=method.precision,
                                    **kwargs)
  else:
    raise ValueError(f"optimizer must be a revhyper.optim optimizer or one of "
                     f"{sorted(OPTIMIZERS)}, got {optimizer!r}.")
  _check_reversible(problem)
  problem = _with_initial_values_checked(problem)
  config = _reversible_config(method, problem)
  (params_out, slots_out, running_out), stats, rebuilt = _train_and_reverse_jit(
      config, problem.params, problem.slots, _running_leaves(problem), problem.hparams,
      problem.steps, problem.invalid)
  if method.checks:
    _reversible.check(stats, True, config.min_decay)
  unflatten = lambda leaves: jax.tree_util.tree_unflatten(problem.treedef, leaves)
  present = lambda slots: problem.present(tuple(unflatten(x) for x in slots))
  return RoundTrip(
      params=unflatten(params_out),
      velocity=present(slots_out),
      initial_params=unflatten(rebuilt.params),
      initial_velocity=present(rebuilt.slots),
      exact=rebuilt.exact,
      buffer_empty=rebuilt.buffer_empty,
      stats=stats,
      model_state=_unflatten_running(problem, running_out),
      initial_model_state=_unflatten_running(problem, rebuilt.running),
  )


class TrainResult(NamedTuple):
  """What ``train`` returns."""

  params: Any  # final weights w_T, a pytree like params (differentiable)
  opt_state: dict  # final optimizer states by name, pytrees like params (differentiable)
  stats: Stats  # diagnostics (not differentiable)
  # The final running averages, a pytree like model_state.initial (differentiable); None
  # without model_state.
  model_state: Any = None


def train(loss_fn, params, hparams, optimizer, *, num_steps, method="reversible",
          opt_state=None, model_state=None):
  r"""Trains with a ``revhyper.optim`` optimizer for ``num_steps`` steps, differentiably.

  ``jax.grad`` of anything computed from the result gives gradients with respect to
  ``params``, ``opt_state``, ``hparams`` and every coefficient of the optimizer (learning
  rates, decays, clipping thresholds; scalars, ``[T]`` schedules, per-leaf pytrees or
  schedule functions), whatever method runs it. With ``method="reversible"`` (the default)
  the backward pass runs training backwards exactly instead of storing it.

  Args:
    loss_fn: ``loss_fn(params, hparams, t) -> scalar`` training loss at step ``t``; the
      minibatch must be a pure function of ``t``.
    params: a pytree of float arrays, the initial weights.
    hparams: any pytree that ``loss_fn`` reads; integer leaves get no gradient.
    optimizer: a ``revhyper.optim`` optimizer, e.g. ``revhyper.optim.chain(
      revhyper.optim.clip_by_global_norm(1.0), revhyper.optim.adamw(1e-3))``.
    num_steps: the number of steps ``T`` (a static Python int, at least 1).
    method: ``"reversible"``, ``"unroll"``, ``"checkpoint"``, or a configured
      ``Reversible(...)``, ``Unroll()`` or ``Checkpoint(...)``.
    opt_state: the initial optimizer states, a dict from state names (e.g. ``"mu"``,
      ``"nu"``) to pytrees like ``params``; states not given start at 0.
    model_state: ``revhyper.RunningAverage(initial, decay)``: state of the model that
      training carries besides the weights, such as BatchNorm's running means and variances.
      ``loss_fn`` then returns ``(loss, statistics)``, this step's statistics (a pytree like
      ``initial``), and every step updates ``running = decay * running + (1 - decay) *
      statistics``; with ``in_loss=True`` the loss also reads the running averages
      (``loss_fn(params, hparams, t, running)``). Exact reversal carries them like an
      optimizer state. See the docs' "Model state" page.

  Returns:
    ``TrainResult(params, opt_state, stats, model_state)``: ``model_state`` is the final
    running averages (None without ``model_state``).

  Raises:
    ValueError: bad arguments, naming the argument; an optimizer that cannot run backwards
      exactly (its weight step reads the gradient itself: ``sgd`` without momentum or with
      Nesterov, ``lion``, ``rmsprop`` without momentum) with ``method="reversible"``.
    ReversalError: a failed run whose values are concrete (see ``revhyper.sgd``); under
      ``jit`` its outputs are NaN instead.

  Example::

    >>> import jax, jax.numpy as jnp, revhyper
    >>> from revhyper import optim
    >>> def loss_fn(w, l2, t):
    ...   return jnp.sum((w - 1.0) ** 2) + l2 * jnp.sum(w ** 2)
    >>> def meta(l2, lr):
    ...   opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(lr, weight_decay=0.01))
    ...   out = revhyper.train(loss_fn, jnp.zeros(3), l2, opt, num_steps=20)
    ...   return jnp.sum((out.params - 0.5) ** 2)
    >>> d_l2, d_lr = jax.grad(meta, argnums=(0, 1))(0.1, 0.01)
  """
  method = resolve_method(method)
  problem = optimizer_problem(loss_fn, params, hparams, optimizer, num_steps=num_steps,
                              opt_state=opt_state, precision=method.precision,
                              model_state=model_state)
  params_out, slots_out, running_out, stats = run(method, problem)
  return TrainResult(params_out, problem.present(slots_out), stats, running_out)
