"""Reductions that turn an ``LCAResult`` into what a figure can show: about its pixel width of points.

Everything here is plain numpy over prefix sums (row k = sum over iterations ``[0, k)``), so a
slider move costs a few subtractions, never a pass over (iteration, parameter).

>>> import numpy as np
>>> bin_edges(0, 10, 4).tolist()
[0, 2, 5, 8, 10]
>>> binned_sum(np.arange(11.0)[:, None], np.array([0, 5, 10]))[:, 0].tolist()  # prefix of ones
[5.0, 5.0]
"""

from __future__ import annotations

import numpy as np


def bin_edges(start: int, stop: int, max_bins: int) -> np.ndarray:
    """Integer edges splitting iterations ``[start, stop)`` into at most ``max_bins`` near-equal bins.

    One bin per iteration when the range is short enough; bin ``i`` is ``[edges[i], edges[i+1])``.

    >>> bin_edges(3, 6, 100).tolist()
    [3, 4, 5, 6]
    """
    n = stop - start
    if n <= max_bins:
        return np.arange(start, stop + 1, dtype=np.int64)
    return np.unique(np.round(np.linspace(start, stop, max_bins + 1)).astype(np.int64))


def bin_centres(edges: np.ndarray) -> np.ndarray:
    """Where a bin is drawn: the mean of the iterations it holds (the iteration itself for one).

    >>> bin_centres(np.array([0, 1, 3])).tolist()
    [0.0, 1.5]
    """
    return (edges[:-1] + edges[1:] - 1) / 2.0


def binned_sum(prefix: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Sums over each bin from a prefix array ``(T+1, ...)``: ``prefix[e1] - prefix[e0]``."""
    prefix = np.asarray(prefix)
    return np.asarray(prefix[edges[1:]], dtype=np.float64) - np.asarray(prefix[edges[:-1]], dtype=np.float64)


def binned_mean(prefix: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Means over each bin of a per-iteration series given by its prefix sums."""
    sums = binned_sum(prefix, edges)
    counts = np.diff(edges).astype(np.float64)
    return sums / counts.reshape((-1,) + (1,) * (sums.ndim - 1))


def with_prefix(series: np.ndarray) -> np.ndarray:
    """Prefix sums ``(T+1, ...)`` of a per-iteration series ``(T, ...)``, float64, starting at 0."""
    series = np.asarray(series, dtype=np.float64)
    out = np.zeros((series.shape[0] + 1, *series.shape[1:]))
    np.cumsum(series, axis=0, out=out[1:])
    return out


def trailing_mean(series: np.ndarray, window: int) -> np.ndarray:
    """Moving average of the last ``window`` iterations (fewer at the start of the run).

    >>> trailing_mean(np.array([1.0, 3.0, 5.0, 7.0]), 2).tolist()
    [1.0, 2.0, 4.0, 6.0]
    """
    window = max(1, int(window))
    if window == 1:
        return np.asarray(series, dtype=np.float64)
    c = with_prefix(series)
    t = np.arange(1, len(series) + 1)
    lo = np.maximum(0, t - window)
    return (c[t] - c[lo]) / (t - lo).reshape((-1,) + (1,) * (c.ndim - 1))


def group_rows(n: int, max_rows: int) -> np.ndarray:
    """Edges grouping ``n`` rows (units) into at most ``max_rows`` consecutive groups.

    >>> group_rows(5, 10).tolist(), group_rows(10, 3).tolist()
    ([0, 1, 2, 3, 4, 5], [0, 3, 7, 10])
    """
    if n <= max_rows:
        return np.arange(n + 1, dtype=np.int64)
    return np.unique(np.round(np.linspace(0, n, max_rows + 1)).astype(np.int64))


class ParameterRanges:
    """Per-parameter sums over any iteration range, from prefix sums kept every ``stride`` iterations.

    A full ``(T+1, P)`` float64 prefix costs ``8 (T+1) P`` bytes (1.6 GB for 2,000 x 100k); keeping
    every ``stride``-th row bounds that to ``budget_bytes`` and a range sum reads at most
    ``2 * stride`` rows of ``lca`` besides two prefix rows. ``stride`` is 1 (the exact prefix) when it fits.

    >>> import numpy as np
    >>> lca = np.arange(12, dtype=np.float32).reshape(4, 3)
    >>> r = ParameterRanges(lca, budget_bytes=64)  # forces stride > 1
    >>> r.stride > 1, r.total(1, 3).tolist() == lca[1:3].sum(0).tolist()
    (True, True)
    """

    def __init__(self, lca, budget_bytes: int = 256 << 20, block_rows: int = 256, on_block=None):
        self.lca = lca  # numpy (iteration, parameter) or anything whose row slices numpy can read
        t, p = lca.shape
        self.n_iterations, self.n_parameters = t, p
        self.stride = stride = max(1, int(np.ceil((t + 1) * p * 8 / max(1, budget_bytes))))
        n_marks = t // stride + 1
        self.checkpoints = np.empty((n_marks, p))
        self.checkpoints[0] = 0.0
        running = np.zeros(p)
        # read ``block_rows`` at a time (a lazy store reads whole chunks), work on pieces of about 4 MB that stay
        # in cache while every reduction (the prefix here, the caller's ``on_block``) reads them
        read_rows = max(stride, block_rows // stride * stride)
        piece_rows = max(stride, (4 << 20) // max(1, 4 * p) // stride * stride)
        for r0 in range(0, t, read_rows):
            chunk = np.asarray(lca[r0 : min(t, r0 + read_rows)])
            for c0 in range(0, len(chunk), piece_rows):
                t0 = r0 + c0
                block = chunk[c0 : c0 + piece_rows]
                if on_block is not None:  # callers fold other one-pass reductions into this single read
                    on_block(t0, block)
                n_full = len(block) // stride
                if not n_full:
                    continue
                sums = block[: n_full * stride].reshape(n_full, stride, p).sum(axis=1, dtype=np.float64)
                sums[0] += running
                np.cumsum(sums, axis=0, out=sums)
                first = t0 // stride + 1  # t0 is a multiple of stride: sums[k] is the prefix at (first + k) * stride
                self.checkpoints[first : first + n_full] = sums
                running = sums[-1]

    def _rows(self, a: int, b: int, columns) -> np.ndarray:
        if b <= a:
            return np.zeros(self.n_parameters if columns is None else len(columns))
        block = np.asarray(self.lca[a:b])
        if columns is not None:
            block = block[:, columns]
        return block.sum(axis=0, dtype=np.float64)

    def upto(self, k: int, columns=None) -> np.ndarray:
        """Sum over iterations ``[0, k)`` (optionally of some parameter columns only)."""
        j = k // self.stride
        base = self.checkpoints[j] if columns is None else self.checkpoints[j, columns]
        return base + self._rows(j * self.stride, k, columns)

    def total(self, start: int, stop: int, columns=None) -> np.ndarray:
        """Sum over iterations ``[start, stop)`` of each parameter (or of ``columns``), float64."""
        if self.stride == 1:
            cp = self.checkpoints if columns is None else self.checkpoints[:, columns]
            return cp[stop] - cp[start]
        return self.upto(stop, columns) - self.upto(start, columns)
