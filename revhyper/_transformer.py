"""Models: a small pre-LN transformer encoder that classifies sequences (digits read as patches).

The network embeds each token linearly, adds a learned positional embedding, runs pre-LN
blocks (``h + attention(layer_norm(h))``, then ``h + mlp(layer_norm(h))``) with multi-head
self-attention and a GELU MLP, normalises, averages over the tokens and classifies with a
linear head. Images become sequences with ``image_patches``: the rows of a digit, or its 7x7
patches.

Dropout is the model's randomness. Its key is an argument rather than state, so that a
training loss can fold it from the step (``jax.random.fold_in(key, t)``): every mask is then a
pure function of the step, which exact reversal needs to recompute each step's gradient in the
backward pass. The rate may be a traced hyperparameter; its gradient flows through the
``1 / (1 - rate)`` rescaling of the kept units (the masks themselves are piecewise constant in
the rate).

Parameters are plain dicts of arrays (no framework), the number of heads is read from the
shapes, every array is created with an explicit dtype, and the code runs under strict dtype
and rank promotion, like ``_models``. Products run at the highest precision, so that a GPU's
TF32 does not make float32 results depend on the device.
"""

import itertools
import math
import operator
from collections.abc import Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp

Params = dict  # {"embed", "position", "block1", ..., "final_norm", "head"}; see transformer_init

# Layer norm's variance floor (flax's default is 1e-6, PyTorch's 1e-5).
LN_EPSILON = 1e-5
# The positional embedding's initial standard deviation (the ViT and GPT-2 convention).
POSITION_STD = 0.02
_HIGHEST = jax.lax.Precision.HIGHEST


def transformer_init(key: jax.Array, seq_len: int, input_dim: int, *, width: int = 32,
                     depth: int = 2, num_heads: int = 4, mlp_width: Optional[int] = None,
                     num_classes: int = 10, dtype=jnp.float32) -> Params:
  """Random parameters of the transformer.

  Every projection is drawn from N(0, 1 / fan_in) (the tokens keep unit scale through the
  blocks), the positional embedding from N(0, 0.02**2); biases and layer-norm offsets start
  at 0 and layer-norm scales at 1.

  Args:
    key: a JAX PRNG key.
    seq_len: tokens per sequence (16 for 7x7 patches of a digit, 28 for its rows).
    input_dim: features per token (49 for 7x7 patches, 28 for rows).
    width: the model width d, divisible by ``num_heads``.
    depth: transformer blocks (at least 1).
    num_heads: attention heads per block.
    mlp_width: hidden units of each block's MLP; default ``2 * width``.
    num_classes: outputs of the linear head.
    dtype: a floating dtype for every leaf.

  Returns:
    ``{"embed": {"W": [input_dim, d], "b": [d]}, "position": [seq_len, d], "block1": {"norm1":
    {"scale", "offset"}, "attention": {"qkv": [d, 3, heads, d / heads], "out": [heads,
    d / heads, d], "b": [d]}, "norm2": ..., "mlp": {"W1": [d, m], "b1": [m], "W2": [m, d],
    "b2": [d]}}, ..., "final_norm": {"scale", "offset"}, "head": {"W": [d, classes], "b":
    [classes]}}``, blocks numbered from 1 in the order they run.

  Raises:
    TypeError: a size is not an integer, or ``dtype`` is not floating.
    ValueError: a size is not positive, or ``width`` is not divisible by ``num_heads``.

  Example:
    >>> params = transformer_init(jax.random.key(0), seq_len=16, input_dim=49)
    >>> sorted(params)
    ['block1', 'block2', 'embed', 'final_norm', 'head', 'position']
  """
  seq_len, input_dim, width, depth, num_heads, num_classes = _check_sizes(
      seq_len=seq_len, input_dim=input_dim, width=width, depth=depth, num_heads=num_heads,
      num_classes=num_classes)
  mlp_width = 2 * width if mlp_width is None else _check_sizes(mlp_width=mlp_width)[0]
  if width % num_heads:
    raise ValueError(f"width ({width}) must be divisible by num_heads ({num_heads})")
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"dtype must be a floating dtype, got {dtype}")
  head_dim = width // num_heads
  # (shape, standard deviation) of every drawn leaf, in the order of the parameters.
  drawn = {("embed", "W"): ((input_dim, width), 1.0 / math.sqrt(input_dim)),
           ("position",): ((seq_len, width), POSITION_STD)}
  for number in range(1, depth + 1):
    block = f"block{number}"
    drawn[block, "attention", "qkv"] = ((width, 3, num_heads, head_dim), 1.0 / math.sqrt(width))
    drawn[block, "attention", "out"] = ((num_heads, head_dim, width), 1.0 / math.sqrt(width))
    drawn[block, "mlp", "W1"] = ((width, mlp_width), 1.0 / math.sqrt(width))
    drawn[block, "mlp", "W2"] = ((mlp_width, width), 1.0 / math.sqrt(mlp_width))
  drawn["head", "W"] = ((width, num_classes), 1.0 / math.sqrt(width))
  # One draw for all leaves, cut into pieces: one random-number kernel to compile per
  # architecture instead of one per leaf shape (as mlp_noise does).
  flat = jax.random.normal(key, (sum(math.prod(shape) for shape, _ in drawn.values()),), dtype)
  leaves, start = {}, 0
  for path, (shape, std) in drawn.items():
    size = math.prod(shape)
    leaves[path] = jnp.asarray(std, dtype) * flat[start:start + size].reshape(shape)
    start += size

  def zeros(n):
    return jnp.zeros((n,), dtype)

  def norm():
    return {"scale": jnp.ones((width,), dtype), "offset": zeros(width)}

  params = {"embed": {"W": leaves["embed", "W"], "b": zeros(width)},
            "position": leaves["position",]}
  for number in range(1, depth + 1):
    block = f"block{number}"
    params[block] = {
        "norm1": norm(),
        "attention": {"qkv": leaves[block, "attention", "qkv"],
                      "out": leaves[block, "attention", "out"], "b": zeros(width)},
        "norm2": norm(),
        "mlp": {"W1": leaves[block, "mlp", "W1"], "b1": zeros(mlp_width),
                "W2": leaves[block, "mlp", "W2"], "b2": zeros(width)},
    }
  params["final_norm"] = norm()
  params["head"] = {"W": leaves["head", "W"], "b": zeros(num_classes)}
  return params


def transformer_apply(params: Params, x: jax.Array, *, dropout_rate: Any = 0.0,
                      key: Optional[jax.Array] = None) -> jax.Array:
  """Logits of the transformer for a batch of sequences.

  Args:
    params: parameters from ``transformer_init``.
    x: floating sequences ``[N, seq_len, input_dim]`` (``image_patches`` makes them from
      digits); cast to the weights' dtype.
    dropout_rate: the probability of zeroing a unit, a float or a scalar array (traced and
      differentiable) in [0, 1). Dropout acts on the embedded tokens and on the output of
      every attention and MLP sublayer before it joins the residual stream; the kept units are
      scaled by ``1 / (1 - rate)``.
    key: a JAX PRNG key for the dropout masks; without it there is no dropout (evaluation).
      In a training loss fold it from the step, ``jax.random.fold_in(key, t)``.

  Returns:
    Logits ``[N, classes]`` in the weights' dtype.

  Raises:
    TypeError: ``x`` is not floating.
    ValueError: ``x`` is not ``[N, seq_len, input_dim]`` for these parameters.

  Example:
    >>> params = transformer_init(jax.random.key(0), seq_len=16, input_dim=49)
    >>> transformer_apply(params, jnp.zeros((2, 16, 49), jnp.float32)).shape
    (2, 10)
  """
  dtype = params["head"]["W"].dtype
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must be floating (preprocessed sequences), got {x.dtype}")
  seq_len, width = params["position"].shape
  input_dim = params["embed"]["W"].shape[0]
  if x.ndim != 3 or x.shape[1:] != (seq_len, input_dim):
    raise ValueError(f"x must have shape [N, {seq_len}, {input_dim}] for these parameters, got "
                     f"{x.shape}")
  sites = itertools.count()  # one dropout mask per site, each from its own folded key

  def dropout(h):
    site = next(sites)
    if key is None:
      return h
    rate = jnp.asarray(dropout_rate, dtype)
    # Drawn in float32 whatever the weights' dtype: the same masks in every precision, so that
    # a float64 run checks a float32 one.
    draws = jax.random.uniform(jax.random.fold_in(key, site), h.shape, jnp.float32)
    keep = draws >= rate.astype(jnp.float32)
    return jnp.where(keep, h / (jnp.asarray(1, dtype) - rate), jnp.zeros((), dtype))

  h = _dense(x.astype(dtype), params["embed"]["W"], params["embed"]["b"])
  h = dropout(h + jnp.broadcast_to(params["position"], h.shape))
  for _, block in _blocks(params):
    h = h + dropout(_attention(_layer_norm(h, block["norm1"]), block["attention"]))
    mlp = block["mlp"]
    y = jax.nn.gelu(_dense(_layer_norm(h, block["norm2"]), mlp["W1"], mlp["b1"]))
    h = h + dropout(_dense(y, mlp["W2"], mlp["b2"]))
  pooled = jnp.mean(_layer_norm(h, params["final_norm"]), axis=1)
  return _dense(pooled, params["head"]["W"], params["head"]["b"])


def image_patches(images: jax.Array, patch_shape: Union[int, Sequence[int]] = 7) -> jax.Array:
  """Single-channel images as sequences of flattened patches, row-major over the patch grid.

  Args:
    images: floating or integer ``[N, H, W]`` images, or ``[N, H * W]`` flattened square ones
      (as ``revhyper.datasets.preprocess`` returns digits).
    patch_shape: ``(height, width)`` of a patch, or one int for square patches: 7 cuts a digit
      into 16 tokens of 49 pixels, ``(1, 28)`` reads it as 28 rows of 28 pixels.

  Returns:
    ``[N, (H / height) * (W / width), height * width]`` in the dtype of ``images``.

  Raises:
    ValueError: the images are not square when flattened, or the patches do not tile them.

  Example:
    >>> image_patches(jnp.zeros((5, 784), jnp.float32)).shape
    (5, 16, 49)
    >>> image_patches(jnp.zeros((5, 784), jnp.float32), (1, 28)).shape
    (5, 28, 28)
  """
  images = jnp.asarray(images)
  if images.ndim == 2:
    side = math.isqrt(images.shape[1])
    if side * side != images.shape[1]:
      raise ValueError(f"flattened images must be square, got {images.shape[1]} pixels")
    images = images.reshape(images.shape[0], side, side)
  if images.ndim != 3:
    raise ValueError(f"images must be [N, H, W] or [N, H * W], got shape {images.shape}")
  if isinstance(patch_shape, int):
    patch_shape = (patch_shape, patch_shape)
  ph, pw = _check_sizes(patch_height=patch_shape[0], patch_width=patch_shape[1])
  n, height, width = images.shape
  if height % ph or width % pw:
    raise ValueError(f"{ph}x{pw} patches do not tile {height}x{width} images")
  grid = images.reshape(n, height // ph, ph, width // pw, pw).transpose(0, 1, 3, 2, 4)
  return grid.reshape(n, (height // ph) * (width // pw), ph * pw)


def _dense(h, w, b):
  y = jnp.matmul(h, w, precision=_HIGHEST)
  # The bias is broadcast explicitly so that strict rank promotion accepts it.
  return y + jnp.broadcast_to(b, y.shape)


def _layer_norm(h, norm):
  mean = jnp.mean(h, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
  h = (h - mean) * jax.lax.rsqrt(var + jnp.asarray(LN_EPSILON, h.dtype))
  return h * jnp.broadcast_to(norm["scale"], h.shape) + jnp.broadcast_to(norm["offset"], h.shape)


def _attention(h, attention):
  """Multi-head scaled dot-product self-attention over all tokens (no mask)."""
  qkv = jnp.einsum("nld,dkhe->knlhe", h, attention["qkv"], precision=_HIGHEST)
  q, k, v = qkv[0], qkv[1], qkv[2]
  head_dim = q.shape[-1]
  scores = jnp.einsum("nqhe,nkhe->nhqk", q, k, precision=_HIGHEST)
  weights = jax.nn.softmax(scores * jnp.asarray(1.0 / math.sqrt(head_dim), h.dtype), axis=-1)
  mixed = jnp.einsum("nhqk,nkhe->nqhe", weights, v, precision=_HIGHEST)
  out = jnp.einsum("nqhe,hed->nqd", mixed, attention["out"], precision=_HIGHEST)
  return out + jnp.broadcast_to(attention["b"], out.shape)


def _blocks(params) -> list[tuple[str, Any]]:
  """The blocks in the order they run (block10 after block9)."""
  names = sorted((k for k in params if k.startswith("block")), key=lambda k: int(k[5:]))
  return [(k, params[k]) for k in names]


def _check_sizes(**sizes) -> list[int]:
  checked = []
  for name, size in sizes.items():
    try:
      size = operator.index(size)
    except TypeError:
      raise TypeError(f"{name} must be an integer, got {size!r}") from None
    if size < 1:
      raise ValueError(f"{name} must be positive, got {size}")
    checked.append(size)
  return checked
