"""analyze(store=...): equals the in-memory result, opens lazily, resumes, refuses, survives write errors and damage."""

import json
import os
import threading

import numpy as np
import pytest
import torch
from helpers import assert_results_equal, digits, train
from torch import nn

import lca_notebook as lca
from lca_notebook import StoreWriteError, engine
from lca_notebook.errors import StoreDamagedError, StoreInUseError
from lca_notebook.result import GRANULARITIES
from lca_notebook.storage import files
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
    # The stored prefix sums are the sums of the stored float32 rows (computed independently here): at parameter
    # granularity one float64 row per chunk boundary (every 4 iterations), any other row from them and lca.
    lca32 = memory.lca.values.astype(np.float64)
    cumsum = np.concatenate([np.zeros((1, lca32.shape[1])), np.cumsum(lca32, axis=0)])
    boundaries = np.asarray(stored.dataset["prefix_parameter"].values)
    assert boundaries.shape == (T // 4 + 1, lca32.shape[1])
    np.testing.assert_allclose(boundaries, cumsum[::4], rtol=1e-12, atol=1e-15)
    prefix = stored.prefix("parameter")
    for k in range(T + 1):
        np.testing.assert_allclose(prefix[k], cumsum[k], rtol=1e-12, atol=1e-15, err_msg=f"row {k}")
    np.testing.assert_allclose(prefix[2:9], cumsum[2:9], rtol=1e-12, atol=1e-15)
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

    stop_after = [17]  # 1 + 3 checks, then 2 evaluations per iteration: mid-run, past half the calls of a resume
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
    # tol and max_splits steer adaptive only: a Simpson store is the same with any
    again = lca.analyze(model, (x, y), snaps[:4], method="simpson", tol=1e-7, max_splits=4, store=tmp_path / "s")
    assert again.n_iterations == 3


def test_a_folder_that_is_not_a_store_is_never_written(run, tmp_path):
    model, x, y, snaps, _ = run
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="not an lca_notebook store"):
        lca.analyze(model, (x, y), snaps[:3], store=tmp_path / "mine", progress=False)
    assert os.listdir(tmp_path / "mine") == ["thesis.tex"]


def test_a_write_error_is_clear_and_completed_iterations_stay_readable(run, tmp_path, monkeypatch):
    model, x, y, snaps, memory = run
    monkeypatch.setattr(engine, "MAX_CHUNK", 1)  # one iteration at a time: the loss's call count says what is written
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


def _flip_a_bit(file, at=9):
    data = bytearray(file.read_bytes())
    data[at] ^= 0x04
    file.write_bytes(bytes(data))


def test_a_flipped_bit_in_any_chunk_fails_on_read_naming_it(run, tmp_path):
    memory = run[-1]
    for name, chunk, read in [
        ("lca", "1/0", lambda r: r.lca.values),
        ("loss", "2", lambda r: r.loss.values),
        ("prefix_layer", "1/0", lambda r: r.total("layer", 0, 5).values),
        ("residual", "0", lambda r: r.residual.values),
    ]:
        path = _stored(run, tmp_path / name)
        _flip_a_bit(path / name / "c" / chunk)
        opened = lca.open(path)  # sizes are whole: opening succeeds
        with pytest.raises(StoreDamagedError) as err:
            read(opened)
        message = str(err.value)
        assert str(path) in message and f"of {name!r}" in message and f"{name}/c/{chunk}" in message, message
        assert "checksum" in message and "restore the store from a backup" in message
    # The chunks a read does not touch are fine: the first chunk of lca is still equal to the memory result.
    np.testing.assert_array_equal(lca.open(tmp_path / "lca" / "s").lca[:4].values, memory.lca.values[:4])


def test_a_flipped_bit_in_a_coordinate_is_named_on_open(run, tmp_path):
    path = _stored(run, tmp_path)
    _flip_a_bit(path / "unit" / "c" / "0")
    with pytest.raises(StoreDamagedError, match=r"chunk 0 of 'unit'.*unit/c/0.*checksum"):
        lca.open(path)


def _loss(after=None):
    """Cross-entropy, as Ctrl-C after ``after`` gradient evaluations; one name (the store checks it) either way."""
    count = [0]

    def loss_fn(out, target):
        count[0] += 1
        if after is not None and count[0] > after:
            raise KeyboardInterrupt
        return nn.functional.cross_entropy(out, target)

    return loss_fn


def _interrupted(run, path, after):
    """analyze (simpson) into ``path`` stopped by Ctrl-C after ``after`` evaluations; the iterations it kept."""
    model, x, y, snaps, _ = run
    with pytest.raises(KeyboardInterrupt):
        lca.analyze(model, (x, y), snaps, loss_fn=_loss(after), method="simpson", store=path, progress=False)
    return json.loads((path / "zarr.json").read_text())["attributes"]["completed_iterations"]


def _changed(snaps, k):
    out = [dict(s) for s in snaps]
    out[k] = {n: (v + 1e-3 if v.is_floating_point() else v) for n, v in snaps[k].items()}
    return out


def test_a_changed_snapshot_already_computed_is_refused_naming_it(run, tmp_path):
    model, x, y, snaps, _ = run
    path = tmp_path / "s"
    done = _interrupted(run, path, after=19)  # simpson: 1 + 2 evaluations per iteration, so about 9 iterations
    assert 3 < done < T
    for k, culprit in [(3, "snapshot 3 "), (done, f"snapshot {done} ")]:  # the middle, and where it resumes
        with pytest.raises(ValueError, match="cannot be resumed") as err:
            lca.analyze(
                model, (x, y), _changed(snaps, k), loss_fn=_loss(), method="simpson", store=path, progress=False
            )
        assert culprit in str(err.value) and "differs from the one the store was computed from" in str(err.value)
        assert "loss_fn" not in str(err.value)
    assert json.loads((path / "zarr.json").read_text())["attributes"]["completed_iterations"] == done  # untouched
    # A complete store is not handed back for a trajectory whose middle differs either.
    whole = lca.analyze(model, (x, y), snaps, loss_fn=_loss(), method="simpson", store=path, progress=False)
    with pytest.raises(ValueError, match="cannot be returned as it is: snapshot 6 "):
        lca.analyze(model, (x, y), _changed(snaps, 6), loss_fn=_loss(), method="simpson", store=path, progress=False)
    again = lca.analyze(model, (x, y), snaps, loss_fn=_loss(), method="simpson", store=path, progress=False)
    assert_results_equal(again, whole)
    assert_results_equal(whole, lca.analyze(model, (x, y), snaps, method="simpson", progress=False))


def test_a_changed_batch_size_on_resume_is_named_as_such(run, tmp_path):
    model, x, y, snaps, _ = run
    path = tmp_path / "s"
    lca.analyze(model, (x, y), snaps[:4], method="simpson", batch_size=100, store=path, progress=False)
    with pytest.raises(ValueError, match="computed from other inputs") as err:
        lca.analyze(model, (x, y), snaps[:4], method="simpson", batch_size=64, store=path, progress=False)
    message = str(err.value)
    assert "the batch size: batches of 3 x 100 in the store, 4 x 64 + 1 x 44 now" in message, message
    assert "the data (its contents)" not in message
    with pytest.raises(ValueError, match=r"the data \(its contents\)"):  # other data, same split: the data
        lca.analyze(
            model, (x.flip(0), y.flip(0)), snaps[:4], method="simpson", batch_size=100, store=path, progress=False
        )


@pytest.mark.parametrize("value", ["abc", -3, 99, None])
def test_damaged_progress_attributes_are_named(run, tmp_path, value):
    model, x, y, snaps, _ = run
    path = tmp_path / "s"
    _interrupted(run, path, after=19)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["completed_iterations"] = value
    (path / "zarr.json").write_text(json.dumps(meta))
    pattern = rf"{path}.* is damaged: its attribute 'completed_iterations' is .*, expected a whole number in 0\.\.{T}"
    with pytest.raises(StoreDamagedError, match=pattern):
        lca.open(path)
    with pytest.raises(StoreDamagedError, match=pattern):
        lca.analyze(model, (x, y), snaps, loss_fn=_loss(), method="simpson", store=path, progress=False)


def test_totals_count_every_run(run, tmp_path):
    model, x, y, snaps, _ = run
    path = tmp_path / "s"
    done = _interrupted(run, path, after=19)
    kept = json.loads((path / "zarr.json").read_text())["attributes"]
    assert kept["gradient_evaluations"] == 1 + 2 * done  # simpson: the first snapshot, then 2 per iteration
    assert kept["seconds"] > 0
    resumed = lca.analyze(model, (x, y), snaps, loss_fn=_loss(), method="simpson", store=path, progress=False)
    assert resumed.attrs["gradient_evaluations"] == 1 + 2 * T == 1 + int(resumed.dataset["evaluations"].sum())
    assert resumed.attrs["seconds"] > kept["seconds"]


def test_a_store_of_an_older_format_is_read_but_not_continued(run, tmp_path):
    model, x, y, snaps, memory = run
    path = tmp_path / "s"
    _interrupted(run, path, after=19)
    files.update_attrs(str(path), format=1)
    done = json.loads((path / "zarr.json").read_text())["attributes"]["completed_iterations"]
    assert_results_equal(lca.open(path), memory, n=done, exact=False)
    with pytest.raises(ValueError, match=r"older lca_notebook \(format 1.*cannot be continued safely.*lca.open"):
        lca.analyze(model, (x, y), snaps, loss_fn=_loss(), method="simpson", store=path, progress=False)
    files.update_attrs(str(path), format=files.RESULT_FORMAT + 1)
    with pytest.raises(ValueError, match="newer lca_notebook"):
        lca.open(path)


def test_concurrent_writers_of_one_store_one_wins_the_other_is_told(run, tmp_path):
    model, x, y, snaps, memory = run
    path = tmp_path / "s"
    started, go_on = threading.Event(), threading.Event()
    outcome = {}

    def slow_loss(out, target):
        started.set()
        go_on.wait(60)
        return nn.functional.cross_entropy(out, target)

    def first():
        outcome["result"] = lca.analyze(model, (x, y), snaps, loss_fn=slow_loss, store=path, progress=False)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert started.wait(60)
        with pytest.raises(StoreInUseError) as err:  # the same store, created and being computed by the thread
            lca.analyze(model, (x, y), snaps, store=path, progress=False)
        message = str(err.value)
        assert str(path) in message and "analyze(store=...)" in message and "writable" not in message
    finally:
        go_on.set()
        thread.join(120)
    assert_results_equal(outcome["result"], memory)  # the winner's work is whole


def test_a_store_whose_run_stopped_early_sums_only_what_it_holds(run, tmp_path):
    """A bad snapshot stops the run after 9 of 12 iterations (chunks of 4: the third is half written). The store
    opened, and the error's partial result, sum parameters over the iterations they hold, as numpy does on the
    in-memory LCA; the parameter prefix had taken every row of the pre-allocated store and read unwritten ones."""
    model, x, y, snaps, memory = run
    bad = list(snaps)
    bad[10] = dict(bad[10], **{"0.weight": torch.full_like(bad[10]["0.weight"], float("nan"))})
    with pytest.raises(ValueError, match="snapshot 10") as info:
        lca.analyze(model, (x, y), bad, store=tmp_path / "s", progress=False)  # memory's method
    lca64 = memory.lca.values[:9].astype(np.float64)
    for got in (lca.open(tmp_path / "s"), info.value.partial_result):
        assert got.n_iterations == 9
        np.testing.assert_allclose(got.parameter_total().values, lca64.sum(0), rtol=1e-9, atol=1e-12)
        for a, b in ((0, 9), (2, 7), (1, 9), (6, 9)):
            np.testing.assert_allclose(got.total("parameter", a, b).values, lca64[a:b].sum(0), rtol=1e-9, atol=1e-12)
        cumulative = got.cumulative("parameter").values
        np.testing.assert_allclose(cumulative, np.cumsum(lca64, axis=0), rtol=1e-9, atol=1e-12)
