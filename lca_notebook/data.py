"""The data a loss is measured on, turned once into a list of ready batches.

LCA needs the gradient of the mean loss over ALL of the data at many points of the path, so the
data is read once, collated once and moved to the device once; every later evaluation only
iterates over the cached batches. Batches are a memory device: each is weighted by its size,
which is dim 0 of its first input tensor (the DataLoader convention).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset

#: Batch size used when the data comes as tensors or a Dataset and ``batch_size`` is not given.
DEFAULT_BATCH_SIZE = 2048
#: Most batches, and samples, read from data that has no ``len()`` (a generator, an iterator, a loader over an
#: ``IterableDataset``) before giving up: the data is held in memory whole, so it must be finite
#: (``itertools.cycle(loader)`` never ends). Raise them for larger data: ``lca_notebook.data.MAX_BATCHES = ...``.
MAX_BATCHES = 100_000
MAX_SAMPLES = 10_000_000


@dataclass
class Batch:
    args: tuple  # positional inputs of the model
    kwargs: dict  # keyword inputs of the model
    target: Any
    size: int

    def to(self, device) -> Batch:
        move = lambda x: _map_tensors(x, lambda t: t.to(device, non_blocking=True))
        return Batch(move(self.args), move(self.kwargs), move(self.target), self.size)


def _map_tensors(x, fn):
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_map_tensors(v, fn) for v in x)
    if isinstance(x, dict):
        return {k: _map_tensors(v, fn) for k, v in x.items()}
    return x


def tensors_in(x):
    """Every tensor inside ``x`` (a tensor, or lists, tuples and dicts of them), in order."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from tensors_in(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from tensors_in(v)


def _as_batch(item, where: str) -> Batch:
    if labels_inside(item):
        return _labelled_batch(item, where)
    if isinstance(item, dict) and {"inputs", "targets"} <= item.keys():
        item = (item["inputs"], item["targets"])
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise TypeError(
            f"{where} is a {type(item).__name__}; each batch must be a pair (inputs, targets). "
            "inputs may be a tensor, a tuple of tensors (positional arguments) or a dict (keyword arguments)."
        )
    inputs, target = item
    args: tuple
    kwargs: dict
    if isinstance(inputs, torch.Tensor):
        args, kwargs = (inputs,), {}
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(inputs), {}
    elif isinstance(inputs, dict):
        args, kwargs = (), dict(inputs)
    else:
        raise TypeError(
            f"{where}: inputs are a {type(inputs).__name__}; expected a tensor, a tuple or a dict of tensors"
        )
    first = next(tensors_in((args, kwargs)), None)
    if first is None or first.dim() == 0:
        raise TypeError(f"{where}: the inputs hold no batched tensor, so the batch size is unknown")
    return Batch(args, kwargs, target, int(first.shape[0]))


def _split(x, size: int):
    n = next(tensors_in(x)).shape[0]
    for start in range(0, n, size):
        yield _map_tensors(x, lambda t, start=start: t[start : start + size])


def batches(data, *, batch_size: int | None = None, device=None) -> list[Batch]:
    """Read ``data`` once into a list of :class:`Batch` on ``device``.

    ``data`` is a pair ``(inputs, targets)`` of tensors, a ``Dataset``, a ``DataLoader`` or any
    iterable of ``(inputs, targets)`` batches (inputs: a tensor, a tuple or a dict of tensors). A
    ``DataLoader`` is read in a fixed order with nothing dropped (``drop_last`` and shuffling are
    undone; its sampler still chooses which samples): LCA is about the mean loss over all of the data.

    >>> import torch
    >>> [b.size for b in batches((torch.zeros(5, 2), torch.zeros(5)), batch_size=2)]
    [2, 2, 1]
    """
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(data, (tuple, list)) and len(data) == 2 and any(type(v).__module__ == "numpy" for v in data):
        kinds = " and ".join(f"{type(v).__name__} {getattr(v, 'dtype', '')}".strip() for v in data)
        raise TypeError(
            f"data is a pair of {kinds}: give torch tensors in the model's dtype, e.g. "
            "(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)) for a float32 classifier"
        )
    if _is_whole_pair(data):
        rows = [t.shape[0] for t in tensors_in(data[0])], [t.shape[0] for t in tensors_in(data[1])]
        if len(set(rows[0] + rows[1])) > 1:
            raise ValueError(
                f"data: inputs have {rows[0][0]} rows but targets have {rows[1][0]}"
                if rows[0][0] != rows[1][0]
                else f"data: the input tensors have different numbers of rows: {rows[0]}"
            )
        size = batch_size or DEFAULT_BATCH_SIZE
        out = [
            _as_batch(pair, f"data rows {i * size}..")
            for i, pair in enumerate(zip(_split(data[0], size), _split(data[1], size), strict=False))
        ]
    else:
        rows = labelled_rows(data, batch_size)  # rows holding their labels (Hugging Face): collated here
        if rows is not None:
            data, batch_size = rows, None  # already batch_size rows a batch, each padded to its own length
        if isinstance(data, DataLoader):
            data = _whole_loader(data)
        elif isinstance(data, IterableDataset) or (isinstance(data, Dataset) and hasattr(data, "__len__")):
            # A Dataset yields samples, not batches: collate them (read one by one, a sample's first
            # dimension would be taken for its batch size).
            data = DataLoader(data, batch_size=batch_size or DEFAULT_BATCH_SIZE)
        elif isinstance(data, (itertools.cycle, itertools.repeat, itertools.count)):
            raise ValueError(
                f"data is an itertools.{type(data).__name__}, which never ends: LCA reads the data once and averages "
                "the loss over all of it, so data must be finite. Pass the loader (or list of batches) itself."
            )
        elif not hasattr(data, "__iter__"):
            raise TypeError(
                f"data is a {type(data).__name__}; give a pair (inputs, targets) of tensors, a Dataset, a DataLoader "
                "or an iterable of (inputs, targets) batches"
            )
        out = _read(data)
        if batch_size is not None and out:
            # Re-batch to the requested size (useful to bound memory with a loader of large batches): only where
            # every tensor has a row per sample, or an input the batch shares would be cut up with the samples.
            for i, b in enumerate(out):
                for key, x in (("input", b.kwargs or b.args), ("target", b.target)):
                    if (culprit := _rowless(x, b.size, key)) is not None:
                        raise ValueError(
                            f"cannot re-batch the data to batch_size={batch_size}: in data batch {i} of {b.size} "
                            f"samples, {culprit}, so it is not one row per sample (an input the batch shares, as a "
                            "context set or a mask is, would be cut into pieces). Pass the data without batch_size= "
                            "(its batches are used as they are), or give that tensor a row per sample."
                        )
            flat_in = _concat([b.args if not b.kwargs else b.kwargs for b in out])
            flat_target = _concat([b.target for b in out], "targets")
            out = [
                _as_batch((i, t), "data")
                for i, t in zip(_split(flat_in, batch_size), _split(flat_target, batch_size), strict=False)
            ]
    out = [b for b in out if b.size > 0]
    if not out:
        raise ValueError("data is empty: LCA needs at least one sample to measure the loss on")
    if device is not None:
        out = [b.to(device) for b in out]
    return out


def _read(data) -> list[Batch]:
    """Every batch of ``data``; past :data:`MAX_BATCHES` batches or :data:`MAX_SAMPLES` samples of data with no
    ``len()``, a clear error instead of reading (and holding) an endless stream."""
    try:
        len(data)
        bounded = False  # a length: finite by its own account
    except TypeError:
        bounded = True
    out: list[Batch] = []
    samples = 0
    for i, item in enumerate(data):
        out.append(_as_batch(item, f"data batch {i}"))
        samples += out[-1].size
        if bounded and (len(out) > MAX_BATCHES or samples > MAX_SAMPLES):
            raise ValueError(
                f"data has no len() and yielded more than {MAX_BATCHES:,} batches or {MAX_SAMPLES:,} samples "
                f"({len(out):,} batches, {samples:,} samples so far): it is probably endless (itertools.cycle, a "
                "streaming dataset without an end, a `while True` generator). LCA holds all of the data and averages "
                "the loss over it, so data must be finite: pass a finite loader or list of batches, or, for data that "
                "really is this large, raise lca_notebook.data.MAX_BATCHES / lca_notebook.data.MAX_SAMPLES."
            )
    return out


def _is_whole_pair(data) -> bool:
    """``(inputs, targets)`` of whole-data tensors, not a sequence of two batches: the target is a tensor
    or a dict of tensors (or a tuple of them after a tensor input), the inputs a tensor or a tuple/dict of tensors."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        return False
    inputs, target = data

    def tensors_only(x, containers):
        return isinstance(x, torch.Tensor) or (
            isinstance(x, containers)
            and len(x) > 0
            and all(isinstance(v, torch.Tensor) and v.dim() > 0 for v in (x.values() if isinstance(x, dict) else x))
        )

    if any(isinstance(v, dict) and {"inputs", "targets"} <= v.keys() for v in data):
        return False  # two batches given as {"inputs": ..., "targets": ...}
    if all(labels_inside(v) for v in data):
        return False  # two batches holding their labels
    if isinstance(inputs, torch.Tensor):  # a batch is never a bare tensor, so tuple targets are unambiguous here
        return inputs.dim() > 0 and tensors_only(target, (tuple, list, dict))
    return (isinstance(target, torch.Tensor) or tensors_only(target, dict)) and tensors_only(
        inputs, (tuple, list, dict)
    )


def _whole_loader(loader: DataLoader) -> DataLoader:
    """The same loader reading every sample its sampler yields, in a fixed order, nothing dropped: the mean
    loss does not depend on order, and a fixed order keeps a stored computation's data fingerprint stable."""
    from torch.utils.data import BatchSampler, IterableDataset, SequentialSampler

    if isinstance(loader.dataset, IterableDataset):  # no sampler to sort; only drop_last to undo
        if not loader.drop_last or loader.batch_size is None:
            return loader
        return DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            drop_last=False,
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
            worker_init_fn=loader.worker_init_fn,
        )
    if loader.batch_size is None:  # the user's own batching (a batch_sampler): kept, unless it drops samples
        sampler = loader.batch_sampler
        assert sampler is not None  # a loader without batch_size has one
        if isinstance(sampler, BatchSampler) and sampler.drop_last:
            indices, size = sorted(_drawn(sampler.sampler, loader.dataset)), sampler.batch_size
        else:
            # indices only: cheap to read twice (bounded: a sampler that never ends is refused when the data is read)
            drawn, again = ([list(b) for b in itertools.islice(sampler, MAX_BATCHES + 1)] for _ in range(2))
            if drawn == again or len(drawn) > MAX_BATCHES:
                return loader
            indices, size = sorted(i for b in drawn for i in b), max(len(b) for b in drawn)
            warnings.warn(
                f"the DataLoader's batch_sampler ({type(sampler).__name__}) gives other batches each time it is "
                f"read: analyze reads the same samples in a fixed order, in batches of {size} (the mean loss is "
                "the same), so that every point of the path sees the same data and a stored run can resume.",
                stacklevel=4,
            )
    elif isinstance(loader.sampler, SequentialSampler) and not loader.drop_last:
        return loader
    else:  # any finite sampler: the same samples, sorted (a shuffle reads the same)
        indices, size = sorted(_drawn(loader.sampler, loader.dataset)), loader.batch_size
    return DataLoader(
        loader.dataset,
        batch_sampler=BatchSampler(indices, size, drop_last=False),
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )


def _drawn(sampler, dataset) -> Iterable[int]:
    """The samples a sampler chooses: its own, unless it draws them at random each time (with replacement, or a
    random part of the data: a WeightedRandomSampler, a RandomSampler with replacement or num_samples), when
    the mean loss would change from one reading to the next: then every sample of the dataset once, said so."""
    from torch.utils.data import RandomSampler, WeightedRandomSampler

    random_draw = isinstance(sampler, WeightedRandomSampler) or (
        isinstance(sampler, RandomSampler) and (sampler.replacement or sampler.num_samples != len(dataset))
    )
    if not random_draw:
        return sampler
    warnings.warn(
        f"the DataLoader's {type(sampler).__name__} draws other samples each time it is read, so the mean loss "
        f"would change from one point of the path to the next: analyze reads every sample of its dataset once "
        f"instead ({len(dataset)} samples, unweighted). Pass a loader without that sampler to choose the data.",
        stacklevel=5,
    )
    return range(len(dataset))


def _concat(parts, key: str = "inputs"):
    first = parts[0]
    if isinstance(first, torch.Tensor):
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) > 1:
            raise ValueError(
                f"cannot re-batch the data to batch_size: the batches' {key} differ beyond their first dimension "
                f"({', '.join(str(list(s)) for s in sorted(shapes))}), as batches padded each to its own length do. "
                "Pass the loader without batch_size= (its batches are used as they are), or pad to one length."
            )
        return torch.cat(parts)
    if isinstance(first, (tuple, list)):
        return tuple(_concat([p[i] for p in parts], f"{key}[{i}]") for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts], repr(k)) for k in first}
    raise TypeError(f"cannot re-batch data holding {type(first).__name__}; pass batch_size=None")


def fingerprint(batch_list: list[Batch]) -> str:
    """A hash of the data's contents, so a stored computation is never resumed on other data."""
    h = hashlib.blake2b(digest_size=16)
    for b in batch_list:
        for t in tensors_in((b.args, b.kwargs, b.target)):
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def n_samples(batch_list: list[Batch]) -> int:
    return sum(b.size for b in batch_list)


def batch_weights(batch_list: list[Batch], loss_fn) -> list[float]:
    """Each batch's share of the full-data mean loss: its size, or for PyTorch's classification losses
    what their mean divides by (targets not ignored, times their class weights), so that ignored
    targets and class weights average over all of the data exactly as one batch would.

    >>> import torch
    >>> bs = batches((torch.zeros(3, 2), torch.tensor([0, -100, 1])), batch_size=2)
    >>> batch_weights(bs, torch.nn.functional.cross_entropy)
    [0.5, 0.5]
    """
    rows = [float(b.size) for b in batch_list]
    if isinstance(loss_fn, ModelLoss):  # the model's own loss: what it averages over
        rows = model_loss_counts(batch_list, loss_fn) or rows
    ignore, weight = _class_loss(loss_fn) or (None, None)
    targets_are_labels = all(
        isinstance(b.target, torch.Tensor) and not b.target.is_floating_point() for b in batch_list
    )
    unknown_average = ignore is None and not isinstance(loss_fn, ModelLoss) and len(batch_list) > 1
    if unknown_average and targets_are_labels and any(bool((b.target == -100).any()) for b in batch_list):
        warnings.warn(
            f"the targets hold -100 (labels a loss ignores) and loss_fn {loss_name(loss_fn)} is not one whose "
            "averaging lca_notebook knows, so batches are weighted by their number of rows: if it averages over "
            "the labels it does not ignore, the full-data loss is off. Pass the data as one batch (batch_size="
            "None with a single (inputs, labels) pair), pass torch.nn.functional.cross_entropy itself, or leave "
            "loss_fn out to use the model's own loss.",
            stacklevel=4,
        )
    if ignore is not None and len(batch_list) > 1 and targets_are_labels:
        try:
            counts = []
            for b in batch_list:
                kept = b.target[b.target != ignore]
                counts.append(float(kept.numel()) if weight is None else float(weight.to(kept.device)[kept].sum()))
        except (IndexError, RuntimeError):  # a class out of range: the loss itself will say so, naming it
            counts = []
        if sum(counts) > 0:
            rows = counts
    total = sum(rows)
    return [r / total for r in rows]


# -- what the loss must be, and clear errors for what torch reports obscurely -------------------------------------
def loss_name(loss_fn) -> str:
    """How messages name ``loss_fn``.

    >>> loss_name(torch.nn.CrossEntropyLoss(reduction="sum")), loss_name(F.cross_entropy)
    ("CrossEntropyLoss(reduction='sum')", 'cross_entropy')
    """
    if isinstance(loss_fn, torch.nn.Module):
        reduction = getattr(loss_fn, "reduction", None)
        return type(loss_fn).__name__ + (f"(reduction={reduction!r})" if isinstance(reduction, str) else "")
    if isinstance(loss_fn, functools.partial):
        kw = ", ".join(f"{k}={v!r}" for k, v in loss_fn.keywords.items())
        return f"partial({loss_name(loss_fn.func)}{', ' + kw if kw else ''})"
    return getattr(loss_fn, "__name__", type(loss_fn).__name__)


def check_loss_fn(loss_fn) -> None:
    """Refuse a loss that does not average over the samples of a batch: LCA measures the MEAN loss over all
    of the data and weights each batch by its size, so a summed loss would depend on ``batch_size``.

    >>> check_loss_fn(torch.nn.CrossEntropyLoss(reduction="sum"))
    Traceback (most recent call last):
    ValueError: loss_fn=CrossEntropyLoss(reduction='sum') adds the losses of a batch instead of averaging them, ...
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable (outputs, targets) -> mean loss, got a {type(loss_fn).__name__}")
    if isinstance(loss_fn, torch.nn.Module):
        reduction = getattr(loss_fn, "reduction", None)
    elif isinstance(loss_fn, functools.partial):
        reduction = loss_fn.keywords.get("reduction")
    else:
        return
    if reduction == "sum":
        raise ValueError(
            f"loss_fn={loss_name(loss_fn)} adds the losses of a batch instead of averaging them, so the loss (and "
            "every LCA) would grow with batch_size. LCA measures the mean loss over all of the data and combines "
            "batches by their size: use reduction='mean'."
        )
    if reduction == "none":
        raise ValueError(
            f"loss_fn={loss_name(loss_fn)} returns one loss per sample, not the batch's mean loss: use "
            "reduction='mean'."
        )


def describe_batch(batch_list: list[Batch], index: int) -> str:
    start = sum(b.size for b in batch_list[:index])
    return f"data batch {index} (samples {start}..{start + batch_list[index].size - 1})"


def _class_loss(loss_fn) -> tuple[int, torch.Tensor | None] | None:
    """The ignored target and class weights of PyTorch's class-index losses (cross entropy, NLL: the modules, the
    functions, and ``functools.partial`` of a function with keywords); None for any other loss.

    >>> _class_loss(functools.partial(F.cross_entropy, ignore_index=0))
    (0, None)
    """
    if isinstance(loss_fn, (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss)):
        return loss_fn.ignore_index, loss_fn.weight
    keywords: dict = {}
    while isinstance(loss_fn, functools.partial):
        if loss_fn.args:  # a positional weight or more: not a form this reads
            return None
        keywords = {**loss_fn.keywords, **keywords}  # the outer partial's keywords win, as calling it does
        loss_fn = loss_fn.func
    if loss_fn in (F.cross_entropy, F.nll_loss):
        return keywords.get("ignore_index", -100), keywords.get("weight")
    return None


def _ignore_index(loss_fn) -> int | None:
    """The ignored target of PyTorch's class-index losses (see :func:`_class_loss`); None for any other loss."""
    known = _class_loss(loss_fn)
    return None if known is None else known[0]


def _labels_out_of_range(out, batch_list: list[Batch], indices, ignore: int | None, loss_fn) -> ValueError | None:
    """A clear error for the first batch among ``indices`` whose class labels do not fit the outputs, else None."""
    if not (isinstance(out, torch.Tensor) and out.dim() >= 2 and out.is_floating_point()):
        return None
    classes = int(out.shape[1])
    for i in indices:
        t = batch_list[i].target
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            continue
        kept = t if ignore is None else t[t != ignore]
        if not kept.numel():
            continue
        lo, hi = int(kept.min()), int(kept.max())
        if lo >= 0 and hi < classes:
            continue
        if lo < 0:
            hint = f"labels must be class indices 0..{classes - 1}"
        elif lo >= 1 and hi == classes:
            hint = "labels numbered from 1? subtract 1 (y - 1)"
        else:
            hint = f"the model's last layer needs {hi + 1} outputs, or the labels are not class indices"
        ignored = f", {ignore} ignored" if ignore is not None else ""
        return ValueError(
            f"{describe_batch(batch_list, i)} has labels {lo}..{hi}, but the model gives {classes} outputs per sample "
            f"(classes 0..{classes - 1}{ignored}) for loss_fn {loss_name(loss_fn)}: {hint}"
        )
    return None


def check_labels(out, batch_list: list[Batch], loss_fn) -> None:
    """For PyTorch's class-index losses, every batch's labels fit the model's outputs: checked once, before
    the loss sees any (on a GPU, a label out of range is a device-side assert that ends the CUDA context)."""
    ignore = _ignore_index(loss_fn)
    if ignore is not None and (err := _labels_out_of_range(out, batch_list, range(len(batch_list)), ignore, loss_fn)):
        raise err


def explain_forward_error(exc: Exception, batch_list: list[Batch], index: int, model, tensors: dict):
    """A clear error for a failed first forward pass (data and model of different dtypes), else None."""
    batch = batch_list[index]
    model_dtypes = {t.dtype for t in tensors.values() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    data_dtypes = {t.dtype for t in tensors_in((batch.args, batch.kwargs)) if t.is_floating_point()}
    if model_dtypes and data_dtypes and not data_dtypes <= model_dtypes:
        name = lambda ds: " and ".join(sorted(str(d).removeprefix("torch.") for d in ds))
        want = sorted(model_dtypes, key=lambda d: torch.finfo(d).bits)[-1]
        return TypeError(
            f"{describe_batch(batch_list, index)} holds {name(data_dtypes)} inputs but the model "
            f"({type(model).__name__}) computes in {name(model_dtypes)}, and its forward failed "
            f"({type(exc).__name__}: {exc}). Give data of the model's dtype, e.g. "
            f"(x.to(torch.{str(want).removeprefix('torch.')}), y)."
        )
    if "Expected more than 1 value per channel when training" in str(exc):  # batchnorm="batch", a tiny batch
        return ValueError(
            f"{describe_batch(batch_list, index)} is too small for batch norm with batch statistics "
            f"(batchnorm='batch'): a channel needs more than one value ({exc}). Choose a batch_size that leaves no "
            f"batch of one sample ({batch.size} here), or batchnorm='eval' (the running statistics)."
        )
    return None


def explain_loss_error(exc: Exception, out, batch_list: list[Batch], index: int, loss_fn, model):
    """A clear error for a loss that failed at the first evaluation (the model returns a tuple or dict; labels
    out of range for the outputs), else None."""
    name = loss_name(loss_fn)
    if not isinstance(out, torch.Tensor) and isinstance(out, (tuple, list, dict)):
        if isinstance(out, dict):
            key = "logits" if "logits" in out else next(iter(out), "logits")
            what, pick = f"{type(out).__name__} with keys {list(out)[:6]}", f"out[{key!r}]"
        else:
            what, pick = f"{type(out).__name__} of {len(out)}", "out[0]"
        return TypeError(
            f"the model ({type(model).__name__}) returns a {what}, not a tensor, and loss_fn {name} failed on it "
            f"({type(exc).__name__}: {exc}). Pass a loss_fn that picks the output to score, e.g. "
            f"loss_fn=lambda out, y: torch.nn.functional.cross_entropy({pick}, y)"
        )
    if isinstance(exc, (IndexError, RuntimeError)):
        return _labels_out_of_range(out, batch_list, [index], _ignore_index(loss_fn), loss_fn)
    return None


def _rowless(x, n: int, key: str) -> str | None:
    """The first leaf of ``x`` that is not a tensor of ``n`` rows, in words (``key``: where ``x`` sits), or None."""
    if isinstance(x, torch.Tensor):
        if x.dim() > 0 and x.shape[0] == n:
            return None
        return f"{key} has shape {tuple(x.shape)}"
    if isinstance(x, (list, tuple)):
        found = (_rowless(v, n, f"{key}[{i}]") for i, v in enumerate(x))
    elif isinstance(x, dict):
        found = (_rowless(v, n, f"{key}[{k!r}]") for k, v in x.items())
    else:
        return f"{key} is a {type(x).__name__}"
    return next((f for f in found if f is not None), None)


def _first_nonfinite(x, key: str) -> tuple[str, tuple] | None:
    """The first leaf of ``x`` holding nan or inf: its name (``key``: where ``x`` sits) and the value's index."""
    if isinstance(x, torch.Tensor):
        if not (x.is_floating_point() or x.is_complex()) or bool(torch.isfinite(x).all()):
            return None
        at = tuple((~torch.isfinite(x)).nonzero()[0].tolist())
        return f"{key} holds {x[at].item()} at {at}", at
    if isinstance(x, (list, tuple)):
        found = (_first_nonfinite(v, f"{key}[{i}]") for i, v in enumerate(x))
    elif isinstance(x, dict):
        found = (_first_nonfinite(v, f"{key}[{k!r}]") for k, v in x.items())
    else:
        return None
    return next((f for f in found if f is not None), None)


def nonfinite_data(batch_list: list[Batch]) -> str | None:
    """Where the data holds nan or inf (the first such value), in words, or None.

    >>> x = torch.zeros(4, 2); x[3, 1] = float("nan")
    >>> nonfinite_data(batches((x, torch.zeros(4)), batch_size=2))
    'data batch 1 (samples 2..3): input[0] holds nan at (1, 1) (sample 3)'
    """
    for i, b in enumerate(batch_list):
        for key, x in (("input", b.args), ("input", b.kwargs), ("target", b.target)):
            if (found := _first_nonfinite(x, key)) is not None:
                words, at = found
                first = sum(c.size for c in batch_list[:i])
                sample = f" (sample {first + at[0]})" if at and _batched(x, b.size) else ""
                return f"{describe_batch(batch_list, i)}: {words}{sample}"
    return None


def _batched(x, n: int) -> bool:
    """Whether every leaf of ``x`` is a tensor with ``n`` rows (so halving it along dim 0 halves the batch)."""
    return _rowless(x, n, "") is None


def halves(batch: Batch, most: int | None = None) -> tuple[Batch, Batch, Batch] | None:
    """The batch's first ``most`` rows (all of them by default) and that part split in two halves along dim 0,
    or None where that is not a split of its samples (one sample; a tensor argument without a row per sample).

    >>> [h.size for h in halves(Batch((torch.zeros(5, 2),), {}, torch.zeros(5), 5))]
    [5, 3, 2]
    >>> [h.size for h in halves(Batch((torch.zeros(500, 2),), {}, torch.zeros(500), 500), most=64)]
    [64, 32, 32]
    """
    n = batch.size
    if n < 2 or not _batched((batch.args, batch.kwargs, batch.target), n):
        return None
    n = n if most is None else min(n, most)
    k = (n + 1) // 2

    def rows(sl: slice, size: int) -> Batch:
        part = lambda x: _map_tensors(x, lambda t: t[sl])
        return Batch(part(batch.args), part(batch.kwargs), part(batch.target), size)

    whole = batch if n == batch.size else rows(slice(0, n), n)
    return whole, rows(slice(0, k), k), rows(slice(k, n), n - k)


def check_averages(whole: float, parts: tuple[float, float], sizes: tuple[int, int], loss_fn, where: str) -> None:
    """Refuse a loss that adds over the samples of a batch: ``whole``, the loss of a batch, is the sum of its
    halves' losses ``parts`` rather than their size-weighted mean. A loss that is neither (a loss over pairs of
    samples, a model mixing samples) is left alone: only a clear sum is refused.

    >>> check_averages(3.0, (1.0, 2.0), (2, 2), F.cross_entropy, "data batch 0")
    Traceback (most recent call last):
    ValueError: loss_fn cross_entropy adds over the samples of a batch: ...
    >>> check_averages(1.5, (1.0, 2.0), (2, 2), F.cross_entropy, "data batch 0")
    """
    (a, b), (n1, n2) = parts, sizes
    total, mean = a + b, (n1 * a + n2 * b) / (n1 + n2)
    if not all(map(math.isfinite, (whole, a, b))) or abs(total - mean) <= 1e-2 * max(abs(total), abs(mean)):
        return  # the two readings cannot be told apart (a zero loss, say)
    if abs(whole - total) <= 1e-4 * abs(total) and abs(whole - mean) > 1e-2 * abs(whole):
        raise ValueError(
            f"loss_fn {loss_name(loss_fn)} adds over the samples of a batch: on {where} it gives "
            f"{whole:.6g}, the sum of its halves' losses ({a:.6g} + {b:.6g}), not their mean ({mean:.6g}). LCA "
            "measures the mean loss over all of the data and combines batches by their size, so a summed loss would "
            "make every number depend on batch_size: average instead (reduction='mean', or .mean() for .sum())."
        )


# -- batches whose labels are inside (Hugging Face), scored by the model's own loss --------------------------------
LABEL_KEYS = ("labels", "label")  # a collated batch has "labels"; a dataset's rows often "label"


def labels_inside(item) -> bool:
    """A batch or row that is a mapping with its labels among the model's keyword inputs (``{"input_ids": ...,
    "attention_mask": ..., "labels": ...}``, a ``BatchEncoding``), not a pair ``(inputs, targets)``."""
    return isinstance(item, Mapping) and "labels" in item and not {"inputs", "targets"} <= item.keys()


def _labelled_batch(item, where: str) -> Batch:
    """Every value a keyword input of the model, labels included (the model computes its own loss);
    the target is the labels, for :func:`batch_weights` and for a ``loss_fn`` given explicitly."""
    return _as_batch((dict(item), item["labels"]), where)


def _is_row(item) -> bool:
    """One sample with its label, as a ``datasets.Dataset`` or a list of rows gives it: a mapping whose label is
    a number or a 0-dim tensor (classification), or whose ``input_ids`` are one sequence (language modelling)."""
    if not isinstance(item, Mapping) or not any(k in item for k in LABEL_KEYS):
        return False
    label = item["labels"] if "labels" in item else item["label"]
    ids = item.get("input_ids")
    if isinstance(ids, torch.Tensor):
        return ids.dim() == 1
    if ids is not None:
        return isinstance(ids, (list, tuple)) and not (ids and isinstance(ids[0], (list, tuple)))
    return not isinstance(label, torch.Tensor) or label.dim() == 0


def labelled_rows(data, batch_size: int | None):
    """A ``datasets.Dataset`` (anything with ``column_names``, ``len()`` and rows by index) or a list of rows
    holding their labels, as a ``DataLoader`` collating them with :func:`collate_rows`; None for other data.

    >>> rows = [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [1, 2, 3]},
    ...         {"input_ids": [4, 5], "attention_mask": [1, 1], "labels": [4, 5]}]
    >>> b = batches(rows)[0]
    >>> b.kwargs["labels"].tolist(), b.kwargs["attention_mask"].tolist(), b.size
    ([[1, 2, 3], [4, 5, -100]], [[1, 1, 1], [1, 1, 0]], 2)
    """
    dataset_like = hasattr(data, "column_names") and hasattr(data, "__getitem__") and hasattr(data, "__len__")
    if not (isinstance(data, (list, tuple)) or dataset_like) or not len(data) or not _is_row(data[0]):
        return None
    return DataLoader(data, batch_size=batch_size or DEFAULT_BATCH_SIZE, collate_fn=collate_rows)


#: What a shorter sequence is padded with, by key; any other key is padded with 0.
PAD_VALUES = {"labels": -100, "attention_mask": 0}


def collate_rows(rows: list) -> dict:
    """Rows (mappings) into one batch: each key's values stacked; sequences of unequal length padded on the
    right (``labels`` with -100, which the loss ignores, the rest with 0), which needs an ``attention_mask``
    so the padding is not read. ``label`` becomes ``labels``, as Hugging Face's collators do.

    >>> collate_rows([{"x": [1.0, 2.0], "label": 0}, {"x": [3.0, 4.0], "label": 1}])["labels"]
    tensor([0, 1])
    """
    out: dict[str, Any] = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        name = "labels" if key == "label" and "labels" not in rows[0] else key
        if any(isinstance(v, (str, bytes)) for v in values):
            out[name] = values  # text the model may not take: select the model's columns to drop it
            continue
        tensors = [torch.as_tensor(v) for v in values]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            if "attention_mask" not in rows[0] or any(t.dim() != 1 for t in tensors):
                raise ValueError(
                    f"data rows have {key!r} of different shapes {sorted(shapes)[:3]} and no attention_mask to "
                    "mask padding: pad them (a tokenizer with padding=True, or a DataLoader with a collator such as "
                    "transformers.DataCollatorWithPadding)"
                )
            longest = max(len(t) for t in tensors)
            fill = PAD_VALUES.get(name, 0)
            tensors = [torch.cat([t, t.new_full((longest - len(t),), fill)]) for t in tensors]
        out[name] = torch.stack(tensors)
    return out


class ModelLoss:
    """The model's own mean loss, ``outputs.loss``: the default for batches whose labels are inside (a Hugging
    Face model given ``labels=`` computes it). Batches are weighted as that loss averages: by their labels that
    are not -100 (the ignored index), counting ``labels[..., shift:]`` for a causal language model, which
    predicts token t+1 from tokens up to t (``shift=1``); float labels (regression) by their number.

    >>> out = type("Out", (), {"loss": torch.tensor(0.5)})()
    >>> float(ModelLoss()(out, None))
    0.5
    """

    def __init__(self, shift: int = 0):
        self.shift = shift

    def __call__(self, outputs, targets):
        loss = getattr(outputs, "loss", None)
        if loss is None and isinstance(outputs, Mapping):
            loss = outputs.get("loss")
        if loss is None:
            raise TypeError(
                f"the model's output ({type(outputs).__name__}) has no .loss, so with labels inside the batches and "
                "no loss_fn there is no loss to use: give the model labels= it computes a loss from, or pass "
                "loss_fn=lambda out, labels: torch.nn.functional.cross_entropy(out.logits, labels)"
            )
        return loss

    def __repr__(self):
        return f"ModelLoss(shift={self.shift})"


def model_loss(model) -> ModelLoss:
    """:class:`ModelLoss` for ``model``: shifted for a Hugging Face causal language model (its ``loss_type`` is
    ``"ForCausalLM"``, or None, for which transformers falls back to the causal LM loss as well).

    >>> model_loss(torch.nn.Linear(2, 2)).shift
    0
    """
    loss_type = getattr(model, "loss_type", "")
    # transformers maps ForConditionalGeneration to the causal LM loss too; an encoder-decoder computes its own,
    # unshifted (its decoder inputs are the labels shifted right).
    generation = loss_type == "ForConditionalGeneration" and not getattr(
        getattr(model, "config", None), "is_encoder_decoder", False
    )
    return ModelLoss(shift=1 if loss_type in ("ForCausalLM", None) or generation else 0)


def model_loss_counts(batch_list: list[Batch], loss_fn: ModelLoss) -> list[float] | None:
    """What :class:`ModelLoss` averages over in each batch: its labels not -100 (shifted for a causal LM), or all
    of them for float labels; None where a batch's labels are not a tensor."""
    counts = []
    for b in batch_list:
        t = b.target
        if not isinstance(t, torch.Tensor):
            return None
        if t.is_floating_point():
            counts.append(float(t.numel()))
            continue
        if loss_fn.shift and t.dim() >= 2:  # a label per token; one label per sample (multiple choice) is not shifted
            t = t[..., loss_fn.shift :]
        counts.append(float((t != -100).sum()))
    return counts if sum(counts) > 0 else None
