"""Tests of the data loaders, preprocessing, splits and minibatch indices."""

import gzip
import io
import os
import struct
import zipfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from revhyper import _data

MNIST_NAMES = {  # the names of the official distribution
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGES_TRAIN = "train-images-idx3-ubyte"
LABELS_TEST = "t10k-labels-idx1-ubyte"
# Digit counts of the bundled subset, from revhyper/data_files/README.md.
BUNDLED_COUNTS = [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]


# ------------------------------------------------------------------------------------------------
# IDX files


def idx_bytes(array, code):
  """Encodes ``array`` as an IDX file with the given type code."""
  big_endian = array.astype(array.dtype.newbyteorder(">"))
  header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  return header + big_endian.tobytes()


def tiny_mnist(n_train=5, n_test=3, seed=0):
  rng = np.random.default_rng(seed)
  return {
      "train": (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
                rng.integers(0, 10, n_train, dtype=np.uint8)),
      "test": (rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
               rng.integers(0, 10, n_test, dtype=np.uint8)),
  }


def write_file(path, data, compress):
  if compress:
    with gzip.open(str(path) + ".gz", "wb") as f:
      f.write(data)
  else:
    with open(path, "wb") as f:
      f.write(data)


def write_mnist(folder, splits, compress=False):
  """Writes the four MNIST IDX files."""
  for split, (images_name, labels_name) in MNIST_NAMES.items():
    images, labels = splits[split]
    write_file(folder / images_name, idx_bytes(images, 0x08), compress)
    write_file(folder / labels_name, idx_bytes(labels, 0x08), compress)


@pytest.mark.parametrize("compress", [False, True])
def test_load_mnist_idx_reads_what_was_written(tmp_path, compress):
  splits = tiny_mnist()
  write_mnist(tmp_path, splits, compress)
  loaded = _data.load_mnist_idx(tmp_path)
  assert set(loaded) == {"train", "test"}
  for split, (images, labels) in splits.items():
    got_images, got_labels = loaded[split]
    assert got_images.dtype == np.uint8 and got_labels.dtype == np.uint8
    np.testing.assert_array_equal(got_images, images.reshape(len(images), 784))
    np.testing.assert_array_equal(got_labels, labels)
  images, labels = _data.load_mnist(tmp_path)
  assert images.shape == (8, 784) and labels.shape == (8,)
  np.testing.assert_array_equal(images[5:], splits["test"][0].reshape(3, 784))


def test_plain_file_preferred_over_gz(tmp_path):
  write_mnist(tmp_path, tiny_mnist(seed=0), compress=True)
  plain = tiny_mnist(seed=1)
  write_mnist(tmp_path, plain, compress=False)
  np.testing.assert_array_equal(_data.load_mnist_idx(tmp_path)["test"][1], plain["test"][1])


@pytest.mark.parametrize("array,code", [
    (np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5, 0x0C),
    (np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2), 0x0D),
    (np.array([1.5, -2.25], np.float64), 0x0E),
    (np.array([-3, 4], np.int16), 0x0B),
    (np.array([-3, 4], np.int8), 0x09),
])
def test_read_idx_other_types(tmp_path, array, code):
  path = tmp_path / "x.idx"
  path.write_bytes(idx_bytes(array, code))
  got = _data.read_idx(path)
  assert got.dtype == array.dtype and got.dtype.isnative
  np.testing.assert_array_equal(got, array)
  got[...] = 0  # writable


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("name,corrupt,message", [
    (IMAGES_TRAIN, lambda b: b[:-1], "truncated IDX file"),
    (IMAGES_TRAIN, lambda b: b[:10], "truncated IDX file"),
    (IMAGES_TRAIN, lambda b: b[:2], "truncated IDX file"),
    (IMAGES_TRAIN, lambda b: b + b"\0", "trailing bytes"),
    (IMAGES_TRAIN, lambda b: b"\x12\x34" + b[2:], "magic number 0x1234"),
    (IMAGES_TRAIN, lambda b: b[:2] + b"\x07" + b[3:], "unknown type code 0x07"),
    (LABELS_TEST, lambda b: idx_bytes(np.zeros((3, 28, 28), np.uint8), 0x08), "0x00000801"),
    (IMAGES_TRAIN, lambda b: idx_bytes(np.zeros(5, np.uint8), 0x08), "0x00000803"),
    (IMAGES_TRAIN, lambda b: idx_bytes(np.zeros((5, 28, 28), np.int32), 0x0C), "0x00000803"),
    (IMAGES_TRAIN, lambda b: idx_bytes(np.zeros((5, 28, 27), np.uint8), 0x08), "28x28"),
    (LABELS_TEST, lambda b: idx_bytes(np.zeros(4, np.uint8), 0x08), "holds 4 labels"),
    (LABELS_TEST, lambda b: idx_bytes(np.array([1, 10, 2], np.uint8), 0x08), "digits 0-9"),
])
def test_load_mnist_idx_rejects_bad_files(tmp_path, compress, name, corrupt, message):
  splits = tiny_mnist()
  write_mnist(tmp_path, splits, compress)
  good = {
      IMAGES_TRAIN: idx_bytes(splits["train"][0], 0x08),
      LABELS_TEST: idx_bytes(splits["test"][1], 0x08),
  }[name]
  write_file(tmp_path / name, corrupt(good), compress)
  with pytest.raises(ValueError, match=message) as info:
    _data.load_mnist_idx(tmp_path)
  assert name in str(info.value)


def test_broken_gzip(tmp_path):
  write_mnist(tmp_path, tiny_mnist(), compress=True)
  gz = tmp_path / (LABELS_TEST + ".gz")
  gz.write_bytes(gz.read_bytes()[:-12])  # cut into the compressed stream
  with pytest.raises(ValueError, match="gzip") as info:
    _data.load_mnist_idx(tmp_path)
  assert LABELS_TEST in str(info.value)
  gz.write_bytes(b"not gzip at all")
  with pytest.raises(ValueError, match="gzip"):
    _data.load_mnist_idx(tmp_path)


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    _data.load_mnist_idx(tmp_path / "nowhere")
  write_mnist(tmp_path, tiny_mnist())
  os.remove(tmp_path / LABELS_TEST)
  with pytest.raises(FileNotFoundError, match=LABELS_TEST):
    _data.load_mnist(tmp_path)
  with pytest.raises(ValueError, match=r"\.npz file"):
    _data.load_mnist(tmp_path / IMAGES_TRAIN)


# ------------------------------------------------------------------------------------------------
# Bundled subset, preprocessing, splits


def test_bundled_mnist():
  images, labels = _data.load_mnist()
  assert images.shape == (10000, 784) and images.dtype == np.uint8
  assert labels.shape == (10000,) and labels.dtype == np.uint8
  assert np.bincount(labels, minlength=10).tolist() == BUNDLED_COUNTS
  assert images.max() == 255 and images.min() == 0


def test_load_mnist_npz_file(tmp_path):
  images, labels = tiny_mnist()["train"]
  path = tmp_path / "digits.npz"
  np.savez(path, images=images.reshape(5, 784), labels=labels)
  np.testing.assert_array_equal(_data.load_mnist(path)[1], labels)
  np.savez(path, images=images, labels=labels)  # not flat
  with pytest.raises(ValueError, match="'images' must be uint8"):
    _data.load_mnist(path)


def test_preprocess_uses_the_given_mean():
  images, _ = _data.load_mnist()
  train, valid = images[:6000], images[6000:]
  mean = _data.pixel_mean(train)
  assert mean.shape == (784,) and mean.dtype == np.float32
  x_train = _data.preprocess(train, mean)
  x_valid = _data.preprocess(valid, mean)
  assert x_train.dtype == np.float32 and x_train.shape == train.shape
  np.testing.assert_allclose(x_train.mean(axis=0, dtype=np.float64), 0.0, atol=1e-6)
  # Validation data is centred with the training mean, not its own.
  np.testing.assert_array_equal(x_valid, valid.astype(np.float32) / np.float32(255) - mean)
  assert np.abs(x_valid.mean(axis=0)).max() > 1e-3
  np.testing.assert_array_equal(_data.pixel_mean(train / 255.0), mean)


def test_preprocess_errors():
  images = np.zeros((4, 784), np.uint8)
  with pytest.raises(ValueError, match="mean must have the shape"):
    _data.preprocess(images, np.zeros(783, np.float32))
  with pytest.raises(TypeError, match="images must be uint8"):
    _data.preprocess(images.astype(np.int32), np.zeros(784, np.float32))
  with pytest.raises(ValueError, match="at least one row"):
    _data.pixel_mean(images[:0])


def test_split_data():
  images = np.arange(20).reshape(10, 2)
  labels = np.arange(10)
  parts = _data.split_data(images, labels, (5, 3, 2))
  assert [len(y) for _, y in parts] == [5, 3, 2]
  np.testing.assert_array_equal(parts[1][1], [5, 6, 7])
  np.testing.assert_array_equal(parts[1][0], images[5:8])
  shuffled = _data.split_data(images, labels, (4, 4), seed=3)
  again = _data.split_data(images, labels, (4, 4), seed=3)
  for (x, y), (_, y2) in zip(shuffled, again):
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(x, images[y])
  assert not set(shuffled[0][1]) & set(shuffled[1][1])
  assert shuffled[0][1].tolist() != [0, 1, 2, 3]
  with pytest.raises(ValueError, match="sizes"):
    _data.split_data(images, labels, (6, 5))
  with pytest.raises(ValueError, match="sizes"):
    _data.split_data(images, labels, (-1, 5))
  with pytest.raises(TypeError, match="sizes"):
    _data.split_data(images, labels, (2.5,))
  with pytest.raises(ValueError, match="labels"):
    _data.split_data(images, labels[:9], (2,))


# ------------------------------------------------------------------------------------------------
# Minibatch indices


@pytest.mark.parametrize(
    "num_examples,batch_size", [(100, 10), (103, 10), (1000, 1000), (7, 3), (1, 1), (2, 1)])
def test_batch_indices_cover_an_epoch_without_repeats(num_examples, batch_size):
  key = jax.random.key(0)
  steps_per_epoch = num_examples // batch_size
  f = jax.jit(_data.batch_indices, static_argnums=(2, 3))
  for epoch in range(3):
    steps = range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
    idx = np.concatenate([f(key, jnp.int32(s), num_examples, batch_size) for s in steps])
    assert idx.dtype == np.int32
    assert idx.min() >= 0 and idx.max() < num_examples
    assert len(np.unique(idx)) == steps_per_epoch * batch_size  # no repeats in an epoch
  if num_examples == steps_per_epoch * batch_size:
    assert sorted(idx.tolist()) == list(range(num_examples))


@pytest.mark.slow
def test_batch_indices_are_a_pure_function_of_key_and_step():
  key = jax.random.key(42)
  steps = jnp.arange(40, dtype=jnp.int32)
  eager = jnp.stack([_data.batch_indices(key, s, 1000, 50) for s in steps])
  again = jnp.stack([_data.batch_indices(key, s, 1000, 50) for s in steps])

  def body(carry, s):
    return carry, _data.batch_indices(key, s, 1000, 50)

  _, scanned = jax.jit(lambda: jax.lax.scan(body, 0, steps))()
  _, reverse = jax.jit(lambda: jax.lax.scan(body, 0, steps, reverse=True))()
  for other in (again, scanned, reverse):
    chex.assert_trees_all_equal(eager, other)
  with jax.enable_x64(True):  # int64 steps give the same batches
    wide = jnp.stack([_data.batch_indices(key, s, 1000, 50) for s in jnp.arange(40)])
  chex.assert_trees_all_equal(eager, wide)
  raw = jax.random.PRNGKey(42)  # raw uint32 keys work too
  assert _data.batch_indices(raw, 3, 1000, 50).shape == (50,)


def test_batch_indices_differ_between_epochs_and_keys():
  a = _data.batch_indices(jax.random.key(0), 0, 100, 100)
  b = _data.batch_indices(jax.random.key(0), 1, 100, 100)
  c = _data.batch_indices(jax.random.key(1), 0, 100, 100)
  assert a.tolist() != b.tolist() and a.tolist() != c.tolist()
  assert a.tolist() != list(range(100))


def test_batch_indices_are_roughly_uniform():
  # Over 3000 epochs, every example should come first about 3000/20 = 150 times (sd ~12).
  def body(carry, s):
    return carry, _data.batch_indices(jax.random.key(7), s, 20, 20)[0]

  _, first = jax.lax.scan(body, 0, jnp.arange(3000, dtype=jnp.int32))
  counts = np.bincount(np.asarray(first), minlength=20)
  assert counts.min() > 100 and counts.max() < 200, counts


def test_batch_indices_errors():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="batch_size"):
    _data.batch_indices(key, 0, 10, 11)
  with pytest.raises(ValueError, match="num_examples"):
    _data.batch_indices(key, 0, 0, 1)
  with pytest.raises(TypeError, match="num_examples"):
    jax.jit(lambda n: _data.batch_indices(key, 0, n, 1))(10)
  with pytest.raises(TypeError, match="step"):
    _data.batch_indices(key, 1.0, 10, 2)


# ------------------------------------------------------------------------------------------------
# Omniglot


def png_bytes(side, ink):
  """A binary Omniglot-style drawing: white background, a black rectangle of strokes."""
  img = Image.new("1", (side, side), 1)
  img.paste(0, ink)
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


OMNIGLOT_LAYOUT = {
    "Bravo": ["character02", "character01", "character03"],
    "Alpha": ["character01", "character02"],
}


def write_omniglot(folder, archive="images_background", as_zip=True, layout=None):
  # The left half inked: after downsampling to 4x4 the left two columns are 1, the right 0.
  png = png_bytes(40, (0, 0, 20, 40))
  entries = {}
  for alphabet, characters in (layout or OMNIGLOT_LAYOUT).items():
    for character in characters:
      for k in range(2):
        entries[f"{archive}/{alphabet}/{character}/{k}.png"] = png
  if as_zip:
    with zipfile.ZipFile(folder / f"{archive}.zip", "w") as zf:
      zf.writestr(f"{archive}/", b"")
      zf.writestr(f"__MACOSX/{archive}/._x.png", b"resource fork")
      for name, data in entries.items():
        zf.writestr(name, data)
  else:
    for name, data in entries.items():
      (folder / name).parent.mkdir(parents=True, exist_ok=True)
      (folder / name).write_bytes(data)


@pytest.mark.parametrize("as_zip", [True, False])
def test_load_omniglot(tmp_path, as_zip):
  write_omniglot(tmp_path, as_zip=as_zip)
  tasks = _data.load_omniglot(tmp_path, archives=("images_background",), size=4)
  assert list(tasks) == ["Alpha", "Bravo"]
  images, labels = tasks["Bravo"]
  assert images.shape == (6, 16) and images.dtype == np.float32
  assert labels.dtype == np.int32 and labels.tolist() == [0, 0, 1, 1, 2, 2]
  expected = np.tile(np.array([1, 1, 0, 0], np.float32), 4)
  np.testing.assert_array_equal(images, np.broadcast_to(expected, images.shape))
  only = _data.load_omniglot(
      tmp_path, archives=("images_background",), alphabets=["Bravo"], size=4)
  assert list(only) == ["Bravo"]


def test_load_omniglot_default_size_and_archives(tmp_path):
  write_omniglot(tmp_path, "images_background")
  with pytest.raises(FileNotFoundError, match="images_evaluation.zip"):
    _data.load_omniglot(tmp_path)
  write_omniglot(tmp_path, "images_evaluation", layout={"Zulu": ["character01"]})
  tasks = _data.load_omniglot(tmp_path, alphabets=["Zulu", "Alpha"])
  assert list(tasks) == ["Zulu", "Alpha"]
  assert tasks["Alpha"][0].shape == (4, 784) and tasks["Zulu"][0].shape == (2, 784)
  assert list(_data.load_omniglot(tmp_path)) == ["Alpha", "Bravo", "Zulu"]
  write_omniglot(tmp_path, "images_evaluation")  # the same alphabets in both archives
  with pytest.raises(ValueError, match="more than one"):
    _data.load_omniglot(tmp_path)


def test_load_omniglot_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="images_background"):
    _data.load_omniglot(tmp_path)
  write_omniglot(tmp_path)
  with pytest.raises(ValueError, match="Latin"):
    _data.load_omniglot(tmp_path, archives=("images_background",), alphabets=["Latin"])
  with pytest.raises(ValueError, match="archives"):
    _data.load_omniglot(tmp_path, archives=("images_train",))
  with pytest.raises(ValueError, match="size"):
    _data.load_omniglot(tmp_path, archives=("images_background",), size=0)
  with zipfile.ZipFile(tmp_path / "images_evaluation.zip", "w") as zf:
    zf.writestr("images_evaluation/readme.txt", b"")
  with pytest.raises(ValueError, match="no drawings"):
    _data.load_omniglot(tmp_path, archives=("images_evaluation",))
