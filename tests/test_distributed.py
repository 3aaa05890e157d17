"""analyze(client=...) on a real two-process Dask LocalCluster: the sharded store equals a single-process one,
survives a worker killed mid-shard, and a rerun after a failed shard computes only what is missing."""

import os
import signal
import sys
import threading

import cloudpickle
import numpy as np
import pytest
import torch
import zarr
from torch import nn

import lca_notebook as lca
from lca_notebook import models
from lca_notebook.distributed import Sharding, plan_shards
from lca_notebook.storage import results as store_mod
from lca_notebook.storage.files import read_attrs
from lca_notebook.trajectory import Trajectory

distributed = pytest.importorskip("dask.distributed")

T = 48
CHUNK = 8  # iterations per store chunk here: 6 shards of one chunk each
VARIABLES = (*store_mod.ITERATION_VARS, *store_mod.CHECKPOINT_VARS, store_mod.HASH_VAR)  # every array of a store

# The trajectories and models defined below travel to the workers by value (the workers cannot import tests/).
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _cluster_client():
    import dask

    # A task may be on one worker that dies (it is rescheduled); on a second, Dask gives up with KilledWorker.
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with cluster, distributed.Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def client():
    yield from _cluster_client()


@pytest.fixture
def own_client():
    """A cluster of its own for a test that kills workers: the module's never waits on a nanny's restart (one
    took over 300 s on 2 loaded cores and failed CI)."""
    yield from _cluster_client()


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(store_mod, "CHUNK_ITERATIONS", CHUNK)


@pytest.fixture(scope="module")
def run():
    x, y = models.digits_data()
    snaps = models.train(models.mlp(), (x, y), steps=T, lr=0.1)
    return x, y, snaps


def _reference(tmp_path, x, y, snaps, **options):
    """The single-process store the sharded one must equal."""
    path = tmp_path / "single"
    lca.analyze(models.mlp(), (x, y), snaps, store=path, progress=False, **options)
    return path


def _assert_same_store(got, want):
    for name in VARIABLES:
        a, b = zarr.open_array(str(got), path=name, mode="r")[:], zarr.open_array(str(want), path=name, mode="r")[:]
        assert a.shape == b.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)  # bit for bit: same kernels, same order, one thread each
    attrs = read_attrs(str(got))
    assert attrs["complete"] and attrs["completed_iterations"] == T and attrs["completed_checkpoints"] == T + 1


def _n_shards(path):
    return len(read_attrs(str(path))["shards"]["bounds"])


def test_plan_covers_every_iteration_once_in_whole_chunks():
    for t, chunk, size, threads in [
        (48, 8, None, 2),
        (50, 8, None, 2),
        (200, 64, None, 2),
        (1000, 16, None, 2),
        (50, 8, 20, 1),
        (7, 8, None, 4),
    ]:
        plan = plan_shards(t, chunk, size, threads)
        assert [a for a, _ in plan] == [0] + [b for _, b in plan[:-1]] and plan[-1][1] == t
        assert all(a % chunk == 0 for a, _ in plan)
        if size is not None:
            assert all(b - a == 24 for a, b in plan[:-1])  # 20 rounded up to three chunks of 8
    assert len(plan_shards(1000, 16, None, 2)) >= 8  # at least four per worker thread when T allows
    with pytest.raises(ValueError, match="shard_iterations"):
        plan_shards(10, 4, 0)


def test_sharded_equals_single_process(client, run, tmp_path):
    x, y, snaps = run
    want = _reference(tmp_path, x, y, snaps)
    got = lca.analyze(models.mlp(), (x, y), snaps, store=tmp_path / "sharded", client=client, progress=False)
    _assert_same_store(tmp_path / "sharded", want)
    ref = lca.open(want)
    np.testing.assert_array_equal(got.lca.values, ref.lca.values)
    for by in ("layer", "unit"):
        np.testing.assert_array_equal(got.total(by, 5, 37).values, ref.total(by, 5, 37).values)
    # Each shard evaluates its first snapshot's gradient itself: one evaluation more per shard after the first.
    n = _n_shards(tmp_path / "sharded")
    assert n == T // CHUNK
    evaluations = int(np.asarray(got.dataset["evaluations"]).sum())
    assert got.attrs["gradient_evaluations"] == evaluations + n
    assert ref.attrs["gradient_evaluations"] == evaluations + 1
    # Shards keep each snapshot's hash as a plain run does: a changed middle snapshot is named, sharded or not.
    changed = [dict(s) for s in snaps]
    changed[20] = {k: v + 1e-3 if v.is_floating_point() else v for k, v in changed[20].items()}
    for call in ({"client": client}, {}):
        with pytest.raises(ValueError, match=r"snapshot 20 .*differs from the one the store was computed from"):
            lca.analyze(models.mlp(), (x, y), changed, store=tmp_path / "sharded", progress=False, **call)


def test_a_float64_model_is_sharded_in_float64(client, tmp_path):
    """Shards write a float64 model's LCA as float64, the bits of a single-process store."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 5, dtype=torch.float64), torch.randint(0, 3, (64,))
    model = nn.Linear(5, 3).double()
    snaps = [{k: v + 0.1 * i * torch.ones_like(v) for k, v in model.state_dict().items()} for i in range(17)]
    single = lca.analyze(model, (x, y), snaps, store=tmp_path / "single", progress=False)
    sharded = lca.analyze(
        model, (x, y), snaps, store=tmp_path / "sharded", client=Sharding(client, shard_iterations=8), progress=False
    )
    assert single.lca.dtype == sharded.lca.dtype == np.float64
    np.testing.assert_array_equal(sharded.lca.values, single.lca.values)
    identity = sharded.lca.values.sum(1) + sharded.lca_rest.values - sharded.residual.values
    np.testing.assert_allclose(identity, np.diff(sharded.loss.values), rtol=0, atol=1e-13)


class BNNet(nn.Module):
    """BatchNorm (running statistics move along the path) and a frozen-parameter selection."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.fc1, self.bn, self.fc2 = nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Linear(16, 10)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def test_checkpoint_files_batchnorm_and_parameter_subset(client, run, tmp_path):
    x, y, _ = run
    snaps = models.train(BNNet(), (x, y), steps=21, lr=0.05)
    files = []
    for k, s in enumerate(snaps):
        files.append(tmp_path / f"step_{k}.pt")
        torch.save({"model": s}, files[-1])
    options = dict(method="simpson", parameters=["fc1.*", "bn.*"], batch_size=500)
    lca.analyze(BNNet(), (x, y), files, store=tmp_path / "single", progress=False, **options)
    lca.analyze(
        BNNet(),
        (x, y),
        files,
        client=Sharding(client, shard_iterations=16),
        store=tmp_path / "sharded",
        progress=False,
        **options,
    )
    for name in VARIABLES:
        a = zarr.open_array(str(tmp_path / "sharded"), path=name, mode="r")[:]
        np.testing.assert_array_equal(
            a, zarr.open_array(str(tmp_path / "single"), path=name, mode="r")[:], err_msg=name
        )
    attrs = read_attrs(str(tmp_path / "sharded"))
    assert attrs["shards"]["bounds"] == [[0, 16], [16, 21]]
    assert attrs["gradient_evaluations"] == 2 * 21 + 2  # Simpson: 2T, plus each shard's first snapshot


def test_recorder_store_travels_as_a_path(client, run, tmp_path):
    x, y, _ = run
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with lca.record(model, opt, path=tmp_path / "run.zarr") as rec:
        for i in range(19):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i * 50 : i * 50 + 200]), y[i * 50 : i * 50 + 200]).backward()
            opt.step()
    lca.analyze(
        models.mlp(), (x, y), tmp_path / "run.zarr", store=tmp_path / "single", method="trapezoid", progress=False
    )
    got = lca.analyze(
        models.mlp(), (x, y), rec, store=tmp_path / "sharded", method="trapezoid", client=client, progress=False
    )
    for name in VARIABLES:
        a = zarr.open_array(str(tmp_path / "sharded"), path=name, mode="r")[:]
        np.testing.assert_array_equal(
            a, zarr.open_array(str(tmp_path / "single"), path=name, mode="r")[:], err_msg=name
        )
    assert got.attrs["gradient_evaluations"] == 19 + 3  # trapezoid: T, plus each shard's first snapshot
    assert list(got.dataset["step"].values) == list(range(20))


class KillOnce(Trajectory):
    """Snapshots in memory; reading snapshot ``kill_at`` in a Dask worker SIGKILLs that worker, the first time only."""

    def __init__(self, snaps, kill_at, marker):
        self.snaps, self.kill_at, self.marker = snaps, kill_at, str(marker)

    def __len__(self):
        return len(self.snaps)

    def load(self, k):
        if k == self.kill_at and _in_worker() and not os.path.exists(self.marker):
            with open(self.marker, "w") as f:
                f.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return self.snaps[k]


class KillAlways(KillOnce):
    """Reading snapshot ``kill_at`` in a Dask worker SIGKILLs it every time (a shard that always runs out of memory)."""

    def load(self, k):
        if k == self.kill_at and _in_worker():
            os.kill(os.getpid(), signal.SIGKILL)
        return self.snaps[k]


class FailWhile(Trajectory):
    """Snapshots in memory; reading snapshot ``fail_at`` in a Dask worker raises while ``marker`` exists."""

    def __init__(self, snaps, fail_at, marker):
        self.snaps, self.fail_at, self.marker = snaps, fail_at, str(marker)

    def __len__(self):
        return len(self.snaps)

    def load(self, k):
        if k == self.fail_at and _in_worker() and os.path.exists(self.marker):
            raise OSError(f"snapshot {k} is unreadable (this test's disk failure)")
        return self.snaps[k]


def _in_worker():
    try:
        distributed.get_worker()
        return True
    except ValueError:
        return False


def test_a_worker_killed_mid_shard_gives_the_same_store(own_client, run, tmp_path):
    client = own_client
    x, y, snaps = run
    want = _reference(tmp_path, x, y, snaps)
    pids = set(client.run(os.getpid).values())
    marker = tmp_path / "killed"
    # Snapshot 21 is read in the middle of shard [16, 24): rows 16..20 were computed when the worker died.
    lca.analyze(
        models.mlp(),
        (x, y),
        KillOnce(snaps, 21, marker),
        client=Sharding(client, retries=0),
        store=tmp_path / "sharded",
        progress=False,
    )
    killed = int(marker.read_text())
    assert killed in pids  # a worker of this cluster really died ...
    assert killed not in set(client.run(os.getpid).values())  # ... and the nanny started another
    _assert_same_store(tmp_path / "sharded", want)


def _chunk_stats(path, name, first_row, chunk):
    folder = os.path.join(str(path), name, "c", str(first_row // chunk))
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(folder) for f in fs}


def test_rerun_after_a_failed_shard_computes_only_that_shard(client, run, tmp_path):
    x, y, snaps = run
    want = _reference(tmp_path, x, y, snaps, method="simpson")
    marker = tmp_path / "broken"
    marker.write_text("")
    traj = FailWhile(snaps, 19, marker)  # inside shard [16, 24)
    path = tmp_path / "sharded"
    call = dict(client=Sharding(client, retries=0), store=path, method="simpson", progress=False)
    with pytest.raises(OSError, match="snapshot 19 is unreadable") as info:
        lca.analyze(models.mlp(), (x, y), traj, **call)
    assert any("Run the same call again" in note for note in getattr(info.value, "__notes__", []))
    attrs = read_attrs(str(path))
    assert sorted(map(int, attrs["shards"]["computed"])) == [0, 8, 24, 32, 40]  # the other shards finished
    assert attrs["completed_iterations"] == 16 and not attrs["complete"]
    partial = lca.open(path)  # readable now; loss at checkpoint 16 belongs to the failed shard
    assert partial.n_iterations == 15
    np.testing.assert_array_equal(partial.lca.values, lca.open(want).lca.values[:15])
    before = {a: _chunk_stats(path, "lca", a, CHUNK) for a in (0, 8, 24, 32, 40)}
    assert all(before.values()) and not _chunk_stats(path, "lca", 16, CHUNK)

    marker.unlink()
    result = lca.analyze(models.mlp(), (x, y), traj, **call)
    for a, stats in before.items():  # computed shards were not computed (nor written) again
        assert _chunk_stats(path, "lca", a, CHUNK) == stats, f"shard at {a} was rewritten"
    _assert_same_store(path, want)
    assert result.attrs["gradient_evaluations"] == 2 * T + T // CHUNK  # nothing counted twice


def test_a_run_without_client_finishes_a_half_sharded_store(client, run, tmp_path):
    x, y, snaps = run
    want = _reference(tmp_path, x, y, snaps, method="simpson")
    marker = tmp_path / "broken"
    marker.write_text("")
    path = tmp_path / "sharded"
    with pytest.raises(OSError):
        lca.analyze(
            models.mlp(),
            (x, y),
            FailWhile(snaps, 35, marker),
            client=Sharding(client, retries=0),
            store=path,
            method="simpson",
            progress=False,
        )
    assert read_attrs(str(path))["completed_iterations"] == 32
    lca.analyze(models.mlp(), (x, y), snaps, store=path, method="simpson", progress=False)  # plain StoreSink resume
    _assert_same_store(path, want)


def test_refusals_name_the_culprit_and_create_nothing(client, run, tmp_path):
    x, y, snaps = run
    with pytest.raises(ValueError, match="needs store=PATH"):
        lca.analyze(models.mlp(), (x, y), snaps, client=client, progress=False)
    lock = threading.Lock()

    def locked_loss(out, target):
        with lock:
            return nn.functional.cross_entropy(out, target)

    with pytest.raises(TypeError, match="loss_fn .*locked_loss.* cannot be sent to the Dask workers"):
        lca.analyze(
            models.mlp(), (x, y), snaps, client=client, store=tmp_path / "s", loss_fn=locked_loss, progress=False
        )
    assert not (tmp_path / "s").exists()
    with pytest.raises(TypeError, match="client must be a dask.distributed.Client"):
        lca.analyze(models.mlp(), (x, y), snaps, client="tcp://127.0.0.1:8786", store=tmp_path / "s", progress=False)


def test_a_shard_that_kills_every_worker_is_named_and_the_rest_is_kept(own_client, run, tmp_path):
    client = own_client
    x, y, snaps = run
    path = tmp_path / "sharded"
    marker = tmp_path / "broken"
    marker.write_text("")
    call = dict(client=Sharding(client, retries=0), store=path, method="simpson", progress=False)
    with pytest.raises(OSError):  # every shard but [32, 40) computed first, so only that one is on the dying workers
        lca.analyze(models.mlp(), (x, y), FailWhile(snaps, 35, marker), **call)
    with pytest.raises(
        RuntimeError, match=r"iterations 32\.\.39 \(compute\) was running on every worker that died"
    ) as info:
        lca.analyze(models.mlp(), (x, y), KillAlways(snaps, 35, None), **call)
    assert isinstance(info.value.__cause__, distributed.KilledWorker)
    attrs = read_attrs(str(path))
    assert sorted(map(int, attrs["shards"]["computed"])) == [0, 8, 16, 24, 40]
    assert attrs["completed_iterations"] == 32 and info.value.partial_result.n_iterations == 31


def test_adaptive_stuck_at_max_splits_warns_at_the_callers_line(client, run, tmp_path):
    x, y, snaps = run
    with pytest.warns(UserWarning, match=r"hit max_splits=1 with \|residual\| > tol=1e-12") as caught:
        lca.analyze(
            models.mlp(),
            (x, y),
            snaps[:9],
            method="adaptive",
            tol=1e-12,
            max_splits=1,
            client=client,
            store=tmp_path / "s",
            progress=False,
        )
    assert [w.filename for w in caught if "max_splits" in str(w.message)] == [__file__]
