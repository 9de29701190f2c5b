"""revhyper: exact hypergradients by running momentum SGD backwards.

Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter Optimization through Reversible
Learning", ICML 2015 (arXiv:1502.03492).
"""

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
