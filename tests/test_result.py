"""LCAResult's sums, fractions and persistence against plain numpy on the raw array."""

import os

import numpy as np
import pytest
import torch
import xarray as xr

import lca_notebook as lca
from lca_notebook.errors import StoreDamagedError
from lca_notebook.result import from_arrays
from lca_notebook.sources import open_path


@pytest.fixture(scope="module")
def result():
    rng = np.random.default_rng(0)
    # conv-like (4 channels x 3 x 2 x 2), its bias, a linear layer (5 x 12) and its bias
    shapes = {"conv.weight": (4, 3, 2, 2), "conv.bias": (4,), "fc.weight": (5, 12), "fc.bias": (5,)}
    tensor, layer, unit, index = [], [], [], []
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        tensor += [name] * n
        layer += [name.split(".")[0]] * n
        unit += list(np.arange(n) // (n // shape[0]))
        index += list(range(n))
    T = 700  # more than one block of rows
    values = rng.normal(size=(T, len(tensor))).astype(np.float32) * 1e-3
    values[:, ::7] = 0.0  # parameters that did not move
    loss = 2.0 + np.concatenate([[0], np.cumsum(values.sum(1, dtype=np.float64))]) + rng.normal(size=T + 1) * 1e-6
    return from_arrays(
        values, loss, {"tensor": tensor, "layer": layer, "unit": unit, "index": index}, attrs={"method": "simpson"}
    )


def test_sel_gives_a_layer_block(result):
    block = result.sel(layer="fc")
    mask = result.dataset["layer"].values == "fc"
    np.testing.assert_array_equal(block.values, result.lca.values[:, mask])
    assert result.sel(layer="conv", unit=2, iteration=slice(3, 5)).shape == (3, 13)
    with pytest.raises(KeyError, match="no layer 'fc9'.*conv, fc"):
        result.sel(layer="fc9")


@pytest.mark.parametrize("start,stop", [(None, None), (0, 1), (5, 600), (650, 700), (10, 10)])
def test_range_sums_at_every_granularity(result, start, stop):
    raw = result.lca.values.astype(np.float64)[slice(start, stop)].sum(axis=0)
    coords = {k: result.dataset[k].values for k in ("tensor", "layer", "unit")}
    np.testing.assert_allclose(result.total("parameter", start, stop).values, raw, atol=1e-9)
    for name in ("conv.weight", "fc.bias"):
        assert result.total("tensor", start, stop).sel(tensor=name).item() == pytest.approx(
            raw[coords["tensor"] == name].sum(), abs=1e-9
        )
    by_layer = result.total("layer", start, stop)
    assert by_layer["layer"].values.tolist() == ["conv", "fc"]
    assert by_layer.sel(layer="fc").item() == pytest.approx(raw[coords["layer"] == "fc"].sum(), abs=1e-9)
    units = result.total("unit", start, stop)
    assert units.sizes["unit"] == 4 + 5
    # fc's neuron 3: row 3 of the weight and element 3 of the bias
    m = (coords["layer"] == "fc") & (coords["unit"] == 3)
    assert units.sel(unit="fc[3]").item() == pytest.approx(raw[m].sum(), abs=1e-9)
    assert units.sel(unit="fc[3]")["unit_index"].item() == 3
    assert result.total("total", start, stop).item() == pytest.approx(raw.sum(), abs=1e-8)


def test_a_range_takes_iteration_numbers_only(result):
    assert result.total("layer", np.int64(2), 5).equals(result.total("layer", 2, 5))
    with pytest.raises(TypeError, match=r"start must be an iteration number \(an int\) or None, got 2.7"):
        result.total("layer", 2.7, 5)
    with pytest.raises(TypeError, match=r"stop must be an iteration number"):
        result.per_iteration("layer", 0, 5.0)
    with pytest.raises(IndexError, match=r"\[5, 2\) is reversed: start must be <= stop"):
        result.total("layer", 5, 2)
    with pytest.raises(IndexError, match=r"is outside \[0, "):
        result.total("layer", 2, result.n_iterations + 1)


def test_per_iteration_cumulative_and_fractions(result):
    values = result.lca.values.astype(np.float64)
    fc = result.dataset["layer"].values == "fc"
    per_it = result.per_iteration("layer", 100, 300)
    np.testing.assert_allclose(per_it.sel(layer="fc").values, values[100:300, fc].sum(1), atol=1e-10)
    np.testing.assert_allclose(
        result.cumulative("layer").sel(layer="fc").values, np.cumsum(values[:, fc].sum(1)), atol=1e-9
    )
    f = result.fractions()
    np.testing.assert_allclose(f.helped.values, (values < 0).mean(1))
    np.testing.assert_allclose(f.hurt.values, (values > 0).mean(1))
    np.testing.assert_allclose(f.zero.values, (values == 0).mean(1), atol=1e-12)
    f_layer = result.fractions("layer", 0, 50)
    np.testing.assert_allclose(f_layer.helped.sel(layer="fc").values, (values[:50, fc] < 0).mean(1))


def test_reconstructed_loss_differs_by_the_cumulative_residual(result):
    rebuilt = result.reconstructed_loss().values
    np.testing.assert_allclose(
        rebuilt - result.loss.values, np.concatenate([[0], np.cumsum(result.residual.values)]), atol=1e-9
    )


@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_save_and_open_round_trip_losslessly(result, tmp_path, suffix):
    path = result.save(tmp_path / f"run{suffix}")
    back = lca.open(path)
    xr.testing.assert_identical(back.dataset.load(), result.dataset)
    np.testing.assert_array_equal(back.total("unit", 3, 90).values, result.total("unit", 3, 90).values)


def test_open_names_the_bad_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no LCA result at"):
        lca.open(tmp_path / "missing.nc")
    bad = tmp_path / "garbage.nc"
    bad.write_bytes(b"not a netcdf file")
    with pytest.raises(ValueError, match="garbage.nc"):
        lca.open(bad)
    text = tmp_path / "notes.txt"
    text.write_text("a plain text file")
    with pytest.raises(ValueError, match=r"notes\.txt' is a file but not a readable LCA result.*lca\.open reads"):
        lca.open(text)
    foreign = tmp_path / "foreign.zarr"
    xr.Dataset({"temperature": ("time", np.arange(3.0))}).to_zarr(foreign, zarr_format=3, consolidated=False)
    with pytest.raises(ValueError, match=r"foreign\.zarr' is a zarr store but not an LCA result.*temperature"):
        lca.open(foreign)


@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_save_never_replaces_what_is_not_an_lca_result(result, tmp_path, suffix):
    folder = tmp_path / f"mine{suffix}"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    (folder / "src").mkdir()
    for overwrite in (False, True):
        with pytest.raises(
            ValueError, match=r"already exists and is not an lca_notebook store \(a folder holding notes"
        ):
            result.save(folder, overwrite=overwrite)
    assert (folder / "notes.txt").read_text() == "precious" and sorted(os.listdir(folder)) == ["notes.txt", "src"]
    mine = tmp_path / f"thesis{suffix}"
    mine.write_bytes(b"not a result")
    with pytest.raises(ValueError, match=r"already exists and is a file that is not an LCA result"):
        result.save(mine, overwrite=True)
    assert mine.read_bytes() == b"not a result"


def test_save_never_replaces_a_recorded_trajectory(result, tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with lca.record(model, opt, path=tmp_path / "run.zarr"):
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
    with pytest.raises(ValueError, match="is a recorded trajectory"):
        result.save(tmp_path / "run.zarr", overwrite=True)
    assert len(open_path(tmp_path / "run.zarr")) == 2


@pytest.mark.parametrize("suffix", [".nc", ".zarr"])
def test_save_replaces_a_result_only_when_asked_and_all_or_nothing(result, tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    small = from_arrays(
        result.lca.values[:5],
        result.loss.values[:6],
        {k: result.dataset[k].values for k in ("tensor", "layer", "unit", "index")},
    )
    small.save(path)
    with pytest.raises(ValueError, match="already holds an LCA result; pass overwrite=True"):
        result.save(path)
    assert lca.open(path).n_iterations == 5
    coords = {k: result.dataset[k].values for k in ("tensor", "layer", "unit", "index")}
    # Neither netCDF nor zarr can hold a set: writing fails midway.
    broken = from_arrays(result.lca.values, result.loss.values, coords, attrs={"unstorable": {1, 2}})
    with pytest.raises((TypeError, ValueError)):
        broken.save(path, overwrite=True)
    assert lca.open(path).n_iterations == 5  # the old one is whole
    assert sorted(os.listdir(tmp_path)) == [path.name]  # and nothing was left beside it
    result.save(path, overwrite=True)
    xr.testing.assert_identical(lca.open(path).dataset.load(), result.dataset)


def test_a_result_is_never_saved_onto_the_store_it_reads(result, tmp_path):
    path = result.save(tmp_path / "run.zarr")
    opened = lca.open(path)
    with pytest.raises(ValueError, match="this result is read from .*run.zarr.* Save to another path"):
        opened.save(path, overwrite=True)
    xr.testing.assert_identical(lca.open(path).dataset.load(), result.dataset)
    opened.save(tmp_path / "copy.zarr")  # elsewhere: fine, and equal
    xr.testing.assert_identical(lca.open(tmp_path / "copy.zarr").dataset.load(), result.dataset)


def test_a_flipped_bit_in_a_saved_store_fails_on_read(result, tmp_path):
    path = tmp_path / "run.zarr"
    result.save(path)
    chunk = next((path / "lca" / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0x20
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreDamagedError, match=rf"{path}.* is damaged: chunk .* of 'lca'.*checksum"):
        lca.open(path).lca.load()
