"""What several test modules share: one digits training loop, one "results are equal" check."""

from __future__ import annotations

import numpy as np
import torch

from lca_notebook import models

#: Per-iteration and per-checkpoint variables every result has.
RESULT_VARIABLES = ("residual", "lca_rest", "splits", "evaluations", "error")  # error: NaN where none (equal as NaN)


def digits(n: int | None = None, *, image: bool = False):
    """The first ``n`` of scikit-learn's digits as ``(x, y)`` tensors (x in [0, 1])."""
    x, y = models.digits_data(image=image)
    return (x, y) if n is None else (x[:n], y[:n])


def train(model, x, y, steps: int = 6, *, lr: float = 0.1, batch_size: int | None = None, **options):
    """``steps`` SGD steps on (x, y) (full batch unless ``batch_size``): the ``steps + 1`` state_dict copies.
    The one training loop of the tests: :func:`lca_notebook.models.train`, which the tests check in test_models."""
    return models.train(model, (x, y), steps=steps, lr=lr, batch_size=batch_size or len(x), **options)


def assert_results_equal(got, want, *, n: int | None = None, exact: bool = True, rtol=1e-4, atol=1e-8):
    """Two results agree on lca, loss and every per-iteration variable (the first ``n`` iterations of
    ``want``): bit for bit, or to ``rtol``/``atol`` when ``exact=False`` (then splits and evaluations,
    which depend on rounding near ``tol``, are not compared)."""
    n = want.n_iterations if n is None else n
    assert got.n_iterations == n, (got.n_iterations, n)
    pairs = {"lca": (got.lca.values, want.lca.values[:n]), "loss": (got.loss.values, want.loss.values[: n + 1])}
    for name in RESULT_VARIABLES:
        if exact or name in ("residual", "lca_rest"):
            pairs[name] = (got.dataset[name].values, want.dataset[name].values[:n])
    for name, (a, b) in pairs.items():
        if exact:
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            scale = max(float(np.abs(b).max()), 1e-12) if np.size(b) else 1.0
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale if name == "lca" else atol, err_msg=name)


def full_data_grad(model, state, x, y, loss_fn=torch.nn.functional.cross_entropy) -> torch.Tensor:
    """The gradient of the full-data loss at ``state`` the plain way (a copy of the model, load_state_dict,
    backward), flattened over ``named_parameters`` in float64: the reference the library is checked against."""
    import copy

    ref = copy.deepcopy(model).eval()
    ref.load_state_dict(state)
    ref.zero_grad()
    loss_fn(ref(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in ref.parameters()]).double()
