"""Models: a small residual convnet with BatchNorm for 28x28 single-channel digits.

The network is a 3x3 convolutional stem (conv-BN-relu), residual blocks of conv-BN-relu-conv-BN
plus a skip connection followed by relu, global average pooling and a linear head. The first
block of every stage after the first halves the resolution (stride 2) and widens the channels,
and its skip connection is then a strided 1x1 convolution.

BatchNorm is what makes the model stateful: in training mode each BN layer normalises with the
statistics of the batch and ``resnet_apply`` returns them, so that a training loss can hand
them to ``revhyper.train(..., model_state=revhyper.RunningAverage(...))``, which keeps their
running averages through training; in evaluation mode each layer normalises with those running
averages. Statistics and running averages are pytrees keyed per BN layer, mirroring where the
layer sits in the parameters.

Parameters are plain dicts of arrays (no framework), every array is created with an explicit
dtype, and the code runs under strict dtype and rank promotion, like ``_models``.
"""

import math
import operator
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp

Params = dict  # {"stem": ..., "block1": ..., ..., "head": {"W", "b"}}; see resnet_init
Running = dict  # {"stem": {"bn": {"mean", "var"}}, "block1": {"bn1": ..., "bn2": ...}, ...}

# BatchNorm's variance floor (flax's and PyTorch's default).
BN_EPSILON = 1e-5
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def resnet_init(key: jax.Array, channels: Sequence[int] = (8, 16), blocks_per_stage: int = 1,
                in_channels: int = 1, num_classes: int = 10, dtype=jnp.float32) -> Params:
  """Random parameters of the residual convnet.

  Convolutions have no bias (the BN after each supplies the offset) and are drawn from
  He-normal N(0, 2 / fan_in); BN scales start at 1 and offsets at 0; the head's weights are
  drawn from N(0, 1 / width) and its biases start at 0.

  Args:
    key: a JAX PRNG key.
    channels: the width of each stage; the stem has the first stage's width, and each later
      stage starts with a stride-2 block.
    blocks_per_stage: residual blocks per stage (at least 1).
    in_channels: channels of the input images (1 for digits).
    num_classes: outputs of the linear head.
    dtype: a floating dtype for every leaf.

  Returns:
    ``{"stem": {"conv": [3, 3, in, c0], "bn": {"scale": [c0], "offset": [c0]}}, "block1":
    {"conv1", "bn1", "conv2", "bn2"[, "proj": [1, 1, c_in, c_out]]}, ..., "head": {"W": [c,
    classes], "b": [classes]}}``, blocks numbered from 1 in the order they run.

  Raises:
    TypeError: a size is not an integer, or ``dtype`` is not floating.
    ValueError: a size is not positive or ``channels`` is empty.

  Example:
    >>> params = resnet_init(jax.random.key(0), channels=(8, 16))
    >>> sorted(params)
    ['block1', 'block2', 'head', 'stem']
  """
  channels = _check_sizes(channels, "channels")
  if not channels:
    raise ValueError("channels needs at least one stage width")
  blocks_per_stage, in_channels, num_classes = (
      _check_sizes([n], name)[0] for n, name in ((blocks_per_stage, "blocks_per_stage"),
                                                  (in_channels, "in_channels"),
                                                  (num_classes, "num_classes")))
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"dtype must be a floating dtype, got {dtype}")
  # The random leaves' shapes and standard deviations, in a fixed order.
  shapes, stds = [(3, 3, in_channels, channels[0])], [math.sqrt(2.0 / (9 * in_channels))]
  width = channels[0]
  for stage, c in enumerate(channels):
    for b in range(blocks_per_stage):
      shapes += [(3, 3, width, c), (3, 3, c, c)]
      stds += [math.sqrt(2.0 / (9 * width)), math.sqrt(2.0 / (9 * c))]
      if stage > 0 and b == 0:
        shapes.append((1, 1, width, c))
        stds.append(math.sqrt(2.0 / width))
      width = c
  shapes.append((width, num_classes))
  stds.append(1.0 / math.sqrt(width))
  # One draw for all leaves, cut into pieces: one random-number kernel to compile instead of
  # one per leaf shape (as _models.mlp_noise does).
  flat = jax.random.normal(key, (sum(math.prod(s) for s in shapes),), dtype)
  draws, start = [], 0
  for shape, std in zip(shapes, stds):
    size = math.prod(shape)
    draws.append(jnp.asarray(std, dtype) * flat[start:start + size].reshape(shape))
    start += size
  draws = iter(draws)

  def bn(c):
    return {"scale": jnp.ones((c,), dtype), "offset": jnp.zeros((c,), dtype)}

  params = {"stem": {"conv": next(draws), "bn": bn(channels[0])}}
  number = 1
  for stage, c in enumerate(channels):
    for b in range(blocks_per_stage):
      block = {"conv1": next(draws), "bn1": bn(c), "conv2": next(draws), "bn2": bn(c)}
      if stage > 0 and b == 0:
        block["proj"] = next(draws)
      params[f"block{number}"] = block
      number += 1
  params["head"] = {"W": next(draws), "b": jnp.zeros((num_classes,), dtype)}
  return params


def resnet_batchnorm_init(params: Params) -> Running:
  """Running BN statistics before training: means 0 and variances 1, one entry per BN layer.

  Args:
    params: parameters from ``resnet_init``.

  Returns:
    ``{"stem": {"bn": {"mean", "var"}}, "block1": {"bn1": ..., "bn2": ...}, ...}``, each leaf
    shaped and typed like the BN layer's scale. This is the ``initial`` of
    ``revhyper.RunningAverage`` and the structure of the statistics ``resnet_apply`` returns.

  Example:
    >>> params = resnet_init(jax.random.key(0), channels=(8,))
    >>> resnet_batchnorm_init(params)["stem"]["bn"]["var"].shape
    (8,)
  """
  return {layer: {name: {"mean": jnp.zeros_like(v["scale"]), "var": jnp.ones_like(v["scale"])}
                  for name, v in sorted(p.items()) if name.startswith("bn")}
          for layer, p in _layers(params)}


def resnet_apply(params: Params, x: jax.Array, running: Optional[Running] = None, *,
                 train: bool = True, stem_stride: int = 2) -> tuple[jax.Array, Running]:
  """Logits of the residual convnet and the BN statistics it normalised with.

  Args:
    params: parameters from ``resnet_init``.
    x: floating images ``[N, H, W, C]``, or ``[N, H * W * C]`` flattened square images (as
      ``revhyper.datasets.preprocess`` returns digits); cast to the weights' dtype.
    running: running averages shaped like ``resnet_batchnorm_init(params)``; read only in
      evaluation mode.
    train: True: each BN layer normalises with the mean and (biased) variance of the batch
      over the batch and both spatial axes; False: with ``running``.
    stem_stride: the stem's stride; the default 2 takes 28x28 digits to 14x14, which a small
      network resolves well at a quarter of the cost.

  Returns:
    ``(logits [N, classes], statistics)``: in training mode the batch's per-channel means and
    variances, a pytree like ``running`` (what a training loss returns beside its value); in
    evaluation mode ``running`` itself.

  Raises:
    TypeError: ``x`` is not floating.
    ValueError: ``x`` does not match the stem's input channels, or ``running`` is missing in
      evaluation mode.

  Example:
    >>> params = resnet_init(jax.random.key(0), channels=(4, 8))
    >>> logits, stats = resnet_apply(params, jnp.zeros((2, 784), jnp.float32))
    >>> logits.shape, stats["block2"]["bn1"]["mean"].shape
    ((2, 10), (8,))
  """
  if not train and running is None:
    raise ValueError("resnet_apply needs running statistics in evaluation mode (train=False)")
  dtype = params["head"]["W"].dtype
  h = _images(x, params["stem"]["conv"].shape[2]).astype(dtype)
  stats = {}

  def norm(h, layer, name):
    bn = params[layer][name]
    if train:
      mean = jnp.mean(h, axis=(0, 1, 2))
      var = jnp.mean(jnp.square(h - mean), axis=(0, 1, 2))
    else:
      mean, var = running[layer][name]["mean"], running[layer][name]["var"]
    stats.setdefault(layer, {})[name] = {"mean": mean, "var": var}
    scale = bn["scale"] * jax.lax.rsqrt(var + jnp.asarray(BN_EPSILON, dtype))
    return (h - mean) * scale + bn["offset"]

  h = jax.nn.relu(norm(_conv(h, params["stem"]["conv"], stem_stride), "stem", "bn"))
  for layer, block in _layers(params):
    if layer == "stem":
      continue
    stride = 2 if "proj" in block else 1
    skip = _conv(h, block["proj"], stride) if "proj" in block else h
    y = jax.nn.relu(norm(_conv(h, block["conv1"], stride), layer, "bn1"))
    y = norm(_conv(y, block["conv2"], 1), layer, "bn2")
    h = jax.nn.relu(y + skip)
  pooled = jnp.mean(h, axis=(1, 2))
  head = params["head"]
  logits = pooled @ head["W"] + jnp.broadcast_to(head["b"], pooled.shape[:-1] + head["b"].shape)
  return logits, (stats if train else running)


def _conv(h, w, stride):
  # Highest precision: the same arithmetic on every backend (a GPU's TF32 would otherwise
  # make the network's float32 results depend on the device).
  return jax.lax.conv_general_dilated(h, w, (stride, stride), "SAME",
                                      dimension_numbers=_DIMENSIONS,
                                      precision=jax.lax.Precision.HIGHEST)


def _layers(params) -> list[tuple[str, Any]]:
  """The stem and the blocks, in the order they run (block10 after block9)."""
  blocks = sorted((k for k in params if k.startswith("block")), key=lambda k: int(k[5:]))
  return [("stem", params["stem"])] + [(k, params[k]) for k in blocks]


def _images(x, in_channels):
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must be floating (preprocessed images), got {x.dtype}")
  if x.ndim == 2:
    side = math.isqrt(x.shape[1] // in_channels)
    if side * side * in_channels != x.shape[1]:
      raise ValueError(f"flattened x must hold square images of {in_channels} channel(s), got "
                       f"{x.shape[1]} values per example")
    return x.reshape(x.shape[0], side, side, in_channels)
  if x.ndim != 4 or x.shape[-1] != in_channels:
    raise ValueError(f"x must be [N, H, W, {in_channels}] or [N, H * W * {in_channels}], got "
                     f"shape {x.shape}")
  return x


def _check_sizes(sizes, name) -> list[int]:
  try:
    sizes = [operator.index(s) for s in sizes]
  except TypeError:
    raise TypeError(f"{name} must be integers, got {sizes!r}") from None
  if any(s < 1 for s in sizes):
    raise ValueError(f"{name} must be positive, got {sizes}")
  return sizes
