"""lca.record: snapshots equal hand-made state_dict copies, in memory and streamed to a store."""

import copy
import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import lca_notebook as lca
from lca_notebook import RecordingError
from lca_notebook.errors import StoreDamagedError, StoreInUseError
from lca_notebook.sources import open_path


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.data[:400] / 16.0, dtype=torch.float32)
    return x, torch.tensor(d.target[:400])


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


def _train(model, opt, x, y, steps, on_step=None):
    for i in range(steps):
        idx = torch.arange(i * 37, i * 37 + 64) % len(x)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if on_step:
            on_step(i + 1)


def _reference(x, y, steps, every):
    """The same training with state_dict copies made by hand: before, after each `every`-th step, and at the end."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    snaps, at = [copy.deepcopy(model.state_dict())], [0]

    def keep(step):
        if step % every == 0 or step == steps:
            snaps.append(copy.deepcopy(model.state_dict()))
            at.append(step)

    _train(model, opt, x, y, steps, keep)
    return snaps, at


def _assert_same(recorded, snaps):
    assert len(recorded) == len(snaps)
    for k, ref in enumerate(snaps):
        got = recorded[k]
        assert list(got) == list(ref)
        for name in ref:
            assert got[name].dtype == ref[name].dtype, name
            torch.testing.assert_close(got[name], ref[name], rtol=0, atol=0, msg=f"snapshot {k}, {name}")


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("where", ["memory", "store"])
def test_recording_equals_state_dict_copies(digits, tmp_path, every, where):
    x, y = digits
    snaps, at = _reference(x, y, steps=8, every=every)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = tmp_path / "run.zarr" if where == "store" else None
    with lca.record(model, opt, path=path, every=every) as rec:
        _train(model, opt, x, y, 8)
    assert rec.steps == at
    _assert_same(rec, snaps)  # parameters and buffers (BatchNorm running stats, num_batches_tracked)
    if path is not None:  # the store, opened again as another process would
        again = open_path(path)
        assert again.steps == at
        _assert_same(again, snaps)


def test_recorder_is_a_trajectory_for_analyze(digits, tmp_path):
    x, y = digits
    snaps, _ = _reference(x, y, steps=5, every=1)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with lca.record(model, opt, path=tmp_path / "r") as rec:
        _train(model, opt, x, y, 5)
    ref = lca.analyze(model, (x, y), snaps, method="simpson", progress=False)
    for source in (rec, tmp_path / "r", str(tmp_path / "r")):
        got = lca.analyze(model, (x, y), source, method="simpson", progress=False)
        np.testing.assert_array_equal(got.lca.values, ref.lca.values)
        np.testing.assert_array_equal(got.dataset["step"].values, np.arange(6))


def test_only_selected_tensors_are_recorded(digits):
    x, y = digits
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"'1.weight' \(and \d+ more\) changed during training but was not recorded"):
        with lca.record(model, opt, parameters=["0.*", "3.weight"]) as rec:  # the optimizer trains more than that
            _train(model, opt, x, y, 2)
    assert list(rec[0]) == ["0.weight", "0.bias", "3.weight"]
    with pytest.raises(ValueError, match="every must be a positive int"):
        lca.record(model, opt, every=0)


@pytest.mark.parametrize("where", ["memory", "store"])
def test_a_subset_recording_of_what_trains_is_analysed(digits, tmp_path, where):
    x, y = digits
    model = _model()
    model.eval()  # BatchNorm statistics fixed too: only the last layer moves
    opt = torch.optim.SGD(model[3].parameters(), lr=0.2, momentum=0.9)
    by_hand = [copy.deepcopy(model.state_dict())]
    with lca.record(model, opt, path=tmp_path / "t.zarr" if where == "store" else None, parameters="3.*") as rec:
        _train(model, opt, x, y, 5, on_step=lambda i: by_hand.append(copy.deepcopy(model.state_dict())))
    assert set(rec[0]) == {"3.weight", "3.bias"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: what was not recorded did not move
        got = lca.analyze(
            model, (x, y), rec if where == "memory" else tmp_path / "t.zarr", method="simpson", progress=False
        )
    full = lca.analyze(model, (x, y), by_hand, method="simpson", progress=False, parameters="3.*")
    assert list(dict.fromkeys(got.dataset["tensor"].values)) == ["3.weight", "3.bias"]
    np.testing.assert_allclose(got.loss.values, full.loss.values, rtol=1e-6)
    np.testing.assert_allclose(got.lca.values, full.lca.values, rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match=r"selects '0.weight', which this trajectory did not record"):
        lca.analyze(model, (x, y), rec, parameters="0.*", progress=False)
    with pytest.raises(ValueError, match=r"has no tensor '0.weight'.*model.state_dict\(\)"):  # plain dicts: no subset
        lca.analyze(model, (x, y), [rec[k] for k in range(len(rec))], progress=False)


def test_bfloat16_tensors_round_trip_bit_for_bit(tmp_path):
    torch.manual_seed(1)
    model = nn.Linear(5, 3).to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(8, 5, dtype=torch.bfloat16)
    snaps = [copy.deepcopy(model.state_dict())]
    with lca.record(model, opt, path=tmp_path / "bf") as rec:
        for _ in range(3):
            opt.zero_grad()
            model(x).float().pow(2).mean().backward()
            opt.step()
            snaps.append(copy.deepcopy(model.state_dict()))
    _assert_same(open_path(tmp_path / "bf"), snaps)
    assert rec.steps == [0, 1, 2, 3]


def test_a_write_error_surfaces_in_the_training_thread_and_keeps_earlier_snapshots(digits, tmp_path):
    x, y = digits
    snaps, _ = _reference(x, y, steps=12, every=1)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = tmp_path / "run.zarr"

    def sabotage(step):
        if step == 5:
            rec.flush()  # snapshots 0..5 are on disk
            # A real failure, also for root: a file where the writer needs the directory of snapshot 7.
            (path / "snapshots_float32" / "c" / "7").write_text("not a directory")

    with pytest.raises(RecordingError) as err:
        with lca.record(model, opt, path=path) as rec:
            _train(model, opt, x, y, 12, sabotage)
    message = str(err.value)
    assert "snapshot 7" in message and str(path) in message and "Snapshots 0..6 are saved" in message
    kept = open_path(path)
    assert len(kept) == 7
    _assert_same(kept, snaps[:7])


def test_a_model_changed_mid_recording_leaves_the_store_closed_unlocked_and_whole(digits, tmp_path):
    """The last snapshot at close is refused (the model became float64): the snapshots before it are flushed, the
    store closed and its lock released, so a new recorder may take the path."""
    x, y = digits
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "run.zarr"
    with pytest.raises(RecordingError, match=r"changed from float32\[16, 64\] to float64\[16, 64\]"):
        with lca.record(model, opt, path=path, every=2):  # snapshots 0 and 2; step 3's is taken at close
            _train(model, opt, x, y, 3)
            model.double()  # the snapshot at close meets it
    kept = open_path(path)
    assert len(kept) == 2 and kept.closed and not kept.writer_alive()
    fresh = _model()
    with lca.record(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), path=path, overwrite=True) as rec:
        pass
    assert len(rec) == 1


def test_a_recorder_on_disk_is_not_reentered_and_reads_stop_at_its_end(digits, tmp_path):
    x, y = digits
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with lca.record(model, opt, path=tmp_path / "run.zarr") as rec:
        _train(model, opt, x, y, 3)
    with pytest.raises(RecordingError, match=r"a closed recording on disk is not continued"):
        with rec:
            _train(model, opt, x, y, 2)
    assert len(rec) == 4 and len(open_path(tmp_path / "run.zarr")) == 4
    with pytest.raises(IndexError, match=r"snapshot 5 of a trajectory of 4 snapshots"):
        open_path(tmp_path / "run.zarr").load(5)  # its arrays have spare rows of zeros past the end


def test_reentering_a_recorder_in_memory_after_steps_outside_it_warns(digits):
    x, y = digits
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with lca.record(model, opt) as rec:
        _train(model, opt, x, y, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with rec:  # nothing moved in between: no warning
            _train(model, opt, x, y, 1)
    _train(model, opt, x, y, 2)  # outside the recorder
    with pytest.warns(UserWarning, match=r"steps taken outside its `with` block"):
        with rec:
            _train(model, opt, x, y, 1)
    assert rec.steps == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("where", ["memory", "store"])
def test_a_second_optimizer_stepping_after_the_recorded_one_is_named_at_close(digits, tmp_path, where):
    """Weights with one optimizer, biases with another that steps after it: each snapshot is taken between the
    two steps, so the trajectory ends before the last bias step, not at the trained model. Hooking the optimizer
    that steps last gives a trajectory that ends there, and no warning."""
    x, y = digits
    path = str(tmp_path / "t.zarr") if where == "store" else None
    for hooked, warns in (("weights", True), ("biases", False)):
        model = _model()
        weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
        biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
        opt_w, opt_b = torch.optim.SGD(weights, lr=0.1), torch.optim.AdamW(biases, lr=1e-2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with lca.record(model, opt_w if hooked == "weights" else opt_b, path=path, overwrite=True) as rec:
                for _ in range(3):
                    opt_w.zero_grad()
                    opt_b.zero_grad()
                    nn.functional.cross_entropy(model(x), y).backward()
                    opt_w.step()
                    opt_b.step()
        named = [w for w in caught if "changed after this recorder's last snapshot (step 3)" in str(w.message)]
        assert len(named) == (1 if warns else 0), [str(w.message) for w in caught]
        ends_trained = all(torch.equal(v, rec[len(rec) - 1][k]) for k, v in model.state_dict().items())
        assert ends_trained == (not warns)


def test_refuses_to_overwrite_what_is_not_its_own(tmp_path):
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="not an lca_notebook store"):
        lca.record(model, opt, path=tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "precious"
    assert os.listdir(tmp_path / "notes") == ["keep.txt"]


def test_an_existing_recording_is_replaced_only_when_asked(tmp_path):
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        with lca.record(model, opt, path=tmp_path / "r", overwrite=True):
            model(torch.ones(1, 2)).sum().backward()
            opt.step()
    with pytest.raises(ValueError, match="overwrite=True"):
        lca.record(model, opt, path=tmp_path / "r")
    assert len(open_path(tmp_path / "r")) == 2


def test_a_second_recorder_on_the_same_path_is_refused_and_the_first_keeps_everything(digits, tmp_path):
    x, y = digits
    snaps, _ = _reference(x, y, steps=6, every=1)
    path = tmp_path / "run.zarr"
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    other = nn.Linear(3, 2)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)

    def second_recorder(step):
        if step == 3:  # while the first one records: another one asks to overwrite the same path
            with pytest.raises(StoreInUseError) as err:
                with lca.record(other, other_opt, path=path, overwrite=True):
                    pass
            assert str(path) in str(err.value) and "this process (record(path=...)" in str(err.value)

    with lca.record(model, opt, path=path, overwrite=True):
        _train(model, opt, x, y, 6, second_recorder)
    _assert_same(open_path(path), snaps)  # the first recording is whole
    with lca.record(other, other_opt, path=path, overwrite=True):  # once it is closed, replacing is allowed
        other(torch.ones(1, 3)).sum().backward()
        other_opt.step()
    assert len(open_path(path)) == 2


def test_the_error_says_what_the_store_really_holds(digits, tmp_path):
    x, y = digits
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = tmp_path / "run.zarr"

    def remove(step):
        if step == 5:
            rec.flush()
            shutil.rmtree(path)  # someone deletes the store while it records

    with pytest.raises(RecordingError) as err:
        with lca.record(model, opt, path=path) as rec:
            _train(model, opt, x, y, 12, remove)
    message = str(err.value)
    assert str(path) in message and "is gone or unreadable" in message and "none of this recording is kept" in message
    assert "are saved there" not in message


def test_a_flipped_bit_in_a_snapshot_is_named(digits, tmp_path):
    x, y = digits
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = tmp_path / "run.zarr"
    with lca.record(model, opt, path=path):
        _train(model, opt, x, y, 4)
    chunk = path / "snapshots_float32" / "c" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[40] ^= 0x01  # one bit of one weight: still a finite float, a silently wrong snapshot without the checksum
    chunk.write_bytes(bytes(data))
    snaps, _ = _reference(x, y, steps=4, every=1)
    _assert_same(open_path(path)[:2], snaps[:2])  # the snapshots before it read as recorded
    with pytest.raises(StoreDamagedError) as err:
        lca.analyze(model, (x, y), path, progress=False)
    message = str(err.value)
    assert "chunk 2.0 of 'snapshots_float32' (snapshots 2..2)" in message and "snapshots_float32/c/2/0" in message
    assert str(path) in message and "record the training again" in message


@pytest.mark.parametrize("value", ["abc", -3, 500])
def test_a_damaged_snapshot_count_is_named(tmp_path, value):
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with lca.record(model, opt, path=tmp_path / "r"):
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
    meta = json.loads((tmp_path / "r" / "zarr.json").read_text())
    meta["attributes"]["n_snapshots"] = value
    (tmp_path / "r" / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(
        StoreDamagedError, match=r"its attribute 'n_snapshots' is .*, expected a whole number in 0\.\.64"
    ):
        open_path(tmp_path / "r")
