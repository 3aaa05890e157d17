"""Where parameter snapshots come from.

A trajectory is a sequence of T+1 snapshots theta_0 .. theta_T, each a dict ``name -> tensor``
(a ``state_dict`` or only the parameters); T+1 snapshots give T iterations. ``analyze`` reads
snapshot k only when it needs it, so a trajectory on disk is never loaded whole. A leaf: the sources
that read files build on it (:mod:`lca_notebook.sources` turns anything a user passes into one).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch


class Trajectory(Sequence):
    """Base of every snapshot source: ``len(traj)`` snapshots, ``traj[k]`` a dict name -> tensor.

    >>> import torch
    >>> traj = Trajectory.from_list([{"w": torch.zeros(2)}, {"w": torch.ones(2)}])
    >>> len(traj), traj[1]["w"].tolist()
    (2, [1.0, 1.0])
    """

    #: Training step of each snapshot when known (e.g. a recorder with ``every=10``), else None.
    steps: Sequence[int] | None = None
    #: True when the snapshots hold some of the model's tensors by design (``record(..., parameters=...)``):
    #: the others stayed fixed and are taken from the model.
    subset: bool = False

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, k: int) -> Mapping[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self, k: int) -> str:
        """How error messages name snapshot k (subclasses add a file name)."""
        return f"snapshot {k}"

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        n = len(self)
        if k < 0:
            k += n
        if not 0 <= k < n:
            raise IndexError(f"snapshot {k} is out of range: this trajectory has {n} snapshots")
        snap = self.load(k)
        if not isinstance(snap, Mapping):
            raise TypeError(f"{self.describe(k)} is a {type(snap).__name__}, not a dict of tensors (name -> tensor)")
        return snap

    @staticmethod
    def from_list(snapshots: Sequence[Mapping[str, torch.Tensor]], steps: Sequence[int] | None = None) -> Trajectory:
        return SnapshotList(snapshots, steps)

    @staticmethod
    def from_callable(load: Callable[[int], Mapping[str, torch.Tensor]], length: int, steps=None) -> Trajectory:
        """Snapshots made on demand: ``load(k)`` returns snapshot k, for k in ``range(length)``."""
        return CallableTrajectory(load, length, steps)


class SnapshotList(Trajectory):
    def __init__(self, snapshots, steps=None):
        self._snapshots = list(snapshots)
        self.steps = list(steps) if steps is not None else None

    def __len__(self):
        return len(self._snapshots)

    def load(self, k):
        return self._snapshots[k]


class CallableTrajectory(Trajectory):
    def __init__(self, load, length, steps=None):
        self._load, self._length = load, int(length)
        self.steps = list(steps) if steps is not None else None

    def __len__(self):
        return self._length

    def load(self, k):
        return self._load(k)
