"""LCA sharded over iterations on Dask workers, written straight into one result store.

Once the trajectory is recorded, iterations are independent: a shard ``[a, b)`` needs only snapshots
``a..b`` and the data. Each shard is one Dask task that evaluates snapshot ``a``'s gradient itself
(one evaluation more than a single process spends: ``2T + shards`` full-data gradients for Simpson,
``T + shards`` for first order and trapezoid) and writes its rows of the zarr store. Shards are whole
chunks of the store's iteration axis, so two tasks never write the same chunk file.

Prefix sums (``prefix_parameter``, ``prefix_unit``, ...) are a running sum, so they are one short task
per shard run in order, each starting from the row the previous one stored: the same float64
additions in the same order as the single-process store (both call
:meth:`~lca_notebook.sinks.PrefixBlock.advance`), so the store is bit for bit the one a single process
writes, provided workers and driver run the same torch build with the same number of intra-op threads
(``Sharding.torch_threads``, default 1: a matmul's summation order can depend on it; a 2-thread process
and 1-thread workers differ by about 1e-9).

Only the driver writes the store's root attributes: the shard plan, which shards are computed, and
(as the prefix chain advances) ``completed_iterations`` / ``completed_checkpoints`` with the same
meaning as a single-process store, so :func:`lca_notebook.open` reads a half-done sharded store and
``analyze(store=...)`` without a client can finish it. A task lost with its worker is recomputed by
Dask; a task that raises is retried ``retries`` times; a rerun of the same call after a crash
computes only the shards not recorded as done.

What travels to the workers (with ``cloudpickle``): the model, ``loss_fn``, the data (read once into
batches, shipped once per worker) and the trajectory. A list of state_dicts (or an in-memory
recorder) is cut into per-shard windows; checkpoint files and recorder stores travel as paths and
must be on a filesystem every worker sees, as must the result store.
"""

from __future__ import annotations

import copy
import math
import time
import uuid
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

try:
    import cloudpickle
    from dask.distributed import Client, Future, as_completed
    from distributed import KilledWorker
except ImportError as exc:  # pragma: no cover - distributed is an optional dependency
    raise ImportError(
        f"sharding LCA over Dask needs dask.distributed ({exc}); install it with: pip install distributed"
    ) from exc

import contextlib

from . import heap
from .checkpoints import CheckpointFiles
from .engine import Evaluator, Options, SnapshotReader, fixed_function, iterate, warn_if_stuck
from .layout import Groups, PathSpec
from .record import Recorder
from .sinks import PrefixBlock, Rows, iteration_vars, lca_dtype
from .storage.files import Arrays, open_array, read_attrs, update_attrs
from .storage.results import HASH_VAR, PREFIX_VARS, HashingTrajectory, StoreSink, open_store
from .storage.trajectories import RecordedTrajectory
from .trajectory import SnapshotList, Trajectory

__all__ = ["Sharding", "plan_shards"]


@dataclass
class Sharding:
    """How ``analyze(..., client=...)`` shards: pass one as ``client=`` to change the defaults.

    ``shard_iterations``: iterations per Dask task, rounded up to whole chunks of the store (default: one
    chunk, or more when that leaves at least four shards per worker thread). ``retries``: how often a
    task that raised is run again. ``torch_threads``: torch intra-op threads inside each task (Dask
    already runs one task per worker thread). ``tune_malloc``: undo, inside each worker process, the
    ``MALLOC_TRIM_THRESHOLD_=65536`` that Dask's nanny starts workers with (see :func:`lca_notebook.heap.tune_worker`).
    """

    client: Client
    shard_iterations: int | None = None
    retries: int = 1
    torch_threads: int = 1
    tune_malloc: bool = True


def plan_shards(
    n_iterations: int, chunk: int, shard_iterations: int | None = None, n_threads: int = 1
) -> list[tuple[int, int]]:
    """Contiguous ``[a, b)`` ranges covering ``range(n_iterations)``, each a whole number of ``chunk`` s.

    >>> plan_shards(10, 4)
    [(0, 4), (4, 8), (8, 10)]
    >>> plan_shards(200, 8, shard_iterations=50)
    [(0, 56), (56, 112), (112, 168), (168, 200)]
    """
    if shard_iterations is None:
        per = max(1, n_iterations // (chunk * 4 * max(1, n_threads)))  # >= 4 shards per thread when T allows
    else:
        if not (isinstance(shard_iterations, int) and shard_iterations >= 1):
            raise ValueError(f"shard_iterations must be a positive int, got {shard_iterations!r}")
        per = math.ceil(shard_iterations / chunk)
    size = per * chunk
    return [(a, min(a + size, n_iterations)) for a in range(0, n_iterations, size)]


# -- what the tasks get ----------------------------------------------------------------------------
class _Window(Trajectory):
    """Snapshots ``first..last`` of an in-memory trajectory, under their global indices (one shard's share)."""

    def __init__(self, snapshots: dict, n: int, names: dict):
        self.snapshots, self.n, self.names = snapshots, n, names

    def __len__(self):
        return self.n

    def load(self, k):
        try:
            return self.snapshots[k]
        except KeyError:
            raise IndexError(
                f"snapshot {k} was not sent with this shard (it has {min(self.snapshots)}..{max(self.snapshots)})"
            ) from None

    def describe(self, k):
        return self.names.get(k, f"snapshot {k}")


class _Reopen:
    """A trajectory that travels as a path and is opened again on the worker (a recorder store)."""

    def __init__(self, path):
        self.path = path

    def open(self):
        return RecordedTrajectory(self.path)


@dataclass
class _Job:
    """Everything the tasks share; shipped once per worker, never written by a task."""

    model: torch.nn.Module
    batches: list
    loss_fn: object
    spec: PathSpec
    coords: dict
    path: str
    n_iterations: int
    chunk: int
    options: Options
    device: str
    torch_threads: int
    tune_malloc: bool = True
    trajectory: object = None  # None: each task gets its own _Window
    keep: str = "parameter"
    _cache: dict = field(default_factory=dict, repr=False)

    def traj(self, window):
        if window is not None:
            return window
        t = self.trajectory
        return t.open() if isinstance(t, _Reopen) else t

    def on_device(self):
        if "batches" not in self._cache:  # one copy per worker process, kept for its later tasks
            dev = torch.device(self.device)
            self._cache["batches"] = self.batches if dev.type == "cpu" else [b.to(dev) for b in self.batches]
        return self._cache["batches"]

    def groups(self):
        if "groups" not in self._cache:
            self._cache["groups"] = Groups.of(self.spec, self.coords)
        return self._cache["groups"]


def _load_job(payload: bytes) -> _Job:
    return cloudpickle.loads(payload)


def _where(a, b) -> str:
    try:
        from distributed import get_worker

        worker = f" on Dask worker {get_worker().address}"
    except ValueError:
        worker = ""
    return f"the Dask task for iterations {a}..{b - 1}{worker}"


# -- the tasks -----------------------------------------------------------------------------------
def _compute_shard(job: _Job, a: int, b: int, window) -> dict:
    """Compute iterations ``[a, b)`` and write their rows (and losses ``a..b-1``; ``..T`` for the last shard)."""
    torch.set_num_threads(job.torch_threads)
    if job.tune_malloc:
        heap.tune_worker()
    t0 = time.perf_counter()
    model = copy.deepcopy(
        job.model
    )  # functional_call swaps a module's tensors: one copy per task, threads never share it
    device = torch.device(job.device)
    ct = job.chunk
    arrays = Arrays(job.path, (*iteration_vars(job.keep), "loss", HASH_VAR))
    reduced = job.keep != "parameter"
    rows = Rows(ct, job.spec.n_selected, lca_dtype(job.spec), job.keep, job.groups() if reduced else None)
    totals = rows.totals  # with keep coarser: added to by rows.put
    stop_loss = job.n_iterations + 1 if b == job.n_iterations else b  # loss[b] is the next shard's (its chunk)
    loss = np.full(stop_loss - a, np.nan)
    try:
        with fixed_function(model, job.options.batchnorm):
            evaluate = Evaluator(model, job.on_device(), job.loss_fn, job.spec, device, job.options.batchnorm)
            hashing = HashingTrajectory(job.traj(window), job.spec)  # each snapshot's hash, as a plain run keeps
            read = SnapshotReader(hashing, job.spec, device)
            loss[0], steps = iterate(evaluate, read, a, b, job.options)
            c0 = a
            for row in steps:
                i = row.t - c0
                rows.put(i, row)
                if row.t + 1 - a < len(loss):
                    loss[row.t + 1 - a] = row.loss_end
                if i + 1 == ct or row.t + 1 == b:  # a whole chunk (or the shard's end): write it
                    arrays.write(c0, rows.head(i + 1))
                    c0 = row.t + 1
        hashes = np.array([hashing.hashes.get(k, 0) for k in range(a, stop_loss)], dtype=np.uint64)
        arrays.write(a, {"loss": loss, HASH_VAR: hashes})
    except BaseException as exc:
        if hasattr(exc, "add_note"):
            exc.add_note(f"lca_notebook: in {_where(a, b)}")
        raise
    out: dict[str, object] = {
        "start": a, "stop": b, "evaluations": evaluate.evaluations, "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    if totals is not None:  # a reduced store: the shard's per-parameter totals travel to its chain task
        out |= {"total": totals.total, "helped": totals.helped}
    return out


def _prefix_shard(job: _Job, a: int, b: int, computed, previous, slot: int = 0) -> int:
    """Prefix rows ``a..b`` from the stored row ``a`` and the shard's LCA rows.

    ``computed`` (this shard's compute task) and ``previous`` (the prefix task before) are passed so that
    Dask runs this after both: the prefix tasks form one chain, so none ever writes beside another. A reduced
    store (``keep=``) has no prefix arrays: the chain adds the shard's per-parameter totals (``computed``) to
    those at ``a`` (in ``slot``) and writes them to the other slot, which the driver then counts.
    """
    if job.keep != "parameter":
        return _totals_shard(job, a, b, computed, slot)
    arrays = Arrays(job.path, ("lca", *PREFIX_VARS.values(), "prefix_parameter"))
    try:
        # Row 0 is zeros (an unwritten chunk reads as the fill value, NaN); any later row a was stored by the task
        # before, and a (a chunk boundary) has its parameter prefix row.
        start = None
        if a:
            start = {by: np.asarray(arrays[name][a], dtype=np.float64) for by, name in PREFIX_VARS.items()}
            start["parameter"] = np.asarray(arrays["prefix_parameter"][a // job.chunk], dtype=np.float64)
        for c0 in range(a, b, job.chunk):
            c1 = min(c0 + job.chunk, b)
            block = PrefixBlock(job.groups(), c1 - c0)
            if start is not None:
                block.seed(start)
            boundary = block.parameter.copy()
            for i, row in enumerate(np.asarray(arrays["lca"][c0:c1])):
                block.advance(i, row)
            arrays.write(c0, {name: block.rows[by] for by, name in PREFIX_VARS.items()})
            ends = [boundary] + ([block.parameter] if c1 - c0 == job.chunk else [])
            arrays.write(c0 // job.chunk, {"prefix_parameter": np.stack(ends)})
            start = block.last(c1 - c0)
    except BaseException as exc:
        if hasattr(exc, "add_note"):
            exc.add_note(f"lca_notebook: in {_where(a, b)} (prefix sums)")
        raise
    return b


def _totals_shard(job: _Job, a: int, b: int, computed: dict, slot: int) -> int:
    arrays = Arrays(job.path, ("parameter_total", "parameter_helped"))
    try:
        total, helped = np.array(computed["total"], dtype=np.float64), np.array(computed["helped"], dtype=np.int32)
        if a:  # the totals over [0, a), counted with completed_iterations == a
            total = np.asarray(arrays["parameter_total"][slot], dtype=np.float64) + total
            helped = np.asarray(arrays["parameter_helped"][slot], dtype=np.int32) + helped
        arrays.write(1 - slot, {"parameter_total": total[None], "parameter_helped": helped[None]})
    except BaseException as exc:
        if hasattr(exc, "add_note"):
            exc.add_note(f"lca_notebook: in {_where(a, b)} (per-parameter totals)")
        raise
    return b


# -- the driver ----------------------------------------------------------------------------------
def _picklable(what: str, obj, hint: str):
    try:
        return cloudpickle.dumps(obj)
    except Exception as exc:
        raise TypeError(
            f"{what} cannot be sent to the Dask workers: pickling it failed ({type(exc).__name__}: {exc}). {hint}"
        ) from exc


def _ship_trajectory(traj):
    """(object every task gets, or None to send per-shard windows of snapshots)."""
    if isinstance(traj, Recorder):
        if traj.path is None:
            return None
        traj.flush()
        return _Reopen(traj.path)
    if isinstance(traj, RecordedTrajectory):
        return _Reopen(traj.path)
    if isinstance(traj, (SnapshotList, CheckpointFiles)):
        return None if isinstance(traj, SnapshotList) else traj
    _picklable(
        f"the trajectory ({type(traj).__name__})",
        traj,
        "Give a list of state_dicts, checkpoint files, or a recorder store path (lca.record(..., path=...)).",
    )
    return traj


def _window(traj, a: int, b: int) -> _Window:
    return _Window({k: traj[k] for k in range(a, b + 1)}, len(traj), {k: traj.describe(k) for k in range(a, b + 1)})


def _progress_attrs(computed: set, chained: int, n_iterations: int) -> dict:
    """``completed_iterations`` / ``completed_checkpoints`` with a single-process store's meaning.

    Iterations ``[0, chained)`` have their rows and prefix sums (prefix row ``chained`` included); the loss
    at checkpoint ``chained`` belongs to the shard starting there, so that row counts only once it is computed.
    """
    whole = chained > 0 and (chained == n_iterations or chained in computed)
    return {"completed_iterations": chained, "completed_checkpoints": chained + 1 if whole else chained}


def run_sharded(
    client, model, batches, traj, spec, options: Options, *, store, loss_fn, device, progress, data_fingerprint,
    keep: str = "parameter",
):  # fmt: skip
    """The ``client=`` path of :func:`lca_notebook.analyze`, after its checks: shard, submit, record, finish."""
    from tqdm.auto import tqdm

    sharding = client if isinstance(client, Sharding) else Sharding(client)
    client = sharding.client
    if not isinstance(client, Client):
        raise TypeError(
            "client must be a dask.distributed.Client (or a lca_notebook.distributed.Sharding), got "
            f"{type(client).__name__}"
        )
    if store is None:
        raise ValueError(
            "analyze(..., client=...) needs store=PATH: the workers write their shards there, so it must be a path "
            "every "
            "worker can reach (a shared filesystem)"
        )
    # Refuse what cannot travel before anything is created or computed.
    _picklable(
        f"the model ({type(model).__name__})",
        model,
        "Define its class in an importable module or in the notebook itself.",
    )
    _picklable(
        f"loss_fn ({getattr(loss_fn, '__qualname__', type(loss_fn).__name__)})",
        loss_fn,
        "Use a module-level function, or one that captures no open files, locks or GPU handles.",
    )
    shipped = _ship_trajectory(traj)
    t_start = time.perf_counter()
    sink = StoreSink(
        store, spec=spec, traj=traj, data_fingerprint=data_fingerprint, options=options, keep=keep, batches=batches
    )
    if sink.complete:
        return open_store(sink.path)
    path, T, ct = sink.path, sink.n_iterations, sink.ct
    attrs = read_attrs(path)
    record = attrs.get("shards") or {}
    if record.get("chunk") == ct and record.get("bounds"):
        plan = [tuple(x) for x in record["bounds"]]  # a resumed run keeps the store's plan
    else:
        n_threads = sum(client.nthreads().values()) or 1
        plan = plan_shards(T, ct, sharding.shard_iterations, n_threads)
        record = {"chunk": ct, "bounds": [list(x) for x in plan], "computed": {}}
    done_before = int(attrs.get("completed_iterations", 0))  # contiguous, prefix sums included (maybe by a plain run)
    computed = {int(a) for a in record["computed"]} | {a for a, b in plan if b <= done_before}
    chained = max([b for a, b in plan if b <= done_before], default=0)
    if keep != "parameter":  # a shard's per-parameter totals live only in its task's result: not yet chained, recompute
        computed = {a for a in computed if dict(plan)[a] <= chained}
        record["computed"] = {k: v for k, v in record["computed"].items() if int(k) in computed}
    slot_at = {chained: sink.slot}  # reduced: the totals slot holding iterations [0, chained)
    update_attrs(path, shards=record, **_progress_attrs(computed, chained, T))

    job = _Job(
        model=model,
        batches=[b.to("cpu") for b in batches],
        loss_fn=loss_fn,
        spec=spec,
        coords=sink.coords,
        path=path,
        n_iterations=T,
        chunk=ct,
        options=options,
        device=str(device),
        torch_threads=sharding.torch_threads,
        tune_malloc=sharding.tune_malloc,
        trajectory=shipped,
        keep=keep,
    )
    payload = _picklable("the data", job, "Give the data as (inputs, targets) tensors.")
    tag = uuid.uuid4().hex[:8]
    compute_f: dict[int, Future] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*[Ll]arge.*graph.*"
        )  # the job and snapshot windows travel with their tasks
        # The job is a task's result, not scattered data: if every worker holding it dies, Dask computes it again.
        job_f = client.submit(_load_job, payload, key=f"lca-job-{tag}", pure=False)
        for a, b in plan:
            if a not in computed:
                window = _window(traj, a, b) if shipped is None else None
                compute_f[a] = client.submit(
                    _compute_shard,
                    job_f,
                    a,
                    b,
                    window,
                    key=f"lca-shard-{a}-{b}-{tag}",
                    retries=sharding.retries,
                    pure=False,
                )
    chain_f: dict[int, Future] = {}
    previous = None
    for a, b in plan:
        if b <= chained:
            continue
        slot_at[b] = 1 - slot_at[a]
        previous = chain_f[a] = client.submit(
            _prefix_shard,
            job_f,
            a,
            b,
            compute_f.get(a),
            previous,
            slot_at[a],
            key=f"lca-prefix-{a}-{b}-{tag}",
            retries=sharding.retries,
            priority=10,
            pure=False,
        )
    owner = {f.key: ("compute", a) for a, f in compute_f.items()} | {f.key: ("prefix", a) for a, f in chain_f.items()}
    bounds = dict(plan)
    bar = tqdm(
        total=T,
        initial=sum(b - a for a, b in plan if a in computed),
        desc="LCA shards",
        unit="it",
        disable=not progress,
        leave=False,
    )
    first_error = None
    try:
        for fut in as_completed([*compute_f.values(), *chain_f.values()]):
            kind, a = owner[fut.key]
            try:
                value = fut.result()
            except Exception as exc:
                if first_error is None:  # later ones are this one again, passed on to the prefix tasks after it
                    first_error = _explain(exc, kind, a, bounds[a])
                continue
            if kind == "compute":
                computed.add(a)
                record["computed"][str(a)] = {
                    "evaluations": int(value["evaluations"]),
                    "seconds": round(value["seconds"], 3),
                }
                bar.update(bounds[a] - a)
            else:
                chained = max(chained, value)
            slot = {"parameter_slot": slot_at[chained]} if keep != "parameter" else {}
            update_attrs(path, shards=record, **_progress_attrs(computed, chained, T), **slot)
    except BaseException as exc:  # Ctrl-C in the driver: stop the workers, keep what is recorded
        client.cancel([job_f, *compute_f.values(), *chain_f.values()])
        _note_kept(exc, path, chained, computed, plan)
        raise
    finally:
        bar.close()
    if first_error is not None:
        client.cancel([job_f, *compute_f.values(), *chain_f.values()])
        _note_kept(first_error, path, chained, computed, plan)
        raise first_error
    client.cancel([job_f])
    evaluations = sum(int(v["evaluations"]) for v in record["computed"].values())
    plain = [(a, b) for a, b in plan if str(a) not in record["computed"]]  # finished by a run without a client
    if plain:
        ev = open_array(path, "evaluations")
        evaluations += sum(int(np.asarray(ev[a:b]).sum()) + 1 for a, b in plain)
    update_attrs(
        path,
        shards=record,
        completed_iterations=T,
        completed_checkpoints=T + 1,
        complete=True,
        seconds=float(attrs.get("seconds", 0.0)) + time.perf_counter() - t_start,
        gradient_evaluations=evaluations,
    )
    result = open_store(path)
    warn_if_stuck(result.residual.values, result.splits.values, options, stacklevel=4, error=result.error.values)
    return result


def _explain(exc: BaseException, kind: str, a: int, b: int) -> BaseException:
    if isinstance(exc, KilledWorker):
        err = RuntimeError(
            f"the Dask task for iterations {a}..{b - 1} ({kind}) was running on every worker that died while it ran "
            f"({exc}). "
            "If the workers ran out of memory, give analyze a smaller batch_size, fewer threads per worker, or a "
            "smaller "
            "shard (lca_notebook.distributed.Sharding(client, shard_iterations=...))."
        )
        err.__cause__ = exc
        return err
    return exc


def _note_kept(exc: BaseException, path: str, chained: int, computed: set, plan):
    if not hasattr(exc, "add_note"):
        return
    others = sorted(a for a in computed if a >= chained)
    extra = f"; shards starting at iterations {others} are computed too" if others else ""
    kept = (
        f"iterations 0..{chained - 1} are complete in the store {path!r}"
        if chained
        else f"no iteration is complete yet in {path!r}"
    )
    exc.add_note(f"lca_notebook: {kept}{extra}. Run the same call again to compute only the missing shards.")
    if chained:
        with contextlib.suppress(Exception):
            exc.partial_result = open_store(path)  # type: ignore[attr-defined]
