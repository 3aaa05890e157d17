"""Stores on disk (zarr v3 directories), one module per kind; the layout is in ``FORMAT.md`` beside this file.

- :mod:`.files`: what both kinds share: root attributes, chunk files checked and fsynced, atomic creation.
- :mod:`.trajectories`: what ``record(..., path=...)`` writes and ``analyze`` reads back.
- :mod:`.results`: what ``analyze(..., store=...)`` writes, and :func:`~.results.open` for every saved result.

Nothing is imported here, so that ``lca_notebook.result`` can use :mod:`.files` while
:mod:`.results` builds on ``lca_notebook.result``.
"""
