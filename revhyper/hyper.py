"""Hyperparameter parameterisations and schedules, as in the paper (section 3).

Meta-optimisation works on unconstrained values: the learning rate is ``exp(log alpha)``, the
momentum ``sigmoid(logit gamma)``, each initialisation scale ``exp(log scale)``.
"""

from revhyper._hyper import constant_like
from revhyper._hyper import constant_schedule
from revhyper._hyper import init_scale_from_log
from revhyper._hyper import learning_rate_from_log
from revhyper._hyper import logit
from revhyper._hyper import momentum_from_logit

__all__ = (
    "constant_like",
    "constant_schedule",
    "init_scale_from_log",
    "learning_rate_from_log",
    "logit",
    "momentum_from_logit",
)
