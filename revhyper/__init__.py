"""revhyper: exact hypergradients by running training backwards.

Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter Optimization through Reversible
Learning", ICML 2015 (arXiv:1502.03492).

The core, at the top level, is ``train``, which runs any optimizer of ``revhyper.optim``
(optax's names and arguments: ``sgd``, ``adamw``, ``rmsprop``, ``chain``, ...), and ``sgd`` and
``adam``: momentum SGD (with optional decoupled
weight decay) and Adam/AdamW for a fixed number of steps, whose results ``jax.grad`` can
differentiate with respect to every input (initial weights and optimizer state,
hyperparameters of the loss, every coefficient's schedule), by exact reversal by default;
``round_trip`` checks that reversal on a problem. Around the core, in submodules:

* ``revhyper.optim``: optimizers as data, and the ``Rule`` API to write new ones;
* ``revhyper.hyper``: the paper's parameterisations (log learning rates, logit momenta, ...);
* ``revhyper.meta``: a meta-optimisation loop with logging, checkpoints and resume;
* ``revhyper.datasets``: the bundled MNIST digits, MNIST IDX files, Omniglot, minibatches;
* ``revhyper.models``: the paper's tanh MLPs and their losses.
"""

from revhyper import datasets
from revhyper import hyper
from revhyper import meta
from revhyper import models
from revhyper import optim
from revhyper._adam import AdamResult
from revhyper._adam import adam
from revhyper._errors import ReversalError
from revhyper._model_state import RunningAverage
from revhyper._sgd import SGDResult
from revhyper._sgd import sgd
from revhyper._training import Checkpoint
from revhyper._training import Reversible
from revhyper._training import RoundTrip
from revhyper._training import Stats
from revhyper._training import TrainResult
from revhyper._training import Unroll
from revhyper._training import round_trip
from revhyper._training import train

__version__ = "0.1.0"

__all__ = (
    "AdamResult",
    "Checkpoint",
    "ReversalError",
    "Reversible",
    "RoundTrip",
    "RunningAverage",
    "SGDResult",
    "Stats",
    "TrainResult",
    "Unroll",
    "adam",
    "round_trip",
    "sgd",
    "train",
)

_SUBMODULES = ("datasets", "hyper", "meta", "models", "optim")


def __dir__():
  # The private modules are importable but not part of the API: keep them out of dir().
  return sorted(__all__ + _SUBMODULES + ("__version__",))
