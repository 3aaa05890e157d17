"""What both kinds of store share: root attributes, chunk files checked and fsynced, atomic creation.

A store grows by whole chunks: data files first (written by zarr, then fsynced), then the count of
completed rows in the root ``zarr.json`` (replaced atomically). Data chunks are stored uncompressed
so that opening can check every file of the claimed rows exists with its exact size.

>>> import os, tempfile, zarr
>>> path = os.path.join(tempfile.mkdtemp(), "s.zarr")
>>> create_atomically(path, lambda tmp: zarr.open_group(tmp, mode="w-", zarr_format=3))
>>> update_attrs(path, lca_notebook="result", n=1)
>>> read_attrs(path)["n"]
1
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable

import numpy as np
import zarr

from ..errors import StoreWriteError

KIND = "lca_notebook"  # root attribute: "result" or "trajectory"
FORMAT = 1


def read_attrs(path: str) -> dict:
    """The root attributes of a store, read straight from its ``zarr.json``."""
    meta_file = os.path.join(path, "zarr.json")
    try:
        with open(meta_file, encoding="utf-8") as f:
            meta = json.load(f)
        return dict(meta["attributes"]) if isinstance(meta, dict) and "attributes" in meta else {}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path!r} is not a zarr store (it has no zarr.json)") from None
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(
            f"the store {path!r} is damaged: {meta_file} cannot be read ({type(exc).__name__}: {exc})"
        ) from exc


def fsync(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def update_attrs(path: str, *, durable: bool = True, **changes):
    """Change root attributes atomically (temp file, rename): a kill leaves old or new, never half.
    ``durable`` also fsyncs, so the change survives a power cut, not only a killed process."""
    meta_file = os.path.join(path, "zarr.json")
    with open(meta_file, encoding="utf-8") as f:
        meta = json.load(f)
    meta.setdefault("attributes", {}).update(changes)
    tmp = f"{meta_file}.{uuid.uuid4().hex}.partial"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, meta_file)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if durable:
        fsync(path)


def _array_meta(path: str, name: str) -> dict:
    meta_file = os.path.join(path, name, "zarr.json")
    try:
        with open(meta_file, encoding="utf-8") as f:
            meta = json.load(f)
        meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
        return meta
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"the store {path!r} is damaged: {meta_file} cannot be read ({type(exc).__name__}: {exc})"
        ) from exc


def chunk_rows(path: str, name: str) -> int:
    """Rows per chunk of an array along its first dimension."""
    return int(_array_meta(path, name)["chunk_grid"]["configuration"]["chunk_shape"][0])


def _chunk_files(path: str, name: str, start: int, stop: int):
    """``(file, expected size or None, first row)`` of every chunk holding rows ``[start, stop)``."""
    meta = _array_meta(path, name)
    shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
    plain = [c.get("name") for c in meta.get("codecs", [])] == ["bytes"]  # uncompressed: size is known
    dtype = meta.get("data_type")
    size = math.prod(chunks) * np.dtype(dtype).itemsize if plain and isinstance(dtype, str) else None
    if stop <= start or any(s == 0 for s in shape[1:]):
        return
    others = [range(math.ceil(s / c)) for s, c in zip(shape[1:], chunks[1:], strict=True)]
    for i in range(start // chunks[0], math.ceil(stop / chunks[0])):
        for js in itertools.product(*others):
            yield os.path.join(path, name, "c", str(i), *map(str, js)), size, i * chunks[0]


def check_rows(path: str, name: str, stop: int, what: str = "row"):
    """Raise a ValueError naming the file unless every chunk of rows ``[0, stop)`` is there, whole."""
    for file, size, first in _chunk_files(path, name, 0, stop):
        try:
            actual = os.stat(file).st_size
        except FileNotFoundError:
            actual = None
        if actual is None or (size is not None and actual != size):
            state = "is missing" if actual is None else f"has {actual} bytes instead of {size} (truncated)"
            raise ValueError(
                f"the store {path!r} is damaged: {os.path.relpath(file, path)} ({name!r} from {what} {first}) "
                f"{state}. Everything before {what} {first} is intact; delete the store and compute it again to "
                "repair it."
            )


def sync_rows(path: str, name: str, start: int, stop: int):
    """fsync the chunk files holding rows ``[start, stop)`` of an array, and their folders."""
    dirs = set()
    for file, _, _ in _chunk_files(path, name, start, stop):
        fsync(file)
        dirs.add(os.path.dirname(file))
    for d in dirs:
        fsync(d)


def open_array(path: str, name: str, mode: str = "r+"):
    """One array of a store. Chunks equal to the fill value are written too: a missing file then always
    means damage."""
    return zarr.open_array(path, path=name, mode=mode).with_config({"write_empty_chunks": True})


def refuse_foreign(path: str, kind: str) -> dict | None:
    """An existing path we may write into must be empty or a store of ``kind``: never wipe a user's folder.
    Returns the store's attributes, or None when there is nothing there yet."""
    if not os.path.exists(path):
        return None
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is a file; a store is a directory. Choose another path.")
    if not os.listdir(path):
        return None
    attrs = read_attrs(path) if os.path.exists(os.path.join(path, "zarr.json")) else {}
    if attrs.get(KIND) != kind:
        what = f"an lca_notebook {attrs[KIND]} store" if KIND in attrs else "not an lca_notebook store"
        raise ValueError(f"{path!r} already exists and is {what}; give a new path (nothing was written there).")
    return attrs


def create_atomically(path: str, write: Callable[[str], object]):
    """Build a store in a sibling temp folder, then rename it into place: a kill never leaves half a skeleton."""
    parent = os.path.dirname(path) or "."
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.creating")
    try:
        write(tmp)
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
        os.rename(tmp, path)
    except OSError as exc:
        raise StoreWriteError(
            f"cannot create the store {path!r} ({type(exc).__name__}: {exc}); is the location writable?"
        ) from exc
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


class Arrays:
    """Some arrays of one store, written a block of whole rows at a time and fsynced.

    ``write(start, blocks)`` puts each ``blocks[name]`` at rows ``start .. start + len(block)`` of its
    array, then fsyncs those chunk files: only after that may the caller count the rows as written."""

    def __init__(self, path: str, names):
        self.path = path
        self.arrays = {name: open_array(path, name) for name in names}

    def __getitem__(self, name: str):
        return self.arrays[name]

    def write(self, start: int, blocks: dict):
        for name, block in blocks.items():
            if len(block):
                self.arrays[name][start : start + len(block)] = block
        for name, block in blocks.items():
            sync_rows(self.path, name, start, start + len(block))
