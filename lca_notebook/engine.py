"""Full-data gradients along the recorded path, and the loop over iterations that turns them into LCA.

:class:`Evaluator` gives the mean loss over all batches and its gradient with respect to the flat
path vector (see :mod:`lca_notebook.layout`), evaluating the model at any point with
``torch.func.functional_call``: the user's module is never written to. :func:`iterate` walks the
iterations with a quadrature rule from :mod:`lca_notebook.quadrature` and yields one
:class:`IterationResult` per iteration; :func:`run` hands them to a sink (:mod:`lca_notebook.sinks`).
Every path (in memory, a store, a Dask shard) runs this loop.

>>> import torch
>>> from lca_notebook import data, layout
>>> model = torch.nn.Linear(2, 2)
>>> a = {k: v.clone() for k, v in model.state_dict().items()}
>>> b = {k: v + 0.1 for k, v in a.items()}
>>> spec = layout.build_spec(model, a)
>>> batches = data.batches((torch.randn(8, 2), torch.randint(0, 2, (8,))))
>>> evaluate = Evaluator(model, batches, torch.nn.functional.cross_entropy, spec, "cpu")
>>> loss0, rows = iterate(evaluate, SnapshotReader([a, b], spec, "cpu"), 0, 1, Options(method="simpson"))
>>> row = next(rows)
>>> row.t, row.lca.shape, row.evaluations, bool(abs(row.residual) < 1e-6)
(0, torch.Size([6]), 2, True)
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from . import data as data_mod
from . import heap
from .layout import BATCHNORM_MODES, BLOCK, PathSpec, canonical, integer_snapshot_message
from .quadrature import check_method, level_change, refinement_points, rule, simpson_error, simpson_weights

#: Rows of a batch that the check of the loss's reduction (mean, not sum) reads.
_CHECK_ROWS = 64
#: Most points one batched call evaluates (memory grows with it: activations of every point at once).
MAX_POINTS_PER_CALL = 8

#: Most buffers an Evaluator keeps views of, in each of its caches: the points the engine refills, one at a time
#: (start, end, midpoint, spare, a refinement's point) or in chunks (every row of :func:`_chunks`' matrices), and
#: the rows of those matrices that gradients go into.
_BOUND = 2 * 16 + 8

#: A gradient in parts, in the path's order (:class:`~lca_notebook.layout.PathSpec`): a tensor larger than
#: :data:`~lca_notebook.layout.BLOCK` alone, smaller consecutive ones together (sizes: ``Evaluator.sizes``). Each
#: part is flat, in the path's dtype, or None where none of its tensors gets a gradient (they do not move, or
#: the loss does not use them).
Parts = list[torch.Tensor | None]


def segments(numels: Sequence[int], n_selected_tensors: int) -> list[tuple[int, int]]:
    """The tensors of each part of :data:`Parts`, ``(first, stop)``: consecutive tensors while their sizes add up to
    at most ``BLOCK`` (arithmetic on a part is one call, however many small tensors it holds), never across the
    end of the selected tensors.

    >>> segments([10, 3, 1 << 20, 5, 6], 4)
    [(0, 2), (2, 3), (3, 4), (4, 5)]
    """
    out, first, size = [], 0, 0
    for i, n in enumerate(numels):
        if i > first and (size + n > BLOCK or i == n_selected_tensors):
            out.append((first, i))
            first, size = i, 0
        size += n
    return [*out, (first, len(numels))] if len(numels) > first else out


@dataclass(frozen=True)
class Options:
    """How LCA is computed, and the names that identify the computation; checked when made.

    One record for every path: the engine reads the rule, a result keeps :meth:`attrs`, a store
    refuses to resume with other ones, and the Dask tasks get it whole.

    >>> Options(method="rk4").method
    'simpson'
    >>> Options(tol=0)
    Traceback (most recent call last):
    ValueError: tol must be a positive number, got 0
    >>> Options(param_tol=1e-6).attrs()["param_tol"], Options().attrs()["param_tol"]  # 0.0: not set
    (1e-06, 0.0)
    """

    method: str = "adaptive"
    tol: float = 1e-3
    max_splits: int = 32
    #: Adaptive only: also refine until every selected parameter's estimated error is <= this (loss units).
    param_tol: float | None = None
    batchnorm: str = "eval"
    batched_points: bool = False
    loss_fn: str = "cross_entropy"  # names only: what a stored result remembers
    model: str = ""
    n_samples: int = 0

    def __post_init__(self):
        object.__setattr__(self, "method", check_method(self.method))
        if self.batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"batchnorm must be one of {BATCHNORM_MODES}, got {self.batchnorm!r}")
        if isinstance(self.tol, bool) or not (isinstance(self.tol, (int, float)) and self.tol > 0):
            raise ValueError(f"tol must be a positive number, got {self.tol!r}")
        if isinstance(self.max_splits, bool) or not (isinstance(self.max_splits, int) and self.max_splits >= 1):
            raise ValueError(f"max_splits must be a positive int, got {self.max_splits!r}")
        if self.batched_points and self.batchnorm == "batch":
            raise ValueError(
                "batched_points=True cannot be used with batchnorm='batch' (batch statistics update buffers in "
                "place, which vmap forbids)"
            )
        object.__setattr__(self, "tol", float(self.tol))
        if self.param_tol is not None:
            value = self.param_tol
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(
                    f"param_tol must be a positive finite number (the largest estimated error of any parameter's LCA, "
                    f"in loss units) or None, got {value!r}"
                )
            if self.method != "adaptive":
                raise ValueError(
                    f"param_tol refines the quadrature, which only method='adaptive' does; method={self.method!r} "
                    "uses fixed points and has no per-parameter error estimate. Use method='adaptive' with param_tol, "
                    "or leave param_tol=None"
                )
            if self.max_splits < 2:
                raise ValueError(
                    f"param_tol needs max_splits >= 2, got max_splits={self.max_splits}: the error estimate compares "
                    "two Simpson levels, and one piece is the only level max_splits=1 allows"
                )
            object.__setattr__(self, "param_tol", float(value))

    def attrs(self) -> dict:
        """What a result records of its computation (``batched_points`` changes rounding only). ``param_tol``
        is recorded as 0.0 when not set (netCDF attributes cannot hold None)."""
        out = asdict(self)
        del out["batched_points"]
        out["param_tol"] = 0.0 if self.param_tol is None else self.param_tol
        return out


@dataclass
class IterationResult:
    """One iteration's row: what every sink stores."""

    t: int
    #: Selected parameters, flat: a view of a buffer the engine refills for the next row (copy it to keep it).
    lca: torch.Tensor
    rest: float  # LCA of the path tensors outside `lca` (other parameters, running statistics)
    residual: float
    splits: int
    loss_end: float
    evaluations: int
    #: Largest estimated quadrature error of a selected parameter's LCA (from successive composite Simpson
    #: levels, see :func:`~lca_notebook.quadrature.simpson_error`); NaN where only one level was computed.
    error: float = math.nan


class _DifferentiableBatchNorm(TorchFunctionMode):
    """Eval-mode batch norm written out, so running statistics that move along the path get a
    gradient (``native_batch_norm`` refuses one) and their share of the loss change is counted."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            return _batch_norm(*args, **kwargs)
        if func is F.instance_norm:
            return _instance_norm(*args, **kwargs)
        return func(*args, **kwargs)


def _batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    if training or running_mean is None or not (running_mean.requires_grad or running_var.requires_grad):
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    # A scale and a shift per channel that carry the statistics' gradient (PyTorch's own formula), applied by its
    # kernel as weight and bias over statistics 0 and 1 with eps 0: one fused pass over the activations each way
    # (written out as four elementwise passes, a 10M-parameter ResNet's gradient cost 6% more than the floor's)
    scale = 1 / torch.sqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    return F.batch_norm(input, torch.zeros_like(shift), torch.ones_like(scale), scale, shift, False, 0.0, 0.0)


def _instance_norm(
    input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True, momentum=0.1, eps=1e-5
):
    if use_input_stats or running_mean is None or not (running_mean.requires_grad or running_var.requires_grad):
        return F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    return _batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)  # same formula in eval


@contextlib.contextmanager
def fixed_function(model: torch.nn.Module, batchnorm: str):
    """Dropout off, BatchNorm in eval (or, on request, batch-statistics) mode; flags restored after."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        if batchnorm == "batch":
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.train()
        yield
    finally:
        for m, training in flags:
            m.training = training


_NO_MODE = contextlib.nullcontext()  # reusable: it holds no state


def _by_buffer(cache: dict, flat: torch.Tensor, make):
    """``make(flat)``, kept in ``cache`` for the buffer ``flat`` (its address and size; one device and dtype a
    cache), the oldest of :data:`_BOUND` dropped first."""
    key = (flat.data_ptr(), flat.numel())
    hit = cache.get(key)
    if hit is None:
        if len(cache) >= _BOUND:
            del cache[next(iter(cache))]
        cache[key] = hit = make(flat)
    return hit


class Evaluator:
    """Full-data mean loss and its gradient with respect to the flat path vector.

    ``evaluations`` counts full-data gradient evaluations (each is one pass over all batches).
    """

    def __init__(self, model, batches, loss_fn, spec: PathSpec, device, batchnorm="eval"):
        self.model, self.batches, self.loss_fn, self.spec = model, batches, loss_fn, spec
        self.weights = data_mod.batch_weights(batches, loss_fn)
        self.batchnorm = batchnorm
        path = set(spec.names)
        own = dict(model.named_parameters()) | dict(model.named_buffers())
        on_meta = [n for n, t in own.items() if n not in path and t.is_meta]
        if on_meta and torch.device(device).type != "meta":
            raise ValueError(
                f"the model's tensor {on_meta[0]!r}{f' (and {len(on_meta) - 1} more)' if len(on_meta) > 1 else ''} "
                "is on the meta device (it holds no values) and the snapshots do not hold it: load the model's weights "
                "(model.to_empty(device=...) then load_state_dict), or give snapshots that hold every tensor"
            )
        # Tensors not in the snapshots stay at the model's current values (moved to device once).
        self.fixed = {n: t.detach().to(device) for n, t in own.items() if n not in path}
        self.evaluations = 0
        own_params = dict(model.named_parameters())
        # functional_call looks for tensors held under two names at every call (20 us, 4% of a small model's
        # gradient): asked to only where the model has some
        named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        self._tied = len({id(t) for _, t in named}) < len(named)
        self._bn_mode = batchnorm == "eval" and any(n not in own_params for n in spec.names)
        self._checked = False
        self._all_grad = all(spec.with_grad)
        # Per-tensor layout, precomputed: binding runs at every quadrature point.
        self._numels = spec.numels
        self._segments = segments(spec.numels, spec.n_selected_tensors)
        #: Sizes of the parts of a gradient (:data:`Parts`).
        self.sizes = [sum(spec.numels[a:b]) for a, b in self._segments]
        self._buffer_names = [n for n, _ in model.named_buffers()]
        self._layout = [
            (n, s, None if d == spec.dtype else d, g)
            for n, s, d, g in zip(spec.names, spec.shapes, spec.dtypes, spec.with_grad, strict=True)
        ]
        offsets = np.cumsum([0, *spec.numels[:-1]]).tolist()
        # each tensor's place in the flat vector, for as_strided (strides from a meta tensor: no memory)
        self._strided = [
            (tuple(s), torch.empty(tuple(s), device="meta").stride(), o)
            for s, o in zip(spec.shapes, offsets, strict=True)
        ]
        self._bound: dict[tuple, tuple[dict, list, list]] = {}  # _leaves' cache, by buffer
        self._into: dict[tuple, list[torch.Tensor]] = {}  # _targets' cache, by buffer

    def bind(self, flat: torch.Tensor, extras: dict) -> dict:
        """The model's tensors at the point ``flat``: views into it, cast to each tensor's dtype, for ``torch.func``
        transforms that differentiate ``flat`` (:meth:`many`)."""
        tensors = dict(self.fixed)
        tensors.update(extras)
        for (name, shape, dtype, grad), piece in zip(self._layout, torch.split(flat, self._numels), strict=True):
            t = piece.view(shape)
            if not grad:
                t = t.detach()
            tensors[name] = t if dtype is None else t.to(dtype)
        return self._batch_copies(tensors)

    def _leaves(self, theta: torch.Tensor) -> tuple[dict, list, list]:
        """Each tensor at ``theta`` as a view of it, detached (autograd is slower on views of one vector), those
        that get a gradient made leaves: ``(views by name, names cast to their own dtype, leaves)``. Made once per
        buffer: the engine refills the same few vectors, and a view shows what its buffer holds now. The views
        keep the buffer's memory alive, so no other vector can have its address while it is cached."""
        return _by_buffer(self._bound, theta, self._make_leaves)

    def _make_leaves(self, theta: torch.Tensor) -> tuple[dict, list, list]:
        views, cast, leaves = {}, [], []
        offset = theta.storage_offset()
        for (name, _, dtype, grad), (shape, stride, o) in zip(self._layout, self._strided, strict=True):
            t = theta.as_strided(shape, stride, offset + o).detach()
            if grad:
                leaves.append(t.requires_grad_(True))
            views[name] = t
            if dtype is not None:
                cast.append((name, dtype))
        return views, cast, leaves

    def _targets(self, into: torch.Tensor) -> list[torch.Tensor]:
        """Views of the flat vector ``into`` where the leaves' gradients go (:meth:`_gradients`), made once per
        buffer as :meth:`_leaves` makes its views."""

        def make(flat):
            offset = flat.storage_offset()
            return [
                flat.as_strided(shape, stride, offset + o)
                for (*_, grad), (shape, stride, o) in zip(self._layout, self._strided, strict=True)
                if grad
            ]

        return _by_buffer(self._into, into, make)

    def _batch_copies(self, tensors: dict) -> dict:
        """``tensors`` with copies of the buffers that batch statistics update in place (batchnorm="batch")."""
        if self.batchnorm == "batch":  # batch statistics update running buffers in place: never the user's
            for name in self._buffer_names:
                if name in tensors:
                    tensors[name] = tensors[name].detach().clone()
        return tensors

    def _forward(self, tensors: dict, args, kwargs):
        """The model's output at ``tensors`` (by name)."""
        return functional_call(self.model, tensors, args, kwargs, tie_weights=self._tied)

    def _loss_mode(self):
        return _DifferentiableBatchNorm() if self._bn_mode else _NO_MODE

    def __call__(
        self, theta: torch.Tensor, extras: dict, where: str, out: torch.Tensor | None = None
    ) -> tuple[float, torch.Tensor]:
        """Loss and flat gradient at ``theta`` (the gradient written into ``out`` when given)."""
        value, grads = self._gradients(theta, extras, where)
        assert grads is not None  # asked for without `into`
        return value, flat(_flat_each(grads), self._numels, theta, out)

    def gradient(self, theta: torch.Tensor, extras: dict, where: str) -> tuple[float, Parts]:
        """Loss and gradient at ``theta`` in :data:`Parts`: a large tensor's gradient as autograd made it (at 10M
        parameters, copying it into one vector costs more than the arithmetic that reads it), small ones joined."""
        value, grads = self._gradients(theta, extras, where)
        assert grads is not None  # asked for without `into`
        per_tensor = _flat_each(grads)
        parts: Parts = []
        for a, b in self._segments:
            alone = b - a == 1 or all(g is None for g in per_tensor[a:b])
            parts.append(per_tensor[a] if alone else flat(per_tensor[a:b], self._numels[a:b], theta))
        return value, parts

    def _gradients(
        self, theta: torch.Tensor, extras: dict, where: str, into: torch.Tensor | None = None
    ) -> tuple[float, list[torch.Tensor | None] | None]:
        """Loss and gradient at ``theta``: one a path tensor, in its shape and theta's dtype (None where it gets
        none). With ``into`` (a flat vector like ``theta``), autograd adds the gradient into it instead (zeros
        where a tensor gets none) and none is returned: a chunk of a small model's gradients, held and then
        copied into its matrix, made each gradient 7% dearer than the floor's (17k parameters)."""
        views, cast, leaves = self._leaves(theta)
        tensors = views  # functional_call only reads it; a merged copy only when there is more to bind
        if self.fixed or extras or cast or self.batchnorm == "batch":
            tensors = {**self.fixed, **extras, **views}
            for name, dtype in cast:
                tensors[name] = views[name].to(dtype)
            tensors = self._batch_copies(tensors)
        value = 0.0  # the loss summed in Python floats (doubles): cheaper than a float64 tensor
        grads: list[torch.Tensor | None] | None = None
        first = True
        if into is not None:
            into.zero_()
            targets = self._targets(into)
            for leaf, target in zip(leaves, targets, strict=True):
                leaf.grad = target  # autograd adds into a leaf's .grad in place
        try:
            with self._loss_mode():
                for i, (b, w) in enumerate(zip(self.batches, self.weights, strict=True)):
                    if w == 0.0:
                        continue  # every target of this batch is ignored by the loss
                    if self._checked:
                        loss = self.loss_fn(self._forward(tensors, b.args, b.kwargs), b.target)
                    else:
                        loss = self._first_loss(tensors, i, first=first)
                    first = False
                    value += loss.item() * w
                    if w != 1.0:  # the batch's weight scales its loss: both ways below give the same bits
                        loss = loss * w
                    if into is not None:
                        torch.autograd.backward(loss, inputs=leaves)
                        continue
                    gs = torch.autograd.grad(loss, leaves, allow_unused=True)
                    if grads is None:  # a sparse gradient made dense once, then added to as autograd adds to .grad
                        grads = [g.to_dense() if g is not None and g.is_sparse else g for g in gs]
                    else:
                        grads = [
                            a if g is None else ((g.to_dense() if g.is_sparse else g) if a is None else a.add_(g))
                            for a, g in zip(grads, gs, strict=True)
                        ]
        finally:
            if into is not None:
                moved = [leaf.grad is not target for leaf, target in zip(leaves, targets, strict=True)]
                for leaf in leaves:
                    leaf.grad = None
        if into is not None and any(moved):  # the gradient would be lost: say so rather than give zeros
            raise RuntimeError(
                "autograd replaced a leaf's .grad instead of adding into it; analyze cannot use this version of "
                f"torch ({torch.__version__}) for small models: please report it"
            )
        self.evaluations += 1
        self._checked = True
        if not math.isfinite(value):
            raise self._not_finite(value, where)
        if into is not None:
            return value, None
        assert grads is not None  # batch_weights never makes every weight zero
        if self._all_grad:
            return value, grads
        it = iter(grads)  # one a leaf
        return value, [next(it) if grad else None for *_, grad in self._layout]

    def many(self, thetas: torch.Tensor, extras: dict, where: str) -> tuple[list[float], torch.Tensor]:
        """Losses and gradients at ``k`` points at once (``thetas`` is ``(k, P)``): one ``torch.func.vmap``
        over the stacked points per data batch instead of ``k`` separate passes."""
        from torch.func import grad, vmap

        def loss_at(flat, args, kwargs, target):
            out = self._forward(self.bind(flat, extras), args, kwargs)
            loss = self.loss_fn(out, target)
            return loss, loss.detach()

        batched = vmap(grad(loss_at, has_aux=True), in_dims=(0, None, None, None))
        total = grads = None
        with self._loss_mode():
            for b, w in zip(self.batches, self.weights, strict=True):
                if w == 0.0:
                    continue
                g, loss = batched(thetas.detach(), b.args, b.kwargs, b.target)
                if grads is None:
                    grads, total = (g if w == 1.0 else g.mul_(w)), loss.double() * w
                else:
                    grads.add_(g, alpha=w)
                    total += loss.double() * w
        self.evaluations += len(thetas)
        assert grads is not None and total is not None  # batch_weights never makes every weight zero
        values = total.tolist()
        for k, value in enumerate(values):
            if not math.isfinite(value):
                raise self._not_finite(value, f"{where} (point {k})")
        return values, grads

    def _not_finite(self, value: float, where: str) -> Exception:
        """The error for a loss that is not finite: the data's fault where it holds nan or inf (every point's loss
        is then nan), else the path's (:func:`_checked` names the snapshot's tensor when it can)."""
        if (bad := data_mod.nonfinite_data(self.batches)) is not None:
            return ValueError(
                f"the loss is {value} at {where} because the data is not finite: {bad}. Clean it (torch.nan_to_num, "
                "or leave those samples out) before analyze."
            )
        return FloatingPointError(f"the loss is {value} at {where}: LCA needs a finite loss at every point of the path")

    def _first_loss(self, tensors: dict, i: int, first: bool) -> torch.Tensor:
        """Batch ``i``'s loss at the first evaluation, checked once: what torch would report obscurely (data of
        another dtype, a tuple output, labels out of range) is raised naming the culprit and the fix, the
        original kept as ``__cause__``; a loss that is not a scalar mean of the batch is refused."""
        b = self.batches[i]
        try:
            out = self._forward(tensors, b.args, b.kwargs)
        except Exception as exc:
            if (err := data_mod.explain_forward_error(exc, self.batches, i, self.model, tensors)) is not None:
                raise err from exc
            raise
        if first:
            data_mod.check_labels(out, self.batches, self.loss_fn)
        try:
            loss = self.loss_fn(out, b.target)
        except Exception as exc:
            if (err := data_mod.explain_loss_error(exc, out, self.batches, i, self.loss_fn, self.model)) is not None:
                raise err from exc
            raise
        self._check_loss(loss)
        if first and self.batchnorm != "batch":  # batch statistics change with the split: nothing to compare
            self._check_averages(tensors, i, float(loss.detach()))
        return loss

    def _check_averages(self, tensors: dict, i: int, whole: float):
        """Refuse a loss_fn that sums over a batch's samples: the loss of batch ``i``'s first rows against that
        of their two halves (forward passes without gradients of at most ``_CHECK_ROWS`` rows, once per analysis:
        on a large batch, a small part of one gradient's cost)."""
        split = data_mod.halves(self.batches[i], most=_CHECK_ROWS)
        if split is None:
            return
        try:
            with torch.no_grad():
                if split[0] is not self.batches[i]:
                    out = self._forward(tensors, split[0].args, split[0].kwargs)
                    whole = float(self.loss_fn(out, split[0].target))
                outs = [self._forward(tensors, h.args, h.kwargs) for h in split[1:]]
                parts = (float(self.loss_fn(outs[0], split[1].target)), float(self.loss_fn(outs[1], split[2].target)))
        except Exception:  # a model or loss that cannot take half a batch: nothing to compare, nothing wrong
            return
        where = data_mod.describe_batch(self.batches, i)
        data_mod.check_averages(whole, parts, (split[1].size, split[2].size), self.loss_fn, where)

    def _check_loss(self, loss):
        name = data_mod.loss_name(self.loss_fn)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn {name} returned {got}: loss_fn must return a scalar (the mean loss of the batch); use "
                "reduction='mean' or add .mean()"
            )
        if not loss.requires_grad:
            raise ValueError(
                f"loss_fn {name} returned a tensor with no gradient: it must be computed from the model's outputs "
                "without .detach()"
            )


class SnapshotReader:
    """Reads snapshot k of a trajectory into (flat vector, non-floating extras), checking it."""

    def __init__(self, traj: Sequence, spec: PathSpec, device):
        self.traj, self.spec, self.device = traj, spec, device
        self._warned_precision = False
        self._last_extras: tuple[int, dict] | None = None  # the last snapshot read's k and non-floating tensors
        self._warned_changed = False

    def _where(self, k: int) -> str:
        describe = getattr(self.traj, "describe", None)
        return describe(k) if describe is not None else f"snapshot {k}"

    def __call__(self, k: int, out: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Snapshot ``k``'s flat vector (written into ``out`` when given) and its non-floating tensors. Values are
        not searched here: a non-finite one makes the loss or the iteration's LCA sum non-finite, and the engine
        then calls :meth:`check_finite` to name the tensor (a pass over every snapshot would cost more, at small
        models, than the rest of the reading)."""
        tensors, extras = self._tensors(k)
        return torch.cat([t.reshape(-1) for t in tensors], out=out), extras

    def rows(self, first: int, out: torch.Tensor) -> tuple[list[dict], BaseException | None]:
        """Snapshots ``first, first + 1, ...`` into the rows of ``out`` (one call a tensor for all of them), up to
        the first that cannot be read: the non-floating tensors of those read, and that snapshot's error (or
        None)."""
        read: list[list[torch.Tensor]] = []
        extras: list[dict] = []
        failure = None
        for k in range(first, first + len(out)):
            try:
                tensors, more = self._tensors(k)
            except Exception as exc:
                failure = exc
                break
            read.append(tensors)
            extras.append(more)
        _fill(out[: len(read)], _by_tensor(read), self.spec.numels)
        return extras, failure

    def _tensors(self, k: int) -> tuple[list[torch.Tensor], dict]:
        """Snapshot ``k``'s path tensors (checked, in the path's dtype, on the device) and non-floating tensors."""
        spec, where, device = self.spec, self._where(k), torch.device(self.device)
        snap = canonical(self.traj[k], spec.aliases, where, expected=spec.names)
        tensors = []
        for name, shape in zip(spec.names, spec.shapes, strict=True):
            t = snap[name]
            if t.shape != shape:
                raise ValueError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
            if t.dtype != spec.dtype or t.device != device or t.requires_grad:  # one call fewer a tensor otherwise
                want = spec.dtypes[spec.names.index(name)]
                if not (t.is_floating_point() or t.is_complex()):
                    raise TypeError(integer_snapshot_message(where, name, t.dtype, want))
                # 16-bit snapshots of a wider model were rounded when saved (float32 snapshots given to a float64
                # copy of the model are the advised way to more precision: no warning there)
                if t.dtype in (torch.float16, torch.bfloat16) and want.itemsize > 2 and not self._warned_precision:
                    self._warned_precision = True  # once a run: every snapshot of such a trajectory is alike
                    warnings.warn(
                        f"{where}: tensor {name!r} is {str(t.dtype).removeprefix('torch.')} but the model's is "
                        f"{str(want).removeprefix('torch.')}: snapshots rounded to a lower precision are not the "
                        "points training passed through, so the LCA misses each loss change by that rounding (see "
                        "the result's residual). Save snapshots in the model's dtypes, or record with lca.record",
                        stacklevel=2,
                    )
                t = t.detach().to(device, spec.dtype)
            tensors.append(t)
        extras = {n: snap[n].detach().to(self.device) for n in spec.fixed_names if n in snap}
        last, self._last_extras = self._last_extras, (k, extras)
        if last is not None and last[0] == k - 1 and not _same(last[1], extras):
            self._warn_changed(k, last[1], extras)
        return tensors, extras

    def _warn_changed(self, k: int, before: dict, after: dict):
        """Warn (once a run) that a non-floating tensor changed from snapshot ``k - 1`` to ``k``."""
        if self._warned_changed:
            return
        self._warned_changed = True
        names = sorted(before.keys() | after.keys())
        name = next(n for n in names if n not in before or n not in after or not _same({n: before[n]}, {n: after[n]}))
        warnings.warn(
            f"{self._where(k)}: the non-floating tensor {name!r} differs from snapshot {k - 1}'s (a mask "
            "or an index that training changed): a change with no path between its values is allocated to no "
            f"parameter, so what it does to the loss stays in the residual of iteration {k - 1} (adaptive does not "
            "refine such an iteration: more points would not shrink it). Later changes are not named again.",
            stacklevel=2,
        )

    def check_finite(self, k: int, flat: torch.Tensor):
        """Raise naming the tensor of snapshot ``k`` (read into ``flat``) that holds nan or inf, if one does."""
        if bool(torch.isfinite(flat).all()):
            return
        for name, piece in zip(self.spec.names, torch.split(flat, self.spec.numels), strict=True):
            if not bool(torch.isfinite(piece).all()):
                bad = "nan" if bool(torch.isnan(piece).any()) else "inf"
                raise ValueError(f"{self._where(k)}: tensor {name!r} holds {bad}")


def _by_tensor(rows: list[list]) -> list[list]:
    """Per-row lists of per-tensor values, as per-tensor lists of per-row values."""
    return [list(column) for column in zip(*rows, strict=True)]


def _fill(out: torch.Tensor, columns: list[list[torch.Tensor | None]], numels: Sequence[int]):
    """Rows of ``out`` from per-tensor values: ``columns[i][j]`` is tensor ``i`` of row ``j`` (None: zeros). One
    ``stack`` a tensor and one ``cat`` for all rows, not a join a row: between gradients each call costs the most."""
    if not len(out):
        return
    blocks = []  # each tensor's rows as one (rows, numel) matrix
    for values, n in zip(columns, numels, strict=True):
        present = [v for v in values if v is not None]
        if len(present) < len(values):
            present = [torch.zeros_like(present[0]) if v is None else v for v in values] if present else []
        # reshape, not view: a channels_last tensor stacks into strides no flat view has
        blocks.append(torch.stack(present).reshape(len(out), n) if present else out.new_zeros(len(out), n))
    torch.cat(blocks, 1, out=out)


def _same(x: dict, y: dict) -> bool:
    """Whether two snapshots' non-floating tensors give the same function (a BatchNorm's step counter
    changes every step but never enters its output)."""
    return x.keys() == y.keys() and all(
        k.rsplit(".", 1)[-1] == "num_batches_tracked" or torch.equal(x[k], y[k]) for k in x
    )


def iterate(
    evaluate: Evaluator, read: SnapshotReader, start: int, stop: int, options: Options, more=None
) -> tuple[float, Iterator[IterationResult]]:
    """The loss at snapshot ``start`` (evaluated now), and an iterator of one :class:`IterationResult` per
    iteration in ``[start, stop)`` (each computed when asked for).

    With ``options.batched_points``, Simpson's end point and midpoint (and adaptive's new midpoints) are
    evaluated in one vmapped call when the two snapshots share their non-floating tensors.

    Each row's ``error`` is the largest per-parameter error estimate over the selected parameters, from the
    changes ``max_i |S_2n[i] - S_n[i]|`` between successive composite Simpson levels (Richardson's ``/ 15``
    where they show Simpson's order, the change itself otherwise; see
    :func:`~lca_notebook.quadrature.simpson_error`): adaptive iterations refined at least once have one.
    Where only one level was computed (first order, trapezoid, Simpson, and adaptive iterations that met
    ``tol`` with one piece) it is NaN: an estimate would need evaluations the rule does not make. With
    ``options.param_tol``, adaptive refines at least once (2 more evaluations), then until
    ``error <= param_tol`` as well as ``|residual| <= tol``, or ``max_splits``.

    ``more`` (following a trajectory still being recorded): instead of stopping at ``stop``, iteration t
    is computed when ``more(t + 1)`` returns True (it waits until snapshot t + 1 is readable) and the rows
    end when it returns False.

    A small model's iterations are computed in chunks (:func:`_chunks`; same results, fewer calls between
    gradients), a large model's one at a time (:func:`_rows`), as are batched points and a growing trajectory.

    Each row's ``lca`` is a view of a buffer the next row refills (at 10M parameters a fresh vector costs more
    than the arithmetic on it): use or copy it before asking for the next row."""
    a, extras_a = read(start)
    loss_a, g_a = _checked(read, [(start, a)], evaluate.gradient, a, extras_a, f"snapshot {start}")
    first = (a, extras_a, loss_a, g_a)
    k = 1 if more is not None or options.batched_points else min(chunk_rows(len(a)), max(stop - start, 1))
    if k > 1:
        return loss_a, _chunks(evaluate, read, start, stop, options, first, k)
    return loss_a, _rows(evaluate, read, start, stop, options, first, more)


def _checked(read: SnapshotReader, snapshots: Sequence[tuple[int, torch.Tensor]], function, *args):
    """``function(*args)``; if it finds a loss that is not finite, first name the tensor that holds nan or inf in
    the ``snapshots`` it was computed from (pairs of ``k`` and snapshot ``k`` read into a flat vector), if one
    does: a midpoint is nan where either end holds inf."""
    try:
        return function(*args)
    except FloatingPointError:
        for k, flat in snapshots:
            read.check_finite(k, flat)
        raise


def _growing(start: int, more) -> Iterator[int]:
    t = start
    while more(t + 1):
        yield t
        t += 1


def _flat_each(grads: list[torch.Tensor | None]) -> Parts:
    return [None if g is None else g.reshape(-1) for g in grads]


def _sums64(x: torch.Tensor) -> np.ndarray:
    """Float64 sums along the last dimension: numpy's pairwise sum on CPU, the same bits for a vector and a matrix's
    rows, whatever the number of threads (torch's parallel sum changes with them: a sharded run on workers of one
    thread would not give the bits of one process of two)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return np.add.reduce(x.numpy(), axis=-1, dtype=np.float64)
    return x.sum(-1, dtype=torch.float64).cpu().numpy()


def _sum64(x: torch.Tensor) -> float:
    """The float64 sum of a flat vector."""
    return float(_sums64(x))


def flat(parts: Parts, sizes: Sequence[int], like: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """:data:`Parts` (of ``sizes``) as one flat vector (zeros for a None part), written into ``out`` when given."""
    return torch.cat([like.new_zeros(n) if p is None else p for p, n in zip(parts, sizes, strict=True)], out=out)


def _split(vectors: torch.Tensor, sizes: Sequence[int]) -> Parts:
    """A flat gradient (or a matrix of them, one a row) as :data:`Parts` of ``sizes`` (views)."""
    return list(torch.split(vectors, list(sizes), dim=-1)) if len(sizes) > 1 else [vectors]


def combine(
    out: torch.Tensor, d: torch.Tensor, terms, sizes: Sequence[int], n_selected: int
) -> tuple[np.ndarray, np.ndarray]:
    """``out = d * sum_k w_k g_k`` for ``terms`` ``[(g_k, w_k), ...]`` of :data:`Parts` (of ``sizes``): one rule's
    LCA, part by part in blocks of :data:`~lca_notebook.layout.BLOCK` that stay in the CPU's cache (a pass over
    memory per operation cost twice as much at 10M parameters). ``out``, ``d`` and the parts are vectors (one
    iteration) or matrices with one row an iteration (a chunk). Returns the float64 sums of each row of ``out``
    and of its first ``n_selected`` columns (the selected tensors come first, in parts of their own)."""
    on_cpu = out.device.type == "cpu"
    width = out.shape[-1]
    total, selected = np.zeros(out.shape[:-1]), np.zeros(out.shape[:-1])
    start = 0
    for i, n in enumerate(sizes):
        present = [(g[i], w) for g, w in terms if g[i] is not None]
        step = BLOCK if on_cpu else max(n, 1)  # elsewhere one kernel per tensor: launches, not caches, cost there
        for s in range(0, n, step):
            e = min(s + step, n)
            # a slice is a call too: at small models most of what this function costs
            whole = e - s == width
            block = out if whole else out[..., start + s : start + e]
            if not present:
                block.zero_()
                continue
            (g0, w0), *more = present
            torch.mul(g0 if whole else g0[..., s:e], w0, out=block)
            for g, w in more:
                block.add_(g if whole else g[..., s:e], alpha=w)
            block.mul_(d if whole else d[..., start + s : start + e])
            if on_cpu:  # summed while in cache
                part = _sums64(block)
                total += part
                if start + e <= n_selected:
                    selected += part
        start += n
    if not on_cpu:  # one synchronisation each, at the end
        total = _sums64(out)
        selected = _sums64(out[..., :n_selected]) if n_selected < width else total
    return total, selected


class _Refinement:
    """Adaptive quadrature for one iteration at a time: composite Simpson as running sums of flat vectors, ends E,
    current midpoints A, older interior points B (refining costs two gradients or more: the flat copies are small
    beside them). Its vectors are made when an iteration first refines and refilled by the next ones."""

    def __init__(self, evaluate: Evaluator, options: Options):
        self.evaluate, self.options = evaluate, options
        self.other: torch.Tensor | None = None  # LCA levels alternate between the caller's row and this
        self.ends: torch.Tensor | None = None
        self.interior: torch.Tensor | None = None
        self.point: torch.Tensor | None = None

    def __call__(self, t, a, d, extras_a, g_a: Parts, g_b: Parts, g_m: Parts, lca, total, selected, change):
        """Refine iteration ``t`` (start ``a``, step ``d``, Simpson's gradients) from its Simpson ``lca``, until its
        residual meets ``tol`` (and every parameter's error estimate ``param_tol``) or ``max_splits``. Returns
        ``(lca, total, selected, pieces, error)``; ``lca`` is the given row or a vector of this object's."""
        evaluate, o = self.evaluate, self.options
        sizes, p_sel = evaluate.sizes, evaluate.spec.n_selected
        pieces, error = 1, math.nan
        changes: list[float] = []  # largest |S_2n - S_n| between each two successive levels
        levels = [lca, self.other]
        interior = mids = None
        while pieces < o.max_splits and not (
            abs(total - change) <= o.tol and (o.param_tol is None or error <= o.param_tol)
        ):  # NaN error (one level so far) is not <= param_tol: refine
            if levels[1] is None:
                levels[1] = self.other = torch.empty_like(a)
            if interior is None or mids is None:  # the first refinement (levels[1] holds g_b until reused below)
                self.ends = flat(g_a, sizes, a, out=self.ends).add_(flat(g_b, sizes, a, out=levels[1]))
                interior = self.interior = flat(g_m, sizes, a, out=self.interior)
            else:
                interior.add_(mids)
            coarse = lca
            levels.reverse()
            new = refinement_points(pieces)
            if o.batched_points:
                where = f"{2 * pieces} new points between snapshots {t} and {t + 1}"
                s_col = torch.as_tensor(new, dtype=a.dtype, device=a.device)[:, None]
                mids = self._points_sum(a + s_col * d, extras_a, where)
            else:
                mids = torch.zeros_like(a)
                for s in new:
                    where = f"s={s:g} between snapshots {t} and {t + 1}"
                    self.point = torch.add(a, d, alpha=float(s), out=self.point)
                    mids += evaluate(self.point, extras_a, where)[1]
            pieces *= 2
            w_end, w_mid, w_interior = simpson_weights(pieces)
            assert self.ends is not None  # made at the first refinement
            lca = torch.mul(self.ends, w_end, out=levels[0]).add_(mids, alpha=w_mid)
            lca.add_(interior, alpha=w_interior).mul_(d)
            changes.append(level_change(lca[:p_sel], coarse[:p_sel]))  # Richardson's, at no evaluation
            error = simpson_error(changes)
            total = _sum64(lca)
            selected = _sum64(lca[:p_sel]) if p_sel < len(lca) else total
        return lca, total, selected, pieces, error

    def _points_sum(self, points, extras, where):
        total = None
        for chunk in torch.split(points, MAX_POINTS_PER_CALL):
            g = self.evaluate.many(chunk, extras, where)[1].sum(0)
            total = g if total is None else total.add_(g)
        return total


def _row(t, lca, total, selected, change, pieces, loss_end, evaluations, error, p_sel) -> IterationResult:
    rest = total - selected if p_sel < len(lca) else 0.0
    return IterationResult(t, lca[:p_sel], rest, total - change, pieces, loss_end, evaluations, error=error)


def _rows(evaluate: Evaluator, read: SnapshotReader, start: int, stop: int, options: Options, first, more=None):
    """One iteration at a time (models too large for :func:`_chunks`, batched points, a growing trajectory)."""
    method, batched = options.method, options.batched_points
    sizes = evaluate.sizes  # of the gradients' parts
    p_sel = evaluate.spec.n_selected
    a, extras_a, loss_a, g_a = first
    simpson_like = method in ("simpson", "adaptive")
    # fixed rules: (0 for the start point or 1 for the end, weight)
    fixed_rule = None if simpson_like else [(int(s), float(w)) for s, w in zip(*rule(method), strict=True)]
    # Vectors of P elements are refilled, never allocated per iteration: a fresh one costs more in page faults
    # than the arithmetic on it (10M parameters: ~13 ms each). Gradients stay as autograd made them (Parts):
    # `combine` reads them in place. `spare` is last iteration's start point, free once this iteration's row is
    # made. `point` is made on first use: a rule that never uses it holds none.
    point = None
    spare, d, lca = torch.empty_like(a), torch.empty_like(a), torch.empty_like(a)
    refine = _Refinement(evaluate, options) if method == "adaptive" else None
    for t in range(start, stop) if more is None else _growing(start, more):
        before = evaluate.evaluations
        b, extras_b = read(t + 1, out=spare)
        torch.sub(b, a, out=d)
        g_m: Parts | None = None  # the gradient at the midpoint
        if batched and simpson_like and _same(extras_a, extras_b):
            where = f"snapshot {t + 1} and s=0.5 before it"
            both = torch.stack([b, torch.add(a, d, alpha=0.5)])
            losses, grads = _checked(read, [(t + 1, b), (t, a)], evaluate.many, both, extras_a, where)
            loss_b, g_b, g_m = losses[0], _split(grads[0], sizes), _split(grads[1], sizes)
        else:
            loss_b, g_b = _checked(read, [(t + 1, b)], evaluate.gradient, b, extras_b, f"snapshot {t + 1}")
        change = loss_b - loss_a
        if fixed_rule is not None:
            terms = [((g_a, g_b)[end], w) for end, w in fixed_rule]
        else:
            if g_m is None:
                where = f"s=0.5 between snapshots {t} and {t + 1}"
                point = torch.add(a, d, alpha=0.5, out=point)
                g_m = _checked(read, [(t, a), (t + 1, b)], evaluate.gradient, point, extras_a, where)[1]
            w_end, w_mid, _ = simpson_weights(1)
            terms = [(g_a, w_end), (g_b, w_end), (g_m, w_mid)]
        totals, selections = combine(lca, d, terms, sizes, p_sel)
        total, selected = float(totals), float(selections)
        if not math.isfinite(total):  # a snapshot's nan or inf reaches the sum through d: name it
            read.check_finite(t + 1, b)
            read.check_finite(t, a)
        row, pieces, error = lca, 1, math.nan
        if refine is not None and _same(extras_a, extras_b):  # a jump in a non-floating tensor: no point helps
            assert g_m is not None
            row, total, selected, pieces, error = refine(t, a, d, extras_a, g_a, g_b, g_m, lca, total, selected, change)
        yield _row(t, row, total, selected, change, pieces, loss_b, evaluate.evaluations - before, error, p_sel)
        spare = a
        a, extras_a, loss_a, g_a = b, extras_b, loss_b, g_b


#: Iterations of a small model are computed in chunks of up to this many (see :func:`_chunks`; two points a row
#: keep their views in :meth:`Evaluator._leaves`' cache, and a row's gradients theirs in ``_targets``') ...
MAX_CHUNK = (_BOUND - 8) // 2
#: ... as long as a chunk's matrix holds at most this many numbers ...
CHUNK_ELEMENTS = 1 << 19
#: ... and a chunk takes about this long (rows reach the sink and the progress bar at least this often).
CHUNK_SECONDS = 0.2


def chunk_rows(n_parameters: int) -> int:
    """How many iterations :func:`_chunks` computes together for a model of ``n_parameters`` (1: one at a time).

    >>> chunk_rows(2_410), chunk_rows(100_000), chunk_rows(10_000_000)
    (16, 5, 1)
    """
    return max(1, min(MAX_CHUNK, CHUNK_ELEMENTS // max(n_parameters, 1)))


def _chunks(evaluate: Evaluator, read: SnapshotReader, start: int, stop: int, options: Options, first, k: int):
    """The iterations of a small model ``k`` at a time: read ``k`` snapshots into the rows of a matrix (one call a
    tensor for the chunk), then their ``2k`` gradients back to back, each added by autograd into its row of a
    matrix, and make every row's LCA and sums in a few calls on the matrices.
    Between two gradients, every call costs 5-20 us more than it does warm (the gradient's work evicts it from the
    CPU's caches): one iteration at a time, a model of a few thousand parameters spent 20% beyond its gradients.
    Chunks take about :data:`CHUNK_SECONDS` (slow gradients: one row each), and give the same bits as one row at a
    time. A chunk that meets an error (or Ctrl-C) yields the rows it completed, then raises it."""
    method = options.method
    sizes, p_sel = evaluate.sizes, evaluate.spec.n_selected
    a, extras_a, loss_a, g_a = first
    simpson_like = method in ("simpson", "adaptive")
    # ends[j]: snapshot t0 + j, grads[j] its gradient (row 0 carried over from the last chunk); d[j]: the step of
    # iteration t0 + j; mids / g_mids: Simpson's midpoints and their gradients.
    ends, grads = a.new_empty(k + 1, len(a)), a.new_empty(k + 1, len(a))
    d, lca = a.new_empty(k, len(a)), a.new_empty(k, len(a))
    mids, g_mids = (a.new_empty(k, len(a)), a.new_empty(k, len(a))) if simpson_like else (None, None)
    ends[0].copy_(a)
    flat(g_a, sizes, a, out=grads[0])
    extras, losses = [extras_a] * (k + 1), [loss_a] * (k + 1)
    if simpson_like:
        w_end, w_mid, _ = simpson_weights(1)
        rule_terms = [(0, w_end), (1, w_end), (2, w_mid)]  # start, end, midpoint
    else:
        rule_terms = [(int(s), float(w)) for s, w in zip(*rule(method), strict=True)]
    refine = _Refinement(evaluate, options) if method == "adaptive" else None
    t0, rows = start, 1  # the first chunk is one row: it times a row for the next one's size
    while t0 < stop:
        began = time.perf_counter()
        n = min(rows, stop - t0)
        spent = [0] * n
        # a snapshot that cannot be read ends the chunk (Ctrl-C while reading: nothing of it is computed yet)
        got, failure = read.rows(t0 + 1, ends[1 : n + 1])
        n = len(got)
        extras[1 : n + 1] = got
        torch.sub(ends[1 : n + 1], ends[:n], out=d[:n])
        if mids is not None:
            torch.add(ends[:n], d[:n], alpha=0.5, out=mids[:n])
        try:  # each gradient goes straight into its row of grads / g_mids
            for j in range(n):
                t, before = t0 + j, evaluate.evaluations
                where = f"snapshot {t + 1}"
                end = [(t + 1, ends[j + 1])]
                losses[j + 1], _ = _checked(
                    read, end, evaluate._gradients, ends[j + 1], extras[j + 1], where, grads[j + 1]
                )
                if mids is not None and g_mids is not None:
                    where = f"s=0.5 between snapshots {t} and {t + 1}"
                    _checked(read, [(t, ends[j]), *end], evaluate._gradients, mids[j], extras[j], where, g_mids[j])
                spent[j] = evaluate.evaluations - before
        except BaseException as exc:  # rows before j are complete: they come out first
            n, failure = j, exc
        matrices = [grads[:n], grads[1 : n + 1], *([g_mids[:n]] if g_mids is not None else [])]
        terms = [(_split(matrices[which], sizes), w) for which, w in rule_terms]
        totals, selections = combine(lca[:n], d[:n], terms, sizes, p_sel)
        for j in range(n):
            t = t0 + j
            total, selected, change = float(totals[j]), float(selections[j]), losses[j + 1] - losses[j]
            if not math.isfinite(total):  # a snapshot's nan or inf reaches the sum through d: name it
                read.check_finite(t + 1, ends[j + 1])
                read.check_finite(t, ends[j])
            row, pieces, error = lca[j], 1, math.nan
            if refine is not None and mids is not None and g_mids is not None and _same(extras[j], extras[j + 1]):
                before = evaluate.evaluations
                g_a, g_b, g_m = _split(grads[j], sizes), _split(grads[j + 1], sizes), _split(g_mids[j], sizes)
                row, total, selected, pieces, error = refine(
                    t, ends[j], d[j], extras[j], g_a, g_b, g_m, row, total, selected, change
                )
                spent[j] += evaluate.evaluations - before
            yield _row(t, row, total, selected, change, pieces, losses[j + 1], spent[j], error, p_sel)
        if failure is not None:
            raise failure
        ends[0].copy_(ends[n])
        grads[0].copy_(grads[n])
        extras[0], losses[0] = extras[n], losses[n]
        t0 += n
        rows = max(1, min(k, int(CHUNK_SECONDS * n / max(time.perf_counter() - began, 1e-9))))


def run(evaluate, read, sink, options: Options, *, progress=True, start=None, stop=None, more=None):
    """Drive :func:`iterate` from the sink's first missing iteration and hand each row to the sink
    (``more``: until it says the trajectory ends, see :func:`iterate`).

    On any error (Ctrl-C included) the sink keeps what was computed, and the exception gets a note
    saying where (and a ``partial_result`` when the sink has one)."""
    from tqdm.auto import tqdm

    start = sink.resume_from() if start is None else start
    stop = sink.n_iterations if stop is None else stop
    if start >= stop and more is None:
        return
    t0 = time.perf_counter()
    bar = tqdm(total=stop - start if more is None else None, desc="LCA", unit="it", disable=not progress, leave=False)
    done = start
    try:
        with heap.kept(read.device):  # autograd's freed blocks reused, not mapped again (see lca_notebook.heap)
            loss, rows = iterate(evaluate, read, start, stop, options, more)
            sink.write_loss(start, loss)
            for row in rows:
                sink.write(row)
                done = row.t + 1
                bar.update(1)
    except BaseException as exc:
        sink.interrupted(done)
        if getattr(sink, "partial", None) is not None:
            exc.partial_result = sink.partial  # type: ignore[attr-defined]
        if done > start and hasattr(exc, "add_note"):
            exc.add_note(
                f"lca_notebook: iterations {start}..{done - 1} were computed before this error; {sink.where_kept()}"
            )
        raise
    finally:
        bar.close()
    sink.seconds += time.perf_counter() - t0
    sink.evaluations += evaluate.evaluations


def warn_if_stuck(
    residual: np.ndarray, splits: np.ndarray, options: Options, stacklevel: int = 3, error: np.ndarray | None = None
):
    """Warn when adaptive quadrature hit its piece limit with the residual still above ``tol`` (or, with
    ``param_tol``, a parameter's estimated ``error`` still above it)."""
    if options.method != "adaptive":
        return
    at_limit = np.asarray(splits) >= options.max_splits
    stuck = (np.abs(np.asarray(residual)) > options.tol) & at_limit
    if stuck.any():
        warnings.warn(
            f"adaptive LCA hit max_splits={options.max_splits} with |residual| > tol={options.tol:g} on "
            f"{int(stuck.sum())} of {stuck.size} iterations (first: {int(np.flatnonzero(stuck)[0])}); raise "
            "max_splits or tol, or record snapshots more often",
            stacklevel=stacklevel,
        )
    if options.param_tol is not None and error is not None:
        err = np.asarray(error, dtype=np.float64)
        loose = ~(err <= options.param_tol) & at_limit
        if loose.any():
            first = int(np.flatnonzero(loose)[0])
            warnings.warn(
                f"adaptive LCA hit max_splits={options.max_splits} with a parameter's estimated error above "
                f"param_tol={options.param_tol:g} on {int(loose.sum())} of {loose.size} iterations (first: {first}, "
                f"error {err[first]:.3g}; the result's `error` holds each iteration's); raise max_splits or "
                "param_tol, or record snapshots more often. Below about 1e-7 of the largest |LCA|, float32 "
                "rounding of the gradients keeps the estimate from falling: analyze a float64 copy of the model",
                stacklevel=stacklevel,
            )
