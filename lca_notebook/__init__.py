"""Loss Change Allocation (Lan et al., NeurIPS 2019) for PyTorch, with a Jupyter explorer.

>>> import lca_notebook as lca
>>> r = lca.LCAResult.example()
>>> r.total(by="layer").sizes["layer"]
2
"""

from . import analyses, models  # noqa: F401 - lca.analyses.synchrony(result), lca.models.mlp() after %load_ext
from .compute import analyze
from .record import record
from .result import LCAResult, open
from .trajectory import Trajectory


def explore(result, **options):
    """The interactive explorer of a result: ``lca.explore(result)`` (an ipywidgets panel).

    Widgets are imported here, on first use, so computing LCA never needs the notebook stack.
    """
    from .widgets import explore as _explore

    return _explore(result, **options)


def load_ipython_extension(ipython):
    """``%load_ext lca_notebook``: ``lca`` in the namespace, ``%%lca_record``, results shown as the explorer."""
    from .magics import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython):
    from .magics import unload_ipython_extension as _unload

    _unload(ipython)


__all__ = ["analyze", "record", "open", "explore", "LCAResult", "Trajectory"]
__version__ = "0.1.0"
