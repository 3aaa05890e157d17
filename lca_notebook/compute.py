"""Full-data gradients along the recorded path, and the loop over iterations that turns them into LCA.

Every tensor that moves along the path is packed into one flat vector ``theta`` (in
``named_parameters`` order, selected parameters first), so a point of the path is one
``a + s * d`` and one ``torch.autograd.grad`` returns the whole gradient. The model is evaluated at
any ``theta`` with ``torch.func.functional_call``: the user's module is never written to.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from . import data as data_mod
from .quadrature import check_method, refinement_points
from .trajectory import Trajectory, as_trajectory

BATCHNORM_MODES = ("eval", "batch")


@dataclass
class PathSpec:
    """Which tensors move along the path and where each sits in the flat vector."""

    names: list[str]  # path tensors, in flat order: selected params, other trainable, buffers, frozen
    shapes: list[torch.Size]
    dtypes: list[torch.dtype]
    with_grad: list[bool]  # gradient taken (frozen params and, in "batch" mode, buffers are not)
    n_selected_tensors: int
    dtype: torch.dtype  # dtype of the flat vector
    aliases: dict[str, str]  # every name the model knows (tied weights too) -> its primary name
    fixed_names: set[str] = field(default_factory=set)  # in snapshot 0 but not floating: taken per snapshot
    # Transposed-convolution weights, (in, out // groups, ...): their output unit is dim 1 within the group
    # of dim 0. Name -> groups. Every other tensor's unit is dim 0.
    transposed: dict[str, int] = field(default_factory=dict)

    @property
    def numels(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def n_selected(self) -> int:
        return sum(self.numels[: self.n_selected_tensors])

    @property
    def selected(self) -> list[tuple[str, torch.Size]]:
        return list(zip(self.names, self.shapes))[: self.n_selected_tensors]


def _select(model: torch.nn.Module, parameters) -> tuple[list[str], list[str], list[str]]:
    """Split the model's (deduplicated) parameters into selected, other trainable and frozen names."""
    named = list(model.named_parameters())  # remove_duplicate=True: a tied tensor counts once
    trainable = [n for n, p in named if p.requires_grad]
    frozen = [n for n, p in named if not p.requires_grad]
    if not trainable:
        raise ValueError(
            f"the model ({type(model).__name__}) has no trainable parameters (requires_grad=True): nothing to allocate the loss change to"
        )
    if parameters is None:
        return trainable, [], frozen
    patterns = [parameters] if isinstance(parameters, str) else list(parameters)
    selected = [n for n in trainable if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not selected:
        raise ValueError(f"parameters={patterns!r} match none of the model's trainable parameters: {', '.join(trainable)}")
    return selected, [n for n in trainable if n not in selected], frozen


def _aliases(model: torch.nn.Module) -> dict[str, str]:
    primary: dict[int, str] = {}
    out = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        out[name] = primary.setdefault(id(t), name)
    return out


def _canonical(snapshot, aliases, where: str, expected=()) -> dict[str, torch.Tensor]:
    """The snapshot keyed by primary names (tied weights under one name), checked against the model."""
    out, unknown = {}, []
    for key, value in snapshot.items():
        name = aliases.get(key)
        if name is None:
            unknown.append(key)
        elif not isinstance(value, torch.Tensor):
            raise TypeError(f"{where}: {key!r} is a {type(value).__name__}, not a tensor")
        else:
            out.setdefault(name, value)
    extra = ""
    if unknown:
        extra = f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
        if all(k.startswith("module.") for k in unknown):
            extra += " (they start with 'module.': strip that prefix left by DataParallel/DistributedDataParallel)"
    missing = [n for n in expected if n not in out]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        also = f"; it holds tensors the model does not have: {extra}" if unknown else ""
        raise ValueError(
            f"{where} has no tensor {missing[0]!r}{more}{also}. Every snapshot needs every trainable tensor: save "
            "model.state_dict(), or fill in tensors that never changed with {**model.state_dict(), **snapshot}"
        )
    if unknown:
        raise ValueError(f"{where} holds tensors the model does not have: {extra}")
    return out


def build_spec(model, snapshot0, *, parameters=None, batchnorm="eval", where="snapshot 0", last=None, subset=False) -> PathSpec:
    """The path layout, from the model and its first snapshot (``last``, the final snapshot, tells
    whether frozen tensors move: those that do get a gradient so their share is counted). With ``subset``
    (a trajectory recorded with ``parameters=``), trainable tensors it lacks stay at the model's values."""
    selected, other, frozen = _select(model, parameters)
    aliases = _aliases(model)
    if subset:
        present = {aliases.get(k) for k in snapshot0}
        unrecorded = [n for n in selected if n not in present]
        if parameters is not None and unrecorded:
            raise ValueError(
                f"parameters={parameters!r} selects {unrecorded[0]!r}, which this trajectory did not record (it was recorded "
                "with parameters= of its own): select among the recorded tensors"
            )
        selected = [n for n in selected if n in present] or selected  # none recorded: the usual error below
        other = [n for n in other if n in present]
    snap = _canonical(snapshot0, aliases, where, expected=selected + other)
    buffers = [n for n, b in model.named_buffers() if n in snap and snap[n].is_floating_point()]
    transient = {f"{m}.{b}" if m else b for m, mod in model.named_modules() for b in mod._non_persistent_buffers_set}
    # Non-persistent buffers (rotary inv_freq...) are never in a state_dict: nothing to warn about.
    missing_buffers = [n for n, b in model.named_buffers() if b.is_floating_point() and n not in snap and n not in transient]
    if missing_buffers and batchnorm == "eval" and not subset:  # a subset recorder checked them itself
        warnings.warn(
            f"{where} has no {missing_buffers[0]!r}{f' (and {len(missing_buffers) - 1} more buffers)' if len(missing_buffers) > 1 else ''}: "
            "the model's current values are used at every snapshot. Record full state_dicts to use each snapshot's "
            "running statistics, or pass batchnorm='batch'.",
            stacklevel=3,
        )
    frozen = [n for n in frozen if n in snap]
    module_tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    if last is not None and frozen:
        end = _canonical(last, aliases, "the last snapshot")
        moving = [n for n in frozen if n in end and not torch.equal(end[n].detach().cpu(), snap[n].detach().cpu())]
    else:
        moving = []
    frozen = moving + [n for n in frozen if n not in moving]
    names = selected + other + buffers + frozen
    for n in names:
        if tuple(snap[n].shape) != tuple(module_tensors[n].shape):
            raise ValueError(f"{where}: tensor {n!r} has shape {tuple(snap[n].shape)} but the model's has {tuple(module_tensors[n].shape)}")
    dtypes = [module_tensors[n].dtype if module_tensors[n].is_floating_point() else torch.float32 for n in names]
    dtype = torch.float32  # at least: fp16/bf16 sums of many small d*g products lose the small ones
    for d in dtypes:
        dtype = torch.promote_types(dtype, d)
    # Frozen tensors that move between snapshots (gradual unfreezing) get a gradient, their share in lca_rest.
    with_grad = [True] * (len(selected) + len(other)) + [batchnorm == "eval"] * len(buffers) + [n in moving for n in frozen]
    fixed = {n for n in snap if n not in names}
    transposed = {}
    for n in selected:
        owner = model.get_submodule(n.rsplit(".", 1)[0]) if "." in n else model
        if isinstance(owner, torch.nn.modules.conv._ConvTransposeNd) and n.endswith("weight"):
            transposed[n] = owner.groups
    return PathSpec(names, [module_tensors[n].shape for n in names], dtypes, with_grad, len(selected), dtype, aliases, fixed, transposed)


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
    shape = (1, -1) + (1,) * (input.dim() - 2)
    y = (input - running_mean.view(shape)) * torch.rsqrt(running_var.view(shape) + eps)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


def _instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True, momentum=0.1, eps=1e-5):
    if use_input_stats or running_mean is None or not (running_mean.requires_grad or running_var.requires_grad):
        return F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    return _batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)  # same formula in eval


@contextlib.contextmanager
def _fixed_function(model: torch.nn.Module, batchnorm: str):
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


def _batch_weights(batches, loss_fn) -> list[float]:
    """Each batch's share of the full-data mean loss: its size, or for PyTorch's classification losses
    what their mean divides by (targets not ignored, times their class weights), so that ignored
    targets and class weights average over all of the data exactly as one batch would."""
    rows = [float(b.size) for b in batches]
    if loss_fn in (F.cross_entropy, F.nll_loss):
        ignore, weight = -100, None
    elif isinstance(loss_fn, (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss)) and loss_fn.reduction == "mean":
        ignore, weight = loss_fn.ignore_index, loss_fn.weight
    else:
        ignore = None
    if ignore is not None and len(batches) > 1 and all(isinstance(b.target, torch.Tensor) and not b.target.is_floating_point() for b in batches):
        try:
            counts = []
            for b in batches:
                kept = b.target[b.target != ignore]
                counts.append(float(kept.numel()) if weight is None else float(weight.to(kept.device)[kept].sum()))
        except (IndexError, RuntimeError):  # a class out of range: the loss itself will say so, naming it
            counts = []
        if sum(counts) > 0:
            rows = counts
    total = sum(rows)
    return [r / total for r in rows]


class Evaluator:
    """Full-data mean loss and its gradient with respect to the flat path vector.

    ``evaluations`` counts full-data gradient evaluations (each is one pass over all batches).
    """

    def __init__(self, model, batches, loss_fn, spec: PathSpec, device, batchnorm="eval"):
        self.model, self.batches, self.loss_fn, self.spec = model, batches, loss_fn, spec
        self.n = data_mod.n_samples(batches)
        self.weights = _batch_weights(batches, loss_fn)
        self.batchnorm = batchnorm
        path = set(spec.names)
        own = dict(model.named_parameters()) | dict(model.named_buffers())
        # Tensors not in the snapshots stay at the model's current values (moved to device once).
        self.fixed = {n: t.detach().to(device) for n, t in own.items() if n not in path}
        self.evaluations = 0
        own_params = dict(model.named_parameters())
        self._bn_mode = batchnorm == "eval" and any(n not in own_params for n in spec.names)
        self._checked = False
        # Per-tensor layout, precomputed: this runs at every quadrature point.
        self._numels = spec.numels
        self._buffer_names = [n for n, _ in model.named_buffers()]
        self._layout = [(n, s, None if d == spec.dtype else d, g) for n, s, d, g in zip(spec.names, spec.shapes, spec.dtypes, spec.with_grad)]

    def tensors(self, leaf: torch.Tensor, extras: dict) -> dict:
        out = dict(self.fixed)
        out.update(extras)
        for (name, shape, dtype, grad), piece in zip(self._layout, torch.split(leaf, self._numels)):
            t = piece.view(shape)
            if not grad:
                t = t.detach()
            out[name] = t if dtype is None else t.to(dtype)
        if self.batchnorm == "batch":  # batch statistics update running buffers in place: never the user's
            for name in self._buffer_names:
                if name in out:
                    out[name] = out[name].detach().clone()
        return out

    def __call__(self, theta: torch.Tensor, extras: dict, where: str) -> tuple[float, torch.Tensor]:
        # One leaf per tensor, each a view into ``theta``: no split/view nodes in the backward graph,
        # and the gradient comes back as one flat vector from a single concatenation.
        tensors = dict(self.fixed)
        tensors.update(extras)
        leaves, slots = [], []
        for (name, shape, dtype, grad), piece in zip(self._layout, torch.split(theta.detach(), self._numels)):
            t = piece.view(shape)
            if grad:
                t.requires_grad_(True)
                leaves.append(t)
            slots.append(len(leaves) - 1 if grad else None)
            tensors[name] = t if dtype is None else t.to(dtype)
        if self.batchnorm == "batch":  # batch statistics update running buffers in place: never the user's
            for name in self._buffer_names:
                if name in tensors:
                    tensors[name] = tensors[name].detach().clone()
        total = grads = None
        mode = _DifferentiableBatchNorm() if self._bn_mode else contextlib.nullcontext()
        with mode:
            for b, w in zip(self.batches, self.weights):
                if w == 0.0:
                    continue  # every target of this batch is ignored by the loss
                out = functional_call(self.model, tensors, b.args, b.kwargs)
                loss = self.loss_fn(out, b.target)
                if not self._checked:
                    self._check_loss(loss)
                gs = [g.to_dense() if g is not None and g.is_sparse else g for g in torch.autograd.grad(loss, leaves, allow_unused=True)]
                if grads is None:
                    grads = [g if g is None or w == 1.0 else g.mul_(w) for g in gs]
                    total = loss.detach().double() * w
                else:
                    grads = [a if g is None else (g.mul_(w) if a is None else a.add_(g, alpha=w)) for a, g in zip(grads, gs)]
                    total += loss.detach().double() * w
        self.evaluations += 1
        value = float(total)
        if not math.isfinite(value):
            raise FloatingPointError(f"the loss is {value} at {where}: LCA needs a finite loss at every point of the path")
        parts = []
        for slot, n in zip(slots, self._numels):
            g = None if slot is None else grads[slot]
            parts.append(theta.new_zeros(n) if g is None else g.reshape(-1).to(theta.dtype))
        return value, torch.cat(parts)

    def many(self, thetas: torch.Tensor, extras: dict, where: str) -> tuple[list[float], torch.Tensor]:
        """Losses and gradients at ``k`` points at once (``thetas`` is ``(k, P)``): one ``torch.func.vmap``
        over the stacked points per data batch instead of ``k`` separate passes."""
        from torch.func import grad, vmap

        def loss_at(flat, args, kwargs, target):
            out = functional_call(self.model, self.tensors(flat, extras), args, kwargs)
            loss = self.loss_fn(out, target)
            return loss, loss.detach()

        batched = vmap(grad(loss_at, has_aux=True), in_dims=(0, None, None, None))
        total = grads = None
        mode = _DifferentiableBatchNorm() if self._bn_mode else contextlib.nullcontext()
        with mode:
            for b, w in zip(self.batches, self.weights):
                if w == 0.0:
                    continue
                g, loss = batched(thetas.detach(), b.args, b.kwargs, b.target)
                if grads is None:
                    grads, total = (g if w == 1.0 else g.mul_(w)), loss.double() * w
                else:
                    grads.add_(g, alpha=w)
                    total += loss.double() * w
        self.evaluations += len(thetas)
        values = total.tolist()
        for k, value in enumerate(values):
            if not math.isfinite(value):
                raise FloatingPointError(f"the loss is {value} at {where} (point {k}): LCA needs a finite loss at every point of the path")
        return values, grads

    def _check_loss(self, loss):
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return a scalar (the mean loss of the batch), got {shape}; use reduction='mean' or add .mean()"
            )
        if not loss.requires_grad:
            raise ValueError("loss_fn returned a tensor with no gradient: it must be computed from the model's outputs without .detach()")
        self._checked = True


class SnapshotReader:
    """Reads snapshot k of a trajectory into (flat vector, non-floating extras), checking it."""

    def __init__(self, traj: Trajectory, spec: PathSpec, device):
        self.traj, self.spec, self.device = traj, spec, device

    def __call__(self, k: int) -> tuple[torch.Tensor, dict]:
        spec, where = self.spec, self.traj.describe(k)
        snap = _canonical(self.traj[k], spec.aliases, where, expected=spec.names)
        parts = []
        for name, shape in zip(spec.names, spec.shapes):
            t = snap[name]
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
            parts.append(t.detach().to(self.device, spec.dtype).reshape(-1))
        flat = torch.cat(parts)
        if not math.isfinite(float(flat.sum(dtype=torch.float64))):  # one pass; search tensors only if it fails
            for name, piece in zip(spec.names, torch.split(flat, spec.numels)):
                if not bool(torch.isfinite(piece).all()):
                    bad = "nan" if bool(torch.isnan(piece).any()) else "inf"
                    raise ValueError(f"{where} (iteration {k}): tensor {name!r} holds {bad}")
        extras = {n: snap[n].detach().to(self.device) for n in spec.fixed_names if n in snap}
        return flat, extras


@dataclass
class IterationResult:
    t: int
    lca: torch.Tensor  # selected parameters, flat
    rest: float  # LCA of the path tensors outside `lca` (other parameters, running statistics)
    residual: float
    splits: int
    loss_end: float
    evaluations: int


def _same(x: dict, y: dict) -> bool:
    """Whether two snapshots' non-floating tensors give the same function (a BatchNorm's step counter
    changes every step but never enters its output)."""
    return x.keys() == y.keys() and all(k.rsplit(".", 1)[-1] == "num_batches_tracked" or torch.equal(x[k], y[k]) for k in x)


#: Most points one batched call evaluates (memory grows with it: activations of every point at once).
MAX_POINTS_PER_CALL = 8


def iterate(evaluate: Evaluator, read: SnapshotReader, start: int, stop: int, *, method: str, tol: float, max_splits: int, batched_points: bool = False):
    """Yield the loss at snapshot ``start``, then one :class:`IterationResult` per iteration in ``[start, stop)``.

    With ``batched_points``, Simpson's end point and midpoint (and adaptive's new midpoints) are evaluated in
    one vmapped call when the two snapshots share their non-floating tensors."""
    spec = evaluate.spec
    p_sel = spec.n_selected
    a, extras_a = read(start)
    loss_a, g_a = evaluate(a, extras_a, f"snapshot {start}")
    yield loss_a
    simpson_like = method in ("simpson", "adaptive")

    def points_sum(points, extras, where):
        total = None
        for chunk in torch.split(points, MAX_POINTS_PER_CALL):
            g = evaluate.many(chunk, extras, where)[1].sum(0)
            total = g if total is None else total.add_(g)
        return total

    for t in range(start, stop):
        before = evaluate.evaluations
        b, extras_b = read(t + 1)
        d = b - a
        mids = None
        if batched_points and simpson_like and _same(extras_a, extras_b):
            losses, grads = evaluate.many(torch.stack([b, torch.add(a, d, alpha=0.5)]), extras_a, f"snapshot {t + 1} and s=0.5 before it")
            loss_b, g_b, mids = losses[0], grads[0], grads[1]
        else:
            loss_b, g_b = evaluate(b, extras_b, f"snapshot {t + 1}")
        change = loss_b - loss_a
        pieces = 1
        if method == "first_order":
            lca_all = d * g_a
        elif method == "trapezoid":
            lca_all = d * (g_a + g_b).mul_(0.5)
        else:
            # Composite Simpson kept as running sums: ends E, current midpoints A, older interior B.
            # Weighted sum = (E + 4A + 2B) / (6n); doubling n turns A into interior points.
            ends = g_a + g_b
            if mids is None:
                mids = evaluate(torch.add(a, d, alpha=0.5), extras_a, f"s=0.5 between snapshots {t} and {t + 1}")[1]
            interior = None
            while True:
                avg = torch.add(ends, mids, alpha=4)
                if interior is not None:
                    avg.add_(interior, alpha=2)
                lca_all = avg.mul_(d).div_(6 * pieces)
                if method == "simpson" or pieces >= max_splits or abs(float(lca_all.sum(dtype=torch.float64)) - change) <= tol:
                    break
                interior = mids if interior is None else interior.add_(mids)
                where = f"{2 * pieces} new points between snapshots {t} and {t + 1}"
                new = refinement_points(pieces)
                if batched_points:
                    s_col = torch.as_tensor(new, dtype=a.dtype, device=a.device)[:, None]
                    mids = points_sum(a + s_col * d, extras_a, where)
                else:
                    mids = torch.zeros_like(ends)
                    for s in new:
                        mids += evaluate(torch.add(a, d, alpha=float(s)), extras_a, f"s={s:g} between snapshots {t} and {t + 1}")[1]
                pieces *= 2
        total = float(lca_all.sum(dtype=torch.float64))
        selected = lca_all[:p_sel]
        rest = total - float(selected.sum(dtype=torch.float64)) if p_sel < len(lca_all) else 0.0
        yield IterationResult(t, selected, rest, total - change, pieces, loss_b, evaluate.evaluations - before)
        a, extras_a, loss_a, g_a = b, extras_b, loss_b, g_b


def parameter_coords(spec: PathSpec) -> dict[str, np.ndarray]:
    """Coordinates on the flat ``parameter`` dimension: tensor, layer, unit, index."""
    tensors, layers, units, index = [], [], [], []
    for name, shape in spec.selected:
        n = math.prod(shape)
        if ".parametrizations." in f".{name}":  # torch.nn.utils.parametrize: the layer is the parametrized module
            owner = f".{name}".split(".parametrizations.")[0][1:]
            layer = owner or name.split(".")[1]
        else:
            layer = name.rsplit(".", 1)[0] if "." in name else name
        idx = np.arange(n)
        tensors.append(np.repeat(np.array([name]), n))  # fixed-width strings: no Python object per element
        layers.append(np.repeat(np.array([layer]), n))
        if not len(shape):
            units.append(np.zeros(n, dtype=np.int64))
        elif name in spec.transposed:  # output channel = group * (out // groups) + index along dim 1
            ix = np.unravel_index(idx, tuple(shape))
            per_group_in = shape[0] // spec.transposed[name]
            units.append((ix[0] // per_group_in * shape[1] + ix[1]).astype(np.int64))
        else:  # the index along dim 0 of each element of tensor.flatten()
            units.append(np.unravel_index(idx, tuple(shape))[0].astype(np.int64) if n else idx)
        index.append(idx)
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    return {
        "tensor": cat(tensors, str),
        "layer": cat(layers, str),
        "unit": cat(units, np.int64),
        "index": cat(index, np.int64),
    }


def analyze(
    model: torch.nn.Module,
    data,
    trajectory,
    *,
    loss_fn=None,
    method: str = "adaptive",
    tol: float = 1e-3,
    max_splits: int = 32,
    batch_size: int | None = None,
    device=None,
    parameters=None,
    batchnorm: str = "eval",
    store=None,
    batched_points: bool = False,
    progress: bool = True,
    client=None,
):
    """Loss Change Allocation of every parameter at every iteration of a recorded training run.

    ``LCA[t, i] = (theta_{t+1} - theta_t)_i * average over the segment of dL/dtheta_i``, with ``L``
    the mean of ``loss_fn`` over all of ``data``; summed over parameters it is the loss change of
    iteration ``t`` up to the quadrature error, reported per iteration as ``residual``.

    Parameters
    ----------
    model: the ``nn.Module`` that was trained. It is never modified (evaluated with
        ``torch.func.functional_call``).
    data: ``(inputs, targets)`` tensors, a ``Dataset``, a ``DataLoader`` or an iterable of
        ``(inputs, targets)`` batches. The gradient is that of the mean loss over all of it.
    trajectory: T+1 snapshots (``state_dict``\\ s or dicts of parameters), a :class:`Trajectory`,
        a recorder from :func:`lca_notebook.record`, or a directory / list of checkpoint files.
    loss_fn: ``loss_fn(outputs, targets) -> scalar mean``; default cross-entropy. Any loss works.
    method: "adaptive" (default; Simpson refined until ``|residual| <= tol`` or ``max_splits``
        pieces), "simpson" (alias "rk4"), "trapezoid" or "first_order".
    batch_size: split the data into batches of this size (memory only; the result does not change, except
        with ``batchnorm="batch"``, whose statistics are those of each batch).
    device: where to compute (default: the model's device).
    parameters: glob patterns (``"fc1.*"``) restricting which parameters get LCA; the others'
        share goes into ``lca_rest``.
    batchnorm: "eval" (running statistics of each snapshot, interpolated along the segment, their
        share of the loss change in ``lca_rest``) or "batch" (batch statistics of each data batch).
    store: path of a zarr store to stream the result into (resumable); the result is opened lazily.
    batched_points: evaluate several quadrature points in one ``torch.func.vmap`` call (Simpson's end
        and midpoint together; adaptive's new points together). Same numbers to float rounding; faster
        where one point does not fill the device (small models on a GPU). Needs a vmap-able model.
    progress: show a tqdm progress bar.
    client: a ``dask.distributed.Client``: shard the iterations over its workers, each writing its rows of
        ``store`` (required); same result. See :mod:`lca_notebook.distributed`.

    Example
    -------
    >>> import torch, lca_notebook as lca
    >>> model = torch.nn.Linear(4, 3)
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> snaps = [{k: v.clone() for k, v in model.state_dict().items()}]
    >>> for _ in range(5):
    ...     opt.zero_grad(); torch.nn.functional.cross_entropy(model(x), y).backward(); opt.step()
    ...     snaps.append({k: v.clone() for k, v in model.state_dict().items()})
    >>> result = lca.analyze(model, (x, y), snaps, progress=False)
    >>> result.lca.shape
    (5, 15)
    >>> bool(abs(result.residual).max() < 1e-3)
    True
    """
    method = check_method(method)
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"batchnorm must be one of {BATCHNORM_MODES}, got {batchnorm!r}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    if not (isinstance(max_splits, int) and max_splits >= 1):
        raise ValueError(f"max_splits must be a positive int, got {max_splits!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if batched_points and batchnorm == "batch":
        raise ValueError("batched_points=True cannot be used with batchnorm='batch' (batch statistics update buffers in place, which vmap forbids)")
    traj = as_trajectory(trajectory)
    if len(traj) < 2:
        raise ValueError(f"the trajectory has {len(traj)} snapshot(s): LCA needs at least two (T+1 snapshots give T iterations)")
    loss_fn = loss_fn or F.cross_entropy
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    spec = build_spec(
        model, traj[0], parameters=parameters, batchnorm=batchnorm, where=traj.describe(0), last=traj[len(traj) - 1],
        subset=getattr(traj, "subset", False),
    )
    low = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)})
    if low:
        warnings.warn(
            f"the model computes in {' and '.join(low)}: its loss is rounded to 3-4 significant digits, so loss changes and "
            "residuals below that are rounding noise (and adaptive may never reach tol). For exact sums analyze a float32 "
            "copy on the same snapshots: lca.analyze(copy.deepcopy(model).float(), data, trajectory)",
            stacklevel=2,
        )
    batches = data_mod.batches(data, batch_size=batch_size, device=device)
    config = {
        "method": method,
        "tol": float(tol),
        "max_splits": int(max_splits),
        "loss_fn": getattr(loss_fn, "__qualname__", type(loss_fn).__name__),
        "batchnorm": batchnorm,
        "n_samples": data_mod.n_samples(batches),
        "model": type(model).__name__,
    }
    if client is not None:  # dask.distributed is imported on this path only
        from .distributed import run_sharded

        return run_sharded(client, model, batches, traj, spec, config, store=store, loss_fn=loss_fn, device=device, progress=progress, batched_points=batched_points)
    from .result import MemorySink  # result depends on nothing here; imported late to keep layering obvious

    if store is not None:
        from .store import StoreSink

        sink = StoreSink(store, spec=spec, traj=traj, batches=batches, config=config)
    else:
        sink = MemorySink(spec, len(traj), config, steps=traj.steps)
    with _fixed_function(model, batchnorm):
        evaluate = Evaluator(model, batches, loss_fn, spec, device, batchnorm)
        run(
            evaluate, SnapshotReader(traj, spec, device), sink, method=method, tol=tol, max_splits=max_splits,
            progress=progress, batched_points=batched_points,
        )
    result = sink.finish()
    warn_if_stuck(result, config)
    return result


def warn_if_stuck(result, config: dict, stacklevel: int = 3):
    """Warn when adaptive quadrature hit its piece limit with the residual still above ``tol``."""
    if config["method"] != "adaptive":
        return
    tol, max_splits = config["tol"], config["max_splits"]
    stuck = (np.abs(result.residual.values) > tol) & (result.splits.values >= max_splits)
    if stuck.any():
        warnings.warn(
            f"adaptive LCA hit max_splits={max_splits} with |residual| > tol={tol:g} on {int(stuck.sum())} of "
            f"{stuck.size} iterations (first: {int(np.flatnonzero(stuck)[0])}); raise max_splits or tol, or record "
            "snapshots more often",
            stacklevel=stacklevel,
        )


def run(evaluate, read, sink, *, method, tol, max_splits, progress=True, start=None, stop=None, batched_points=False):
    """Drive :func:`iterate` from the sink's first missing iteration and hand each row to the sink."""
    from tqdm.auto import tqdm

    start = sink.resume_from() if start is None else start
    stop = sink.n_iterations if stop is None else stop
    if start >= stop:
        return
    t0 = time.perf_counter()
    bar = tqdm(total=stop - start, desc="LCA", unit="it", disable=not progress, leave=False)
    done = start
    try:
        steps = iterate(evaluate, read, start, stop, method=method, tol=tol, max_splits=max_splits, batched_points=batched_points)
        sink.write_loss(start, next(steps))
        for row in steps:
            sink.write(row)
            done = row.t + 1
            bar.update(1)
    except BaseException as exc:
        sink.interrupted(done)
        if getattr(sink, "partial", None) is not None:
            exc.partial_result = sink.partial
        if done > start and hasattr(exc, "add_note"):
            exc.add_note(f"lca_notebook: iterations {start}..{done - 1} were computed before this error; {sink.where_kept()}")
        raise
    finally:
        bar.close()
    sink.seconds += time.perf_counter() - t0
    sink.evaluations += evaluate.evaluations
