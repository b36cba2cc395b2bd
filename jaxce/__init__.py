"""jaxce: numerically stable softmax and cross-entropy losses in pure JAX."""

from jaxce._softmax import log_softmax
from jaxce._softmax import logsumexp
from jaxce._softmax import softmax

__version__ = "0.1.0"

__all__ = (
    "log_softmax",
    "logsumexp",
    "softmax",
)
