"""Which tensors move along the path, where each sits in the flat vector, and the groups every sum uses.

Every tensor that moves along the path is packed into one flat vector ``theta`` (selected parameters
first, in ``named_parameters`` order), so a point of the path is one ``a + s * d``. The selected
parameters are the result's ``parameter`` dimension; :func:`parameter_coords` names each of them
(tensor, layer, unit, index) and :class:`Groups` turns those names into the group ids, labels and
sums at every granularity (unit, tensor, layer, total). A leaf: nothing here imports the package.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(3, 2))
>>> spec = build_spec(model, model.state_dict())
>>> spec.names, spec.n_selected
(['0.weight', '0.bias'], 8)
>>> g = Groups(parameter_coords(spec))
>>> g.labels("unit").tolist(), g.sum(torch.ones(8).numpy(), "unit").tolist()
(['0[0]', '0[1]'], [4.0, 4.0])
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd
import torch

#: Granularities a sum can be taken at, finest first.
GRANULARITIES = ("parameter", "unit", "tensor", "layer", "total")
#: The granularities coarser than a parameter: sums over groups of parameters.
COARSE = GRANULARITIES[1:]
#: What a result can keep (``analyze(keep=...)``): every parameter, or sums at a coarser granularity.
KEEPS = ("parameter", "unit", "tensor", "layer")
#: The dimension of each coarse granularity in a dataset (plural: ``unit``, ``tensor`` and ``layer`` are
#: coordinates on ``parameter``).
GROUP_DIMS = {"unit": "units", "tensor": "tensors", "layer": "layers", "total": "total"}


def check_keep(keep) -> str:
    """``keep`` itself when it is one of :data:`KEEPS` (``"auto"`` is resolved before, by the caller)."""
    if keep not in KEEPS:
        raise ValueError(
            f"keep must be one of {', '.join(repr(k) for k in (*KEEPS, 'auto'))}, got {keep!r}: 'parameter' keeps "
            "every parameter's LCA at every iteration (T x P float32), a coarser one keeps per-iteration sums at that "
            "granularity and coarser, exact helped/hurt counts per group and per-parameter totals over the run"
        )
    return keep


def kept(keep: str) -> tuple[str, ...]:
    """The granularities a result with ``keep`` has per iteration: ``keep`` and every coarser one."""
    return GRANULARITIES[GRANULARITIES.index(keep) :]


#: What ``batchnorm=`` accepts: running statistics of each snapshot, or each data batch's statistics.
BATCHNORM_MODES = ("eval", "batch")


@dataclass(frozen=True)
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
    #: The layer of the tensors the model itself holds (its class name): the root's path is empty.
    root: str = "model"

    @cached_property
    def numels(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def n_selected(self) -> int:
        return sum(self.numels[: self.n_selected_tensors])

    @property
    def selected(self) -> list[tuple[str, torch.Size]]:
        return list(zip(self.names, self.shapes, strict=True))[: self.n_selected_tensors]


def _select(model: torch.nn.Module, parameters) -> tuple[list[str], list[str], list[str]]:
    """Split the model's (deduplicated) parameters into selected, other trainable and frozen names."""
    named = list(model.named_parameters())  # remove_duplicate=True: a tied tensor counts once
    trainable = [n for n, p in named if p.requires_grad]
    frozen = [n for n, p in named if not p.requires_grad]
    if not trainable:
        raise ValueError(
            f"the model ({type(model).__name__}) has no trainable parameters (requires_grad=True): "
            "nothing to allocate the loss change to"
        )
    if parameters is None:
        return trainable, [], frozen
    patterns = [parameters] if isinstance(parameters, str) else list(parameters)
    names: dict[str, list[str]] = {}  # a tied tensor is selected by any of its names (out.weight as emb.weight)
    for alias, name in _aliases(model).items():
        names.setdefault(name, []).append(alias)
    selected = [n for n in trainable if any(fnmatch.fnmatchcase(a, p) for a in names.get(n, [n]) for p in patterns)]
    if not selected:
        raise ValueError(
            f"parameters={patterns!r} match none of the model's trainable parameters: {', '.join(trainable)}"
        )
    return selected, [n for n in trainable if n not in selected], frozen


def _aliases(model: torch.nn.Module) -> dict[str, str]:
    primary: dict[int, str] = {}
    out = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        out[name] = primary.setdefault(id(t), name)
    return out


def canonical(snapshot: Mapping, aliases: Mapping[str, str], where: str, expected=()) -> dict[str, torch.Tensor]:
    """The snapshot keyed by primary names (tied weights under one name), checked against the model."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
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
        elif all(k.startswith("_orig_mod.") for k in unknown):
            extra += (
                " (they start with '_orig_mod.': snapshots of a torch.compile'd model; strip that prefix, or analyze "
                "the compiled model itself)"
            )
    missing = [n for n in expected if n not in out]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        also = f"; it holds tensors the model does not have: {extra}" if unknown else ""
        raise ValueError(
            f"{where} has no tensor {missing[0]!r}{more}{also}. Every snapshot needs every tensor the path "
            "follows (trainable tensors, and buffers such as batch norm's running statistics): save "
            "model.state_dict(), or fill in tensors that never changed with {**model.state_dict(), **snapshot}"
        )
    if unknown:
        raise ValueError(f"{where} holds tensors the model does not have: {extra}")
    return out


def integer_snapshot_message(where: str, name: str, got: torch.dtype, want: torch.dtype) -> str:
    """Why a snapshot's integer (or bool) tensor for a floating tensor of the model is refused, and the fix."""
    got_s, want_s = str(got).removeprefix("torch."), str(want).removeprefix("torch.")
    return (
        f"{where}: tensor {name!r} is {got_s} but the model's is {want_s}: a snapshot of a floating tensor that "
        "holds integers was rounded (by .long(), .int() or a conversion before saving), so it is not a point "
        "the training passed through. Save each snapshot in the model's dtypes: "
        "{k: v.detach().clone() for k, v in model.state_dict().items()}, or record with lca.record"
    )


def build_spec(
    model, snapshot0, *, parameters=None, batchnorm="eval", where="snapshot 0", last=None, subset=False
) -> PathSpec:
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
                f"parameters={parameters!r} selects {unrecorded[0]!r}, which this trajectory did not record (it was "
                "recorded with parameters= of its own): select among the recorded tensors"
            )
        selected = [n for n in selected if n in present] or selected  # none recorded: the usual error below
        other = [n for n in other if n in present]
    snap = canonical(snapshot0, aliases, where, expected=selected + other)
    module_tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    for n, t in snap.items():
        own = module_tensors.get(n)
        if own is not None and own.is_floating_point() and not (t.is_floating_point() or t.is_complex()):
            raise TypeError(integer_snapshot_message(where, n, t.dtype, own.dtype))
    buffers = [n for n, b in model.named_buffers() if n in snap and b.is_floating_point()]
    transient = {f"{m}.{b}" if m else b for m, mod in model.named_modules() for b in mod._non_persistent_buffers_set}
    # Non-persistent buffers (rotary inv_freq...) are never in a state_dict: nothing to warn about.
    missing_buffers = [
        n for n, b in model.named_buffers() if b.is_floating_point() and n not in snap and n not in transient
    ]
    if missing_buffers and batchnorm == "eval" and not subset:  # a subset recorder checked them itself
        more = f" (and {len(missing_buffers) - 1} more buffers)" if len(missing_buffers) > 1 else ""
        warnings.warn(
            f"{where} has no {missing_buffers[0]!r}{more}: the model's current values are used at every snapshot. "
            "Record full state_dicts to use each snapshot's running statistics, or pass batchnorm='batch'.",
            stacklevel=3,
        )
    frozen = [n for n in frozen if n in snap and module_tensors[n].is_floating_point()]  # integer ones: fixed
    if last is not None and frozen:
        end = canonical(last, aliases, "the last snapshot")
        moving = [n for n in frozen if n in end and not torch.equal(end[n].detach().cpu(), snap[n].detach().cpu())]
    else:
        moving = []
    frozen = moving + [n for n in frozen if n not in moving]
    names = selected + other + buffers + frozen
    for n in names:
        if tuple(snap[n].shape) != tuple(module_tensors[n].shape):
            raise ValueError(
                f"{where}: tensor {n!r} has shape {tuple(snap[n].shape)} but the model's has "
                f"{tuple(module_tensors[n].shape)}"
            )
    dtypes = [module_tensors[n].dtype if module_tensors[n].is_floating_point() else torch.float32 for n in names]
    dtype = torch.float32  # at least: fp16/bf16 sums of many small d*g products lose the small ones
    for d in dtypes:
        dtype = torch.promote_types(dtype, d)
    # Frozen tensors that move between snapshots (gradual unfreezing) get a gradient, their share in lca_rest.
    with_grad = (
        [True] * (len(selected) + len(other)) + [batchnorm == "eval"] * len(buffers) + [n in moving for n in frozen]
    )
    fixed = {n for n in snap if n not in names}
    transposed = {}
    for n in selected:
        owner = model.get_submodule(n.rsplit(".", 1)[0]) if "." in n else model
        if isinstance(owner, torch.nn.modules.conv._ConvTransposeNd) and n.endswith("weight"):
            transposed[n] = owner.groups
    shapes = [module_tensors[n].shape for n in names]
    root = type(model).__name__
    return PathSpec(names, shapes, dtypes, with_grad, len(selected), dtype, aliases, fixed, transposed, root)


#: The tensors of layer k of PyTorch's LSTM, GRU and RNN (``weight_ih_l0``, ``bias_hh_l1_reverse``, ...): each
#: layer of a stack is a layer of its own, so a unit is one row of its gates, not rows of every layer merged.
_RNN_LAYER = re.compile(r"(?:weight|bias)_(?:ih|hh|hr)_(l\d+(?:_reverse)?)")


def _tensor_layers(spec: PathSpec) -> tuple[list[str], list[str], list[int]]:
    """Each selected tensor's name, layer and number of parameters."""
    tensors, layers, sizes = [], [], []
    for name, shape in spec.selected:
        if ".parametrizations." in f".{name}":  # torch.nn.utils.parametrize: the layer is the parametrized module
            owner = f".{name}".split(".parametrizations.")[0][1:]
            layer = owner or spec.root  # a bare parametrized module: the model itself
        else:  # the owning module's path; the model's own tensors (a bare nn.Linear's) share one layer
            layer = name.rsplit(".", 1)[0] if "." in name else spec.root
            # layer k of an RNN: "rnn.l0", "rnn.l1_reverse"
            if stacked := _RNN_LAYER.fullmatch(name.rsplit(".", 1)[-1]):
                layer = f"{layer}.{stacked[1]}"
        tensors.append(name)
        layers.append(layer)
        sizes.append(math.prod(shape))
    return tensors, layers, sizes


def _transposed_units(spec: PathSpec, name: str, shape, index: np.ndarray) -> np.ndarray:
    """A transposed convolution's unit (output channel) of its elements ``index``: group * (out // groups) +
    the index along dim 1 (its weight is (in, out // groups, ...))."""
    ix = np.unravel_index(index, tuple(shape))
    return ix[0] // (shape[0] // spec.transposed[name]) * shape[1] + ix[1]


def parameter_coords(spec: PathSpec) -> dict[str, np.ndarray | pd.Categorical]:
    """Coordinates on the flat ``parameter`` dimension: tensor and layer as :func:`names` (small codes into the
    names), unit and index as int64, each made once at its full length and filled tensor by tensor (10M
    parameters: 170 MB, where names as fixed-width strings took 360 MB more and a second to write)."""
    tensors, layers, sizes = _tensor_layers(spec)
    p = sum(sizes)
    layer_names = list(dict.fromkeys(layers))
    out = {
        "tensor": _coded(range(len(tensors)), sizes, tensors),
        "layer": _coded([layer_names.index(x) for x in layers], sizes, layer_names),
        "unit": np.empty(p, np.int64),
        "index": np.empty(p, np.int64),
    }
    start = 0
    for (name, shape), n in zip(spec.selected, sizes, strict=True):
        at = slice(start, start + n)
        start += n
        if not n:
            continue
        # as (rows, rest): filled by broadcasting a row and a column, no temporary of the tensor's length
        rows = shape[0] if len(shape) else 1
        index, unit = out["index"][at].reshape(rows, -1), out["unit"][at]
        index[:] = np.arange(index.shape[1])
        index += np.arange(0, n, index.shape[1])[:, None]
        if name in spec.transposed:
            unit[:] = _transposed_units(spec, name, shape, out["index"][at])
        else:  # the index along dim 0 of each element of tensor.flatten()
            unit.reshape(rows, -1)[:] = np.arange(rows)[:, None]
    return out


def coords_at(spec: PathSpec, at: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`parameter_coords` of the parameters ``at`` only (names as str), without making the full arrays.

    >>> import torch
    >>> spec = build_spec(torch.nn.Linear(3, 2), torch.nn.Linear(3, 2).state_dict())
    >>> at = coords_at(spec, np.array([0, 4, 6]))
    >>> at["tensor"].tolist(), at["layer"].tolist(), at["unit"].tolist(), at["index"].tolist()
    (['weight', 'weight', 'bias'], ['Linear', 'Linear', 'Linear'], [0, 1, 0], [0, 4, 0])
    """
    tensors, layers, sizes = _tensor_layers(spec)
    at = np.asarray(at, dtype=np.int64)
    ends = np.cumsum(sizes, dtype=np.int64)
    which = np.searchsorted(ends, at, side="right")
    index = at - (ends - np.asarray(sizes, dtype=np.int64))[which]
    unit = np.zeros(len(at), np.int64)
    for k in np.unique(which).tolist():
        name, shape = spec.selected[k]
        mine = which == k
        if name in spec.transposed:
            unit[mine] = _transposed_units(spec, name, shape, index[mine])
        elif len(shape):
            unit[mine] = index[mine] // max(1, math.prod(shape[1:]))
    names = np.asarray(tensors) if tensors else np.zeros(0, str)
    owners = np.asarray(layers) if layers else np.zeros(0, str)
    return {"tensor": names[which], "layer": owners[which], "unit": unit, "index": index}


def fixed_width(names: pd.Categorical, at=slice(None)) -> np.ndarray:
    """``names[at]`` as numpy's fixed-width str (``np.asarray`` gives Python objects, ten times slower)."""
    return np.asarray(names.categories, dtype=object).astype(str)[names.codes[at]]


#: The coordinates on ``parameter``; those in ``NAMED`` hold names (kept as :func:`names`), the others int64.
PER_PARAMETER = ("tensor", "layer", "unit", "index")
NAMED = ("tensor", "layer")


def _code_dtype(n: int) -> type[np.signedinteger]:
    return np.int8 if n < 2**7 else np.int16 if n < 2**15 else np.int32  # what pandas would pick: no copy


def _coded(codes, repeats, categories) -> pd.Categorical:
    """The categorical whose element ``i`` of ``codes`` repeats ``repeats[i]`` times."""
    codes = np.repeat(np.asarray(codes, dtype=_code_dtype(len(categories))), repeats)
    return pd.Categorical.from_codes(codes, categories=list(categories))


def names(values) -> pd.Categorical:
    """A per-parameter name coordinate as results keep it in memory: a :class:`pandas.Categorical`, one small
    integer code per parameter into the names (xarray keeps it as it is). ``values``: one already, a
    categorical xarray coordinate, or any array of names (coded here once, names in order of appearance)."""
    if isinstance(values, pd.Categorical):
        return values
    if isinstance(getattr(values, "dtype", None), pd.CategoricalDtype):  # an xarray coordinate or a Series
        return pd.Categorical(values.to_index() if hasattr(values, "to_index") else values)
    ids, labels, _ = _in_model_order(np.asarray(values).astype(str).reshape(-1))
    return _coded(ids, 1, labels)


def check_granularity(by: str) -> str:
    if by not in GRANULARITIES:
        raise ValueError(f"by must be one of {GRANULARITIES}, got {by!r}")
    return by


class Groups:
    """The groups of parameters at every granularity, from the per-parameter coordinates.

    ``ids(by)`` gives each parameter's group, ``labels(by)`` the groups in model order (a unit is
    ``"layer[unit]"``), ``sizes(by)`` their parameter counts and :meth:`sums` the sums of a
    ``(..., parameter)`` block at several granularities in one pass.

    >>> import numpy as np
    >>> g = Groups({"tensor": np.array(["a.w", "a.w", "a.b", "b.w"]), "layer": np.array(["a", "a", "a", "b"]),
    ...             "unit": np.array([0, 1, 0, 0]), "index": np.array([0, 1, 0, 0])})
    >>> g.labels("layer").tolist(), g.sizes("unit").tolist()
    (['a', 'b'], [2, 1, 1])
    >>> {by: s.tolist() for by, s in g.sums(np.arange(4.0), ("tensor", "total")).items()}
    {'tensor': [1.0, 2.0, 3.0], 'total': [6.0]}
    """

    def __init__(self, coords: Mapping | None = None, *, spec: PathSpec | None = None):
        """From the per-parameter ``coords``, or from a path's ``spec``: then they are worked out only where the
        groups need them (at the start of each run) and made whole only when :attr:`coords` is read."""
        self._coords: dict | None = None
        self._spec = spec
        if coords is not None:
            self.coords = coords
        elif spec is None:
            raise TypeError("Groups needs the per-parameter coords or the path's spec")
        self.n_parameters = len(self.coords["tensor"]) if spec is None else spec.n_selected

    @property
    def coords(self) -> dict:
        """The coordinates of every parameter (:func:`parameter_coords`; made on first use when given a spec)."""
        if self._coords is None:
            assert self._spec is not None
            self.coords = parameter_coords(self._spec)
        assert self._coords is not None
        return self._coords

    @coords.setter
    def coords(self, coords: Mapping):
        self._coords = {k: names(coords[k]) if k in NAMED else np.asarray(coords[k]) for k in PER_PARAMETER}

    def _at(self, key: str, at: np.ndarray) -> np.ndarray:
        """The coordinate ``key`` of the parameters ``at``, as plain numpy (names as str)."""
        if self._coords is None and self._spec is not None:
            return coords_at(self._spec, at)[key]
        c = self.coords[key]
        return fixed_width(c, at) if isinstance(c, pd.Categorical) else c[at]

    @classmethod
    def of(cls, spec: PathSpec, coords: Mapping[str, np.ndarray] | None = None) -> Groups:
        """The groups of a path's selected parameters (``coords``: its :func:`parameter_coords`; without them,
        worked out where needed: see :class:`Groups`), the runs worked out from the tensors' shapes rather than
        by comparing every parameter's coordinates with the next one's (10M parameters: 5 ms against 75)."""
        groups = cls(coords) if coords is not None else cls(spec=spec)
        starts, offset = [np.zeros(0, np.int64)], 0
        for (name, shape), n in zip(spec.selected, spec.numels, strict=False):
            if n and name in spec.transposed:  # a unit's elements are not contiguous: compare its units
                unit = groups._at("unit", np.arange(offset, offset + n))
                starts.append(offset + np.flatnonzero(np.r_[True, unit[1:] != unit[:-1]]))
            elif n:  # unit u is row u of the tensor (a 0-d tensor: one unit)
                rows = shape[0] if len(shape) else 1
                starts.append(offset + np.arange(rows, dtype=np.int64) * (n // rows))
            offset += n
        runs = np.concatenate(starts)
        groups.__dict__["_runs"] = (runs, np.diff(np.append(runs, offset)))  # what the cached property would find
        return groups

    def ids(self, by: str) -> np.ndarray:
        """Group id of each parameter (0 .. n_groups - 1, in model order)."""
        by = check_granularity(by)
        if by == "parameter":
            return np.arange(self.n_parameters)
        return np.repeat(self._table[by][0], self._runs[1])  # one int64 per parameter: made only when asked for

    def labels(self, by: str) -> np.ndarray:
        """Group labels in model order (``"total"`` for the one total group)."""
        if check_granularity(by) == "parameter":
            return np.arange(self.n_parameters)
        return self._table[by][1]

    def unit_coords(self) -> dict[str, np.ndarray]:
        """Per unit: its ``layer`` and ``unit_index`` (index along dim 0 of its tensor)."""
        return self._table["unit"][2]

    def sizes(self, by: str) -> np.ndarray:
        """Number of parameters in each group."""
        if check_granularity(by) == "parameter":
            return np.ones(self.n_parameters, np.int64)
        _, lengths = self._runs
        n = len(self.labels(by))
        return np.bincount(self._table[by][0], weights=lengths, minlength=n).astype(np.int64)

    def layer_of(self, by: str) -> np.ndarray:
        """The layer id (into ``labels("layer")``) of each group at a granularity."""
        if check_granularity(by) == "parameter":
            return self.ids("layer")
        out = np.zeros(len(self.labels(by)), dtype=np.int64)
        out[self._table[by][0]] = self._table["layer"][0]
        return out

    def columns(self, by: str) -> list[slice | np.ndarray]:
        """Each group's parameters at a coarse granularity: a slice where they are contiguous, else their indices
        (from the runs: no pass over every parameter)."""
        if by not in COARSE:
            raise ValueError(f"columns are for the coarse granularities {COARSE}, got {by!r}")
        starts, lengths = self._runs
        run_ids = self._table[by][0]
        order = np.argsort(run_ids, kind="stable")
        bounds = np.searchsorted(run_ids[order], np.arange(len(self.labels(by)) + 1))
        out: list[slice | np.ndarray] = []
        for a, b in itertools.pairwise(bounds.tolist()):
            runs = order[a:b]
            if np.all(np.diff(runs) == 1):  # every group is made of runs: never empty
                out.append(slice(int(starts[runs[0]]), int(starts[runs[-1]] + lengths[runs[-1]])))
            else:
                out.append(np.concatenate([np.arange(starts[r], starts[r] + lengths[r]) for r in runs]))
        return out

    @cached_property
    def _runs(self) -> tuple[np.ndarray, np.ndarray]:
        """Runs of consecutive parameters sharing tensor, layer and unit (a tensor's elements are contiguous): every
        group is a union of runs, so labels are worked out once per run, not once per parameter (10M parameters:
        seconds), and one pass over a block (sum each run) serves unit, tensor, layer and total alike. Starts and
        lengths."""
        c, p = self.coords, self.n_parameters
        change = np.zeros(p, dtype=bool)
        change[:1] = True
        for k in ("tensor", "layer", "unit"):
            v = c[k]
            v = v.codes if isinstance(v, pd.Categorical) else v
            np.logical_or(change[1:], v[1:] != v[:-1], out=change[1:])
        starts = np.flatnonzero(change)
        return starts, np.diff(np.append(starts, p))

    @cached_property
    def _table(self) -> dict[str, tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
        """Per coarse granularity: the group id of each run, the labels, per-group extras."""
        starts, _ = self._runs
        table: dict[str, tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]] = {
            "total": (np.zeros(len(starts), dtype=np.int64), np.array(["total"]), {})
        }
        for key in NAMED:
            ids, labels, _ = _in_model_order(self._at(key, starts))
            table[key] = (ids, labels, {})
        layer, unit = self._at("layer", starts), self._at("unit", starts)
        unit_key = np.char.add(np.char.add(layer.astype(str), "["), np.char.add(unit.astype(str), "]"))
        ids, labels, first = _in_model_order(unit_key)
        table["unit"] = (ids, labels, {"layer": layer[first], "unit_index": unit[first]})
        return table

    @cached_property
    def _reducers(self) -> dict[str, tuple[np.ndarray, np.ndarray] | None]:
        """Per coarse granularity, how run sums become group sums (None: each group is one run, in order)."""
        reducers: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
        for by in COARSE:
            run_ids = self._table[by][0]
            if np.array_equal(run_ids, np.arange(len(self.labels(by)))):
                reducers[by] = None
            else:
                perm = np.argsort(run_ids, kind="stable")
                reducers[by] = (perm, np.searchsorted(run_ids[perm], np.arange(len(self.labels(by)))))
        return reducers

    @cached_property
    def _pieces(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Runs cut at every multiple of :data:`_PIECE`, so each piece is short enough to count a boolean block in
        int16 (a sixth of the time of a count in float64, exact) and every block of :meth:`blocks` ends on a piece:
        piece starts, and the first piece of each run (None: pieces are the runs)."""
        starts, _ = self._runs
        pieces = np.union1d(starts, np.arange(0, self.n_parameters, _PIECE))
        if len(pieces) == len(starts):
            return starts, None
        return pieces, np.searchsorted(pieces, starts)

    @cached_property
    def blocks(self) -> list[tuple[slice, slice, np.ndarray]]:
        """The parameters in blocks of at most :data:`BLOCK` (cut at pieces), for one pass over a row that stays
        in the CPU's cache: each block's parameters, its pieces, and their starts within the block."""
        pieces, _ = self._pieces
        edges = np.searchsorted(pieces, np.arange(0, self.n_parameters, BLOCK))
        out = []
        for a, b in zip(edges, [*edges[1:], len(pieces)], strict=True):
            start, stop = int(pieces[a]), int(pieces[b]) if b < len(pieces) else self.n_parameters
            out.append((slice(start, stop), slice(int(a), int(b)), pieces[a:b] - start))
        return out

    @property
    def n_pieces(self) -> int:
        return len(self._pieces[0])

    def from_pieces(self, pieces: np.ndarray, bys: Iterable[str]) -> dict[str, np.ndarray]:
        """Sums over the pieces of :meth:`blocks` (``(..., n_pieces)``) into ``(..., groups)`` at coarse
        granularities (int64 for integer pieces)."""
        first = self._pieces[1]
        if pieces.dtype.kind in "iub":
            pieces = pieces.astype(np.int64)
        return self._from_runs(pieces if first is None else np.add.reduceat(pieces, first, axis=-1), bys)

    def _from_runs(self, runs: np.ndarray, bys: Iterable[str]) -> dict[str, np.ndarray]:
        out = {}
        for by in bys:
            r = self._reducers[by]
            out[by] = runs if r is None else np.add.reduceat(runs[..., r[0]], r[1], axis=-1)
        return out

    def sums(self, block: np.ndarray, bys: Iterable[str]) -> dict[str, np.ndarray]:
        """Sum a ``(..., parameter)`` array into ``(..., groups)`` at several granularities, reading the block
        once: in float64, or int64 counts of a boolean block."""
        block = np.asarray(block)
        bys = [check_granularity(by) for by in bys]
        out = {}
        if "parameter" in bys:
            out["parameter"] = block.astype(np.int64 if block.dtype == bool else np.float64)
        coarse = [by for by in bys if by != "parameter"]
        if not coarse:
            return out
        if block.shape[-1] == 0:
            dtype = np.int64 if block.dtype == bool else np.float64
            return out | {by: np.zeros((*block.shape[:-1], len(self.labels(by))), dtype) for by in coarse}
        if block.dtype == bool:
            counts = np.add.reduceat(block.view(np.int8), self._pieces[0], axis=-1, dtype=np.int16)
            return out | self.from_pieces(counts, coarse)
        return out | self._from_runs(np.add.reduceat(block, self._runs[0], axis=-1, dtype=np.float64), coarse)

    def sum(self, block: np.ndarray, by: str) -> np.ndarray:
        """Sum a ``(..., parameter)`` array into ``(..., groups)`` (float64; int64 counts of a boolean block)."""
        return self.sums(block, (by,))[by]


#: Longest piece of a run counted in int16 (below 2**15).
_PIECE = 16384
#: Parameters per block of :meth:`Groups.blocks` and of the engine's arithmetic (a multiple of ``_PIECE``): the
#: five vectors one block of an iteration touches stay in a 32 MiB L3 cache (measured on a 10M-parameter MLP:
#: 8 to 32 pieces are equally fast, 4 and a whole vector at once a third slower).
BLOCK = 16 * _PIECE


def _in_model_order(keys: np.ndarray):
    """(group id per element, labels, first element of each group), groups in order of first appearance."""
    labels, first, ids = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first)  # model order, not alphabetical
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[ids], labels[order], first[order]
