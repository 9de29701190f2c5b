"""Hypergradients over many seeds, their spread, and meta-gradient transforms that tame them.

A hypergradient through a long, chaotic training run is a noisy estimate: each seed (initial
weights, minibatch order) gives a different one, and a few of them are huge or not finite.
The paper's figure 5 averages them over seeds; this module does that with one ``jax.vmap``,
measures how much the seeds disagree, and offers two optax transforms to chain before the
meta-optimizer: one that bounds the hypergradient's norm and one that rescales it to unit
norm, both of which turn a non-finite hypergradient into no update at all.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def per_seed_hypergradients(
    meta_loss_fn: Callable[[Any, jax.Array], Any],
    hparams: Any,
    keys: jax.Array,
    *,
    has_aux: bool = False,
):
  """The meta-loss and its hypergradient for each key, in one ``jax.vmap``.

  Args:
    meta_loss_fn: ``meta_loss_fn(hparams, key) -> scalar`` (or ``(scalar, aux)`` with
      ``has_aux``), differentiable in ``hparams``; the key seeds one training run.
    hparams: a pytree of floating arrays.
    keys: a batch of JAX PRNG keys, ``[n]`` (typed keys) or ``[n, 2]`` (raw ``uint32``).
    has_aux: whether ``meta_loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``(losses, hypergradients)``, or ``((losses, aux), hypergradients)`` with ``has_aux``:
    every leaf with a leading axis of size ``n``, one row per key.

  Example:
    >>> def meta_loss(h, key):
    ...   return jnp.sum((h - jax.random.normal(key, h.shape)) ** 2)
    >>> losses, grads = per_seed_hypergradients(meta_loss, jnp.zeros(3),
    ...                                         jax.random.split(jax.random.key(0), 4))
    >>> grads.shape
    (4, 3)
  """
  value_and_grad = jax.value_and_grad(meta_loss_fn, has_aux=has_aux)
  return jax.vmap(value_and_grad, in_axes=(None, 0))(hparams, keys)


def seed_averaged_hypergradient(
    meta_loss_fn: Callable[[Any, jax.Array], Any],
    hparams: Any,
    keys: jax.Array,
    *,
    has_aux: bool = False,
):
  """The meta-loss and hypergradient averaged over seeds (the paper's figure 5).

  The mean of ``per_seed_hypergradients``: an unbiased estimate of the hypergradient of the
  expected meta-loss whose variance falls as ``1 / len(keys)``, for the price of that many
  training runs (run side by side by ``jax.vmap``).

  Args:
    meta_loss_fn, hparams, keys, has_aux: as ``per_seed_hypergradients``.

  Returns:
    ``(mean loss, mean hypergradient)``, or ``((mean loss, aux), mean hypergradient)`` with
    ``has_aux``, where aux keeps its per-seed leading axis; the hypergradient is a pytree like
    ``hparams``.

  Example:
    >>> def meta_loss(h, key):
    ...   return jnp.sum((h - jax.random.normal(key, h.shape)) ** 2)
    >>> loss, grad = seed_averaged_hypergradient(
    ...     meta_loss, jnp.zeros(3), jax.random.split(jax.random.key(0), 8))
    >>> grad.shape
    (3,)
  """
  values, grads = per_seed_hypergradients(meta_loss_fn, hparams, keys, has_aux=has_aux)
  mean_grad = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
  if has_aux:
    losses, aux = values
    return (jnp.mean(losses), aux), mean_grad
  return jnp.mean(values), mean_grad


class HypergradientSpread(NamedTuple):
  """What ``hypergradient_variance`` returns."""

  mean: Any  # the mean over seeds, a pytree like one hypergradient
  variance: Any  # the variance over seeds of every entry (ddof=1), a pytree like ``mean``
  signal_to_noise: jax.Array  # ||mean||^2 / (sum of variances / n): > 1, the mean is resolved
  mean_cosine: jax.Array  # the mean cosine between two different seeds' hypergradients


def hypergradient_variance(per_seed: Any) -> HypergradientSpread:
  """How much the hypergradients of different seeds disagree.

  Args:
    per_seed: a pytree whose leaves have a leading axis of ``n >= 2`` seeds, e.g. the
      hypergradients of ``per_seed_hypergradients``.

  Returns:
    ``HypergradientSpread(mean, variance, signal_to_noise, mean_cosine)``. The signal-to-noise
    ratio compares the squared norm of the mean with the variance of the mean's estimate (the
    summed variances over ``n``): well above 1, ``n`` seeds pin the direction down; near or
    below 1, the averaged hypergradient is mostly noise. The mean cosine is 1 when every seed
    points the same way and near 0 when they are unrelated. Identical seeds give zero variance
    and an infinite ratio (a zero mean: NaN).

  Raises:
    ValueError: fewer than two seeds, or leaves whose leading axes differ.

  Example:
    >>> spread = hypergradient_variance(jnp.array([[1.0, 2.0], [1.0, 2.0]]))
    >>> float(spread.signal_to_noise), float(spread.mean_cosine)
    (inf, 1.0)
  """
  leaves = jax.tree.leaves(per_seed)
  sizes = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"every leaf needs the same leading seed axis, got sizes {sizes}")
  (n,) = sizes
  if n < 2:
    raise ValueError(f"the variance over seeds needs at least two seeds, got {n}")
  # Deviations from the first seed: identical seeds then give exactly zero variance, which the
  # rounding of a float mean of n equal values would not.
  shifted = jax.tree.map(lambda g: g - g[:1], per_seed)
  mean = jax.tree.map(lambda g, d: g[0] + jnp.mean(d, axis=0), per_seed, shifted)
  variance = jax.tree.map(lambda d: jnp.var(d, axis=0, ddof=1), shifted)
  signal = sum(jnp.sum(jnp.square(m)) for m in jax.tree.leaves(mean))
  noise = sum(jnp.sum(v) for v in jax.tree.leaves(variance)) / n
  flat = jnp.concatenate([leaf.reshape(n, -1) for leaf in leaves], axis=1)
  unit = flat / jnp.linalg.norm(flat, axis=1, keepdims=True)
  gram = unit @ unit.T
  # The mean of the off-diagonal entries: each pair of different seeds once.
  mean_cosine = (jnp.sum(gram) - jnp.trace(gram)) / (n * (n - 1))
  return HypergradientSpread(mean, variance, signal / noise, mean_cosine)


def clip_hypergradient(max_norm: float) -> optax.GradientTransformation:
  """Scales a hypergradient down to global norm ``max_norm``; a non-finite one becomes zero.

  Chain it before the meta-optimizer (``optax.chain(clip_hypergradient(1.0),
  optax.adam(0.05))``): one exploding hypergradient of a chaotic training run then moves the
  hyperparameters no further than a typical one, and a run that diverged (NaN) moves them not
  at all, so the meta-optimizer's moment estimates are not poisoned.

  Args:
    max_norm: the largest global L2 norm passed on, positive.

  Returns:
    An ``optax.GradientTransformation`` without state.

  Raises:
    ValueError: ``max_norm`` is not positive.

  Example:
    >>> clip = clip_hypergradient(1.0)
    >>> updates, _ = clip.update({"a": jnp.array([3.0, 4.0])}, clip.init(None))
    >>> float(optax.tree.norm(updates))
    1.0
  """
  if not max_norm > 0:
    raise ValueError(f"max_norm must be positive, got {max_norm}")

  def scale(norm):
    return jnp.minimum(1.0, max_norm / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))

  return _rescale_by_norm(scale)


def normalize_hypergradient() -> optax.GradientTransformation:
  """Rescales a hypergradient to unit global norm; a zero or non-finite one becomes zero.

  Only the direction is kept, so a meta-optimizer without per-coordinate scaling (plain SGD)
  takes steps of the size of its learning rate however steep or flat the meta-loss is.

  Returns:
    An ``optax.GradientTransformation`` without state.

  Example:
    >>> norm = normalize_hypergradient()
    >>> updates, _ = norm.update({"a": jnp.array([0.0, 1e-6])}, norm.init(None))
    >>> updates["a"].tolist()
    [0.0, 1.0]
  """
  return _rescale_by_norm(lambda norm: jnp.where(norm > 0, 1.0 / norm, 0.0))


def _rescale_by_norm(scale_of_norm):
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    finite = jnp.isfinite(norm)
    factor = jnp.where(finite, scale_of_norm(jnp.where(finite, norm, 0.0)), 0.0)
    # where, not a product: 0 * NaN would still be NaN.
    return jax.tree.map(lambda g: jnp.where(finite, g * factor.astype(g.dtype),
                                            jnp.zeros_like(g)), updates), state

  return optax.GradientTransformation(init, update)
