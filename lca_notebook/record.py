"""Recording a trajectory while a model trains: an optimizer step hook, and a background writer.

The recorder snapshots the model's ``state_dict`` (parameters and buffers) when it starts (before the
first ``optimizer.step()``) and after every ``every``-th one. In memory it keeps CPU copies; with a
``path`` it copies the tensors to CPU in the training thread (cheap: one concatenation per dtype) and
hands them to a writer thread through a bounded queue, so training waits on the disk only when the
disk is slower than training for longer than the queue is deep.
"""

from __future__ import annotations

import fnmatch
import queue
import threading
import warnings

import torch

from .errors import RecordingError
from .storage.files import local_path, refuse_foreign
from .storage.trajectories import RecordedTrajectory, TrajectoryWriter, make_layout, pack
from .trajectory import Trajectory

_QUEUE_BYTES = 256 << 20  # at most this much of snapshots waits for the disk


class Recorder(Trajectory):
    """A trajectory recorded from an optimizer's steps; use it as a context manager around training.

    >>> import torch, lca_notebook as lca
    >>> model = torch.nn.Linear(4, 3)
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with lca.record(model, opt) as rec:
    ...     for _ in range(4):
    ...         opt.zero_grad(); torch.nn.functional.cross_entropy(model(x), y).backward(); opt.step()
    >>> len(rec), rec.steps
    (5, [0, 1, 2, 3, 4])
    >>> lca.analyze(model, (x, y), rec, progress=False).lca.shape
    (4, 15)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        path=None,
        every: int = 1,
        parameters=None,
        *,
        overwrite: bool = False,
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not hasattr(optimizer, "register_step_post_hook"):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.model, self.optimizer, self.every = model, optimizer, every
        self.path = local_path(path) if path is not None else None
        self.patterns = (
            [parameters] if isinstance(parameters, str) else (list(parameters) if parameters is not None else None)
        )
        self.overwrite = overwrite
        # Fail now, not at the first snapshot, if the path is taken.
        if self.path is not None and refuse_foreign(self.path, "trajectory") is not None and not overwrite:
            raise ValueError(
                f"{self.path!r} already holds a recorded trajectory; pass overwrite=True to replace it, or another path"
            )
        self._snapshots: list[dict] = []
        self._unrecorded: dict = {}  # with parameters=: the other floating tensors at the start
        self._steps: list[int] = []
        self._step = 0  # optimizer steps seen
        self._handles: list = []
        self._writer: _Writer | None = None
        self._reader: RecordedTrajectory | None = None
        self._layout: list[dict] = []
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> Recorder:
        """Hook the optimizer (``with`` does it for you)."""
        if self._handles:
            return self
        if self._closed and self.path is not None:
            raise RecordingError(
                f"this recorder finished its recording in {self.path!r} when its `with` block ended; a closed "
                "recording on disk is not continued. Keep one `with lca.record(...)` around all of the training, or "
                "record the rest with a new lca.record(model, optimizer, path=...) at another path"
            )
        if self._closed and self._steps and self._changed_since_last():
            warnings.warn(
                "the model changed since this recorder's last snapshot (steps taken outside its `with` block): the "
                "next snapshot's iteration spans them all, and they are not counted in `steps`",
                stacklevel=3,
            )
        self._closed = False
        if not self._steps:  # theta_0, before any forward pass moves BatchNorm's running statistics
            self._snapshot(0)
            if self.subset:  # what is not recorded must stay fixed: keep it to check on close
                recorded = {id(v) for v in self._state().values()}  # a tied tensor is recorded under any name
                self._unrecorded = {
                    k: v.detach().to("cpu", copy=True)
                    for k, v in self.model.state_dict(keep_vars=True).items()
                    if id(v) not in recorded and isinstance(v, torch.Tensor) and v.is_floating_point()
                }
        self._handles = [self.optimizer.register_step_post_hook(self._after_step)]
        return self

    def continue_with(self, model, optimizer) -> Recorder:
        """Go on recording ``model`` with ``optimizer`` after a pause: a framework's callback at its next fit or
        train, which makes a new optimizer. A recording on disk is not continued (see :meth:`start`)."""
        if self.path is not None:
            raise RecordingError(
                f"the recording in {self.path!r} ended with the earlier training, and a recording on disk is not "
                "continued: record all of the training in one run, or give the rest a new recorder with another path"
            )
        if model is not self.model:
            raise RecordingError("this recorder recorded another model before: give each model a recorder of its own")
        self.optimizer = optimizer
        return self.start()

    def close(self):
        """Unhook, take a last snapshot if the last steps were not recorded, and wait for the disk."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._closed:
            return
        self._closed = True
        try:
            if self._steps and self._steps[-1] != self._step:
                self._snapshot(self._step)
        finally:  # a snapshot refused (the model changed): what is on disk is still flushed, closed and unlocked
            self._stop_writer()
        if self._steps and self._changed_since_last():
            warnings.warn(
                f"the model changed after this recorder's last snapshot (step {self._steps[-1]}) without a step of "
                "its optimizer: another optimizer that steps after it (a split such as Muon + AdamW), or updates "
                "outside optimizer.step(). The trajectory ends before those changes, not at the trained model: "
                "record with the optimizer that steps last.",
                stacklevel=3,
            )
        now = self.model.state_dict()
        moved = [k for k, v in self._unrecorded.items() if k in now and not torch.equal(now[k].detach().cpu(), v)]
        if moved:
            warnings.warn(
                f"{moved[0]!r}{f' (and {len(moved) - 1} more)' if len(moved) > 1 else ''} changed during training but "
                "was not "
                f"recorded (parameters={self.patterns!r}): analyze takes its final value at every snapshot, so its "
                "share of "
                "the loss change ends up in the residual. Record it too, or freeze it.",
                stacklevel=3,
            )

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, exc_type, exc, tb):
        if exc is None:
            self.close()
            return
        try:  # keep what was recorded; the training error is the one to see
            self.close()
        except Exception as close_error:
            if hasattr(exc, "add_note"):
                exc.add_note(f"lca_notebook: closing the recorder also failed: {close_error}")

    # -- hooks ----------------------------------------------------------------------------------
    def _after_step(self, optimizer, args, kwargs):
        self._step += 1
        if self._step % self.every == 0:
            self._snapshot(self._step)

    def _state(self) -> dict:
        state = self.model.state_dict(keep_vars=True)
        if self.patterns is not None:
            state = {k: v for k, v in state.items() if any(fnmatch.fnmatchcase(k, p) for p in self.patterns)}
            if not state:
                raise ValueError(
                    f"parameters={self.patterns!r} match none of the model's tensors: "
                    f"{', '.join(self.model.state_dict())}"
                )
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    @torch.no_grad()
    def _snapshot(self, step: int):
        state = self._state()
        if self.path is None:
            self._snapshots.append({k: v.detach().to("cpu", copy=True) for k, v in state.items()})
            self._steps.append(step)
            return
        if self._writer is None:
            self._layout = make_layout(state)
            writer = TrajectoryWriter(self.path, self._layout, overwrite=self.overwrite, subset=self.subset)
            self._writer = _Writer(writer, self._layout)
        else:
            self._check_layout(state)
        self._writer.put(step, pack(state, self._layout), index=len(self._steps))
        self._steps.append(step)

    def _check_layout(self, state):
        names = [e["name"] for e in self._layout]
        if list(state) != names:
            raise RecordingError(
                f"the model's tensors changed during recording (now {list(state)[:5]}, first {names[:5]}); record one "
                "model"
            )
        for e in self._layout:
            t = state[e["name"]]
            if list(t.shape) != e["shape"] or str(t.dtype).removeprefix("torch.") != e["dtype"]:
                raise RecordingError(
                    f"tensor {e['name']!r} changed from {e['dtype']}{e['shape']} to "
                    f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)} during recording"
                )

    def _changed_since_last(self) -> bool:
        """Whether a recorded tensor differs from the last snapshot (read back from disk with ``path=``)."""
        last = self._snapshots[-1] if self.path is None else self.load(len(self) - 1)
        return any(k in last and not torch.equal(v.detach().cpu(), last[k]) for k, v in self._state().items())

    def _stop_writer(self):
        if self._writer is not None:
            self._writer.finish()

    def flush(self):
        """Wait until every snapshot queued so far is on disk (raises the writer's error, if any)."""
        if self._writer is not None:
            self._writer.drain()

    # -- the Trajectory protocol ----------------------------------------------------------------
    @property
    def subset(self) -> bool:  # type: ignore[override]
        """Recorded with ``parameters=``: the other tensors stayed fixed and are taken from the model."""
        return self.patterns is not None

    @property
    def steps(self) -> list[int]:  # type: ignore[override]
        """The optimizer step after which each snapshot was taken (0: before the first step)."""
        return list(self._steps)

    def __len__(self) -> int:
        return len(self._steps)

    def describe(self, k: int) -> str:
        where = f" in {self.path}" if self.path else ""
        return f"recorded snapshot {k} (step {self._steps[k]}){where}"

    def load(self, k: int):
        if self.path is None:
            return self._snapshots[k]
        self.flush()
        if self._reader is None or len(self._reader) <= k:
            self._reader = RecordedTrajectory(self.path)
        return self._reader.load(k)

    def __repr__(self):
        where = f"to {self.path!r}" if self.path else "in memory"
        state = "recording" if self._handles else "stopped"
        return f"<Recorder {where}: {len(self)} snapshots, every {self.every} step(s), {state}>"


class _Writer:
    """A daemon thread that appends queued snapshots to the store; errors come back to the caller."""

    def __init__(self, writer, layout):
        self.writer = writer
        nbytes = sum(getattr(torch, e["dtype"]).itemsize * _numel(e["shape"]) for e in layout)
        self.queue: queue.Queue = queue.Queue(maxsize=max(2, min(16, _QUEUE_BYTES // max(nbytes, 1))))
        self.error: BaseException | None = None
        self.failed_at: tuple[int, int] = (-1, -1)
        self.thread = threading.Thread(target=self._run, name="lca-record-writer", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                if self.error is None:
                    index, step, packed = item
                    try:
                        self.writer.append(step, packed)
                    except BaseException as exc:
                        self.error, self.failed_at = exc, (index, step)
            finally:
                self.queue.task_done()

    def _raise(self):
        if self.error is not None:
            index, step = self.failed_at
            raise RecordingError(
                f"recording to {self.writer.path!r} failed at snapshot {index} (step {step}): "
                f"{type(self.error).__name__}: {self.error}. "
                f"{self.writer.saved()}; free disk space or record to another path."
            ) from self.error

    def put(self, step, packed, index):
        self._raise()
        while True:
            try:
                self.queue.put((index, step, packed), timeout=0.2)
                return
            except queue.Full:
                self._raise()
                if not self.thread.is_alive():
                    raise RecordingError(f"the writer of {self.writer.path!r} stopped unexpectedly") from None

    def drain(self):
        if self.thread.is_alive():
            self.queue.join()
        self._raise()

    def finish(self):
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        try:
            self._raise()
        except BaseException:
            try:  # keep what is on disk readable, and let other writers at the path
                self.writer.close()
            except Exception:
                self.writer.release()
            raise
        self.writer.close()


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def record(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    path=None,
    every: int = 1,
    parameters=None,
    *,
    overwrite: bool = False,
) -> Recorder:
    """Record the trajectory of ``model`` as ``optimizer`` trains it; use it as a context manager.

    Snapshots (the ``state_dict``: parameters and buffers) are taken on entering (before the
    first ``optimizer.step()``), after every ``every``-th step, and once more on exit if the last steps were
    not recorded, so the trajectory always ends at the trained model. ``recorder.steps`` gives the step
    of each snapshot. With ``path`` the snapshots stream to a zarr store there (a background thread
    writes them; ``lca.analyze(model, data, path)`` reads it later, even in another process);
    without, they stay in memory as CPU copies. ``parameters``: glob patterns of ``state_dict`` names
    to record, for when only those train: ``analyze`` takes the others from the model, and closing the
    recorder warns if any of them changed after all.

    >>> import torch, lca_notebook as lca
    >>> model = torch.nn.Linear(4, 3); opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> with lca.record(model, opt, every=2) as rec:
    ...     for _ in range(5):
    ...         opt.zero_grad(); torch.nn.functional.cross_entropy(model(x), y).backward(); opt.step()
    >>> rec.steps
    [0, 2, 4, 5]
    """
    return Recorder(model, optimizer, path=path, every=every, parameters=parameters, overwrite=overwrite)
