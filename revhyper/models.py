"""Models: the paper's tanh multilayer perceptrons (logistic regression included) and losses,
a small residual convnet with BatchNorm (its training mode returns the batch statistics for
``revhyper.RunningAverage``) and a small transformer with dropout."""

from revhyper._models import error_rate
from revhyper._models import mlp_apply
from revhyper._models import mlp_init
from revhyper._models import mlp_init_from_noise
from revhyper._models import mlp_noise
from revhyper._models import softmax_cross_entropy
from revhyper._resnet import resnet_apply
from revhyper._resnet import resnet_batchnorm_init
from revhyper._resnet import resnet_init
from revhyper._transformer import image_patches
from revhyper._transformer import transformer_apply
from revhyper._transformer import transformer_init

__all__ = (
    "error_rate",
    "image_patches",
    "mlp_apply",
    "mlp_init",
    "mlp_init_from_noise",
    "mlp_noise",
    "resnet_apply",
    "resnet_batchnorm_init",
    "resnet_init",
    "softmax_cross_entropy",
    "transformer_apply",
    "transformer_init",
)
