"""engine: full-data gradients and the quadrature loop, against plain autograd on a copy of the model."""

import dataclasses
import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from helpers import digits, full_data_grad, train
from torch import nn

from lca_notebook import data, engine, layout
from lca_notebook.engine import Evaluator, Options, SnapshotReader, fixed_function, iterate, warn_if_stuck
from lca_notebook.quadrature import composite_simpson


@pytest.fixture(scope="module")
def run():
    x, y = digits(200)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))
    snaps = train(model, x, y, steps=3, lr=0.5)
    return model, x, y, snaps


def _parts(model, run_snaps, batch_size=None):
    model_, x, y = model
    spec = layout.build_spec(model_, run_snaps[0])
    batches = data.batches((x, y), batch_size=batch_size)
    return spec, Evaluator(model_, batches, nn.functional.cross_entropy, spec, "cpu")


@pytest.mark.parametrize("batch_size", [None, 64])  # one batch, or four with a short last one
def test_the_evaluator_is_the_full_data_gradient(run, batch_size):
    model, x, y, snaps = run
    spec, evaluate = _parts((model, x, y), snaps, batch_size)
    flat, extras = SnapshotReader(snaps, spec, "cpu")(2)
    loss, grad = evaluate(flat, extras, "here")
    want = full_data_grad(model, snaps[2], x, y)
    np.testing.assert_allclose(grad.double().numpy(), want.numpy(), rtol=1e-4, atol=1e-7)
    assert loss == pytest.approx(float(nn.functional.cross_entropy(_logits(model, snaps[2], x), y)), rel=1e-6)
    assert evaluate.evaluations == 1


class _Bag(nn.Module):
    """Tokens through a sparse embedding (repeated ids: a sparse gradient with duplicates), then a linear head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 5, sparse=True)
        self.head = nn.Linear(5, 3)
        self.unused = nn.Linear(2, 2)  # gets no gradient: zeros either way

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


@pytest.mark.parametrize("batch_size", [None, 64])
def test_a_gradient_added_into_a_row_has_the_bits_of_the_one_autograd_returns(run, batch_size):
    """The two ways the engine takes a gradient (chunks add it into a row of their matrix, one row at a time
    keeps autograd's tensors) give the same bits, with one batch or several weighted ones (a sharded run starts
    each shard the second way), also for a sparse embedding with repeated ids; and the row is the full-data
    gradient."""
    model, x, y, snaps = run
    spec, evaluate = _parts((model, x, y), snaps, batch_size)
    flat, extras = SnapshotReader(snaps, spec, "cpu")(2)
    row = torch.full_like(flat, 7.0)  # whatever it held before is overwritten
    loss_into, none = evaluate._gradients(flat, extras, "here", row)
    loss, grad = evaluate(flat, extras, "here")
    assert none is None and loss_into == loss and torch.equal(row, grad)
    np.testing.assert_allclose(
        row.double().numpy(), full_data_grad(model, snaps[2], x, y).numpy(), rtol=1e-4, atol=1e-7
    )

    torch.manual_seed(5)
    bag = _Bag()
    ids, labels = torch.randint(0, 7, (150, 9)), torch.randint(0, 3, (150,))
    state = {k: v + 0.1 * torch.randn_like(v) for k, v in bag.state_dict().items()}
    spec = layout.build_spec(bag, state)
    evaluate = Evaluator(
        bag, data.batches((ids, labels), batch_size=batch_size), nn.functional.cross_entropy, spec, "cpu"
    )
    flat, extras = SnapshotReader([state], spec, "cpu")(0)
    row = torch.full_like(flat, 7.0)
    assert evaluate._gradients(flat, extras, "here", row)[0] == evaluate(flat, extras, "here")[0]
    assert torch.equal(row, evaluate(flat, extras, "here")[1])
    assert not row[-6:].any()  # `unused` (last in the path) got no gradient


def _logits(model, state, x):
    import copy

    m = copy.deepcopy(model).eval()
    m.load_state_dict(state)
    with torch.no_grad():
        return m(x)


def _quadrature_lca(model, x, y, a, b, pieces):
    """Composite Simpson LCA of one iteration with `pieces` pieces, from quadrature's points and weights."""
    points, weights = composite_simpson(pieces)
    avg = sum(
        w * full_data_grad(model, {k: a[k] + s * (b[k] - a[k]) for k in a}, x, y)
        for s, w in zip(points, weights, strict=True)
    )
    d = torch.cat([(b[n] - a[n]).reshape(-1) for n, _ in model.named_parameters()]).double()
    return (d * avg).numpy()


@pytest.mark.parametrize("chunk", [None, 1])  # iterations in chunks (the default for small models), one at a time
@pytest.mark.parametrize("block", [None, 5])  # the default, and blocks that cut every tensor into pieces
@pytest.mark.parametrize(("method", "pieces", "evaluations"), [("simpson", 1, 2), ("adaptive", 4, 8)])
def test_iterate_is_composite_simpson_and_counts_its_evaluations(
    run, method, pieces, evaluations, block, chunk, monkeypatch
):
    if block is not None:
        monkeypatch.setattr(engine, "BLOCK", block)
    if chunk is not None:
        monkeypatch.setattr(engine, "MAX_CHUNK", chunk)
    monkeypatch.setattr(engine, "CHUNK_SECONDS", 1e9)  # chunks as large as MAX_CHUNK allows, whatever the timing
    model, x, y, snaps = run
    spec, evaluate = _parts((model, x, y), snaps)
    # tol far below what Simpson reaches: adaptive refines to max_splits (1 -> 2 -> 4 pieces, reusing points).
    options = Options(method=method, tol=1e-12, max_splits=4)
    loss0, rows = iterate(evaluate, SnapshotReader(snaps, spec, "cpu"), 1, 3, options)
    rows = [dataclasses.replace(r, lca=r.lca.clone()) for r in rows]  # each row's lca is refilled for the next
    assert [r.t for r in rows] == [1, 2]
    for r in rows:
        assert r.splits == pieces and r.evaluations == evaluations
        want = _quadrature_lca(model, x, y, snaps[r.t], snaps[r.t + 1], pieces)
        np.testing.assert_allclose(r.lca.double().numpy(), want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    assert loss0 == pytest.approx(float(nn.functional.cross_entropy(_logits(model, snaps[1], x), y)), rel=1e-6)


def test_chunks_give_the_same_bits_as_one_iteration_at_a_time_and_keep_rows_before_an_error(monkeypatch):
    """Chunks of 1, 3 and 32 iterations (T=7: chunks that do not divide T), every rule; then a snapshot that
    cannot be read and Ctrl-C in the middle of a chunk: the rows before it come out, then the error."""
    x, y = digits(300)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    snaps = train(model, x, y, steps=7, lr=0.5)
    spec = layout.build_spec(model, snaps[0])
    monkeypatch.setattr(engine, "CHUNK_SECONDS", 1e9)

    def rows(method, chunk, traj=snaps, loss_fn=nn.functional.cross_entropy):
        monkeypatch.setattr(engine, "MAX_CHUNK", chunk)
        evaluate = Evaluator(model, data.batches((x, y)), loss_fn, spec, "cpu")
        out = []
        try:
            for r in iterate(evaluate, SnapshotReader(traj, spec, "cpu"), 0, len(traj) - 1, Options(method, tol=1e-6))[
                1
            ]:
                out.append(dataclasses.replace(r, lca=r.lca.clone()))
        except (ValueError, KeyboardInterrupt) as exc:
            return out, exc
        return out, None

    for method in ("first_order", "trapezoid", "simpson", "adaptive"):
        one, _ = rows(method, 1)
        assert len(one) == 7
        for chunk in (3, 32):
            other, _ = rows(method, chunk)
            for a, b in zip(one, other, strict=True):
                assert torch.equal(a.lca, b.lca), (method, chunk, a.t)
                assert (a.residual, a.rest, a.splits, a.loss_end, a.evaluations) == (
                    b.residual, b.rest, b.splits, b.loss_end, b.evaluations
                )  # fmt: skip
    # snapshot 5 cannot be read: iterations 0..3 (both ends read) come out of the chunk first
    broken = [dict(s) for s in snaps]
    broken[5]["2.bias"] = torch.zeros(3)
    done, exc = rows("simpson", 32, broken)
    assert [r.t for r in done] == [0, 1, 2, 3] and "snapshot 5: tensor '2.bias' has shape (3,)" in str(exc)
    calls, at = [0], [math.inf]

    def interrupted(out, target):  # Ctrl-C at iteration 3's end point (iterations 0..2 take 2 losses each)
        calls[0] += 1
        if calls[0] == at[0]:
            raise KeyboardInterrupt
        return nn.functional.cross_entropy(out, target)

    rows("simpson", 32, snaps[: 1 + 1], loss_fn=interrupted)  # the start point's losses (it checks the loss too)
    calls[0], at[0] = 0, calls[0] - 2 + 7  # S start losses + 2 = calls; iteration 3 ends at S + 7

    done, exc = rows("simpson", 32, loss_fn=interrupted)
    assert isinstance(exc, KeyboardInterrupt) and [r.t for r in done] == [0, 1, 2]
    for a, b in zip(done, rows("simpson", 1)[0], strict=False):
        assert torch.equal(a.lca, b.lca)


def test_fill_writes_rows_of_per_tensor_values_with_zeros_for_none():
    """engine._fill (how chunks write snapshots and gradients) against one torch.cat a row: a matrix, a 0-d
    tensor, a tensor that is None in one row only (unused at one point) and one None in every row."""
    gen = torch.Generator().manual_seed(0)
    rows = [[torch.randn(2, 3, generator=gen), torch.randn((), generator=gen), None, None] for _ in range(3)]
    rows[1][2] = torch.randn(4, generator=gen)
    numels = [6, 1, 4, 5]
    out = torch.full((4, 16), float("nan"))
    engine._fill(out[1:], engine._by_tensor(rows), numels)
    for j, row in enumerate(rows):
        want = torch.cat([torch.zeros(n) if v is None else v.reshape(-1) for v, n in zip(row, numels, strict=True)])
        assert torch.equal(out[j + 1], want)
    assert out[0].isnan().all()  # nothing outside the rows given


@pytest.mark.parametrize("block", [4, 1 << 20])
def test_combine_is_the_rule_times_the_step_with_the_sums_of_all_and_of_the_selected(block, monkeypatch):
    """engine.combine in blocks against the formula in float64: tensors without a gradient in some terms or in
    all, and selected tensors (the first two) apart from the rest."""
    monkeypatch.setattr(engine, "BLOCK", block)
    numels = [10, 3, 7, 5]
    gen = torch.Generator().manual_seed(0)
    g = [[torch.randn(n, generator=gen) for n in numels] for _ in range(3)]
    g[1][1] = None  # no gradient in one term
    g[0][3] = g[1][3] = g[2][3] = None  # none at all: its LCA is 0
    d = torch.randn(sum(numels), generator=gen)
    out = torch.full_like(d, float("nan"))
    weights = (1 / 6, 1 / 6, 4 / 6)
    total, selected = engine.combine(out, d, list(zip(g, weights, strict=True)), numels, 13)
    want = (
        sum(
            w * torch.cat([torch.zeros(n) if p is None else p for p, n in zip(parts, numels, strict=True)]).double()
            for parts, w in zip(g, weights, strict=True)
        )
        * d.double()
    )
    np.testing.assert_allclose(out.numpy(), want.numpy(), rtol=1e-6, atol=1e-7)
    assert (out[20:] == 0).all()
    assert total == pytest.approx(float(want.sum()), rel=1e-6) and selected == pytest.approx(
        float(want[:13].sum()), rel=1e-6
    )


def test_options_name_what_is_wrong():
    for kwargs, match in [
        ({"method": "euler"}, "unknown method 'euler'"),
        ({"tol": -1}, "tol must be a positive number"),
        ({"max_splits": 0}, "max_splits must be a positive int"),
        ({"batchnorm": "train"}, "batchnorm must be one of"),
        ({"batchnorm": "batch", "batched_points": True}, "batched_points=True cannot be used"),
    ]:
        with pytest.raises(ValueError, match=match):
            Options(**kwargs)
    assert "batched_points" not in Options().attrs()


def test_fixed_function_restores_every_flag_even_after_an_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.BatchNorm1d(2))
    model[1].eval()  # a mixed state, restored as it was
    before = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError), fixed_function(model, "batch"):
        assert not model[1].training and model[2].training
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == before


def test_param_tol_refines_until_every_parameters_estimate_meets_it(run):
    import copy

    from lca_notebook.quadrature import simpson_error

    model, x, y, snaps = run  # in float64: the estimates fall below float32's rounding of the gradients
    model, x = copy.deepcopy(model).double(), x.double()
    snaps = [{k: v.double() for k, v in s.items()} for s in snaps]
    spec, evaluate = _parts((model, x, y), snaps)
    # Composite Simpson LCA at 1, 2, 4, ... pieces from plain autograd, and the estimate of each level.
    levels = {t: [_quadrature_lca(model, x, y, snaps[t], snaps[t + 1], 2**k) for k in range(5)] for t in range(3)}
    estimates = {
        t: [simpson_error([np.abs(b - a).max() for a, b in itertools.pairwise(rows[: k + 1])]) for k in range(1, 5)]
        for t, rows in levels.items()
    }
    at_4 = sorted(e[1] for e in estimates.values())
    param_tol = float(np.sqrt(at_4[0] * at_4[1]))  # met at 4 pieces on one iteration, later on the others
    options = Options(method="adaptive", tol=1.0, param_tol=param_tol, max_splits=16)  # tol=1: the sum never asks
    _, rows = iterate(evaluate, SnapshotReader(snaps, spec, "cpu"), 0, 3, options)
    for r in rows:
        want = next(k for k, e in enumerate(estimates[r.t], start=1) if e <= param_tol)  # the first level that meets it
        assert r.splits == 2**want and r.evaluations == 2 * 2**want
        assert r.error == pytest.approx(estimates[r.t][want - 1], rel=1e-6)
        ref = levels[r.t][want]
        np.testing.assert_allclose(r.lca.numpy(), ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())
    assert len({r.splits for r in iterate(evaluate, SnapshotReader(snaps, spec, "cpu"), 0, 3, options)[1]}) > 1


def test_error_is_nan_for_rules_with_one_level_and_adaptive_refines_once_for_it(run):
    model, x, y, snaps = run
    spec, evaluate = _parts((model, x, y), snaps)
    for method in ("first_order", "trapezoid", "simpson"):
        _, rows = iterate(evaluate, SnapshotReader(snaps, spec, "cpu"), 0, 2, Options(method=method))
        assert all(math.isnan(r.error) for r in rows)
    # tol met at one piece: no estimate; any param_tol, however loose, buys one refinement (2 evaluations).
    loose = Options(method="adaptive", tol=1.0, param_tol=1.0)
    for options, splits in ((Options(method="adaptive", tol=1.0), 1), (loose, 2)):
        _, rows = iterate(evaluate, SnapshotReader(snaps, spec, "cpu"), 0, 2, options)
        for r in rows:
            assert r.splits == splits and r.evaluations == 2 * splits and math.isnan(r.error) == (splits == 1)


def test_param_tol_is_checked_and_recorded():
    for kwargs, match in [
        ({"param_tol": 0}, "param_tol must be a positive finite number"),
        ({"param_tol": -1e-6}, "param_tol must be a positive finite number"),
        ({"param_tol": float("nan")}, "param_tol must be a positive finite number"),
        ({"param_tol": float("inf")}, "param_tol must be a positive finite number"),
        ({"param_tol": True}, "param_tol must be a positive finite number"),
        ({"param_tol": "1e-6"}, "param_tol must be a positive finite number"),
        ({"param_tol": 1e-6, "method": "simpson"}, "only method='adaptive' does; method='simpson'"),
        ({"param_tol": 1e-6, "method": "first_order"}, "only method='adaptive'"),
        ({"param_tol": 1e-6, "max_splits": 1}, r"param_tol needs max_splits >= 2, got max_splits=1"),
    ]:
        with pytest.raises(ValueError, match=match):
            Options(**kwargs)
    assert Options(param_tol=1e-6).attrs()["param_tol"] == 1e-6
    assert Options().attrs()["param_tol"] == 0.0  # not set (netCDF attributes cannot hold None)


def test_a_param_tol_not_met_at_max_splits_is_warned_with_the_iteration():
    options = Options(param_tol=1e-6, max_splits=4)
    with pytest.warns(UserWarning, match=r"estimated error above param_tol=1e-06 on 1 of 3 iterations \(first: 2"):
        warn_if_stuck(np.zeros(3), np.array([2, 4, 4]), options, error=np.array([1e-5, 1e-7, 2e-6]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_stuck(np.zeros(2), np.array([4, 4]), options, error=np.array([1e-7, 1e-6]))  # met: no warning


@pytest.mark.parametrize("shape", [(6, 5), (4, 5, 3, 3), (2, 5, 7)])
def test_batch_norm_with_moving_statistics_is_pytorchs_and_differentiates_them(shape):
    """Eval-mode batch norm whose running statistics need a gradient: PyTorch's own output (to an ulp: PyTorch's
    kernel fuses the shift's multiply-add), and a gradient for mean and variance that finite differences confirm
    (gradcheck, float64)."""
    torch.manual_seed(0)
    x = torch.randn(*shape) * 3 + 1
    m, v, w, b = torch.randn(5), torch.rand(5) + 0.1, torch.randn(5), torch.randn(5)
    want = torch.nn.functional.batch_norm(x, m, v, w, b, False)
    got = engine._batch_norm(x, m.clone().requires_grad_(), v.clone().requires_grad_(), w, b)
    torch.testing.assert_close(got.detach(), want, rtol=2e-7, atol=2e-6)
    x64, w64, b64 = x.double(), w.double(), b.double()
    stats = (m.double().requires_grad_(), v.double().requires_grad_())
    assert torch.autograd.gradcheck(lambda mean, var: engine._batch_norm(x64, mean, var, w64, b64), stats)


class _Pruned(nn.Module):
    """A bool mask buffer that training changes (pruning half the hidden units at one step)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.head = nn.Linear(6, 8), nn.Linear(8, 3)
        self.register_buffer("mask", torch.ones(8, dtype=torch.bool))

    def forward(self, x):
        return self.head(torch.relu(self.fc(x)) * self.mask)


@pytest.mark.parametrize("method", ["simpson", "adaptive"])
def test_a_non_floating_tensor_that_changes_is_named_and_not_refined(method):
    """A mask has no path between its values: what its jump does to the loss stays in that iteration's residual
    (of the jump's size, computed here: the end snapshot's loss with the old mask against the new), adaptive
    spends no points on it, and one warning names the tensor and the iteration."""
    import lca_notebook as lca

    model, x = _Pruned(), torch.randn(64, 6)
    y = torch.randint(0, 3, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snaps = [{k: v.clone() for k, v in model.state_dict().items()}]
    for step in range(4):
        if step == 2:
            model.mask[:4] = False
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        snaps.append({k: v.clone() for k, v in model.state_dict().items()})
    with pytest.warns(UserWarning, match=r"snapshot 3: the non-floating tensor 'mask' differs.*iteration 2") as caught:
        result = lca.analyze(model, (x, y), snaps, method=method, tol=1e-9, progress=False)
    assert sum("non-floating" in str(w.message) for w in caught) == 1
    with torch.no_grad():
        new, old = (
            float(nn.functional.cross_entropy(torch.func.functional_call(model, snaps[3] | {"mask": m}, (x,)), y))
            for m in (snaps[3]["mask"], snaps[2]["mask"])
        )
    residual = result.residual.values
    assert abs(residual[2]) > abs(new - old) / 10 > 1e-3  # the jump's order, not quadrature's
    assert result.dataset["evaluations"].values[2] == 2
    assert np.abs(np.delete(residual, 2)).max() < abs(residual[2]) / 100
