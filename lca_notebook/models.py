"""Small models on scikit-learn's digits, and a training loop that keeps every snapshot.

Everything here is real and local: ``load_digits`` ships with scikit-learn (1,797 8x8 images, nothing
downloads). The demo, the example notebooks and the tests share these so a run takes seconds on a CPU.

>>> from lca_notebook import models
>>> x, y = models.digits_data()
>>> snaps = models.train(models.mlp(), (x, y), steps=5)
>>> len(snaps), tuple(x.shape)
(6, (1797, 64))
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

SPLITS = (None, "train", "test")


def digits_data(split: str | None = None, *, image: bool = False, seed: int = 0, test_fraction: float = 0.25):
    """scikit-learn's digits as ``(x, y)`` tensors: ``x`` float32 in [0, 1], ``y`` int64 class labels.

    ``image=False`` gives ``x`` as ``[N, 64]``, ``image=True`` as ``[N, 1, 8, 8]``. ``split`` is ``None``
    (all 1,797 digits), ``"train"`` or ``"test"``: a held-out split, stratified by class and fixed by ``seed``,
    with ``test_fraction`` of each class in ``"test"``.

    >>> x, y = digits_data("test", image=True)
    >>> tuple(x.shape[1:]), x.dtype, y.dtype
    ((1, 8, 8), torch.float32, torch.int64)
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("digits_data needs scikit-learn (its digits ship with it): pip install scikit-learn") from exc

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    digits = load_digits()
    x = digits.data.astype(np.float32) / 16.0  # pixel values are 0..16
    y = digits.target.astype(np.int64)
    if split is not None:
        rng = np.random.default_rng(seed)
        test = np.zeros(len(y), dtype=bool)
        for c in np.unique(y):  # stratified: every class is in both parts
            idx = rng.permutation(np.flatnonzero(y == c))
            test[idx[: round(test_fraction * len(idx))]] = True
        keep = test if split == "test" else ~test
        x, y = x[keep], y[keep]
    x_t = torch.from_numpy(x)
    if image:
        x_t = x_t.reshape(-1, 1, 8, 8)
    return x_t, torch.from_numpy(y)


def mlp(seed: int = 0, hidden: tuple[int, ...] = (128, 64)) -> nn.Module:
    """A ReLU MLP for flat digits, 64 -> 128 -> 64 -> 10 by default; layers ``fc1``, ``fc2``, ``fc3``.

    >>> sum(p.numel() for p in mlp().parameters())
    17226
    """
    torch.manual_seed(seed)
    sizes = (64, *hidden, 10)
    layers: dict[str, nn.Module] = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes), start=1):
        layers[f"fc{i}"] = nn.Linear(a, b)
        if i < len(sizes) - 1:
            layers[f"relu{i}"] = nn.ReLU()
    return _Sequential(layers)


def cnn(seed: int = 0, channels: tuple[int, int] = (8, 16)) -> nn.Module:
    """A small CNN for ``[N, 1, 8, 8]`` digits: ``conv1`` (1 -> 8, 3x3), ``conv2`` (8 -> 16, 3x3, then 2x2
    max-pool), ``fc`` (16*4*4 -> 10). Each conv output channel is one ``unit`` of the result.

    >>> cnn()(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    torch.manual_seed(seed)
    c1, c2 = channels
    return _Sequential(
        {
            "conv1": nn.Conv2d(1, c1, 3, padding=1),
            "relu1": nn.ReLU(),
            "conv2": nn.Conv2d(c1, c2, 3, padding=1),
            "relu2": nn.ReLU(),
            "pool": nn.MaxPool2d(2),
            "flatten": nn.Flatten(),
            "fc": nn.Linear(c2 * 4 * 4, 10),
        }
    )


class _Sequential(nn.Sequential):
    """``nn.Sequential`` with named children (so parameter names read ``fc1.weight``, not ``0.weight``)."""

    def __init__(self, layers: dict[str, nn.Module]):
        super().__init__(OrderedDict(layers))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``model.state_dict()`` (later training does not change it)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(
    model: nn.Module,
    data,
    *,
    steps: int = 200,
    lr: float = 0.05,
    momentum: float = 0.9,
    batch_size: int = 64,
    seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn=None,
) -> list[dict[str, torch.Tensor]]:
    """Train ``model`` in place with minibatch SGD and return its ``steps + 1`` snapshots (state_dict copies).

    ``data`` is ``(x, y)``. Minibatches are drawn from a seeded shuffle, epoch after epoch, so the same
    arguments give the same trajectory. The default optimizer is SGD with momentum; pass ``optimizer=``
    (built on ``model.parameters()``) to use another. ``loss_fn`` defaults to cross-entropy.

    >>> x, y = digits_data()
    >>> snaps = train(mlp(), (x, y), steps=3, lr=0.1)
    >>> len(snaps), bool((snaps[0]["fc1.weight"] != snaps[3]["fc1.weight"]).any())
    (4, True)
    """
    x, y = data
    if len(x) != len(y):
        raise ValueError(f"data: x has {len(x)} rows but y has {len(y)}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    loss_fn = loss_fn or nn.functional.cross_entropy
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    batch_size = min(batch_size, n)
    order, pos = torch.randperm(n, generator=gen), 0
    was_training = model.training
    model.train()
    snaps = [snapshot(model)]
    for _ in range(steps):
        if pos + batch_size > n:  # next epoch: reshuffle (the tail of the old one is skipped)
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
        snaps.append(snapshot(model))
    model.train(was_training)
    return snaps
