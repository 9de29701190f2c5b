"""The hypergradient path is exact where every bit stack spills: optimizers x gradient forms.

A lane holds about 32 bits in its head before its first spill, so a run that stores less never
exercises the tail: neither the forward spills nor the backward refills. Every cell here
stores at least ``MIN_SPILLS`` chunks per lane in every stack, takes the hypergradient with
``Reversible(check_reversal=True)`` under ``jit`` (a reverse pass that missed a bit gives NaN)
with the decays traced, and compares it with store-all backprop of the same dynamics in
float64. Compiled as users compile (XLA's default optimisation): exactness depends on it.

The rows are ``OPTIMIZERS``, a table: an optimizer joins the matrix by adding an entry (a
function that calls the public API, its coefficients and the decays its stacks store). The
columns are the two forms of the gradient in the backward pass (``share_gradient``).
"""

import dataclasses
import functools
import math
from typing import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import revhyper

MIN_SPILLS = 5
CHUNK_BITS = 32
# Each coefficient's hypergradient (a scalar) against float64 store-all backprop.
COEF_RTOL = 1e-4


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """One row of the matrix.

  Attributes:
    run: ``run(loss_fn, params, hparams, num_steps, method, **coefs)``, the public call;
      returns a result with ``.params`` and ``.stats``.
    round_trip: ``round_trip(loss_fn, params, hparams, num_steps, **coefs)``: the same run
      trained and reversed by ``revhyper.round_trip``.
    coefs: the coefficients, passed traced (each gets a hypergradient).
    decays: ``coefs -> [factor, ...]``: the decay each lane of each stack is multiplied by
      every step (one entry per kind of lane: a velocity, a moment, a decayed weight).
    num_steps: the run's length: long enough for ``MIN_SPILLS`` in every lane.
    min_momentum: a lower bound on the traced decays, for the bit stack's size.
    rtol: the hypergradient's relative L2 distance from float64 store-all backprop.
  """

  run: Callable
  round_trip: Callable
  coefs: dict
  decays: Callable
  num_steps: int
  min_momentum: float
  rtol: float


def _sgd(loss_fn, params, hparams, num_steps, method, **coefs):
  return revhyper.sgd(loss_fn, params, hparams, num_steps=num_steps, method=method, **coefs)


def _sgd_round_trip(loss_fn, params, hparams, num_steps, **coefs):
  return revhyper.round_trip(loss_fn, params, hparams, num_steps=num_steps, **coefs)


# eps_root: no weight's second moment stays at 0, where sqrt's derivative is infinite.
def _adam(loss_fn, params, hparams, num_steps, method, **coefs):
  return revhyper.adam(loss_fn, params, hparams, num_steps=num_steps, method=method,
                       eps_root=1e-8, **coefs)


def _adam_round_trip(loss_fn, params, hparams, num_steps, **coefs):
  return revhyper.round_trip(loss_fn, params, hparams, optimizer="adam", num_steps=num_steps,
                             eps_root=1e-8, **coefs)


def _weight_decay(c):
  return 1 - c["learning_rate"] * c["weight_decay"]


def _optim(make):
  """A row for an optimizer of revhyper.optim, run by revhyper.train: ``make(**coefs)``."""

  def run(loss_fn, params, hparams, num_steps, method, **coefs):
    return revhyper.train(loss_fn, params, hparams, make(**coefs), num_steps=num_steps,
                          method=method)

  def round_trip(loss_fn, params, hparams, num_steps, **coefs):
    return revhyper.round_trip(loss_fn, params, hparams, optimizer=make(**coefs),
                               num_steps=num_steps)

  return run, round_trip


_OPTAX_SGD = _optim(lambda learning_rate, momentum: revhyper.optim.sgd(learning_rate, momentum))
# A large eps keeps 1 / sqrt(second moment) bounded: with a tiny one, low decays let the second
# moment of some weights fall near 0 and the hypergradients turn chaotic (above 1e16, float64
# included), which says nothing about exactness.
_RMSPROP = _optim(lambda learning_rate, decay, momentum: revhyper.optim.rmsprop(
    learning_rate, decay=decay, eps=1e-2, momentum=momentum, centered=True))
_ADABELIEF = _optim(lambda learning_rate, b1, b2: revhyper.optim.adabelief(
    learning_rate, b1=b1, b2=b2, eps=0.1, eps_root=1e-8))
_CLIPPED_ADAMW = _optim(lambda learning_rate, b1, b2, weight_decay: revhyper.optim.chain(
    revhyper.optim.clip_by_global_norm(0.05),
    revhyper.optim.adamw(learning_rate, b1=b1, b2=b2, eps_root=1e-8,
                         weight_decay=weight_decay)))


OPTIMIZERS = {
    # log2(1/0.3) = 1.74 bits per lane and step: a spill every 18 steps.
    "sgd_low_momentum": Optimizer(
        _sgd, _sgd_round_trip, dict(learning_rate=0.05, momentum=0.3),
        lambda c: [c["momentum"]], num_steps=150, min_momentum=0.25, rtol=1e-5),
    # The weights' own stack: 1 - lr * wd = 0.75, 0.42 bits per lane and step.
    "sgd_weight_decay": Optimizer(
        _sgd, _sgd_round_trip, dict(learning_rate=0.05, momentum=0.6, weight_decay=5.0),
        lambda c: [c["momentum"], _weight_decay(c)], num_steps=400, min_momentum=0.5,
        rtol=1e-5),
    # A small learning rate keeps the runs short of the jitter around a minimum, where Adam's
    # hypergradients turn chaotic.
    "adam": Optimizer(
        _adam, _adam_round_trip, dict(learning_rate=0.001, b1=0.4, b2=0.6),
        lambda c: [c["b1"], c["b2"]], num_steps=250, min_momentum=0.3, rtol=1e-4),
    "adamw": Optimizer(
        _adam, _adam_round_trip, dict(learning_rate=0.002, b1=0.5, b2=0.55, weight_decay=125.0),
        lambda c: [c["b1"], c["b2"], _weight_decay(c)], num_steps=400, min_momentum=0.4,
        rtol=1e-4),
    # The optimizers of revhyper.optim, as optax names them.
    "optax_sgd": Optimizer(
        *_OPTAX_SGD, dict(learning_rate=0.02, momentum=0.3), lambda c: [c["momentum"]],
        num_steps=150, min_momentum=0.25, rtol=1e-5),
    "rmsprop_centered": Optimizer(
        *_RMSPROP, dict(learning_rate=0.001, decay=0.5, momentum=0.5),
        lambda c: [c["decay"], c["decay"], c["momentum"]], num_steps=250, min_momentum=0.4,
        rtol=1e-4),
    "adabelief": Optimizer(
        *_ADABELIEF, dict(learning_rate=0.001, b1=0.4, b2=0.6), lambda c: [c["b1"], c["b2"]],
        num_steps=250, min_momentum=0.3, rtol=1e-4),
    "clip_by_global_norm+adamw": Optimizer(
        *_CLIPPED_ADAMW, dict(learning_rate=0.002, b1=0.5, b2=0.55, weight_decay=125.0),
        lambda c: [c["b1"], c["b2"], _weight_decay(c)], num_steps=400, min_momentum=0.4,
        rtol=1e-4),
}
# Per row, the cell in the quick loop (None: none); the other form runs with the slow tests.
QUICK_FORM = {"sgd_low_momentum": None, "sgd_weight_decay": None, "adam": True,
              "adamw": None, "optax_sgd": None, "rmsprop_centered": None, "adabelief": None,
              "clip_by_global_norm+adamw": None}


def loss_fn(w, h, t):
  """A small two-layer net on a minibatch that is a function of ``t``; 30 weights."""
  dtype = w["w1"].dtype
  x = jnp.cos(jnp.arange(8, dtype=dtype)[:, None] * 0.7 + jnp.arange(4, dtype=dtype)
              + t.astype(dtype) * 0.3)
  y = jnp.sin(x[:, 0] - x[:, 1] * 0.5)
  # The offset keeps w = 0 from being a stationary point that weight decay would collapse to.
  hidden = jnp.tanh(x @ w["w1"] + w["b1"] + 0.5)
  pred = hidden @ w["w2"]
  return 0.5 * jnp.mean((pred - y) ** 2) + h * jnp.sum(w["w1"] ** 2)


def make_params(dtype=jnp.float32):
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w1": (0.5 * jax.random.normal(k1, (4, 5))).astype(dtype),
          "b1": jnp.linspace(-0.2, 0.2, 5, dtype=dtype),
          "w2": (0.5 * jax.random.normal(k2, (5,))).astype(dtype)}


def num_weights(params):
  return sum(x.size for x in jax.tree.leaves(params))


def spills_per_lane(row):
  """The fewest chunks a lane of any stack spills, from the information it stores."""
  return min(row.num_steps * math.log2(1 / f) for f in row.decays(row.coefs)) / CHUNK_BITS


def bound_bits(row, params):
  """What every stack together stores: the information bound over all lanes and steps."""
  return num_weights(params) * row.num_steps * sum(
      math.log2(1 / f) for f in row.decays(row.coefs))


def meta(row, method, params, hparams, coefs):
  out = row.run(loss_fn, params, hparams, row.num_steps, method, **coefs)
  validation = loss_fn(out.params, 0.0, jnp.asarray(row.num_steps + 3, jnp.int32))
  return validation + sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(out.params)), out.stats


def hypergradient(row, method, params, hparams, coefs):
  grad = jax.grad(lambda *a: meta(row, method, *a), argnums=(0, 1, 2), has_aux=True)
  return jax.jit(grad)(params, hparams, coefs)


@functools.lru_cache
def float64_unroll(name):
  """The reference: store-all backprop of the same dynamics, in float64 (one per row, for both
  columns)."""
  row, params, hparams = OPTIMIZERS[name], make_params(), jnp.float32(1e-3)
  with jax.enable_x64(True):
    to64 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)
    grads, _ = hypergradient(row, "unroll", to64(params), to64(hparams), to64(row.coefs))
    return jax.tree.map(np.asarray, grads)


def relative_error(got, want):
  got = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(got)])
  want = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(want)])
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def cells():
  return [pytest.param(name, share, id=f"{name}-share_gradient={share}",
                       marks=() if QUICK_FORM[name] == share else (pytest.mark.slow,))
          for name in OPTIMIZERS for share in (True, False)]


@pytest.mark.parametrize("name, share_gradient", cells())
def test_hypergradient_is_exact_where_every_stack_spills(name, share_gradient):
  row = OPTIMIZERS[name]
  assert spills_per_lane(row) >= MIN_SPILLS, spills_per_lane(row)
  params, hparams = make_params(), jnp.float32(1e-3)
  coefs = {k: jnp.float32(v) for k, v in row.coefs.items()}  # traced: min_momentum sizes
  method = revhyper.Reversible(min_momentum=row.min_momentum, share_gradient=share_gradient,
                               check_reversal=True)
  grads, stats = hypergradient(row, method, params, hparams, coefs)
  # The stacks hold what the decays destroyed: the bound over every lane, to 1%, so that each
  # lane spilled at least MIN_SPILLS chunks.
  assert not bool(stats.failed)
  assert float(stats.bits_stored) == pytest.approx(bound_bits(row, params), rel=0.01)
  lanes = num_weights(params) * len(row.decays(row.coefs))
  assert float(stats.bits_stored) / lanes / CHUNK_BITS >= MIN_SPILLS
  # check_reversal: a rebuilt initial state that differs in one bit makes every gradient NaN.
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(leaf)), (name, grads)
  expected = float64_unroll(name)
  # One relative error over every hypergradient: where the weight decay forgets w_0 (160 bits
  # per lane), d/dw_0 underflows float32 and has no relative scale of its own.
  assert relative_error(grads, expected) <= row.rtol, relative_error(grads, expected)
  for key in row.coefs:
    error = relative_error(grads[2][key], expected[2][key])
    assert error <= COEF_RTOL, (key, error)


# The half-precision cells in the quick loop: each dtype once, each with two stacks.
QUICK_HALF = {("sgd_weight_decay", jnp.bfloat16), ("adamw", jnp.float16)}


def half_cells():
  return [pytest.param(name, dtype, id=f"{name}-{jnp.dtype(dtype).name}",
                       marks=() if (name, dtype) in QUICK_HALF else (pytest.mark.slow,))
          for name in OPTIMIZERS for dtype in (jnp.float16, jnp.bfloat16)]


@pytest.mark.parametrize("name, dtype", half_cells())
def test_half_precision_leaves_round_trip_bit_for_bit(name, dtype):
  row = OPTIMIZERS[name]
  params = make_params(dtype)
  trip = row.round_trip(loss_fn, params, jnp.float32(1e-3), row.num_steps, **row.coefs)
  # Every lane spills MIN_SPILLS times: the stacks hold the bound (the decays are the row's,
  # whatever the leaves' dtype).
  assert float(trip.stats.bits_stored) == pytest.approx(bound_bits(row, params), rel=0.01)
  assert bool(trip.exact) and bool(trip.buffer_empty)
  chex.assert_trees_all_equal(trip.initial_params, params)
  for leaf in jax.tree.leaves(trip.params):
    assert leaf.dtype == dtype
