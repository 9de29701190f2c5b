"""Optimizers named and parameterised like optax's, which revhyper runs backwards exactly.

Write an optax chain the same way::

    optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=1e-2))
    revhyper.optim.chain(revhyper.optim.clip_by_global_norm(1.0),
                         revhyper.optim.adamw(1e-3, weight_decay=1e-2))

and run it with ``revhyper.train``. Coefficients take a scalar, a ``[T]`` array, a pytree like
``params`` of those, or a schedule function of the step (an optax schedule), and may be traced.
New optimizers subclass ``Rule`` (see the how-to "Write your own optimizer").
"""

from revhyper._optim import AdaBelief
from revhyper._optim import Adam
from revhyper._optim import AddDecayedWeights
from revhyper._optim import Clip
from revhyper._optim import ClipByGlobalNorm
from revhyper._optim import Coefficient
from revhyper._optim import GradientTransform
from revhyper._optim import HeavyBall
from revhyper._optim import Lion
from revhyper._optim import Optimizer
from revhyper._optim import RMSProp
from revhyper._optim import Rule
from revhyper._optim import State
from revhyper._optim import Trace
from revhyper._optim import adabelief
from revhyper._optim import adam
from revhyper._optim import adamw
from revhyper._optim import add_decayed_weights
from revhyper._optim import chain
from revhyper._optim import clip
from revhyper._optim import clip_by_global_norm
from revhyper._optim import heavy_ball
from revhyper._optim import lion
from revhyper._optim import rmsprop
from revhyper._optim import sgd
from revhyper._check_rule import check_rule

__all__ = (
    "AdaBelief", "Adam", "AddDecayedWeights", "Clip", "ClipByGlobalNorm", "Coefficient",
    "GradientTransform", "HeavyBall", "Lion", "Optimizer", "RMSProp", "Rule", "State", "Trace",
    "adabelief", "adam", "adamw", "add_decayed_weights", "chain", "check_rule", "clip",
    "clip_by_global_norm", "heavy_ball", "lion", "rmsprop", "sgd",
)
