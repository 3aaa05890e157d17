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
