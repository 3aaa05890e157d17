"""sources: everything a user may pass as ``trajectory`` becomes the right Trajectory, or a clear error."""

import os

import pytest
import torch

import lca_notebook as lca
from lca_notebook.checkpoints import CheckpointFiles
from lca_notebook.sources import as_trajectory
from lca_notebook.storage.trajectories import RecordedTrajectory
from lca_notebook.trajectory import SnapshotList


def _snaps(n=3):
    return [{"w": torch.full((2,), float(k))} for k in range(n)]


def test_lists_trajectories_and_recorders_pass_through(tmp_path):
    snaps = _snaps()
    assert isinstance(as_trajectory(snaps), SnapshotList)
    traj = lca.Trajectory.from_list(snaps)
    assert as_trajectory(traj) is traj

    class Holder:  # anything with as_trajectory(): a Lightning callback, a recorder
        def as_trajectory(self):
            return traj

    assert as_trajectory(Holder()) is traj


def test_paths_become_checkpoint_files_or_recorder_stores(tmp_path):
    d = tmp_path / "ckpts"
    d.mkdir()
    for k, s in enumerate(_snaps()):
        torch.save(s, d / f"step_{k}.pt")
    torch.save(_snaps()[-1], d / "last.ckpt")  # Lightning's copy of the newest: not one more snapshot
    traj = as_trajectory(d)
    assert isinstance(traj, CheckpointFiles) and len(traj) == 3 and traj.steps == [0, 1, 2]
    files = [d / "step_0.pt", d / "step_2.pt"]
    assert [os.path.basename(p) for p in as_trajectory(files).paths] == ["step_0.pt", "step_2.pt"]
    with pytest.raises(ValueError, match="not in the order of the numbers"):
        as_trajectory(files[::-1])

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with lca.record(model, opt, path=tmp_path / "run.zarr"):
        opt.zero_grad()
        model(torch.ones(3, 2)).sum().backward()
        opt.step()
    assert isinstance(as_trajectory(tmp_path / "run.zarr"), RecordedTrajectory)
    assert isinstance(as_trajectory(str(tmp_path / "run.zarr")), RecordedTrajectory)


def test_what_is_not_a_trajectory_is_named():
    with pytest.raises(TypeError, match="trajectory is a int"):
        as_trajectory(3)
    with pytest.raises(FileNotFoundError, match="no trajectory at"):
        as_trajectory("/nonexistent/run.zarr")


def test_a_result_store_is_not_taken_for_a_trajectory(tmp_path):
    path = lca.LCAResult.example().save(tmp_path / "r.zarr")
    with pytest.raises(ValueError, match="LCA result store, not a trajectory|is not a recorded trajectory"):
        as_trajectory(path)


def test_snapshots_that_share_memory_or_do_not_move_are_named():
    from lca_notebook.trajectory import SnapshotList, stillness

    live = {"w": torch.zeros(3), "b": torch.ones(2)}
    copies = [{k: v.clone() + i for k, v in live.items()} for i in range(3)]
    assert stillness(SnapshotList(copies), copies[0], copies[-1]) is None
    same = [live] * 4  # model.state_dict() appended at every step, never copied
    why = stillness(SnapshotList(same), live, live)
    assert why.startswith("every snapshot holds the very same tensors") and "v.detach().clone()" in why
    partial = [copies[0], live, dict(live), dict(live), copies[2]]  # dict() copies the dict, not the tensors
    why = stillness(SnapshotList(partial), partial[0], partial[-1])
    assert why.startswith("snapshots 1..2 hold the very same tensors") and "iterations (1..2)" in why
    # Equal values that are not shared memory: only the ends are compared (cheap), and say so if they are equal.
    loaded = lca.Trajectory.from_callable(lambda k: {k2: v.clone() for k2, v in live.items()}, 3)
    why = stillness(loaded, loaded[0], loaded[2])
    assert why.startswith("the first and the last snapshot (2) hold the same values")
    # A frozen tensor shared between snapshots is not a warning: the trainable ones moved.
    frozen = torch.ones(2)
    mixed = [{"w": torch.full((3,), float(i)), "b": frozen} for i in range(3)]
    assert stillness(SnapshotList(mixed), mixed[0], mixed[-1]) is None
