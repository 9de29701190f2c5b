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
import numpy as np  # noqa: E402

BUNDLED_DATA_NOTE = (
    "Ran on the 10,000 bundled MNIST digits (revhyper.load_mnist()), fewer than the paper's "
    "splits; pass --mnist_dir with the four MNIST IDX files for the full data set.")


def setting(flag_values, name, paper, quick):
  """The flag ``name``, or where it was left at None its value in ``paper`` (``quick`` with
  --quick). A list flag comes back as a tuple of ints."""
  value = getattr(flag_values, name)
  if value is not None:
    return tuple(int(v) for v in value) if isinstance(value, list) else value
  return (quick if flag_values.quick else paper)[name]


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
