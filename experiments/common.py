"""Small helpers shared by the experiment launchers: settings, data, output files, figures.

Launchers are flat absl scripts; this module holds only what several of them do the same
way. It imports only revhyper's public API.
"""

import json
import os
import time

import matplotlib

matplotlib.use("Agg")  # launchers run headless; figures go to files
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import revhyper  # noqa: E402

BUNDLED_DATA_NOTE = (
    "Ran on the 10,000 bundled MNIST digits (revhyper.datasets.load_mnist()), fewer than the paper's "
    "splits; pass --mnist_dir with the four MNIST IDX files for the full data set.")


def setting(flag_values, name, paper, quick):
  """The flag ``name``, or where it was left at None its value in ``paper`` (``quick`` with
  --quick). A list flag comes back as a tuple of ints."""
  value = getattr(flag_values, name)
  if value is not None:
    return tuple(int(v) for v in value) if isinstance(value, list) else value
  return (quick if flag_values.quick else paper)[name]


def split_sizes(split_flag, quick, mnist_dir, *, bundled, idx, quick_sizes):
  """Sizes of the data splits: the --split flag where given, else ``quick_sizes`` with
  --quick, else ``idx`` with --mnist_dir (full MNIST) and ``bundled`` without."""
  if split_flag:
    return tuple(int(v) for v in split_flag)
  if quick:
    return quick_sizes
  return idx if mnist_dir else bundled


def load_mnist_splits(mnist_dir, sizes, seed, names):
  """Disjoint random splits of MNIST of ``sizes``, centred with the mean of the first.

  The digits are the bundled 10,000 (``revhyper.datasets.load_mnist()``), or with ``mnist_dir`` the
  full 70,000 of the four IDX files there. ``names`` names the splits in the note, e.g.
  ``("train", "valid")``. Returns ``(data, note)``: data is one ``(x float32 [n, 784],
  y int32 [n])`` per split; the note says which data the run used.
  """
  split = "/".join(str(n) for n in sizes)
  names = "/".join(names)
  if mnist_dir:
    splits = revhyper.datasets.load_mnist_idx(mnist_dir)
    images = np.concatenate([splits["train"][0], splits["test"][0]])
    labels = np.concatenate([splits["train"][1], splits["test"][1]])
    note = f"Ran on full MNIST from {mnist_dir}, split {names} {split}."
  else:
    images, labels = revhyper.datasets.load_mnist()
    note = BUNDLED_DATA_NOTE + f" Split {names} {split}."
  parts = revhyper.datasets.split_data(images, labels, sizes, seed=seed)
  mean = revhyper.datasets.pixel_mean(parts[0][0])
  data = [(jnp.asarray(revhyper.datasets.preprocess(x, mean)), jnp.asarray(y, jnp.int32))
          for x, y in parts]
  return data, note


def prepare_out_dir(out_dir):
  """Creates ``out_dir`` and returns it."""
  os.makedirs(out_dir, exist_ok=True)
  return out_dir


def _jsonable(value):
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if hasattr(value, "tolist"):  # numpy and jax arrays, numpy scalars
    return value.tolist()
  return value


def save_results(out_dir, results, name="results.json"):
  """Writes ``results`` (dicts, lists, arrays, scalars) as JSON atomically; returns the path."""
  path = os.path.join(out_dir, name)
  record = dict(_jsonable(results), written_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1, allow_nan=True)
  os.replace(tmp, path)
  return path


def save_figure(fig, out_dir, name):
  """Saves a matplotlib figure as PNG under ``out_dir`` and closes it; returns the path."""
  path = os.path.join(out_dir, name)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return path


def image_grid(images, rows, cols, pad=1):
  """Tiles ``images`` [n, h, w] into one [rows*(h+pad), cols*(w+pad)] array (NaN padding)."""
  images = np.asarray(images, np.float64)
  n, h, w = images.shape
  grid = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad), np.nan)
  for i in range(min(n, rows * cols)):
    r, c = divmod(i, cols)
    grid[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = images[i]
  return grid


def meta_learning_curve(history, values, final, label, ylabel="loss after training"):
  """Starts a meta-learning curve: ``values`` (one per entry of ``history``, before that
  meta-iteration's update), then ``final`` (after the last update), against the iteration.

  Returns ``(fig, ax)`` with the axes labelled; the caller adds its own reference lines, then
  the legend.
  """
  it = [r["iteration"] for r in history] + [len(history)]
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  ax.plot(it, list(values) + [final], "o-", ms=3, label=label)
  ax.set_xlabel("meta-iteration")
  ax.set_ylabel(ylabel)
  ax.set_title("Meta-learning curve")
  ax.grid(alpha=0.3)
  return fig, ax
