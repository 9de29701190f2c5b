"""revhyper: exact hypergradients by running momentum SGD backwards.

Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter Optimization through Reversible
Learning", ICML 2015 (arXiv:1502.03492).

The core is ``sgd``: momentum SGD for a fixed number of steps whose result ``jax.grad`` can
differentiate with respect to every input (initial weights and velocity, hyperparameters of
the loss, learning-rate and momentum schedules), by exact reversal by default. Around it:
the paper's parameterisations and schedules, a meta-optimisation loop, data and models.
"""

from revhyper._data import batch_indices
from revhyper._data import load_mnist
from revhyper._data import load_mnist_idx
from revhyper._data import load_omniglot
from revhyper._data import pixel_mean
from revhyper._data import preprocess
from revhyper._data import read_idx
from revhyper._data import split_data
from revhyper._errors import ReversalError
from revhyper._hyper import constant_like
from revhyper._hyper import constant_schedule
from revhyper._hyper import init_scale_from_log
from revhyper._hyper import learning_rate_from_log
from revhyper._hyper import logit
from revhyper._hyper import momentum_from_logit
from revhyper._meta import MetaResult
from revhyper._meta import MetaStep
from revhyper._meta import latest_checkpoint
from revhyper._meta import load_checkpoint
from revhyper._meta import meta_optimize
from revhyper._meta import save_checkpoint
from revhyper._models import error_rate
from revhyper._models import mlp_apply
from revhyper._models import mlp_init
from revhyper._models import mlp_init_from_noise
from revhyper._models import mlp_noise
from revhyper._models import softmax_cross_entropy
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
    # Reversible momentum SGD.
    "Checkpoint",
    "ReversalError",
    "Reversible",
    "RoundTrip",
    "SGDResult",
    "Stats",
    "Unroll",
    "round_trip",
    "sgd",
    # Hyperparameter parameterisations and schedules.
    "constant_like",
    "constant_schedule",
    "init_scale_from_log",
    "learning_rate_from_log",
    "logit",
    "momentum_from_logit",
    # Meta-optimisation.
    "MetaResult",
    "MetaStep",
    "latest_checkpoint",
    "load_checkpoint",
    "meta_optimize",
    "save_checkpoint",
    # Data.
    "batch_indices",
    "load_mnist",
    "load_mnist_idx",
    "load_omniglot",
    "pixel_mean",
    "preprocess",
    "read_idx",
    "split_data",
    # Models.
    "error_rate",
    "mlp_apply",
    "mlp_init",
    "mlp_init_from_noise",
    "mlp_noise",
    "softmax_cross_entropy",
)
