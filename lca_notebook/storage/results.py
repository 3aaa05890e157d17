"""The result store: what ``analyze(..., store=PATH)`` streams into (resumable), and opening saved results.

The variables of :class:`~lca_notebook.LCAResult` plus float64 prefix sums over iterations at every
coarse granularity (row k = the sum of iterations ``[0, k)``), so any iteration-range sum is one
subtraction of two rows; at parameter granularity only at chunk boundaries (``prefix_parameter``: row j =
the sum of iterations ``[0, j * ct)``), the rows after a boundary added from ``lca``. A reduced store
(``keep=`` coarser than parameter) has no ``lca``: per-iteration sums and counts, and per-parameter totals
kept in two slots written in turn. The on-disk layout is in ``FORMAT.md``.

>>> import lca_notebook as lca, tempfile, os
>>> p = lca.LCAResult.example().save(os.path.join(tempfile.mkdtemp(), "r.zarr"))
>>> open(p).lca.shape
(3, 6)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import uuid
import warnings

import google_crc32c
import numpy as np
import pandas as pd
import torch
import xarray as xr
from zarr.codecs import ZstdCodec

from ..data import tensors_in
from ..engine import IterationResult, Options
from ..layout import COARSE, GROUP_DIMS, Groups, PathSpec, check_keep, kept, parameter_coords
from ..result import LCAResult
from ..sinks import ITERATION_VARS, PrefixBlock, Rows, Totals, iteration_vars, lca_dtype  # noqa: F401 (ITERATION_VARS: tests read it here)
from ..trajectory import Trajectory
from .files import (
    KIND,
    RESULT_FORMAT,
    Arrays,
    CheckedArray,
    StoreWriteError,
    check_format,
    check_rows,
    checksummed,
    chunk_rows,
    coded_names,
    create_atomically,
    damaged_attribute,
    damaged_chunk,
    decoded_names,
    int_attr,
    local_path,
    lock,
    number_attr,
    read_attrs,
    reading,
    refuse_foreign,
    update_attrs,
)

#: Iterations per chunk of a result store (None: chosen from the number of parameters). Tests set it low.
CHUNK_ITERATIONS: int | None = None
#: Prefix sums per checkpoint (coarse granularities; ``prefix_parameter`` has a row per chunk boundary only).
PREFIX_VARS = {by: f"prefix_{by}" for by in COARSE}
CHECKPOINT_VARS = ("loss", *PREFIX_VARS.values())
#: Per-parameter totals of a reduced store: (slot, parameter), the slot in ``parameter_slot`` holds them.
TOTAL_VARS = ("parameter_total", "parameter_helped")
#: A hash of each snapshot the rows were computed from (0: not known), compared when a store is resumed.
HASH_VAR = "snapshot_hash"

_INPUT_NAMES = {
    "parameters": "the selected parameters (names and shapes)",
    "path_tensors": "the model's tensors (names and shapes)",
    "data_fingerprint": "the data (its contents)",
    "trajectory_fingerprint": "the trajectory (its first or last snapshot, or its steps)",
    "n_snapshots": "the number of snapshots",
    "loss_fn": "the loss function",
    "n_samples": "the number of samples",
}


def _tensor_hash(h, snapshot, names):
    for name in names:
        t = snapshot.get(name)
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def trajectory_fingerprint(traj, spec: PathSpec) -> str:
    """A hash of the first and last snapshots (path tensors only) and of the steps."""
    h = hashlib.blake2b(digest_size=16)
    for k in (0, len(traj) - 1):
        snap = {spec.aliases.get(n, n): v for n, v in traj[k].items()}
        _tensor_hash(h, snap, spec.names)
    h.update(repr(list(traj.steps) if traj.steps is not None else None).encode())
    return h.hexdigest()


def snapshot_hash(snapshot, spec: PathSpec) -> int:
    """A cheap hash of one snapshot's path tensors (CRC32C of their names, dtypes, shapes and bytes), never 0.
    About 10 GB/s: a fraction of a millisecond for a 100k-parameter model."""
    snap = {spec.aliases.get(n, n): v for n, v in snapshot.items()}
    crc = 0
    for name in spec.names:
        t = snap.get(name)
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().contiguous()
            crc = google_crc32c.extend(crc, f"{name}{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                crc = google_crc32c.extend(crc, t.reshape(-1).view(torch.uint8).numpy())
    return (1 << 32) | int(crc)


class HashingTrajectory(Trajectory):
    """The trajectory as the engine reads it, keeping a :func:`snapshot_hash` of each snapshot read, for the
    store to record: a resumed run then compares every snapshot already computed, not only the first and last."""

    def __init__(self, traj, spec: PathSpec):
        self.traj, self.spec = traj, spec
        self.hashes: dict[int, int] = {}
        self.steps, self.subset = traj.steps, traj.subset

    def __len__(self):
        return len(self.traj)

    def describe(self, k):
        return self.traj.describe(k)

    def load(self, k):
        snap = self.traj[k]
        self.hashes[k] = snapshot_hash(snap, self.spec)
        return snap


def batch_attrs(batches) -> dict:
    """How the data was split (``batch_sizes``: ``[[size, count], ...]``) and a hash of its contents that does
    not depend on the split (``data_contents``), so a resume with another ``batch_size`` is named as that."""
    runs: list[list[int]] = []
    crcs: dict[int, int] = {}
    kinds: dict[int, set[str]] = {}  # per tensor of a batch: its dtype and shape past the batch dimension
    for b in batches:
        size = int(b.size)
        if runs and runs[-1][0] == size:
            runs[-1][1] += 1
        else:
            runs.append([size, 1])
        for i, t in enumerate(tensors_in((b.args, b.kwargs, b.target))):
            t = t.detach().cpu().contiguous()
            kinds.setdefault(i, set()).add(f"{t.dtype}{tuple(t.shape[1:])}")
            if t.numel():
                crcs[i] = google_crc32c.extend(crcs.get(i, 0), t.reshape(-1).view(torch.uint8).numpy())
    contents = [
        f"{google_crc32c.value(repr(sorted(kinds[i])).encode()):08x}{crcs.get(i, 0):08x}" for i in sorted(kinds)
    ]
    return {"batch_sizes": json.dumps(runs), "data_contents": "".join(contents)}


def _split(runs: str) -> str:
    try:
        return " + ".join(f"{count} x {size}" for size, count in json.loads(runs))
    except (TypeError, ValueError):
        return repr(runs)


def inputs(spec: PathSpec, traj, data_fingerprint: str, options: Options) -> dict:
    """What a result store remembers of its inputs; resuming with any of them different is refused."""
    return dict(
        options.attrs(),
        parameters=json.dumps([[n, list(s)] for n, s in spec.selected]),
        path_tensors=json.dumps([[n, list(s)] for n, s in zip(spec.names, spec.shapes, strict=True)]),
        data_fingerprint=data_fingerprint,
        n_snapshots=len(traj),
        trajectory_fingerprint=trajectory_fingerprint(traj, spec),
    )


def _chunking(n_params: int) -> tuple[int, int]:
    """(iterations per chunk, parameters per chunk): about 32 MB of float32 per lca chunk, at least 16
    iterations (the float64 prefix row at each chunk boundary then costs at most 1/8 of ``lca``)."""
    cp = max(1, min(n_params, 1 << 21))
    if CHUNK_ITERATIONS is not None:
        return int(CHUNK_ITERATIONS), cp
    ct = 64
    while ct > 16 and ct * cp * 4 > (32 << 20):
        ct //= 2
    return ct, max(1, min(cp, (32 << 20) // (4 * ct)))


def _describe_difference(key, stored, given) -> str:
    def short(v):
        s = repr(v)
        return s if len(s) <= 120 else s[:117] + "..."

    return f"{_INPUT_NAMES.get(key, key)}: {short(stored)} in the store, {short(given)} now"


class StoreSink:
    """Streams ``analyze``'s rows into a result store, a chunk of iterations at a time; resumable.

    Rows are buffered in memory (at most one chunk of iterations), written as whole chunks, fsynced,
    and only then counted in the root attributes (``completed_iterations``). Opened again with the
    same inputs, the store continues from that count; with other inputs it is refused. (Checkpoint
    variables also get the one row after each chunk, the loss and prefix at its end, so every
    completed iteration is readable whole; the next chunk rewrites that row's chunk entirely.)
    """

    def __init__(
        self, path, *, spec: PathSpec, traj, data_fingerprint: str, options: Options, batches=None,
        keep: str = "parameter",
    ):  # fmt: skip
        self.path = local_path(path)
        self.keep = check_keep(keep)
        self.n_iterations = len(traj) - 1
        self.coords = parameter_coords(spec)
        self.groups = Groups.of(spec, self.coords)
        self.seconds, self.evaluations = 0.0, 0
        self.partial: LCAResult | None = None
        self.spec, self.traj = spec, traj
        #: The trajectory to read snapshots through: each one read is hashed, and the hash stored with its row.
        self.trajectory = HashingTrajectory(traj, spec)
        self.inputs = inputs(spec, traj, data_fingerprint, options)
        self.batch = batch_attrs(batches) if batches is not None else {}
        self.steps = list(traj.steps) if traj.steps is not None else None
        self.lock = None
        self._t0: float | None = None
        attrs = refuse_foreign(self.path, "result")
        if attrs is None or attrs.get("complete") is not True:  # it will be written: one writer at a time
            self.lock = lock(self.path, "analyze(store=...)")
        try:
            if self.lock is not None:
                attrs = refuse_foreign(self.path, "result")  # again: another writer may have just created it
            if attrs is None:
                create_atomically(self.path, self._create)
                attrs = read_attrs(self.path)
            else:
                self._check_resumable(attrs)
            self._open(attrs)
        except BaseException:
            self.close()
            raise
        if self.lock is not None:
            self.lock.reclaimable = True  # idle until a run starts (resume_from)

    def _check_resumable(self, attrs: dict):
        """Refuse a store this run cannot continue, naming what differs (inputs, snapshots, format)."""
        path = self.path
        if attrs.get("saved"):
            raise ValueError(
                f"{path!r} holds a result saved with LCAResult.save; analyze(..., store=...) continues only a store "
                "it computed itself. Open it with lca.open, or give analyze another store path."
            )
        if check_format(path, attrs, RESULT_FORMAT) < 2:
            raise ValueError(
                f"the store {path!r} was written by an older lca_notebook (format {attrs.get('format', 1)}: no "
                f"checksums, no snapshot hashes), so it cannot be continued safely; lca.open still reads it. Give "
                "analyze another store path to compute anew."
            )
        int_attr(path, attrs, "n_snapshots", low=2)
        stored_keep = attrs.get("keep", "parameter")
        if stored_keep != self.keep:
            raise ValueError(
                f"the store {path!r} was computed with keep={stored_keep!r}, this call asks for keep={self.keep!r}: "
                f"pass keep={stored_keep!r} to continue it (or to read it: lca.open), or give another store path"
            )
        if self.keep == "parameter" and "prefix_stride" not in attrs:
            raise ValueError(
                f"the store {path!r} was written before compact prefix sums (a float64 prefix row per iteration), so "
                "this version cannot continue it; lca.open still reads it. Give analyze another store path."
            )
        # tol and max_splits only steer adaptive: another tol leaves a fixed rule's numbers as they are
        unused = ("tol", "max_splits", "param_tol") if self.inputs.get("method") != "adaptive" else ()
        diffs = {
            k: _describe_difference(k, attrs.get(k), v)
            for k, v in self.inputs.items()
            if attrs.get(k) != v and k not in unused
        }
        if "data_fingerprint" in diffs and self.batch and attrs.get("data_contents") == self.batch["data_contents"]:
            stored = str(attrs.get("batch_sizes"))
            if stored != self.batch["batch_sizes"]:  # same contents, split otherwise: the batch size changed
                diffs["data_fingerprint"] = (
                    f"the batch size: batches of {_split(stored)} in the store, {_split(self.batch['batch_sizes'])} "
                    "now (the data itself is the same; pass the batch_size the store was computed with)"
                )
        culprit = None
        if not diffs.keys() - {"trajectory_fingerprint"}:
            culprit = self._changed_snapshot(attrs)
        if culprit is not None:
            diffs["trajectory_fingerprint"] = culprit
        if diffs:
            what = "returned as it is" if attrs.get("complete") is True else "resumed"
            raise ValueError(
                f"the store {path!r} was computed from other inputs, so it cannot be {what}: "
                + "; ".join(diffs.values())
                + ". Use the same inputs to continue it, or another store path to compute anew."
            )

    def _changed_snapshot(self, attrs: dict) -> str | None:
        """The first snapshot already computed whose hash differs from the stored one (one read each)."""
        t = self.n_iterations
        complete = attrs.get("complete") is True
        upto = t + 1 if complete else min(
            int_attr(self.path, attrs, "completed_checkpoints", default=0, high=t + 1),
            int_attr(self.path, attrs, "completed_iterations", default=0, high=t) + 1,
        )  # fmt: skip
        if upto <= 0 or not os.path.exists(os.path.join(self.path, HASH_VAR)):
            return None
        # 0 reads as "not recorded" (shards of stores written before they kept hashes).
        stored = np.asarray(CheckedArray(self.path, HASH_VAR, "r", "checkpoint")[:upto], dtype=np.uint64)
        for k in map(int, np.flatnonzero(stored)):
            if snapshot_hash(self.traj[k], self.spec) != int(stored[k]):
                used = f"iteration {k}" if k == 0 else f"iterations {k - 1} and {k}" if k < t else f"iteration {k - 1}"
                return (
                    f"snapshot {k} of the trajectory ({self.traj.describe(k)}) differs from the one the store was "
                    f"computed from ({used} used it)"
                )
        return None

    def _open(self, attrs: dict):
        path, t = self.path, self.n_iterations
        complete = attrs.get("complete", False)
        if not isinstance(complete, bool):
            raise damaged_attribute(path, "complete", complete, "true or false")
        self.complete = complete
        self.done = int_attr(path, attrs, "completed_iterations", default=0, high=t)
        ckpts = int_attr(path, attrs, "completed_checkpoints", default=0, high=t + 1)
        if complete and (self.done != t or ckpts != t + 1):
            raise damaged_attribute(path, "complete", complete, f"false, as it holds {self.done} of {t} iterations")
        self._before = {k: number_attr(path, attrs, k) for k in ("seconds", "gradient_evaluations")}
        self.ct = chunk_rows(path, "residual")
        self.slot = int_attr(path, attrs, "parameter_slot", default=0, high=1)
        for name in iteration_vars(self.keep):
            check_rows(path, name, self.done, "iteration")
        for name in self._checkpoint_vars:
            check_rows(path, name, min(ckpts, self.done + 1), "checkpoint")
        if self.keep == "parameter":
            check_rows(path, "prefix_parameter", self.done // self.ct + 1 if self.done else 0, "boundary")
            extra: tuple[str, ...] = ("prefix_parameter",)
        else:
            extra = TOTAL_VARS
        names = iteration_vars(self.keep) + self._checkpoint_vars + (HASH_VAR, *extra)
        self.arrays = Arrays(path, names, what="row")
        self._load_buffers(ckpts)

    @property
    def _checkpoint_vars(self) -> tuple[str, ...]:
        return CHECKPOINT_VARS if self.keep == "parameter" else ("loss",)

    def grow(self):
        """The trajectory grew (a recorder still writing it: ``analyze(..., follow=True)``): lengthen every
        iteration and checkpoint array and coordinate to its snapshots, then record its new ``n_snapshots``
        and ``trajectory_fingerprint``. Arrays first: a kill in between leaves arrays longer than the count,
        which reads (and resumes) as before."""
        t_old, t = self.n_iterations, len(self.traj) - 1
        if t <= t_old:
            return
        sizes = {"iteration": t, "checkpoint": t + 1, "boundary": t // self.ct + 1}
        for arr in self.arrays.arrays.values():
            dim = (arr.array.metadata.dimension_names or [None])[0]  # type: ignore[union-attr]
            if dim in sizes:
                arr.resize((sizes[dim], *arr.shape[1:]))
        self.steps = list(self.traj.steps) if self.traj.steps is not None else None
        coords = {"iteration": np.arange(t), "checkpoint": np.arange(t + 1)}
        if self.steps is not None and os.path.isdir(os.path.join(self.path, "step")):
            coords["step"] = np.asarray(self.steps, dtype=np.int64)
        for name, values in coords.items():
            arr = CheckedArray(self.path, name, what="coordinate")
            start = arr.shape[0]
            arr.resize(values.shape)
            arr[start:] = values[start:]
        self.n_iterations = t
        self.inputs["n_snapshots"] = t + 1
        self.inputs["trajectory_fingerprint"] = trajectory_fingerprint(self.traj, self.spec)
        # Not fsynced: lost to a power cut, the store counts fewer snapshots, which a later run continues and grows.
        update_attrs(
            self.path, durable=False, n_snapshots=t + 1, trajectory_fingerprint=self.inputs["trajectory_fingerprint"]
        )

    def flush(self):
        """Write the rows of the chunk being filled (the chunk is rewritten whole when it fills), so readers of
        the store see every iteration computed so far: a follower does it each time it waits for the recorder."""
        n = self.done - self.b0
        if n and getattr(self, "stored", -1) < self.done:
            self._flush(n, n + 1)

    def close(self):
        """Let other writers at the store (``finish`` and ``interrupted`` do it too)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # -- layout ---------------------------------------------------------------------------------
    def _create(self, tmp):
        import dask.array as da

        t, p = self.n_iterations, len(self.coords["tensor"])
        ct, cp = _chunking(p)
        if getattr(self.traj, "closed", True):  # as the chunks read back (dask cuts a chunk longer than the array)
            ct = max(1, min(ct, t))

        def lazy(shape, chunks, dtype):  # never computed: only the metadata is written
            return da.zeros(shape, chunks=chunks, dtype=dtype)

        data: dict[str, tuple[tuple[str, ...], object]] = {
            "residual": (("iteration",), lazy(t, ct, np.float64)),
            "lca_rest": (("iteration",), lazy(t, ct, np.float64)),
            "splits": (("iteration",), lazy(t, ct, np.int32)),
            "evaluations": (("iteration",), lazy(t, ct, np.int32)),
            "error": (("iteration",), lazy(t, ct, np.float64)),
            "loss": (("checkpoint",), lazy(t + 1, ct, np.float64)),
            HASH_VAR: (("checkpoint",), lazy(t + 1, ct, np.uint64)),
        }
        coords = {
            "iteration": np.arange(t),
            "checkpoint": np.arange(t + 1),
            "parameter": np.arange(p),
            "tensor": coded_names(self.coords["tensor"]),
            "layer": coded_names(self.coords["layer"]),
            "unit": ("parameter", self.coords["unit"]),
            "index": ("parameter", self.coords["index"]),
        }
        if self.steps is not None:
            coords["step"] = ("checkpoint", np.asarray(self.steps, dtype=np.int64))
        if self.keep == "parameter":
            data["lca"] = (("iteration", "parameter"), lazy((t, p), (ct, cp), lca_dtype(self.spec)))
            data["prefix_parameter"] = (("boundary", "parameter"), lazy((t // ct + 1, p), (1, cp), np.float64))
            for by, dim in GROUP_DIMS.items():
                labels = self.groups.labels(by)
                data[PREFIX_VARS[by]] = (
                    ("checkpoint", dim), lazy((t + 1, len(labels)), (ct, len(labels)), np.float64),
                )  # fmt: skip
                coords[dim] = np.asarray(labels).astype(object)
            layout = {"prefix_stride": ct}
        else:
            for by in kept(self.keep):
                n = len(self.groups.labels(by))
                data[f"lca_{by}"] = (("iteration", GROUP_DIMS[by]), lazy((t, n), (ct, n), np.float64))
                for name in ("helped", "hurt"):
                    data[f"{name}_{by}"] = (("iteration", GROUP_DIMS[by]), lazy((t, n), (ct, n), np.int32))
                coords[GROUP_DIMS[by]] = np.asarray(self.groups.labels(by)).astype(object)
            data["parameter_total"] = (("slot", "parameter"), lazy((2, p), (1, cp), np.float64))
            data["parameter_helped"] = (("slot", "parameter"), lazy((2, p), (1, cp), np.int32))
            layout = {"parameter_slot": 0}
        attrs = dict(
            self.inputs,
            **self.batch,
            keep=self.keep,
            **layout,
            **{KIND: "result", "format": RESULT_FORMAT, "completed_iterations": 0, "completed_checkpoints": 0},
            complete=False,
        )
        ds = xr.Dataset(data, coords=coords, attrs=attrs)
        encoding = {v: {"chunks": ds[v].data.chunksize, "compressors": checksummed()} for v in data}
        if not getattr(self.traj, "closed", True):  # a recording still growing (follow=True): chunk for its end,
            full = _chunking(len(self.coords["tensor"]))[0]  # not for the few snapshots there are now
            # (chunks longer than the array: safe_chunks off below; dask writes nothing here, only metadata)
            for v, enc in encoding.items():
                if ds[v].dims[0] in ("iteration", "checkpoint"):
                    enc["chunks"] = (full, *enc["chunks"][1:])  # prefix_parameter is on "boundary": (1, cp)
        # The coordinates on `parameter` (~36 bytes a parameter uncompressed: as much as 9 iterations of lca) are
        # runs of repeated names and counters: zstd makes them a fraction of a percent of it.
        encoding |= {c: {"compressors": checksummed()} for c in coords}
        for c in ("parameter", "tensor", "layer", "unit", "index"):
            encoding[c] = {"compressors": [ZstdCodec(level=3), *checksummed()]}
        ds.to_zarr(
            tmp, mode="w-", compute=False, consolidated=False, encoding=encoding, zarr_format=3,
            safe_chunks=getattr(self.traj, "closed", True),  # nothing is written by dask here: no parallel writes
        )  # fmt: skip

    # -- buffers --------------------------------------------------------------------------------
    def _stored_prefix(self, k: int) -> dict[str, np.ndarray]:
        return {by: np.asarray(self.arrays[name][k], dtype=np.float64) for by, name in PREFIX_VARS.items()}

    def _load_buffers(self, ckpts):
        ct, p = self.ct, len(self.coords["tensor"])
        self.b0 = (self.done // ct) * ct
        self.rows = Rows(ct, p, lca_dtype(self.spec), self.keep, self.groups)
        self.loss = np.full(ct + 1, np.nan)
        self.hash = np.zeros(ct + 1, np.uint64)  # snapshot hashes of the checkpoint rows buffered (0: not read yet)
        self.prefix = PrefixBlock(self.groups, ct) if self.keep == "parameter" else None
        self.totals = self.rows.totals  # with keep coarser: added to by rows.put
        self.boundary = np.zeros(p if self.keep == "parameter" else 0)  # the parameter prefix at b0
        # Gradient evaluations of the stored iterations before this chunk: the total in the attributes is
        # 1 (the first snapshot) plus the sum of `evaluations`, so it is the same after a kill and a resume.
        self._ev_base = int(np.asarray(self.arrays["evaluations"][: self.b0], dtype=np.int64).sum()) if self.b0 else 0
        if self.done == 0 or self.complete:
            return
        n = self.done - self.b0  # rows of the current chunk already stored
        for name, buf in self.rows.arrays.items():
            buf[:n] = self.arrays[name][self.b0 : self.done]
        if n:
            self.loss[:n] = self.arrays["loss"][self.b0 : self.done]
            self.hash[:n] = self.arrays[HASH_VAR][self.b0 : self.done]
        if self.totals is not None:  # the totals at `done`, from the slot counted with it
            self.totals.load(self.arrays["parameter_total"][self.slot], self.arrays["parameter_helped"][self.slot])
        else:
            assert self.prefix is not None
            self.boundary[:] = self.arrays["prefix_parameter"][self.b0 // ct]
            if n or ckpts >= self.done + 1:
                start = self._stored_prefix(self.b0)
            else:  # a chunk boundary without its checkpoint row: the row before it, advanced by the iteration before
                prev = self.done - 1
                seed = PrefixBlock(self.groups, 1)
                seed.seed(self._stored_prefix(prev) | {"parameter": np.zeros(p)})
                seed.advance(0, np.asarray(self.arrays["lca"][prev]))
                start = seed.last(1)
            self.prefix.seed(start | {"parameter": self.boundary})
            for i in range(n):  # the coarse rows and the running parameter sum, as write() built them
                self.prefix.advance(i, self.rows["lca"][i])
        if ckpts >= self.done + 1:
            self.loss[n] = self.arrays["loss"][self.done]
            self.hash[n] = self.arrays[HASH_VAR][self.done]

    def _keep_hash(self, k: int):
        """The hash of snapshot k into its checkpoint row: as the engine read it, else read once more here."""
        h = self.trajectory.hashes.pop(k, None)
        if h is None and self.hash[k - self.b0] == 0:
            h = snapshot_hash(self.traj[k], self.spec)  # the engine read another object than self.trajectory
        if h is not None:
            self.hash[k - self.b0] = h

    # -- the sink protocol ----------------------------------------------------------------------
    def resume_from(self) -> int:
        if self.lock is not None:
            self.lock.reclaimable = False  # running: no other writer, not even in this process
        self._t0 = time.perf_counter()
        return self.done

    def write_loss(self, k: int, value: float):
        # The loss at the snapshot a resumed run starts from was stored by the run before: recomputed, it must
        # agree. The snapshot itself was compared when the store was opened (its hash), so a difference here is
        # what the recorded names cannot see: a loss_fn, model or data changed under the same names.
        stored = self.loss[k - self.b0]
        if k and np.isfinite(stored) and not math.isclose(stored, value, rel_tol=1e-5, abs_tol=1e-8):
            raise ValueError(
                f"the store {self.path!r} holds loss {stored:.9g} at snapshot {k}, but resuming computes {value:.9g} "
                "there from the same snapshot: the model, the data or loss_fn differ from the run that wrote it, "
                "although their names match. Use the same ones to continue it, or another store path to compute anew."
            )
        self.loss[k - self.b0] = value
        self._keep_hash(k)

    def write(self, row: IterationResult):
        if row.t != self.done:
            raise RuntimeError(f"store sink got iteration {row.t} but expected {self.done}")
        i = row.t - self.b0
        lca = self.rows.put(i, row)
        self.loss[i + 1] = row.loss_end
        self._keep_hash(row.t + 1)
        if self.prefix is not None:
            self.prefix.advance(i, lca)
        self.done += 1
        if i + 1 == self.ct:
            self._flush(self.ct, self.ct + 1)
            self._ev_base += int(self.rows["evaluations"][: self.ct].sum(dtype=np.int64))
            self.loss[0] = self.loss[self.ct]  # the checkpoint row after the chunk opens the next one
            self.hash[0], self.hash[1:] = self.hash[self.ct], 0
            if self.prefix is not None:
                self.prefix.seed(self.prefix.last(self.ct))
                self.boundary[:] = self.prefix.parameter
            self.b0 += self.ct

    def _totals(self, n_it: int) -> dict:
        """``seconds`` (every run's, this one until now) and ``gradient_evaluations`` (what the stored
        iterations took: the same for a run killed and resumed as for one that was not)."""
        ev = self._ev_base + int(self.rows["evaluations"][:n_it].sum(dtype=np.int64))
        elapsed = time.perf_counter() - self._t0 if self._t0 is not None else 0.0
        return {
            "seconds": round(float(self._before["seconds"]) + elapsed, 3),
            "gradient_evaluations": ev + 1 if self.b0 + n_it else 0,
        }

    def _flush(self, n_it: int, n_ck: int, **extra):
        """Write buffered rows, fsync them, then (and only then) count them as completed."""
        b0 = self.b0
        blocks = self.rows.head(n_it) | {"loss": self.loss[:n_ck], HASH_VAR: self.hash[:n_ck]}
        slot = {}
        try:
            if self.prefix is not None:
                blocks |= {name: self.prefix.rows[by][:n_ck] for by, name in PREFIX_VARS.items()}
                self.arrays.write(b0, blocks)
                ends = [self.boundary] + ([self.prefix.parameter] if n_it == self.ct else [])
                self.arrays.write(b0 // self.ct, {"prefix_parameter": np.stack(ends)})
            else:
                assert self.totals is not None
                self.arrays.write(b0, blocks)
                # The totals go to the slot not counted now; the attributes below switch to it, in one step with
                # the count of iterations they include (a kill before leaves the other slot, and its count, whole).
                slot = {"parameter_slot": 1 - self.slot}
                totals = {"parameter_total": self.totals.total[None], "parameter_helped": self.totals.helped[None]}
                self.arrays.write(1 - self.slot, totals)
            update_attrs(
                self.path, completed_iterations=b0 + n_it, completed_checkpoints=b0 + n_ck,
                **self._totals(n_it), **slot, **extra,
            )  # fmt: skip
            self.slot = slot.get("parameter_slot", self.slot)
        except OSError as exc:
            raise StoreWriteError(
                f"could not write iterations {b0}..{b0 + n_it - 1} to the store {self.path!r} "
                f"({type(exc).__name__}: {exc}). Iterations 0..{b0 - 1} are saved there. Free space or fix the "
                "location, then run the same analyze(..., store=...) call again to continue from there."
            ) from exc
        self.stored = b0 + n_it

    def interrupted(self, done: int):
        """Keep what was computed: write the partial chunk (a later run rewrites it whole)."""
        self.stored = self.b0
        try:
            if done > self.b0 and not np.isnan(self.loss[done - self.b0]):
                self._flush(done - self.b0, done - self.b0 + 1)
        except Exception:  # the original error matters more; what was stored before stays readable
            pass
        self.close()
        try:
            if self.stored > 0:
                self.partial = open_store(self.path)
        except Exception:
            self.partial = None

    def where_kept(self) -> str:
        n = getattr(self, "stored", self.b0)
        if not n:
            return f"nothing was saved yet in {self.path!r}"
        return (
            f"iterations 0..{n - 1} are saved in the store {self.path!r} (lca.open reads them); run the same call "
            "again to continue"
        )

    def finish(self) -> LCAResult:
        try:
            if not self.complete:
                t = self.n_iterations
                if self.done != t:
                    raise RuntimeError(
                        f"the store {self.path!r} holds {self.done} of {t} iterations; it cannot be finished yet"
                    )
                self._flush(t - self.b0, t - self.b0 + 1, complete=True)
                self.complete = True
        finally:
            self.close()
        return open_store(self.path)


def _checked(ds: xr.Dataset, path: str) -> xr.Dataset:
    """The dataset with each data variable read through :class:`~.files.CheckedArray` (lazily, same chunks),
    so a chunk whose checksum fails names the store, array, chunk and file instead of a bare zarr error."""
    import dask.array as da

    for name in list(ds.data_vars):
        var = ds[name]
        if var.chunks is None or not os.path.exists(os.path.join(path, str(name), "zarr.json")):
            continue
        source = CheckedArray(path, str(name), "r", str(var.dims[0]) if var.dims else "row")
        if source.dtype != var.dtype or tuple(source.shape) != var.shape:
            continue  # decoded by xarray (not a plain array of ours): keep its reader
        data = da.from_array(
            source, chunks=var.chunks, name=f"lca-{name}-{uuid.uuid4().hex}", lock=False, asarray=True,
            meta=np.empty((0,) * var.ndim, var.dtype),
        )  # fmt: skip
        ds[name] = var.copy(data=data)
    return ds


def _damaged_coordinate(path: str, exc: BaseException) -> Exception | None:
    """After a checksum failure while opening: the damaged chunk of a coordinate, named (they are small)."""
    if not (isinstance(exc, ValueError) and "checksum" in str(exc).lower()):
        return None
    for name in sorted(os.listdir(path)):
        if os.path.isfile(os.path.join(path, name, "zarr.json")):
            named = damaged_chunk(path, name, slice(None))
            if named is not None:
                return named
    return None


def open_store(path) -> LCAResult:
    """Open a result store lazily: from ``analyze(store=...)`` (complete or not) or :meth:`LCAResult.save`.

    Only the completed iterations are shown. Opening checks that every chunk file they need exists with
    its exact size (a damaged store fails here, naming the file); reading a chunk checks its CRC32C
    checksum (a damaged chunk fails then, naming the store, array, chunk and file).
    """
    path = local_path(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no LCA result at {path!r}")
    attrs = read_attrs(path)
    kind = attrs.get(KIND)
    if kind == "trajectory":
        raise ValueError(
            f"{path!r} is a recorded trajectory, not an LCA result: give it to analyze() as the trajectory"
        )
    if kind is not None:
        check_format(path, attrs, RESULT_FORMAT)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "no consolidated metadata": expected for a growing store
            ds = xr.open_zarr(path, consolidated=None if kind is None else False)
    except Exception as exc:  # zarr raises many types for a broken store; say which store, not where it broke
        named = _damaged_coordinate(path, exc)
        if named is not None:
            raise named from exc
        raise ValueError(f"{path!r} is not a readable LCA store ({type(exc).__name__}: {exc})") from exc
    if not ({"iteration", "checkpoint"} <= set(ds.dims) and "loss" in ds.data_vars):
        raise ValueError(
            f"{path!r} is a zarr store but not an LCA result: it has no 'loss' over 'iteration' and 'checkpoint' "
            f"dimensions (its variables: {', '.join(map(str, list(ds.data_vars)[:8])) or 'none'}). lca.open reads a "
            "store analyze(store=...) or LCAResult.save wrote."
        )
    ds = ds.drop_vars([HASH_VAR], errors="ignore")
    t = ds.sizes.get("iteration", 0)
    if kind == "result" and not attrs.get("saved"):
        n = min(
            int_attr(path, attrs, "completed_iterations", default=0, high=t),
            int_attr(path, attrs, "completed_checkpoints", default=0, high=t + 1) - 1,
        )
        if n < 0:
            raise ValueError(
                f"the store {path!r} holds no completed iteration yet; run analyze(..., store=...) to fill it"
            )
    else:  # saved whole by LCAResult.save
        n = t
    for name in ds.data_vars if kind is not None else ():  # (results saved before format 2 skipped empty chunks)
        dims = ds[name].dims
        if dims and dims[0] in ("iteration", "checkpoint") and os.path.isdir(os.path.join(path, str(name))):
            check_rows(path, str(name), n + (dims[0] == "checkpoint"), str(dims[0]))
        elif dims and dims[0] == "boundary" and n:  # compact prefix rows: every chunk boundary up to n
            stride = int_attr(path, attrs, "prefix_stride", low=1)
            check_rows(path, str(name), n // stride + 1, "boundary")
    ds = _checked(ds, path).isel(iteration=slice(0, n), checkpoint=slice(0, n + 1))
    if "slot" in ds.dims:  # a reduced store's per-parameter totals: the slot counted with `completed_iterations`
        ds = ds.isel(slot=int_attr(path, attrs, "parameter_slot", default=0, high=1))
        ds.attrs.pop("parameter_slot", None)
    # Names on `parameter` are read as a result computed in memory holds them: codes into the names. Group
    # labels (and names before format 3) are stored as variable-length strings (numpy's StringDType on read):
    # plain fixed-width str, as in memory. The other coordinates on `parameter` are read now too: every sum
    # needs them.
    try:
        for name in ("tensor", "layer"):  # int32 codes into their names (format 3)
            if name in ds.coords and (names := decoded_names(path, name, ds[name].values, ds[name].attrs)) is not None:
                ds = ds.assign_coords({name: ("parameter", names)})
        for name in ("tensor", "layer", *GROUP_DIMS.values()):
            if name in ds.coords and ds[name].dtype.kind != "U" and not isinstance(ds[name].dtype, pd.CategoricalDtype):
                ds = ds.assign_coords({name: (ds[name].dims, np.asarray(ds[name].values).astype(object).astype(str))})
        for name in ("unit", "index", "step"):
            if name in ds.coords:
                ds = ds.assign_coords({name: (ds[name].dims, np.asarray(ds[name].values))})
    except ValueError as exc:
        named = _damaged_coordinate(path, exc)
        if named is None:
            raise
        raise named from exc
    ds = _without_save_marks(ds)
    ds.encoding["source"] = path
    try:
        result = LCAResult(ds)
        result._reader = reading(path)  # replacing this store is refused while the result lives
        return result
    except ValueError as exc:
        raise ValueError(f"{path!r} is not an LCA result: {exc}") from exc


def open(path) -> LCAResult:
    """Open a result saved with :meth:`LCAResult.save` (netCDF or zarr) or computed into a store
    (``analyze(store=...)``). Nothing is read into memory until used."""
    path = local_path(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no LCA result at {path!r}")
    if os.path.isdir(path):
        return open_store(path)
    try:
        ds = xr.open_dataset(path, engine="h5netcdf")
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(
            f"{path!r} is a file but not a readable LCA result ({type(exc).__name__}: {exc}). lca.open reads a "
            "folder analyze(store=...) or LCAResult.save(...zarr) wrote, or a netCDF file LCAResult.save(...nc) wrote."
        ) from exc
    if "iteration" not in ds.dims:  # an explorer's export (a selection) or any other netCDF file
        names = ", ".join(list(map(str, ds.data_vars))[:6]) or "no variables"
        ds.close()
        raise ValueError(
            f"{path!r} is a netCDF file but not an LCA result: it has no iteration dimension (it holds {names}). An "
            "explorer's Export writes such a selection: read it with xarray.open_dataset. lca.open reads what "
            "LCAResult.save or analyze(store=...) wrote."
        )
    ds = _without_save_marks(ds)
    ds.encoding["source"] = os.path.abspath(path)
    return LCAResult(ds)


def _without_save_marks(ds: xr.Dataset) -> xr.Dataset:
    """A saved result reads back with the attributes it had: the marks save adds are taken off."""
    if ds.attrs.get("saved"):
        ds.attrs = {k: v for k, v in ds.attrs.items() if k not in (KIND, "format", "saved")}
    return ds
