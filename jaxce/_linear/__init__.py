"""Cross-entropy of a linear layer's output without materialising the logits.

Modules, in call order: :mod:`.api` (the public function, validation, the
static configuration and platform defaults), :mod:`.blocks` (blocking and the
block maths both paths share), :mod:`.fused` and :mod:`.recompute` (one custom
VJP each), :mod:`.sharded` (the vocabulary-parallel ``shard_map`` wrapper) and
:mod:`.reference` (the naive loss the tests and benchmarks trust).
"""

from jaxce._linear.api import linear_cross_entropy

__all__ = ("linear_cross_entropy",)
