"""Quadrature rules along one straight segment theta(s) = theta_t + s * d, s in [0, 1].

Numbers only, nothing about torch: a rule is a set of points ``s_j`` and weights ``w_j`` with
``integral_0^1 f(s) ds ~= sum_j w_j f(s_j)``. LCA of parameter i over the segment is then
``d_i * sum_j w_j * dL/dtheta_i(theta(s_j))``.

The engine takes every weight from here: :func:`rule` for the fixed rules, :func:`simpson_weights`
and :func:`refinement_points` for composite Simpson as adaptive refines it, and
:func:`richardson_error` for the error estimate of two successive composite Simpson levels.

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


#: Composite Simpson's error falls as ``h**4`` on a smooth integrand: halving the pieces divides it by ``2**4``.
SIMPSON_ORDER = 4


def richardson_factor(change: float, previous: float | None = None) -> float:
    """How large the error of composite Simpson with ``2n`` pieces is, as a multiple of ``change``, the
    largest ``|S_2n - S_n|`` between it and the level before; ``previous`` is the largest
    ``|S_n - S_{n/2}|`` one level earlier (None when ``S_n`` is the first level).

    On a smooth integrand each level's error is 1/16 of the one before, and the error left in ``S_2n`` is
    ``change / 15`` (Richardson). A ReLU network's gradient jumps where a unit switches on or off, so along a
    segment it is only piecewise smooth and Simpson converges as ``h``: each level halves the error (with
    wide swings), and what is left is about ``change`` itself. Measured on a small ReLU transformer, ``/ 15``
    underestimated the largest error 5-12 times, an observed ratio ``r / (1 - r)`` up to 4 times; the error
    stayed below ``change`` at every level. So the factor is ``1/15`` only where the last three levels show
    Simpson's order (``change <= previous / 8``), and 1 otherwise, two levels included: conservative by
    design, an estimate to trust rather than a tight one.

    >>> richardson_factor(1e-6), richardson_factor(1e-6, 1.6e-5), richardson_factor(1e-6, 2e-6)
    (1.0, 0.0666..., 1.0)
    """
    if previous is not None and change <= previous / 8:
        return 1 / (2**SIMPSON_ORDER - 1)
    return 1.0


def richardson_error(fine, coarse, previous: float | None = None):
    """Estimated error of each entry of composite Simpson with ``2n`` pieces (``fine``) from the same
    integrals with ``n`` pieces (``coarse``): ``|fine - coarse| * richardson_factor(...)``, elementwise
    (numpy arrays or torch tensors). It needs no evaluation beyond the two levels, which adaptive refinement
    computes anyway; ``previous`` is the largest ``|S_n - S_{n/2}|``, when a third level exists.

    >>> fine, coarse = np.array([0.25, -0.1]), np.array([0.28, -0.1])
    >>> richardson_error(fine, coarse).round(6).tolist(), richardson_error(fine, coarse, 0.48).round(6).tolist()
    ([0.03, 0.0], [0.002, 0.0])
    """
    change = abs(fine - coarse)
    top = float(change.max()) if change.shape[0] else 0.0
    return change * richardson_factor(top, previous)


def rule(method: str) -> tuple[np.ndarray, np.ndarray]:
    """Points and weights of a fixed rule (``adaptive`` starts from ``simpson``)."""
    method = check_method(method)
    if method == "first_order":
        return np.array([0.0]), np.array([1.0])
    if method == "trapezoid":
        return np.array([0.0, 1.0]), np.array([0.5, 0.5])
    return composite_simpson(1)
