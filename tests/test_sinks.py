"""sinks: the one prefix step against a cumulative sum written here; rows and the in-memory sink."""

import numpy as np
import pytest
import torch

from lca_notebook.engine import IterationResult, Options
from lca_notebook.layout import GRANULARITIES, Groups, PathSpec
from lca_notebook.sinks import MemorySink, PrefixBlock, Rows


def _groups():
    return Groups(
        {
            "tensor": np.array(["a.w"] * 4 + ["a.b"] * 2 + ["b.w"] * 3),
            "layer": np.array(["a"] * 6 + ["b"] * 3),
            "unit": np.array([0, 0, 1, 1, 0, 1, 0, 1, 2]),
            "index": np.array([0, 1, 2, 3, 0, 1, 0, 1, 2]),
        }
    )


def test_prefix_block_is_the_float64_cumulative_sum_at_every_granularity():
    groups = _groups()
    lca = np.random.default_rng(1).normal(size=(7, 9)).astype(np.float32)
    start = {by: np.random.default_rng(2).normal(size=len(groups.labels(by))) for by in GRANULARITIES}
    block = PrefixBlock(groups, 7)
    block.seed(start)
    for i, row in enumerate(lca):
        block.advance(i, row)
    members = {by: [groups.ids(by) == g for g in range(len(groups.labels(by)))] for by in GRANULARITIES}
    for by in GRANULARITIES:
        per_iteration = np.stack([[row[m].astype(np.float64).sum() for m in members[by]] for row in lca])
        want = start[by] + np.concatenate([np.zeros((1, per_iteration.shape[1])), np.cumsum(per_iteration, 0)])
        if by == "parameter":  # only the running sum: the last row, never a row per iteration
            assert "parameter" not in block.rows
            np.testing.assert_allclose(block.parameter, want[-1], rtol=1e-12, atol=1e-12)
            continue
        np.testing.assert_allclose(block.rows[by], want, rtol=1e-12, atol=1e-12, err_msg=by)
    assert all(np.array_equal(block.last(7)[by], block.rows[by][7]) for by in GRANULARITIES[1:])
    assert np.array_equal(block.last(7)["parameter"], block.parameter)


def _row(t, values, loss):
    return IterationResult(t, torch.tensor(values), rest=0.5, residual=0.25, splits=2, loss_end=loss, evaluations=4)


def test_rows_and_the_memory_sink_keep_what_the_engine_gave():
    rows = Rows(2, 3)
    rows.put(1, _row(1, [1.0, -2.0, 3.0], 0.0))
    assert rows["lca"].dtype == np.float32 and rows["lca"][1].tolist() == [1.0, -2.0, 3.0]
    assert rows["splits"][1] == 2 and rows["lca_rest"][1] == 0.5

    spec = PathSpec(["w"], [torch.Size([3])], [torch.float32], [True], 1, torch.float32, {"w": "w"})
    sink = MemorySink(spec, n_snapshots=4, options=Options(method="simpson", n_samples=7))
    sink.write_loss(0, 2.0)
    sink.write(_row(0, [0.1, 0.2, -0.3], 1.5))
    sink.interrupted(1)  # stopped after one iteration: a partial result of it
    assert sink.partial.n_iterations == 1 and sink.partial.loss.values.tolist() == [2.0, 1.5]
    sink.write(_row(1, [0.0, 0.0, 0.0], 1.25))
    sink.write(_row(2, [1.0, 1.0, 1.0], 1.0))
    result = sink.finish()
    np.testing.assert_array_equal(result.lca.values[0], np.float32([0.1, 0.2, -0.3]))
    assert result.attrs["method"] == "simpson" and result.attrs["n_samples"] == 7
    assert result.residual.values.tolist() == [0.25] * 3
    with pytest.raises(IndexError):
        sink.write(_row(3, [0.0] * 3, 0.0))  # no fourth iteration in a 4-snapshot run


def test_a_reduced_row_over_blocks_equals_numpy_where_runs_cross_piece_and_block_edges():
    """Rows.reduce works in cache-sized blocks cut at pieces: a layout with units longer than a piece, units that
    cross block edges, units made of several runs (weight row and bias, a transposed conv's channels) and a single
    parameter, against masks of each group's parameters built here."""
    n1, n2, n3 = 270_000, 40_000, 30_000  # two blocks of 262,144 (layout.BLOCK), the first edge inside l1.w
    coords = {
        "tensor": np.array(["l1.w"] * n1 + ["l1.b"] * n2 + ["l2.w"] * n3 + ["s"]),
        "layer": np.array(["l1"] * (n1 + n2) + ["l2"] * n3 + ["s"]),
        "unit": np.concatenate([np.arange(n1) // 4500, np.zeros(n2, int), np.arange(n3) // 7 % 3, [0]]),
        "index": np.concatenate([np.arange(n1), np.arange(n2), np.arange(n3), [0]]),
    }
    rng = np.random.default_rng(3)
    lca = rng.normal(size=(3, len(coords["unit"]))).astype(np.float32)
    lca[:, rng.random(lca.shape[1]) < 0.1] = 0.0  # parameters that did not move: neither helped nor hurt
    rows = Rows(3, lca.shape[1], keep="unit", groups=Groups(coords))
    for t, row in enumerate(lca):
        rows.put(t, _row(t, row.tolist(), 1.0))
    keys = {
        "unit": np.char.add(np.char.add(coords["layer"], "["), np.char.add(coords["unit"].astype(str), "]")),
        "tensor": coords["tensor"],
        "layer": coords["layer"],
        "total": np.full(lca.shape[1], "total"),
    }
    lca64 = lca.astype(np.float64)
    for by, key in keys.items():
        masks = [key == label for label in dict.fromkeys(key.tolist())]
        np.testing.assert_allclose(rows[f"lca_{by}"], np.stack([lca64[:, m].sum(1) for m in masks], 1), rtol=1e-12)
        assert rows[f"helped_{by}"].tolist() == np.stack([(lca[:, m] < 0).sum(1) for m in masks], 1).tolist(), by
        assert rows[f"hurt_{by}"].tolist() == np.stack([(lca[:, m] > 0).sum(1) for m in masks], 1).tolist(), by
    np.testing.assert_allclose(rows.totals.total, lca64.sum(0), rtol=1e-12)
    assert rows.totals.helped.tolist() == (lca < 0).sum(0).tolist()


def test_totals_count_past_what_their_uint8_counters_hold():
    """Counts of iterations helped go through uint8 counters flushed every 255 rows and when read: 600 rows of
    a parameter that always helped, one that never did and one that helped every third, read in the middle and
    at the end, against counts made here."""
    rows = Rows(600, 3, keep="layer", groups=Groups({k: v[:3] for k, v in _groups().coords.items()}))
    values = np.zeros((600, 3), np.float32)
    values[:, 0], values[:, 1], values[::3, 2] = -1.0, 2.0, -0.5
    for t, row in enumerate(values):
        rows.put(t, _row(t, row.tolist(), 1.0))
        if t == 299:
            assert rows.totals.helped.tolist() == [300, 0, 100]
    assert rows.totals.helped.dtype == np.int32 and rows.totals.helped.tolist() == [600, 0, 200]
    np.testing.assert_array_equal(rows.totals.total, values.astype(np.float64).sum(0))
