"""FX graph passes of bitfx, installed as ``bitfx.passes``.

* :mod:`.analysis` classifies the tensors a forward graph saves for backward.
* :mod:`.rewrite` inserts the compress / decompress nodes.
* :mod:`.partition` wraps PyTorch's partitioner and runs both.
"""

from .analysis import Decision, SavedTensor, analyze
from .partition import BitfxPartitioner, partition

__all__ = ["BitfxPartitioner", "Decision", "SavedTensor", "analyze", "partition"]
