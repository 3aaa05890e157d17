"""storage: the zarr helpers both stores share, and the trajectory store's packing, checked file by file."""

import os

import numpy as np
import pytest
import torch
import zarr

from lca_notebook.storage import files
from lca_notebook.storage.trajectories import make_layout, pack


def _store(path, rows=8, chunk=4):
    def write(tmp):
        root = zarr.open_group(tmp, mode="w-", zarr_format=3)
        root.create_array("a", shape=(rows, 3), chunks=(chunk, 3), dtype=np.float64, compressors=None, fill_value=0)

    files.create_atomically(str(path), write)
    files.update_attrs(str(path), lca_notebook="result")
    return str(path)


def test_rows_are_written_whole_and_a_missing_or_truncated_chunk_is_named(tmp_path):
    path = _store(tmp_path / "s.zarr")
    arrays = files.Arrays(path, ["a"])
    arrays.write(0, {"a": np.arange(18.0).reshape(6, 3)})  # chunk 0 whole, chunk 1 half
    np.testing.assert_array_equal(zarr.open_array(path, path="a")[:6], np.arange(18.0).reshape(6, 3))
    files.check_rows(path, "a", 6)
    chunk1 = os.path.join(path, "a", "c", "1", "0")
    with open(chunk1, "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match=r"a/c/1/0 \('a' from row 4\) has 10 bytes instead of 96 \(truncated\)"):
        files.check_rows(path, "a", 6)
    os.remove(chunk1)
    with pytest.raises(ValueError, match="is missing. Everything before row 4 is intact"):
        files.check_rows(path, "a", 6)
    files.check_rows(path, "a", 4)  # the rows before it are fine


def test_attributes_change_atomically_and_leave_no_temporary_file(tmp_path):
    path = _store(tmp_path / "s.zarr")
    files.update_attrs(path, n=1)
    files.update_attrs(path, durable=False, n=2, more="x")
    assert files.read_attrs(path) == {"lca_notebook": "result", "n": 2, "more": "x"}
    assert not [f for f in os.listdir(path) if f.endswith(".partial")]
    with open(os.path.join(path, "zarr.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="is damaged: .*zarr.json cannot be read"):
        files.read_attrs(path)


def test_a_users_folder_is_never_taken_for_a_store(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not an lca_notebook store"):
        files.refuse_foreign(str(folder), "result")
    assert (folder / "notes.txt").read_text() == "mine"
    assert files.refuse_foreign(str(tmp_path / "new"), "result") is None
    (tmp_path / "empty").mkdir()
    assert files.refuse_foreign(str(tmp_path / "empty"), "result") is None
    store = _store(tmp_path / "t.zarr")
    with pytest.raises(ValueError, match="is an lca_notebook result store"):
        files.refuse_foreign(store, "trajectory")


def test_a_failed_creation_leaves_nothing_behind(tmp_path):
    def fail(tmp):
        os.makedirs(tmp)
        raise OSError(28, "No space left on device")

    with pytest.raises(files.StoreWriteError, match="cannot create the store .*No space left"):
        files.create_atomically(str(tmp_path / "s.zarr"), fail)
    assert os.listdir(tmp_path) == []


def test_packing_keeps_every_dtype_bit_for_bit():
    snap = {
        "w": torch.randn(3, 2),
        "steps": torch.tensor(7),
        "h": torch.randn(4).to(torch.bfloat16),
        "b": torch.randn(2),
    }
    layout = make_layout(snap)
    packed = pack(snap, layout)
    assert sorted(packed) == ["bfloat16", "float32", "int64"]
    for e in layout:
        row = torch.from_numpy(packed[e["key"]])
        if e["dtype"] == "bfloat16":
            row = row.view(torch.bfloat16)
        got = row[e["offset"] : e["offset"] + snap[e["name"]].numel()].view(e["shape"])
        assert torch.equal(got, snap[e["name"]]), e["name"]
