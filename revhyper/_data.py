"""Data: the bundled MNIST subset, full MNIST IDX files, Omniglot, and minibatch indices.

Loaders are plain numpy and never touch the network. ``batch_indices`` is a pure JAX function of
(key, step), so the reversible method can recompute every minibatch bit for bit in its backward
pass.
"""

import functools
import gzip
import importlib.resources
import io
import math
import operator
import os
import struct
import zipfile
import zlib
from collections.abc import Sequence
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

PathLike = Union[str, os.PathLike]

# IDX type codes (the third byte of the magic number) and the big-endian dtypes they name.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MNIST_SIDE = 28
_NUM_DIGITS = 10

_OMNIGLOT_ARCHIVES = ("images_background", "images_evaluation")
_OMNIGLOT_URL = "https://github.com/brendenlake/omniglot/tree/master/python"

# Feistel rounds of the per-epoch permutation in ``batch_indices``. Luby and Rackoff: four rounds
# with independent random round functions give a strong pseudo-random permutation; two more
# cover the unbalanced split and the round functions being one small integer hash.
_FEISTEL_ROUNDS = 6


# ------------------------------------------------------------------------------------------------
# MNIST


def load_mnist(path: Optional[PathLike] = None) -> tuple[np.ndarray, np.ndarray]:
  """Loads MNIST digits as flat uint8 images and uint8 labels.

  With no path this is the 10,000-digit subset bundled inside the package (real MNIST digits,
  shuffled once; see ``revhyper/data_files/README.md`` for its source and licence), so it works
  with no network. With a folder it reads the four standard IDX files there (see
  ``load_mnist_idx``) and returns the 60,000 training digits followed by the 10,000 test digits.
  A path to an ``.npz`` file with ``images`` and ``labels`` arrays is read like the bundled file.

  Args:
    path: None for the bundled subset, a folder holding the MNIST IDX files, or an ``.npz`` file.

  Returns:
    ``(images, labels)``: uint8 [N, 784] grey levels (0 = background, row-major 28x28) and
    uint8 [N] digits 0-9.

  Raises:
    FileNotFoundError: ``path`` or an expected file in it does not exist.
    ValueError: a file is malformed (see ``load_mnist_idx``), or ``path`` is a file that is not
      an ``.npz`` file.

  Example:
    >>> images, labels = load_mnist()
    >>> images.shape, labels.shape
    ((10000, 784), (10000,))
  """
  if path is None:
    ref = importlib.resources.files("revhyper").joinpath("data_files", "mnist10k.npz")
    with importlib.resources.as_file(ref) as bundled:
      return _load_mnist_npz(bundled)
  path = os.path.expanduser(os.fspath(path))
  if os.path.isfile(path):
    if not path.endswith(".npz"):
      raise ValueError(f"path must be a folder of IDX files or an .npz file, got {path!r}")
    return _load_mnist_npz(path)
  splits = load_mnist_idx(path)
  images = np.concatenate([splits["train"][0], splits["test"][0]])
  labels = np.concatenate([splits["train"][1], splits["test"][1]])
  return images, labels


def load_mnist_idx(folder: PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Reads the official MNIST training and test sets from their four IDX files.

  The folder must hold ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each plain or gzipped (a ``.gz``
  suffix); a plain file is preferred when both exist.

  Args:
    folder: the folder holding the files.

  Returns:
    ``{"train": (images, labels), "test": (images, labels)}`` with uint8 [N, 784] images and
    uint8 [N] labels (N = 60,000 and 10,000 for the official files).

  Raises:
    FileNotFoundError: the folder or one of the four files is missing.
    ValueError: a file is truncated or has trailing bytes, has the wrong magic number (type or
      number of dimensions), images that are not 28x28, a label count different from the image
      count, or labels outside 0-9. The message names the file.

  Example:
    >>> splits = load_mnist_idx("~/data/mnist")  # doctest: +SKIP
    >>> train_images, train_labels = splits["train"]  # doctest: +SKIP
  """
  folder = os.path.expanduser(os.fspath(folder))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"MNIST folder {folder!r} does not exist")
  out = {}
  for split, (images_name, labels_name) in _MNIST_FILES.items():
    images_path = _find_idx_file(folder, images_name)
    labels_path = _find_idx_file(folder, labels_name)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3:
      raise ValueError(
          f"{images_path}: expected magic number 0x00000803 (uint8, 3 dimensions) of an "
          f"MNIST image file, found {images.dtype.name} with {images.ndim} dimension(s)")
    if images.shape[1:] != (_MNIST_SIDE, _MNIST_SIDE):
      raise ValueError(
          f"{images_path}: expected {_MNIST_SIDE}x{_MNIST_SIDE} images, found "
          f"{images.shape[1]}x{images.shape[2]}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
      raise ValueError(
          f"{labels_path}: expected magic number 0x00000801 (uint8, 1 dimension) of an "
          f"MNIST label file, found {labels.dtype.name} with {labels.ndim} dimension(s)")
    if labels.shape[0] != images.shape[0]:
      raise ValueError(
          f"{labels_path}: holds {labels.shape[0]} labels but {images_path} holds "
          f"{images.shape[0]} images")
    _check_digit_labels(labels, labels_path)
    out[split] = (images.reshape(images.shape[0], -1), labels)
  return out


def read_idx(path: PathLike) -> np.ndarray:
  """Reads one IDX file (the format of the MNIST distribution), plain or gzipped.

  The format: a 4-byte magic number (two zero bytes, a type code, the number of dimensions),
  one big-endian uint32 per dimension, then the data in row-major order, big-endian. A file
  whose name ends in ``.gz`` is decompressed first.

  Args:
    path: the file.

  Returns:
    The array, in native byte order, with the file's shape and type.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the file is not valid IDX (bad magic number, unknown type code, no dimensions),
      is not valid gzip, or its length does not match its header (truncated or with trailing
      bytes). The message names the file.

  Example:
    >>> labels = read_idx("train-labels-idx1-ubyte.gz")  # doctest: +SKIP
  """
  path = os.fspath(path)
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (gzip.BadGzipFile, EOFError, zlib.error) as err:
    raise ValueError(f"{path}: not a readable gzip file ({err})") from err
  if len(raw) < 4:
    raise ValueError(
        f"{path}: truncated IDX file: {len(raw)} bytes, no room for the magic number")
  if raw[0] != 0 or raw[1] != 0:
    raise ValueError(
        f"{path}: not an IDX file: magic number 0x{raw[:4].hex()} does not start with two "
        "zero bytes")
  code, ndim = raw[2], raw[3]
  if code not in _IDX_DTYPES:
    raise ValueError(
        f"{path}: wrong magic number 0x{raw[:4].hex()}: unknown type code 0x{code:02x}")
  if ndim == 0:
    raise ValueError(f"{path}: wrong magic number 0x{raw[:4].hex()}: zero dimensions")
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(
        f"{path}: truncated IDX file: {len(raw)} bytes, the header of {ndim} dimensions needs "
        f"{header}")
  shape = struct.unpack(f">{ndim}I", raw[4:header])
  dtype = _IDX_DTYPES[code]
  count = math.prod(shape)
  expected = header + count * dtype.itemsize
  if len(raw) != expected:
    problem = "truncated IDX file" if len(raw) < expected else "trailing bytes after the data"
    raise ValueError(
        f"{path}: {problem}: the header gives shape {shape} of {dtype.name} ({expected} bytes "
        f"in all), the file has {len(raw)} bytes")
  data = np.frombuffer(raw, dtype=dtype, count=count, offset=header)
  # A writable copy in native byte order, so later arithmetic is not slowed by byte swaps.
  return data.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def _find_idx_file(folder: str, name: str) -> str:
  for candidate in (name, name + ".gz"):
    path = os.path.join(folder, candidate)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"MNIST file {name!r} (or {name + '.gz'!r}) not found in {folder!r}")


def _load_mnist_npz(path) -> tuple[np.ndarray, np.ndarray]:
  with np.load(path, allow_pickle=False) as data:
    if "images" not in data or "labels" not in data:
      raise ValueError(f"{path}: expected arrays 'images' and 'labels', found {data.files}")
    images, labels = data["images"], data["labels"]
  n = images.shape[0]
  if images.dtype != np.uint8 or images.shape != (n, _MNIST_SIDE * _MNIST_SIDE):
    raise ValueError(
        f"{path}: 'images' must be uint8 [N, {_MNIST_SIDE * _MNIST_SIDE}], found "
        f"{images.dtype.name} {list(images.shape)}")
  if labels.dtype != np.uint8 or labels.shape != (n,):
    raise ValueError(
        f"{path}: 'labels' must be uint8 [{n}], found {labels.dtype.name} {list(labels.shape)}")
  _check_digit_labels(labels, path)
  return images, labels


def _check_digit_labels(labels: np.ndarray, path) -> None:
  bad = labels >= _NUM_DIGITS
  if bad.any():
    raise ValueError(
        f"{path}: labels must be digits 0-9, found {int(labels[bad][0])} "
        f"({int(bad.sum())} label(s) out of range)")


# ------------------------------------------------------------------------------------------------
# Preprocessing and splits


def pixel_mean(images: np.ndarray) -> np.ndarray:
  """Per-pixel mean of images on the [0, 1] scale, to subtract with ``preprocess``.

  Compute it on the training images only and pass it to ``preprocess`` for every split, so that
  validation and test inputs are centred with the training statistics.

  Args:
    images: uint8 grey levels 0-255, or floating values already on the [0, 1] scale; shape
      [N, ...] with N >= 1.

  Returns:
    float32 array of shape ``images.shape[1:]``.

  Raises:
    TypeError: ``images`` is neither uint8 nor floating.
    ValueError: ``images`` has no rows.

  Example:
    >>> mean = pixel_mean(np.array([[0, 255], [255, 255]], np.uint8))
    >>> mean.tolist()
    [0.5, 1.0]
  """
  unit = _to_unit_scale(images)
  if unit.ndim < 1 or unit.shape[0] == 0:
    raise ValueError(f"images must have at least one row, got shape {unit.shape}")
  # Accumulate in float64: a float32 sum over 60,000 rows would lose about 4 digits.
  return unit.mean(axis=0, dtype=np.float64).astype(np.float32)


def preprocess(images: np.ndarray, mean: np.ndarray) -> np.ndarray:
  """Scales images to [0, 1] and subtracts a per-pixel mean (the paper's input pipeline).

  Args:
    images: uint8 grey levels 0-255 (divided by 255), or floating values already on the [0, 1]
      scale (used as they are); shape [N, ...].
    mean: float [...], the per-pixel mean of the training images from ``pixel_mean``.

  Returns:
    float32 array of the shape of ``images``: ``images / 255 - mean``.

  Raises:
    TypeError: ``images`` is neither uint8 nor floating.
    ValueError: ``mean`` does not have the shape of one image.

  Example:
    >>> train, _ = load_mnist()
    >>> mean = pixel_mean(train)
    >>> x = preprocess(train, mean)
    >>> x.dtype, bool(abs(x.mean()) < 1e-6)
    (dtype('float32'), True)
  """
  unit = _to_unit_scale(images)
  mean = np.asarray(mean)
  if mean.shape != unit.shape[1:]:
    raise ValueError(f"mean must have the shape of one image {unit.shape[1:]}, got {mean.shape}")
  return unit - mean.astype(np.float32)


def _to_unit_scale(images) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) / np.float32(255)
  if np.issubdtype(images.dtype, np.floating):
    return images.astype(np.float32)
  raise TypeError(
      f"images must be uint8 grey levels or floating values in [0, 1], got {images.dtype}")


def split_data(
    images: np.ndarray,
    labels: np.ndarray,
    sizes: Sequence[int],
    *,
    seed: Optional[int] = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
  """Cuts a data set into consecutive disjoint parts of given sizes (train, valid, test, ...).

  Deterministic: without a seed the parts are consecutive slices in the data's own order (the
  bundled subset is already shuffled); with a seed the rows are first permuted by
  ``numpy.random.default_rng(seed)``.

  Args:
    images: array [N, ...].
    labels: array [N].
    sizes: the number of rows of each part, non-negative, summing to at most N (rows left over
      are dropped).
    seed: optional seed of a fixed permutation applied first.

  Returns:
    A list with one ``(images, labels)`` pair per entry of ``sizes``.

  Raises:
    TypeError: an entry of ``sizes`` is not an int.
    ValueError: ``images`` and ``labels`` have different lengths, or ``sizes`` has a negative
      entry or sums to more than N.

  Example:
    >>> images, labels = load_mnist()
    >>> (x_tr, y_tr), (x_va, y_va) = split_data(images, labels, (5000, 5000))
    >>> x_tr.shape
    (5000, 784)
  """
  images, labels = np.asarray(images), np.asarray(labels)
  n = images.shape[0]
  if labels.shape[:1] != (n,):
    raise ValueError(f"labels must have one entry per image ({n}), got shape {labels.shape}")
  sizes = [_static_int(s, "sizes") for s in sizes]
  if any(s < 0 for s in sizes) or sum(sizes) > n:
    raise ValueError(f"sizes must be non-negative and sum to at most the {n} examples, got {sizes}")
  if seed is not None:
    order = np.random.default_rng(seed).permutation(n)
    images, labels = images[order], labels[order]
  bounds = np.cumsum([0] + sizes)
  return [(images[a:b], labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _static_int(value, name: str) -> int:
  """Returns ``value`` as a Python int, or raises TypeError naming the argument."""
  try:
    return operator.index(value)
  except TypeError:  # also a tracer, where a static value is needed
    raise TypeError(f"{name} must be a Python int, got {value!r}") from None


# ------------------------------------------------------------------------------------------------
# Minibatches


def batch_indices(key: jax.Array, step, num_examples: int, batch_size: int) -> jax.Array:
  """Indices of the minibatch used at training step ``step``, a pure function of (key, step).

  Training runs in epochs of ``num_examples // batch_size`` steps. Each epoch visits the
  examples in its own pseudo-random order, seeded by ``jax.random.fold_in(key, epoch)``; step
  ``s`` of the epoch takes positions ``[s * batch_size, (s + 1) * batch_size)`` of that order.
  So an epoch never repeats an example, and when ``batch_size`` does not divide
  ``num_examples`` the ``num_examples % batch_size`` examples left at the end of each epoch's
  order are skipped (a different few each epoch).

  Cost: the order is never materialised. It is a keyed bijection of [0, num_examples) (a
  six-round Feistel network on the smallest power of two that holds the examples, with cycle
  walking back into range), evaluated at the ``batch_size`` positions only: O(batch_size) work
  per step, independent of ``num_examples``; about 8 microseconds per step inside a
  ``lax.scan`` for a batch of 200 on a CPU core. (Drawing ``jax.random.permutation`` of 10,000
  examples inside each step instead costs about 7 ms, two training steps of a 784-50-50-50-10
  MLP.)

  Bit-identical on every call with the same inputs, under ``jit``, ``vmap`` and ``lax.scan``
  (forward or reverse), with x64 on or off: the reversible method relies on it to recompute
  each minibatch in its backward pass.

  Args:
    key: a JAX PRNG key (typed, from ``jax.random.key``, or raw uint32 [2]).
    step: integer scalar, may be traced (e.g. the ``lax.scan`` counter); steps start at 0.
    num_examples: static Python int, the number of examples N (1 <= N < 2**31).
    batch_size: static Python int, 1 <= batch_size <= num_examples.

  Returns:
    int32 [batch_size] indices into [0, num_examples), distinct within a batch and within an
    epoch.

  Raises:
    TypeError: ``num_examples`` or ``batch_size`` is not a Python int (for instance a tracer),
      or ``step`` is not an integer scalar.
    ValueError: ``num_examples`` or ``batch_size`` is out of range.

  Example:
    >>> key = jax.random.key(0)
    >>> idx = batch_indices(key, jnp.int32(3), 10000, 200)
    >>> idx.shape, idx.dtype
    ((200,), dtype('int32'))
  """
  num_examples = _static_int(num_examples, "num_examples")
  batch_size = _static_int(batch_size, "batch_size")
  if not 1 <= num_examples < 2**31:
    raise ValueError(f"num_examples must be in [1, 2**31), got {num_examples}")
  if not 1 <= batch_size <= num_examples:
    raise ValueError(f"batch_size must be in [1, num_examples={num_examples}], got {batch_size}")
  step = jnp.asarray(step)
  if not jnp.issubdtype(step.dtype, jnp.integer) or step.ndim != 0:
    raise TypeError(f"step must be an integer scalar, got {step.dtype} {step.shape}")
  return _batch_indices(key, step, num_examples, batch_size)


# Compiled once per (N, batch size): called eagerly, the while loop inside would otherwise be
# traced and compiled again at every call; under an outer jit or scan this is simply inlined.
@functools.partial(jax.jit, static_argnums=(2, 3))
def _batch_indices(key, step, num_examples: int, batch_size: int) -> jax.Array:
  steps_per_epoch = num_examples // batch_size
  epoch = step // steps_per_epoch
  first = (step % steps_per_epoch).astype(jnp.uint32) * np.uint32(batch_size)
  positions = first + jnp.arange(batch_size, dtype=jnp.uint32)
  round_keys = jax.random.bits(
      jax.random.fold_in(key, epoch), (_FEISTEL_ROUNDS,), dtype=jnp.uint32)
  return _keyed_permutation(positions, round_keys, num_examples).astype(jnp.int32)


def _keyed_permutation(x: jax.Array, round_keys: jax.Array, n: int) -> jax.Array:
  """Applies a keyed bijection of [0, n) to uint32 ``x`` (all entries in [0, n))."""
  bits = max(1, (n - 1).bit_length())  # domain [0, 2**bits) holds [0, n), 2**bits < 2n

  def feistel(v):
    # Unbalanced Feistel network on ``bits``-bit words: each round maps (hi, lo) to
    # (lo, hi ^ F(lo)), a bijection whatever F is; the halves swap widths every round.
    lo_bits = bits // 2
    for r in range(_FEISTEL_ROUNDS):
      hi_bits = bits - lo_bits
      hi, lo = v >> lo_bits, v & np.uint32((1 << lo_bits) - 1)
      mixed = _hash32(lo ^ round_keys[r]) & np.uint32((1 << hi_bits) - 1)
      v = (lo << hi_bits) | (hi ^ mixed)
      lo_bits = hi_bits
    return v

  # Cycle walking: apply the bijection of [0, 2**bits) until the value lands in [0, n); this
  # restricts it to a bijection of [0, n). Each walk lands with probability n / 2**bits > 1/2.
  x = feistel(x)
  return jax.lax.while_loop(
      lambda v: jnp.any(v >= n), lambda v: jnp.where(v >= n, feistel(v), v), x)


def _hash32(x: jax.Array) -> jax.Array:
  """A 32-bit integer mixer (the MurmurHash3 finaliser): every input bit affects every output."""
  x = x ^ (x >> 16)
  x = x * np.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * np.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


# ------------------------------------------------------------------------------------------------
# Omniglot


def load_omniglot(
    folder: PathLike,
    *,
    archives: Sequence[str] = _OMNIGLOT_ARCHIVES,
    alphabets: Optional[Sequence[str]] = None,
    size: int = _MNIST_SIDE,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Loads Omniglot alphabets from the standard archives, as MNIST-like flat images.

  Omniglot (Lake, Salakhutdinov & Tenenbaum, 2015) ships as ``images_background.zip`` (30
  alphabets) and ``images_evaluation.zip`` (20), each holding
  ``<archive>/<Alphabet>/<characterNN>/<drawing>.png`` with 105x105 black strokes on white. The
  extracted folders ``<folder>/<archive>/`` are read as well when the zip files are absent. Each
  drawing is inverted (ink = 1, background = 0, as in MNIST) and downsampled to ``size`` x
  ``size`` by area averaging.

  Args:
    folder: the folder holding the archives.
    archives: which archives to read.
    alphabets: the alphabet names to keep (e.g. ``["Latin", "Greek"]``); None keeps all.
    size: the side of the output images in pixels.

  Returns:
    A dict from alphabet name to ``(images, labels)``: float32 [n, size*size] values in [0, 1]
    and int32 [n] character indices 0..C-1 within the alphabet (characters in sorted order).
    Alphabets are in the order of ``alphabets`` if given, else of ``archives`` and then by name.

  Raises:
    FileNotFoundError: an archive is missing (the message names the expected paths).
    ValueError: ``archives`` names an unknown archive, ``alphabets`` names an alphabet that is
      not there, an alphabet appears in two archives, ``size`` is not positive, or an archive
      holds no drawings.

  Example:
    >>> tasks = load_omniglot("~/data/omniglot", alphabets=["Latin"])  # doctest: +SKIP
    >>> images, labels = tasks["Latin"]  # doctest: +SKIP
  """
  from PIL import Image  # Pillow comes with matplotlib; imported here, only Omniglot needs it.

  folder = os.path.expanduser(os.fspath(folder))
  size = _static_int(size, "size")
  if size < 1:
    raise ValueError(f"size must be positive, got {size}")
  for archive in archives:
    if archive not in _OMNIGLOT_ARCHIVES:
      raise ValueError(f"archives must be among {_OMNIGLOT_ARCHIVES}, got {archive!r}")

  drawings = {}  # (alphabet, character) -> list of PNG byte strings, over all archives
  for archive in archives:
    found = _read_omniglot_archive(folder, archive)
    if not found:
      raise ValueError(f"Omniglot archive {archive!r} in {folder!r} holds no drawings")
    repeated = sorted({a for a, _ in found} & {a for a, _ in drawings})
    if repeated:
      raise ValueError(f"alphabets {repeated} appear in more than one of {archives}")
    drawings.update(found)

  available = list(dict.fromkeys(alphabet for alphabet, _ in drawings))
  wanted = available if alphabets is None else list(alphabets)
  missing = [a for a in wanted if a not in available]
  if missing:
    raise ValueError(f"alphabets {missing} not found; available: {available}")

  out = {}
  for alphabet in wanted:
    characters = sorted(c for a, c in drawings if a == alphabet)
    images, labels = [], []
    for label, character in enumerate(characters):
      for png in drawings[alphabet, character]:
        with Image.open(io.BytesIO(png)) as img:
          grey = img.convert("L").resize((size, size), Image.Resampling.BOX)
        images.append(np.float32(1) - np.asarray(grey, np.float32) / np.float32(255))
        labels.append(label)
    out[alphabet] = (
        np.stack(images).reshape(len(images), size * size),
        np.asarray(labels, np.int32),
    )
  return out


def _read_omniglot_archive(folder: str, archive: str) -> dict[tuple[str, str], list[bytes]]:
  """Reads ``<archive>.zip`` (or the extracted folder): (alphabet, character) -> PNG bytes."""
  zip_path = os.path.join(folder, archive + ".zip")
  dir_path = os.path.join(folder, archive)
  found = {}
  if os.path.isfile(zip_path):
    with zipfile.ZipFile(zip_path) as zf:
      for name in sorted(zf.namelist()):
        parts = name.split("/")
        # Anything else (folder entries, __MACOSX resource forks) is not a drawing.
        if len(parts) == 4 and parts[0] == archive and parts[3].endswith(".png"):
          found.setdefault((parts[1], parts[2]), []).append(zf.read(name))
    return found
  if os.path.isdir(dir_path):
    for alphabet in sorted(_subdirs(dir_path)):
      for character in sorted(_subdirs(os.path.join(dir_path, alphabet))):
        char_dir = os.path.join(dir_path, alphabet, character)
        for png in sorted(os.listdir(char_dir)):
          if png.endswith(".png"):
            with open(os.path.join(char_dir, png), "rb") as f:
              found.setdefault((alphabet, character), []).append(f.read())
    return found
  raise FileNotFoundError(
      f"Omniglot archive not found: expected {zip_path!r} or the extracted folder "
      f"{dir_path!r} (the archives are at {_OMNIGLOT_URL})")


def _subdirs(path: str) -> list[str]:
  return [d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))]
