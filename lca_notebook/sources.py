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
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

from .checkpoints import SUFFIXES, CheckpointFiles, check_given_order, weight_files
from .errors import RecordingError
from .storage.files import KIND, local_path, read_attrs
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
    """A trajectory from a path: a recorder store, a directory of checkpoint files, or a Hugging Face ``Trainer``'s
    output directory (its ``checkpoint-<step>`` folders).

    >>> import torch, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> for s in (0, 1, 2):
    ...     torch.save({"w": torch.full((2,), float(s))}, os.path.join(d, f"ckpt-{s}.pt"))
    >>> len(open_path(d))
    3
    """
    path = local_path(path)
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
        # Other copies (best.pt, model_final.pth) have no number either: sorted by name they would land anywhere
        unnumbered = [f for f in files if not re.search(r"\d", os.path.splitext(os.path.basename(f))[0])]
        if unnumbered and len(unnumbered) < len(files):
            files = [f for f in files if f not in unnumbered]
            names = ", ".join(sorted(os.path.basename(f) for f in unnumbered))
            warnings.warn(
                f"{path!r}: left out {names}, beside checkpoints numbered by step: a file without a number has no "
                "place in training order (a copy such as best.pt). To read it, pass the files as a list in "
                "training order.",
                stacklevel=3,
            )
        if not files:  # a Hugging Face Trainer's output: a checkpoint-<step> folder a snapshot
            files = [f for f in (os.path.join(path, n) for n in os.listdir(path)) if weight_files(f)]
        if not files:
            listing = ", ".join(sorted(os.listdir(path))[:10]) or "nothing"
            raise ValueError(
                f"the directory {path!r} holds no checkpoint files ({'/'.join(SUFFIXES)}) and no Hugging Face "
                f"checkpoint folders (with model*.safetensors or pytorch_model*.bin); it has: {listing}"
            )
        return CheckpointFiles(files)
    return CheckpointFiles([path])


#: Seconds between two looks at a growing recorder store (``analyze(..., follow=True)``, ``poll=``).
POLL_SECONDS = 0.1


class Follower:
    """A recorder store that may still be growing (its recorder in this process or another one): waits for
    its snapshots, and tells a finished recording (the recorder closed the store) from a dead one (no
    ``closed`` mark and nobody holds the writer lock: the kernel drops it when the recorder dies).

    Only snapshots the store's ``n_snapshots`` counts are read: their files are complete (FORMAT.md).
    ``poll``: seconds between looks; ``timeout``: seconds to wait for the next snapshot (None: no limit).

    >>> import torch, tempfile, os, lca_notebook as lca
    >>> m = torch.nn.Linear(2, 1); opt = torch.optim.SGD(m.parameters(), lr=0.1)
    >>> path = os.path.join(tempfile.mkdtemp(), "run.zarr")
    >>> with lca.record(m, opt, path=path):
    ...     opt.zero_grad(); m(torch.ones(4, 2)).sum().backward(); opt.step()
    >>> f = Follower(path); traj = f.open()
    >>> f.wait(1), f.wait(2)
    (True, False)
    """

    def __init__(self, path, *, poll: float = POLL_SECONDS, timeout: float | None = None):
        if not (isinstance(poll, (int, float)) and poll > 0):
            raise ValueError(f"poll must be a number of seconds > 0, got {poll!r}")
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout >= 0):
            raise ValueError(f"timeout must be a number of seconds >= 0 or None, got {timeout!r}")
        self.path = local_path(path)
        self.poll, self.timeout = float(poll), timeout
        self.traj: RecordedTrajectory | None = None
        #: Called (no arguments) at each look while the follower waits: a sink shows what it has so far.
        self.on_wait: Callable[[], object] | None = None

    def open(self, upto: int | None = None) -> RecordedTrajectory:
        """The trajectory as recorded so far, once the store exists and holds two snapshots (or is finished);
        ``upto``: at most that many snapshots (a result store computed from fewer is continued, then grown)."""
        deadline = self._deadline()
        while True:
            if os.path.exists(os.path.join(self.path, "zarr.json")):
                if read_attrs(self.path).get(KIND) != "trajectory":
                    raise ValueError(
                        f"follow=True follows a recorder store (lca.record(..., path=...)); {self.path!r} is not one"
                    )
                self.traj = RecordedTrajectory(self.path, upto=upto)
                if len(self.traj) < 2 and upto is None:
                    self.wait(1)  # False: finished with fewer than two snapshots, and analyze says so
                return self.traj
            self._sleep(deadline, "the recorder to create the store")

    def wait(self, k: int) -> bool:
        """Block until snapshot ``k`` is readable (True), or the recording ended before it (False). A recorder
        that died first raises :class:`~lca_notebook.RecordingError` naming the last complete snapshot."""
        assert self.traj is not None, "open() first"
        traj = self.traj
        if k < len(traj):
            return True
        deadline = self._deadline()
        while True:
            if traj.refresh() > k:
                return True
            if traj.closed:
                return False
            if traj.writer_alive() is False:  # `closed` is written before the lock goes: look once more
                if traj.refresh() > k:
                    return True
                if traj.closed:
                    return False
                n = len(traj)
                last = f"snapshot {n - 1} (step {list(traj.steps or [n - 1])[-1]})" if n else "none"
                raise RecordingError(
                    f"the recorder writing {self.path!r} stopped without closing it (its process ended or was "
                    f"killed): no more snapshots will come. The last complete one is {last}. Everything computed "
                    "so far is kept; run the same lca.analyze(...) again without follow=True to finish the LCA up "
                    "to that snapshot, or record the training again."
                )
            if self.on_wait is not None:
                self.on_wait()
            self._sleep(deadline, f"snapshot {k}")

    def _deadline(self) -> float | None:
        return None if self.timeout is None else time.monotonic() + self.timeout

    def _sleep(self, deadline: float | None, what: str):
        if deadline is not None and time.monotonic() >= deadline:
            n = len(self.traj) if self.traj is not None else 0
            raise TimeoutError(
                f"waited {self.timeout:g} s for {what} in {self.path!r} (it holds {n} snapshot(s)); is the recorder "
                "still training? Everything computed so far is kept: run the same call again to continue, or raise "
                "timeout= (None: wait as long as it takes)"
            )
        time.sleep(self.poll)
