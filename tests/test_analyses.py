"""The paper's analyses, each on a small hand-made result whose answer is known by construction."""

import math

import numpy as np
import pytest
import torch

import lca_notebook as lca
from lca_notebook import analyses, models
from lca_notebook.result import from_arrays


def make(lca_rows, layers, *, loss=None, units=None, error=None):
    """A result with one tensor per layer (``<layer>.weight``) from an (iteration, parameter) array."""
    lca_rows = np.asarray(lca_rows, dtype=np.float64)
    _t, p = lca_rows.shape
    if loss is None:  # exact: the loss changes by the sum of LCA, residual 0
        loss = 1.0 + np.concatenate([[0.0], np.cumsum(lca_rows.sum(axis=1))])
    index = np.zeros(p, dtype=int)
    for name in dict.fromkeys(layers):
        pos = [i for i, n in enumerate(layers) if n == name]
        index[pos] = np.arange(len(pos))
    coords = {
        "tensor": [f"{n}.weight" for n in layers],
        "layer": list(layers),
        "unit": list(units) if units is not None else list(index),
        "index": list(index),
    }
    return from_arrays(lca_rows, loss, coords, error=error)


# -- fractions -----------------------------------------------------------------------------------
def test_fractions_count_signs_overall_and_per_layer():
    rows = [
        [-1, -1, 1, -1, 0],  # 3 help, 1 hurts, 1 still
        [-1, 1, 1, 1, 1],  # 1 helps, 4 hurt
        [0, 0, 0, -1, -1],  # 2 help, 3 still
    ]
    r = make(rows, ["a", "a", "a", "b", "b"])
    f = analyses.fractions(r)
    np.testing.assert_allclose(f["helped"].values, [3 / 5, 1 / 5, 2 / 5])
    np.testing.assert_allclose(f["hurt"].values, [1 / 5, 4 / 5, 0])
    np.testing.assert_allclose(f["zero"].values, [1 / 5, 0, 3 / 5])
    assert float(f["mean_helped"]) == pytest.approx(6 / 15)
    assert float(f["mean_zero"]) == pytest.approx(4 / 15)
    assert float(f["helped_among_moving"]) == pytest.approx(6 / 11)  # 11 parameter-iterations moved

    per = analyses.fractions(r, by="layer")
    np.testing.assert_allclose(per["helped"].sel(layer="a").values, [2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(per["helped"].sel(layer="b").values, [1 / 2, 0, 1])
    assert float(per["helped_among_moving"].sel(layer="b")) == pytest.approx(3 / 5)
    assert float(per["mean_hurt"].sel(layer="a")) == pytest.approx(3 / 9)


def test_uncertain_counts_signs_within_the_iterations_error_estimate():
    rows = [
        [-0.5, -0.01, 0.02, 0.3, 0.0],  # error 0.05: 1 surely helps, 1 surely hurts, 2 uncertain, 1 still
        [-0.5, -0.01, 0.02, 0.3, 0.0],  # no estimate: plain signs, uncertain unknown
        [-0.5, -0.2, 0.02, -0.3, 0.1],  # error 0.25: 2 surely help, 3 uncertain
    ]
    r = make(rows, ["a", "a", "a", "b", "b"], error=[0.05, np.nan, 0.25])
    f = analyses.fractions(r, uncertain=True)
    np.testing.assert_allclose(f["helped"].values, [1 / 5, 2 / 5, 2 / 5])
    np.testing.assert_allclose(f["hurt"].values, [1 / 5, 2 / 5, 0])
    np.testing.assert_allclose(f["zero"].values, [1 / 5, 1 / 5, 0])
    np.testing.assert_allclose(f["uncertain"].values, [2 / 5, np.nan, 3 / 5])
    assert float(f["mean_uncertain"]) == pytest.approx(1 / 2)  # over the two iterations with an estimate
    per = analyses.fractions(r, by="layer", uncertain=True)
    np.testing.assert_allclose(per["uncertain"].sel(layer="a").values, [2 / 3, np.nan, 2 / 3])
    np.testing.assert_allclose(per["uncertain"].sel(layer="b").values, [0, np.nan, 1 / 2])
    plain = analyses.fractions(r)  # without the keyword: signs only, as before
    assert "uncertain" not in plain and plain["helped"].values.tolist() == pytest.approx([2 / 5, 2 / 5, 3 / 5])


def test_findings_give_the_helped_fraction_with_its_error_band():
    rows = [[-0.5, -0.01, 0.02, 0.3], [-0.5, -0.2, 0.02, -0.3]]
    with_band = analyses.findings(make(rows, ["a", "a", "b", "b"], error=[0.05, 0.25]))[0].this_run
    # sure helpers 1/4 and 2/4 (mean 37.5%); plus the uncertain: 3/4 and 4/4 (mean 87.5%); uncertain 2/4, 2/4
    assert "37.5%-87.5% help" in with_band and "50.00% of the parameters" in with_band
    assert "62.5% help on average" in with_band  # the plain sign count lies inside the band
    without = analyses.findings(make(rows, ["a", "a", "b", "b"]))[0].this_run
    assert "no per-parameter error estimate" in without and "param_tol" in without
    partial = analyses.findings(make(rows, ["a", "a", "b", "b"], error=[0.05, np.nan]))[0].this_run
    assert "only 1 of 2 iterations have an error estimate" in partial
    one = {f.name: f.this_run for f in analyses.findings(make(rows[:1], ["a", "a", "b", "b"]))}
    assert one["oscillation"].startswith("not measured: a change of sign needs two iterations")  # was "nan%"


def test_fractions_rejects_unknown_granularity():
    with pytest.raises(ValueError, match="by must be one of"):
        analyses.fractions(make([[1.0]], ["a"]), by="neuron")


# -- layers --------------------------------------------------------------------------------------
def test_exactly_one_layer_hurts_and_shares_add_up():
    rows = [[-0.5, -0.25, 0.1], [-0.25, 0.0, 0.15]]  # a: -1.0 in all, b: +0.25
    r = make(rows, ["a", "a", "b"])
    t = analyses.layer_totals(r)
    np.testing.assert_allclose(t["total"].values, [-1.0, 0.25])
    assert t["hurts"].values.tolist() == [False, True]
    assert float(t["loss_change"]) == pytest.approx(-0.75)
    np.testing.assert_allclose(t["share"].values, [4 / 3, -1 / 3])
    assert float(t["share"].sum()) == pytest.approx(1.0)
    assert analyses.hurting_layers(r) == ["b"]
    # Over the first iteration only, b still hurts, a helps by 0.75.
    first = analyses.layer_totals(r, stop=1)
    np.testing.assert_allclose(first["total"].values, [-0.75, 0.1])


def test_layer_shares_report_the_residual_gap():
    rows = [[-0.5, 0.1], [-0.3, 0.0]]
    loss = [2.0, 1.5, 1.2]  # true changes -0.5 and -0.3: LCA sums are -0.4 and -0.3, residuals +0.1 and 0
    r = make(rows, ["a", "b"], loss=loss)
    t = analyses.layer_totals(r)
    assert float(t["residual"]) == pytest.approx(0.1)
    assert float(t["loss_change"]) == pytest.approx(-0.8)
    # shares + (residual - rest) / change add to 1
    assert float(t["share"].sum()) - float(t["residual"]) / float(t["loss_change"]) == pytest.approx(1.0)
    assert analyses.hurting_layers(r) == ["b"]


def test_hurting_layers_worst_first_and_none():
    r = make([[0.1, 0.3, -1.0]], ["a", "b", "c"])
    assert analyses.hurting_layers(r) == ["b", "a"]
    assert analyses.hurting_layers(make([[-0.1, -0.2]], ["a", "b"])) == []


# -- windows -------------------------------------------------------------------------------------
def test_per_window_sums_equal_direct_sums_per_unit():
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(10, 6))
    layers = ["c1", "c1", "c1", "c1", "c2", "c2"]
    units = [0, 0, 1, 1, 0, 1]
    r = make(rows, layers, units=units)
    w = analyses.per_window(r, by="unit", windows=3)
    edges = [0, 3, 7, 10]  # round(linspace(0, 10, 4))
    assert w["start"].values.tolist() == edges[:-1] and w["stop"].values.tolist() == edges[1:]
    for k in range(3):
        block = rows[edges[k] : edges[k + 1]]
        expected = [block[:, [0, 1]].sum(), block[:, [2, 3]].sum(), block[:, 4].sum(), block[:, 5].sum()]
        np.testing.assert_allclose(w.values[k], expected)
    only = analyses.per_window(r, by="unit", windows=3, layer="c1")
    assert only.sizes["unit"] == 2 and set(only["layer"].values) == {"c1"}
    np.testing.assert_allclose(only.values, w.values[:, :2])
    with pytest.raises(KeyError, match="no layer 'c9'"):
        analyses.per_window(r, layer="c9")


# -- synchrony -----------------------------------------------------------------------------------
def _spiky(t, spikes_by_layer):
    """LCA of layers whose learning is 0 except spikes of 1 (LCA -1) on the given iterations."""
    names = list(spikes_by_layer)
    rows = np.zeros((t, len(names)))
    for j, name in enumerate(names):
        rows[list(spikes_by_layer[name]), j] = -1.0
    return make(rows, names)


def test_peaks_marks_local_maxima_above_the_quantile():
    x = np.array([[0.0, 1.0], [2.0, 0.0], [1.0, 3.0], [2.0, 0.0], [-1.0, 0.5]])
    got = analyses.peaks(x, quantile=0.0)
    assert got[:, 0].tolist() == [False, True, False, True, False]
    assert got[:, 1].tolist() == [True, False, True, False, True]
    assert analyses.peaks(x, quantile=1.0)[:, 1].tolist() == [False, False, True, False, False]


def test_two_layers_peaking_together_are_synchronous():
    shared = [5, 17, 30, 44, 52]
    r = _spiky(80, {"a": shared, "b": shared, "c": [10, 22, 36, 60, 70]})
    s = analyses.synchrony(r, n_permutations=500, seed=0)
    assert s["peaks"].sel(layer="a").values.nonzero()[0].tolist() == shared
    assert s["n_peaks"].values.tolist() == [5, 5, 5]
    assert int(s["statistic"]) == 5  # a and b coincide five times, c never
    co = s["coincidences"].values
    assert co.tolist() == [[5, 5, 0], [5, 5, 0], [0, 0, 5]]
    assert float(s["shared_fraction"]) == pytest.approx(10 / 15)
    # Baseline: each pair of independent layers with 5 peaks in 80 iterations shares 5*5/80 on average.
    assert float(s["expected"]) == pytest.approx(3 * 25 / 80, rel=0.15)
    assert float(s["p_value"]) < 0.01
    assert float(s["p_value"]) >= 1 / 501  # never below the resolution of the test


def test_independent_layers_are_not_called_synchronous():
    rng = np.random.default_rng(3)
    spikes = {}
    while len(spikes) < 4:  # 8 spikes per layer anywhere in 200 iterations, none adjacent (each is a peak)
        v = np.sort(rng.choice(200, size=8, replace=False))
        if np.diff(v).min() > 1:
            spikes["abcd"[len(spikes)]] = v.tolist()
    r = _spiky(200, spikes)
    s = analyses.synchrony(r, n_permutations=400, seed=1)
    k = np.zeros(200, int)
    for v in spikes.values():
        k[v] += 1
    assert int(s["statistic"]) == int((k * (k - 1) // 2).sum())
    assert float(s["p_value"]) > 0.05
    rolled = analyses.synchrony(r, n_permutations=400, seed=1, shuffle="roll")
    assert int(rolled["statistic"]) == int(s["statistic"]) and float(rolled["p_value"]) > 0.05


def test_synchrony_is_seeded_and_checks_arguments():
    r = _spiky(40, {"a": [3, 9], "b": [3, 20]})
    a = analyses.synchrony(r, n_permutations=200, seed=7)
    b = analyses.synchrony(r, n_permutations=200, seed=7)
    assert float(a["p_value"]) == float(b["p_value"]) and float(a["expected"]) == float(b["expected"])
    with pytest.raises(ValueError, match="at least two"):
        analyses.synchrony(_spiky(10, {"a": [2]}))
    with pytest.raises(ValueError, match="shuffle"):
        analyses.synchrony(r, shuffle="sideways")


# -- oscillation ---------------------------------------------------------------------------------
def _oscillating_run(t=7):
    """Parameter 0 alternates direction every step, 1 always moves up, 2 never moves; gradients constant."""
    theta = [np.zeros(3)]
    for k in range(t):
        theta.append(theta[-1] + np.array([(-1.0) ** k * 0.1, 0.05, 0.0]))
    grad = np.array([2.0, -1.0, 3.0])
    d = np.diff(np.stack(theta), axis=0)
    rows = d * grad  # exact LCA of a linear loss
    r = from_arrays(
        rows,
        1.0 + np.concatenate([[0.0], np.cumsum(rows.sum(axis=1))]),
        {
            "tensor": ["osc.w", "steady.w", "steady.w"],
            "layer": ["osc", "steady", "steady"],
            "unit": [0, 0, 1],
            "index": [0, 0, 1],
        },
    )
    snaps = [{"osc.w": torch.tensor(th[:1]), "steady.w": torch.tensor(th[1:])} for th in theta]
    return r, snaps


def test_a_parameter_that_alternates_every_step_oscillates_fully():
    r, snaps = _oscillating_run()
    o = analyses.oscillation(r, snaps)
    assert o["reversal_rate"].sel(layer="osc").item() == 1.0
    assert o["reversal_rate"].sel(layer="steady").item() == 0.0  # parameter 2 never moves: not counted
    assert o["lca_flip_rate"].sel(layer="osc").item() == 1.0
    assert o["lca_flip_rate"].sel(layer="steady").item() == 0.0
    assert o["group_flip_rate"].sel(layer="osc").item() == 1.0
    # pooled over the 2 parameters that move: 6 reversals of 12 consecutive pairs
    assert float(o["all_reversal_rate"]) == pytest.approx(0.5)
    assert float(o["all_lca_flip_rate"]) == pytest.approx(0.5)
    # Without the trajectory only the LCA sign changes are known.
    assert "reversal_rate" not in analyses.oscillation(r)


def test_oscillation_counts_across_block_boundaries(monkeypatch):
    monkeypatch.setattr(analyses, "_ROWS", 2)  # blocks of 2 iterations: every other flip crosses a boundary
    r, _snaps = _oscillating_run(t=9)
    assert analyses.oscillation(r)["lca_flip_rate"].sel(layer="osc").item() == 1.0


def test_oscillation_reads_parameters_by_name_and_index():
    # Reversed index order: the result's parameter 0 is the tensor's element 1.
    rows = np.array([[0.1, -0.1], [-0.1, -0.1], [0.1, -0.1]])
    theta = [np.array([0.0, 0.0]), np.array([1.0, 1.0]), np.array([2.0, 0.0]), np.array([3.0, 1.0])]
    r = from_arrays(
        rows, [1, 1, 0.8, 0.8], {"tensor": ["w", "w"], "layer": ["p", "q"], "unit": [1, 0], "index": [1, 0]}
    )
    snaps = [{"w": torch.tensor(th)} for th in theta]
    o = analyses.oscillation(r, snaps)
    assert o["reversal_rate"].values.tolist() == [1.0, 0.0]  # element 1 zigzags, element 0 climbs


def test_oscillation_names_a_mismatched_trajectory():
    r, snaps = _oscillating_run()
    with pytest.raises(ValueError, match="8 snapshots.*7 iterations|has 7 snapshots"):
        analyses.oscillation(r, snaps[:-1])
    bad = [{"osc.w": s["osc.w"]} for s in snaps]
    with pytest.raises(KeyError, match="steady.w"):
        analyses.oscillation(r, bad)


# -- concentration -------------------------------------------------------------------------------
def _mean_difference_gini(x):
    x = np.asarray(x, dtype=float)
    return np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean())


def test_gini_matches_the_mean_difference_formula():
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.exponential(size=37)
        assert analyses.gini(x) == pytest.approx(_mean_difference_gini(x))
    assert analyses.gini([0, 0, 0]) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        analyses.gini([-1, 2])


def test_one_parameter_doing_all_the_learning():
    n = 10
    rows = np.zeros((4, n))
    rows[:, 3] = -0.25  # parameter 3 helps by 1 in all
    rows[0, 5] = 0.5  # parameter 5 hurts: no learning, ignored by of="helped"
    r = make(rows, ["a"] * 5 + ["b"] * 5)
    c = analyses.concentration(r)
    assert float(c["gini"]) == pytest.approx((n - 1) / n)
    assert float(c["fraction"]) == pytest.approx(1 / n)
    assert c["layer_gini"].sel(layer="a").item() == pytest.approx(4 / 5)
    assert math.isnan(c["layer_fraction"].sel(layer="b").item())  # b did no learning at all
    a = analyses.concentration(r, of="abs")
    # |totals|: 1 and 0.5 among ten: the top one carries 2/3 < 90%, so it takes two
    assert float(a["fraction"]) == pytest.approx(2 / n)
    assert float(a["gini"]) == pytest.approx(_mean_difference_gini([1, 0.5] + [0] * 8))


def test_equal_learning_is_not_concentrated():
    r = make(np.full((3, 20), -0.1), ["a"] * 20)
    c = analyses.concentration(r)
    assert float(c["gini"]) == pytest.approx(0.0, abs=1e-12)
    assert float(c["fraction"]) == pytest.approx(18 / 20)  # 90% of 20 equal shares
    assert float(analyses.concentration(r, share=0.5)["fraction"]) == pytest.approx(10 / 20)


# -- accuracy of the rules -----------------------------------------------------------------------
def test_rule_accuracy_on_a_real_run():
    x, y = models.digits_data()
    model = models.mlp(seed=1, hidden=(16,))
    snaps = models.train(model, (x, y), steps=8, lr=0.2, seed=1)
    table, results = analyses.rule_accuracy(model, (x, y), snaps, return_results=True)
    assert table["rule"].values.tolist() == list(analyses.RULES)
    for rule, result in results.items():
        # residual independently: sum of LCA minus the actual loss change
        expected = result.lca.values.astype(np.float64).sum(axis=1) - np.diff(result.loss.values)
        np.testing.assert_allclose(table["residual"].sel(rule=rule).values, expected, atol=1e-5)
        np.testing.assert_allclose(table["drift"].sel(rule=rule).values, np.cumsum(expected), atol=1e-5)
    mx = table["max_abs_residual"]
    assert float(mx.sel(rule="simpson")) < float(mx.sel(rule="trapezoid")) < float(mx.sel(rule="first_order"))
    assert float(mx.sel(rule="adaptive")) <= 1e-3
    ev = table["total_evaluations"]
    assert int(ev.sel(rule="simpson")) == 2 * 8 + 1  # mid and end point per iteration, and the first snapshot
    assert int(ev.sel(rule="trapezoid")) == 8 + 1 and int(ev.sel(rule="first_order")) == 8 + 1


def test_residual_table_refuses_results_of_different_runs():
    with pytest.raises(ValueError, match="different numbers of iterations"):
        analyses.residual_table({"a": make([[1.0]], ["a"]), "b": make([[1.0], [2.0]], ["a"])})


# -- everything beside the paper -----------------------------------------------------------------
def test_findings_report_each_measurement():
    shared = [5, 17, 30, 44, 52]
    rows = np.zeros((80, 3))
    rows[shared, 0] = rows[shared, 1] = -1.0
    rows[:, 2] = 0.01  # layer c hurts a little every iteration
    r = make(rows, ["a", "b", "c"])
    f = analyses.findings(r)
    by_name = {x.name: x.this_run for x in f}
    assert "c hurt overall" in by_name["layers that hurt"]
    assert "5 coinciding layer-pairs" in by_name["synchrony"]
    html = f._repr_html_()
    assert html.startswith("<table>") and "barely over 50%" in html


def test_oscillation_per_parameter():
    r, snaps = _oscillating_run()
    o = analyses.oscillation(r, snaps, by="parameter")
    assert o["reversal_rate"].values[:2].tolist() == [1.0, 0.0] and math.isnan(o["reversal_rate"].values[2])
    np.testing.assert_array_equal(o["group_flip_rate"].values, o["lca_flip_rate"].values)


def test_analyses_agree_on_a_stored_result_opened_lazily(tmp_path):
    x, y = models.digits_data()
    model = models.mlp(seed=2, hidden=(12, 8))
    snaps = models.train(model, (x, y), steps=12, lr=0.2, seed=2)
    memory = lca.analyze(model, (x, y), snaps, method="simpson", progress=False)
    lca.analyze(model, (x, y), snaps, method="simpson", progress=False, store=tmp_path / "run.zarr")
    stored = lca.open(tmp_path / "run.zarr")
    for a, b in [
        (analyses.fractions(memory, by="layer"), analyses.fractions(stored, by="layer")),
        (analyses.layer_totals(memory), analyses.layer_totals(stored)),
        (analyses.oscillation(memory, snaps), analyses.oscillation(stored, snaps)),
        (analyses.concentration(memory), analyses.concentration(stored)),
        (analyses.synchrony(memory, n_permutations=50), analyses.synchrony(stored, n_permutations=50)),
    ]:
        for name in a.data_vars:
            np.testing.assert_allclose(
                np.asarray(a[name].values, float), np.asarray(b[name].values, float), rtol=1e-5, atol=1e-7, err_msg=name
            )
    np.testing.assert_allclose(
        analyses.per_window(memory, windows=4).values,
        analyses.per_window(stored, windows=4).values,
        rtol=1e-5,
        atol=1e-7,
    )
