"""Data sets: the bundled MNIST digits, full MNIST IDX files, Omniglot, and minibatches.

Loaders are plain numpy and never touch the network. ``batch_indices`` is a pure JAX function
of ``(key, step)``, so the reversible method can recompute every minibatch bit for bit.
"""

from revhyper._data import batch_indices
from revhyper._data import load_mnist
from revhyper._data import load_mnist_idx
from revhyper._data import load_omniglot
from revhyper._data import pixel_mean
from revhyper._data import preprocess
from revhyper._data import read_idx
from revhyper._data import split_data

__all__ = (
    "batch_indices",
    "load_mnist",
    "load_mnist_idx",
    "load_omniglot",
    "pixel_mean",
    "preprocess",
    "read_idx",
    "split_data",
)
