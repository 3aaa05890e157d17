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

    >>> import torch, lca_notebook as lca
    >>> traj = lca.Trajectory.from_list([{"w": torch.zeros(2)}, {"w": torch.ones(2)}])
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
        """Snapshots held in a list (``state_dict`` copies), with the training step of each when known."""
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


_COPY_HINT = (
    "If the snapshots were appended while training as model.state_dict() (or dict(model.named_parameters())) "
    "without copying, each is a view of the live tensors and they all hold the values of the end: append "
    "{k: v.detach().clone() for k, v in model.state_dict().items()} instead, or record with "
    "lca.record(model, optimizer)"
)


def _floating(snap) -> dict:
    return {
        k: v
        for k, v in snap.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() and not v.is_meta
    }


def _shares_storage(x, y) -> bool:
    """Whether every floating tensor of snapshot ``x`` is the very memory of ``y``'s. Copies differ at their first
    moving tensor, so a run of copies costs about one comparison per snapshot."""
    if not (isinstance(x, Mapping) and isinstance(y, Mapping)):
        return False
    seen = False
    for k, v in x.items():
        if not (isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() and not v.is_meta):
            continue
        w = y.get(k)
        if not (isinstance(w, torch.Tensor) and w.data_ptr() == v.data_ptr() and w.device == v.device):
            return False
        seen = True
    return seen


def _spans(ks: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1..3, 7"``."""
    runs: list[list[int]] = []
    for k in ks:
        if runs and k == runs[-1][1] + 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    return ", ".join(f"{a}" if a == b else f"{a}..{b}" for a, b in runs)


def stillness(traj: Trajectory, first: Mapping, last: Mapping) -> str | None:
    """Why the result would be all zeros, or None: consecutive in-memory snapshots that share their tensors'
    storage (views of the live parameters), or a first and last snapshot with the same values everywhere.

    >>> w = torch.zeros(2)
    >>> stillness(SnapshotList([{"w": w}, {"w": w}]), {"w": w}, {"w": w}).split(":")[0]
    'every snapshot holds the very same tensors (the same memory)'
    """
    if isinstance(traj, SnapshotList) and len(traj) > 1:
        snaps = traj._snapshots
        shared = [k for k in range(len(snaps) - 1) if _shares_storage(snaps[k], snaps[k + 1])]
        if len(shared) == len(snaps) - 1:
            return (
                "every snapshot holds the very same tensors (the same memory): no tensor moves between them, so every "
                f"LCA is 0. {_COPY_HINT}"
            )
        if shared:
            return (
                f"snapshots {_spans(shared)} hold the very same tensors (the same memory) as the next snapshot, so "
                f"those iterations ({_spans(shared)}) move nothing and their LCA is 0. {_COPY_HINT}"
            )
    a, b = _floating(first), _floating(last)
    common = [k for k in a if k in b and a[k].shape == b[k].shape]
    if common and all(torch.equal(a[k], b[k].to(a[k].device)) for k in common):
        return (
            f"the first and the last snapshot ({len(traj) - 1}) hold the same values in every tensor: nothing moved "
            f"over the whole run, so the LCA sums to 0. {_COPY_HINT}"
        )
    return None


def unmoved(loss, residual) -> str | None:
    """After a run: the iterations that changed nothing (the loss bit-identical at both ends and the LCA summing
    to exactly 0, which a move of any tensor almost surely does not give), or None. Read from the per-checkpoint
    loss and per-iteration residual only, so it costs nothing next to the run.

    >>> unmoved([1.0, 0.5, 0.5, 0.5, 0.2], [1e-9, 0.0, 0.0, 2e-9]).split(":")[0]
    'iterations 1..2 (2 of 4) changed nothing'
    """
    loss, residual = list(loss), list(residual)
    still = [t for t, r in enumerate(residual) if r == 0.0 and loss[t] == loss[t + 1]]
    if not still:
        return None
    return (
        f"iterations {_spans(still)} ({len(still)} of {len(residual)}) changed nothing: the loss is bit-identical "
        "before and after and their LCA is exactly 0, so those snapshots hold the same values as the next one "
        "(saved twice, or the same tensors; or a step that moved nothing, as one with learning rate 0 at the start "
        f"of a warmup does, which is harmless). {_COPY_HINT}"
    )
