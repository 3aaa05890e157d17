"""Where the engine's rows go: the sink protocol, the in-memory sink, and the pieces every sink shares.

- :class:`Rows`: a block of consecutive iterations' rows as numpy arrays (``lca`` and the per-iteration
  variables), filled from the engine's :class:`~lca_notebook.engine.IterationResult`.
- :class:`PrefixBlock`: prefix sums over iterations at the coarse granularities and the running sum at
  parameter granularity, advanced one iteration at a time by THE prefix step (:meth:`PrefixBlock.advance`).
  The result store and the Dask shards both call it, so their float64 additions happen in the same order
  and give the same bits.
- :class:`Totals`: per-parameter totals over the run and counts of iterations helped (a reduced result).
- :class:`MemorySink`: collects a whole run in memory (``analyze`` without ``store=``).
- :func:`resolve_keep`: what ``keep="auto"`` picks (the finest granularity whose store fits :data:`KEEP_BUDGET`).

A sink has ``n_iterations``, ``seconds`` and ``evaluations`` (added to by the engine), ``partial`` (a
result of what was computed when a run stopped early, or None) and the methods of :class:`Sink`.

>>> import numpy as np
>>> from lca_notebook.layout import Groups
>>> g = Groups({"tensor": np.array(["w", "w"]), "layer": np.array(["a", "a"]), "unit": np.array([0, 1]),
...             "index": np.array([0, 1])})
>>> block = PrefixBlock(g, 2)
>>> block.advance(0, np.array([1.0, 2.0], np.float32)); block.advance(1, np.array([3.0, 4.0], np.float32))
>>> block.parameter.tolist(), block.rows["total"][:, 0].tolist()
([4.0, 6.0], [0.0, 3.0, 10.0])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np
import torch

from .engine import IterationResult, Options
from .layout import BLOCK, COARSE, Groups, PathSpec, check_keep, kept, parameter_coords
from .result import LCAResult, from_arrays, reduced_from_arrays

#: Per-iteration variables of a result, in the order they are stored.
ITERATION_VARS = ("lca", "residual", "lca_rest", "splits", "evaluations", "error")
#: Per-iteration variables of every result (``lca`` or the reduced ones besides).
SCALAR_VARS = ITERATION_VARS[1:]
#: The store size ``keep="auto"`` stays within (bytes; settable: ``lca_notebook.sinks.KEEP_BUDGET = ...``).
KEEP_BUDGET = 4 << 30


def lca_dtype(spec: PathSpec) -> type:
    """The dtype of a path's LCA rows: float64 for a float64 path (its LCA's sum meets the loss change to float64's
    rounding, in memory and in a store alike), else float32."""
    return np.float64 if spec.dtype == torch.float64 else np.float32


def reduced_vars(keep: str) -> tuple[str, ...]:
    """The per-iteration variables of a reduced result besides the scalars: sums at ``keep`` and coarser, counts."""
    return tuple(f"{name}_{by}" for name in ("lca", "helped", "hurt") for by in kept(keep))


def iteration_vars(keep: str) -> tuple[str, ...]:
    """Every per-iteration variable a result with ``keep`` stores."""
    return ITERATION_VARS if keep == "parameter" else (*reduced_vars(keep), *SCALAR_VARS)


def estimated_bytes(keep: str, groups: Groups, n_iterations: int, stride: int = 64) -> int:
    """About what a store with ``keep`` takes (the per-iteration scalars and coordinates left out)."""
    p, t = groups.n_parameters, n_iterations
    if keep == "parameter":
        return t * p * 4 + (t // stride + 1) * p * 8 + t * 8 * sum(len(groups.labels(b)) for b in COARSE)
    return t * 16 * sum(len(groups.labels(b)) for b in kept(keep)) + p * 24


def resolve_keep(keep, groups: Groups, n_iterations: int, budget: int | None = None) -> str:
    """``keep`` checked; ``"auto"``: the finest granularity whose store fits ``budget`` (default
    :data:`KEEP_BUDGET`), else ``"layer"``."""
    if keep != "auto":
        return check_keep(keep)
    budget = KEEP_BUDGET if budget is None else budget
    for candidate in ("parameter", "unit", "tensor"):
        if estimated_bytes(candidate, groups, n_iterations) <= budget:
            return candidate
    return "layer"


class Sink(Protocol):
    n_iterations: int
    seconds: float
    evaluations: int
    partial: LCAResult | None

    def resume_from(self) -> int:
        """The first iteration still to compute."""

    def write_loss(self, k: int, value: float) -> None:
        """The loss at snapshot ``k``, where a run starts."""

    def write(self, row: IterationResult) -> None:
        """One iteration, in order."""

    def interrupted(self, done: int) -> None:
        """The run stopped with iterations ``[.., done)`` computed: keep them."""

    def where_kept(self) -> str:
        """Where the iterations kept by :meth:`interrupted` can be found, for the error's note."""

    def finish(self) -> LCAResult:
        """The complete result."""


class Rows:
    """``n`` consecutive iterations' rows: ``lca`` ``(n, P)`` (with ``keep`` coarser, its sums ``lca_<by>`` and
    counts ``helped_<by>`` / ``hurt_<by>`` at ``keep`` and every coarser granularity instead) and the
    per-iteration scalars."""

    def __init__(self, n: int, n_parameters: int, lca_dtype=np.float32, keep: str = "parameter", groups=None):
        self.keep, self.groups = keep, groups
        if keep == "parameter":
            rows: dict[str, np.ndarray] = {"lca": np.zeros((n, n_parameters), lca_dtype)}
        else:
            rows = {f"lca_{by}": np.zeros((n, len(groups.labels(by)))) for by in kept(keep)}
            for name in ("helped", "hurt"):
                rows |= {f"{name}_{by}": np.zeros((n, len(groups.labels(by))), np.int32) for by in kept(keep)}
        self.arrays = rows | {
            "residual": np.zeros(n),
            "lca_rest": np.zeros(n),
            "splits": np.zeros(n, np.int32),
            "evaluations": np.zeros(n, np.int32),
            "error": np.full(n, np.nan),
        }
        self._torch_dtype = torch.float64 if lca_dtype == np.float64 else torch.float32
        #: With ``keep`` coarser: per-parameter totals over the rows put (not per row).
        self.totals = Totals(n_parameters) if keep != "parameter" else None
        self._buffers: tuple[np.ndarray, ...] | None = None  # reduce()'s, made on first use

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def put(self, i: int, row: IterationResult) -> np.ndarray:
        """Row ``i`` from the engine's; returns the iteration's LCA as numpy ``(P,)`` (with ``keep`` coarser,
        reduced here and not kept)."""
        engine_row = row.lca
        if engine_row.device.type != "cpu" or engine_row.dtype != self._torch_dtype:  # one call fewer a row otherwise
            engine_row = engine_row.to("cpu", self._torch_dtype)
        lca = engine_row.numpy()
        if self.keep == "parameter":
            self.arrays["lca"][i] = lca
            lca = self.arrays["lca"][i]
        else:
            self.reduce(i, engine_row)
        self.arrays["residual"][i], self.arrays["lca_rest"][i] = row.residual, row.rest
        self.arrays["splits"][i], self.arrays["evaluations"][i] = row.splits, row.evaluations
        self.arrays["error"][i] = row.error
        return lca

    def reduce(self, i: int, lca: torch.Tensor):
        """Row ``i`` of the reduced variables from one iteration's LCA ``(P,)`` (on the CPU), and the per-parameter
        totals. One pass over the row in blocks that stay in cache (at 10M parameters, a pass per quantity over
        memory cost twice as much): per block, its float64 copy, the helped/hurt masks, their sums over the block's
        pieces and the totals; then pieces to groups (a few thousand numbers). The float64 copy and the totals
        are torch's (two threads: 10M parameters, 28 ms a row in numpy alone, 16 so)."""
        g, totals = self.groups, self.totals
        assert totals is not None  # keep is coarser than parameter
        if not len(lca):
            return  # no parameter selected: every sum and count stays 0
        if self._buffers is None:
            n, m = min(BLOCK, len(lca)), g.n_pieces
            self._buffers = (np.empty(n), np.empty(n, bool), np.empty(n, bool), np.empty(m), np.empty((2, m), np.int16))
        x64, helped, hurt, sums, counts = self._buffers
        x64_t, row = torch.from_numpy(x64), lca.numpy()
        for at, pieces, starts in g.blocks:
            n = at.stop - at.start
            x, h, u = x64[:n], helped[:n], hurt[:n]
            x64_t[:n].copy_(lca[at])
            np.less(row[at], 0, out=h)
            np.greater(row[at], 0, out=u)
            if len(starts):
                np.add.reduceat(x, starts, out=sums[pieces])
                np.add.reduceat(h.view(np.int8), starts, dtype=np.int16, out=counts[0, pieces])
                np.add.reduceat(u.view(np.int8), starts, dtype=np.int16, out=counts[1, pieces])
            totals.add(at, x64_t[:n], h)
        totals.added_row()
        bys = kept(self.keep)
        for by, values in g.from_pieces(sums, bys).items():
            self.arrays[f"lca_{by}"][i] = values
        for by, values in g.from_pieces(counts, bys).items():
            self.arrays[f"helped_{by}"][i], self.arrays[f"hurt_{by}"][i] = values

    def head(self, n: int) -> dict[str, np.ndarray]:
        """The first ``n`` rows of every variable."""
        return {name: a[:n] for name, a in self.arrays.items()}


class PrefixBlock:
    """Prefix sums over ``n`` consecutive iterations: ``rows[by]`` is ``(n + 1, groups)`` float64 for each
    coarse granularity, row ``i + 1`` = row ``i`` + iteration ``i``'s LCA summed at ``by``; row 0 is where the
    block starts (zeros at iteration 0, else the row a block before ended on). At parameter granularity only
    the running sum is kept (``parameter``, ``(P,)`` float64: the prefix row after the last iteration
    advanced), never a row per iteration."""

    def __init__(self, groups: Groups, n: int, coarse=COARSE):
        self.groups, self.coarse = groups, tuple(coarse)
        self.rows = {by: np.zeros((n + 1, len(groups.labels(by)))) for by in self.coarse}
        self.parameter = np.zeros(groups.n_parameters)

    def seed(self, start: Mapping[str, np.ndarray]):
        """Row 0 (and the running parameter sum): the prefix at the block's first iteration."""
        for by, row in self.rows.items():
            row[0] = start[by]
        self.parameter[:] = start["parameter"]

    def last(self, i: int) -> dict[str, np.ndarray]:
        """Row ``i`` of the coarse prefixes and the running parameter sum (``i``: the last row advanced to)."""
        return {by: row[i] for by, row in self.rows.items()} | {"parameter": self.parameter.copy()}

    def advance(self, i: int, lca_row: np.ndarray):
        """Row ``i + 1`` from row ``i`` and iteration ``i``'s LCA: the one prefix step of every path
        (the float32 row added in float64, every granularity from the same pass over it)."""
        np.add(self.parameter, lca_row, out=self.parameter)
        if self.coarse:
            sums = self.groups.sums(lca_row[None], self.coarse)
            for by in self.coarse:
                np.add(self.rows[by][i], sums[by][0], out=self.rows[by][i + 1])


class Totals:
    """Per-parameter totals over the iterations added (float64) and counts of iterations helped (LCA < 0).

    A row's counts go into uint8 first, flushed into the int32 counts every 255 rows and whenever they are read:
    adding a row to int32 counts moved 80 MB at 10M parameters, to uint8 20 MB."""

    def __init__(self, n_parameters: int):
        self.total = np.zeros(n_parameters)
        self._total = torch.from_numpy(self.total)
        self._helped = np.zeros(n_parameters, np.int32)
        self._recent = np.zeros(n_parameters, np.uint8)  # counts of the rows since the last flush
        self._rows = 0

    @property
    def helped(self) -> np.ndarray:
        """Counts of iterations helped, per parameter (int32)."""
        self._flush()
        return self._helped

    def load(self, total: np.ndarray, helped: np.ndarray):
        """Start from stored totals and counts (a resumed store), in place: ``total`` stays the memory torch adds to."""
        self.total[:] = total
        self._recent[:], self._rows = 0, 0
        self._helped[:] = helped

    def add(self, at: slice, lca: torch.Tensor, helped: np.ndarray):
        """Add one iteration's float64 LCA of the parameters ``at`` (a block of the row) and its ``lca < 0``;
        :meth:`added_row` once the row's blocks are in."""
        self._total[at].add_(lca)
        np.add(self._recent[at], helped.view(np.uint8), out=self._recent[at])

    def added_row(self):
        self._rows += 1
        if self._rows == np.iinfo(np.uint8).max:  # one more could wrap
            self._flush()

    def _flush(self):
        if self._rows:
            np.add(self._helped, self._recent, out=self._helped)
            self._recent[:] = 0
            self._rows = 0


class MemorySink:
    """Collects iterations in memory for ``analyze`` without ``store=``."""

    def __init__(self, spec: PathSpec, n_snapshots: int, options: Options, steps=None, keep: str = "parameter"):
        self.n_iterations = n_snapshots - 1
        self.spec, self.keep = spec, check_keep(keep)
        self._rows: Rows | None = None
        self._coords: dict | None = None
        self.loss = np.full(n_snapshots, np.nan)
        self.options, self.steps = options, steps
        self.seconds, self.evaluations = 0.0, 0
        self.partial: LCAResult | None = None

    @property
    def rows(self) -> Rows:
        """The rows (and per-parameter totals), made at the first row written: inside the engine's loop, where
        the memory its gradients freed is reused. Pages a process has not touched yet cost several microseconds
        each on a VM (10.48M parameters: 136 MB of totals, 0.3 s made before the loop)."""
        if self._rows is None:
            groups = Groups.of(self.spec) if self.keep != "parameter" else None  # no per-parameter arrays
            self._rows = Rows(self.n_iterations, self.spec.n_selected, lca_dtype(self.spec), self.keep, groups)
        return self._rows

    @property
    def coords(self) -> dict:
        """The result's per-parameter coordinates, made when the result is, after the loop (10.48M parameters,
        168 MB: measured 0.6-1 s made before the loop, 0.5-0.6 s after it; the groups never need them whole)."""
        if self._coords is None:
            self._coords = parameter_coords(self.spec)
            if (groups := self.rows.groups) is not None:
                groups.coords = self._coords  # one copy: the groups' own, made now
        return self._coords

    def resume_from(self) -> int:
        return 0

    def write_loss(self, k: int, value: float):
        self.loss[k] = value

    def write(self, row: IterationResult):
        self.rows.put(row.t, row)
        self.loss[row.t + 1] = row.loss_end

    def interrupted(self, done: int):
        if done > 0:
            self.partial = self._result(done)

    def where_kept(self) -> str:
        return "they are kept in this exception's .partial_result (an LCAResult)"

    def _result(self, t: int) -> LCAResult:
        attrs = dict(self.options.attrs(), gradient_evaluations=int(self.evaluations), seconds=float(self.seconds))
        steps = self.steps[: t + 1] if self.steps is not None else None
        rows = self.rows
        r = rows.head(t)
        if (totals := rows.totals) is not None:
            return reduced_from_arrays(
                self.keep, {by: r[f"lca_{by}"] for by in kept(self.keep)},
                {by: r[f"helped_{by}"] for by in kept(self.keep)}, {by: r[f"hurt_{by}"] for by in kept(self.keep)},
                totals.total, totals.helped, self.loss[: t + 1], self.coords, residual=r["residual"],
                lca_rest=r["lca_rest"], splits=r["splits"], evaluations=r["evaluations"], error=r["error"],
                steps=steps, attrs=attrs, groups=self.rows.groups,
            )  # fmt: skip
        return from_arrays(
            r["lca"], self.loss[: t + 1], self.coords, residual=r["residual"], lca_rest=r["lca_rest"],
            splits=r["splits"], evaluations=r["evaluations"], error=r["error"], steps=steps, attrs=attrs,
        )  # fmt: skip

    def finish(self) -> LCAResult:
        return self._result(self.n_iterations)
