"""``analyze()``: the only module that knows every path from a trajectory to a result.

It checks the arguments, turns the trajectory into a :class:`~lca_notebook.Trajectory` (``sources``),
lays out the path (``layout``), reads the data once (``data``), picks where rows go (``sinks``: memory,
or a result store in ``storage``) and runs the engine, in this process or sharded over Dask
(``distributed``, imported only when ``client=`` is given).
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn.functional as F

from . import data as data_mod
from .engine import Evaluator, Options, SnapshotReader, fixed_function, run, warn_if_stuck
from .layout import Groups, build_spec, check_keep
from .result import LCAResult
from .sinks import MemorySink, Sink, resolve_keep
from .sources import POLL_SECONDS, Follower, as_trajectory
from .storage.files import local_path, read_attrs
from .storage.results import StoreSink
from .storage.trajectories import RecordedTrajectory
from .trajectory import stillness, unmoved


def analyze(
    model: torch.nn.Module,
    data,
    trajectory,
    *,
    loss_fn=None,
    method: str = "adaptive",
    tol: float = 1e-3,
    max_splits: int = 32,
    param_tol: float | None = None,
    batch_size: int | None = None,
    device=None,
    parameters=None,
    batchnorm: str = "eval",
    store=None,
    batched_points: bool = False,
    progress: bool = True,
    client=None,
    follow: bool = False,
    poll: float = POLL_SECONDS,
    timeout: float | None = None,
    keep: str = "parameter",
) -> LCAResult:
    """Loss Change Allocation of every parameter at every iteration of a recorded training run.

    ``LCA[t, i] = (theta_{t+1} - theta_t)_i * average over the segment of dL/dtheta_i``, with ``L``
    the mean of ``loss_fn`` over all of ``data``; summed over parameters it is the loss change of
    iteration ``t`` up to the quadrature error, reported per iteration as ``residual``.

    Parameters
    ----------
    model: the ``nn.Module`` that was trained. It is never modified (evaluated with
        ``torch.func.functional_call``).
    data: ``(inputs, targets)`` tensors, a ``Dataset``, a ``DataLoader`` or an iterable of
        ``(inputs, targets)`` batches. The gradient is that of the mean loss over all of it.
    trajectory: T+1 snapshots (``state_dict``\\ s or dicts of parameters), a :class:`Trajectory`,
        a recorder from :func:`lca_notebook.record`, or a directory / list of checkpoint files.
    loss_fn: ``loss_fn(outputs, targets) -> scalar mean``; default cross-entropy. Any loss works.
        For batches holding their labels (``{"input_ids": ..., "labels": ...}``, Hugging Face), the default
        is the model's own ``outputs.loss``, batches weighted by their labels that are not -100 (for a
        causal LM, ``labels[..., 1:]``); a ``loss_fn`` given then gets ``(outputs, labels)``.
    method: "adaptive" (default; Simpson refined until ``|residual| <= tol`` or ``max_splits``
        pieces), "simpson" (alias "rk4"), "trapezoid" or "first_order".
    param_tol: adaptive only: also refine (at least once) until every parameter's estimated LCA error is
        <= param_tol, in loss units, or ``max_splits``. The estimate comes from the levels refinement computes
        anyway (``quadrature.simpson_error``). The sum meeting ``tol`` says nothing of single parameters,
        whose errors cancel in it. Each iteration's largest estimate is the result's ``error``.
    batch_size: split the data into batches of this size (memory only; the result does not change, except
        with ``batchnorm="batch"``, whose statistics are those of each batch).
    device: where to compute (default: the model's device).
    parameters: glob patterns (``"fc1.*"``) restricting which parameters get LCA; the others'
        share goes into ``lca_rest``.
    batchnorm: "eval" (running statistics of each snapshot, interpolated along the segment, their
        share of the loss change in ``lca_rest``) or "batch" (batch statistics of each data batch).
    store: path of a zarr store to stream the result into (resumable); the result is opened lazily.
    batched_points: evaluate several quadrature points in one ``torch.func.vmap`` call (Simpson's end
        and midpoint together; adaptive's new points together). Same numbers to float rounding; faster
        where one point does not fill the device (small models on a GPU). Needs a vmap-able model.
    progress: show a tqdm progress bar.
    client: a ``dask.distributed.Client`` (or a :class:`lca_notebook.distributed.Sharding` around one, to
        set the shard size): shard the iterations over its workers, each writing its rows of ``store``
        (required); same result. See :mod:`lca_notebook.distributed`.
    follow: the trajectory is a recorder store still being written (``lca.record(..., path=...)`` in this
        process or another, even on another machine sharing the file system): compute each iteration as soon
        as its snapshot is on disk, and return once the recorder has closed the store and every iteration is
        done; the same result as a plain run on the finished recording. Needs ``store=``: the rows computed
        so far are readable there at every moment (``lca.open``, ``lca.explore(store, follow=True)``). If the
        recorder dies, a :class:`~lca_notebook.RecordingError` names its last complete snapshot; the store keeps
        every iteration computed, and the same call without ``follow`` finishes it.
    poll: with ``follow``, seconds between looks at the recorder store (default ``sources.POLL_SECONDS``).
    timeout: with ``follow``, seconds to wait for the next snapshot before a ``TimeoutError`` (None: no limit).
    keep: what the result keeps. "parameter" (default): every parameter's LCA at every iteration (``lca``,
        T x P float32). "unit", "tensor" or "layer": each iteration's LCA is reduced as it is computed, so
        (iteration, parameter) never exists: per-iteration sums at that granularity and every coarser one,
        exact counts of parameters that helped / hurt / did not move per group (``fractions`` equal a
        "parameter" run's), and per-parameter totals over the run with counts of iterations helped
        (``result.parameter_total()``, ``result.iterations_helped()``). What needs every parameter at every
        iteration raises a ``ReducedResultError`` naming ``keep=``. "auto": the finest whose store fits
        ``lca_notebook.sinks.KEEP_BUDGET`` (bytes, default 4 GiB; settable). Memory, ``store=``, resume and
        ``client=`` all honour it (a store continues only with the ``keep`` it was computed with).

    Example
    -------
    >>> import torch, lca_notebook as lca
    >>> model = torch.nn.Linear(4, 3)
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> snaps = [{k: v.clone() for k, v in model.state_dict().items()}]
    >>> for _ in range(5):
    ...     opt.zero_grad(); torch.nn.functional.cross_entropy(model(x), y).backward(); opt.step()
    ...     snaps.append({k: v.clone() for k, v in model.state_dict().items()})
    >>> result = lca.analyze(model, (x, y), snaps, progress=False)
    >>> result.lca.shape
    (5, 15)
    >>> bool(abs(result.residual).max() < 1e-3)
    True
    """
    if keep != "auto":
        check_keep(keep)  # before anything is read or computed
    loss_given, loss_fn = loss_fn, loss_fn or F.cross_entropy
    data_mod.check_loss_fn(loss_fn)
    options = Options(
        method=method, tol=tol, max_splits=max_splits, param_tol=param_tol, batchnorm=batchnorm,
        batched_points=batched_points,
        loss_fn=getattr(loss_fn, "__qualname__", type(loss_fn).__name__), model=type(model).__name__,
    )  # fmt: skip
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    follower = _follower(trajectory, store, client, poll, timeout) if follow else None
    traj = follower.open(upto=_stored_snapshots(store)) if follower is not None else as_trajectory(trajectory)
    grown = None  # a recorder store that grew past the snapshots a result store was computed from: continue, grow
    m = _stored_snapshots(store) if follower is None and isinstance(traj, RecordedTrajectory) else None
    if m is not None and m < len(traj):
        grown, traj = traj, RecordedTrajectory(traj.path, upto=m)  # type: ignore[attr-defined]
    if len(traj) < 2:
        raise ValueError(
            f"the trajectory has {len(traj)} snapshot(s): LCA needs at least two (T+1 snapshots give T iterations)"
        )
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    if device.type == "meta":
        raise ValueError(
            "the model is on the meta device (its tensors hold no values; built under torch.device('meta') or "
            "init_empty_weights) and nothing can be computed there: pass device='cpu' or 'cuda' (the snapshots give "
            "the tensors their values), or load the model's weights first"
        )
    first, last = traj[0], traj[len(traj) - 1]
    spec = build_spec(
        model, first, parameters=parameters, batchnorm=batchnorm, where=traj.describe(0), last=last,
        subset=traj.subset,
    )  # fmt: skip
    keep = resolve_keep(keep, Groups.of(spec), len(traj) - 1) if keep == "auto" else keep
    if (why := stillness(traj, first, last) if follower is None else None) is not None:
        warnings.warn(why, stacklevel=2)
    _warn_if_half_precision(model)
    batches = data_mod.batches(data, batch_size=batch_size, device=device)
    if loss_given is None and data_mod.labels_inside(batches[0].kwargs):  # labels inside: the model's own loss
        loss_fn = data_mod.model_loss(model)
        options = Options(**{**options.__dict__, "loss_fn": "model_loss"})
    options = Options(**{**options.__dict__, "n_samples": data_mod.n_samples(batches)})
    if client is not None:  # dask.distributed is imported on this path only
        from .distributed import run_sharded

        return run_sharded(
            client, model, batches, traj, spec, options, store=store, loss_fn=loss_fn, device=device,
            progress=progress, data_fingerprint=data_mod.fingerprint(batches), keep=keep,
        )  # fmt: skip
    sink: Sink
    if store is not None:
        sink = StoreSink(
            store,
            spec=spec,
            traj=traj,
            data_fingerprint=data_mod.fingerprint(batches),
            options=options,
            batches=batches,
            keep=keep,
        )
    else:
        sink = MemorySink(spec, len(traj), options, steps=traj.steps, keep=keep)
    with fixed_function(model, batchnorm):
        evaluate = Evaluator(model, batches, loss_fn, spec, device, batchnorm)
        reading = getattr(sink, "trajectory", traj)  # a store hashes each snapshot as it is read, to check on resume
        if grown is not None and not getattr(sink, "complete", True):
            traj.refresh()  # type: ignore[attr-defined]  # a RecordedTrajectory (grown is set only then)
            sink.grow()  # type: ignore[union-attr]
        more = _more(follower, sink) if follower is not None and not getattr(sink, "complete", False) else None
        run(evaluate, SnapshotReader(reading, spec, device), sink, options, progress=progress, more=more)
    result = sink.finish()
    if why is None and (why := unmoved(result.loss.values, result.residual.values)) is not None:
        warnings.warn(why, stacklevel=2)
    warn_if_stuck(result.residual.values, result.splits.values, options, error=result.error.values)
    return result


def _follower(trajectory, store, client, poll, timeout) -> Follower:
    if client is not None:
        raise ValueError("follow=True computes in this process as the snapshots arrive; leave out client=")
    if store is None:
        raise ValueError(
            "follow=True needs store=PATH: the result grows there, readable while it is computed "
            "(lca.explore(PATH, follow=True)), and is kept if the recorder stops"
        )
    path = getattr(trajectory, "path", trajectory)  # a recorder with path=, or the store's path
    if not (isinstance(path, str) or hasattr(path, "__fspath__")):
        raise TypeError(
            f"follow=True follows a recorder store: give its path (lca.record(..., path=PATH)), not a "
            f"{type(trajectory).__name__}"
        )
    return Follower(path, poll=poll, timeout=timeout)


def _stored_snapshots(store) -> int | None:
    """The snapshots an unfinished result store was computed from: it is continued from there, then grown to
    the recording's snapshots (its recorder was followed, and the follower stopped while it recorded on)."""
    if store is None:
        return None
    try:
        attrs = read_attrs(local_path(store))
    except (FileNotFoundError, NotADirectoryError):
        return None
    n = attrs.get("n_snapshots")
    if attrs.get("complete") is not False or attrs.get("saved"):
        return None
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 2 else None


#: With ``follow=True``, rows computed are written to the store (readable by ``lca.open``, an explorer) at most
#: this often, in seconds: while the follower waits for the recorder, and while it catches up.
SHOW_SECONDS = 1.0


def _more(follower: Follower, sink):
    """``engine.run``'s ``more``: wait for snapshot k, growing the store to the snapshots recorded. Readers see
    the rows computed so far within about ``SHOW_SECONDS``; a dead recorder's last snapshots are counted
    first, so a plain analyze continues the store."""
    shown = [time.monotonic()]

    def show():  # at most every SHOW_SECONDS: each flush fsyncs a chunk of every array
        if time.monotonic() - shown[0] >= SHOW_SECONDS:
            sink.grow()
            sink.flush()
            shown[0] = time.monotonic()

    follower.on_wait = show

    def more(k: int) -> bool:
        try:
            return follower.wait(k)
        finally:
            if k > sink.n_iterations:
                sink.grow()
            show()

    return more


def _warn_if_half_precision(model: torch.nn.Module):
    low = sorted(
        {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)}
    )
    if low:
        warnings.warn(
            f"the model computes in {' and '.join(low)}: its loss is rounded to 3-4 significant digits, so loss "
            "changes and residuals below that are rounding noise (and adaptive may never reach tol). For exact sums "
            "analyze a float32 copy on the same snapshots: lca.analyze(copy.deepcopy(model).float(), data, trajectory)",
            stacklevel=3,
        )
