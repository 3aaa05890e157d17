"""The one place that turns what a user passes as ``trajectory`` into a :class:`~lca_notebook.Trajectory`.

A list of state_dicts, a :class:`~lca_notebook.Trajectory`, anything with ``as_trajectory()`` (a
recorder, a Lightning callback), a recorder store's path, a directory or list of checkpoint files.

>>> import torch
>>> traj = as_trajectory([{"w": torch.zeros(2)}, {"w": torch.ones(2)}])
>>> type(traj).__name__, len(traj)
('SnapshotList', 2)
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

from .checkpoints import SUFFIXES, CheckpointFiles, check_given_order
from .storage.files import KIND, read_attrs
from .storage.trajectories import RecordedTrajectory
from .trajectory import SnapshotList, Trajectory


def as_trajectory(obj) -> Trajectory:
    """Turn what a user passes as ``trajectory`` into a :class:`Trajectory`."""
    if isinstance(obj, Trajectory):
        return obj
    as_traj = getattr(obj, "as_trajectory", None)  # a recorder, a store
    if callable(as_traj):
        return as_traj()
    if isinstance(obj, (str, bytes)) or hasattr(obj, "__fspath__"):
        return open_path(obj)
    if isinstance(obj, Sequence) and not isinstance(obj, Mapping):
        if len(obj) and all(isinstance(x, (str, bytes)) or hasattr(x, "__fspath__") for x in obj):
            check_given_order(obj)
            return CheckpointFiles(obj, sort=False)  # a list is an order: the user's (a directory is sorted)
        return SnapshotList(obj)
    raise TypeError(
        f"trajectory is a {type(obj).__name__}; give a list of state_dicts, a Trajectory, a recorder "
        "(lca.record), a directory or list of checkpoint files, or a recorder store path"
    )


def open_path(path) -> Trajectory:
    """A trajectory from a path: a recorder store, or a directory of checkpoint files.

    >>> import torch, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> for s in (0, 1, 2):
    ...     torch.save({"w": torch.full((2,), float(s))}, os.path.join(d, f"ckpt-{s}.pt"))
    >>> len(open_path(d))
    3
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no trajectory at {path!r}: give a directory of checkpoint files or a recorder store")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "zarr.json")):
            kind = read_attrs(path).get(KIND)
            if kind == "result":
                raise ValueError(f"{path!r} is an LCA result store, not a trajectory: lca.open(path) opens it")
            return RecordedTrajectory(path)
        files = [
            os.path.join(path, f)
            for f in os.listdir(path)
            if f.endswith(SUFFIXES) and os.path.isfile(os.path.join(path, f))
        ]
        # Lightning's last.ckpt copies the newest checkpoint: read beside it, it would add an iteration of length 0.
        copies = [f for f in files if re.fullmatch(r"last(-v\d+)?\.ckpt", os.path.basename(f))]
        if copies and len(copies) < len(files):
            files = [f for f in files if f not in copies]
        if not files:
            listing = ", ".join(sorted(os.listdir(path))[:10]) or "nothing"
            raise ValueError(
                f"the directory {path!r} holds no checkpoint files ({'/'.join(SUFFIXES)}); it has: {listing}"
            )
        return CheckpointFiles(files)
    return CheckpointFiles([path])
