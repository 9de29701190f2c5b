"""Models: tanh multilayer perceptrons (logistic regression included) and their losses.

Parameters are ordinary pytrees: a list with one ``{"W": [in, out], "b": [out]}`` dict per
layer. Every array is created with an explicit dtype, so results are the same with JAX's global
x64 flag on or off, and the code runs under strict dtype and rank promotion.
"""

import math
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

Params = list  # list of {"W": float [in, out], "b": float [out]}, one dict per layer


def mlp_noise(key: jax.Array, layer_sizes: Sequence[int], dtype=jnp.float32) -> Params:
  """Standard normal draws shaped like the parameters of an MLP.

  The paper parameterises the initial weights as ``exp(log_scale) * noise`` with one learned
  scale per weight type; holding the noise fixed makes the initial weights a differentiable
  function of the scales (see ``mlp_init_from_noise``).

  Args:
    key: a JAX PRNG key.
    layer_sizes: widths from input to output, e.g. ``(784, 50, 50, 50, 10)``; ``(784, 10)`` is
      logistic regression.
    dtype: a floating dtype for every leaf.

  Returns:
    A list of ``{"W": dtype [in, out], "b": dtype [out]}`` dicts of N(0, 1) draws.

  Raises:
    TypeError: ``layer_sizes`` holds a non-integer, or ``dtype`` is not floating.
    ValueError: ``layer_sizes`` has fewer than two entries or a non-positive entry.

  Example:
    >>> noise = mlp_noise(jax.random.key(0), (784, 50, 10))
    >>> [p["W"].shape for p in noise]
    [(784, 50), (50, 10)]
  """
  sizes = _check_layer_sizes(layer_sizes)
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"dtype must be a floating dtype, got {dtype}")
  shapes = []
  for n_in, n_out in zip(sizes[:-1], sizes[1:]):
    shapes += [(n_in, n_out), (n_out,)]
  # One draw for all leaves, cut into pieces: one random-number kernel to compile per
  # architecture instead of one per leaf shape (each costs about half a second on a CPU).
  flat = jax.random.normal(key, (sum(math.prod(s) for s in shapes),), dtype)
  leaves, start = [], 0
  for shape in shapes:
    leaves.append(flat[start:start + math.prod(shape)].reshape(shape))
    start += math.prod(shape)
  return [{"W": w, "b": b} for w, b in zip(leaves[::2], leaves[1::2])]


def mlp_init_from_noise(noise: Params, log_scales: Any) -> Params:
  """Initial weights ``exp(log_scale) * noise``, one scale per leaf (per weight type).

  Args:
    noise: parameters-shaped normal draws from ``mlp_noise``.
    log_scales: a pytree with the structure of ``noise`` whose leaves broadcast against the
      noise leaves: scalars give the paper's one scale per weight type (W and b of each layer),
      e.g. ``_hyper.constant_like(noise, -3.0)``.

  Returns:
    Parameters with the structure and dtypes of ``noise``, differentiable in ``log_scales``.

  Raises:
    ValueError: ``log_scales`` does not have the tree structure of ``noise``.

  Example:
    >>> noise = mlp_noise(jax.random.key(0), (784, 10))
    >>> params = mlp_init_from_noise(noise, [{"W": -3.0, "b": -3.0}])
  """
  if jax.tree.structure(log_scales) != jax.tree.structure(noise):
    raise ValueError(
        "log_scales must have the tree structure of the parameters: expected "
        f"{jax.tree.structure(noise)}, got {jax.tree.structure(log_scales)}")
  # The scale takes the noise's dtype, so that float64 hyperparameters do not widen float32
  # weights (the gradient still flows back through the cast).
  return jax.tree.map(lambda n, s: jnp.exp(jnp.asarray(s, n.dtype)) * n, noise, log_scales)


def mlp_init(key: jax.Array, layer_sizes: Sequence[int], scale: float, dtype=jnp.float32) -> Params:
  """Random MLP parameters: every weight and bias drawn from N(0, scale**2).

  Args:
    key: a JAX PRNG key.
    layer_sizes: widths from input to output, as in ``mlp_noise``.
    scale: the standard deviation of every leaf (the paper starts from exp(-3) ~ 0.05).
    dtype: a floating dtype for every leaf.

  Returns:
    A list of ``{"W": [in, out], "b": [out]}`` dicts.

  Raises:
    TypeError, ValueError: as ``mlp_noise``.

  Example:
    >>> params = mlp_init(jax.random.key(0), (784, 50, 50, 50, 10), scale=0.05)
  """
  noise = mlp_noise(key, layer_sizes, dtype)
  return jax.tree.map(lambda n: jnp.asarray(scale, n.dtype) * n, noise)


def mlp_apply(params: Params, x: jax.Array) -> jax.Array:
  """Logits of a tanh MLP: tanh on every hidden layer, linear output.

  Args:
    params: a list of ``{"W": [in, out], "b": [out]}`` dicts (from ``mlp_init``).
    x: floating inputs [..., in]; cast to the weights' dtype.

  Returns:
    Logits [..., out] in the weights' dtype.

  Raises:
    TypeError: ``x`` is not floating (preprocess raw uint8 images first).
    ValueError: ``params`` is empty or the last axis of ``x`` does not match the first layer.

  Example:
    >>> params = mlp_init(jax.random.key(0), (784, 10), scale=0.05)
    >>> mlp_apply(params, jnp.zeros((3, 784), jnp.float32)).shape
    (3, 10)
  """
  if not params:
    raise ValueError("params must hold at least one layer")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must be floating (preprocessed inputs), got {x.dtype}")
  n_in = params[0]["W"].shape[0]
  if x.ndim < 1 or x.shape[-1] != n_in:
    raise ValueError(f"x must have shape [..., {n_in}] to match the first layer, got {x.shape}")
  h = x.astype(params[0]["W"].dtype)
  for i, layer in enumerate(params):
    # The bias is broadcast explicitly so that strict rank promotion accepts it.
    h = h @ layer["W"] + jnp.broadcast_to(layer["b"], h.shape[:-1] + layer["b"].shape)
    if i < len(params) - 1:
      h = jnp.tanh(h)
  return h


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean negative log-likelihood of integer labels under softmax(logits).

  Args:
    logits: floating [..., C].
    labels: integer [...] class indices in [0, C) (results are undefined outside it).

  Returns:
    A scalar in the dtype of ``logits``.

  Raises:
    TypeError: ``labels`` is not integer or ``logits`` is not floating.
    ValueError: the shapes of ``labels`` and ``logits[..., 0]`` differ.

  Example:
    >>> logits = jnp.zeros((4, 10), jnp.float32)
    >>> float(softmax_cross_entropy(logits, jnp.arange(4)))  # log(10)
    2.302585...
  """
  logits, labels = _check_logits_labels(logits, labels)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)
  return -jnp.mean(picked)


def error_rate(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of examples whose largest logit is not at the label.

  Args:
    logits: floating [..., C].
    labels: integer [...].

  Returns:
    A scalar in [0, 1], in the dtype of ``logits``.

  Raises:
    TypeError, ValueError: as ``softmax_cross_entropy``.

  Example:
    >>> float(error_rate(jnp.eye(3, dtype=jnp.float32), jnp.array([0, 1, 0])))
    0.333...
  """
  logits, labels = _check_logits_labels(logits, labels)
  predicted = jnp.argmax(logits, axis=-1)
  wrong = predicted != labels.astype(predicted.dtype)
  return jnp.mean(wrong.astype(logits.dtype))


def _check_logits_labels(logits, labels):
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise TypeError(f"logits must be floating, got {logits.dtype}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
  if logits.ndim < 1 or labels.shape != logits.shape[:-1]:
    raise ValueError(
        f"labels must have shape logits.shape[:-1] = {logits.shape[:-1]}, got {labels.shape}")
  return logits, labels


def _check_layer_sizes(layer_sizes) -> list[int]:
  try:
    sizes = [operator.index(s) for s in layer_sizes]
  except TypeError:
    raise TypeError(f"layer_sizes must be a sequence of ints, got {layer_sizes!r}") from None
  if len(sizes) < 2 or min(sizes) < 1:
    raise ValueError(
        f"layer_sizes needs at least two positive widths (input, output), got {sizes}")
  return sizes
