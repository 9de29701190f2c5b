"""Meta-optimisation: an optax loop over hyperparameters with logs, checkpoints and resume."""

from revhyper._meta import MetaResult
from revhyper._meta import MetaStep
from revhyper._meta import PaperAdamState
from revhyper._meta import latest_checkpoint
from revhyper._meta import load_checkpoint
from revhyper._meta import meta_optimize
from revhyper._meta import paper_adam
from revhyper._meta import save_checkpoint

__all__ = (
    "MetaResult",
    "MetaStep",
    "PaperAdamState",
    "latest_checkpoint",
    "load_checkpoint",
    "meta_optimize",
    "paper_adam",
    "save_checkpoint",
)
