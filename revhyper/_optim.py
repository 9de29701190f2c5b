"""Optimizers as data: ``Rule``s and ``GradientTransform``s, from which revhyper derives both
the float update and the exact reversible step.

An optax optimizer is a pair of functions ``(init, update)``; revhyper cannot run arbitrary
``update`` functions backwards. A reversible step needs to know which parts of it are rational
decays and which are additive increments, and in what order they happen. So a ``Rule``
declares them::

    g       = transforms(g_t)                         # clipping, coupled L2: functions of g_t, w_t
    s_i    <- b_i * s_i                  for every state i (all decays first)
    s_i    <- s_i + increment_i(c, g, s) for every state i, in the declared order
    w      <- (1 - decoupled_decay) * w  (only with decoupled weight decay)
    w      <- w + weight_step(c, s)

Each increment reads the gradient and the states as they are when it is added (the states
before it in the order already updated, the others only decayed), never its own state; the
weight step reads only the states after the step. Then the step runs backwards exactly: the
weights come back first (their step reads only the new states), then ``g_t`` is recomputed at
``w_t``, the increments are subtracted in the reverse order, and the bit stack undoes the
decays (Maclaurin, Duvenaud & Adams, ICML 2015, generalised beyond momentum SGD).

``Program`` is that description compiled for the engine (``_reversible``): hashable, so that a
rule is part of the static configuration of a compiled run, with the float update derived from
the same functions as the exact step, so that the two cannot disagree.
"""

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from revhyper import _bitstack
from revhyper import _fixed_point
from revhyper import _reversible
from revhyper import _schedules

# Coefficient kinds and what they must satisfy.
REAL = "real"  # finite (a learning rate may be negative: gradient ascent)
NONNEGATIVE = "nonnegative"  # finite and >= 0 (eps, clipping thresholds)
DECAY = "decay"  # a state's decay factor, in [0, 1]
_KINDS = (REAL, NONNEGATIVE, DECAY)


@dataclasses.dataclass(frozen=True)
class Coefficient:
  """A hyperparameter of a rule or transform: a scalar, a ``[T]`` schedule, a pytree like
  ``params`` of those, or a schedule function of the step (e.g. an optax schedule).

  Attributes:
    name: how the rule reads it (``c.<name>``).
    kind: ``"real"`` (finite), ``"nonnegative"`` (finite and at least 0) or ``"decay"`` (in
      ``[0, 1]``, the factor of a state's decay; the rule also reads ``c.one_minus_<name>``,
      the amount ``1 - b`` kept exactly, which ``1 - b`` computed in float32 is not for ``b``
      near 1).
  """

  name: str
  kind: str = REAL

  def __post_init__(self):
    if self.kind not in _KINDS:
      raise ValueError(f"Coefficient kind must be one of {_KINDS}, got {self.kind!r}.")


@dataclasses.dataclass(frozen=True)
class State:
  """An optimizer state beside the weights (a momentum, a moment), one array per leaf.

  Attributes:
    name: how the rule reads it (``s.<name>``) and how ``train`` returns it.
    decay: the name of the ``"decay"`` coefficient ``b`` it is multiplied by every step.
    fractional_bits: ``R`` of its exact grid ``2**-R``, whose range is ``|s| < 2**(61 - R)``
      (48: ``|s| < 8192``, for weights and momenta; Adam's second moment uses 60).
    nonnegative: its initial value must be at least 0 (a second moment).
  """

  name: str
  decay: str
  fractional_bits: int = _fixed_point.FRACTIONAL_BITS
  nonnegative: bool = False


class Namespace:
  """Read-only attribute access to named values: a rule's ``c`` (coefficients) and ``s``."""

  def __init__(self, values):
    object.__setattr__(self, "_values", dict(values))

  def __getattr__(self, name):
    try:
      return self._values[name]
    except KeyError:
      raise AttributeError(f"no coefficient or state named {name!r}; there are "
                           f"{sorted(self._values)}") from None

  def __setattr__(self, name, value):
    raise AttributeError("rule namespaces are read-only")

  def __repr__(self):
    return f"Namespace({sorted(self._values)})"


class Rule:
  """A reversible optimizer rule: its coefficients, states, increments and weight step.

  Subclass it as a frozen dataclass (a rule is part of a compiled program's static
  configuration: it must hash and compare by value) and declare:

  * ``coefficients``: a tuple of ``Coefficient``;
  * ``states``: a tuple of ``State``, in the order their increments are added;
  * ``increment(name, c, g, s)``: the float increment of state ``name`` after its decay, from
    the (transformed) gradient ``g`` and the states ``s``, as they are at that point;
  * ``weight_step(c, s, g, previous)``: the float increment of the weights, from the states
    after the step. Reading ``g`` or ``previous`` (the states before the step) makes a rule
    that only the float methods can run (``Unroll``, ``Checkpoint``);
  * optionally ``schedules(c)``: derived per-step schedules (e.g. bias corrections) from the
    whole ``[T]`` schedules of one leaf, as a dict;
  * optionally ``weight_decay``: a pair of coefficient names whose product is a decoupled
    weight decay ``w <- (1 - product) * w``, a rational multiply of the weights;
  * ``linear_in_gradient``: True when the step is linear in ``g`` with a Jacobian that reads
    neither ``g`` nor the states (momentum SGD); the backward pass then shares one
    forward-over-reverse pass between recomputing ``g_t`` and its Hessian-vector products.
  * ``decay_bits``: the decays' grid ``n / 2**decay_bits``: 31 (the default: ``1 - b``
    resolved to 4.7e-10) or 16 (the paper's momentum grid).

  ``c``, ``g`` and ``s`` hold one parameter leaf's values at one step (the functions are
  applied leaf by leaf); every function must be deterministic.
  """

  coefficients = ()
  states = ()
  weight_decay = None
  linear_in_gradient = False
  decay_bits = _schedules.DECAY_BITS
  # Increments between optimization barriers, so that XLA rounds them alike in both loops; a
  # rule whose increments are single multiplications may skip the fence and its cost.
  fence_increments = True

  def schedules(self, c):
    del c
    return {}

  def increment(self, name, c, g, s):
    raise NotImplementedError

  def weight_step(self, c, s, g, previous):
    raise NotImplementedError


class GradientTransform:
  """A stateless transformation of the gradient before the rule (clipping, coupled L2).

  Subclass it as a frozen dataclass, declare ``coefficients`` and implement
  ``apply(c, w, g)`` on lists of leaves (``c``'s attributes are lists of per-leaf values):
  a function of ``g_t``, ``w_t`` and the step's coefficients, recomputed exactly in the
  backward pass. ``linear``: the result is ``g`` times a factor that reads neither ``g`` nor
  ``w``, plus a term free of ``g``.
  """

  coefficients = ()
  linear = False

  def apply(self, c, w, g):
    raise NotImplementedError


class Optimizer:
  """A configured chain: gradient transforms, then one rule, with their coefficient values.

  Made by the constructors (``sgd``, ``adam``, ``chain``, ...) and run by ``revhyper.train``.
  Its coefficient values may be traced (``jax.grad`` with respect to them works).
  """

  def __init__(self, components, values):
    self.components = tuple(components)
    self.values = tuple(values)

  @property
  def rule(self):
    return self.components[-1] if self.components else None

  def __repr__(self):
    names = [type(c).__name__ for c in self.components]
    return f"Optimizer({' -> '.join(names)})"


def chain(*optimizers):
  """Composes gradient transforms with one optimizer, like ``optax.chain``.

  ``chain(clip_by_global_norm(1.0), adamw(1e-3))`` clips the gradient, then runs AdamW.
  Every element but the last must be a gradient transform (``clip``, ``clip_by_global_norm``,
  ``add_decayed_weights``); the last must hold a rule.

  Raises:
    ValueError: a rule before the end, or no rule.
  """
  components, values = [], []
  for i, opt in enumerate(optimizers):
    if not isinstance(opt, Optimizer):
      raise ValueError(f"chain takes revhyper.optim optimizers and transforms; argument {i} is "
                       f"{type(opt).__name__}.")
    components += opt.components
    values += opt.values
  for i, c in enumerate(components[:-1]):
    if isinstance(c, Rule):
      raise ValueError(f"chain: the rule {type(c).__name__} must come last (after it came "
                       f"{type(components[i + 1]).__name__}); revhyper runs one rule after "
                       "any gradient transforms, as in optax.chain(clip, adam).")
  if not components or not isinstance(components[-1], Rule):
    raise ValueError("chain needs an optimizer (sgd, adam, ...) as its last element.")
  return Optimizer(components, values)


def _dependencies(fn, args, names):
  """Which of the named inputs (keys of the dict ``args``) the output of ``fn`` reads.

  Traces ``fn`` once on abstract values and follows the data flow of its jaxpr (an equation
  that reads a dependent value makes all its outputs dependent: conservative for control
  flow).
  """
  keys = list(args)
  flat = [args[k] for k in keys]
  jaxpr = jax.make_jaxpr(lambda *xs: fn(dict(zip(keys, xs))))(*flat).jaxpr
  var_key = {}
  offset = 0
  for k, x in zip(keys, flat):
    n = len(jax.tree_util.tree_leaves(x))
    for v in jaxpr.invars[offset:offset + n]:
      var_key[v] = k
    offset += n
  reached = {v: {var_key[v]} & set(names) for v in jaxpr.invars}
  for eqn in jaxpr.eqns:
    deps = set()
    for v in eqn.invars:
      if type(v).__name__ != "Literal":
        deps |= reached.get(v, set())
    for v in eqn.outvars:
      reached[v] = deps
  out = set()
  for v in jaxpr.outvars:
    if type(v).__name__ != "Literal":
      out |= reached.get(v, set())
  return out


def _is_literal(v):
  return type(v).__name__ == "Literal"


def reaching(jaxpr, sources):
  """The variables of ``jaxpr`` whose values depend on the ``sources`` (some of its variables),
  by data flow: an equation that reads one makes all its outputs dependent (conservative for
  control flow)."""
  reached = set(sources)
  for eqn in jaxpr.eqns:
    hits = [not _is_literal(v) and v in reached for v in eqn.invars]
    if not any(hits):
      continue
    inner = _inner_jaxpr(eqn)
    if inner is None:
      reached.update(eqn.outvars)
      continue
    # A call (jit, checkpoint, custom derivatives): follow the data flow inside it, so that
    # a model wrapped in one jit keeps its outputs apart.
    inner_reached = reaching(inner, [v for v, hit in zip(inner.invars, hits) if hit])
    reached.update(o for o, v in zip(eqn.outvars, inner.outvars)
                   if not _is_literal(v) and v in inner_reached)
  return reached


def _inner_jaxpr(eqn):
  """The jaxpr that a call-like equation runs on exactly its inputs and outputs, or None."""
  for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    inner = eqn.params.get(name)
    inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr's
    if (inner is not None and hasattr(inner, "eqns") and len(inner.invars) == len(eqn.invars)
        and len(inner.outvars) == len(eqn.outvars)):
      return inner
  return None


def reads_any(jaxpr, sources, outputs):
  """Whether any of the ``outputs`` (variables of ``jaxpr``) depends on the ``sources``."""
  reached = reaching(jaxpr, sources)
  return any(not _is_literal(v) and v in reached for v in outputs)


@dataclasses.dataclass(frozen=True)
class Program:
  """A chain compiled for the engine: what ``_reversible`` runs and the float methods scan.

  Lists hold one entry per parameter leaf; ``coefs`` is a tuple with one dict per component
  (name -> per-leaf values), the rule's last.
  """

  transforms: tuple
  rule: Any
  weight_decay_on: bool  # the run decays its weights (a decoupled weight decay not known 0)
  reads: tuple  # per state: the indices of the states its increment reads
  reversible: bool
  why_not: str  # why the chain cannot be reversed ("" when it can)

  @property
  def slots(self):
    bits = self.rule.decay_bits
    return tuple(_reversible.Slot(s.name, s.fractional_bits, bits) for s in self.rule.states)

  @property
  def weight_decay_bits(self):
    return _schedules.DECAY_BITS if self.weight_decay_on else None

  @property
  def linear_in_gradient(self):
    return self.rule.linear_in_gradient and all(t.linear for t in self.transforms)

  @property
  def fence_increments(self):
    return self.rule.fence_increments

  @property
  def has_transforms(self):
    return bool(self.transforms)

  def _leaf(self, values, i):
    return Namespace({k: v[i] for k, v in values.items()})

  def transform_gradient(self, coefs, w, g):
    for transform, c in zip(self.transforms, coefs):
      g = transform.apply(Namespace(c), w, g)
    return g

  def slot_increment(self, i, coefs, g, slots):
    """State ``i``'s increments (per leaf) from ``g`` and the states (None where unread)."""
    name = self.rule.states[i].name
    out = []
    for leaf, x in enumerate(g):
      s = Namespace({st.name: slots[j][leaf] for j, st in enumerate(self.rule.states)
                     if slots[j] is not None})
      out.append(self.rule.increment(name, self._leaf(coefs[-1], leaf), x, s))
    return [y.astype(x.dtype) for y, x in zip(out, g)]

  def weight_increment(self, coefs, slots, g=None, previous=None):
    names = [st.name for st in self.rule.states]
    out = []
    # The exact step passes no g, but every rule it runs has a state (see _analyse).
    for leaf in range(len(slots[0]) if slots else len(g)):
      s = Namespace({n: slots[j][leaf] for j, n in enumerate(names)})
      prev = None if previous is None else Namespace(
          {n: previous[j][leaf] for j, n in enumerate(names)})
      out.append(self.rule.weight_step(self._leaf(coefs[-1], leaf), s,
                                       None if g is None else g[leaf], prev))
    return out

  def factors(self, coefs):
    """Each state's decay factor per leaf, as the float update multiplies by it."""
    rule = coefs[-1]
    return tuple(rule[st.decay] for st in self.rule.states)

  def update(self, coefs, w, slots, g):
    """One step in floats: ``(w_{t+1}, s_{t+1})`` from ``(w_t, s_t, g_t)`` (compute dtypes).

    Derived from the same functions as the exact step: decays, then the increments in order,
    then the weights' decay and step.
    """
    g = [x.astype(y.dtype) for x, y in zip(g, w)]
    if self.transforms:
      g = self.transform_gradient(coefs, w, g)
    previous = slots
    slots = [[f * x for f, x in zip(fs, xs)] for fs, xs in zip(self.factors(coefs), slots)]
    for i in range(len(slots)):
      inc = self.slot_increment(i, coefs, g, slots)
      slots[i] = [x + y for x, y in zip(slots[i], inc)]
    if self.weight_decay_on:
      w = [x - a * x for x, a in zip(w, coefs[-1]["decoupled_decay"])]
    step = self.weight_increment(coefs, slots, g, previous)
    return [x + y.astype(x.dtype) for x, y in zip(w, step)], tuple(slots)


def _scalar(dtype=jnp.float32):
  return jax.ShapeDtypeStruct((), dtype)


def _analyse(transforms, rule, coefficient_names):
  """``(reads, reversible, why_not)`` of a rule, from the data flow of its functions."""
  del transforms  # functions of g_t and w_t: recomputed exactly, whatever they read
  names = [s.name for s in rule.states]
  coefficients = {f"c:{n}": _scalar() for n in coefficient_names}
  c = lambda a: Namespace({n: a[f"c:{n}"] for n in coefficient_names})
  s_of = lambda a, prefix: Namespace({n: a[f"{prefix}:{n}"] for n in names})
  reads, why = [], ""
  if not names:
    why = (f"{type(rule).__name__} has no state, so its weight step must read the gradient "
           "g_t, which the reverse pass does not have before w_t is restored")
  for i, name in enumerate(names):
    args = {"g": _scalar(), **coefficients, **{f"s:{n}": _scalar() for n in names}}

    def increment(a, name=name):
      return rule.increment(name, c(a), a["g"], s_of(a, "s"))

    used = _dependencies(increment, args, [f"s:{n}" for n in names])
    reads.append(tuple(j for j, n in enumerate(names) if f"s:{n}" in used))
    if i in reads[-1] and not why:
      why = (f"{type(rule).__name__}: the increment of state {name!r} reads {name!r} itself, "
             "so subtracting it in the reverse pass would read a different value. Express it "
             "as a decay of the state plus an increment that reads only the gradient and the "
             "other states")
  args = {"g": _scalar(), **coefficients, **{f"s:{n}": _scalar() for n in names},
          **{f"p:{n}": _scalar() for n in names}}

  def weight_step(a):
    return rule.weight_step(c(a), s_of(a, "s"), a["g"], s_of(a, "p"))

  used = _dependencies(weight_step, args, ["g"] + [f"p:{n}" for n in names])
  if used and not why:
    what = "the gradient g_t" if "g" in used else "the states before the step"
    why = (f"{type(rule).__name__}: the weight step reads {what}, which the reverse pass "
           "does not have before w_t is restored (w_t = w_{t+1} - step(g(w_t), ...) is an "
           "implicit equation), so this optimizer cannot run backwards exactly")
  return tuple(reads), not why, why


@functools.lru_cache(maxsize=256)
def _analysis(transforms, rule, coefficient_names):
  return _analyse(transforms, rule, coefficient_names)


def program(optimizer, weight_decay_on):
  """The hashable ``Program`` of an ``Optimizer`` (its analysis is cached per rule)."""
  rule = optimizer.rule
  transforms = optimizer.components[:-1]
  try:
    hash(optimizer.components)
  except TypeError as e:
    raise ValueError(f"rules and transforms must be hashable (frozen dataclasses): {e}") from e
  names = tuple(c.name for c in rule.coefficients) + tuple(
      f"one_minus_{c.name}" for c in rule.coefficients if c.kind == DECAY) + _derived_names(rule)
  reads, reversible, why = _analysis(transforms, rule, names)
  return Program(tuple(transforms), rule, weight_decay_on, reads, reversible, why)


@functools.lru_cache(maxsize=256)
def _derived_names(rule):
  """The names of the rule's derived schedules, found by calling it on abstract schedules."""
  c = {x.name: jax.ShapeDtypeStruct((3,), jnp.float32) for x in rule.coefficients}
  c.update({f"one_minus_{x.name}": jax.ShapeDtypeStruct((3,), jnp.float32)
            for x in rule.coefficients if x.kind == DECAY})
  out = jax.eval_shape(lambda c: rule.schedules(Namespace(c)), c)
  return tuple(sorted(out))


class Prepared(NamedTuple):
  """What the engine needs from an optimizer's coefficients for one run."""

  coefs: tuple  # per component: dict name -> per-leaf [T] arrays in the compute dtypes
  numerators: tuple  # per state: per-leaf integer [T] arrays (the bit stack's bases)
  weight_numerators: Optional[list]  # per leaf, or None without decoupled weight decay
  invalid: Any  # bool []: a traced coefficient is invalid
  weight_decay_on: bool


def schedule_of(value, params, num_steps, name):
  """A coefficient value as a ``Schedule``; callables are evaluated at steps 0 .. T - 1."""
  if callable(value):
    steps = jnp.arange(num_steps, dtype=jnp.int32)
    try:
      value = jax.vmap(value)(steps)
    except Exception as e:  # noqa: BLE001  (any failure of a user's schedule function)
      raise ValueError(f"{name}: a schedule function must map a step (an int32 scalar) to a "
                       f"number; calling it failed: {e}") from e
    if jnp.shape(value) != (num_steps,):
      raise ValueError(f"{name}: a schedule function must return a scalar per step, got "
                       f"shape {jnp.shape(value)[1:]}.")
  return _schedules.broadcast(value, params, num_steps, name)


def _validate(schedule, coefficient, where):
  name = f"{where}{coefficient.name}"
  if coefficient.kind == DECAY:
    _schedules.check_range(schedule, name, 0, 1)
    return _schedules.outside(schedule.arrays, 0, 1)
  low = 0 if coefficient.kind == NONNEGATIVE else -np.inf
  for value in schedule.values:
    if value is not None and not np.all(np.isfinite(value) & (value >= low)):
      bad = value[~(np.isfinite(value) & (value >= low))]
      rule = "finite" if low == -np.inf else "finite and at least 0"
      raise ValueError(f"{name} must be {rule}, got {bad[:5]}.")
  high = np.finfo(np.float32).max
  return _schedules.outside(schedule.arrays, low if low == 0 else -high, high)


def prepare(optimizer, params, leaves, num_steps):
  """Broadcasts, validates and quantizes every coefficient of the chain, once.

  The decays' numerators are derived here and nowhere else: the float methods, the exact
  step, the capacity of the bit stack and the statistics all read these.
  """
  compute = [_fixed_point.compute_dtype(jnp.result_type(x)) for x in leaves]
  cast = lambda arrays: [x.astype(d) for x, d in zip(arrays, compute)]
  invalid = jnp.zeros((), jnp.bool_)
  coefs = []
  rule = optimizer.rule
  for k, (component, values) in enumerate(zip(optimizer.components, optimizer.values)):
    where = "" if k == len(optimizer.components) - 1 else f"{type(component).__name__}: "
    schedules = {}
    for coefficient in component.coefficients:
      schedule = schedule_of(values[coefficient.name], params, num_steps, coefficient.name)
      invalid |= _validate(schedule, coefficient, where)
      schedules[coefficient.name] = schedule
    if component is not rule:
      coefs.append({n: cast(s.arrays) for n, s in schedules.items()})
      continue
    out, quantized, from_amounts = {}, {}, []
    for coefficient in rule.coefficients:
      schedule = schedules[coefficient.name]
      if coefficient.kind != DECAY:
        out[coefficient.name] = schedule.arrays
        continue
      if rule.decay_bits == _bitstack.DENOMINATOR_BITS:
        momentum = _schedules.quantize_momentum(schedule)
        factors = momentum.values
        out[coefficient.name] = factors
        out[f"one_minus_{coefficient.name}"] = [1 - x for x in factors]  # exact for n / 2**16
        quantized[coefficient.name] = momentum.numerators
      else:
        amounts = _schedules.quantize_decay(
            _schedules.combine(lambda b: 1 - b, schedule), coefficient.name)
        out[f"one_minus_{coefficient.name}"] = amounts.amounts
        out[coefficient.name] = [1 - x for x in amounts.amounts]
        from_amounts.append(coefficient.name)
        quantized[coefficient.name] = amounts.numerators
    derived = [rule.schedules(Namespace({n: v[i] for n, v in out.items()}))
               for i in range(len(leaves))]
    for name in _derived_names(rule):
      out[name] = [d[name] for d in derived]
    out = {n: cast(v) for n, v in out.items()}
    for name in from_amounts:
      # The factor 1 - amount, rounded once in the compute dtype, as the float update uses it.
      out[name] = [1 - x for x in out[f"one_minus_{name}"]]
    weight_numerators, weight_decay_on = None, False
    if rule.weight_decay is not None:
      rate, decay = (schedules[n] for n in rule.weight_decay)
      amounts, weight_numerators, bad = quantize_weight_decay(rate, decay, compute)
      invalid |= bad
      if amounts is not None:
        out["decoupled_decay"] = amounts
        weight_decay_on = True
    coefs.append(out)
    numerators = tuple(quantized[s.decay] for s in rule.states)
  return Prepared(tuple(coefs), numerators, weight_numerators, invalid, weight_decay_on)


def quantize_weight_decay(learning_rates, weight_decays, compute):
  """Decoupled weight decay as a rational decay: ``1 - learning_rate * weight_decay`` per leaf
  and step, quantized once like every decay.

  Args:
    learning_rates, weight_decays: ``_schedules.Schedule``s.
    compute: the leaves' compute dtypes.

  Returns:
    ``(amounts, numerators, invalid)``: the quantized amounts ``learning_rate * weight_decay``
    in the compute dtypes, their numerators, and a bool scalar that is True where a traced
    amount leaves ``[0, 1]``; ``(None, None, False)`` where the weight decay is known to be 0,
    so that the optimizer skips the decay and runs bit for bit as without it.

  Raises:
    ValueError: a concrete ``learning_rate * weight_decay`` outside ``[0, 1]``.
  """
  if all(v is not None and not v.any() for v in weight_decays.values):
    return None, None, jnp.zeros((), jnp.bool_)
  amounts = _schedules.combine(lambda a, l: a * l, learning_rates, weight_decays)
  _schedules.check_range(amounts, "learning_rate * weight_decay", 0, 1)
  quantized = _schedules.quantize_decay(amounts, "1 - learning_rate * weight_decay")
  return ([x.astype(d) for x, d in zip(quantized.amounts, compute)], quantized.numerators,
          _schedules.outside(amounts.arrays, 0, 1))


def _optimizer(component, **values):
  return Optimizer((component,), (values,))


# --- Built-in gradient transforms -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ClipByGlobalNorm(GradientTransform):
  """``g * min(1, max_norm / ||g||)`` with ``||g||`` over all leaves (``optax``'s)."""

  coefficients = (Coefficient("max_norm", NONNEGATIVE),)

  def apply(self, c, w, g):
    del w
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in g))
    max_norm = c.max_norm[0]
    # optax: updates unchanged below the threshold, else scaled onto it.
    return [jnp.where(norm < max_norm, x, x * (max_norm / norm).astype(x.dtype)) for x in g]


@dataclasses.dataclass(frozen=True)
class Clip(GradientTransform):
  """``clip(g, -max_delta, max_delta)`` element by element (``optax.clip``)."""

  coefficients = (Coefficient("max_delta", NONNEGATIVE),)

  def apply(self, c, w, g):
    del w
    return [jnp.clip(x, -m, m) for x, m in zip(g, c.max_delta)]


@dataclasses.dataclass(frozen=True)
class AddDecayedWeights(GradientTransform):
  """``g + weight_decay * w``: a coupled L2 penalty on the gradient (``optax``'s, placed
  before the rule)."""

  coefficients = (Coefficient("weight_decay"),)
  linear = True

  def apply(self, c, w, g):
    return [x + d * y.astype(x.dtype) for x, d, y in zip(g, c.weight_decay, w)]


def clip_by_global_norm(max_norm):
  """Scales the gradient onto the ball ``||g|| <= max_norm`` (norm over all leaves)."""
  return _optimizer(ClipByGlobalNorm(), max_norm=max_norm)


def clip(max_delta):
  """Clips every gradient element to ``[-max_delta, max_delta]``."""
  return _optimizer(Clip(), max_delta=max_delta)


def add_decayed_weights(weight_decay):
  """Adds ``weight_decay * w`` to the gradient (coupled L2), in front of a rule in ``chain``.

  For AdamW's decoupled decay use ``adamw(..., weight_decay=...)``.
  """
  return _optimizer(AddDecayedWeights(), weight_decay=weight_decay)


# --- Built-in rules -------------------------------------------------------------------------

_LR = Coefficient("learning_rate")


@dataclasses.dataclass(frozen=True)
class HeavyBall(Rule):
  """The paper's momentum SGD: ``v <- gamma v - (1 - gamma) g; w <- (1 - lr wd) w + lr v``."""

  coefficients = (_LR, Coefficient("momentum", DECAY), Coefficient("weight_decay"))
  states = (State("velocity", "momentum"),)
  weight_decay = ("learning_rate", "weight_decay")
  decay_bits = _bitstack.DENOMINATOR_BITS  # the paper's n / 2**16
  linear_in_gradient = True
  fence_increments = False  # (1 - gamma) * g and lr * v: one multiplication each

  def increment(self, name, c, g, s):
    # 1 - gamma is exact for gamma = n / 2**16.
    return -((1 - c.momentum) * g)

  def weight_step(self, c, s, g, previous):
    return c.learning_rate * s.velocity


@dataclasses.dataclass(frozen=True)
class Trace(Rule):
  """optax's SGD: ``m <- mu m + g``, ``w <- w - lr m`` (or ``- lr (mu m + g)``, Nesterov);
  without momentum ``w <- w - lr g``."""

  momentum: bool = True
  nesterov: bool = False

  @property
  def coefficients(self):
    return (_LR,) + ((Coefficient("momentum", DECAY),) if self.momentum else ())

  @property
  def states(self):
    return (State("trace", "momentum"),) if self.momentum else ()

  linear_in_gradient = True
  fence_increments = False

  def increment(self, name, c, g, s):
    return g

  def weight_step(self, c, s, g, previous):
    if not self.momentum:
      return -c.learning_rate * g
    if self.nesterov:
      return -c.learning_rate * (c.momentum * s.trace + g)
    return -c.learning_rate * s.trace


def _bias_correction(amounts):
  """``1 - prod_{s <= t} (1 - c_s)``, accurately for ``c`` near 0 (``b`` near 1)."""
  return -jnp.expm1(jnp.cumsum(jnp.log1p(-amounts)))


class _BiasCorrectedMoments(Rule):
  """A first moment ``mu`` decaying by ``b1`` and a second ``nu`` by ``b2``, with optax's bias
  corrections ``1 - prod_{s <= t} b_s``: the states of Adam and AdaBelief."""

  states = (State("mu", "b1", _fixed_point.FIRST_MOMENT_BITS),
            State("nu", "b2", _fixed_point.SECOND_MOMENT_BITS, nonnegative=True))

  def schedules(self, c):
    return {"correction1": _bias_correction(c.one_minus_b1),
            "correction2": _bias_correction(c.one_minus_b2)}


@dataclasses.dataclass(frozen=True)
class Adam(_BiasCorrectedMoments):
  """Adam with bias correction (optax's), and AdamW's decoupled weight decay."""

  coefficients = (_LR, Coefficient("b1", DECAY), Coefficient("b2", DECAY),
                  Coefficient("eps", NONNEGATIVE), Coefficient("eps_root", NONNEGATIVE),
                  Coefficient("weight_decay"))
  weight_decay = ("learning_rate", "weight_decay")

  def increment(self, name, c, g, s):
    if name == "mu":
      return c.one_minus_b1 * g
    return c.one_minus_b2 * (g * g)

  def weight_step(self, c, s, g, previous):
    return -c.learning_rate * (s.mu / c.correction1) / (
        jnp.sqrt(s.nu / c.correction2 + c.eps_root) + c.eps)


@dataclasses.dataclass(frozen=True)
class RMSProp(Rule):
  """optax's RMSProp (``eps_in_sqrt``, no bias correction), centered or not, with momentum:
  ``nu <- d nu + (1 - d) g**2``; ``m <- mu m - lr g / sqrt(nu - mg**2 + eps)``; ``w <- w + m``.
  Without momentum the weight step reads ``g``: float methods only."""

  centered: bool = False
  momentum: bool = True

  @property
  def coefficients(self):
    return (_LR, Coefficient("decay", DECAY), Coefficient("eps", NONNEGATIVE)) + (
        (Coefficient("momentum", DECAY),) if self.momentum else ())

  @property
  def states(self):
    states = (State("nu", "decay", _fixed_point.SECOND_MOMENT_BITS, nonnegative=True),)
    if self.centered:
      states = (State("mg", "decay", _fixed_point.FIRST_MOMENT_BITS),) + states
    if self.momentum:
      states += (State("trace", "momentum"),)
    return states

  def _scaled(self, c, s, g):
    nu = s.nu - s.mg * s.mg if self.centered else s.nu
    return -c.learning_rate * g * jax.lax.rsqrt(nu + c.eps)

  def increment(self, name, c, g, s):
    if name == "mg":
      return c.one_minus_decay * g
    if name == "nu":
      return c.one_minus_decay * (g * g)
    return self._scaled(c, s, g)

  def weight_step(self, c, s, g, previous):
    return s.trace if self.momentum else self._scaled(c, s, g)


@dataclasses.dataclass(frozen=True)
class AdaBelief(_BiasCorrectedMoments):
  """optax's AdaBelief: ``mu <- b1 mu + (1 - b1) g``; ``s <- b2 s + (1 - b2)(g - mu)**2 +
  eps_root`` (with the new ``mu``); ``w <- w - lr mu_hat / (sqrt(s_hat) + eps)``."""

  coefficients = (_LR, Coefficient("b1", DECAY), Coefficient("b2", DECAY),
                  Coefficient("eps", NONNEGATIVE), Coefficient("eps_root", NONNEGATIVE))

  def increment(self, name, c, g, s):
    if name == "mu":
      return c.one_minus_b1 * g
    error = g - s.mu
    return c.one_minus_b2 * (error * error) + c.eps_root

  def weight_step(self, c, s, g, previous):
    return -c.learning_rate * (s.mu / c.correction1) / (jnp.sqrt(s.nu / c.correction2) + c.eps)


@dataclasses.dataclass(frozen=True)
class Lion(Rule):
  """optax's Lion: ``w <- w - lr (sign(b1 m + (1 - b1) g) + wd w)``; ``m <- b2 m + (1 - b2) g``.

  Its weight step reads ``g_t`` and the momentum before the step: float methods only."""

  coefficients = (_LR, Coefficient("b1", DECAY), Coefficient("b2", DECAY),
                  Coefficient("weight_decay"))
  states = (State("mu", "b2"),)
  weight_decay = ("learning_rate", "weight_decay")

  def increment(self, name, c, g, s):
    return c.one_minus_b2 * g

  def weight_step(self, c, s, g, previous):
    return -c.learning_rate * jnp.sign(c.b1 * previous.mu + c.one_minus_b1 * g)


def heavy_ball(learning_rate, momentum, weight_decay=0.0):
  r"""Momentum SGD in the paper's convention (Maclaurin et al. 2015), as ``revhyper.sgd`` runs:

  .. math:: v \leftarrow \gamma v - (1 - \gamma) g, \quad
            w \leftarrow (1 - \alpha\lambda) w + \alpha v

  ``momentum`` is rounded to multiples of ``2**-16``; the decoupled ``weight_decay``'s
  ``learning_rate * weight_decay`` to multiples of ``2**-31``. State: ``velocity``.
  """
  return _optimizer(HeavyBall(), learning_rate=learning_rate, momentum=momentum,
                    weight_decay=weight_decay)


def sgd(learning_rate, momentum=None, nesterov=False):
  r"""optax's SGD: ``m <- momentum * m + g``, ``w <- w - learning_rate * m`` (state ``trace``).

  ``momentum`` is rounded to multiples of ``2**-31`` in ``1 - momentum``. Without momentum, or
  with ``nesterov=True`` (``w <- w - lr (momentum * m + g)``), the weight step reads the
  gradient ``g_t`` itself: no exact inverse exists, so only ``Unroll`` and ``Checkpoint`` run
  them (``Reversible`` raises a ``ValueError`` that says so).
  """
  if momentum is None:
    if nesterov:
      raise ValueError("sgd: nesterov=True needs a momentum.")
    return _optimizer(Trace(momentum=False), learning_rate=learning_rate)
  return _optimizer(Trace(nesterov=bool(nesterov)), learning_rate=learning_rate,
                    momentum=momentum)


def adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0):
  """optax's Adam (bias-corrected moments ``mu`` and ``nu``), as ``revhyper.adam`` runs it."""
  return _optimizer(Adam(), learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
                    eps_root=eps_root, weight_decay=0.0)


def adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, weight_decay=1e-4):
  """optax's AdamW: Adam plus the decoupled decay ``w <- (1 - lr * weight_decay) w``."""
  return _optimizer(Adam(), learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
                    eps_root=eps_root, weight_decay=weight_decay)


def rmsprop(learning_rate, decay=0.9, eps=1e-8, momentum=None, centered=False):
  """optax's RMSProp (``eps`` inside the square root, no bias correction, ``initial_scale``
  0): states ``nu`` (and ``mg`` when centered, ``trace`` with momentum). Without momentum the
  weight step reads the gradient: float methods only.
  """
  values = dict(learning_rate=learning_rate, decay=decay, eps=eps)
  if momentum is not None:
    values["momentum"] = momentum
  return _optimizer(RMSProp(centered=bool(centered), momentum=momentum is not None), **values)


def adabelief(learning_rate, b1=0.9, b2=0.999, eps=1e-16, eps_root=1e-16):
  """optax's AdaBelief (states ``mu`` and ``nu``, the belief in the gradient)."""
  return _optimizer(AdaBelief(), learning_rate=learning_rate, b1=b1, b2=b2, eps=eps,
                    eps_root=eps_root)


def lion(learning_rate, b1=0.9, b2=0.99, weight_decay=1e-3):
  """optax's Lion (state ``mu``). Its weight step reads ``g_t`` and the momentum before the
  step, whose value the step then overwrites: float methods only (``Unroll``, ``Checkpoint``).
  """
  return _optimizer(Lion(), learning_rate=learning_rate, b1=b1, b2=b2,
                    weight_decay=weight_decay)
