"""Meta-optimisation: an optax loop over hyperparameters with logs, checkpoints and resume;
hypergradients averaged over seeds, their spread, and transforms that bound them."""

from revhyper._meta import MetaResult
from revhyper._meta import MetaStep
from revhyper._meta import PaperAdamState
from revhyper._meta import latest_checkpoint
from revhyper._meta import load_checkpoint
from revhyper._meta import meta_optimize
from revhyper._meta import paper_adam
from revhyper._meta import save_checkpoint
from revhyper._seeds import HypergradientSpread
from revhyper._seeds import clip_hypergradient
from revhyper._seeds import hypergradient_variance
from revhyper._seeds import normalize_hypergradient
from revhyper._seeds import per_seed_hypergradients
from revhyper._seeds import seed_averaged_hypergradient

__all__ = (
    "HypergradientSpread",
    "MetaResult",
    "MetaStep",
    "PaperAdamState",
    "clip_hypergradient",
    "hypergradient_variance",
    "latest_checkpoint",
    "load_checkpoint",
    "meta_optimize",
    "normalize_hypergradient",
    "paper_adam",
    "per_seed_hypergradients",
    "save_checkpoint",
    "seed_averaged_hypergradient",
)
