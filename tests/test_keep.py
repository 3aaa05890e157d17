"""analyze(keep=...): a reduced result equals numpy sums and counts of a keep="parameter" run on the same trajectory
(counts exactly, sums to float rounding), in memory, from a store, after a resume and sharded; what it cannot
answer raises an error naming keep=."""

import json
import re
import sys

import cloudpickle
import numpy as np
import pytest
import torch
import zarr
from torch import nn

import lca_notebook as lca
from lca_notebook import analyses, models, sinks
from lca_notebook.result import ReducedResultError
from lca_notebook.storage import results as store_mod
from lca_notebook.storage.files import checksummed

T = 11  # with 4 iterations per chunk: two full chunks and a partial one
KEEPS = ("unit", "tensor", "layer")
ORDER = ("parameter", "unit", "tensor", "layer", "total")

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(store_mod, "CHUNK_ITERATIONS", 4)


@pytest.fixture(scope="module")
def run():
    x, y = models.digits_data()
    x, y = x[:300], y[:300]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10))
    snaps = models.train(model, (x, y), steps=T, lr=0.3, batch_size=100)
    full = lca.analyze(model, (x, y), snaps, method="simpson", progress=False)
    return model, x, y, snaps, full


def _members(full, by):
    """Boolean masks of each group's parameters, from the coordinates (not from the library's group tables)."""
    ds = full.dataset
    if by == "total":
        return [np.ones(full.n_parameters, bool)]
    if by == "unit":
        keys = [f"{lay}[{u}]" for lay, u in zip(ds["layer"].values, ds["unit"].values, strict=True)]
    else:
        keys = list(ds[by].values)
    labels = list(dict.fromkeys(keys))
    keys = np.asarray(keys)
    return [keys == label for label in labels]


def assert_reduced_matches(reduced, full, keep):
    """Every number a reduced result keeps, against numpy on the keep="parameter" run's lca."""
    lca64 = full.lca.values.astype(np.float64)
    assert reduced.keep == keep and reduced.n_iterations == full.n_iterations
    for by in ORDER[ORDER.index(keep) :]:
        masks = _members(full, by)
        sums = np.stack([lca64[:, m].sum(axis=1) for m in masks], axis=1)
        np.testing.assert_allclose(reduced.per_iteration(by).values, sums, rtol=1e-9, atol=1e-12, err_msg=by)
        np.testing.assert_allclose(reduced.total(by, 3, 9).values, sums[3:9].sum(0), rtol=1e-9, atol=1e-12)
        f = reduced.fractions(by)
        for name, cmp in (("helped", np.less), ("hurt", np.greater), ("zero", np.equal)):
            counts = np.stack([cmp(lca64[:, m], 0).sum(axis=1) / m.sum() for m in masks], axis=1)
            want = counts[:, 0] if by == "total" else counts
            if name == "zero":  # 1 - helped - hurt: exact to the last rounding
                np.testing.assert_allclose(f[name].values, want, rtol=0, atol=1e-12, err_msg=f"{name} by {by}")
            else:
                np.testing.assert_array_equal(f[name].values, want, err_msg=f"{name} by {by}")
            np.testing.assert_array_equal(f[name].values, full.fractions(by)[name].values)  # exactly the full run's
    np.testing.assert_allclose(reduced.parameter_total().values, lca64.sum(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(reduced.total("parameter").values, lca64.sum(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(reduced.iterations_helped().values, (lca64 < 0).sum(0))
    np.testing.assert_array_equal(reduced.loss.values, full.loss.values)
    np.testing.assert_array_equal(reduced.residual.values, full.residual.values)
    np.testing.assert_allclose(reduced.reconstructed_loss().values, full.reconstructed_loss().values, rtol=1e-12)


@pytest.mark.parametrize("keep", KEEPS)
def test_reduced_in_memory_equals_numpy_on_the_full_run(run, keep):
    model, x, y, snaps, full = run
    reduced = lca.analyze(model, (x, y), snaps, method="simpson", keep=keep, progress=False)
    assert "lca" not in reduced.dataset
    assert_reduced_matches(reduced, full, keep)


@pytest.mark.parametrize("keep", KEEPS)
def test_reduced_store_equals_numpy_and_is_small(run, keep, tmp_path):
    model, x, y, snaps, full = run
    stored = lca.analyze(model, (x, y), snaps, method="simpson", keep=keep, store=tmp_path / "s", progress=False)
    assert_reduced_matches(stored, full, keep)
    assert_reduced_matches(lca.open(tmp_path / "s"), full, keep)
    assert not (tmp_path / "s" / "lca").exists() and not (tmp_path / "s" / "prefix_parameter").exists()
    # saved and read back whole, and replaced when asked: a saved reduced result is a result (no `lca` in it)
    for name in ("copy.zarr", "copy.nc"):
        assert_reduced_matches(lca.open(stored.save(tmp_path / name)), full, keep)
        assert_reduced_matches(lca.open(stored.save(tmp_path / name, overwrite=True)), full, keep)


def test_a_reduced_store_resumes_after_ctrl_c_mid_chunk(run, tmp_path):
    model, x, y, snaps, full = run
    count = [0]
    stop = [14]  # simpson: 2 evaluations per iteration (plus the first and 3 checks): Ctrl-C in iteration 5 (chunk 1)

    def loss_fn(out, target):
        count[0] += 1
        if stop[0] is not None and count[0] > stop[0]:
            raise KeyboardInterrupt
        return nn.functional.cross_entropy(out, target)

    path = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt) as err:
        lca.analyze(model, (x, y), snaps, loss_fn=loss_fn, method="simpson", keep="unit", store=path, progress=False)
    done = json.loads((path / "zarr.json").read_text())["attributes"]["completed_iterations"]
    assert 4 < done < 8  # a partial chunk was kept
    partial = err.value.partial_result
    assert partial.n_iterations == done
    np.testing.assert_allclose(
        partial.parameter_total().values, full.lca.values[:done].astype(np.float64).sum(0), rtol=1e-9, atol=1e-12
    )
    with pytest.raises(ValueError, match="keep='unit'"):  # another keep never continues it
        lca.analyze(model, (x, y), snaps, loss_fn=loss_fn, method="simpson", keep="layer", store=path, progress=False)
    stop[0], before = None, count[0]
    resumed = lca.analyze(
        model, (x, y), snaps, loss_fn=loss_fn, method="simpson", keep="unit", store=path, progress=False
    )
    assert count[0] - before < 2 * T  # only the rest was computed (an uninterrupted run takes 2 T + 1)
    assert_reduced_matches(resumed, full, "unit")


def test_bad_keep_values_and_per_parameter_questions_give_clear_errors(run, tmp_path):
    model, x, y, snaps, _ = run
    for bad in ("neuron", "total", None, 3):
        with pytest.raises(ValueError, match="keep must be one of 'parameter', 'unit', 'tensor', 'layer', 'auto'"):
            lca.analyze(model, (x, y), snaps, keep=bad, progress=False)
    reduced = lca.analyze(model, (x, y), snaps[:4], method="simpson", keep="tensor", progress=False)
    for call in (
        lambda: reduced.lca,
        lambda: reduced.sel(layer="0"),
        lambda: reduced.total("parameter", 0, 2),
        lambda: reduced.per_iteration("unit"),
        lambda: reduced.fractions("unit"),
        lambda: reduced.fractions("tensor", uncertain=True),
    ):
        with pytest.raises(ReducedResultError, match=r"keep='tensor'.*analyze\(\.\.\., keep="):
            call()
    # the message names the call that needs the finer data, and lca.ReducedResultError is an lca.LCAError
    for name, call in (
        ("per_iteration(by='unit')", lambda: reduced.per_iteration("unit")),
        ("cumulative(by='unit')", lambda: reduced.cumulative("unit")),
        ("total(by='unit')", lambda: reduced.total("unit")),
        ("per_window(by='unit')", lambda: analyses.per_window(reduced, by="unit")),
    ):
        with pytest.raises(lca.LCAError, match=re.escape(name) + " needs each unit's LCA at each iteration"):
            call()
    assert lca.ReducedResultError is ReducedResultError and reduced.layers == ["0", "2"]
    assert all(type(n) is str for n in reduced.layers + reduced.tensors)
    with pytest.raises(ValueError, match=r"granularity='unit' is finer than this result keeps.*choose tensor, layer"):
        lca.explore(reduced, granularity="unit")
    assert lca.explore(reduced).granularity.value == "tensor"  # the finest it keeps, by default
    # a store computed with keep="parameter" is not continued with another keep either
    lca.analyze(model, (x, y), snaps[:4], method="simpson", store=tmp_path / "p", progress=False)
    with pytest.raises(ValueError, match="computed with keep='parameter'"):
        lca.analyze(model, (x, y), snaps[:4], method="simpson", keep="unit", store=tmp_path / "p", progress=False)


def test_auto_picks_the_finest_granularity_that_fits_the_budget(run, monkeypatch):
    model, x, y, snaps, full = run
    groups = full.groups
    sizes = {keep: sinks.estimated_bytes(keep, groups, T) for keep in ("parameter", *KEEPS)}
    assert sizes["parameter"] >= T * full.n_parameters * 4  # at least the float32 LCA
    assert sizes["parameter"] > sizes["unit"] > sizes["tensor"] > sizes["layer"]
    cases = [(sizes["parameter"], "parameter"), (sizes["parameter"] - 1, "unit"), (sizes["unit"] - 1, "tensor")]
    cases += [(sizes["tensor"] - 1, "layer"), (0, "layer")]
    for budget, want in cases:
        monkeypatch.setattr(sinks, "KEEP_BUDGET", budget)
        r = lca.analyze(model, (x, y), snaps, method="simpson", keep="auto", progress=False)
        assert r.keep == want, (budget, r.keep)


def test_an_old_store_with_a_prefix_row_per_checkpoint_gives_the_same_sums(run, tmp_path):
    """Stores written before compact prefix sums (prefix_parameter on checkpoint) still open and sum the same."""
    model, x, y, snaps, full = run
    path = tmp_path / "old"
    lca.analyze(model, (x, y), snaps, method="simpson", store=path, progress=False)
    lca64 = full.lca.values.astype(np.float64)
    prefix = np.concatenate([np.zeros((1, lca64.shape[1])), np.cumsum(lca64, axis=0)])
    root = zarr.open_group(str(path), mode="r+", zarr_format=3)
    del root["prefix_parameter"]
    root.create_array(
        "prefix_parameter", data=prefix, chunks=(4, lca64.shape[1]), compressors=checksummed(),
        dimension_names=("checkpoint", "parameter"),
    )  # fmt: skip
    attrs = json.loads((path / "zarr.json").read_text())["attributes"]
    attrs.pop("prefix_stride")
    (path / "zarr.json").write_text(json.dumps({**json.loads((path / "zarr.json").read_text()), "attributes": attrs}))
    old = lca.open(path)
    assert old.dataset["prefix_parameter"].dims == ("checkpoint", "parameter")
    for a, b in [(0, T), (3, 9), (5, 5), (10, 11)]:
        np.testing.assert_allclose(old.total("parameter", a, b).values, lca64[a:b].sum(0), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="before compact prefix sums"):
        lca.analyze(model, (x, y), snaps, method="simpson", store=path, progress=False)


@pytest.mark.slow
def test_sharded_reduced_store_equals_numpy_and_a_single_process_store(run, tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    from lca_notebook.distributed import Sharding

    model, x, y, snaps, full = run
    single = tmp_path / "single"
    lca.analyze(model, (x, y), snaps, method="simpson", keep="unit", store=single, progress=False)
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with cluster, distributed.Client(cluster) as client:
        sharded = lca.analyze(
            model, (x, y), snaps, method="simpson", keep="unit", store=tmp_path / "sharded",
            client=Sharding(client, shard_iterations=4), progress=False,
        )  # fmt: skip
    assert len(json.loads((tmp_path / "sharded" / "zarr.json").read_text())["attributes"]["shards"]["bounds"]) == 3
    assert_reduced_matches(sharded, full, "unit")
    want = lca.open(single)
    for name in ("lca_unit", "lca_layer", "helped_unit", "hurt_tensor", "parameter_helped"):
        np.testing.assert_array_equal(sharded.dataset[name].values, want.dataset[name].values, err_msg=name)
    # per-parameter totals: each shard's sum added to those before it (another association than one running sum)
    np.testing.assert_allclose(sharded.parameter_total().values, want.parameter_total().values, rtol=1e-12, atol=1e-15)


def test_analyses_run_on_a_reduced_result_or_say_why_not(run):
    model, x, y, snaps, full = run
    reduced = lca.analyze(model, (x, y), snaps, method="simpson", keep="unit", progress=False)
    from lca_notebook import analyses

    np.testing.assert_array_equal(
        analyses.fractions(reduced)["helped"].values, analyses.fractions(full)["helped"].values
    )
    lt, want = analyses.layer_totals(reduced), analyses.layer_totals(full)
    np.testing.assert_allclose(lt["total"].values, want["total"].values, rtol=1e-9)
    np.testing.assert_allclose(lt["share"].values, want["share"].values, rtol=1e-9)
    assert analyses.hurting_layers(reduced) == analyses.hurting_layers(full)
    np.testing.assert_allclose(
        analyses.per_window(reduced, by="unit", windows=3).values,
        analyses.per_window(full, by="unit", windows=3).values,
        rtol=1e-9, atol=1e-12,
    )  # fmt: skip
    s, w = analyses.synchrony(reduced, seed=1), analyses.synchrony(full, seed=1)
    assert int(s["statistic"]) == int(w["statistic"])
    c, cw = analyses.concentration(reduced), analyses.concentration(full)  # from the per-parameter totals
    np.testing.assert_allclose(float(c["gini"]), float(cw["gini"]), rtol=1e-9)
    with pytest.raises(ReducedResultError, match="oscillation.*keep='unit'"):
        analyses.oscillation(reduced)
    with pytest.raises(ReducedResultError, match="keep='unit'"):
        analyses.concentration(reduced, start=2, stop=5)
    found = {f.name: f for f in analyses.findings(reduced)}
    assert "keep='unit'" in str(found["oscillation"])
