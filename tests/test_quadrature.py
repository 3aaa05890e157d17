"""The rules' points and weights, checked against exact integrals of polynomials."""

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
