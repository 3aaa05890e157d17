"""The batched-points path (several quadrature points in one vmap call) against the plain one."""

import numpy as np
import pytest
import torch
from torch import nn

import lca_notebook as lca
from lca_notebook import models


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_batched_points_give_the_same_lca(kind):
    x, y = models.digits_data(image=kind == "cnn")
    model = getattr(models, kind)(seed=1)
    snaps = models.train(model, (x, y), steps=25, lr=0.05)
    for method, kw in (("simpson", {}), ("adaptive", {"tol": 1e-5, "max_splits": 4})):
        plain = lca.analyze(model, (x, y), snaps, method=method, progress=False, **kw)
        batched = lca.analyze(model, (x, y), snaps, method=method, progress=False, batched_points=True, **kw)
        assert plain.attrs["gradient_evaluations"] >= 2 * 25 + 1
        same = plain.splits.values == batched.splits.values  # a residual right at tol may split differently
        assert same.mean() > 0.9
        scale = np.abs(plain.lca.values).max()
        np.testing.assert_allclose(batched.lca.values[same], plain.lca.values[same], rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(batched.loss.values, plain.loss.values, rtol=1e-6)


def test_batched_points_with_batchnorm_and_a_data_loader():
    torch.manual_seed(0)
    x, y = torch.randn(90, 5), torch.randint(0, 3, (90,))
    model = nn.Sequential(nn.Linear(5, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3))
    snaps = models.train(model, (x, y), steps=8, lr=0.1, batch_size=30)
    batches = [(x[:40], y[:40]), (x[40:], y[40:])]
    plain = lca.analyze(model, batches, snaps, method="simpson", progress=False)
    batched = lca.analyze(model, batches, snaps, method="simpson", batched_points=True, progress=False)
    np.testing.assert_allclose(batched.lca.values, plain.lca.values, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(batched.lca_rest.values, plain.lca_rest.values, rtol=1e-4, atol=1e-8)
    assert np.abs(batched.residual.values).max() < 1e-3
    with pytest.raises(ValueError, match="batched_points=True cannot be used with batchnorm='batch'"):
        lca.analyze(model, batches, snaps, batchnorm="batch", batched_points=True, progress=False)
