"""The on-disk layouts (zarr v3 directories): written in chunk-aligned batches, checked and opened lazily.

Two kinds of store, told apart by the root attribute ``lca_notebook``:

- ``"result"``: what ``analyze(..., store=PATH)`` writes. Variables of :class:`~lca_notebook.LCAResult`
  (``lca`` float32 chunked by iterations, ``loss``, ``residual``, ``lca_rest``, ``splits``,
  ``evaluations``) plus prefix sums over iterations, float64: ``prefix_parameter``
  (checkpoint, parameter) and ``prefix_unit`` / ``prefix_tensor`` / ``prefix_layer`` / ``prefix_total``
  with dims (checkpoint, ``units`` / ``tensors`` / ``layers`` / ``total``) (plural dim names: ``unit``,
  ``tensor`` and ``layer`` are already coordinates on ``parameter``). Row k of a prefix is the sum of
  iterations ``[0, k)``, so any iteration-range sum is one subtraction of two rows.
- ``"trajectory"``: what ``record(..., path=PATH)`` writes. One array per tensor dtype, each row one
  snapshot with all tensors of that dtype flattened end to end (one file per snapshot and dtype), a
  ``steps`` array, and the layout (names, shapes, offsets) in the root attributes.

Both grow by whole chunks: data files first (written atomically by zarr, then fsynced), then the count
of completed rows in the root ``zarr.json`` (replaced atomically). A store killed at any moment holds
every row its count claims. (A result's checkpoint variables also get the one row after each chunk of
iterations, the loss and prefix at its end, so every completed iteration is readable whole; the next
chunk rewrites that row's chunk entirely.) Data chunks are stored uncompressed so that opening can check every file
of the claimed rows exists with its exact size: a truncated store fails on open, naming the file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import uuid
import warnings

import numpy as np
import torch
import xarray as xr
import zarr

from .result import LCAResult, from_arrays
from .trajectory import Trajectory

KIND = "lca_notebook"  # root attribute: "result" or "trajectory"
FORMAT = 1

#: Iterations per chunk of a result store (None: chosen from the number of parameters). Tests set it low.
CHUNK_ITERATIONS: int | None = None
_PREFIX_ROWS = 4  # rows per chunk of prefix_parameter: a range sum reads two small chunks, not two big ones
_GROUP_DIMS = {"unit": "units", "tensor": "tensors", "layer": "layers", "total": "total"}
_ITERATION_VARS = ("lca", "residual", "lca_rest", "splits", "evaluations")
_CHECKPOINT_VARS = ("loss", "prefix_parameter", *(f"prefix_{by}" for by in _GROUP_DIMS))

#: Inputs a result store remembers; resuming with any of them different is refused.
IDENTITY = (
    "model", "parameters", "path_tensors", "method", "tol", "max_splits", "loss_fn", "batchnorm",
    "n_samples", "data_fingerprint", "n_snapshots", "trajectory_fingerprint",
)


class StoreWriteError(OSError):
    """Writing to a store failed (disk full, read-only, a file where a directory should be)."""


# -- low-level helpers -------------------------------------------------------------------------
def read_attrs(path: str) -> dict:
    """The root attributes of a store, read straight from its ``zarr.json``."""
    meta_file = os.path.join(path, "zarr.json")
    try:
        with open(meta_file, encoding="utf-8") as f:
            meta = json.load(f)
        return dict(meta["attributes"]) if isinstance(meta, dict) and "attributes" in meta else {}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path!r} is not a zarr store (it has no zarr.json)") from None
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"the store {path!r} is damaged: {meta_file} cannot be read ({type(exc).__name__}: {exc})") from exc


def _fsync(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def update_attrs(path: str, **changes):
    """Change root attributes atomically (temp file, fsync, rename): a kill leaves old or new, never half."""
    meta_file = os.path.join(path, "zarr.json")
    with open(meta_file, encoding="utf-8") as f:
        meta = json.load(f)
    meta.setdefault("attributes", {}).update(changes)
    tmp = f"{meta_file}.{uuid.uuid4().hex}.partial"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, meta_file)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync(path)


def _array_meta(path: str, name: str) -> dict:
    meta_file = os.path.join(path, name, "zarr.json")
    try:
        with open(meta_file, encoding="utf-8") as f:
            meta = json.load(f)
        meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]  # noqa: B018 - must be there
        return meta
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"the store {path!r} is damaged: {meta_file} cannot be read ({type(exc).__name__}: {exc})") from exc


def _chunk_files(path: str, name: str, start: int, stop: int):
    """``(file, expected size or None, first row)`` of every chunk holding rows ``[start, stop)``."""
    meta = _array_meta(path, name)
    shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
    plain = [c.get("name") for c in meta.get("codecs", [])] == ["bytes"]  # uncompressed: size is known
    dtype = meta.get("data_type")
    size = math.prod(chunks) * np.dtype(dtype).itemsize if plain and isinstance(dtype, str) else None
    if stop <= start or any(s == 0 for s in shape[1:]):
        return
    others = [range(math.ceil(s / c)) for s, c in zip(shape[1:], chunks[1:])]
    for i in range(start // chunks[0], math.ceil(stop / chunks[0])):
        for js in itertools.product(*others):
            yield os.path.join(path, name, "c", str(i), *map(str, js)), size, i * chunks[0]


def check_rows(path: str, name: str, stop: int, what: str = "row"):
    """Raise a ValueError naming the file unless every chunk of rows ``[0, stop)`` is there, whole."""
    for file, size, first in _chunk_files(path, name, 0, stop):
        try:
            actual = os.stat(file).st_size
        except FileNotFoundError:
            actual = None
        if actual is None or (size is not None and actual != size):
            state = "is missing" if actual is None else f"has {actual} bytes instead of {size} (truncated)"
            raise ValueError(
                f"the store {path!r} is damaged: {os.path.relpath(file, path)} ({name!r} from {what} {first}) {state}. "
                f"Everything before {what} {first} is intact; delete the store and compute it again to repair it."
            )


def _sync_rows(path: str, name: str, start: int, stop: int):
    dirs = set()
    for file, _, _ in _chunk_files(path, name, start, stop):
        _fsync(file)
        dirs.add(os.path.dirname(file))
    for d in dirs:
        _fsync(d)


def _open_array(path: str, name: str, mode: str = "r+"):
    # Chunks equal to the fill value are written too: a missing file then always means damage.
    return zarr.open_array(path, path=name, mode=mode).with_config({"write_empty_chunks": True})


def _refuse_foreign(path: str, kind: str):
    """An existing path we may write into must be empty or a store of ``kind``: never wipe a user's folder."""
    if not os.path.exists(path):
        return None
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is a file; a store is a directory. Choose another path.")
    if not os.listdir(path):
        return None
    attrs = read_attrs(path) if os.path.exists(os.path.join(path, "zarr.json")) else {}
    if attrs.get(KIND) != kind:
        what = f"an lca_notebook {attrs[KIND]} store" if KIND in attrs else "not an lca_notebook store"
        raise ValueError(f"{path!r} already exists and is {what}; give a new path (nothing was written there).")
    return attrs


def _create_atomically(path: str, write):
    """Build a store in a sibling temp folder, then rename it into place: a kill never leaves half a skeleton."""
    parent = os.path.dirname(path) or "."
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.creating")
    try:
        write(tmp)
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
        os.rename(tmp, path)
    except OSError as exc:
        raise StoreWriteError(f"cannot create the store {path!r} ({type(exc).__name__}: {exc}); is the location writable?") from exc
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _tensor_hash(h, snapshot, names):
    for name in names:
        t = snapshot.get(name)
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def trajectory_fingerprint(traj, spec) -> str:
    """A hash of the first and last snapshots (path tensors only) and of the steps."""
    h = hashlib.blake2b(digest_size=16)
    for k in (0, len(traj) - 1):
        snap = {spec.aliases.get(n, n): v for n, v in traj[k].items()}
        _tensor_hash(h, snap, spec.names)
    h.update(repr(list(traj.steps) if traj.steps is not None else None).encode())
    return h.hexdigest()


def _grouper(coords) -> LCAResult:
    """An empty result carrying the coordinates: its group tables give the labels and the sums."""
    return from_arrays(np.zeros((0, len(coords["tensor"])), np.float32), np.zeros(1), coords)


# -- result stores ---------------------------------------------------------------------------
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

    names = {"parameters": "the selected parameters (names and shapes)", "path_tensors": "the model's tensors (names and shapes)",
             "data_fingerprint": "the data (its contents)", "trajectory_fingerprint": "the trajectory (its first or last snapshot)",
             "n_snapshots": "the number of snapshots", "loss_fn": "the loss function", "n_samples": "the number of samples"}
    return f"{names.get(key, key)}: {short(stored)} in the store, {short(given)} now"


class StoreSink:
    """Streams ``analyze``'s rows into a result store, a chunk of iterations at a time; resumable.

    Rows are buffered in memory (at most one chunk of iterations), written as whole chunks, fsynced,
    and only then counted in the root attributes (``completed_iterations``). Opened again with the
    same inputs, the store continues from that count; with other inputs it is refused.
    """

    def __init__(self, path, *, spec, traj, batches, config):
        from .compute import parameter_coords
        from .data import fingerprint

        self.path = os.path.abspath(os.fspath(path))
        self.n_iterations = len(traj) - 1
        self.coords = parameter_coords(spec)
        self.groups = _grouper(self.coords)
        self.seconds, self.evaluations = 0.0, 0
        self.partial = None
        self.inputs = dict(
            config,
            parameters=json.dumps([[n, list(s)] for n, s in spec.selected]),
            path_tensors=json.dumps([[n, list(s)] for n, s in zip(spec.names, spec.shapes)]),
            data_fingerprint=fingerprint(batches),
            n_snapshots=len(traj),
            trajectory_fingerprint=trajectory_fingerprint(traj, spec),
        )
        self.steps = list(traj.steps) if traj.steps is not None else None
        attrs = _refuse_foreign(self.path, "result")
        if attrs is None:
            _create_atomically(self.path, self._create)
            attrs = read_attrs(self.path)
        else:
            diffs = [_describe_difference(k, attrs.get(k), self.inputs.get(k)) for k in IDENTITY if attrs.get(k) != self.inputs.get(k)]
            if diffs:
                raise ValueError(
                    f"the store {self.path!r} was computed from other inputs, so it cannot be resumed: "
                    + "; ".join(diffs) + ". Use the same inputs to continue it, or another store path to compute anew."
                )
        self.complete = bool(attrs.get("complete"))
        self.done = int(attrs.get("completed_iterations", 0))
        ckpts = int(attrs.get("completed_checkpoints", 0))
        self._before = {k: attrs.get(k, 0) for k in ("seconds", "gradient_evaluations")}
        self.ct = _array_meta(self.path, "lca")["chunk_grid"]["configuration"]["chunk_shape"][0]
        for name in _ITERATION_VARS:
            check_rows(self.path, name, self.done, "iteration")
        for name in _CHECKPOINT_VARS:
            check_rows(self.path, name, min(ckpts, self.done + 1), "checkpoint")
        self.arrays = {name: _open_array(self.path, name) for name in _ITERATION_VARS + _CHECKPOINT_VARS}
        self._load_buffers(ckpts)

    # -- layout ---------------------------------------------------------------------------------
    def _create(self, tmp):
        import dask.array as da

        t, p = self.n_iterations, len(self.coords["tensor"])
        ct, cp = _chunking(p)
        lazy = lambda shape, chunks, dtype: da.zeros(shape, chunks=chunks, dtype=dtype)  # noqa: E731 - never computed
        data = {
            "lca": (("iteration", "parameter"), lazy((t, p), (ct, cp), np.float32)),
            "residual": (("iteration",), lazy(t, ct, np.float64)),
            "lca_rest": (("iteration",), lazy(t, ct, np.float64)),
            "splits": (("iteration",), lazy(t, ct, np.int32)),
            "evaluations": (("iteration",), lazy(t, ct, np.int32)),
            "loss": (("checkpoint",), lazy(t + 1, ct, np.float64)),
            "prefix_parameter": (("checkpoint", "parameter"), lazy((t + 1, p), (min(_PREFIX_ROWS, ct), cp), np.float64)),
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
        for by, dim in _GROUP_DIMS.items():
            labels = self.groups._groups(by)[1]
            data[f"prefix_{by}"] = (("checkpoint", dim), lazy((t + 1, len(labels)), (ct, len(labels)), np.float64))
            coords[dim] = np.asarray(labels).astype(object) if by != "total" else np.array(["total"], dtype=object)
        attrs = dict(self.inputs, **{KIND: "result", "format": FORMAT, "completed_iterations": 0, "completed_checkpoints": 0, "complete": False})
        ds = xr.Dataset(data, coords=coords, attrs=attrs)
        encoding = {v: {"chunks": ds[v].data.chunksize, "compressors": None} for v in data}
        ds.to_zarr(tmp, mode="w-", compute=False, consolidated=False, encoding=encoding, zarr_format=3)

    # -- buffers --------------------------------------------------------------------------------
    def _load_buffers(self, ckpts):
        ct, p = self.ct, len(self.coords["tensor"])
        self.b0 = (self.done // ct) * ct
        self.buf_it = {
            "lca": np.zeros((ct, p), np.float32), "residual": np.zeros(ct), "lca_rest": np.zeros(ct),
            "splits": np.zeros(ct, np.int32), "evaluations": np.zeros(ct, np.int32),
        }
        self.buf_ck = {"loss": np.full(ct + 1, np.nan), "prefix_parameter": np.zeros((ct + 1, p))}
        for by in _GROUP_DIMS:
            self.buf_ck[f"prefix_{by}"] = np.zeros((ct + 1, len(self.groups._groups(by)[1])))
        if self.done == 0 or self.complete:
            return
        n = self.done - self.b0  # rows of the current chunk already stored
        if n:
            for name, buf in self.buf_it.items():
                buf[:n] = self.arrays[name][self.b0 : self.done]
            for name, buf in self.buf_ck.items():
                buf[:n] = self.arrays[name][self.b0 : self.done]
            self._advance(n - 1)  # the next prefix row, rebuilt exactly as write() built it
        else:  # a chunk boundary: seed row 0 from the stored row before it
            prev = self.done - 1
            for name, buf in self.buf_ck.items():
                buf[self.ct] = self.arrays[name][prev]
            self.buf_it["lca"][self.ct - 1] = self.arrays["lca"][prev]
            self._advance(self.ct - 1, into=0)
        if ckpts >= self.done + 1:
            self.buf_ck["loss"][n] = self.arrays["loss"][self.done]

    def _advance(self, i, into=None):
        """Prefix row ``into`` (default i+1) of the buffer = prefix row i + the LCA of buffered iteration i."""
        j = i + 1 if into is None else into
        src = i if into is None else self.ct  # when seeding, the row before sits in the spare last row
        row = self.buf_it["lca"][i]
        np.add(self.buf_ck["prefix_parameter"][src], row, out=self.buf_ck["prefix_parameter"][j], dtype=np.float64)
        for by in _GROUP_DIMS:
            key = f"prefix_{by}"
            self.buf_ck[key][j] = self.buf_ck[key][src] + self.groups.group_sum(row[None], by)[0]

    # -- the sink protocol ----------------------------------------------------------------------
    def resume_from(self) -> int:
        return self.done

    def write_loss(self, k: int, value: float):
        # The loss at the snapshot a resumed run starts from was stored by the run before: recomputed, it must
        # agree. This catches what the recorded identity cannot see (a loss_fn or model changed under its name).
        stored = self.buf_ck["loss"][k - self.b0]
        if k and np.isfinite(stored) and not math.isclose(stored, value, rel_tol=1e-5, abs_tol=1e-8):
            raise ValueError(
                f"the store {self.path!r} holds loss {stored:.9g} at snapshot {k}, but resuming computes {value:.9g} there: "
                "the model, the data or loss_fn differ from the run that wrote it, although their names match. "
                "Use the same ones to continue it, or another store path to compute anew."
            )
        self.buf_ck["loss"][k - self.b0] = value

    def write(self, row):
        if row.t != self.done:
            raise RuntimeError(f"store sink got iteration {row.t} but expected {self.done}")
        i = row.t - self.b0
        self.buf_it["lca"][i] = row.lca.detach().to("cpu", torch.float32).numpy()
        self.buf_it["residual"][i], self.buf_it["lca_rest"][i] = row.residual, row.rest
        self.buf_it["splits"][i], self.buf_it["evaluations"][i] = row.splits, row.evaluations
        self.buf_ck["loss"][i + 1] = row.loss_end
        self._advance(i)
        self.done += 1
        if i + 1 == self.ct:
            # Checkpoint rows go one further (the loss and prefix after the chunk's last iteration), so every
            # completed iteration is readable whole; the next chunk rewrites that row's chunk entirely.
            self._flush(self.ct, self.ct + 1)
            for buf in self.buf_ck.values():  # the checkpoint row after the chunk opens the next one
                buf[0] = buf[self.ct]
            self.b0 += self.ct

    def _flush(self, n_it: int, n_ck: int, **extra):
        """Write buffered rows, fsync them, then (and only then) count them as completed."""
        b0 = self.b0
        try:
            for name, buf in self.buf_it.items():
                if n_it:
                    self.arrays[name][b0 : b0 + n_it] = buf[:n_it]
            for name, buf in self.buf_ck.items():
                if n_ck:
                    self.arrays[name][b0 : b0 + n_ck] = buf[:n_ck]
            for name in self.buf_it:
                _sync_rows(self.path, name, b0, b0 + n_it)
            for name in self.buf_ck:
                _sync_rows(self.path, name, b0, b0 + n_ck)
            update_attrs(self.path, completed_iterations=b0 + n_it, completed_checkpoints=b0 + n_ck, **extra)
        except OSError as exc:
            raise StoreWriteError(
                f"could not write iterations {b0}..{b0 + n_it - 1} to the store {self.path!r} ({type(exc).__name__}: {exc}). "
                f"Iterations 0..{b0 - 1} are saved there. Free space or fix the location, then run the same analyze(..., store=...) "
                "call again to continue from there."
            ) from exc
        self.stored = b0 + n_it

    def interrupted(self, done: int):
        """Keep what was computed: write the partial chunk (a later run rewrites it whole)."""
        self.stored = self.b0
        try:
            if done > self.b0 and not np.isnan(self.buf_ck["loss"][done - self.b0]):
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
        return (
            f"iterations 0..{n - 1} are saved in the store {self.path!r} (lca.open reads them); run the same call again to continue"
            if n else f"nothing was saved yet in {self.path!r}"
        )

    def finish(self) -> LCAResult:
        if not self.complete:
            t = self.n_iterations
            if self.done != t:
                raise RuntimeError(f"the store {self.path!r} holds {self.done} of {t} iterations; it cannot be finished yet")
            self._flush(
                t - self.b0, t - self.b0 + 1, complete=True,
                seconds=float(self._before["seconds"]) + self.seconds,
                gradient_evaluations=int(self._before["gradient_evaluations"]) + int(self.evaluations),
            )
            self.complete = True
        return open_store(self.path)


def open_store(path) -> LCAResult:
    """Open a result store lazily: from ``analyze(store=...)`` (complete or not) or :meth:`LCAResult.save`.

    Only the completed iterations are shown; every chunk file they need is checked first, so a
    damaged store fails here with a ValueError naming the file.

    >>> import lca_notebook as lca, tempfile, os
    >>> p = lca.LCAResult.example().save(os.path.join(tempfile.mkdtemp(), "r.zarr"))
    >>> open_store(p).lca.shape
    (3, 6)
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"no LCA result at {path!r}")
    attrs = read_attrs(path)
    kind = attrs.get(KIND)
    if kind == "trajectory":
        raise ValueError(f"{path!r} is a recorded trajectory, not an LCA result: give it to analyze() as the trajectory")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "no consolidated metadata": expected for a growing store
            ds = xr.open_zarr(path, consolidated=None if kind is None else False)
    except Exception as exc:  # zarr raises many types for a broken store; say which store, not where it broke
        raise ValueError(f"{path!r} is not a readable LCA store ({type(exc).__name__}: {exc})") from exc
    if kind == "result":
        n = min(int(attrs.get("completed_iterations", 0)), int(attrs.get("completed_checkpoints", 0)) - 1)
        if n < 0:
            raise ValueError(f"the store {path!r} holds no completed iteration yet; run analyze(..., store=...) to fill it")
        for name in _ITERATION_VARS:
            check_rows(path, name, n, "iteration")
        for name in _CHECKPOINT_VARS:
            check_rows(path, name, n + 1, "checkpoint")
        ds = ds.isel(iteration=slice(0, n), checkpoint=slice(0, n + 1))
    # Names are stored as variable-length strings (numpy's StringDType on read); the result's group
    # tables want plain fixed-width str, as in a result computed in memory.
    for name in ("tensor", "layer", *_GROUP_DIMS.values()):
        if name in ds.coords and ds[name].dtype.kind not in "U":
            ds = ds.assign_coords({name: (ds[name].dims, np.asarray(ds[name].values).astype(object).astype(str))})
    try:
        return LCAResult(ds)
    except ValueError as exc:
        raise ValueError(f"{path!r} is not an LCA result: {exc}") from exc


# -- trajectory stores (the recorder's) -----------------------------------------------------------
def _storage(dtype: torch.dtype):
    """(array key, numpy dtype) a tensor dtype is stored as; dtypes numpy lacks are kept bit for bit."""
    key = str(dtype).removeprefix("torch.")
    try:
        return key, torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:  # bfloat16, float8: store the raw bits
        return key, np.dtype({1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}[torch.empty(0, dtype=dtype).element_size()])


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
    layout, offsets = [], {}
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
        attrs = _refuse_foreign(self.path, "trajectory")
        if attrs is not None:
            if not overwrite:
                raise ValueError(f"{self.path!r} already holds a recorded trajectory; pass overwrite=True to replace it, or another path")
            shutil.rmtree(self.path)
        self.widths = _widths(layout)
        self.capacity = 64

        def create(tmp):
            root = zarr.open_group(tmp, mode="w-", zarr_format=3)
            for key, width in self.widths.items():
                chunk = max(1, min(width, 1 << 22))
                root.create_array(f"snapshots_{key}", shape=(self.capacity, width), chunks=(1, chunk), dtype=_storage(getattr(torch, key))[1],
                                  compressors=None, fill_value=0)
            root.create_array("steps", shape=(self.capacity,), chunks=(1024,), dtype=np.int64, compressors=None, fill_value=-1)
            update_attrs(tmp, **{KIND: "trajectory", "format": FORMAT, "tensors": layout, "n_snapshots": 0, "subset": subset})

        _create_atomically(self.path, create)
        self.arrays = {key: _open_array(self.path, f"snapshots_{key}") for key in self.widths}
        self.steps = _open_array(self.path, "steps")
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
        update_attrs_fast(self.path, n_snapshots=self.n)

    def close(self):
        for key in self.widths:
            _sync_rows(self.path, f"snapshots_{key}", 0, self.n)
        _sync_rows(self.path, "steps", 0, self.n)
        update_attrs(self.path, n_snapshots=self.n)


def update_attrs_fast(path: str, **changes):
    """Like :func:`update_attrs` (atomic rename) without fsync: survives a killed process, not a power cut."""
    meta_file = os.path.join(path, "zarr.json")
    with open(meta_file, encoding="utf-8") as f:
        meta = json.load(f)
    meta["attributes"].update(changes)
    tmp = f"{meta_file}.{uuid.uuid4().hex}.partial"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f)
    os.replace(tmp, meta_file)


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
            raise ValueError(f"{self.path!r} is not a recorded trajectory (its {KIND!r} attribute is {attrs.get(KIND)!r})")
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
        return f"recorded snapshot {k} (step {self.steps[k]}) in {self.path}"

    def load(self, k):
        rows = {}
        for key, arr in self.arrays.items():
            try:
                row = torch.from_numpy(np.asarray(arr[k]))
            except Exception as exc:
                raise ValueError(f"{self.describe(k)} cannot be read ({type(exc).__name__}: {exc}); the store is damaged") from exc
            target = getattr(torch, key)
            rows[key] = row if row.dtype == target else row.view(target)
        return {e["name"]: rows[e["key"]][e["offset"] : e["offset"] + math.prod(e["shape"])].view(e["shape"]) for e in self.layout}


