"""The rules' points and weights, checked against exact integrals of polynomials."""

import itertools

import numpy as np
import pytest

from lca_notebook import quadrature as q


@pytest.mark.parametrize("pieces", [1, 2, 4, 8, 32])
def test_composite_simpson_integrates_cubics_exactly(pieces):
    s, w = q.composite_simpson(pieces)
    assert len(s) == 2 * pieces + 1
    for degree in range(4):
        assert np.dot(w, s**degree) == pytest.approx(1 / (degree + 1), abs=1e-14)


@pytest.mark.parametrize("pieces", [1, 2, 4, 16])
def test_refinement_adds_exactly_the_missing_points(pieces):
    old, _ = q.composite_simpson(pieces)
    new, _ = q.composite_simpson(2 * pieces)
    merged = np.sort(np.concatenate([old, q.refinement_points(pieces)]))
    np.testing.assert_allclose(merged, new, atol=1e-15)


@pytest.mark.parametrize("method,degree", [("first_order", 0), ("trapezoid", 1), ("simpson", 3), ("adaptive", 3)])
def test_fixed_rules_are_exact_to_their_degree(method, degree):
    s, w = q.rule(method)
    for k in range(degree + 1):
        assert np.dot(w, s**k) == pytest.approx(1 / (k + 1), abs=1e-14)
    assert abs(np.dot(w, s ** (degree + 1)) - 1 / (degree + 2)) > 1e-6


def test_rk4_is_simpson_and_unknown_methods_are_named():
    assert q.check_method("rk4") == "simpson"
    with pytest.raises(ValueError, match="unknown method 'euler'.*first_order"):
        q.check_method("euler")


def _levels(f, exact, n_levels=7):
    """Composite Simpson of f on [0, 1] with 1, 2, 4, ... pieces: (estimates, errors, changes)."""
    values = []
    for k in range(n_levels):
        s, w = q.composite_simpson(2**k)
        values.append(float(np.dot(w, f(s))))
    errors = [abs(v - exact) for v in values]
    changes = [q.level_change(np.array([b]), np.array([a])) for a, b in itertools.pairwise(values)]
    return values, errors, changes


def test_simpson_error_is_richardsons_on_a_smooth_integrand():
    # exp(2s) cos(3s): integral (e^2 (2 cos 3 + 3 sin 3) - 2) / 13, in closed form.
    exact = (np.exp(2) * (2 * np.cos(3) + 3 * np.sin(3)) - 2) / 13
    _, errors, changes = _levels(lambda s: np.exp(2 * s) * np.cos(3 * s), exact)
    for k in range(3, len(changes) + 1):  # three changes at Simpson's order: the estimate is change / 15
        estimate = q.simpson_error(changes[:k])
        assert estimate == pytest.approx(changes[k - 1] / 15)
        assert 0.5 * estimate <= errors[k] <= 2 * estimate  # Richardson is sharp here
    for k in (1, 2):  # fewer levels: conservative, never below the error made
        assert q.simpson_error(changes[:k]) >= errors[k]


def test_simpson_error_bounds_an_integrand_that_jumps():
    # What a ReLU network's gradient looks like along a segment: smooth, plus steps where units switch.
    rng = np.random.default_rng(0)
    where, size = rng.uniform(0, 1, 40), rng.normal(0, 1, 40)

    def f(s):
        s = np.asarray(s, dtype=np.float64)
        return np.sin(s) + (size[None, :] * (s[:, None] > where[None, :])).sum(axis=1)

    exact = 1 - np.cos(1) + float((size * (1 - where)).sum())
    _, errors, changes = _levels(f, exact, n_levels=9)
    for k in range(1, len(changes) + 1):
        assert errors[k] <= 2 * q.simpson_error(changes[:k]), (k, errors[k], q.simpson_error(changes[:k]))
    # Richardson's /15 alone would claim several times less than the error made.
    assert max(errors[k] / (changes[k - 1] / 15) for k in range(1, len(changes) + 1)) > 4


def test_level_change_takes_numpy_and_torch():
    import torch

    a, b = np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.5, 2.0])
    assert q.level_change(a, b) == q.level_change(torch.tensor(a), torch.tensor(b)) == 1.0
    assert q.level_change(np.zeros(0), np.zeros(0)) == 0.0
    with pytest.raises(ValueError, match="at least two levels"):
        q.simpson_error([])
