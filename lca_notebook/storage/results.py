"""The result store: what ``analyze(..., store=PATH)`` streams into (resumable), and opening saved results.

The variables of :class:`~lca_notebook.LCAResult` plus float64 prefix sums over iterations at every
granularity (row k = the sum of iterations ``[0, k)``), so any iteration-range sum is one subtraction
of two rows. The on-disk layout is in ``FORMAT.md``.

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
import warnings

import numpy as np
import torch
import xarray as xr

from ..engine import IterationResult, Options
from ..layout import GRANULARITIES, Groups, PathSpec, parameter_coords
from ..result import LCAResult
from ..sinks import ITERATION_VARS, PrefixBlock, Rows
from .files import (
    FORMAT,
    KIND,
    Arrays,
    StoreWriteError,
    check_rows,
    chunk_rows,
    create_atomically,
    read_attrs,
    refuse_foreign,
    update_attrs,
)

#: Iterations per chunk of a result store (None: chosen from the number of parameters). Tests set it low.
CHUNK_ITERATIONS: int | None = None
_PREFIX_ROWS = 4  # rows per chunk of prefix_parameter: a range sum reads two small chunks, not two big ones
#: Dimension of each coarse prefix (plural: ``unit``, ``tensor`` and ``layer`` are coordinates on ``parameter``).
GROUP_DIMS = {"unit": "units", "tensor": "tensors", "layer": "layers", "total": "total"}
PREFIX_VARS = {by: f"prefix_{by}" for by in GRANULARITIES}
CHECKPOINT_VARS = ("loss", *PREFIX_VARS.values())

_INPUT_NAMES = {
    "parameters": "the selected parameters (names and shapes)",
    "path_tensors": "the model's tensors (names and shapes)",
    "data_fingerprint": "the data (its contents)",
    "trajectory_fingerprint": "the trajectory (its first or last snapshot)",
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
    """(iterations per chunk, parameters per chunk): about 32 MB of float32 per lca chunk."""
    cp = max(1, min(n_params, 1 << 21))
    if CHUNK_ITERATIONS is not None:
        return int(CHUNK_ITERATIONS), cp
    ct = 64
    while ct > 8 and ct * cp * 4 > (32 << 20):
        ct //= 2
    return ct, cp


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

    def __init__(self, path, *, spec: PathSpec, traj, data_fingerprint: str, options: Options):
        self.path = os.path.abspath(os.fspath(path))
        self.n_iterations = len(traj) - 1
        self.coords = parameter_coords(spec)
        self.groups = Groups(self.coords)
        self.seconds, self.evaluations = 0.0, 0
        self.partial: LCAResult | None = None
        self.inputs = inputs(spec, traj, data_fingerprint, options)
        self.steps = list(traj.steps) if traj.steps is not None else None
        attrs = refuse_foreign(self.path, "result")
        if attrs is None:
            create_atomically(self.path, self._create)
            attrs = read_attrs(self.path)
        else:
            diffs = [_describe_difference(k, attrs.get(k), v) for k, v in self.inputs.items() if attrs.get(k) != v]
            if diffs:
                raise ValueError(
                    f"the store {self.path!r} was computed from other inputs, so it cannot be resumed: "
                    + "; ".join(diffs)
                    + ". Use the same inputs to continue it, or another store path to compute anew."
                )
        self.complete = bool(attrs.get("complete"))
        self.done = int(attrs.get("completed_iterations", 0))
        ckpts = int(attrs.get("completed_checkpoints", 0))
        self._before = {k: attrs.get(k, 0) for k in ("seconds", "gradient_evaluations")}
        self.ct = chunk_rows(self.path, "lca")
        for name in ITERATION_VARS:
            check_rows(self.path, name, self.done, "iteration")
        for name in CHECKPOINT_VARS:
            check_rows(self.path, name, min(ckpts, self.done + 1), "checkpoint")
        self.arrays = Arrays(self.path, ITERATION_VARS + CHECKPOINT_VARS)
        self._load_buffers(ckpts)

    # -- layout ---------------------------------------------------------------------------------
    def _create(self, tmp):
        import dask.array as da

        t, p = self.n_iterations, len(self.coords["tensor"])
        ct, cp = _chunking(p)

        def lazy(shape, chunks, dtype):  # never computed: only the metadata is written
            return da.zeros(shape, chunks=chunks, dtype=dtype)

        data = {
            "lca": (("iteration", "parameter"), lazy((t, p), (ct, cp), np.float32)),
            "residual": (("iteration",), lazy(t, ct, np.float64)),
            "lca_rest": (("iteration",), lazy(t, ct, np.float64)),
            "splits": (("iteration",), lazy(t, ct, np.int32)),
            "evaluations": (("iteration",), lazy(t, ct, np.int32)),
            "error": (("iteration",), lazy(t, ct, np.float64)),
            "loss": (("checkpoint",), lazy(t + 1, ct, np.float64)),
            "prefix_parameter": (
                ("checkpoint", "parameter"),
                lazy((t + 1, p), (min(_PREFIX_ROWS, ct), cp), np.float64),
            ),
        }
        coords = {
            "iteration": np.arange(t),
            "checkpoint": np.arange(t + 1),
            "parameter": np.arange(p),
            "tensor": ("parameter", self.coords["tensor"].astype(object)),
            "layer": ("parameter", self.coords["layer"].astype(object)),
            "unit": ("parameter", self.coords["unit"]),
            "index": ("parameter", self.coords["index"]),
        }
        if self.steps is not None:
            coords["step"] = ("checkpoint", np.asarray(self.steps, dtype=np.int64))
        for by, dim in GROUP_DIMS.items():
            labels = self.groups.labels(by)
            data[PREFIX_VARS[by]] = (("checkpoint", dim), lazy((t + 1, len(labels)), (ct, len(labels)), np.float64))
            coords[dim] = np.asarray(labels).astype(object)
        attrs = dict(
            self.inputs,
            **{KIND: "result", "format": FORMAT, "completed_iterations": 0, "completed_checkpoints": 0},
            complete=False,
        )
        ds = xr.Dataset(data, coords=coords, attrs=attrs)
        encoding = {v: {"chunks": ds[v].data.chunksize, "compressors": None} for v in data}
        ds.to_zarr(tmp, mode="w-", compute=False, consolidated=False, encoding=encoding, zarr_format=3)

    # -- buffers --------------------------------------------------------------------------------
    def _stored_prefix(self, k: int) -> dict[str, np.ndarray]:
        return {by: np.asarray(self.arrays[name][k], dtype=np.float64) for by, name in PREFIX_VARS.items()}

    def _load_buffers(self, ckpts):
        ct, p = self.ct, len(self.coords["tensor"])
        self.b0 = (self.done // ct) * ct
        self.rows = Rows(ct, p)
        self.loss = np.full(ct + 1, np.nan)
        self.prefix = PrefixBlock(self.groups, ct)
        if self.done == 0 or self.complete:
            return
        n = self.done - self.b0  # rows of the current chunk already stored
        if n:
            for name, buf in self.rows.arrays.items():
                buf[:n] = self.arrays[name][self.b0 : self.done]
            self.loss[:n] = self.arrays["loss"][self.b0 : self.done]
            for by, name in PREFIX_VARS.items():
                self.prefix.rows[by][:n] = self.arrays[name][self.b0 : self.done]
            self.prefix.advance(n - 1, self.rows["lca"][n - 1])  # the next prefix row, as write() built it
        else:  # a chunk boundary: the prefix row before it, advanced by the stored iteration before it
            prev = self.done - 1
            seed = PrefixBlock(self.groups, 1)
            seed.seed(self._stored_prefix(prev))
            seed.advance(0, np.asarray(self.arrays["lca"][prev]))
            self.prefix.seed(seed.last(1))
        if ckpts >= self.done + 1:
            self.loss[n] = self.arrays["loss"][self.done]

    # -- the sink protocol ----------------------------------------------------------------------
    def resume_from(self) -> int:
        return self.done

    def write_loss(self, k: int, value: float):
        # The loss at the snapshot a resumed run starts from was stored by the run before: recomputed, it must
        # agree. This catches what the recorded identity cannot see (a loss_fn or model changed under its name).
        stored = self.loss[k - self.b0]
        if k and np.isfinite(stored) and not math.isclose(stored, value, rel_tol=1e-5, abs_tol=1e-8):
            raise ValueError(
                f"the store {self.path!r} holds loss {stored:.9g} at snapshot {k}, but resuming computes {value:.9g} "
                "there: the model, the data or loss_fn differ from the run that wrote it, although their names "
                "match. Use the same ones to continue it, or another store path to compute anew."
            )
        self.loss[k - self.b0] = value

    def write(self, row: IterationResult):
        if row.t != self.done:
            raise RuntimeError(f"store sink got iteration {row.t} but expected {self.done}")
        i = row.t - self.b0
        self.rows.put(i, row)
        self.loss[i + 1] = row.loss_end
        self.prefix.advance(i, self.rows["lca"][i])
        self.done += 1
        if i + 1 == self.ct:
            self._flush(self.ct, self.ct + 1)
            self.loss[0] = self.loss[self.ct]  # the checkpoint row after the chunk opens the next one
            self.prefix.seed(self.prefix.last(self.ct))
            self.b0 += self.ct

    def _flush(self, n_it: int, n_ck: int, **extra):
        """Write buffered rows, fsync them, then (and only then) count them as completed."""
        b0 = self.b0
        blocks = self.rows.head(n_it) | {"loss": self.loss[:n_ck]}
        blocks |= {name: self.prefix.rows[by][:n_ck] for by, name in PREFIX_VARS.items()}
        try:
            self.arrays.write(b0, blocks)
            update_attrs(self.path, completed_iterations=b0 + n_it, completed_checkpoints=b0 + n_ck, **extra)
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
        if not self.complete:
            t = self.n_iterations
            if self.done != t:
                raise RuntimeError(
                    f"the store {self.path!r} holds {self.done} of {t} iterations; it cannot be finished yet"
                )
            self._flush(
                t - self.b0, t - self.b0 + 1, complete=True,
                seconds=float(self._before["seconds"]) + self.seconds,
                gradient_evaluations=int(self._before["gradient_evaluations"]) + int(self.evaluations),
            )  # fmt: skip
            self.complete = True
        return open_store(self.path)


def open_store(path) -> LCAResult:
    """Open a result store lazily: from ``analyze(store=...)`` (complete or not) or :meth:`LCAResult.save`.

    Only the completed iterations are shown; every chunk file they need is checked first, so a
    damaged store fails here with a ValueError naming the file.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"no LCA result at {path!r}")
    attrs = read_attrs(path)
    kind = attrs.get(KIND)
    if kind == "trajectory":
        raise ValueError(
            f"{path!r} is a recorded trajectory, not an LCA result: give it to analyze() as the trajectory"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "no consolidated metadata": expected for a growing store
            ds = xr.open_zarr(path, consolidated=None if kind is None else False)
    except Exception as exc:  # zarr raises many types for a broken store; say which store, not where it broke
        raise ValueError(f"{path!r} is not a readable LCA store ({type(exc).__name__}: {exc})") from exc
    if kind == "result":
        n = min(int(attrs.get("completed_iterations", 0)), int(attrs.get("completed_checkpoints", 0)) - 1)
        if n < 0:
            raise ValueError(
                f"the store {path!r} holds no completed iteration yet; run analyze(..., store=...) to fill it"
            )
        for name in ITERATION_VARS:
            check_rows(path, name, n, "iteration")
        for name in CHECKPOINT_VARS:
            check_rows(path, name, n + 1, "checkpoint")
        ds = ds.isel(iteration=slice(0, n), checkpoint=slice(0, n + 1))
    # Names are stored as variable-length strings (numpy's StringDType on read); the result's group
    # tables want plain fixed-width str, as in a result computed in memory.
    for name in ("tensor", "layer", *GROUP_DIMS.values()):
        if name in ds.coords and ds[name].dtype.kind not in "U":
            ds = ds.assign_coords({name: (ds[name].dims, np.asarray(ds[name].values).astype(object).astype(str))})
    try:
        return LCAResult(ds)
    except ValueError as exc:
        raise ValueError(f"{path!r} is not an LCA result: {exc}") from exc


def open(path) -> LCAResult:
    """Open a result saved with :meth:`LCAResult.save` (netCDF or zarr) or computed into a store
    (``analyze(store=...)``). Nothing is read into memory until used."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no LCA result at {path!r}")
    try:
        if not path.endswith(".nc"):
            return open_store(path)
        ds = xr.open_dataset(path, engine="h5netcdf")
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path!r} is not a readable LCA result ({type(exc).__name__}: {exc})") from exc
    return LCAResult(ds)
