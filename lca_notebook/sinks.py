"""Where the engine's rows go: the sink protocol, the in-memory sink, and the pieces every sink shares.

- :class:`Rows`: a block of consecutive iterations' rows as numpy arrays (``lca`` and the per-iteration
  variables), filled from the engine's :class:`~lca_notebook.engine.IterationResult`.
- :class:`PrefixBlock`: prefix sums over iterations at every granularity, advanced one iteration at a
  time by THE prefix step (:meth:`PrefixBlock.advance`). The result store and the Dask shards both call
  it, so their float64 additions happen in the same order and give the same bits.
- :class:`MemorySink`: collects a whole run in memory (``analyze`` without ``store=``).

A sink has ``n_iterations``, ``seconds`` and ``evaluations`` (added to by the engine), ``partial`` (a
result of what was computed when a run stopped early, or None) and the methods of :class:`Sink`.

>>> import numpy as np
>>> from lca_notebook.layout import Groups
>>> g = Groups({"tensor": np.array(["w", "w"]), "layer": np.array(["a", "a"]), "unit": np.array([0, 1]),
...             "index": np.array([0, 1])})
>>> block = PrefixBlock(g, 2)
>>> block.advance(0, np.array([1.0, 2.0], np.float32)); block.advance(1, np.array([3.0, 4.0], np.float32))
>>> block.rows["parameter"].tolist(), block.rows["total"][:, 0].tolist()
([[0.0, 0.0], [1.0, 2.0], [4.0, 6.0]], [0.0, 3.0, 10.0])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np
import torch

from .engine import IterationResult, Options
from .layout import COARSE, GRANULARITIES, Groups, PathSpec, parameter_coords
from .result import LCAResult, from_arrays

#: Per-iteration variables of a result, in the order they are stored.
ITERATION_VARS = ("lca", "residual", "lca_rest", "splits", "evaluations", "error")


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
    """``n`` consecutive iterations' rows: ``lca`` ``(n, P)`` and the per-iteration scalars."""

    def __init__(self, n: int, n_parameters: int, lca_dtype=np.float32):
        self.arrays = {
            "lca": np.zeros((n, n_parameters), lca_dtype),
            "residual": np.zeros(n),
            "lca_rest": np.zeros(n),
            "splits": np.zeros(n, np.int32),
            "evaluations": np.zeros(n, np.int32),
            "error": np.full(n, np.nan),
        }
        self._torch_dtype = torch.float64 if lca_dtype == np.float64 else torch.float32

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def put(self, i: int, row: IterationResult):
        self.arrays["lca"][i] = row.lca.detach().to("cpu", self._torch_dtype).numpy()
        self.arrays["residual"][i], self.arrays["lca_rest"][i] = row.residual, row.rest
        self.arrays["splits"][i], self.arrays["evaluations"][i] = row.splits, row.evaluations
        self.arrays["error"][i] = row.error

    def head(self, n: int) -> dict[str, np.ndarray]:
        """The first ``n`` rows of every variable."""
        return {name: a[:n] for name, a in self.arrays.items()}


class PrefixBlock:
    """Prefix sums over ``n`` consecutive iterations at every granularity: ``rows[by]`` is ``(n + 1, groups)``
    float64, row ``i + 1`` = row ``i`` + iteration ``i``'s LCA summed at ``by``. Row 0 is where the block
    starts (zeros at iteration 0, else the row a block before ended on)."""

    def __init__(self, groups: Groups, n: int):
        self.groups = groups
        self.rows = {by: np.zeros((n + 1, len(groups.labels(by)))) for by in GRANULARITIES}

    def seed(self, start: Mapping[str, np.ndarray]):
        """Row 0: the prefix at the block's first iteration."""
        for by, row in self.rows.items():
            row[0] = start[by]

    def last(self, i: int) -> dict[str, np.ndarray]:
        return {by: row[i] for by, row in self.rows.items()}

    def advance(self, i: int, lca_row: np.ndarray):
        """Row ``i + 1`` from row ``i`` and iteration ``i``'s LCA: the one prefix step of every path
        (the float32 row added in float64, every granularity from the same pass over it)."""
        np.add(self.rows["parameter"][i], lca_row, out=self.rows["parameter"][i + 1], dtype=np.float64)
        sums = self.groups.sums(lca_row[None], COARSE)
        for by in COARSE:
            np.add(self.rows[by][i], sums[by][0], out=self.rows[by][i + 1])


class MemorySink:
    """Collects iterations in memory for ``analyze`` without ``store=``."""

    def __init__(self, spec: PathSpec, n_snapshots: int, options: Options, steps=None):
        self.n_iterations = t = n_snapshots - 1
        self.coords = parameter_coords(spec)
        self.rows = Rows(t, spec.n_selected, np.float64 if spec.dtype == torch.float64 else np.float32)
        self.loss = np.full(t + 1, np.nan)
        self.options, self.steps = options, steps
        self.seconds, self.evaluations = 0.0, 0
        self.partial: LCAResult | None = None

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
        r = self.rows.head(t)
        return from_arrays(
            r["lca"], self.loss[: t + 1], self.coords, residual=r["residual"], lca_rest=r["lca_rest"],
            splits=r["splits"], evaluations=r["evaluations"], error=r["error"], steps=steps, attrs=attrs,
        )  # fmt: skip

    def finish(self) -> LCAResult:
        return self._result(self.n_iterations)
