"""engine: full-data gradients and the quadrature loop, against plain autograd on a copy of the model."""

import numpy as np
import pytest
import torch
from helpers import digits, full_data_grad, train
from torch import nn

from lca_notebook import data, layout
from lca_notebook.engine import Evaluator, Options, SnapshotReader, fixed_function, iterate
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


@pytest.mark.parametrize(("method", "pieces", "evaluations"), [("simpson", 1, 2), ("adaptive", 4, 8)])
def test_iterate_is_composite_simpson_and_counts_its_evaluations(run, method, pieces, evaluations):
    model, x, y, snaps = run
    spec, evaluate = _parts((model, x, y), snaps)
    # tol far below what Simpson reaches: adaptive refines to max_splits (1 -> 2 -> 4 pieces, reusing points).
    options = Options(method=method, tol=1e-12, max_splits=4)
    loss0, rows = iterate(evaluate, SnapshotReader(snaps, spec, "cpu"), 1, 3, options)
    rows = list(rows)
    assert [r.t for r in rows] == [1, 2]
    for r in rows:
        assert r.splits == pieces and r.evaluations == evaluations
        want = _quadrature_lca(model, x, y, snaps[r.t], snaps[r.t + 1], pieces)
        np.testing.assert_allclose(r.lca.double().numpy(), want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    assert loss0 == pytest.approx(float(nn.functional.cross_entropy(_logits(model, snaps[1], x), y)), rel=1e-6)


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
