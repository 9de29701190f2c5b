"""``check_rule``: a rule author's first test, on a small problem, in one call."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from revhyper import _optim
from revhyper import _training


class RuleCheck(NamedTuple):
  """What ``check_rule`` measured."""

  round_trip_exact: bool  # training run backwards rebuilt the initial state bit for bit
  relative_errors: dict  # input -> |reversible - unroll| / |unroll| of its hypergradient
  bits_over_bound: float  # bits stored / the information bound of the decays (1 if none)

  @property
  def ok(self):
    return self.round_trip_exact and max(self.relative_errors.values()) <= _TOLERANCE


# Reversible and unroll run the same float32 dynamics; on this problem their hypergradients
# agree to about 1e-6 (the grid, 2**-48, and float32 rounding of the backward passes).
_TOLERANCE = 1e-4


def _problem(seed):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((16, 5)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((16,)), jnp.float32)
  params = {"w": jnp.asarray(0.3 * rng.standard_normal((5, 3)), jnp.float32),
            "v": jnp.asarray(0.3 * rng.standard_normal((3,)), jnp.float32)}

  def loss_fn(p, l2, t):
    rows = (jnp.arange(8) + 8 * (t % 2)) % 16  # the minibatch: a pure function of t
    pred = jnp.tanh(x[rows] @ p["w"]) @ p["v"]
    return jnp.mean((pred - y[rows]) ** 2) + l2 * sum(jnp.sum(a ** 2) for a in jax.tree.leaves(p))

  def validation(p):
    return jnp.mean((jnp.tanh(x @ p["w"]) @ p["v"] - y) ** 2)

  return params, loss_fn, validation


def check_rule(optimizer, *, num_steps=50, seed=0):
  """Checks a ``revhyper.optim`` optimizer (e.g. one built on a new ``Rule``) end to end.

  On a small tanh regression it runs the optimizer forward and backwards exactly
  (``round_trip``), and compares the reversible hypergradients of a validation loss with
  respect to the initial weights, an L2 penalty and every float coefficient of the optimizer
  against store-all backprop (``Unroll``) of the same float dynamics. A rule whose functions
  are not deterministic, or that declares ``linear_in_gradient`` wrongly, fails here.

  Args:
    optimizer: a ``revhyper.optim`` optimizer with concrete coefficient values.
    num_steps: the length of the training run.
    seed: the problem's data and initial weights.

  Returns:
    ``RuleCheck``; its ``ok`` is True when the round trip is exact and every hypergradient is
    within 1e-4 of unroll's.

  Raises:
    ValueError: the optimizer cannot run backwards exactly (as ``train`` raises).
  """
  params, loss_fn, validation = _problem(seed)
  l2 = jnp.float32(1e-3)
  rt = _training.round_trip(loss_fn, params, l2, optimizer=optimizer, num_steps=num_steps)
  exact = bool(rt.exact) and all(
      bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(rt.initial_params),
                                            jax.tree.leaves(params)))
  bound = float(rt.stats.information_bound_bits)
  ratio = float(rt.stats.bits_stored) / bound if bound > 0 else 1.0

  keys, values = [], []
  for k, component_values in enumerate(optimizer.values):
    for name, value in component_values.items():
      if not callable(value) and jnp.issubdtype(jnp.result_type(value), jnp.floating):
        keys.append((k, name))
        values.append(jnp.asarray(value, jnp.float32))
  decays = [np.min(np.asarray(optimizer.values[k][c.name]))
            for k, comp in enumerate(optimizer.components) if isinstance(comp, _optim.Rule)
            for c in comp.coefficients if c.kind == _optim.DECAY]
  min_decay = max(min(decays, default=1.0) - 1e-3, 0.0)

  def meta(p, h, coefficient_values, method):
    new_values = [dict(v) for v in optimizer.values]
    for (k, name), value in zip(keys, coefficient_values):
      new_values[k][name] = value
    opt = _optim.Optimizer(optimizer.components, new_values)
    out = _training.train(loss_fn, p, h, opt, num_steps=num_steps, method=method)
    return validation(out.params)

  grad = jax.jit(jax.grad(meta, (0, 1, 2)), static_argnums=3)
  reversible = grad(params, l2, values,
                    _training.Reversible(min_decay=min_decay, check_reversal=True))
  unroll = grad(params, l2, values, "unroll")
  names = ["params", "l2"] + [f"{type(optimizer.components[k]).__name__}.{n}" for k, n in keys]
  got = [reversible[0], reversible[1]] + list(reversible[2])
  want = [unroll[0], unroll[1]] + list(unroll[2])
  errors = {}
  for name, a, b in zip(names, got, want):
    a = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(a)])
    b = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(b)])
    errors[name] = float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))
  return RuleCheck(exact, errors, ratio)
