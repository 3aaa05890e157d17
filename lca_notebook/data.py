"""The data a loss is measured on, turned once into a list of ready batches.

LCA needs the gradient of the mean loss over ALL of the data at many points of the path, so the
data is read once, collated once and moved to the device once; every later evaluation only
iterates over the cached batches. Batches are a memory device: each is weighted by its size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

#: Batch size used when the data comes as tensors or a Dataset and ``batch_size`` is not given.
DEFAULT_BATCH_SIZE = 2048


@dataclass
class Batch:
    args: tuple  # positional inputs of the model
    kwargs: dict  # keyword inputs of the model
    target: Any
    size: int

    def to(self, device) -> "Batch":
        move = lambda x: _map_tensors(x, lambda t: t.to(device, non_blocking=True))  # noqa: E731
        return Batch(move(self.args), move(self.kwargs), move(self.target), self.size)


def _map_tensors(x, fn):
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_map_tensors(v, fn) for v in x)
    if isinstance(x, dict):
        return {k: _map_tensors(v, fn) for k, v in x.items()}
    return x


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


def _as_batch(item, where: str) -> Batch:
    if isinstance(item, dict) and {"inputs", "targets"} <= item.keys():
        item = (item["inputs"], item["targets"])
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise TypeError(
            f"{where} is a {type(item).__name__}; each batch must be a pair (inputs, targets). "
            "inputs may be a tensor, a tuple of tensors (positional arguments) or a dict (keyword arguments)."
        )
    inputs, target = item
    if isinstance(inputs, torch.Tensor):
        args, kwargs = (inputs,), {}
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(inputs), {}
    elif isinstance(inputs, dict):
        args, kwargs = (), dict(inputs)
    else:
        raise TypeError(f"{where}: inputs are a {type(inputs).__name__}; expected a tensor, a tuple or a dict of tensors")
    first = next(_tensors((args, kwargs)), None)
    if first is None or first.dim() == 0:
        raise TypeError(f"{where}: the inputs hold no batched tensor, so the batch size is unknown")
    return Batch(args, kwargs, target, int(first.shape[0]))


def _split(x, size: int):
    n = next(_tensors(x)).shape[0]
    for start in range(0, n, size):
        yield _map_tensors(x, lambda t: t[start : start + size])


def batches(data, *, batch_size: int | None = None, device=None) -> list[Batch]:
    """Read ``data`` once into a list of :class:`Batch` on ``device``.

    ``data`` is a pair ``(inputs, targets)`` of tensors, a ``Dataset``, a ``DataLoader`` or any
    iterable of ``(inputs, targets)`` batches. A ``DataLoader`` with ``drop_last=True`` is read
    again without dropping: LCA is about the loss over all of the data.

    >>> import torch
    >>> [b.size for b in batches((torch.zeros(5, 2), torch.zeros(5)), batch_size=2)]
    [2, 2, 1]
    """
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor) and isinstance(data[1], torch.Tensor):
        if data[0].shape[0] != data[1].shape[0]:
            raise ValueError(f"data: inputs have {data[0].shape[0]} rows but targets have {data[1].shape[0]}")
        size = batch_size or DEFAULT_BATCH_SIZE
        out = [_as_batch(pair, f"data rows {i * size}..") for i, pair in enumerate(zip(_split(data[0], size), _split(data[1], size)))]
    else:
        if isinstance(data, DataLoader):
            if data.drop_last:
                data = DataLoader(data.dataset, batch_size=data.batch_size, collate_fn=data.collate_fn)
        elif isinstance(data, Dataset) and hasattr(data, "__len__"):
            data = DataLoader(data, batch_size=batch_size or DEFAULT_BATCH_SIZE)
        elif not hasattr(data, "__iter__"):
            raise TypeError(
                f"data is a {type(data).__name__}; give a pair (inputs, targets) of tensors, a Dataset, a DataLoader "
                "or an iterable of (inputs, targets) batches"
            )
        out = [_as_batch(item, f"data batch {i}") for i, item in enumerate(data)]
        if batch_size is not None and out:
            # Re-batch to the requested size (useful to bound memory with a loader of large batches).
            flat_in = _concat([b.args if not b.kwargs else b.kwargs for b in out])
            flat_target = _concat([b.target for b in out])
            out = [_as_batch((i, t), "data") for i, t in zip(_split(flat_in, batch_size), _split(flat_target, batch_size))]
    out = [b for b in out if b.size > 0]
    if not out:
        raise ValueError("data is empty: LCA needs at least one sample to measure the loss on")
    if device is not None:
        out = [b.to(device) for b in out]
    return out


def _concat(parts):
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, (tuple, list)):
        return tuple(_concat([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts]) for k in first}
    raise TypeError(f"cannot re-batch data holding {type(first).__name__}; pass batch_size=None")


def fingerprint(batch_list: list[Batch]) -> str:
    """A hash of the data's contents, so a stored computation is never resumed on other data."""
    h = hashlib.blake2b(digest_size=16)
    for b in batch_list:
        for t in _tensors((b.args, b.kwargs, b.target)):
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def n_samples(batch_list: list[Batch]) -> int:
    return sum(b.size for b in batch_list)
