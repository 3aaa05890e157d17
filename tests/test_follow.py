"""analyze(..., follow=True): LCA computed while a recorder (here in a subprocess) is still writing its store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
from helpers import assert_results_equal

import lca_notebook as lca
from lca_notebook.storage.files import read_attrs
from lca_notebook.storage.results import open_store
from lca_notebook.storage.trajectories import RecordedTrajectory

# The trainer: a tiny MLP on fixed random data, one SGD step at a time. After `pause_at` snapshots it waits
# (on a condition, not a clock) until the follower has stored `wait_rows` iterations, so the test sees the LCA
# grow while training still runs; with `hang` it then blocks forever (the test kills it).
TRAINER = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    import lca_notebook as lca

    args = json.loads(sys.argv[1])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def stored():
        try:
            with open(os.path.join(args["result"], "zarr.json")) as f:
                return json.load(f)["attributes"].get("completed_iterations", 0)
        except (OSError, ValueError, KeyError):
            return 0

    rec = lca.record(model, opt, path=args["trajectory"]).start()
    for step in range(1, args["steps"] + 1):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if step == args["pause_at"]:
            rec.flush()
            while stored() < args["wait_rows"]:
                time.sleep(0.01)
            with open(args["seen"], "w") as f:
                json.dump(stored(), f)
            if args["hang"]:
                while True:
                    time.sleep(1)
    rec.close()
    """
)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _data():
    torch.manual_seed(0)
    _model()  # the same draws as the trainer: its model first, then the data
    return torch.randn(64, 4), torch.randint(0, 3, (64,))


def _start_trainer(tmp_path, *, steps, pause_at, wait_rows, hang=False):
    script = tmp_path / "train.py"
    script.write_text(TRAINER)
    args = {
        "trajectory": str(tmp_path / "run.zarr"),
        "result": str(tmp_path / "lca.zarr"),
        "steps": steps,
        "pause_at": pause_at,
        "wait_rows": wait_rows,
        "seen": str(tmp_path / "seen.json"),
        "hang": hang,
    }
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, str(script), json.dumps(args)], env=env), args


def _follow_in_thread(args, **kwargs):
    out: dict = {}

    def target():
        try:
            out["result"] = lca.analyze(
                _model(), _data(), args["trajectory"], store=args["result"], follow=True, progress=False,
                poll=0.02, **kwargs,
            )  # fmt: skip
        except BaseException as exc:  # handed to the test thread
            out["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, out


def _wait_for(condition, what, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.mark.slow
def test_follow_grows_while_training_and_ends_equal_to_a_plain_run(tmp_path, monkeypatch):
    monkeypatch.setattr("lca_notebook.storage.results.CHUNK_ITERATIONS", 4)  # several chunks, one partial at a wait
    trainer, args = _start_trainer(tmp_path, steps=11, pause_at=5, wait_rows=5)
    try:
        thread, out = _follow_in_thread(args, timeout=120)
        thread.join(timeout=300)
        assert "error" not in out, out.get("error")
        assert trainer.wait(timeout=60) == 0
    finally:
        trainer.kill()
    assert not thread.is_alive()
    # The follower had stored 5 iterations (one more than a chunk: the partial chunk is shown while it
    # waits) while the trainer was paused at snapshot 5 of 11.
    assert json.loads((tmp_path / "seen.json").read_text()) == 5
    followed = out["result"]
    assert followed.n_iterations == 11
    traj = RecordedTrajectory(args["trajectory"])
    assert len(traj) == 12 and traj.closed
    plain = lca.analyze(_model(), _data(), args["trajectory"], store=str(tmp_path / "plain.zarr"), progress=False)
    assert_results_equal(followed, plain)  # bit for bit: lca, loss, residual, splits, evaluations
    in_memory = lca.analyze(_model(), _data(), [traj[k] for k in range(len(traj))], progress=False)
    assert_results_equal(open_store(args["result"]), in_memory)
    assert read_attrs(args["result"])["complete"] is True


@pytest.mark.slow
def test_recorder_killed_ends_the_follower_with_a_clear_error_and_a_resumable_store(tmp_path, monkeypatch):
    monkeypatch.setattr("lca_notebook.storage.results.CHUNK_ITERATIONS", 4)
    trainer, args = _start_trainer(tmp_path, steps=50, pause_at=6, wait_rows=6, hang=True)
    try:
        thread, out = _follow_in_thread(args, timeout=120)
        _wait_for(lambda: (tmp_path / "seen.json").exists(), "the follower to catch up with the trainer")
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(timeout=60)
        thread.join(timeout=120)
    finally:
        trainer.kill()
    assert not thread.is_alive()
    err = out.get("error")
    assert isinstance(err, lca.RecordingError), err
    assert "stopped without closing it" in str(err) and "The last complete one is snapshot 6 (step 6)" in str(err)
    # Everything computed is kept: the 6 iterations up to the last snapshot, readable now.
    assert open_store(args["result"]).n_iterations == 6
    # And resumable: the same call without follow finishes the store (nothing left to compute here), equal
    # to a plain run of what was recorded.
    traj = RecordedTrajectory(args["trajectory"])
    assert len(traj) == 7 and not traj.closed
    resumed = lca.analyze(_model(), _data(), args["trajectory"], store=args["result"], progress=False)
    want = lca.analyze(_model(), _data(), [traj[k] for k in range(len(traj))], progress=False)
    assert_results_equal(resumed, want)


def test_follow_needs_a_store_and_a_recorder_path(tmp_path):
    with pytest.raises(ValueError, match="follow=True needs store=PATH"):
        lca.analyze(_model(), _data(), str(tmp_path / "run.zarr"), follow=True)
    snaps = [_model().state_dict(), _model().state_dict()]
    with pytest.raises(TypeError, match="follows a recorder store"):
        lca.analyze(_model(), _data(), snaps, store=str(tmp_path / "lca.zarr"), follow=True)


def test_follow_times_out_waiting_for_a_store_that_never_comes(tmp_path):
    with pytest.raises(TimeoutError, match="the recorder to create the store"):
        lca.analyze(_model(), _data(), str(tmp_path / "run.zarr"), store=str(tmp_path / "lca.zarr"), follow=True,
                    timeout=0.05, poll=0.01)  # fmt: skip


def _recording(tmp_path):
    """A recorder in this process, still open, that has stored 2 steps; ``step()`` trains and records one more."""
    model, (x, y) = _model(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    path, store = str(tmp_path / "run.zarr"), str(tmp_path / "lca.zarr")
    rec = lca.record(model, opt, path=path).start()

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    step()
    rec.flush()
    return x, y, path, store, rec, step


def test_follow_in_one_process_with_the_recorder_open(tmp_path):
    """The recorder in this process, still open: the follower computes what is there, waits, and ends when it
    closes; every value equals a plain run's."""
    x, y, path, store, rec, step = _recording(tmp_path)
    out: dict = {}

    def follow():
        out["r"] = lca.analyze(_model(), (x, y), path, store=store, follow=True, progress=False, poll=0.01)

    thread = threading.Thread(target=follow)
    thread.start()
    _wait_for(lambda: os.path.exists(store) and read_attrs(store).get("completed_iterations") == 2, "2 rows")
    assert thread.is_alive()  # the recorder is open: more may come
    step()
    rec.close()
    thread.join(timeout=60)
    assert not thread.is_alive()
    traj = RecordedTrajectory(path)
    want = lca.analyze(_model(), (x, y), [traj[k] for k in range(len(traj))], progress=False)
    assert out["r"].n_iterations == 3
    assert_results_equal(out["r"], want)
    np.testing.assert_array_equal(out["r"].residual.values, want.residual.values)


def test_a_follower_that_stopped_is_continued_by_a_plain_analyze_once_the_recording_grew(tmp_path):
    """The follower gives up (timeout) while the recorder is open; the recorder goes on and closes. The same
    analyze without follow continues the store from where it was and grows it to the whole recording."""
    x, y, path, store, rec, step = _recording(tmp_path)
    with pytest.raises(TimeoutError, match="snapshot 3") as info:
        lca.analyze(_model(), (x, y), path, store=store, follow=True, progress=False, poll=0.01, timeout=0.05)
    assert "run the same call again to continue" in str(info.value)
    assert open_store(store).n_iterations == 2 and read_attrs(store)["n_snapshots"] == 3
    for _ in range(3):
        step()
    rec.close()
    got = lca.analyze(_model(), (x, y), path, store=store, progress=False)
    traj = RecordedTrajectory(path)
    want = lca.analyze(_model(), (x, y), [traj[k] for k in range(len(traj))], progress=False)
    assert got.n_iterations == 5
    assert_results_equal(got, want)


def _follow_recorder_in_thread(path, store, x, y):
    out: dict = {}

    def follow():
        try:
            out["r"] = lca.analyze(_model(), (x, y), path, store=store, follow=True, progress=False, poll=0.01)
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=follow)
    thread.start()
    return thread, out


def _completed(store):
    try:
        return read_attrs(store).get("completed_iterations", 0)
    except (OSError, ValueError):
        return 0


def test_explorer_range_and_figures_grow_with_the_store_keeping_the_selection(tmp_path):
    pytest.importorskip("ipywidgets")
    model, (x, y) = _model(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    path, store = str(tmp_path / "run.zarr"), str(tmp_path / "lca.zarr")
    rec = lca.record(model, opt, path=path).start()

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    rec.flush()
    thread, out = _follow_recorder_in_thread(path, store, x, y)
    _wait_for(lambda: _completed(store) == 3, "3 stored iterations")
    ex = lca.explore(store)
    assert (ex.range.max, ex.range.value) == (3, (0, 3))
    following = lca.explore(store, follow=True, interval=0.02)
    following.range.value = (1, 2)  # a range inside the run stays where the user put it
    ex.range.value = (1, 3)  # a range ending at the newest iteration follows it
    assert not ex.refresh()  # nothing new yet
    for _ in range(4):
        step()
    rec.close()
    thread.join(timeout=60)
    assert "error" not in out, out.get("error")
    assert ex.refresh()
    assert (ex.range.max, ex.range.value) == (7, (1, 7))
    _wait_for(lambda: following.range.max == 7 and not following.following, "the following explorer to catch up")
    assert following.range.value == (1, 2)
    # The figures show the new iterations: the loss line runs to checkpoint 7, and the selection's sums
    # over [1, 7) are the stored LCA's (numpy sums of the store, read independently).
    stored = lca.open(store)
    assert float(np.asarray(ex.marks["loss"].x)[-1]) == 7.0
    assert float(np.asarray(ex.marks["helped"].x)[-1]) == 6.0  # the whole-run fractions overview grew (iterations 0..6)
    np.testing.assert_allclose(float(np.asarray(ex.marks["loss"].y)[-1]), float(stored.loss.values[-1]), rtol=1e-6)
    want = stored.lca.values[1:7].astype(np.float64).sum(0)
    np.testing.assert_allclose(ex.selection()["lca"].values, want, rtol=1e-5, atol=1e-9)


def test_follow_with_a_reduced_keep_equals_a_plain_run(tmp_path, monkeypatch):
    """keep="layer": the per-iteration sums and counts grow with the store, the per-parameter totals do not."""
    monkeypatch.setattr("lca_notebook.storage.results.CHUNK_ITERATIONS", 4)
    x, y, path, store, rec, step = _recording(tmp_path)
    out: dict = {}

    def follow():
        out["r"] = lca.analyze(
            _model(), (x, y), path, store=store, follow=True, keep="layer", progress=False, poll=0.01
        )

    thread = threading.Thread(target=follow)
    thread.start()
    _wait_for(lambda: _completed(store) == 2, "2 stored iterations")
    for _ in range(9):
        step()
    rec.close()
    thread.join(timeout=60)
    want = lca.analyze(_model(), (x, y), path, store=str(tmp_path / "plain.zarr"), keep="layer", progress=False)
    assert out["r"].n_iterations == 11
    for name in want.dataset.data_vars:
        np.testing.assert_array_equal(out["r"].dataset[name].values, want.dataset[name].values, err_msg=name)


def test_following_a_saved_result_stops_and_a_file_is_refused(tmp_path):
    """A saved store holds no 'complete' attribute (only one being computed says complete: false): following it
    stops at once. A .nc file never grows: follow=True is refused, saying so. Refreshing says each note once."""
    pytest.importorskip("ipywidgets")
    r = lca.LCAResult.example()
    store = r.save(tmp_path / "saved.zarr")
    ex = lca.explore(store, follow=True, interval=0.01)
    _wait_for(lambda: not ex.following, "the follower of a saved store to stop")
    with pytest.raises(ValueError, match=r"saved\.nc is a saved file, which does not grow"):
        lca.explore(r.save(tmp_path / "saved.nc"), follow=True)
    model, (x, y) = _model(), _data()
    snaps = [{k: v + 0.01 * i for k, v in model.state_dict().items()} for i in range(3)]
    reduced = lca.analyze(model, (x, y), snaps, keep="layer", progress=False)
    ex = lca.explore(reduced.save(tmp_path / "reduced.zarr"))
    notes = list(ex.notes)
    ex._precompute(ex._parameter_budget)  # what each refresh does
    assert ex.notes == notes and len(notes) == len(set(notes)) >= 1
