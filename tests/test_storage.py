"""storage: the zarr helpers both stores share, and the trajectory store's packing, checked file by file."""

import os
import threading

import numpy as np
import pandas as pd
import pytest
import torch
import zarr

import lca_notebook as lca
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


def _checksummed_store(path, rows=8, chunk=4):
    def write(tmp):
        root = zarr.open_group(tmp, mode="w-", zarr_format=3)
        root.create_array(
            "a", shape=(rows, 3), chunks=(chunk, 3), dtype=np.float64, compressors=files.checksummed(), fill_value=0
        )

    files.create_atomically(str(path), write)
    files.update_attrs(str(path), lca_notebook="result", format=files.RESULT_FORMAT)
    return str(path)


def _flip_a_bit(file, at=5):
    with open(file, "rb") as f:
        data = bytearray(f.read())
    data[at] ^= 0x10
    with open(file, "wb") as f:
        f.write(bytes(data))


def test_a_flipped_bit_fails_on_read_naming_the_store_array_chunk_and_file(tmp_path):
    path = _checksummed_store(tmp_path / "s.zarr")
    files.Arrays(path, ["a"]).write(0, {"a": np.arange(24.0).reshape(8, 3)})
    chunk1 = os.path.join(path, "a", "c", "1", "0")
    assert os.path.getsize(chunk1) == 4 * 3 * 8 + 4  # the raw chunk, then its CRC32C
    files.check_rows(path, "a", 8)  # opening checks sizes: still whole
    _flip_a_bit(chunk1)
    files.check_rows(path, "a", 8)  # the size cannot see a flipped bit ...
    arr = files.open_array(path, "a", "r")
    np.testing.assert_array_equal(arr[:4], np.arange(12.0).reshape(4, 3))  # ... other chunks still read
    with pytest.raises(files.StoreDamagedError) as err:  # ... the checksum does, on read
        arr[2:6]
    message = str(err.value)
    assert path in message and "chunk 1.0 of 'a' (rows 4..7)" in message and "a/c/1/0" in message
    assert "checksum" in message and "restore the store from a backup" in message
    assert isinstance(err.value, ValueError)  # caught as before by code that expects a ValueError
    with pytest.raises(files.StoreDamagedError, match="chunk 1.0 of 'a'"):  # a partial write reads it too
        files.open_array(path, "a")[5] = 1.0


def test_the_size_check_counts_the_checksum(tmp_path):
    path = _checksummed_store(tmp_path / "s.zarr")
    files.Arrays(path, ["a"]).write(0, {"a": np.ones((8, 3))})
    chunk0 = os.path.join(path, "a", "c", "0", "0")
    with open(chunk0, "r+b") as f:
        f.truncate(4 * 3 * 8)  # the data whole, its checksum cut off
    with pytest.raises(files.StoreDamagedError, match=r"a/c/0/0 \('a' from row 0\) has 96 bytes instead of 100"):
        files.check_rows(path, "a", 8)


def test_damaged_or_newer_attributes_are_named(tmp_path):
    path = _store(tmp_path / "s.zarr")
    for value in ("abc", -3, 9, 2.5, True):
        with pytest.raises(files.StoreDamagedError, match=r"attribute 'n' is .*, expected a whole number in 0\.\.8"):
            files.int_attr(path, {"n": value}, "n", high=8)
    assert files.int_attr(path, {"n": 8}, "n", high=8) == 8
    newer = files.FORMAT + 1
    with pytest.raises(ValueError, match=rf"format {newer}, written by a newer lca_notebook.*Upgrade"):
        files.check_format(path, {"format": newer})
    assert files.check_format(path, {}) == 1  # stores from before formats were numbered


def test_names_on_parameter_are_stored_as_codes_and_format_2_strings_still_read(tmp_path):
    import json

    import lca_notebook as lca
    from lca_notebook.result import LCAResult

    r = LCAResult.example()
    path = r.save(tmp_path / "r.zarr")
    with open(os.path.join(path, "tensor", "zarr.json")) as f:
        meta = json.load(f)
    assert meta["data_type"] == "int32" and meta["attributes"]["categories"] == ["fc1.weight", "fc1.bias", "fc2.weight"]
    back = lca.open(path)
    np.testing.assert_array_equal(back.dataset["tensor"].values, r.dataset["tensor"].values)
    np.testing.assert_array_equal(back.dataset["layer"].values, r.dataset["layer"].values)
    # Read back as held in memory: codes into the names (a pandas Categorical), not 10M strings.
    for name in ("tensor", "layer"):
        assert isinstance(r.dataset[name].dtype, pd.CategoricalDtype)
        assert isinstance(back.dataset[name].dtype, pd.CategoricalDtype)
        assert "categories" not in back.dataset[name].attrs
    # Format 2 kept the names as variable-length strings: written that way, read the same.
    ds = r.dataset.assign_coords({k: r.dataset[k].astype(object) for k in ("tensor", "layer")})
    ds.attrs |= {files.KIND: "result", "format": 2, "saved": 1}
    old = str(tmp_path / "old.zarr")
    encoding = {str(k): {"compressors": files.checksummed()} for k in [*ds.data_vars, *ds.coords]}
    ds.to_zarr(old, zarr_format=3, consolidated=False, encoding=encoding, write_empty_chunks=True)  # as format 2 did
    np.testing.assert_array_equal(lca.open(old).dataset["tensor"].values, r.dataset["tensor"].values)
    # A code past the names is damage, named.
    for codes, names in (([0, 3], ["a", "b", "c"]), ([], "abc"), ([0], ["a", 1]), ([0], ["a", "a"])):
        with pytest.raises(
            files.StoreDamagedError, match=r"attribute 'categories' of its coordinate 'tensor'.*tensor/zarr"
        ):
            files.decoded_names(path, "tensor", np.array(codes, np.int32), {"categories": names})


def test_one_writer_per_path_in_this_process(tmp_path):
    target = str(tmp_path / "s.zarr")
    held = files.lock(target, "record(path=...)")
    with pytest.raises(files.StoreInUseError) as err:
        files.lock(target, "LCAResult.save")
    assert target in str(err.value) and "this process (record(path=...)" in str(err.value)
    held.reclaimable = True  # an idle holder (a result store between runs) hands over to a writer here ...
    outcome = []
    other = threading.Thread(target=lambda: outcome.append(_try_lock(target)))
    other.start()
    other.join()
    assert outcome == ["StoreInUseError"]  # ... in its own thread only: another thread may be about to run it
    again = files.lock(target, "analyze(store=...)")
    held.release()  # ... and its own release no longer frees the path
    with pytest.raises(files.StoreInUseError):
        files.lock(target, "LCAResult.save")
    again.release()
    files.lock(target, "LCAResult.save").release()
    assert os.listdir(tmp_path) == []  # the lock file goes with the lock


def _try_lock(target):
    try:
        files.lock(target, "a thread").release()
        return "locked"
    except files.StoreInUseError:
        return "StoreInUseError"


LOCKER = """
import sys
import lca_notebook as lca
from lca_notebook.storage import files
held = files.lock(sys.argv[1], "a test")
print("locked", flush=True)
sys.stdin.read()  # hold it until killed
"""


def test_a_killed_writer_never_blocks_the_next_one(tmp_path):
    import signal
    import subprocess
    import sys

    target = str(tmp_path / "s.zarr")
    proc = subprocess.Popen(
        [sys.executable, "-c", LOCKER, target], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stdout.readline().decode().strip() == "locked", proc.stderr.read().decode()
        with pytest.raises(files.StoreInUseError, match=rf"{target}.* is being written by process {proc.pid} \(a test"):
            files.lock(target, "LCAResult.save")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert os.path.exists(files._lock_file(target))  # left behind by the kill, but no longer locked
    files.lock(target, "LCAResult.save").release()


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_a_replacement_is_all_or_nothing(tmp_path, kind):
    target = str(tmp_path / ("s.zarr" if kind == "folder" else "s.nc"))

    def write(content):
        def go(tmp):
            if kind == "folder":
                os.makedirs(tmp)
                with open(os.path.join(tmp, "data"), "w") as f:
                    f.write(content)
            else:
                with open(tmp, "w") as f:
                    f.write(content)

        return go

    def read():
        with open(os.path.join(target, "data") if kind == "folder" else target) as f:
            return f.read()

    files.replace_atomically(target, write("old"))
    assert read() == "old"

    def fail(tmp):
        write("half")(tmp)
        raise OSError(28, "No space left on device")

    with pytest.raises(files.StoreWriteError, match="what was there before is unchanged"):
        files.replace_atomically(target, fail)
    assert read() == "old"
    files.replace_atomically(target, write("new"))
    assert read() == "new"
    assert os.listdir(tmp_path) == [os.path.basename(target)]  # no temporary left beside it


def test_a_path_under_home_is_the_home_folders_for_save_and_open(tmp_path, monkeypatch):
    """save('~/run.nc') wrote <cwd>/~/run.nc (a folder named ~), while lca.open('~/run.nc') looked in $HOME."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    r = lca.LCAResult.example()
    for name in ("run.nc", "run.zarr"):
        written = r.save(f"~/{name}")
        assert written == str(tmp_path / "home" / name)
        assert lca.open(f"~/{name}").lca.equals(r.lca)
    assert not (tmp_path / "~").exists()


def test_a_store_open_in_this_process_is_not_replaced_under_its_readers(tmp_path):
    """A zarr result is read chunk by chunk by path: replaced while open, the open result read the new files as its
    own (nan, 0 sums) without a word. Replacing it waits until no result reads it."""
    import gc

    path = lca.LCAResult.example().save(tmp_path / "run.zarr")
    opened = lca.open(path)
    other = lca.LCAResult(lca.LCAResult.example().dataset.isel(iteration=slice(0, 2), checkpoint=slice(0, 3)))
    with pytest.raises(ValueError, match=r"run\.zarr' is open in this process"):
        other.save(path, overwrite=True)
    assert float(opened.total("layer").sum()) == pytest.approx(float(lca.LCAResult.example().total("layer").sum()))
    del opened
    gc.collect()
    other.save(path, overwrite=True)
    assert lca.open(path).n_iterations == 2
