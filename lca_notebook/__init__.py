"""Loss Change Allocation (Lan et al., NeurIPS 2019) for PyTorch, with a Jupyter explorer.

>>> import lca_notebook as lca
>>> r = lca.LCAResult.example()
>>> r.total(by="layer").sizes["layer"]
2
"""

from .compute import analyze
from .record import record
from .result import LCAResult, open
from .trajectory import Trajectory

__all__ = ["analyze", "record", "open", "LCAResult", "Trajectory"]
__version__ = "0.1.0"
