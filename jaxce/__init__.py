"""jaxce: numerically stable softmax and cross-entropy losses in pure JAX."""

from jaxce._aux import CrossEntropyAux
from jaxce._binary import binary_cross_entropy
from jaxce._binary import binary_cross_entropy_with_logits
from jaxce._checks import checked
from jaxce._classification import dense_cross_entropy
from jaxce._classification import nll_loss
from jaxce._classification import sparse_cross_entropy
from jaxce._linear import linear_cross_entropy
from jaxce._regression import mse_loss
from jaxce._softmax import log_softmax
from jaxce._softmax import logsumexp
from jaxce._softmax import softmax

__version__ = "0.1.0"

__all__ = (
    "CrossEntropyAux",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "checked",
    "dense_cross_entropy",
    "linear_cross_entropy",
    "log_softmax",
    "logsumexp",
    "mse_loss",
    "nll_loss",
    "softmax",
    "sparse_cross_entropy",
)
