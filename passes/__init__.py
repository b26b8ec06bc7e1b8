"""FX graph passes of bitfx, installed as ``bitfx.passes``.

* :mod:`.analysis` classifies the tensors a forward graph saves for backward.
* :mod:`.rewrite` inserts the compress / decompress nodes.
* :mod:`.partition` wraps PyTorch's partitioner and runs both.
"""

from .analysis import SavedTensor, analyze
from .partition import BitfxPartitioner, partition
from .pricing import Codec

__all__ = ["BitfxPartitioner", "Codec", "SavedTensor", "analyze", "partition"]
