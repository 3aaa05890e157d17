"""analyze(store=...): equals the in-memory result, opens lazily, resumes, refuses, survives write errors and damage."""

import json
import os

import numpy as np
import pytest
import torch
from helpers import assert_results_equal, digits, train
from torch import nn

import lca_notebook as lca
from lca_notebook import StoreWriteError
from lca_notebook.result import GRANULARITIES
from lca_notebook.storage import results as store_mod

T = 11  # with 4 iterations per chunk: two full chunks and a partial one


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(store_mod, "CHUNK_ITERATIONS", 4)


@pytest.fixture(scope="module")
def run():
    x, y = digits(300)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 10))
    snaps = train(model, x, y, steps=T, lr=0.3, batch_size=100)
    memory = lca.analyze(model, (x, y), snaps, progress=False)
    return model, x, y, snaps, memory


def test_store_equals_memory_and_every_aggregation_agrees(run, tmp_path):
    model, x, y, snaps, memory = run
    stored = lca.analyze(model, (x, y), snaps, store=tmp_path / "s", progress=False)
    assert stored.lca.chunks is not None  # opened lazily (dask), nothing loaded yet
    assert {f"prefix_{by}" for by in GRANULARITIES} <= set(stored.dataset.data_vars)
    assert_results_equal(stored, memory)
    for name in ("tensor", "layer", "unit", "index"):
        np.testing.assert_array_equal(stored.dataset[name].values, memory.dataset[name].values)
    for by in GRANULARITIES:
        for start, stop in [(None, None), (0, 1), (3, 9), (4, 8), (10, 11), (5, 5)]:
            a, b = stored.total(by, start, stop), memory.total(by, start, stop)
            np.testing.assert_array_equal(a[by].values, b[by].values)  # same labels
            np.testing.assert_allclose(a.values, b.values, rtol=1e-9, atol=1e-12, err_msg=f"{by} [{start}, {stop})")
        np.testing.assert_allclose(
            stored.per_iteration(by).values, memory.per_iteration(by).values, rtol=1e-9, atol=1e-12
        )
        np.testing.assert_allclose(stored.cumulative(by).values, memory.cumulative(by).values, rtol=1e-9, atol=1e-12)
    for by in ("total", "layer", "unit"):
        for var in ("helped", "hurt", "zero"):
            np.testing.assert_array_equal(stored.fractions(by)[var].values, memory.fractions(by)[var].values)
    np.testing.assert_allclose(stored.reconstructed_loss().values, memory.reconstructed_loss().values, rtol=1e-12)
    # The stored prefix sums are the sums of the stored float32 rows (computed independently here).
    lca32 = memory.lca.values.astype(np.float64)
    np.testing.assert_allclose(
        np.asarray(stored.dataset["prefix_parameter"].values)[1:], np.cumsum(lca32, axis=0), rtol=1e-12
    )
    np.testing.assert_allclose(stored.dataset["prefix_total"].values[1:, 0], np.cumsum(lca32.sum(1)), rtol=1e-10)
    # lca.open sees the same thing, and a result computed into a store needs no recomputation next time.
    assert_results_equal(lca.open(tmp_path / "s"), memory)


def test_a_finished_store_is_returned_without_computing(run, tmp_path):
    model, x, y, snaps, memory = run
    calls = []

    def loss_fn(out, target):
        calls.append(1)
        return nn.functional.cross_entropy(out, target)

    lca.analyze(model, (x, y), snaps, loss_fn=loss_fn, store=tmp_path / "s", progress=False)
    first = len(calls)
    again = lca.analyze(model, (x, y), snaps, loss_fn=loss_fn, store=tmp_path / "s", progress=False)
    assert first > 0 and len(calls) == first
    assert_results_equal(again, memory)


def test_an_interrupted_run_resumes_and_equals_an_uninterrupted_one(run, tmp_path):
    model, x, y, snaps, memory = run
    calls = []

    def loss_fn(out, target):
        calls.append(1)
        if stop_after[0] is not None and len(calls) > stop_after[0]:
            raise KeyboardInterrupt  # Ctrl-C in the middle of an iteration
        return nn.functional.cross_entropy(out, target)

    stop_after = [15]  # Simpson-cheap here: 2 evaluations per iteration, so mid-run
    with pytest.raises(KeyboardInterrupt) as err:
        lca.analyze(model, (x, y), snaps, loss_fn=loss_fn, store=tmp_path / "s", progress=False)
    partial = err.value.partial_result
    done = partial.n_iterations
    assert 0 < done < T
    assert_results_equal(partial, memory, n=done)
    assert "run the same call again" in "\n".join(getattr(err.value, "__notes__", []))
    stop_after[0], before = None, len(calls)
    resumed = lca.analyze(model, (x, y), snaps, loss_fn=loss_fn, store=tmp_path / "s", progress=False)
    assert len(calls) - before < before  # only the rest was computed
    assert_results_equal(resumed, memory)
    for by in GRANULARITIES:
        np.testing.assert_allclose(
            resumed.total(by, 2, 10).values, memory.total(by, 2, 10).values, rtol=1e-9, atol=1e-12
        )


def test_resuming_with_other_inputs_is_refused_naming_what_differs(run, tmp_path):
    model, x, y, snaps, _ = run
    lca.analyze(model, (x, y), snaps[:4], method="simpson", store=tmp_path / "s", progress=False)
    cases = [
        (dict(method="trapezoid"), "method"),
        (dict(method="simpson", data=(x[:200], y[:200])), "the number of samples"),
        (dict(method="simpson", data=(x.flip(0), y.flip(0))), "the data"),
        (dict(method="simpson", traj=[*snaps[:3], snaps[5]]), "the trajectory"),
        (dict(method="simpson", traj=snaps[:5]), "the number of snapshots"),
        (dict(method="simpson", parameters="0.*"), "the selected parameters"),
        (dict(method="simpson", loss_fn=nn.functional.nll_loss), "the loss function"),
    ]
    for change, what in cases:
        kw = dict(change)
        data, traj = kw.pop("data", (x, y)), kw.pop("traj", snaps[:4])
        with pytest.raises(ValueError, match="computed from other inputs") as err:
            lca.analyze(model, data, traj, store=tmp_path / "s", progress=False, **kw)
        assert what in str(err.value), (what, str(err.value))


def test_a_folder_that_is_not_a_store_is_never_written(run, tmp_path):
    model, x, y, snaps, _ = run
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="not an lca_notebook store"):
        lca.analyze(model, (x, y), snaps[:3], store=tmp_path / "mine", progress=False)
    assert os.listdir(tmp_path / "mine") == ["thesis.tex"]


def test_a_write_error_is_clear_and_completed_iterations_stay_readable(run, tmp_path):
    model, x, y, snaps, memory = run
    path = tmp_path / "s"
    calls = []

    def loss_fn(out, target):
        calls.append(1)
        if len(calls) == 20:  # chunks 0 and 1 are written (2 evaluations an iteration); chunk 2 cannot be
            (path / "lca" / "c" / "2").write_text("a file where a directory belongs")
        return nn.functional.cross_entropy(out, target)

    with pytest.raises(StoreWriteError) as err:
        lca.analyze(model, (x, y), snaps, loss_fn=loss_fn, store=path, progress=False)
    message = str(err.value)
    assert str(path) in message and "iterations 8..10" in message and "Iterations 0..7 are saved" in message
    kept = lca.open(path)
    assert kept.n_iterations == 8
    assert_results_equal(kept, memory, n=8)
    # A location that cannot hold a store at all (also for root): a clear error before any work.
    with pytest.raises(StoreWriteError, match="cannot create the store '/proc/"):
        lca.analyze(model, (x, y), snaps[:3], store="/proc/lca_store", progress=False)


def _stored(run, tmp_path):
    model, x, y, snaps, _ = run
    lca.analyze(model, (x, y), snaps, store=tmp_path / "s", progress=False)
    return tmp_path / "s"


def test_damaged_stores_fail_on_open_naming_the_path(run, tmp_path):
    path = _stored(run, tmp_path)
    os.remove(path / "lca" / "c" / "1" / "0")
    with pytest.raises(ValueError, match=r"is damaged: lca/c/1/0 \('lca' from iteration 4\) is missing"):
        lca.open(path)

    path = _stored(run, tmp_path / "b")
    chunk = path / "prefix_parameter" / "c" / "2" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{path}.*is damaged.*truncated"):
        lca.open(path)

    for meta in ("zarr.json", "lca/zarr.json"):
        path = _stored(run, tmp_path / meta.replace("/", "_"))
        (path / meta).write_text("{ garbage")
        with pytest.raises(ValueError, match=rf"{path}"):
            lca.open(path)
    # Resuming into a damaged store is refused the same way (nothing computed on a broken base).
    model, x, y, snaps, _ = run
    with pytest.raises(ValueError, match=rf"{path}"):
        lca.analyze(model, (x, y), snaps, store=path, progress=False)


def test_damaged_recorder_store_fails_on_open(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with lca.record(model, opt, path=tmp_path / "r"):
        for _ in range(3):
            model(torch.ones(2, 3)).sum().backward()
            opt.step()
    os.remove(tmp_path / "r" / "snapshots_float32" / "c" / "2" / "0")
    with pytest.raises(ValueError, match=r"is damaged: snapshots_float32/c/2/0 .*snapshot 2\) is missing"):
        lca.analyze(model, (torch.ones(2, 3), torch.zeros(2, dtype=torch.long)), tmp_path / "r", progress=False)
    meta = json.loads((tmp_path / "r" / "zarr.json").read_text())
    assert meta["attributes"]["n_snapshots"] == 4
