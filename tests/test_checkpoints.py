"""Checkpoint files as a trajectory: natural order, usual wrappers, and refusals that name the file."""

import copy
import os
import random

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import lca_notebook as lca
from lca_notebook.checkpoints import CheckpointFiles
from lca_notebook.sources import open_path

STEPS = [0, 1, 2, 3, 10, 11, 20]  # step_2 must come before step_10, step_3 before step_11


@pytest.fixture(scope="module")
def run():
    d = load_digits()
    x = torch.tensor(d.data[:300] / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target[:300])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    snaps = {0: copy.deepcopy(model.state_dict())}
    for step in range(1, max(STEPS) + 1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if step in STEPS:
            snaps[step] = copy.deepcopy(model.state_dict())
    return model, x, y, snaps


def _wrap(sd, i):
    # Each file in another usual form: bare state_dict, or under one of the usual keys with extras.
    kind = i % 5
    if kind == 0:
        return sd
    key = ["model", "state_dict", "model_state_dict", "net"][kind - 1]
    return {key: sd, "epoch": i, "optimizer": {"lr": 0.2}}


def _write_dir(tmp_path, snaps):
    d = tmp_path / "ckpts"
    d.mkdir()
    order = list(snaps)
    random.Random(3).shuffle(order)  # written (and listed) in no particular order
    for i, step in enumerate(order):
        torch.save(_wrap(snaps[step], i), d / f"step_{step}.pt")
    (d / "notes.txt").write_text("ignored: not a checkpoint suffix")
    return d


def test_directory_is_read_in_natural_order_and_matches_the_snapshots(run, tmp_path):
    model, x, y, snaps = run
    d = _write_dir(tmp_path, snaps)
    traj = open_path(d)
    assert [os.path.basename(p) for p in traj.paths] == [f"step_{s}.pt" for s in STEPS]
    assert traj.steps == STEPS
    ref = lca.analyze(model, (x, y), [snaps[s] for s in STEPS], method="simpson", progress=False)
    for source in (d, str(d), [d / f"step_{s}.pt" for s in STEPS]):
        got = lca.analyze(model, (x, y), source, method="simpson", progress=False)
        np.testing.assert_array_equal(got.lca.values, ref.lca.values)
        np.testing.assert_array_equal(got.dataset["step"].values, STEPS)


def test_a_hugging_face_trainers_output_folder_is_a_trajectory(run, tmp_path):
    """Trainer's output_dir: a checkpoint-<step> folder a snapshot, weights in safetensors (whole or in shards) or
    pytorch_model.bin, beside files that are never read (training_args.bin is a pickle of Python objects)."""
    from safetensors.torch import save_file

    model, x, y, snaps = run
    out = tmp_path / "trainer_output"
    for i, step in enumerate(reversed(STEPS)):
        folder = out / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        sd = {k: v.contiguous() for k, v in snaps[step].items()}
        if i % 3 == 0:
            save_file(sd, folder / "model.safetensors")
        elif i % 3 == 1:  # shards, as large models are saved
            names = list(sd)
            save_file({k: sd[k] for k in names[:2]}, folder / "model-00001-of-00002.safetensors")
            save_file({k: sd[k] for k in names[2:]}, folder / "model-00002-of-00002.safetensors")
        else:
            torch.save(sd, folder / "pytorch_model.bin")
        torch.save(_Payload(str(tmp_path / "payload_ran")), folder / "training_args.bin")
        torch.save({"state": {}}, folder / "optimizer.pt")
    (out / "runs").mkdir()  # TensorBoard logs: not a checkpoint
    traj = open_path(out)
    assert traj.steps == STEPS
    ref = lca.analyze(model, (x, y), [snaps[s] for s in STEPS], method="simpson", progress=False)
    got = lca.analyze(model, (x, y), out, method="simpson", progress=False)
    np.testing.assert_array_equal(got.lca.values, ref.lca.values)
    np.testing.assert_array_equal(got.dataset["step"].values, STEPS)
    assert not (tmp_path / "payload_ran").exists()


def test_a_list_of_files_keeps_its_order_and_a_shuffled_numbered_list_is_refused(run, tmp_path):
    model, x, y, snaps = run
    d = tmp_path / "named"
    d.mkdir()
    names = ["init.pt", "middle.pt", "final.pt"]  # training order, not alphabetical
    for name, k in zip(names, (0, 3, 20), strict=False):
        torch.save(snaps[k], d / name)
    got = lca.analyze(model, (x, y), [d / n for n in names], method="simpson", progress=False)
    ref = lca.analyze(model, (x, y), [snaps[0], snaps[3], snaps[20]], method="simpson", progress=False)
    np.testing.assert_array_equal(got.loss.values, ref.loss.values)
    assert got.loss.values[-1] < got.loss.values[0]  # really trained forwards

    numbered = _write_dir(tmp_path, snaps)
    shuffled = [numbered / f"step_{s}.pt" for s in reversed(STEPS)]  # as os.listdir or glob may give them
    with pytest.raises(ValueError, match=r"not in the order of the numbers in their names \(step_\d+\.pt.*natural_key"):
        lca.analyze(model, (x, y), shuffled, progress=False)


def test_missing_tensor_names_file_and_tensor(run, tmp_path):
    model, x, y, snaps = run
    d = _write_dir(tmp_path, snaps)
    broken = {k: v for k, v in snaps[10].items() if k != "2.bias"}
    torch.save({"model": broken}, d / "step_10.pt")
    with pytest.raises(ValueError) as err:
        lca.analyze(model, (x, y), d, progress=False)
    assert "step_10.pt" in str(err.value) and "'2.bias'" in str(err.value)


def test_a_file_that_is_not_a_checkpoint_is_named(run, tmp_path):
    model, x, y, snaps = run
    d = _write_dir(tmp_path, snaps)
    (d / "step_3.pt").write_bytes(b"this is a text file, not a checkpoint\n")
    with pytest.raises(ValueError, match=r"step_3\.pt.*not a PyTorch checkpoint") as err:
        lca.analyze(model, (x, y), d, progress=False)
    assert "run code" not in str(err.value)  # not taken for a pickle refused for safety
    np.save(d / "arr.npy", np.zeros(3))
    os.replace(d / "arr.npy", d / "step_3.pt")  # numpy's format: no pickle, no zip
    with pytest.raises(ValueError, match=r"step_3\.pt.*not a PyTorch checkpoint.*starts with b'\\x93NUM'"):
        CheckpointFiles([d / "step_3.pt"])[0]
    torch.save({"epoch": 3, "notes": "no tensors"}, d / "step_3.pt")
    with pytest.raises(ValueError, match=r"step_3\.pt.*no state_dict"):
        CheckpointFiles([d / "step_3.pt"])[0]
    torch.save([1, 2, 3], d / "step_3.pt")
    with pytest.raises(ValueError, match=r"step_3\.pt.*not a state_dict"):
        CheckpointFiles([d / "step_3.pt"])[0]


class _Payload:
    """Unpickling this calls os.mkdir(marker): code execution, which must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(run, tmp_path):
    model, x, y, snaps = run
    d = _write_dir(tmp_path, snaps)
    marker = tmp_path / "payload_ran"
    torch.save({"model": snaps[2], "extra": _Payload(str(marker))}, d / "step_2.pt")
    with pytest.raises(ValueError) as err:
        lca.analyze(model, (x, y), d, progress=False)
    assert "step_2.pt" in str(err.value) and "refused" in str(err.value)
    assert not marker.exists()
    # The payload is live: an unsafe load does run it (this is what weights_only=True prevented).
    torch.load(d / "step_2.pt", weights_only=False)
    assert marker.exists()


def test_paths_that_hold_no_trajectory(run, tmp_path):
    model, x, y, snaps = run
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(ValueError, match="holds no checkpoint files.*readme.md"):
        open_path(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no trajectory"):
        open_path(tmp_path / "nowhere")
    result = lca.analyze(model, (x, y), [snaps[0], snaps[1]], progress=False, store=tmp_path / "res")
    assert result.n_iterations == 1
    with pytest.raises(ValueError, match="LCA result store, not a trajectory"):
        open_path(tmp_path / "res")


def test_lightnings_last_ckpt_is_not_read_twice(run, tmp_path):
    model, x, y, snaps = run
    d = tmp_path / "lightning"
    d.mkdir()
    for k, step in enumerate(STEPS):
        torch.save({"state_dict": snaps[step], "epoch": k}, d / f"epoch={k}-step={step}.ckpt")
    torch.save(
        {"state_dict": snaps[STEPS[-1]], "epoch": len(STEPS) - 1}, d / "last.ckpt"
    )  # Lightning's copy of the newest
    traj = open_path(d)
    assert traj.steps == STEPS
    result = lca.analyze(model, (x, y), d, method="simpson", progress=False)
    assert result.n_iterations == len(STEPS) - 1


def test_an_unnumbered_copy_beside_numbered_checkpoints_is_left_out_with_a_warning(run, tmp_path):
    """best.pt sorts before step_0.pt by name: read, it would be snapshot 0 and the first iteration would run from
    the best model back to the untrained one."""
    snaps = run[-1]
    d = _write_dir(tmp_path, snaps)
    torch.save(snaps[STEPS[1]], d / "best.pt")
    with pytest.warns(UserWarning, match=r"left out best\.pt, beside checkpoints numbered by step"):
        traj = open_path(d)
    assert [os.path.basename(p) for p in traj.paths] == [f"step_{s}.pt" for s in STEPS]
    assert traj.steps == STEPS
    only = tmp_path / "unnumbered"
    only.mkdir()
    for name, step in (("init.pt", 0), ("trained.pt", STEPS[-1])):
        torch.save(snaps[step], only / name)
    assert len(open_path(only)) == 2  # nothing numbered: every file is read, in order of the names


def test_an_integer_tensor_in_a_checkpoint_file_is_refused_naming_the_file(run, tmp_path):
    model, x, y, snaps = run
    d = _write_dir(tmp_path, snaps)
    rounded = dict(snaps[11], **{"0.weight": snaps[11]["0.weight"].mul(100).round().to(torch.int64)})
    torch.save(rounded, d / "step_11.pt")  # the middle of the run: read by the engine, not by the layout
    with pytest.raises(TypeError) as err:
        lca.analyze(model, (x, y), d, method="simpson", progress=False)
    message = str(err.value)
    assert "step_11.pt" in message and "(snapshot 5)" in message and "'0.weight' is int64" in message
    assert "float32" in message
    assert err.value.partial_result.n_iterations == 4  # iterations 0..3 were computed before it, and are kept
