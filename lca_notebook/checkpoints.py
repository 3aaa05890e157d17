"""Trajectories from checkpoint files: one ``torch.save`` or safetensors file per snapshot, or one Hugging Face
``checkpoint-<step>`` folder per snapshot, loaded when needed.

Checkpoint files are untrusted input: they are read with ``torch.load(weights_only=True)`` only, which
unpickles tensors and plain containers and refuses anything that could run code; safetensors files hold
tensors only.
"""

from __future__ import annotations

import itertools
import os
import pickle
import re
from collections.abc import Mapping

import torch

from .trajectory import Trajectory

#: File name endings taken from a directory of checkpoints.
SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar", ".safetensors")
#: The model's weights in a Hugging Face checkpoint folder (``Trainer``'s ``checkpoint-<step>``), whole or in
#: shards (``model-00001-of-00002.safetensors``), safetensors before ``pytorch_model*.bin``; the folder's other
#: files (the optimizer's state, ``training_args.bin``, a pickle of Python objects) are not read.
WEIGHTS = (re.compile(r"model(-\d+-of-\d+)?\.safetensors"), re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin"))
#: Keys under which a checkpoint dict usually holds the model's state_dict, tried in this order.
STATE_KEYS = ("model", "state_dict", "model_state_dict", "net")


def _name(path) -> str:
    """The name that orders a checkpoint: its file's, or its folder's where the file's holds no number
    (``checkpoint-500/model.safetensors``)."""
    path = os.fspath(path)
    name = os.path.splitext(os.path.basename(path))[0]
    return name if re.search(r"\d", name) else os.path.basename(os.path.dirname(path)) or name


def natural_key(path) -> list:
    """Sort key that orders numbers in names by value: ``step_2`` before ``step_10``.

    >>> sorted(["step_10.pt", "step_2.pt", "step_1.pt"], key=natural_key)
    ['step_1.pt', 'step_2.pt', 'step_10.pt']
    """
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", _name(path)) if part]


def _step_of(path) -> int | None:
    numbers = re.findall(r"\d+", _name(path))
    return int(numbers[-1]) if numbers else None


def weight_files(folder) -> list[str]:
    """The files of a Hugging Face checkpoint folder that hold the model's weights (see :data:`WEIGHTS`), or []."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    for pattern in WEIGHTS:
        found = [os.path.join(folder, n) for n in names if pattern.fullmatch(n)]
        if found:
            return found
    return []


def check_given_order(paths):
    """Refuse a list of numbered checkpoint files that is not in the order of its numbers (``glob`` and
    ``os.listdir`` give such lists): analysed in that order, the loss changes would belong to no real step."""
    names = [os.path.basename(os.fspath(p)) for p in paths]
    if all(_step_of(p) is not None for p in paths) and names != sorted(names, key=natural_key):
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise ValueError(
            f"the checkpoint files are not in the order of the numbers in their names ({shown}), so they are probably "
            "not in training order. Pass them sorted: sorted(files, key=lca_notebook.checkpoints.natural_key), "
            "or the directory itself; to keep this order, pass lca_notebook.checkpoints.CheckpointFiles(files, "
            "sort=False)."
        )


class CheckpointFiles(Trajectory):
    """Snapshots in checkpoint files, one file per snapshot, loaded when needed.

    Each file holds a ``state_dict`` or a dict with one under "model", "state_dict",
    "model_state_dict" or "net" (Lightning's ``.ckpt`` included). Files are put in natural order
    of their names (``sort=False`` keeps the given order); ``steps`` is the last number in each name
    when every name has one and they increase.

    >>> import torch, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> for s in (10, 2, 0):
    ...     torch.save({"model": {"w": torch.full((2,), float(s))}, "epoch": s}, os.path.join(d, f"step_{s}.pt"))
    >>> traj = CheckpointFiles([os.path.join(d, f) for f in os.listdir(d)])
    >>> traj.steps, traj[2]["w"].tolist()
    ([0, 2, 10], [10.0, 10.0])
    """

    def __init__(self, paths, *, sort: bool = True):
        paths = [os.fspath(p) for p in paths]
        if not paths:
            raise ValueError("no checkpoint files given")
        self.paths = sorted(paths, key=natural_key) if sort else paths
        for p in self.paths:
            if not (os.path.isfile(p) or weight_files(p)):
                raise FileNotFoundError(f"checkpoint file {p!r} does not exist")
        steps = [_step_of(p) for p in self.paths]
        numbered = [s for s in steps if s is not None]
        ok = len(numbered) == len(steps) and all(a < b for a, b in itertools.pairwise(numbered))
        self.steps = numbered if ok else None

    def __len__(self):
        return len(self.paths)

    def describe(self, k: int) -> str:
        return f"checkpoint file {self.paths[k]!r} (snapshot {k})"

    def load(self, k: int):
        return load_checkpoint(self.paths[k])


def load_checkpoint(path) -> dict:
    """The ``state_dict`` in one checkpoint file (or Hugging Face checkpoint folder), loaded safely
    (``weights_only=True``, or safetensors) onto the CPU."""
    path = os.fspath(path)
    if os.path.isdir(path):  # a Hugging Face checkpoint folder: its weight files, shards merged
        state: dict = {}
        for shard in weight_files(path):
            state.update(load_checkpoint(shard))
        return state
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ImportError(f"{path!r} is a safetensors file: reading it needs pip install safetensors") from exc
        try:
            return load_file(path, device="cpu")
        except Exception as exc:  # safetensors raises its own error types for a file it cannot parse
            raise ValueError(f"{path!r} is not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        with open(path, "rb") as f:
            head = f.read(4)
        if not (head.startswith(b"PK") or head.startswith(b"\x80")):  # torch.save writes a zip, or once a pickle
            raise ValueError(
                f"{path!r} is not a PyTorch checkpoint: torch.save writes a zip file (or, before PyTorch 1.6, a "
                f"pickle), and this file starts with {head!r}. Give the files torch.save wrote."
            ) from exc
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "Unsupported operand" in str(exc):
            raise ValueError(
                f"checkpoint file {path!r} was refused: it holds Python objects beyond tensors and plain containers, "
                "and "
                "unpickling them could run code. Nothing from it was executed. If you trust the file, re-save only the "
                "tensors: torch.save(model.state_dict(), path)."
            ) from exc
        raise ValueError(f"{path!r} is not a PyTorch checkpoint ({exc})") from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, IndexError, TypeError) as exc:
        raise ValueError(
            f"{path!r} is not a PyTorch checkpoint: torch.load failed ({type(exc).__name__}: {exc})"
        ) from exc
    return state_dict_of(obj, path)


def state_dict_of(obj, path="checkpoint") -> dict:
    """Find the ``state_dict`` inside a loaded checkpoint object."""
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{path!r} holds a {type(obj).__name__}, not a state_dict; save model.state_dict() (or a dict with it "
            "under 'model')"
        )
    for key in STATE_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner)
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    raise ValueError(
        f"{path!r} holds a dict with keys {list(obj)[:8]} but no state_dict: expected tensors by name, or one under "
        f"{' / '.join(repr(k) for k in STATE_KEYS)}"
    )
