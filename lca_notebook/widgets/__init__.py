"""The notebook front end: the interactive LCA explorer (ipywidgets + bqplot).

Imported only when a panel is asked for, so computing LCA never needs a browser stack.

>>> import lca_notebook as lca
>>> from lca_notebook.widgets import Explorer
>>> isinstance(lca.explore(lca.LCAResult.example()), Explorer)
True
"""

from .explorer import Explorer, explore

__all__ = ["Explorer", "explore"]
