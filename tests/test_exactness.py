"""LCA against closed forms: on a quadratic loss the trapezoid and Simpson rules are exact."""

import itertools

import numpy as np
import pytest
import torch

import lca_notebook as lca


def _quadratic_problem(steps=12, seed=0):
    """Linear regression with MSE in float64: the loss is exactly quadratic in (W, b)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(50, 5, generator=g, dtype=torch.float64)
    y = torch.randn(50, 3, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(5, 3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    snaps = [{k: v.clone() for k, v in model.state_dict().items()}]
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        snaps.append({k: v.clone() for k, v in model.state_dict().items()})
    return model, x, y, snaps


def _closed_form(x, y, snaps):
    """Per-parameter LCA of the MSE, written with numpy only: the gradient is affine in theta, so
    the path integral of g_i along the segment is (g_i(a) + g_i(b)) / 2, and the loss is exact."""
    X = np.hstack([x.numpy(), np.ones((len(x), 1))])  # bias as a last input column
    Y = y.numpy()
    n, k = Y.shape

    def theta(s):  # (6, 3): rows 0..4 = weight.T, row 5 = bias
        return np.vstack([s["weight"].numpy().T, s["bias"].numpy()[None]])

    def loss(th):
        return ((X @ th - Y) ** 2).mean()

    def grad(th):
        return 2 * X.T @ (X @ th - Y) / (n * k)

    def flat(th):  # the library's order: weight (3, 5) flattened, then bias (3,)
        return np.concatenate([th[:5].T.reshape(-1), th[5]])

    rows, losses = [], [loss(theta(snaps[0]))]
    for a, b in itertools.pairwise(snaps):
        ta, tb = theta(a), theta(b)
        rows.append(flat(tb - ta) * flat((grad(ta) + grad(tb)) / 2))
        losses.append(loss(tb))
    return np.array(rows), np.array(losses)


@pytest.mark.parametrize("method", ["trapezoid", "simpson", "adaptive"])
def test_quadratic_loss_is_allocated_exactly(method):
    model, x, y, snaps = _quadratic_problem()
    result = lca.analyze(
        model, (x, y), snaps, loss_fn=torch.nn.functional.mse_loss, method=method, tol=1e-12, progress=False
    )
    expected, losses = _closed_form(x, y, snaps)
    assert result.lca.dtype == np.float64
    np.testing.assert_allclose(result.loss.values, losses, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.lca.values, expected, rtol=1e-9, atol=1e-13)
    assert np.abs(result.residual.values).max() < 1e-10
    # The parts add up to the loss change, checked against the closed-form losses.
    np.testing.assert_allclose(result.lca.values.sum(axis=1), np.diff(losses), atol=1e-10)
    assert (result.splits.values == 1).all()  # exact rules never need a split


def test_a_float64_models_lca_stays_float64_in_a_store(tmp_path):
    """A store of a float64 model holds float64 LCA (float32 would cut the closed form's agreement to 1e-7), as
    the in-memory result does, and so does its saved copy."""
    model, x, y, snaps = _quadratic_problem()
    store = tmp_path / "run.zarr"
    result = lca.analyze(
        model, (x, y), snaps, loss_fn=torch.nn.functional.mse_loss, method="simpson", store=store, progress=False
    )
    expected, _ = _closed_form(x, y, snaps)
    saved = lca.open(store).save(tmp_path / "copy.zarr")
    for r in (result, lca.open(store), lca.open(saved)):
        assert r.lca.dtype == np.float64
        np.testing.assert_allclose(r.lca.values, expected, rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(r.total("parameter").values, expected.sum(0), rtol=1e-9, atol=1e-13)


def test_first_order_is_not_exact_on_a_quadratic():
    model, x, y, snaps = _quadratic_problem()
    result = lca.analyze(
        model, (x, y), snaps, loss_fn=torch.nn.functional.mse_loss, method="first_order", progress=False
    )
    assert np.abs(result.residual.values).max() > 1e-6


def test_adaptive_weights_match_composite_simpson():
    """A cubic-in-s loss would be exact; a non-polynomial one forces splits. Check that the LCA of
    the split iterations equals an explicit composite Simpson sum with quadrature's weights."""
    from lca_notebook.quadrature import composite_simpson

    torch.manual_seed(0)
    x = torch.randn(40, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (40,))
    model = torch.nn.Linear(3, 2).double()
    snaps = [{k: v.clone() for k, v in model.state_dict().items()}]
    for _step in range(3):  # large, jagged steps make Simpson's residual large
        snaps.append({k: v + torch.randn_like(v) * 3 for k, v in snaps[-1].items()})
    with pytest.warns(
        UserWarning, match=r"hit max_splits=8 with \|residual\| > tol=1e-09 on \d of 3 iterations"
    ) as caught:
        result = lca.analyze(model, (x, y), snaps, method="adaptive", tol=1e-9, max_splits=8, progress=False)
    assert [w.filename for w in caught if "max_splits" in str(w.message)] == [__file__]  # points at the caller
    assert result.splits.values.max() > 1
    for t in range(3):
        pieces = int(result.splits[t])
        s, w = composite_simpson(pieces)
        a = torch.cat([snaps[t][k].reshape(-1) for k in ("weight", "bias")])
        d = torch.cat([snaps[t + 1][k].reshape(-1) for k in ("weight", "bias")]) - a
        avg = torch.zeros_like(a)
        for sj, wj in zip(s, w, strict=False):
            p = (a + float(sj) * d).requires_grad_()
            out = x @ p[:6].view(2, 3).T + p[6:]
            (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(out, y), p)
            avg += float(wj) * g
        np.testing.assert_allclose(result.lca.values[t], (d * avg).numpy(), rtol=1e-9, atol=1e-12)
        converged = abs(float(result.residual[t])) <= 1e-9
        assert converged or pieces == 8
