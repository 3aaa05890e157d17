"""The recorder's store: T+1 snapshots of a model's tensors, written as training runs, read one at a time.

One array per tensor dtype, each row one snapshot with all tensors of that dtype flattened end to end
(one file per snapshot and dtype), a ``steps`` array, and the layout (names, shapes, offsets) in the
root attributes (see ``FORMAT.md``).
"""

from __future__ import annotations

import errno
import math
import os

import numpy as np
import torch
import zarr

from ..errors import StoreDamagedError
from ..trajectory import Trajectory
from .files import (
    FORMAT,
    KIND,
    PathLock,
    check_format,
    check_rows,
    checksummed,
    create_atomically,
    damaged_attribute,
    int_attr,
    local_path,
    lock,
    open_array,
    read_attrs,
    refuse_foreign,
    replace_atomically,
    sync_rows,
    update_attrs,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_REPAIR = "restore the store from a backup, or record the training again."


def lock_held(path: str) -> bool | None:
    """Whether someone holds the writer lock of ``path`` (``files.lock``); None where ``flock`` is missing.
    Probed with a shared lock taken and dropped at once (an exclusive holder refuses it)."""
    if fcntl is None:  # pragma: no cover - Windows
        return None
    lock_file = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.lock")
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except FileNotFoundError:
        return False  # a clean release removes the file
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        raise
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _storage(dtype: torch.dtype):
    """(array key, numpy dtype) a tensor dtype is stored as; dtypes numpy lacks are kept bit for bit."""
    key = str(dtype).removeprefix("torch.")
    try:
        return key, torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:  # bfloat16, float8: store the raw bits
        return key, np.dtype(
            {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}[torch.empty(0, dtype=dtype).element_size()]
        )


def pack(snapshot: dict, layout: list) -> dict:
    """Concatenate a snapshot's tensors into one flat CPU numpy array per dtype (a copy: safe to queue)."""
    out = {}
    for key, names in _by_key(layout).items():
        parts = [snapshot[n].detach().reshape(-1) for n in names]
        flat = parts[0].to("cpu", copy=True) if len(parts) == 1 else torch.cat(parts).to("cpu")
        try:
            out[key] = flat.numpy()
        except TypeError:  # bfloat16 and friends: their raw bits
            out[key] = flat.view(_torch_of(_storage(flat.dtype)[1])).numpy()
    return out


def _torch_of(np_dtype):
    return torch.from_numpy(np.zeros(0, np_dtype)).dtype


def _by_key(layout):
    groups: dict[str, list[str]] = {}
    for entry in layout:
        groups.setdefault(entry["key"], []).append(entry["name"])
    return groups


def make_layout(snapshot: dict) -> list:
    """Names, shapes, dtypes and offsets of a snapshot's tensors in their flat per-dtype rows."""
    layout: list[dict] = []
    offsets: dict[str, int] = {}
    for name, t in snapshot.items():
        key, _ = _storage(t.dtype)
        n = t.numel()
        layout.append({"name": name, "shape": list(t.shape), "dtype": key, "key": key, "offset": offsets.get(key, 0)})
        offsets[key] = offsets.get(key, 0) + n
    return layout


def _widths(layout) -> dict:
    w: dict[str, int] = {}
    for e in layout:
        w[e["key"]] = max(w.get(e["key"], 0), e["offset"] + math.prod(e["shape"]))
    return w


class TrajectoryWriter:
    """Appends packed snapshots to a new trajectory store (the recorder's writer thread calls it).

    It holds the path's lock (:func:`~.files.lock`) from creation to :meth:`close`: a second recorder on
    the same path is refused, even with ``overwrite=True``, instead of deleting the first one's work."""

    def __init__(self, path, layout, *, overwrite=False, subset=False):
        self.path = local_path(path)
        self.layout, self.subset = layout, subset
        self.n = 0
        self.lock: PathLock | None = lock(self.path, "record(path=...)")
        try:
            attrs = refuse_foreign(self.path, "trajectory")
            if attrs is not None and not overwrite:
                raise ValueError(
                    f"{self.path!r} already holds a recorded trajectory; pass overwrite=True to replace it, or another "
                    "path"
                )
            self.widths = _widths(layout)
            self.capacity = 64
            # A replaced recording stays whole until the new store is complete beside it, then they swap.
            (replace_atomically if attrs is not None else create_atomically)(self.path, self._create)
            self.arrays = {
                key: open_array(self.path, f"snapshots_{key}", what="snapshot", repair=_REPAIR) for key in self.widths
            }
            self.steps = open_array(self.path, "steps", what="snapshot", repair=_REPAIR)
        except BaseException:
            self.release()
            raise

    def _create(self, tmp):
        root = zarr.open_group(tmp, mode="w-", zarr_format=3)
        for key, width in self.widths.items():
            chunk = max(1, min(width, 1 << 22))
            root.create_array(
                f"snapshots_{key}",
                shape=(self.capacity, width),
                chunks=(1, chunk),
                dtype=_storage(getattr(torch, key))[1],
                compressors=checksummed(),
                fill_value=0,
            )
        root.create_array(
            "steps", shape=(self.capacity,), chunks=(1024,), dtype=np.int64, compressors=checksummed(), fill_value=-1
        )
        update_attrs(
            tmp,
            **{
                KIND: "trajectory", "format": FORMAT, "tensors": self.layout, "n_snapshots": 0, "subset": self.subset,
                "closed": False,
            },
        )  # fmt: skip

    def append(self, step: int, packed: dict):
        if self.n == self.capacity:  # grow by doubling: metadata rewritten rarely
            self.capacity *= 2
            for key, arr in self.arrays.items():
                arr.resize((self.capacity, self.widths[key]))
            self.steps.resize((self.capacity,))
        for key, arr in self.arrays.items():
            arr[self.n] = packed[key]
        self.steps[self.n] = step
        update_attrs(self.path, durable=False, n_snapshots=self.n + 1)  # survives a kill; close() fsyncs
        self.n += 1  # counted only once on disk

    def close(self):
        try:
            for key in self.widths:
                sync_rows(self.path, f"snapshots_{key}", 0, self.n)
            sync_rows(self.path, "steps", 0, self.n)
            # `closed` before the lock goes: a follower that finds the lock free and no `closed` knows the writer died.
            update_attrs(self.path, n_snapshots=self.n, closed=True)
        finally:
            self.release()

    def release(self):
        """Let other writers at the path (after close, or when creating the store failed)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def saved(self) -> str:
        """What the store at the path holds now, read from disk (for errors: never a count it no longer has)."""
        try:
            attrs = read_attrs(self.path)
            n = attrs.get("n_snapshots") if attrs.get(KIND) == "trajectory" else None
        except (OSError, ValueError):
            n = None
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            return (
                f"the store {self.path!r} is gone or unreadable (removed or replaced by someone else?), so none of "
                "this recording is kept there"
            )
        if n == 0:
            return f"no snapshot was saved in {self.path!r}"
        return f"Snapshots 0..{n - 1} are saved there" if n > 1 else "Snapshot 0 is saved there"


class RecordedTrajectory(Trajectory):
    """Snapshots in a recorder store, read one at a time.

    >>> import torch, tempfile, os, lca_notebook as lca
    >>> m = torch.nn.Linear(2, 1); opt = torch.optim.SGD(m.parameters(), lr=0.1)
    >>> path = os.path.join(tempfile.mkdtemp(), "run.zarr")
    >>> with lca.record(m, opt, path=path) as rec:
    ...     for _ in range(3):
    ...         opt.zero_grad(); m(torch.ones(4, 2)).sum().backward(); opt.step()
    >>> traj = RecordedTrajectory(path)
    >>> len(traj), traj.steps
    (4, [0, 1, 2, 3])
    """

    def __init__(self, path, *, upto: int | None = None):
        self.path = local_path(path)
        attrs = read_attrs(self.path)
        self.closed = attrs.get("closed", True) is True
        if attrs.get(KIND) != "trajectory":
            raise ValueError(
                f"{self.path!r} is not a recorded trajectory (its {KIND!r} attribute is {attrs.get(KIND)!r})"
            )
        check_format(self.path, attrs)
        self.layout: list = attrs.get("tensors")  # type: ignore[assignment]  # checked just below
        try:
            keys = list(_widths(self.layout))
            for e in self.layout:
                e["name"], e["key"], e["offset"]
        except (TypeError, KeyError, AttributeError):
            raise damaged_attribute(
                self.path, "tensors", self.layout, "a list of {name, shape, dtype, key, offset}"
            ) from None
        self.subset = bool(attrs.get("subset", False))
        try:
            self.arrays = {
                key: open_array(self.path, f"snapshots_{key}", "r", "snapshot", _REPAIR) for key in keys
            }  # fmt: skip
            steps = open_array(self.path, "steps", "r", "snapshot", _REPAIR)
        except StoreDamagedError:
            raise
        except Exception as exc:
            raise StoreDamagedError(f"the store {self.path!r} is damaged ({type(exc).__name__}: {exc})") from exc
        self._steps_array = steps
        self.n, self.steps = 0, []
        self._grow(attrs, upto)

    def _grow(self, attrs: dict, upto: int | None):
        capacity = min([self._steps_array.shape[0], *(a.shape[0] for a in self.arrays.values())])
        n = int_attr(self.path, attrs, "n_snapshots", high=capacity)
        n = min(n, upto) if upto is not None else n
        if n <= self.n:
            return
        for key in self.arrays:
            check_rows(self.path, f"snapshots_{key}", n, "snapshot")
        check_rows(self.path, "steps", n, "snapshot")
        self.steps = self.steps + np.asarray(self._steps_array[self.n : n]).tolist()
        self.n = n

    #: Whether the recorder marked the store finished (``close``); stores recorded before this attribute
    #: existed (None) were finished too: nothing else wrote them.
    closed: bool = True

    def refresh(self, upto: int | None = None) -> int:
        """Take in the snapshots the recorder has written since (those its ``n_snapshots`` counts: their files
        are complete), at most ``upto``; the number of snapshots now. A half-written snapshot is never read.

        >>> import torch, tempfile, os, lca_notebook as lca
        >>> m = torch.nn.Linear(2, 1); opt = torch.optim.SGD(m.parameters(), lr=0.1)
        >>> path = os.path.join(tempfile.mkdtemp(), "run.zarr")
        >>> rec = lca.record(m, opt, path=path).start()
        >>> opt.zero_grad(); m(torch.ones(4, 2)).sum().backward(); opt.step(); rec.flush()
        >>> traj = RecordedTrajectory(path); len(traj), traj.closed
        (2, False)
        >>> opt.step(); rec.close()
        >>> traj.refresh(), traj.closed
        (3, True)
        """
        attrs = read_attrs(self.path)
        self.closed = attrs.get("closed", True) is True
        capacity = min([self._steps_array.shape[0], *(a.shape[0] for a in self.arrays.values())])
        if int_attr(self.path, attrs, "n_snapshots") > capacity:  # the recorder doubled its arrays: open them anew
            self.arrays = {
                key: open_array(self.path, f"snapshots_{key}", "r", "snapshot", _REPAIR) for key in self.arrays
            }
            self._steps_array = open_array(self.path, "steps", "r", "snapshot", _REPAIR)
        self._grow(attrs, upto)
        return self.n

    def writer_alive(self) -> bool | None:
        """Whether a recorder (in this process or another) still holds the store's writer lock; None where
        locks are not available (Windows). The kernel drops the lock when its holder dies, even by SIGKILL."""
        return lock_held(self.path)

    def __len__(self):
        return self.n

    def describe(self, k):
        return f"recorded snapshot {k} (step {self.steps[k] if self.steps else '?'}) in {self.path}"

    def load(self, k):
        if not 0 <= k < self.n:  # past the end, the arrays' spare rows hold zeros, not a snapshot
            raise IndexError(f"snapshot {k} of a trajectory of {self.n} snapshots in {self.path}")
        rows = {}
        for key, arr in self.arrays.items():
            try:
                row = torch.from_numpy(np.asarray(arr[k]))
            except StoreDamagedError:
                raise
            except Exception as exc:
                raise ValueError(
                    f"{self.describe(k)} cannot be read ({type(exc).__name__}: {exc}); the store is damaged"
                ) from exc
            target = getattr(torch, key)
            rows[key] = row if row.dtype == target else row.view(target)
        return {
            e["name"]: rows[e["key"]][e["offset"] : e["offset"] + math.prod(e["shape"])].view(e["shape"])
            for e in self.layout
        }
