"""The recorder's store: T+1 snapshots of a model's tensors, written as training runs, read one at a time.

One array per tensor dtype, each row one snapshot with all tensors of that dtype flattened end to end
(one file per snapshot and dtype), a ``steps`` array, and the layout (names, shapes, offsets) in the
root attributes (see ``FORMAT.md``).
"""

from __future__ import annotations

import math
import os
import shutil

import numpy as np
import torch
import zarr

from ..trajectory import Trajectory
from .files import (
    FORMAT,
    KIND,
    check_rows,
    create_atomically,
    open_array,
    read_attrs,
    refuse_foreign,
    sync_rows,
    update_attrs,
)


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
    """Appends packed snapshots to a new trajectory store (the recorder's writer thread calls it)."""

    def __init__(self, path, layout, *, overwrite=False, subset=False):
        self.path = os.path.abspath(os.fspath(path))
        self.layout = layout
        attrs = refuse_foreign(self.path, "trajectory")
        if attrs is not None:
            if not overwrite:
                raise ValueError(
                    f"{self.path!r} already holds a recorded trajectory; pass overwrite=True to replace it, or another "
                    "path"
                )
            shutil.rmtree(self.path)
        self.widths = _widths(layout)
        self.capacity = 64

        def create(tmp):
            root = zarr.open_group(tmp, mode="w-", zarr_format=3)
            for key, width in self.widths.items():
                chunk = max(1, min(width, 1 << 22))
                root.create_array(
                    f"snapshots_{key}",
                    shape=(self.capacity, width),
                    chunks=(1, chunk),
                    dtype=_storage(getattr(torch, key))[1],
                    compressors=None,
                    fill_value=0,
                )
            root.create_array(
                "steps", shape=(self.capacity,), chunks=(1024,), dtype=np.int64, compressors=None, fill_value=-1
            )
            update_attrs(
                tmp, **{KIND: "trajectory", "format": FORMAT, "tensors": layout, "n_snapshots": 0, "subset": subset}
            )

        create_atomically(self.path, create)
        self.arrays = {key: open_array(self.path, f"snapshots_{key}") for key in self.widths}
        self.steps = open_array(self.path, "steps")
        self.n = 0

    def append(self, step: int, packed: dict):
        if self.n == self.capacity:  # grow by doubling: metadata rewritten rarely
            self.capacity *= 2
            for key, arr in self.arrays.items():
                arr.resize((self.capacity, self.widths[key]))
            self.steps.resize((self.capacity,))
        for key, arr in self.arrays.items():
            arr[self.n] = packed[key]
        self.steps[self.n] = step
        self.n += 1
        update_attrs(self.path, durable=False, n_snapshots=self.n)  # survives a kill; close() fsyncs

    def close(self):
        for key in self.widths:
            sync_rows(self.path, f"snapshots_{key}", 0, self.n)
        sync_rows(self.path, "steps", 0, self.n)
        update_attrs(self.path, n_snapshots=self.n)


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

    def __init__(self, path):
        self.path = os.path.abspath(os.fspath(path))
        attrs = read_attrs(self.path)
        if attrs.get(KIND) != "trajectory":
            raise ValueError(
                f"{self.path!r} is not a recorded trajectory (its {KIND!r} attribute is {attrs.get(KIND)!r})"
            )
        self.layout = attrs["tensors"]
        self.n = int(attrs["n_snapshots"])
        self.subset = bool(attrs.get("subset", False))
        keys = list(_widths(self.layout))
        for key in keys:
            check_rows(self.path, f"snapshots_{key}", self.n, "snapshot")
        check_rows(self.path, "steps", self.n, "snapshot")
        try:
            self.arrays = {key: zarr.open_array(self.path, path=f"snapshots_{key}", mode="r") for key in keys}
            self.steps = np.asarray(zarr.open_array(self.path, path="steps", mode="r")[: self.n]).tolist()
        except Exception as exc:
            raise ValueError(f"the store {self.path!r} is damaged ({type(exc).__name__}: {exc})") from exc

    def __len__(self):
        return self.n

    def describe(self, k):
        return f"recorded snapshot {k} (step {self.steps[k] if self.steps else '?'}) in {self.path}"

    def load(self, k):
        rows = {}
        for key, arr in self.arrays.items():
            try:
                row = torch.from_numpy(np.asarray(arr[k]))
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
