"""revhyper: exact hypergradients by running training backwards.

Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter Optimization through Reversible
Learning", ICML 2015 (arXiv:1502.03492).

The core, at the top level, is ``sgd``: momentum SGD for a fixed number of steps whose result
``jax.grad`` can differentiate with respect to every input (initial weights and velocity,
hyperparameters of the loss, learning-rate and momentum schedules), by exact reversal by
default; ``round_trip`` checks that reversal on a problem. Around the core, in submodules:

* ``revhyper.hyper``: the paper's parameterisations (log learning rates, logit momenta, ...);
* ``revhyper.meta``: a meta-optimisation loop with logging, checkpoints and resume;
* ``revhyper.datasets``: the bundled MNIST digits, MNIST IDX files, Omniglot, minibatches;
* ``revhyper.models``: the paper's tanh MLPs and their losses.
"""

from revhyper import datasets
from revhyper import hyper
from revhyper import meta
from revhyper import models
from revhyper._errors import ReversalError
from revhyper._sgd import Checkpoint
from revhyper._sgd import Reversible
from revhyper._sgd import RoundTrip
from revhyper._sgd import SGDResult
from revhyper._sgd import Stats
from revhyper._sgd import Unroll
from revhyper._sgd import round_trip
from revhyper._sgd import sgd

__version__ = "0.1.0"

__all__ = (
    "Checkpoint",
    "ReversalError",
    "Reversible",
    "RoundTrip",
    "SGDResult",
    "Stats",
    "Unroll",
    "round_trip",
    "sgd",
)

_SUBMODULES = ("datasets", "hyper", "meta", "models")


def __dir__():
  # The private modules are importable but not part of the API: keep them out of dir().
  return sorted(__all__ + _SUBMODULES + ("__version__",))
