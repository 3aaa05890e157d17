"""A computation into a store killed with SIGKILL resumes where it stopped and ends equal to an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import lca_notebook as lca
from lca_notebook.errors import StoreInUseError
from lca_notebook.result import GRANULARITIES
from lca_notebook.storage import results as store_mod

T = 24
CHUNK = 4

SCRIPT = textwrap.dedent(
    """
    import sys, time
    import torch
    from torch import nn
    from sklearn.datasets import load_digits
    import lca_notebook as lca
    from lca_notebook.storage import results as store

    store.CHUNK_ITERATIONS = {chunk}
    traj, out, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def loss_fn(output, target):
        time.sleep(pause)  # slow enough to be killed mid-way
        return nn.functional.cross_entropy(output, target)

    lca.analyze(model, (x, y), traj, loss_fn=loss_fn, store=out, progress=False)
    """
)

calls = []


def loss_fn(output, target):  # same name as the script's: the store checks the loss function's name
    calls.append(1)
    return nn.functional.cross_entropy(output, target)


def _completed(path):
    try:
        with open(os.path.join(path, "zarr.json")) as f:
            return json.load(f)["attributes"].get("completed_iterations", 0)
    except (OSError, ValueError, KeyError):
        return 0


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    traj = tmp_path_factory.mktemp("traj") / "run.zarr"
    with lca.record(model, opt, path=traj):
        for i in range(T):
            idx = torch.arange(i * 64, i * 64 + 64) % len(x)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model, x, y, traj


def test_sigkill_then_resume_equals_uninterrupted(digits_run, tmp_path, monkeypatch):
    model, x, y, traj = digits_run
    monkeypatch.setattr(store_mod, "CHUNK_ITERATIONS", CHUNK)
    out = tmp_path / "lca.zarr"
    script = tmp_path / "compute.py"
    script.write_text(SCRIPT.format(chunk=CHUNK))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(traj), str(out), "0.03"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 120
        while _completed(out) < 2 * CHUNK:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the subprocess made no progress"
            time.sleep(0.05)
        # A second writer while it runs: told who holds the store, and nothing is written or lost.
        with pytest.raises(StoreInUseError, match=rf"{out}.* is being written by process {proc.pid} \(analyze"):
            lca.analyze(model, (x, y), traj, loss_fn=loss_fn, store=out, progress=False)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _completed(out)
    assert 2 * CHUNK <= killed_at < T  # killed mid-way, with some chunks safely on disk
    partial = lca.open(out)  # what was completed is readable as is
    assert partial.n_iterations == killed_at
    killed_totals = {k: partial.attrs[k] for k in ("gradient_evaluations", "seconds")}
    assert killed_totals["gradient_evaluations"] == 1 + int(partial.dataset["evaluations"].sum())
    assert killed_totals["seconds"] > 0

    calls.clear()
    resumed = lca.analyze(model, (x, y), traj, loss_fn=loss_fn, store=out, progress=False)
    resumed_calls = len(calls)
    calls.clear()
    whole = lca.analyze(model, (x, y), traj, loss_fn=loss_fn, store=tmp_path / "whole.zarr", progress=False)
    assert resumed_calls < len(calls)  # only the iterations after the kill were computed

    assert resumed.n_iterations == whole.n_iterations == T
    for name in (*store_mod.ITERATION_VARS, *store_mod.CHECKPOINT_VARS):
        np.testing.assert_allclose(
            resumed.dataset[name].values, whole.dataset[name].values, rtol=1e-6, atol=1e-9, err_msg=name
        )
    np.testing.assert_array_equal(resumed.dataset["step"].values, np.arange(T + 1))
    # The totals count the killed run too (the lock it held died with it): evaluations as an uninterrupted run's.
    want = 1 + int(whole.dataset["evaluations"].sum())  # the first snapshot's, then each iteration's
    assert resumed.attrs["gradient_evaluations"] == whole.attrs["gradient_evaluations"] == want
    assert resumed.attrs["seconds"] > killed_totals["seconds"]
    for by in GRANULARITIES:
        np.testing.assert_allclose(resumed.total(by, 3, 21).values, whole.total(by, 3, 21).values, rtol=1e-6, atol=1e-9)


def _scaled_loss(scale, fail_after=None):
    """A loss function whose name does not change with ``scale``: only its values tell them apart."""
    count = [0]

    def loss_fn(output, target):
        count[0] += 1
        if fail_after is not None and count[0] > fail_after:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-run
        return scale * nn.functional.cross_entropy(output, target)

    return loss_fn


def test_resume_with_a_different_loss_under_the_same_name_is_refused(digits_run, tmp_path, monkeypatch):
    model, x, y, traj = digits_run
    monkeypatch.setattr(store_mod, "CHUNK_ITERATIONS", CHUNK)
    out = tmp_path / "lca.zarr"
    with pytest.raises(KeyboardInterrupt):  # simpson: 1 + 2 evaluations per iteration, so 11 iterations done
        lca.analyze(
            model, (x, y), traj, loss_fn=_scaled_loss(1.0, fail_after=23), method="simpson", store=out, progress=False
        )
    done = _completed(out)
    assert 0 < done < T
    before = lca.open(out).dataset.load()

    with pytest.raises(ValueError, match=rf"holds loss .* at snapshot {done}.*loss_fn differ"):
        lca.analyze(model, (x, y), traj, loss_fn=_scaled_loss(2.0), method="simpson", store=out, progress=False)
    after = lca.open(out).dataset.load()
    assert after.attrs["completed_iterations"] == done  # nothing was lost or overwritten
    np.testing.assert_array_equal(after["lca"].values[:done], before["lca"].values[:done])

    resumed = lca.analyze(model, (x, y), traj, loss_fn=_scaled_loss(1.0), method="simpson", store=out, progress=False)
    whole = lca.analyze(model, (x, y), traj, loss_fn=_scaled_loss(1.0), method="simpson", progress=False)
    np.testing.assert_allclose(resumed.lca.values, whole.lca.values, rtol=1e-6, atol=1e-9)
    # The independent check of what was resumed: Simpson's parts add up to the real loss change.
    np.testing.assert_allclose(
        resumed.lca.values.sum(1) + resumed.dataset["lca_rest"].values, np.diff(whole.loss.values), atol=1e-3
    )
