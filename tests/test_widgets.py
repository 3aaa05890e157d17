"""The explorer, Python side: set each control, then check every mark's data against sums computed
here directly with numpy from ``result.lca.values`` (loops over labels, no prefix sums, no shared code).
"""

import itertools
import re

import numpy as np
import pytest
import xarray as xr
from bqplot import LogScale

import lca_notebook as lca
from lca_notebook.result import from_arrays
from lca_notebook.widgets import Explorer

ATOL = 1e-9

# tensors in an order that leaves layer "fc1" non-contiguous (its bias comes after conv's weight)
TENSORS = [
    ("fc1.weight", "fc1", (5, 4)),
    ("conv.weight", "conv", (3, 2, 2, 2)),
    ("fc1.bias", "fc1", (5,)),
    ("conv.bias", "conv", (3,)),
    ("out.weight", "out", (2, 5)),
    ("out.bias", "out", (2,)),
]


def make_result(t=53, seed=0):
    """A hand-made result: random LCA with exact zeros, one frozen tensor, a loss with a residual."""
    rng = np.random.default_rng(seed)
    coords = {"tensor": [], "layer": [], "unit": [], "index": []}
    for name, layer, shape in TENSORS:
        n = int(np.prod(shape))
        coords["tensor"] += [name] * n
        coords["layer"] += [layer] * n
        coords["unit"] += list(np.arange(n) // (n // shape[0]))
        coords["index"] += list(range(n))
    p = len(coords["tensor"])
    values = rng.normal(0.0, 1e-3, size=(t, p)) - 2e-4
    values[rng.random((t, p)) < 0.2] = 0.0
    values[:, np.asarray(coords["tensor"]) == "out.bias"] = 0.0  # a frozen tensor
    values = values.astype(np.float32)
    loss = 2.3 + np.concatenate([[0.0], np.cumsum(values.sum(1, dtype=np.float64) + rng.normal(0, 1e-5, t))])
    return from_arrays(values, loss, coords, attrs={"method": "test"})


class Truth:
    """Independent answers for a result: direct numpy sums over the LCA matrix."""

    def __init__(self, result):
        self.L = np.asarray(result.lca.values, dtype=np.float64)
        self.layer = np.asarray(result.lca["layer"].values).astype(str)
        self.tensor = np.asarray(result.lca["tensor"].values).astype(str)
        self.unit = np.asarray(result.lca["unit"].values)
        self.loss = np.asarray(result.loss.values)
        self.residual = np.asarray(result.residual.values, dtype=np.float64)
        self.layers = list(dict.fromkeys(self.layer))

    def keys(self, by):
        if by == "parameter":
            return np.array([str(i) for i in range(self.L.shape[1])])
        if by == "unit":
            return np.array([f"{a}[{b}]" for a, b in zip(self.layer, self.unit, strict=False)])
        return {"tensor": self.tensor, "layer": self.layer}[by]

    def elements(self, by):
        """[(key, layer, column mask)] in model order."""
        keys = self.keys(by)
        out = []
        for k in dict.fromkeys(keys):
            mask = keys == k
            out.append((k, self.layer[mask][0], mask))
        return out

    def totals(self, by, a, b):
        return np.array([self.L[a:b][:, m].sum() for _, _, m in self.elements(by)])

    def fraction_series(self, by, layer, window):
        els = [e for e in self.elements(by) if layer is None or e[1] == layer]
        per = np.stack([self.L[:, m].sum(1) for _, _, m in els], axis=1) if by != "parameter" else None
        if by == "parameter":
            cols = np.ones(self.L.shape[1], bool) if layer is None else self.layer == layer
            per = self.L[:, cols]
        f = {"helped": (per < 0).mean(1), "hurt": (per > 0).mean(1), "zero": (per == 0).mean(1)}
        out = {}
        for k, v in f.items():
            out[k] = np.array([v[max(0, i - window + 1) : i + 1].mean() for i in range(len(v))])
        return out


def edges_from_centres(start, centres):
    """Bins are contiguous [e0, e1): centre = (e0 + e1 - 1) / 2 gives e1 back from e0."""
    edges = [start]
    for c in centres:
        edges.append(round(2 * c + 1 - edges[-1]))
    return np.array(edges)


def trailing(v, window):
    return np.array([v[max(0, i - window + 1) : i + 1].mean() for i in range(len(v))])


def check_all(ex: Explorer, truth: Truth):
    """Every mark's data against the independent sums, for the explorer's current controls."""
    m = ex.marks
    start, stop = ex.range.value
    by, sign, window = ex.granularity.value, ex.sign.value, ex.smoothing.value
    layer = None if ex.selected_layer is None else ex.layers[ex.selected_layer]

    for name, mark in m.items():  # float32 on the wire, never more points than about the pixel width
        for trait in ("x", "y", "color"):
            arr = getattr(mark, trait, None)
            if isinstance(arr, np.ndarray) and arr.dtype.kind == "f":
                assert arr.dtype == np.float32, (name, trait)
        if "hover" not in name and getattr(mark, "x", None) is not None and np.asarray(mark.x).dtype.kind == "f":
            assert len(mark.x) <= max(ex.max_points + 1, ex.histogram_bins + 1, ex.heatmap_columns), name

    # loss: checkpoints at the bin edges; the rebuilt loss is loss[0] + cumulative LCA (+ lca_rest = 0 here)
    edges = m["loss"].x.astype(np.int64)
    np.testing.assert_array_equal(m["loss"].x, edges)
    assert edges[0] == start and edges[-1] == stop and np.all(np.diff(edges) > 0)
    np.testing.assert_allclose(m["loss"].y, truth.loss[edges].astype(np.float32))
    rebuilt = truth.loss[0] + np.array([truth.L[:e].sum() for e in edges])
    np.testing.assert_allclose(m["reconstructed"].y, rebuilt, rtol=1e-6)
    np.testing.assert_array_equal(m["reconstructed"].x, m["loss"].x)
    # residual strip: per bin, the (smoothed) iteration residual of largest magnitude
    res_edges = edges_from_centres(start, m["residual"].x)
    np.testing.assert_array_equal(res_edges, edges)
    smoothed = trailing(np.nan_to_num(truth.residual), window)
    want = []
    for a, b in itertools.pairwise(edges):
        vals = [smoothed[i] for i in range(a, b) if np.isfinite(truth.residual[i])]
        want.append(max(vals, key=abs) if vals else np.nan)
    np.testing.assert_allclose(m["residual"].y, want, rtol=1e-5, atol=1e-12)

    # fractions: the whole run, smoothed per iteration (trailing window), averaged over each plotted bin
    series = truth.fraction_series(by, layer, window)
    run_edges = edges_from_centres(0, m["helped"].x)
    assert run_edges[0] == 0 and run_edges[-1] == len(truth.L)
    for key in ("helped", "hurt", "zero"):
        np.testing.assert_array_equal(edges_from_centres(0, m[key].x), run_edges)
        want = [series[key][a:b].mean() for a, b in itertools.pairwise(run_edges)]
        np.testing.assert_allclose(m[key].y, want, atol=1e-6)
        assert m[key].visible == (sign in ("both", key))
    full = (start, stop) == (0, len(truth.L))
    assert (ex.brush.selected is None) if full else list(ex.brush.selected) == [start, stop]

    # cumulative LCA per layer from the start of the range, at the edges
    np.testing.assert_array_equal(m["cumulative"].x, edges)
    for i, name in enumerate(truth.layers):
        cols = truth.layer == name
        want = [truth.L[start:e][:, cols].sum() for e in edges]
        np.testing.assert_allclose(np.atleast_2d(m["cumulative"].y)[i], want, rtol=1e-5, atol=1e-7)

    # bars: per layer, the sum of the elements' totals that helped and that hurt; the label gives the layer's
    # share of the loss change over the range
    elements = truth.elements(by)
    totals = truth.totals(by, start, stop)
    change = truth.loss[stop] - truth.loss[start]
    for i, name in enumerate(truth.layers):
        mine = np.array([e[1] == name for e in elements])
        helped = totals[mine & (totals < 0)].sum() if sign != "hurt" else 0.0
        hurt = totals[mine & (totals > 0)].sum() if sign != "helped" else 0.0
        np.testing.assert_allclose([m["helped_bars"].y[i], m["hurt_bars"].y[i]], [helped, hurt], rtol=1e-5, atol=1e-7)
        share = truth.L[start:stop][:, truth.layer == name].sum() / change
        assert m["helped_bars"].x[i] == f"{name} · {share:.0%}"
    for key in ("helped_bars", "hurt_bars"):
        assert (m[key].selected is None) == (layer is None)
        if layer is not None:
            assert list(m[key].selected) == [truth.layers.index(layer)]

    # histogram of the selected elements' nonzero totals: bins of width (hi - lo) / bins with 0 on an edge,
    # helped bins (left of 0) green, hurt bins red; exact zeros counted apart in the title
    keep = np.array([layer is None or e[1] == layer for e in elements])
    keep &= {"both": np.ones(len(totals), bool), "helped": totals < 0, "hurt": totals > 0}[sign]
    selected = totals[keep]
    sel = ex.selection()
    np.testing.assert_allclose(sel["lca"].values, selected, rtol=1e-6, atol=1e-9)
    assert list(sel["element"].values) == [e[0] for e, k in zip(elements, keep, strict=True) if k]
    moved = selected[selected != 0]
    zeros = int(np.sum(selected == 0))
    assert f"{zeros:,} exactly 0" in ex.figures["histogram"].title
    assert np.all(m["histogram_helped"].x < 0) and np.all(m["histogram_hurt"].x > 0)
    centres = np.concatenate([m["histogram_helped"].x, m["histogram_hurt"].x]).astype(np.float64)
    counts = np.concatenate([m["histogram_helped"].y, m["histogram_hurt"].y])
    if len(moved):
        # bins span the 0.5 and 99.5 percentiles (and 0) of 200 values or more; those beyond count in the end bins
        q_lo, q_hi = np.quantile(moved, [0.005, 0.995]) if len(moved) >= 200 else (moved.min(), moved.max())
        width = (max(q_hi, 0) - min(q_lo, 0)) / ex.histogram_bins
        first, last = centres.min() - width / 2, centres.max() + width / 2
        beyond = int(np.sum((moved < first - 1e-4 * width) | (moved > last + 1e-4 * width)))
        label = ex.figures["histogram"].axes[0].label
        assert (f"the end bins hold {beyond:,} beyond" in label) if beyond else ("end bins" not in label)
        assert counts.sum() == len(moved)
        tol = 1e-4 * width  # the centres arrive as float32
        for c, n in zip(centres, counts, strict=True):
            inside = (moved >= c - width / 2 - tol) & (moved < c + width / 2 - tol)
            if c == centres.min():
                inside |= moved < c - width / 2
            if c == centres.max():
                inside |= moved >= c + width / 2 - tol
            assert n == inside.sum(), (c, n, inside.sum())
    else:
        assert len(counts) == 0 and m["histogram_empty"].visible

    # heat map: rows are the chosen layer's units (layers when none), columns contiguous bins of iterations;
    # colours clipped at the 99th percentile of |nonzero cell|, the scale symmetric about 0
    heat = m["heatmap"]
    heat_x, heat_color = heat.x, heat.color
    if stop - start == 1:  # bqplot's HeatMap needs two columns: a blank one is added
        assert np.all(heat_color[:, 1] == 0)
        heat_x, heat_color = heat_x[:1], heat_color[:, :1]
    cedges = edges_from_centres(start, heat_x)
    assert cedges[-1] == stop and np.all(np.diff(cedges) > 0)
    if layer is None:
        rows = [truth.layer == name for name in truth.layers]
    else:
        rows = [m_ for _, lay, m_ in truth.elements("unit") if lay == layer]
    cells = np.array([[truth.L[a:b][:, cols].sum() for a, b in itertools.pairwise(cedges)] for cols in rows])
    cells = {"both": cells, "helped": np.minimum(cells, 0), "hurt": np.maximum(cells, 0)}[sign]
    if len(rows) == 1:  # ... and two rows
        assert np.all(heat_color[1] == 0)
        heat_color = heat_color[:1]
    nonzero = np.abs(cells[cells != 0])
    limit = np.sort(nonzero)[int(np.floor(0.99 * (len(nonzero) - 1)))] if len(nonzero) else 0.0
    assert heat_color.shape == cells.shape
    # the cells carry LCA / limit, saturated at +-1 (the colour bar's own scale is in LCA units)
    np.testing.assert_allclose(heat_color, np.clip(cells / (limit or 1.0), -1, 1), rtol=1e-5, atol=1e-6)
    if limit:
        bar = ex.figures["heatmap"].axes[3].scale
        assert bar.max == pytest.approx(limit, rel=1e-6) and bar.min == pytest.approx(-limit, rel=1e-6)
        assert (heat.scales["color"].min, heat.scales["color"].max) == (-1.0, 1.0)
        assert f"±{limit:.2g} = p99 |LCA|" in ex.figures["heatmap"].title
    assert m["heatmap_empty"].visible == (not np.any(cells))

    # the summary line names the range and the selection
    assert f"iterations [{start}, {stop})" in ex.summary.value
    assert f"<b>{len(selected)}</b> elements" in ex.summary.value


@pytest.fixture(scope="module")
def result():
    return make_result()


@pytest.fixture(scope="module")
def truth(result):
    return Truth(result)


def test_initial_view(result, truth):
    check_all(Explorer(result), truth)


def test_every_control(result, truth):
    ex = Explorer(result, max_points=20, heatmap_columns=7)  # few pixels: forces binning
    check_all(ex, truth)
    steps = [
        ("range", (5, 44)),
        ("granularity", "unit"),
        ("layer", "conv"),
        ("sign", "helped"),
        ("smoothing", 4),
        ("granularity", "tensor"),
        ("layer", "fc1"),  # non-contiguous parameters
        ("sign", "hurt"),
        ("range", (10, 12)),
        ("granularity", "layer"),
        ("layer", None),
        ("sign", "both"),
        ("granularity", "parameter"),
        ("range", (0, 53)),
        ("layer", "out"),  # its bias never moves
        ("smoothing", 9),
        ("range", (52, 53)),  # a single iteration
    ]
    for name, value in steps:
        getattr(ex, name).value = value
        check_all(ex, truth)


def test_one_point_per_iteration_when_the_range_is_short(result, truth):
    ex = Explorer(result, max_points=100, heatmap_columns=100)
    ex.range.value = (3, 40)
    np.testing.assert_array_equal(ex.marks["loss"].x, np.arange(3, 41))
    np.testing.assert_array_equal(ex.marks["heatmap"].x, np.arange(3, 40))
    check_all(ex, truth)


def test_strided_parameter_prefix_gives_the_same_numbers(result, truth):
    ex = Explorer(result, parameter_budget_bytes=4096)  # far below (T+1) x P x 8: a strided prefix
    assert ex._parameters.stride > 1
    for rng in [(0, 53), (1, 2), (7, 31), (13, 13 + ex._parameters.stride)]:
        ex.range.value = rng
        check_all(ex, truth)


def test_many_units_are_grouped_into_pixel_rows(truth, result):
    ex = Explorer(result, heatmap_rows=2, layer="fc1")  # fc1 has 5 neurons: 2 rows of summed neurons
    heat = ex.marks["heatmap"]
    assert heat.color.shape[0] == 2
    units = [m_ for _, lay, m_ in truth.elements("unit") if lay == "fc1"]
    per_unit = np.array([[truth.L[:, c].sum()] for c in units])[:, 0]
    unclipped = ex.compute()["heatmap"][2]  # what the colours show before clipping at the colour bar's limit
    np.testing.assert_allclose(unclipped.sum(1), [per_unit[:2].sum(), per_unit[2:].sum()], rtol=1e-5)
    assert ex.compute()["heatmap_rows"] == ["units 0–1", "units 2–4"]


def test_clicking_a_bar_chooses_its_layer(result, truth):
    ex = Explorer(result)
    ex.marks["helped_bars"].selected = [1]  # what the front end sends on a click
    assert ex.layer.value == "conv"
    check_all(ex, truth)
    ex.marks["hurt_bars"].selected = None  # a click beside the bars keeps the chosen layer
    assert ex.layer.value == "conv"
    ex.marks["hurt_bars"].selected = [0]
    assert ex.layer.value == "fc1"
    check_all(ex, truth)
    ex.layer.value = "out"
    assert list(ex.marks["helped_bars"].selected) == [2] and list(ex.marks["hurt_bars"].selected) == [2]
    ex.layer.value = None  # from Python, None means all layers
    assert ex.marks["helped_bars"].selected is None and ex.layer.value == "(all layers)"


def test_export_csv_and_netcdf(result, truth, tmp_path):
    ex = Explorer(result, granularity="unit", layer="conv", sign="helped")
    ex.range.value = (4, 30)
    totals = dict(zip([e[0] for e in truth.elements("unit")], truth.totals("unit", 4, 30), strict=False))
    csv = tmp_path / "sel.csv"
    assert ex.export(csv) == [str(csv)]
    lines = csv.read_text().splitlines()
    assert lines[0] == "element,layer,lca,start,stop"
    rows = [ln.split(",") for ln in lines[1:]]
    want = {k: v for k, v in totals.items() if k.startswith("conv[") and v < 0}
    assert [r[0] for r in rows] == list(want)
    for r in rows:
        assert r[1] == "conv" and (r[3], r[4]) == ("4", "30")
        assert float(r[2]) == pytest.approx(want[r[0]], rel=1e-9)

    nc = tmp_path / "sel.nc"
    ex.export(nc)
    ds = xr.open_dataset(nc, engine="h5netcdf")
    xr.testing.assert_allclose(ds.load(), ex.selection())
    assert ds.attrs["layer"] == "conv" and ds.attrs["start"] == 4 and ds.attrs["granularity"] == "unit"
    ds.close()
    with pytest.raises(ValueError, match=r"sel\.nc' is a netCDF file but not an LCA result.*xarray.open_dataset"):
        lca.open(nc)  # a selection, not a result: said so (it was a KeyError)

    # the button does the same and reports the file in the panel
    ex.export_path.value = str(tmp_path / "button.csv")
    ex.export_button.click()
    assert (tmp_path / "button.csv").read_text() == csv.read_text()
    assert "wrote" in ex.export_status.value


def test_export_replaces_a_file_only_when_asked_and_never_a_result(result, tmp_path):
    ex = Explorer(result)
    csv = tmp_path / "sel.csv"
    csv.write_text("mine")
    with pytest.raises(FileExistsError, match=r"sel\.csv exists: choose another name, or replace it"):
        ex.export(csv)
    assert csv.read_text() == "mine"
    ex.export(csv, overwrite=True)
    assert csv.read_text().startswith("element,layer,lca")
    saved = result.save(tmp_path / "run.nc")  # another run's result: never replaced, even when asked
    with pytest.raises(FileExistsError, match=r"run\.nc is an LCA result, which an export never replaces"):
        ex.export(saved, overwrite=True)
    assert lca.open(saved).n_iterations == result.n_iterations
    # the button: a first click on an existing name asks, a second on the same name replaces
    csv.write_text("mine")
    ex.export_path.value = str(csv)
    ex.export_button.click()
    assert "exists: click Export again to replace it" in ex.export_status.value and csv.read_text() == "mine"
    ex.export_button.click()
    assert "wrote" in ex.export_status.value and csv.read_text().startswith("element,layer,lca")


def test_export_refuses_an_unknown_format_and_says_which(result, tmp_path):
    ex = Explorer(result)
    with pytest.raises(ValueError, match=r"sel\.xlsx.*\.csv, \.nc, \.png or \.svg"):
        ex.export(tmp_path / "sel.xlsx")
    (tmp_path / "old.xlsx").write_text("mine")  # an existing file of a format export cannot write: the format is named
    with pytest.raises(ValueError, match=r"old\.xlsx.*\.csv, \.nc, \.png or \.svg"):
        ex.export(tmp_path / "old.xlsx")
    ex.export_path.value = str(tmp_path / "sel.xlsx")
    ex.export_button.click()  # shown in the panel, not lost in a callback
    assert "export failed" in ex.export_status.value and "sel.xlsx" in ex.export_status.value


def test_image_export_asks_the_front_end_for_every_figure(result, tmp_path):
    ex = Explorer(result)
    paths = ex.export(tmp_path / "view.png")
    assert sorted(paths) == sorted(str(tmp_path / f"view_{n}.png") for n in ex.figures)
    # the browser answers with the rendered bytes; a fake answer through bqplot's own handler writes them
    fig = ex.figures["loss"]
    fig._handle_custom_msgs(fig, {"event": "upload_png"}, [memoryview(b"\x89PNG fake")])
    assert (tmp_path / "view_loss.png").read_bytes() == b"\x89PNG fake"


def test_explorer_on_a_real_run():
    import torch

    from lca_notebook import models

    torch.manual_seed(0)
    x, y = models.digits_data()
    model = models.mlp(seed=0, hidden=(8,))
    snaps = models.train(model, (x, y), steps=12, lr=0.1)
    result = lca.analyze(model, (x, y), snaps, progress=False)
    ex = lca.explore(result, granularity="unit")
    truth = Truth(result)
    check_all(ex, truth)
    ex.layer.value = "fc1"
    ex.range.value = (2, 9)
    check_all(ex, truth)


def test_bad_arguments_name_the_value_and_the_choices():
    r = lca.LCAResult.example()
    with pytest.raises(ValueError, match=r"granularity must be one of parameter, unit, tensor, layer, got 'bogus'"):
        lca.explore(r, granularity="bogus")
    with pytest.raises(ValueError, match=r"layer 'nope' is not one of the result's layers: fc1, fc2"):
        lca.explore(r, layer="nope")
    with pytest.raises(ValueError, match=r"sign must be one of both, helped, hurt, got 'x'"):
        lca.explore(r, sign="x")
    with pytest.raises(TypeError, match=r"needs an LCAResult .* got a int$"):
        lca.explore(123)
    with pytest.raises(TypeError, match=r"got a Dataset: wrap it, lca.LCAResult\(dataset\)"):
        lca.explore(r.dataset)
    assert lca.explore(r, granularity="unit", layer="fc2", sign="hurt").layer.value == "fc2"


def test_a_result_without_iterations_is_refused_with_a_reason():
    r = from_arrays(
        np.zeros((0, 2), np.float32),
        np.array([1.0]),
        {"tensor": ["w", "w"], "layer": ["l", "l"], "unit": [0, 1], "index": [0, 1]},
    )
    with pytest.raises(ValueError, match="at least one"):
        Explorer(r)


def test_explorer_on_a_result_opened_lazily_from_disk(result, truth, tmp_path):
    stored = lca.open(result.save(tmp_path / "run.zarr"))
    assert not isinstance(stored.lca.data, np.ndarray)  # read block by block, never whole
    ex = Explorer(stored, max_points=20, parameter_budget_bytes=4096)
    for rng in [(0, 53), (5, 44), (52, 53)]:
        ex.range.value = rng
        check_all(ex, truth)
    ex.granularity.value, ex.layer.value = "unit", "fc1"
    check_all(ex, truth)


# -- edges (issue 16): each draws or says what is wrong ------------------------------------------------


def one_layer_result(lca_values):
    p = lca_values.shape[1]
    coords = {"tensor": ["w"] * p, "layer": ["only"] * p, "unit": list(np.arange(p) // 2), "index": list(range(p))}
    finite = np.where(np.isfinite(lca_values), lca_values, 0.0)
    loss = 1.0 + np.concatenate([[0.0], np.cumsum(finite.sum(1, dtype=np.float64))])
    return from_arrays(lca_values.astype(np.float32), loss, coords)


def test_a_zero_width_range_says_so_and_keeps_the_last_drawing():
    values = np.random.default_rng(3).normal(0, 1e-3, size=(12, 6))
    result = one_layer_result(values)
    ex = Explorer(result)
    ex.range.value = (3, 7)
    before = ex.marks["loss"].y.copy()
    ex.range.value = (5, 5)  # a one-layer result used to raise a TraitError here
    assert "iterations [5, 5) hold no iteration" in ex.summary.value
    np.testing.assert_array_equal(ex.marks["loss"].y, before)
    ex.range.value = (5, 6)
    check_all(ex, Truth(result))


def test_nan_and_inf_in_lca_are_named_and_drawn_as_zero():
    values = np.random.default_rng(4).normal(0, 1e-3, size=(10, 6))
    values[4, 2], values[7, 5], values[7, 0] = np.nan, np.inf, -np.inf
    result = one_layer_result(values)
    ex = Explorer(result)  # used to fail with numpy's "autodetected range of [nan, nan] is not finite"
    assert "3 NaN or infinite values (first: iteration 4, w[2])" in ex.summary.value
    clean = one_layer_result(np.where(np.isfinite(values), values, 0.0))
    truth = Truth(clean)
    truth.residual = np.asarray(result.residual.values)  # NaN at iterations 4 and 7: gaps in the strip
    assert np.isnan(truth.residual[[4, 7]]).all()
    check_all(ex, truth)
    ex.granularity.value, ex.range.value = "unit", (3, 9)
    check_all(ex, truth)
    assert "NaN or infinite" in ex.summary.value  # said on every view, not once


def test_a_result_without_parameters_is_refused_with_a_reason():
    empty = from_arrays(
        np.zeros((5, 0), np.float32), np.arange(6.0), {k: [] for k in ("tensor", "layer", "unit", "index")}
    )
    with pytest.raises(ValueError, match="no parameters.*at least one trainable tensor"):
        Explorer(empty)


# -- interactions: the brush, tooltips, the log count, empty states ---------------------------------------


def test_a_drag_on_the_fractions_chart_sets_the_range_and_follows_the_slider(result, truth):
    ex = Explorer(result)
    ex.brush.selected = np.array([30.6, 10.4])  # what the front end sends, in iterations, either order
    assert ex.range.value == (10, 31)
    check_all(ex, truth)
    ex.brush.selected = np.array([12.2, 12.3])  # narrower than an iteration: one iteration
    assert ex.range.value == (12, 13)
    ex.range.value = (5, 9)
    assert list(ex.brush.selected) == [5, 9]
    ex.range.value = (0, 53)
    assert ex.brush.selected is None  # the whole run: no band


def _hover(mark, index):
    mark._handle_custom_msgs(mark, {"event": "hover", "data": {"index": index}}, [])
    return mark.tooltip.value


def _number(html_text, label):
    m = re.search(re.escape(label) + r"</td><td[^>]*>([-+0-9.e%]+)", html_text)
    assert m, (label, html_text)
    text = m.group(1)
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


def test_tooltips_list_every_series_at_the_pointer(result, truth):
    ex = Explorer(result)
    ex.range.value = (10, 40)
    ex.smoothing.value = 3
    hover = ex.marks["hover"]
    col = 31  # a column in the middle of the plot
    k = round(10 + float(hover.x[col]) * 30)
    text = _hover(hover, col)
    assert f"checkpoint {k}" in text
    assert _number(text, "true loss") == pytest.approx(truth.loss[k], rel=1e-5)
    rebuilt = truth.loss[0] + truth.L[:k].sum()
    assert _number(text, "rebuilt from LCA") == pytest.approx(rebuilt, rel=1e-5)
    residual = truth.residual[max(0, k - 2) : k + 1].mean()
    assert _number(text, f"residual (iteration {k})") == pytest.approx(residual, rel=1e-2)
    series = truth.fraction_series("parameter", None, 3)
    for key in ("helped", "hurt", "zero"):
        assert _number(text, key) == pytest.approx(series[key][k], abs=6e-4)

    text = _hover(ex.marks["cumulative_hover"], col)
    for name in truth.layers:
        want = truth.L[10:k][:, truth.layer == name].sum()
        assert float(re.search(re.escape(name) + r"</td><td[^>]*>([-+0-9.e]+)", text).group(1)) == pytest.approx(
            want, rel=1e-3, abs=1e-9
        )

    text = _hover(ex.marks["hurt_bars"], 1)  # conv
    cols = truth.layer == "conv"
    net = truth.L[10:40][:, cols].sum()
    assert _number(text, "net LCA") == pytest.approx(net, rel=1e-3)
    share = _number(text, "share of the loss change")
    assert share == pytest.approx(round(net / (truth.loss[40] - truth.loss[10]), 2), abs=0.006)

    grid = ex.marks["heatmap_hover"]
    point = int(np.argmin((grid.x - 0.5) ** 2 + (grid.y - 0.9) ** 2))  # top row (fc1), middle column
    text = _hover(grid, point)
    a, b = map(int, re.search(r"iterations \[(\d+), (\d+)\)", text).groups())
    want = truth.L[a:b][:, truth.layer == "fc1"].sum()
    assert "fc1" in text and 10 <= a < 25 <= b <= 40
    assert float(re.search(r"fc1</td><td[^>]*>([-+0-9.e]+)", text).group(1)) == pytest.approx(want, rel=1e-3)


def test_log_count_and_the_empty_histogram_say_what_they_show(truth):
    values = -np.abs(np.random.default_rng(5).normal(0, 1e-3, size=(8, 6)))
    values[:, 0] = 0.0  # one parameter never moves; none ever hurts
    result = one_layer_result(values)
    ex = Explorer(result, log_count=True)
    hist = ex.marks["histogram_helped"]
    assert isinstance(hist.scales["y"], LogScale) and ex.figures["histogram"].axes[1].scale is hist.scales["y"]
    ticks = ex.figures["histogram"].axes[1].tick_values
    assert list(ticks) == [1.0, 10.0][: len(ticks)] and all(np.log10(ticks) % 1 == 0)
    assert "1 exactly 0, not drawn" in ex.figures["histogram"].title
    assert hist.y.sum() >= 5 and np.all((hist.y >= 1) | (hist.y == hist.base))
    ex.sign.value = "hurt"
    assert ex.marks["histogram_empty"].visible
    assert ex.marks["histogram_empty"].text[0] == "No element that hurt in iterations [0, 8)"
    assert (
        ex.marks["heatmap_empty"].visible and ex.marks["heatmap_empty"].text[0] == "Nothing hurt in iterations [0, 8)"
    )
    assert ex.marks["layers_empty"].visible
    assert not any(a.visible for a in ex.figures["histogram"].axes)
    ex.sign.value, ex.log_count.value = "both", False
    assert not ex.marks["histogram_empty"].visible and ex.figures["histogram"].axes[1].tick_format == "d"
    ticks = ex.figures["histogram"].axes[1].tick_values
    assert np.all(np.asarray(ticks) == np.round(ticks))  # whole counts only


def test_explorer_on_reduced_results_offers_the_kept_granularity_and_coarser():
    import torch

    from lca_notebook import models

    torch.manual_seed(0)
    x, y = models.digits_data()
    model = models.mlp(seed=0, hidden=(8,))
    snaps = models.train(model, (x, y), steps=10, lr=0.1)
    truth = Truth(lca.analyze(model, (x, y), snaps, progress=False))  # the same run, every parameter kept
    for keep, offered in (("unit", ["unit", "tensor", "layer"]), ("layer", ["layer"])):
        reduced = lca.analyze(model, (x, y), snaps, progress=False, keep=keep)
        ex = lca.explore(reduced)  # used to raise ReducedResultError (result.lca)
        assert [by for _, by in ex.granularity.options] == offered and ex.granularity.value == keep
        assert f"keeps sums by {keep}" in ex.summary.value
        for by in offered:
            ex.granularity.value = by
            ex.range.value = (2, 9)
            check_all(ex, truth)
        ex.layer.value = "fc1"
        ex.range.value = (0, 10)
        if keep == "unit":
            check_all(ex, truth)
        else:  # no units kept: the chosen layer's row, named
            assert ex.compute()["heatmap_rows"] == ["fc1"]
            assert ex.figures["heatmap"].title.startswith("fc1: LCA per layer")


def test_the_summary_shows_the_helped_share_as_a_band_when_every_iteration_has_an_error_estimate():
    """param_tol runs: signs within the iteration's error estimate are uncertain, so the share that helped is a band
    (numpy here: helped = LCA < -error, uncertain = 0 < |LCA| <= error, averaged over the range's iterations)."""
    r = make_result()
    assert "helped:" not in Explorer(r).summary.value  # no estimate (error NaN): plain counts, no band
    err = np.full(r.n_iterations, 4e-4)
    r = from_arrays(r.lca.values, r.loss.values, _coords_of(r), error=err, attrs={"method": "test"})
    ex = Explorer(r)
    ex.range.value = (7, 31)
    lca_ = np.asarray(r.lca.values[7:31], dtype=np.float64)
    lo = (lca_ < -4e-4).mean(axis=1).mean()
    hi = lo + ((np.abs(lca_) <= 4e-4) & (lca_ != 0)).mean(axis=1).mean()
    assert f"helped: {100 * lo:.1f}%&ndash;{100 * hi:.1f}% of parameters" in ex.summary.value


def _coords_of(r):
    return {k: r.lca[k].values for k in ("tensor", "layer", "unit", "index")}


def test_a_histogram_of_fewer_than_200_values_spans_them_all_whatever_the_rounding():
    """Fewer than 200 values: the bins span min to max, so none is beyond the end bins (width * k used to round
    to just inside the smallest value for about 1 set in 2,000)."""
    from lca_notebook.widgets.explorer import histogram

    rng = np.random.default_rng(0)
    for _ in range(2000):
        values = rng.normal(size=rng.integers(1, 150)) * 10.0 ** rng.uniform(-6, 2)
        for bins in (10, 40, 41):
            centres, counts, width, zeros, outside = histogram(values, bins)
            assert outside == 0 and counts.sum() == len(values) and zeros == 0
            tol = 1e-9 * width  # the centres are the edges' midpoints, rounded
            assert centres[0] - width / 2 - tol <= values.min() and values.max() <= centres[-1] + width / 2 + tol


def test_the_summary_adds_up_with_the_parameters_left_out():
    """With parameters=, the LCA of the others (lca_rest) is part of the loss change: the summary says it, so
    LCA sum + other parameters + residual is the change it shows."""
    import torch

    from lca_notebook import models

    torch.manual_seed(0)
    x, y = models.digits_data()
    model = models.mlp(hidden=(8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    snaps = [{k: v.clone() for k, v in model.state_dict().items()}]
    for _ in range(4):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:256]), y[:256]).backward()
        opt.step()
        snaps.append({k: v.clone() for k, v in model.state_dict().items()})
    r = lca.analyze(model, (x, y), snaps, parameters="fc2.*", method="simpson", progress=False)
    text = Explorer(r).summary.value
    numbers = {k: float(v) for k, v in re.findall(r"(change|LCA sum|other parameters|residual) ([-+][\d.e+-]+)", text)}
    assert numbers["other parameters"] == pytest.approx(float(r.lca_rest.sum()), rel=1e-5)
    parts = numbers["LCA sum"] + numbers["other parameters"]
    assert parts == pytest.approx(numbers["change"] + numbers["residual"], abs=1e-5)
