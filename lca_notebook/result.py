"""``LCAResult``: the xarray object ``analyze`` returns, and every sum the mission names.

The dataset (see the README's "result contract"):

- ``lca`` (iteration, parameter): LCA of each scalar parameter at each iteration
- ``loss`` (checkpoint): full-data loss at each of the T+1 snapshots
- ``residual`` (iteration): sum of all LCA at the iteration minus the actual loss change
- ``lca_rest`` (iteration): LCA of path tensors outside ``lca`` (parameters left out with
  ``parameters=``, BatchNorm running statistics), so ``lca.sum("parameter") + lca_rest - residual``
  is exactly the loss change
- ``splits`` (iteration): quadrature pieces used; ``evaluations`` (iteration): gradient evaluations
- ``error`` (iteration): the largest estimated quadrature error of one parameter's LCA at the iteration, from
  the changes ``max_i |S_2n[i] - S_n[i]|`` between successive composite Simpson levels (Richardson's ``/ 15``
  where they show Simpson's order, the change itself otherwise: no extra evaluations; see
  ``quadrature.simpson_error``). NaN where the rule computed only one level: ``first_order``, ``trapezoid``,
  ``simpson``, and ``adaptive`` iterations that met ``tol`` with one piece (``param_tol`` always gives one)

Coordinates on ``parameter``: ``tensor``, ``layer``, ``unit`` (index along dim 0 of the tensor: the
output neuron or channel) and ``index`` (position in ``tensor.flatten()``).

Sums over iteration ranges use prefix sums (``(T+1, groups)`` cumulative arrays, float64), so any
range costs one subtraction. A stored result keeps them on disk; an in-memory one builds them on
first use. At parameter granularity they are compact (:class:`CompactPrefix`): float64 rows only every
``stride`` iterations (the store's chunk of iterations), the rows between added from ``lca`` itself.

A reduced result (``analyze(keep="unit" | "tensor" | "layer")``) has no ``lca``. It holds, exactly:

- ``lca_<by>`` (iteration, units / tensors / layers / total): LCA summed per iteration at the kept
  granularity and every coarser one (float64);
- ``helped_<by>``, ``hurt_<by>`` (iteration, groups) at the same granularities: how many parameters of
  each group had LCA < 0 and > 0 at each iteration (int32; the rest did not move), so
  :meth:`LCAResult.fractions` there equals a ``keep="parameter"`` run's exactly (a unit spans a layer's
  tensors, so tensor counts are not sums of unit counts: each granularity keeps its own);
- ``parameter_total`` (parameter,): each parameter's LCA summed over the whole run (float64), and
  ``parameter_helped`` (parameter,): at how many iterations it helped (int32).

What needs each parameter at each iteration (``lca``, ``sel``, ``total(by="parameter")`` over part of the
run, ``fractions(uncertain=True)``, sums finer than kept) raises a :class:`ReducedResultError` naming ``keep=``.
"""

from __future__ import annotations

import numbers
import os
from functools import cached_property

import numpy as np
import pandas as pd
import xarray as xr

from .errors import ReducedResultError
from .layout import GRANULARITIES, GROUP_DIMS, NAMED, PER_PARAMETER, Groups, check_granularity, fixed_width, kept, names

__all__ = ["GRANULARITIES", "CompactPrefix", "LCAResult", "ReducedResultError", "from_arrays", "reduced_from_arrays"]

#: Iterations between the float64 parameter prefix rows of a result built in memory.
PREFIX_STRIDE = 64


class CompactPrefix:
    """Prefix sums over iterations at parameter granularity without a float64 copy of every row.

    ``boundaries[j]`` is the sum of iterations ``[0, j * stride)`` (float64); row ``k`` is
    ``boundaries[k // stride]`` plus the ``lca`` rows from there to ``k`` (float32, added in float64 one
    row at a time, as the store's writer adds them). Indexed like the ``(T+1, P)`` array it stands for:
    ``p[k]`` (a row) or ``p[a:b]`` (rows a..b-1); ``n_iterations`` (T) when ``lca`` has more rows than were
    written (a store whose run stopped early).

    >>> import numpy as np
    >>> lca = np.arange(12, dtype=np.float32).reshape(6, 2)
    >>> p = CompactPrefix(lca, np.array([[0.0, 0.0], [6.0, 9.0], [30.0, 33.0]]), 3)
    >>> p[4].tolist(), p.shape
    ([12.0, 16.0], (7, 2))
    """

    def __init__(self, lca, boundaries, stride: int, n_iterations: int | None = None):
        self.lca, self.boundaries, self.stride = lca, boundaries, int(stride)
        # a store's lca has a row for every iteration of the run; one stopped early has fewer of them written
        t = lca.shape[0] if n_iterations is None else int(n_iterations)
        self.shape = (t + 1, lca.shape[1])

    @staticmethod
    def build(lca, stride: int = PREFIX_STRIDE) -> np.ndarray:
        """The boundary rows of ``lca`` (``(T, P)``, anything whose row slices numpy reads)."""
        t, p = lca.shape
        out = np.zeros((t // stride + 1, p))
        acc = np.zeros(p)
        for j in range(1, len(out)):
            for row in np.asarray(lca[(j - 1) * stride : j * stride]):
                np.add(acc, row, out=acc)
            out[j] = acc
        return out

    def _row(self, k: int) -> np.ndarray:
        j, t = k // self.stride, self.shape[0] - 1
        if k > j * self.stride + self.stride // 2 and (j + 1) * self.stride <= t:  # nearer the next boundary
            acc = np.array(self.boundaries[j + 1], dtype=np.float64)
            for row in np.asarray(self.lca[k : (j + 1) * self.stride]):
                np.subtract(acc, row, out=acc)
            return acc
        acc = np.array(self.boundaries[j], dtype=np.float64)
        if k > j * self.stride:
            for row in np.asarray(self.lca[j * self.stride : k]):
                np.add(acc, row, out=acc)
        return acc

    def range_sum(self, a: int, b: int) -> np.ndarray:
        """The sum of iterations ``[a, b)`` (float64): the ``lca`` rows themselves when the range is within one
        stride (one read), else two rows of the prefix (two boundary rows and at most two strides of ``lca``)."""
        if b - a <= self.stride:
            acc = np.zeros(self.shape[1])
            for row in np.asarray(self.lca[a:b]):
                np.add(acc, row, out=acc)
            return acc
        return self._row(b) - self._row(a)

    def __getitem__(self, key):
        n = self.shape[0]
        if isinstance(key, slice):
            a, b, step = key.indices(n)
            if step != 1:
                raise IndexError("a compact prefix takes plain slices (no step)")
            if b <= a:
                return np.zeros((0, self.shape[1]))
            out = np.empty((b - a, self.shape[1]))
            out[0] = self._row(a)
            for i, row in enumerate(np.asarray(self.lca[a : b - 1]), start=1):
                np.add(out[i - 1], row, out=out[i])
            return out
        k = int(key)
        if k < 0:
            k += n
        if not 0 <= k < n:
            raise IndexError(f"prefix row {key} is outside [0, {n - 1}]")
        return self._row(k)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[:], dtype=dtype)


_ROWS = 256  # iterations per block when streaming over (iteration, parameter)


class LCAResult:
    """Loss Change Allocation of a training run, over an ``xarray.Dataset``.

    >>> import lca_notebook as lca, numpy as np
    >>> r = lca.LCAResult.example()  # a small hand-made result
    >>> r.total(by="layer").values.round(3).tolist()
    [-0.45, 0.05]
    >>> r.sel(layer="fc2").shape
    (3, 2)
    """

    #: Kept while a result reads a store lazily (storage.files.reading): that store is not replaced under it.
    _reader: object | None = None

    def __init__(self, dataset: xr.Dataset):
        need = {"loss", "residual"} | ({"lca_total"} if "lca" not in dataset.data_vars else {"lca"})
        missing = need - set(dataset.data_vars)
        if missing:
            raise ValueError(f"not an LCA result: the dataset has no {', '.join(sorted(missing))}")
        self.dataset = dataset
        self._prefix_cache: dict[str, np.ndarray] = {}

    # -- plain access ---------------------------------------------------------------------------
    @property
    def keep(self) -> str:
        """What the result keeps: ``"parameter"`` (every parameter at every iteration) or the granularity of a
        reduced result (``"unit"``, ``"tensor"``, ``"layer"``): see ``analyze(keep=...)``."""
        if "lca" in self.dataset.data_vars:
            return "parameter"
        return next(by for by in GRANULARITIES[1:] if f"lca_{by}" in self.dataset.data_vars)

    def _needs(self, what: str, by: str = "parameter"):
        """Raise unless the result has per-iteration data at ``by``."""
        keep = self.keep
        if GRANULARITIES.index(by) < GRANULARITIES.index(keep):
            finer = "each parameter" if by == "parameter" else f"each {by}"
            raise ReducedResultError(
                f"{what} needs {finer}'s LCA at each iteration, but this result was computed with keep={keep!r}: it "
                f"has per-iteration sums by {', '.join(kept(keep))}, helped/hurt counts per {keep} and per-parameter "
                f"totals over the whole run. Use by={keep!r} or coarser, or compute it again with "
                f"analyze(..., keep={'parameter' if by == 'parameter' else by!r})"
                + (" (T x P float32: mind the size)" if by == "parameter" else "")
            )

    @property
    def lca(self) -> xr.DataArray:
        self._needs("result.lca")
        return self.dataset["lca"]

    @property
    def loss(self) -> xr.DataArray:
        return self.dataset["loss"]

    @property
    def residual(self) -> xr.DataArray:
        return self.dataset["residual"]

    @property
    def splits(self) -> xr.DataArray:
        return self.dataset["splits"]

    @property
    def error(self) -> xr.DataArray:
        """Largest estimated per-parameter quadrature error at each iteration (NaN: no estimate; a result
        saved before this variable existed reads as all NaN)."""
        if "error" in self.dataset:
            return self.dataset["error"]
        return xr.full_like(self.residual, np.nan)

    @property
    def lca_rest(self) -> xr.DataArray:
        if "lca_rest" in self.dataset:
            return self.dataset["lca_rest"]
        return xr.zeros_like(self.residual)

    @property
    def n_iterations(self) -> int:
        return self.dataset.sizes["iteration"]

    @property
    def n_parameters(self) -> int:
        return self.dataset.sizes["parameter"]

    def parameter_total(self) -> xr.DataArray:
        """Each parameter's LCA summed over the whole run (any result; a reduced one keeps it exactly)."""
        if "parameter_total" in self.dataset:
            return self._wrap(np.asarray(self.dataset["parameter_total"].values, dtype=np.float64), "parameter")
        return self.total("parameter")

    def iterations_helped(self) -> xr.DataArray:
        """At how many iterations each parameter helped (LCA < 0): ``(parameter,)``."""
        if "parameter_helped" in self.dataset:
            values = np.asarray(self.dataset["parameter_helped"].values, dtype=np.int64)
        else:
            values = np.zeros(self.n_parameters, np.int64)
            for _, block in self._blocks():
                values += np.count_nonzero(block < 0, axis=0)
        return self._wrap(values, "parameter").rename("iterations_helped")

    @property
    def attrs(self) -> dict:
        return self.dataset.attrs

    @cached_property
    def groups(self) -> Groups:
        """The parameters' groups at every granularity (ids, labels in model order, sizes, sums)."""
        return Groups({k: self.dataset[k] if k in NAMED else self.dataset[k].values for k in PER_PARAMETER})

    @property
    def layers(self) -> list[str]:
        return [str(x) for x in self.groups.labels("layer")]

    @property
    def tensors(self) -> list[str]:
        return [str(x) for x in self.groups.labels("tensor")]

    def __repr__(self) -> str:
        a = self.attrs
        res = np.abs(np.asarray(self.residual.values)) if self.n_iterations else np.zeros(1)
        return (
            f"<LCAResult: {self.n_iterations} iterations x {self.n_parameters} parameters in {len(self.layers)} "
            "layers, "
            f"method={a.get('method')}, loss {float(self.loss[0]):.4g} -> {float(self.loss[-1]):.4g}, "
            f"max |residual| {res.max():.2e}>"
        )

    def sel(self, **indexers) -> xr.DataArray:
        """``lca`` restricted by coordinate: ``layer=``, ``tensor=``, ``unit=`` (on parameters, a value or
        a list) and ``iteration=`` (a value, list or slice, by label).

        >>> import lca_notebook as lca
        >>> lca.LCAResult.example().sel(layer="fc1", unit=0).dims
        ('iteration', 'parameter')
        """
        self._needs("result.sel(...)")
        da = self.lca
        mask = np.ones(self.n_parameters, dtype=bool)
        for key in ("layer", "tensor", "unit", "index"):
            if key in indexers:
                value = indexers.pop(key)
                values = value if isinstance(value, (list, tuple, np.ndarray)) else [value]
                coord = self.groups.coords[key]
                known = (self.groups.labels(key) if key in NAMED else pd.unique(coord)).tolist()
                unknown = [v for v in values if v not in set(known)]
                if unknown:
                    shown = ", ".join(map(str, known[:20]))
                    raise KeyError(f"no {key} {unknown[0]!r} in this result; it has: {shown}")
                mask &= coord.isin(values) if isinstance(coord, pd.Categorical) else np.isin(coord, values)
        if not mask.all():
            da = da.isel(parameter=np.flatnonzero(mask))
        if indexers:
            da = da.sel(**indexers)
        return da

    # -- sums ---------------------------------------------------------------------------------
    def _wrap(self, values: np.ndarray, by: str, iteration=None) -> xr.DataArray:
        labels = self.groups.labels(by)
        extra = self.groups.unit_coords() if by == "unit" else {}
        dims, coords = [], {}
        if iteration is not None:
            dims.append("iteration")
            coords["iteration"] = iteration
        dims.append(by)
        coords[by] = labels
        for k, v in extra.items():
            coords[k] = (by, v)
        if by == "parameter":
            for k in ("tensor", "layer", "unit", "index"):
                coords[k] = ("parameter", self.groups.coords[k])
        return xr.DataArray(values, dims=dims, coords=coords, name="lca")

    def _blocks(self, start: int = 0, stop: int | None = None):
        """``(t0, block)`` pairs of ``lca`` rows, read ``_ROWS`` iterations at a time."""
        stop = self.n_iterations if stop is None else stop
        for t0 in range(start, stop, _ROWS):
            yield t0, np.asarray(self.lca[t0 : min(t0 + _ROWS, stop)].values)

    # -- prefix sums ----------------------------------------------------------------------------
    def prefix(self, by: str = "parameter") -> np.ndarray:
        """Cumulative LCA ``(T+1, groups)``: row k is the sum over iterations ``[0, k)`` (float64).

        A stored result reads them from disk, lazily. In memory they are built on first use: the
        parameter level alone (``(T+1) x P`` float64), the four coarser levels together in one pass."""
        check_granularity(by)
        self._needs(f"prefix({by!r}) (sums by {by} at each iteration)", by)
        if by not in self._prefix_cache:
            name = f"prefix_{by}"
            if by == "parameter":
                self._prefix_cache[by] = self._parameter_prefix()
            elif name in self.dataset:  # a stored result keeps them (rows are read on demand)
                self._prefix_cache[by] = self.dataset[name].data
            elif f"lca_{by}" in self.dataset:  # a reduced result: per-iteration sums, small
                sums = np.asarray(self.dataset[f"lca_{by}"].values, dtype=np.float64)
                p = np.zeros((sums.shape[0] + 1, sums.shape[1]))
                np.cumsum(sums, axis=0, out=p[1:])
                self._prefix_cache[by] = p
            else:
                bys = tuple(b for b in GRANULARITIES[1:] if f"prefix_{b}" not in self.dataset)
                arrays = {b: np.zeros((self.n_iterations + 1, len(self.groups.labels(b)))) for b in bys}
                for t0, block in self._blocks():
                    for b, sums in self.groups.sums(block, bys).items():
                        rows = arrays[b][t0 + 1 : t0 + 1 + len(sums)]
                        np.cumsum(sums, axis=0, out=rows)
                        rows += arrays[b][t0]
                self._prefix_cache.update(arrays)
        return self._prefix_cache[by]

    def _parameter_prefix(self):
        """The parameter level: a store's compact prefix (or, written before it was compact, every row);
        in memory, compact boundary rows built on first use."""
        stored = self.dataset.get("prefix_parameter")
        lca: object = self.lca.data if isinstance(self.lca.data, np.ndarray) else self.lca
        if stored is not None and stored.dims[0] == "checkpoint":  # format 2 before compact prefix sums
            return stored.data
        if stored is not None:
            boundaries, source = stored.data, self.dataset.encoding.get("source")
            if source is not None and os.path.isdir(os.path.join(source, "prefix_parameter")):
                from .storage.files import CheckedArray  # read straight from the store: no dask graph per read

                lca = CheckedArray(source, "lca", "r", "iteration")
                boundaries = CheckedArray(source, "prefix_parameter", "r", "boundary")
            return CompactPrefix(lca, boundaries, int(self.attrs.get("prefix_stride", 1)), self.n_iterations)
        return CompactPrefix(lca, CompactPrefix.build(lca), PREFIX_STRIDE)

    def _range(self, start, stop) -> tuple[int, int]:
        t = self.n_iterations
        for name, v in (("start", start), ("stop", stop)):
            if v is not None and not isinstance(v, numbers.Integral):  # 2.7 would be cut to 2, silently
                raise TypeError(f"{name} must be an iteration number (an int) or None, got {v!r}")
        start = 0 if start is None else int(start)
        stop = t if stop is None else int(stop)
        if start < 0:
            start += t
        if stop < 0:
            stop += t
        if start > stop and 0 <= stop <= start <= t:
            raise IndexError(f"iteration range [{start}, {stop}) is reversed: start must be <= stop")
        if not 0 <= start <= stop <= t:
            raise IndexError(f"iteration range [{start}, {stop}) is outside [0, {t}]")
        return start, stop

    def total(self, by: str = "parameter", start: int | None = None, stop: int | None = None) -> xr.DataArray:
        """Sum of LCA over iterations ``[start, stop)`` at a granularity: "parameter", "unit" (neuron or
        channel of a layer), "tensor", "layer" or "total". One subtraction of prefix sums."""
        start, stop = self._range(start, stop)
        if by == "parameter" and self.keep != "parameter":
            if (start, stop) == (0, self.n_iterations):
                return self.parameter_total()
            self._needs(f"total(by='parameter') over iterations [{start}, {stop}) (part of the run)")
        self._needs(f"total(by={by!r})", by)
        p = self.prefix(by)
        if isinstance(p, CompactPrefix):
            return self._wrap(p.range_sum(start, stop), by)
        values = np.asarray(p[stop], dtype=np.float64) - np.asarray(p[start], dtype=np.float64)
        return self._wrap(values, by)

    def per_iteration(self, by: str = "layer", start: int | None = None, stop: int | None = None) -> xr.DataArray:
        """LCA summed at a granularity for each iteration: ``(iteration, groups)``."""
        start, stop = self._range(start, stop)
        self._needs(f"per_iteration(by={by!r})", by)
        p = np.asarray(self.prefix(by)[start : stop + 1], dtype=np.float64)
        return self._wrap(np.diff(p, axis=0), by, iteration=np.arange(start, stop))

    def cumulative(self, by: str = "layer") -> xr.DataArray:
        """Cumulative LCA over iterations ``(iteration, groups)``: row t sums iterations ``0..t``."""
        self._needs(f"cumulative(by={by!r})", by)
        p = np.asarray(self.prefix(by)[1:], dtype=np.float64)
        return self._wrap(p, by, iteration=np.arange(self.n_iterations))

    def fractions(
        self, by: str = "total", start: int | None = None, stop: int | None = None, *, uncertain: bool = False
    ) -> xr.Dataset:
        """Fractions of parameters that help (LCA < 0), hurt (> 0) or do not move the loss (== 0) at each
        iteration, over all parameters (``by="total"``) or per layer/tensor/unit: ``(iteration, groups)``.

        ``uncertain=True`` adds a fourth class, ``uncertain``: parameters whose LCA is nonzero but within the
        iteration's ``error`` (``0 < |LCA| <= error[t]``), whose sign the quadrature cannot vouch for; ``helped``
        and ``hurt`` then count only ``LCA < -error[t]`` and ``LCA > error[t]``, and the four add up to 1. The
        true fraction that helped lies between ``helped`` and ``helped + uncertain`` (as far as the estimate
        holds). The band is conservative: ``error`` is the LARGEST parameter's estimate, applied to every
        parameter of the iteration, so its width is what ``param_tol`` asked for. Single parameters' own
        estimates are not kept: on a ReLU network two levels of one parameter can agree by chance while both
        are off (measured: by up to 10,000 times the difference), so only the largest is honest. On iterations
        without an estimate (``error`` NaN) ``uncertain`` is NaN and the other three are the plain sign counts.
        Cost: one more comparison per value read.

        >>> import lca_notebook as lca
        >>> r = lca.LCAResult.example()
        >>> r.dataset["error"][:] = 0.06  # as if every iteration's largest estimated error were 0.06
        >>> f = r.fractions(uncertain=True)
        >>> f.helped.values.round(3).tolist(), f.uncertain.values.round(3).tolist()
        ([0.333, 0.333, 0.167], [0.333, 0.167, 0.167])
        """
        start, stop = self._range(start, stop)
        if self.keep != "parameter":
            return self._reduced_fractions(by, start, stop, uncertain)
        counts = self.groups.sizes(by).astype(np.float64)
        names = ("helped", "hurt", "zero", "uncertain") if uncertain else ("helped", "hurt", "zero")
        out = {k: np.zeros((stop - start, len(counts))) for k in names}
        err = np.asarray(self.error.values[start:stop], dtype=np.float64) if uncertain else np.zeros(stop - start)
        known = np.isfinite(err)
        band = np.where(known, err, 0.0)[:, None]
        for t0, block in self._blocks(start, stop):
            rows = slice(t0 - start, t0 - start + len(block))
            out["helped"][rows] = self.groups.sum(block < -band[rows], by) / counts
            out["hurt"][rows] = self.groups.sum(block > band[rows], by) / counts
            if uncertain:
                out["zero"][rows] = self.groups.sum(block == 0, by) / counts
        if uncertain:
            out["uncertain"] = 1.0 - out["helped"] - out["hurt"] - out["zero"]
            out["uncertain"][~known] = np.nan
        else:
            out["zero"] = 1.0 - out["helped"] - out["hurt"]
        it = np.arange(start, stop)
        ds = xr.Dataset({k: self._wrap(v, by, iteration=it) for k, v in out.items()})
        return ds.squeeze("total", drop=True) if by == "total" else ds

    def _reduced_fractions(self, by: str, start: int, stop: int, uncertain: bool) -> xr.Dataset:
        """fractions() from the kept helped/hurt counts: the same numbers as from every parameter."""
        check_granularity(by)
        if uncertain:
            self._needs("fractions(uncertain=True) (each parameter's LCA against the iteration's error)")
        self._needs(f"fractions(by={by!r})", by)
        counts = self.groups.sizes(by).astype(np.float64)
        out = {}
        for name in ("helped", "hurt"):
            out[name] = np.asarray(self.dataset[f"{name}_{by}"][start:stop].values, dtype=np.float64) / counts
        out["zero"] = 1.0 - out["helped"] - out["hurt"]
        it = np.arange(start, stop)
        ds = xr.Dataset({k: self._wrap(v, by, iteration=it) for k, v in out.items()})
        return ds.squeeze("total", drop=True) if by == "total" else ds

    def reconstructed_loss(self) -> xr.DataArray:
        """The loss curve rebuilt from the first loss plus cumulative LCA (parameters and ``lca_rest``).
        It differs from ``loss`` by the cumulative residual."""
        per_it = np.diff(np.asarray(self.prefix("total"))[:, 0]) + np.asarray(self.lca_rest.values, dtype=np.float64)
        values = float(self.loss[0]) + np.concatenate([[0.0], np.cumsum(per_it)])
        return xr.DataArray(
            values,
            dims=["checkpoint"],
            coords={"checkpoint": self.loss["checkpoint"].values},
            name="reconstructed_loss",
        )

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path, *, overwrite: bool = False) -> str:
        """Write the result to ``path``: netCDF when it ends in ``.nc``, else a zarr store (every chunk with a
        CRC32C checksum). Lossless. Returns the absolute path.

        An existing path is replaced only with ``overwrite=True``, and only when it holds an LCA result
        (never a folder or file of yours, a recorded trajectory, or the store this result is read from).
        The new version is written aside and swapped in: a failure or a kill leaves the old one whole.

        >>> import lca_notebook as lca, tempfile, os
        >>> r = lca.LCAResult.example()
        >>> p = r.save(os.path.join(tempfile.mkdtemp(), "run.nc"))
        >>> lca.open(p).lca.equals(r.lca)
        True
        >>> _ = r.save(p, overwrite=True)  # replacing needs overwrite=True
        """
        from .storage import files

        path = files.local_path(path)
        source = self.dataset.encoding.get("source")
        if source is not None and os.path.abspath(source) == path:
            raise ValueError(
                f"this result is read from {path!r}: saving onto it would delete what it reads (it is saved there "
                "already). Save to another path."
            )
        with files.lock(path, "LCAResult.save"):
            if os.path.lexists(path) and not (os.path.isdir(path) and not os.listdir(path)):
                what = saved_kind(path)
                if what != "result":
                    raise ValueError(
                        f"{path!r} already exists and is {what}; save never replaces that (nothing was written). "
                        "Give another path."
                    )
                if not overwrite:
                    raise ValueError(
                        f"{path!r} already holds an LCA result; pass overwrite=True to replace it, or give another path"
                    )
                if files.in_use(path):
                    raise ValueError(
                        f"{path!r} is open in this process (an LCAResult or an explorer reads it lazily): replaced, it "
                        "would be read as theirs, wrong. Save to another path, or drop them first (del result)."
                    )
            if os.path.isdir(path) and not os.listdir(path):
                os.rmdir(path)
            files.replace_atomically(path, lambda tmp: self._write(tmp, netcdf=path.endswith(".nc")))
        return path

    def _write(self, path: str, *, netcdf: bool):
        from .storage import files
        from .storage.files import KIND, RESULT_FORMAT, checksummed

        ds = self.dataset.drop_vars([v for v in self.dataset.data_vars if str(v).startswith("prefix_")])
        progress = ("completed_iterations", "completed_checkpoints", "complete", "shards")
        ds.attrs = {k: v for k, v in ds.attrs.items() if k not in progress} | {KIND: "result", "format": RESULT_FORMAT}
        ds.attrs["saved"] = 1  # whole, no prefix sums: lca.open reads it as it is; analyze(store=) never continues it
        if netcdf:  # netCDF has no categorical type: names as fixed-width strings, as before codes
            names = {k: ("parameter", fixed_width(self.groups.coords[k])) for k in NAMED}
            ds.assign_coords(names).to_netcdf(path, engine="h5netcdf")
            return
        # Names on `parameter` as int32 codes (files.coded_names); group labels as variable-length strings: zarr v3
        # has a spec for them, not for numpy's fixed-width unicode.
        coded = {k: files.coded_names(self.groups.coords[k]) for k in NAMED}
        strings = {k: ds[k].astype(object) for k in ds.coords if ds[k].dtype.kind == "U" and k not in coded}
        ds = ds.assign_coords(strings | coded)
        encoding = {str(k): {"compressors": checksummed()} for k in [*ds.data_vars, *ds.coords]}
        ds.to_zarr(path, mode="w-", consolidated=False, zarr_format=3, encoding=encoding, write_empty_chunks=True)

    @staticmethod
    def example() -> LCAResult:
        """A tiny hand-made result (3 iterations, 2 layers) for docs and experiments."""
        lca = np.array(
            [[-0.2, -0.1, 0.0, 0.1, -0.05, 0.05], [-0.1, -0.1, 0.0, 0.05, 0.0, 0.0], [0.0, -0.1, 0.0, 0.0, 0.0, 0.05]],
            dtype=np.float32,
        )
        loss = np.array([2.0, 1.8, 1.65, 1.6])
        coords = {
            "tensor": ["fc1.weight"] * 2 + ["fc1.bias"] * 2 + ["fc2.weight"] * 2,
            "layer": ["fc1"] * 4 + ["fc2"] * 2,
            "unit": [0, 1, 0, 1, 0, 0],
            "index": [0, 1, 0, 1, 0, 1],
        }
        return from_arrays(lca, loss, coords, attrs={"method": "example"})


def saved_kind(path: str) -> str:
    """``"result"`` when ``path`` holds an LCA result (a store or a netCDF file), else what it is, in words."""
    from .storage import files

    if os.path.isdir(path):
        try:
            attrs = files.read_attrs(path)
        except (OSError, ValueError):
            attrs = {}
        if attrs.get(files.KIND) == "result":
            return "result"
        if attrs.get(files.KIND) == "trajectory":
            return "a recorded trajectory (lca.record)"
        return files.describe(path, attrs)
    try:  # a netCDF file: ours if it holds a result's variables
        with xr.open_dataset(path, engine="h5netcdf") as ds:
            names = {str(n) for n in ds.data_vars}  # lca, or a reduced result's lca_<by>
            if {"loss", "residual"} <= names and any(n == "lca" or n.startswith("lca_") for n in names):
                return "result"
    except Exception:
        pass
    return "a file that is not an LCA result"


def from_arrays(
    lca, loss, coords, *, residual=None, lca_rest=None, splits=None, evaluations=None, error=None, steps=None,
    attrs=None,
) -> LCAResult:  # fmt: skip
    """Build an :class:`LCAResult` from plain arrays (``coords``: tensor, layer, unit, index per parameter)."""
    lca = np.asarray(lca)
    loss = np.asarray(loss, dtype=np.float64)
    t, p = lca.shape
    if loss.shape != (t + 1,):
        raise ValueError(f"loss must have T+1 = {t + 1} values, got {loss.shape}")
    variables = _run_vars(
        loss, lca.sum(axis=1, dtype=np.float64), residual, lca_rest, splits, evaluations, error
    )  # fmt: skip
    ds = xr.Dataset(
        {"lca": (("iteration", "parameter"), lca), **variables},
        coords={
            "iteration": np.arange(t),
            "checkpoint": np.arange(t + 1),
            "parameter": pd.RangeIndex(p),  # lazy: 10M parameters, no 80 MB array and copy
            **_on_parameter(coords),
        },
        attrs=dict(attrs or {}),
    )
    if steps is not None:
        ds = ds.assign_coords(step=("checkpoint", np.asarray(steps, dtype=np.int64)))
    return LCAResult(ds)


def _on_parameter(coords) -> dict:
    """The coordinates on ``parameter`` as a result holds them: names as codes (:func:`~.layout.names`), int64."""
    return {
        k: ("parameter", names(coords[k]) if k in NAMED else np.asarray(coords[k], np.int64)) for k in PER_PARAMETER
    }


def _run_vars(loss, lca_sum, residual, lca_rest, splits, evaluations, error) -> dict:
    """The per-checkpoint and per-iteration variables every result has, defaults filled in (the residual from the
    LCA summed per iteration, ``lca_sum``), shared by full and reduced results."""
    t = len(loss) - 1
    rest = np.zeros(t) if lca_rest is None else np.asarray(lca_rest, dtype=np.float64)
    if residual is None:
        residual = lca_sum + rest - np.diff(loss)
    return {
        "loss": (("checkpoint",), loss),
        "residual": (("iteration",), np.asarray(residual, dtype=np.float64)),
        "lca_rest": (("iteration",), rest),
        "splits": (("iteration",), np.ones(t, np.int32) if splits is None else np.asarray(splits, np.int32)),
        "evaluations": (
            ("iteration",),
            np.zeros(t, np.int32) if evaluations is None else np.asarray(evaluations, np.int32),
        ),
        "error": (("iteration",), np.full(t, np.nan) if error is None else np.asarray(error, np.float64)),
    }


def reduced_from_arrays(
    keep: str, sums, helped, hurt, parameter_total, parameter_helped, loss, coords, *, residual=None, lca_rest=None,
    splits=None, evaluations=None, error=None, steps=None, attrs=None, groups: Groups | None = None,
) -> LCAResult:  # fmt: skip
    """Build a reduced :class:`LCAResult` (``keep`` coarser than parameter) from plain arrays: ``sums[by]``,
    ``helped[by]``, ``hurt[by]`` ``(T, groups)`` for ``by`` in ``keep`` and coarser (the counts: parameters with
    LCA < 0, > 0), ``parameter_total`` / ``parameter_helped`` ``(P,)`` (``groups``: the coordinates' groups, when
    the caller has them: for 10M parameters, a tenth of a second not spent again)."""
    loss = np.asarray(loss, dtype=np.float64)
    t = len(loss) - 1
    if groups is None:
        groups = Groups(coords)
    total = np.asarray(sums["total"], dtype=np.float64).reshape(t, 1)
    data: dict[str, tuple[tuple[str, ...], np.ndarray]] = {
        **_run_vars(loss, total[:, 0], residual, lca_rest, splits, evaluations, error),
        "parameter_total": (("parameter",), np.asarray(parameter_total, np.float64)),
        "parameter_helped": (("parameter",), np.asarray(parameter_helped, np.int32)),
    }
    extra = {}
    for by in kept(keep):
        data[f"lca_{by}"] = (("iteration", GROUP_DIMS[by]), np.asarray(sums[by], np.float64).reshape(t, -1))
        data[f"helped_{by}"] = (("iteration", GROUP_DIMS[by]), np.asarray(helped[by], np.int32).reshape(t, -1))
        data[f"hurt_{by}"] = (("iteration", GROUP_DIMS[by]), np.asarray(hurt[by], np.int32).reshape(t, -1))
        extra[GROUP_DIMS[by]] = np.asarray(groups.labels(by)).astype(str)
    ds = xr.Dataset(
        data,
        coords={
            "iteration": np.arange(t),
            "checkpoint": np.arange(t + 1),
            "parameter": pd.RangeIndex(groups.n_parameters),
            **_on_parameter(groups.coords),
            **extra,
        },
        attrs=dict(attrs or {}, keep=keep),
    )
    if steps is not None:
        ds = ds.assign_coords(step=("checkpoint", np.asarray(steps, dtype=np.int64)))
    result = LCAResult(ds)
    result.__dict__["groups"] = groups  # the cached property, already worked out
    return result
