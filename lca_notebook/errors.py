"""The exceptions users catch. Every error the package raises on purpose names what was wrong and where;
these are the ones that also mean "your data is safe, here is how to continue".

>>> from lca_notebook import LCAError, StoreDamagedError, StoreWriteError
>>> issubclass(StoreWriteError, LCAError) and issubclass(StoreWriteError, OSError)
True
>>> issubclass(StoreDamagedError, ValueError)  # caught as before by ``except ValueError``
True
"""

from __future__ import annotations


class LCAError(Exception):
    """Base of the exceptions lca_notebook defines: ``except lca.LCAError`` catches each of them."""


class StoreWriteError(LCAError, OSError):
    """Writing to a store failed (disk full, read-only, a file where a directory should be); what was written
    before is kept, and the message says how to continue."""


class RecordingError(LCAError, RuntimeError):
    """Recording a trajectory failed; raised in the training thread. The snapshots saved so far are kept."""


class StoreDamagedError(LCAError, ValueError):
    """A store's files changed after they were written (a chunk fails its checksum or has the wrong size, an
    attribute is not what was written); the message names the store, array, chunk and file, and how to repair."""


class StoreInUseError(LCAError, RuntimeError):
    """Another writer (in this or another process) holds the path; nothing was written, nothing was lost."""


class ReducedResultError(LCAError, ValueError):
    """A method needs each parameter's LCA at each iteration, which a reduced result (``keep=``) does not have;
    the message names the method and ``keep=``."""
