"""Loss Change Allocation (Lan et al., NeurIPS 2019) for PyTorch, with a Jupyter explorer.

>>> import lca_notebook as lca
>>> r = lca.LCAResult.example()
>>> r.total(by="layer").sizes["layer"]
2
"""

from __future__ import annotations

import importlib

from .api import analyze
from .errors import (
    LCAError,
    RecordingError,
    ReducedResultError,
    StoreDamagedError,
    StoreInUseError,
    StoreWriteError,
)
from .record import record
from .result import LCAResult
from .storage.results import open as open  # lca.open; not in __all__, so `import *` keeps the builtin
from .trajectory import Trajectory

__all__ = [
    "LCAError",
    "LCAResult",
    "RecordingError",
    "ReducedResultError",
    "StoreDamagedError",
    "StoreInUseError",
    "StoreWriteError",
    "Trajectory",
    "analyze",
    "explore",
    "record",
]
__version__ = "0.1.0"

# Submodules reachable as attributes (lca.analyses.synchrony(result), lca.models.mlp() after %load_ext), imported
# on first use: models needs scikit-learn, and computing LCA never needs either.
_LAZY = ("analyses", "models", "distributed")


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])


def explore(result, **options):
    """The interactive explorer of a result: ``lca.explore(result)`` (an ipywidgets panel; end a cell with it).

    ``result``: an :class:`LCAResult`, or a result store's path. Options: ``granularity`` ("parameter", "unit",
    "tensor" or "layer"), ``layer`` (one layer's name; None: all), ``sign`` ("both", "helped", "hurt"),
    ``smoothing``, ``log_count``; ``follow=True`` re-reads a store that is still being filled every ``interval``
    seconds (see :class:`lca_notebook.widgets.Explorer` for the rest).
    Widgets are imported here, on first use, so computing LCA never needs the notebook stack.

    >>> import lca_notebook as lca
    >>> panel = lca.explore(lca.LCAResult.example(), granularity="layer", sign="helped")
    >>> panel.granularity.value, panel.sign.value
    ('layer', 'helped')
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
