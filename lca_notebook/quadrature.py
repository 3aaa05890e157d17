"""Quadrature rules along one straight segment theta(s) = theta_t + s * d, s in [0, 1].

Numbers only, nothing about torch: a rule is a set of points ``s_j`` and weights ``w_j`` with
``integral_0^1 f(s) ds ~= sum_j w_j f(s_j)``. LCA of parameter i over the segment is then
``d_i * sum_j w_j * dL/dtheta_i(theta(s_j))``.

The engine takes every weight from here: :func:`rule` for the fixed rules, :func:`simpson_weights`
and :func:`refinement_points` for composite Simpson as adaptive refines it, and
:func:`level_change` and :func:`simpson_error` for the error estimate of successive composite Simpson levels.

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


def level_change(fine, coarse) -> float:
    """The largest ``|fine - coarse|`` over the entries of two successive composite Simpson levels (numpy
    arrays or torch tensors of the same integrals with ``2n`` and ``n`` pieces); 0.0 for none."""
    return float(abs(fine - coarse).max()) if len(fine) else 0.0


def simpson_error(changes) -> float:
    """Estimated largest error of an entry of the finest composite Simpson level, from the largest change
    between each pair of successive levels so far (``changes[k]``: between ``2**(k+1)`` and ``2**k`` pieces,
    see :func:`level_change`). No evaluation beyond the levels, which adaptive refinement computes anyway.

    On a smooth integrand each level's error is 1/16 of the one before and what the finest level misses is
    ``changes[-1] / 15`` (Richardson). LCA's integrands are often not smooth: a ReLU network's gradient jumps
    where a unit switches on or off along the segment, so Simpson converges only as ``h``, erratically (two
    levels can agree by chance while both are off). Measured against a converged reference on a ReLU
    transformer and a ReLU CNN, ``/ 15`` underestimated the largest error up to 13 times. So ``/ 15`` is used
    only where the last three changes each fell by Simpson's order (8x or more); otherwise the estimate is
    ``max(changes[-1], changes[-2] / 2)``: the change itself, and no less than half the change before it
    (first-order convergence). Conservative by design; within 2x of the error made on those models.

    >>> simpson_error([3e-6]), simpson_error([3e-6, 2e-6]), simpson_error([3e-6, 1e-6])  # first order
    (3e-06, 2e-06, 1.5e-06)
    >>> f"{simpson_error([1.6e-5, 1e-6, 6e-8]):.1e}"  # Simpson's order shown: Richardson's / 15
    '4.0e-09'
    """
    changes = [float(c) for c in changes]
    if not changes:
        raise ValueError("simpson_error needs at least two levels (one change)")
    if len(changes) >= 3 and all(b <= a / 8 for a, b in zip(changes[-3:-1], changes[-2:], strict=True)):
        return changes[-1] / (2**SIMPSON_ORDER - 1)
    return max(changes[-1], changes[-2] / 2) if len(changes) >= 2 else changes[-1]


def rule(method: str) -> tuple[np.ndarray, np.ndarray]:
    """Points and weights of a fixed rule (``adaptive`` starts from ``simpson``)."""
    method = check_method(method)
    if method == "first_order":
        return np.array([0.0]), np.array([1.0])
    if method == "trapezoid":
        return np.array([0.0, 1.0]), np.array([0.5, 0.5])
    return composite_simpson(1)
