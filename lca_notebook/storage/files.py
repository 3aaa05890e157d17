"""What both kinds of store share: root attributes, chunk files checked and fsynced, checksums, locks,
atomic creation and replacement.

A store grows by whole chunks: data files first (written by zarr, then fsynced), then the count of
completed rows in the root ``zarr.json`` (replaced atomically). Data chunks are stored uncompressed
with a CRC32C checksum after each (zarr v3's ``crc32c`` codec), so opening can check that every file
of the claimed rows exists with its exact size, and reading a chunk checks its checksum
(:class:`CheckedArray` names the store, array, chunk and file of a damaged one).

>>> import os, tempfile, zarr
>>> path = os.path.join(tempfile.mkdtemp(), "s.zarr")
>>> create_atomically(path, lambda tmp: zarr.open_group(tmp, mode="w-", zarr_format=3))
>>> update_attrs(path, lca_notebook="result", n=1)
>>> read_attrs(path)["n"]
1
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import json
import math
import os
import shutil
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable

import google_crc32c
import numpy as np
import pandas as pd
import zarr
from zarr.codecs import Crc32cCodec

from ..errors import StoreDamagedError, StoreInUseError, StoreWriteError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks (see lock())
    fcntl = None  # type: ignore[assignment]

KIND = "lca_notebook"  # root attribute: "result" or "trajectory"
#: Format of trajectory stores. 2: every chunk ends with a CRC32C checksum. 1 (before): plain chunks; still read.
FORMAT = 2
#: Format of result stores. 3: names on `parameter` as int32 codes (coded_names). 2: checksummed chunks and a hash
#: of each snapshot read, names as variable-length strings; still read and continued. 1: plain chunks; still read,
#: never continued.
RESULT_FORMAT = 3


def local_path(path) -> str:
    """``path`` (str or path-like, ``~`` expanded) as an absolute path: how every store and file path is taken."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


class _Readers:
    """Alive while a result in this process reads a store lazily (:func:`reading`)."""


#: Result stores opened lazily in this process, each to a token its results hold (gone when they are).
_READERS: weakref.WeakValueDictionary[str, _Readers] = weakref.WeakValueDictionary()


def reading(path: str) -> _Readers:
    """The token a result opened from the store at ``path`` keeps: while one lives, :func:`in_use` says so (a
    zarr store's chunks are read by path, so a store replaced under an open result would be read as its own)."""
    token = _READERS.get(path)
    if token is None:
        token = _READERS[path] = _Readers()
    return token


def in_use(path: str) -> bool:
    """Whether a result of this process reads the store at ``path``."""
    return _READERS.get(path) is not None


def checksummed() -> list:
    """The ``compressors`` of every array this package writes: a CRC32C of each chunk, nothing else."""
    return [Crc32cCodec()]


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
        raise StoreDamagedError(
            f"the store {path!r} is damaged: {meta_file} cannot be read ({type(exc).__name__}: {exc})"
        ) from exc


def check_format(path: str, attrs: dict, newest: int = FORMAT) -> int:
    """The store's format number; a store from a newer lca_notebook (past ``newest``) is refused, naming it."""
    fmt = attrs.get("format", 1)
    if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 1:
        raise damaged_attribute(path, "format", fmt, f"a format number (1..{newest})")
    if fmt > newest:
        raise ValueError(
            f"the store {path!r} has format {fmt}, written by a newer lca_notebook; this one reads formats "
            f"1..{newest}. Upgrade lca_notebook to open it."
        )
    return fmt


#: Attribute of a string coordinate on ``parameter`` stored as int32 codes: its names, the codes index them.
CATEGORIES = "categories"


def coded_names(names: pd.Categorical) -> tuple[tuple[str], np.ndarray, dict]:
    """A per-parameter name coordinate as a store keeps it: int32 codes and the names they index in the attribute
    ``categories`` (10M parameters: 40 MB written in a fraction of a second, where variable-length strings took
    10-20 s to write and as long to read)."""
    return ("parameter",), np.asarray(names.codes, dtype=np.int32), {CATEGORIES: [str(x) for x in names.categories]}


def decoded_names(path: str, name: str, codes, attrs) -> pd.Categorical | None:
    """The names of a coordinate stored by :func:`coded_names` (as a result holds them in memory: the codes and
    their names, :func:`~lca_notebook.layout.names`), or None if it is not one."""
    names = attrs.get(CATEGORIES)
    codes = np.asarray(codes)
    if names is None or codes.dtype.kind not in "iu":
        return None
    bad = not isinstance(names, list) or not all(isinstance(x, str) for x in names) or len(set(names)) < len(names)
    if not bad and codes.size and (codes.min() < 0 or codes.max() >= len(names)):
        bad = True
    if bad:
        shown = repr(names) if len(repr(names)) <= 80 else repr(names)[:77] + "..."
        raise StoreDamagedError(
            f"the store {path!r} is damaged: the attribute {CATEGORIES!r} of its coordinate {name!r} is {shown}, "
            f"expected a list of {int(codes.max()) + 1 if codes.size else 'the'} names its codes index (in "
            f"{os.path.join(path, name, 'zarr.json')}). Restore the store from a backup, or delete it and compute "
            "it again."
        )
    return pd.Categorical.from_codes(codes, categories=names)


def damaged_attribute(path: str, name: str, value, expected: str) -> StoreDamagedError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return StoreDamagedError(
        f"the store {path!r} is damaged: its attribute {name!r} is {shown}, expected {expected} "
        f"(in {os.path.join(path, 'zarr.json')}). Restore the store from a backup, or delete it and compute it again."
    )


def int_attr(path: str, attrs: dict, name: str, *, default: int | None = None, low: int = 0, high: int | None = None):
    """A whole-number root attribute in ``[low, high]``; anything else means the store is damaged."""
    value = attrs.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise damaged_attribute(path, name, value, f"a whole number in {bounds}")
    return value


def number_attr(path: str, attrs: dict, name: str) -> float:
    """A non-negative number attribute (totals: ``seconds``, ``gradient_evaluations``), 0 when absent."""
    value = attrs.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or not math.isfinite(value):
        raise damaged_attribute(path, name, value, "a number >= 0")
    return value


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
        raise StoreDamagedError(
            f"the store {path!r} is damaged: {meta_file} cannot be read ({type(exc).__name__}: {exc})"
        ) from exc


def chunk_rows(path: str, name: str) -> int:
    """Rows per chunk of an array along its first dimension."""
    return int(_array_meta(path, name)["chunk_grid"]["configuration"]["chunk_shape"][0])


def _codecs(meta: dict) -> list:
    return [c.get("name") if isinstance(c, dict) else c for c in meta.get("codecs", [])]


def _chunk_size(meta: dict) -> int | None:
    """Bytes of every chunk file of a fixed-size array: raw data, plus 4 with a checksum; None if unknown."""
    codecs, dtype = _codecs(meta), meta.get("data_type")
    if codecs not in (["bytes"], ["bytes", "crc32c"]) or not isinstance(dtype, str):
        return None
    try:
        raw = math.prod(meta["chunk_grid"]["configuration"]["chunk_shape"]) * np.dtype(dtype).itemsize
    except TypeError:
        return None
    return raw + 4 * (codecs[-1] == "crc32c")


def _chunk_files(path: str, name: str, start: int, stop: int):
    """``(file, expected size or None, first row)`` of every chunk holding rows ``[start, stop)``."""
    meta = _array_meta(path, name)
    shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
    size = _chunk_size(meta)
    if stop <= start or any(s == 0 for s in shape[1:]):
        return
    others = [range(math.ceil(s / c)) for s, c in zip(shape[1:], chunks[1:], strict=True)]
    for i in range(start // chunks[0], math.ceil(stop / chunks[0])):
        for js in itertools.product(*others):
            yield os.path.join(path, name, "c", str(i), *map(str, js)), size, i * chunks[0]


def check_rows(path: str, name: str, stop: int, what: str = "row"):
    """Raise a :class:`StoreDamagedError` naming the file unless every chunk of rows ``[0, stop)`` is there,
    whole (its exact size: checksums are checked when a chunk is read)."""
    for file, size, first in _chunk_files(path, name, 0, stop):
        try:
            actual = os.stat(file).st_size
        except FileNotFoundError:
            actual = None
        if actual is None or (size is not None and actual != size):
            state = "is missing" if actual is None else f"has {actual} bytes instead of {size} (truncated)"
            raise StoreDamagedError(
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


# -- checksums ----------------------------------------------------------------------------------------
def chunk_is_intact(file: str) -> bool:
    """Whether a chunk file written with the ``crc32c`` codec matches its checksum (its last 4 bytes)."""
    with open(file, "rb") as f:
        data = f.read()
    return len(data) >= 4 and google_crc32c.value(data[:-4]) == int.from_bytes(data[-4:], "little")


def _is_checksum_error(exc: BaseException) -> bool:
    return isinstance(exc, ValueError) and "checksum" in str(exc).lower()


def _chunk_ranges(key, shape, chunks):
    """Per dimension, the chunk indices an indexing key touches (all of them where the key is not plain)."""
    key = key if isinstance(key, tuple) else (key,)
    out = []
    for d, (n, c) in enumerate(zip(shape, chunks, strict=True)):
        k = key[d] if d < len(key) else slice(None)
        if isinstance(k, (int, np.integer)):
            i = int(k) + n if k < 0 else int(k)
            out.append(range(i // c, i // c + 1))
        elif isinstance(k, slice) and k.step in (None, 1):
            a, b, _ = k.indices(n)
            out.append(range(a // c, math.ceil(b / c)) if b > a else range(0))
        else:
            out.append(range(math.ceil(n / c)))
    return out


_REPAIR = "restore the store from a backup, or delete it and compute it again to repair it."


def damaged_chunk(path: str, name: str, key, what: str = "row", repair: str = _REPAIR) -> Exception | None:
    """After a checksum failure reading ``key`` of an array: the error naming the first damaged chunk of
    those the key touches (store, array, chunk, file, rows, how to repair), or None if none is found."""
    meta = _array_meta(path, name)
    shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
    for idx in itertools.product(*_chunk_ranges(key, shape, chunks)):
        file = os.path.join(path, name, "c", *map(str, idx))
        if os.path.exists(file) and not chunk_is_intact(file):
            first = idx[0] * chunks[0] if idx else 0
            last = min(first + chunks[0], shape[0]) - 1 if idx else 0
            return StoreDamagedError(
                f"the store {path!r} is damaged: chunk {'.'.join(map(str, idx))} of {name!r} "
                f"({what}s {first}..{last}), file {os.path.relpath(file, path)}, fails its CRC32C checksum: its bytes "
                f"changed after they were written (a disk or copy error). Everything outside that chunk is unaffected; "
                f"{repair}"
            )
    return None


class CheckedArray:
    """One array of a store whose reads and writes name a damaged chunk (a checksum that fails) with the
    store, array, chunk and file. Chunks equal to the fill value are written too: a missing file then
    always means damage. Usable as a dask source (``shape``, ``dtype``, ``ndim``, ``__getitem__``)."""

    def __init__(self, path: str, name: str, mode: str = "r+", what: str = "row", repair: str = _REPAIR):
        self.path, self.name, self.what, self.repair = path, name, what, repair
        self.array = zarr.open_array(path, path=name, mode=mode).with_config({"write_empty_chunks": True})

    @property
    def shape(self):
        return self.array.shape

    @property
    def dtype(self):
        return self.array.dtype

    @property
    def ndim(self):
        return self.array.ndim

    @property
    def chunks(self):
        return self.array.chunks

    def resize(self, shape):
        self.array.resize(shape)

    def _named(self, exc, key):
        if _is_checksum_error(exc):
            named = damaged_chunk(self.path, self.name, key, self.what, self.repair)
            if named is not None:
                return named
        return None

    def __getitem__(self, key):
        try:
            return self.array[key]
        except ValueError as exc:
            named = self._named(exc, key)
            if named is None:
                raise
            raise named from exc

    def __setitem__(self, key, value):  # a partial chunk is read first, and checked
        try:
            self.array[key] = value
        except ValueError as exc:
            named = self._named(exc, key)
            if named is None:
                raise
            raise named from exc


def open_array(path: str, name: str, mode: str = "r+", what: str = "row", repair: str = _REPAIR) -> CheckedArray:
    """One array of a store, its damaged chunks named on read (see :class:`CheckedArray`)."""
    return CheckedArray(path, name, mode, what, repair)


# -- who may write: one writer per path -----------------------------------------------------------------
_HELD: dict[str, weakref.ref] = {}  # this process's locks, by lock file
_HELD_GUARD = threading.Lock()


def _lock_file(path: str) -> str:
    return os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.lock")


class PathLock:
    """The right to write one path: an advisory ``flock`` on a sibling file ``.NAME.lock``, held until
    :meth:`release` (or until the holder is garbage-collected). The kernel drops it when the holding
    process dies (even by SIGKILL), so a killed writer never blocks the next one; the file records the
    holder's pid and what it does, for the other writer's error.

    ``reclaimable``: the holder is idle (a result store between runs, kept alive by a traceback in a
    notebook), so a new writer in the same thread, or after the holder's thread ended, may take the lock
    over; other threads and processes are still kept out."""

    def __init__(self, path: str, fd: int, lock_file: str, doing: str):
        self.path, self.fd, self.lock_file, self.doing = path, fd, lock_file, doing
        self.reclaimable = False
        self.thread = threading.current_thread()

    def release(self):
        with _HELD_GUARD:
            if self.fd < 0:
                return
            ref = _HELD.get(self.lock_file)
            if ref is not None and ref() is self:
                del _HELD[self.lock_file]
            with contextlib.suppress(OSError):
                os.unlink(self.lock_file)  # still ours (we hold it): no one else can be using this file
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.release()


def _holder(lock_file: str) -> str:
    try:
        with open(lock_file, encoding="utf-8") as f:
            info = json.load(f)
        since = time.strftime("%H:%M:%S", time.localtime(float(info["since"])))
        who = "this process" if int(info["pid"]) == os.getpid() else f"process {int(info['pid'])}"
        return f"{who} ({info.get('doing', 'writing')}, since {since})"
    except Exception:
        return "another process"


def _take_over(lock_file: str, doing: str) -> PathLock | None:
    """This process's idle holder of ``lock_file`` hands its lock to a new writer here (see ``reclaimable``)."""
    with _HELD_GUARD:
        ref = _HELD.get(lock_file)
        old = ref() if ref is not None else None
        if old is None or not old.reclaimable or old.fd < 0:
            return None
        if old.thread is not threading.current_thread() and old.thread.is_alive():
            return None  # another thread may still be about to run it
        new = PathLock(old.path, old.fd, lock_file, doing)
        old.fd = -1
        _HELD[lock_file] = weakref.ref(new)
        return new


def lock(path: str, doing: str) -> PathLock:
    """Take the right to write ``path`` (a store or a saved file), or raise :class:`StoreInUseError` naming
    who holds it. Two writers in one process conflict too. ``doing`` says what for, in the other's error."""
    lock_file = _lock_file(path)
    try:
        os.makedirs(os.path.dirname(lock_file) or ".", exist_ok=True)
    except OSError as exc:
        raise StoreWriteError(
            f"cannot create the store {path!r} ({type(exc).__name__}: {exc}); is the location writable?"
        ) from exc
    if fcntl is None:  # pragma: no cover - no advisory locks here: writers are not kept apart
        return PathLock(path, -1, lock_file, doing)
    for _ in range(100):
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreWriteError(
                f"cannot create the store {path!r} ({type(exc).__name__}: {exc}); is the location writable?"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreWriteError(f"cannot lock {lock_file!r} to write {path!r} ({exc})") from exc
            taken = _take_over(lock_file, doing)
            if taken is not None:
                return taken
            raise StoreInUseError(
                f"{path!r} is being written by {_holder(lock_file)}: two writers would destroy each other's work, so "
                "nothing was done here. Wait until it finishes (a stopped analyze(store=...) is then continued by "
                "running it again), or use another path."
            ) from None
        try:  # the file we locked must still be the one at that path (its last holder may have just removed it)
            if os.fstat(fd).st_ino != os.stat(lock_file).st_ino:
                raise FileNotFoundError(lock_file)
        except FileNotFoundError:
            os.close(fd)
            continue
        info = json.dumps({"pid": os.getpid(), "since": time.time(), "doing": doing})
        os.ftruncate(fd, 0)
        os.write(fd, info.encode())
        held = PathLock(path, fd, lock_file, doing)
        with _HELD_GUARD:
            _HELD[lock_file] = weakref.ref(held)
        return held
    raise StoreInUseError(f"{path!r}: its lock file {lock_file!r} keeps changing; another writer is starting there")


# -- creating and replacing ----------------------------------------------------------------------------
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
        raise ValueError(
            f"{path!r} already exists and is {describe(path, attrs)}; give a new path (nothing was written there)."
        )
    return attrs


def describe(path: str, attrs: dict | None = None) -> str:
    """What is at ``path``, in words, for errors that refuse to write there."""
    if attrs is None:
        try:
            attrs = read_attrs(path) if os.path.isdir(path) else {}
        except (OSError, ValueError):
            attrs = {}
    if KIND in attrs:
        return f"an lca_notebook {attrs[KIND]} store"
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return f"not an lca_notebook store (a folder holding {shown})" if names else "an empty folder"
    return "not an lca_notebook store"


def _fresh_sibling(path: str, what: str) -> str:
    parent = os.path.dirname(path) or "."
    return os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.{what}")


def create_atomically(path: str, write: Callable[[str], object]):
    """Build a store in a sibling temp folder, then rename it into place: a kill never leaves half a skeleton."""
    tmp = _fresh_sibling(path, "creating")
    try:
        write(tmp)
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
        os.rename(tmp, path)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and os.path.exists(path):
            raise StoreInUseError(
                f"{path!r} was created by another writer at the same moment; nothing was written there. Wait until "
                "it finishes, or use another path."
            ) from exc
        raise StoreWriteError(
            f"cannot create the store {path!r} ({type(exc).__name__}: {exc}); is the location writable?"
        ) from exc
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):
        return False  # a filesystem without exchange
    raise OSError(err, os.strerror(err), b)


def replace_atomically(path: str, write: Callable[[str], object]):
    """Write a new version of ``path`` (a file or a folder) aside in a sibling temp, then swap it in: a
    failure or a kill while writing leaves the old version untouched. The swap is one atomic step where
    the system has it (Linux); elsewhere the old version is moved aside first, so a kill in between
    leaves it beside the path as ``.NAME.<random>.replaced``."""
    tmp = _fresh_sibling(path, "creating")
    old = None
    try:
        write(tmp)
        if not os.path.lexists(path):
            os.rename(tmp, path)
        elif os.path.isdir(path) != os.path.isdir(tmp):
            raise ValueError(
                f"{path!r} is a {'folder' if os.path.isdir(path) else 'file'}; cannot replace it by the other"
            )
        elif os.path.isdir(path):
            if _exchange(tmp, path):
                old = tmp  # tmp now holds the old version
            else:
                old = _fresh_sibling(path, "replaced")
                os.rename(path, old)
                os.rename(tmp, path)
        else:
            os.replace(tmp, path)
    except OSError as exc:
        raise StoreWriteError(
            f"cannot write {path!r} ({type(exc).__name__}: {exc}); what was there before is unchanged"
        ) from exc
    finally:
        for leftover in (tmp, old):
            if leftover is not None and os.path.lexists(leftover):
                if os.path.isdir(leftover) and not os.path.islink(leftover):
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(leftover)


class Arrays:
    """Some arrays of one store, written a block of whole rows at a time and fsynced.

    ``write(start, blocks)`` puts each ``blocks[name]`` at rows ``start .. start + len(block)`` of its
    array, then fsyncs those chunk files: only after that may the caller count the rows as written."""

    def __init__(self, path: str, names, what: str = "row"):
        self.path = path
        self.arrays = {name: open_array(path, name, what=what) for name in names}

    def __getitem__(self, name: str):
        return self.arrays[name]

    def write(self, start: int, blocks: dict):
        for name, block in blocks.items():
            if len(block):
                self.arrays[name][start : start + len(block)] = block
        for name, block in blocks.items():
            sync_rows(self.path, name, start, start + len(block))
