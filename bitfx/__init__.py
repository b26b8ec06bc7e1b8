"""bitfx: lossless bitmap compression of sparse saved activations, as a
``torch.compile`` backend (``backend="bittrain"``)."""

from .ops import Packed, compress, decompress

__all__ = ["Packed", "compress", "decompress"]
__version__ = "0.1.0"

from .backend import backend, replan  # noqa: E402

__all__ += ["backend", "replan"]

from .planner import MemoryPlan, plan  # noqa: E402

__all__ += ["MemoryPlan", "plan"]

from .runtime_stats import stats, stats_table  # noqa: E402

__all__ += ["stats", "stats_table"]

from .fit import Fit, fit  # noqa: E402

__all__ += ["Fit", "fit"]

from .options import PeakBudget  # noqa: E402

__all__ += ["PeakBudget"]
