"""Quadrature rules along one straight segment theta(s) = theta_t + s * d, s in [0, 1].

Numbers only, nothing about torch: a rule is a set of points ``s_j`` and weights ``w_j`` with
``integral_0^1 f(s) ds ~= sum_j w_j f(s_j)``. LCA of parameter i over the segment is then
``d_i * sum_j w_j * dL/dtheta_i(theta(s_j))``.

The engine takes every weight from here: :func:`rule` for the fixed rules, :func:`simpson_weights`
and :func:`refinement_points` for composite Simpson as adaptive refines it.

>>> points, weights = rule("simpson")
>>> points.tolist(), (weights * 6).tolist()
([0.0, 0.5, 1.0], [1.0, 4.0, 1.0])
>>> [w * 12 for w in simpson_weights(2)]  # ends, newest midpoints, older interior points
[1.0, 4.0, 2.0]
"""

from __future__ import annotations

import numpy as np

#: The rules ``analyze(method=...)`` accepts. "simpson" is the paper's "RK4" (on a straight
#: segment fourth-order Runge-Kutta reduces to Simpson's rule); "adaptive" is the paper's default.
METHODS = ("first_order", "trapezoid", "simpson", "adaptive")


def check_method(method: str) -> str:
    if method == "rk4":  # the paper's name for the same rule
        return "simpson"
    if method not in METHODS:
        raise ValueError(
            f"unknown method {method!r}: choose one of {', '.join(METHODS)} (or 'rk4', an alias of 'simpson')"
        )
    return method


def composite_simpson(pieces: int) -> tuple[np.ndarray, np.ndarray]:
    """Points and weights of composite Simpson with ``pieces`` pieces: ``2*pieces + 1`` points,
    weights ``(1, 4, 2, 4, ..., 2, 4, 1) / (6 * pieces)``."""
    if pieces < 1:
        raise ValueError(f"pieces must be >= 1, got {pieces}")
    points = np.arange(2 * pieces + 1) / (2 * pieces)
    weights = np.where(np.arange(2 * pieces + 1) % 2 == 1, 4.0, 2.0)
    weights[0] = weights[-1] = 1.0
    return points, weights / (6 * pieces)


def simpson_weights(pieces: int) -> tuple[float, float, float]:
    """Composite Simpson's weights by kind of point, for running sums of gradients: the two ends, the
    ``pieces`` current midpoints and the ``pieces - 1`` older interior points, ``(1, 4, 2) / (6 * pieces)``.
    Doubling ``pieces`` turns the midpoints into interior points, so every gradient is reused."""
    if pieces < 1:
        raise ValueError(f"pieces must be >= 1, got {pieces}")
    return 1 / (6 * pieces), 4 / (6 * pieces), 2 / (6 * pieces)


def refinement_points(pieces: int) -> np.ndarray:
    """The points composite Simpson with ``2 * pieces`` pieces adds to the one with ``pieces``:
    the new midpoints ``(2k + 1) / (4 * pieces)``. Every other point is reused."""
    return (2 * np.arange(2 * pieces) + 1) / (4 * pieces)


def rule(method: str) -> tuple[np.ndarray, np.ndarray]:
    """Points and weights of a fixed rule (``adaptive`` starts from ``simpson``)."""
    method = check_method(method)
    if method == "first_order":
        return np.array([0.0]), np.array([1.0])
    if method == "trapezoid":
        return np.array([0.0, 1.0]), np.array([0.5, 0.5])
    return composite_simpson(1)
